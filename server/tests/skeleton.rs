//! The server skeleton: health, the web app with client-side route fallback, JSON 404s for the
//! API, and graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::TestServer;
use reqwest::StatusCode;
use wadi_server::Config;

#[tokio::test]
async fn healthz_answers_ok() {
    let server = TestServer::start().await;
    let response = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "ok");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn serves_the_web_app_with_a_fallback_for_client_routes() {
    let data = tempfile::tempdir().unwrap();
    // The web directory, with a secret planted beside it.
    let root = tempfile::tempdir().unwrap();
    let web = tempfile::TempDir::new_in(root.path()).unwrap();
    std::fs::write(root.path().join("secret.txt"), "TOP SECRET").unwrap();
    std::fs::write(
        web.path().join("index.html"),
        "<!doctype html><title>app</title>",
    )
    .unwrap();
    std::fs::write(web.path().join("app-1234.js"), "console.log(1)").unwrap();
    std::fs::create_dir(web.path().join("assets")).unwrap();
    let mut config = Config::for_tests(data.path().to_path_buf());
    config.web_dir = Some(web.path().to_path_buf());
    let server = TestServer::start_with(config).await;

    let index = server.http.get(server.url("/")).send().await.unwrap();
    assert_eq!(index.status(), StatusCode::OK);
    assert!(index.text().await.unwrap().contains("<title>app</title>"));

    let script = server
        .http
        .get(server.url("/app-1234.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(script.status(), StatusCode::OK);
    let content_type = script.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/javascript"),
        "{content_type}"
    );
    assert_eq!(script.text().await.unwrap(), "console.log(1)");

    let route = server
        .http
        .get(server.url("/c/0190-abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(route.status(), StatusCode::OK);
    assert!(route.text().await.unwrap().contains("<title>app</title>"));

    // A missing file is a 404, not the app's page: an asset of an older build must not be
    // answered with HTML the browser then fails to run.
    for missing in [
        "/app-0000.js",
        "/assets/missing-12345678.wasm",
        "/favicon.ico",
    ] {
        let response = server.http.get(server.url(missing)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{missing}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], "not_found", "{missing}");
    }
    // A directory is never redirected to itself with a slash: `//assets` would have gone to
    // `//assets/`, another host to a browser.
    for target in ["//assets", "/assets", "//assets/"] {
        let (status, answer) = raw_get(&server, target).await;
        assert_eq!(status, 200, "{target}: {answer}");
        assert!(answer.contains("<title>app</title>"), "{target}: {answer}");
        assert!(
            !answer.to_lowercase().contains("location:"),
            "{target}: {answer}"
        );
    }

    // Raw request lines, since HTTP clients normalise `..` away before sending.
    for target in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E%2Fsecret.txt",
        "/..%2fsecret.txt",
        "/app/../../secret.txt",
        "/..\\secret.txt",
        "//../secret.txt",
    ] {
        let (status, body) = raw_get(&server, target).await;
        assert!(
            !body.contains("TOP SECRET"),
            "{target} leaked the file ({status})"
        );
    }

    server.shutdown().await.unwrap();
}

/// `GET <target>` sent byte for byte; the status and body.
async fn raw_get(server: &TestServer, target: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(common::TIMEOUT, tcp.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn unknown_api_paths_are_json_404s() {
    let server = TestServer::start().await;
    let response = server
        .http
        .get(server.url("/api/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
    assert!(body["message"].is_string());
    for path in ["/api", "/api/"] {
        let response = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], "not_found", "{path}");
    }
    // A known path asked with a method it does not take: 405, its Allow header, and JSON.
    for (method, path, allowed) in [
        (reqwest::Method::PUT, "/api/conversations/0190", "PATCH"),
        (reqwest::Method::DELETE, "/api/conversations", "POST"),
        (reqwest::Method::POST, "/api/search", "GET"),
        (reqwest::Method::GET, "/api/csp-report", "POST"),
    ] {
        let response = server
            .http
            .request(method.clone(), server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        let allow = response.headers()["allow"].to_str().unwrap().to_owned();
        assert!(allow.contains(allowed), "{method} {path}: {allow}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], "invalid_request", "{method} {path}");
        assert!(body["requestId"].is_string(), "{body}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_a_built_app_the_root_explains_how_to_build_it() {
    let empty = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(data.path().to_path_buf());
    config.web_dir = Some(empty.path().to_path_buf());
    let server = TestServer::start_with(config).await;
    let response = server.http.get(server.url("/")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.unwrap().contains("cargo xtask run"));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let server = TestServer::start().await;
    let addr = server.addr;
    server.shutdown().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn unknown_auth_and_socket_paths_and_non_get_methods_are_404s() {
    let server = TestServer::start().await;
    for (method, path) in [
        (reqwest::Method::GET, "/auth/v1/nope"),
        (reqwest::Method::POST, "/auth/v2/signup"),
        (reqwest::Method::GET, "/ws/nope"),
        (reqwest::Method::POST, "/"),
        (reqwest::Method::DELETE, "/some/route"),
    ] {
        let response = server
            .http
            .request(method.clone(), server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method} {path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], "not_found");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn hashed_assets_are_cached_and_compressed_and_the_page_is_revalidated() {
    let data = tempfile::tempdir().unwrap();
    let web = tempfile::tempdir().unwrap();
    std::fs::write(
        web.path().join("index.html"),
        "<!doctype html><title>app</title>",
    )
    .unwrap();
    let script = "console.log('hello from a hashed asset');\n".repeat(50);
    std::fs::write(web.path().join("app-1a2b3c4d5e6f7a8b.js"), &script).unwrap();
    let mut config = Config::for_tests(data.path().to_path_buf());
    config.web_dir = Some(web.path().to_path_buf());
    let server = TestServer::start_with(config).await;

    let asset = server
        .http
        .get(server.url("/app-1a2b3c4d5e6f7a8b.js"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(
        asset.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert_eq!(asset.headers()["content-encoding"], "gzip");
    let compressed = asset.bytes().await.unwrap();
    assert!(
        compressed.len() < script.len() / 4,
        "{} bytes",
        compressed.len()
    );

    let brotli = server
        .http
        .get(server.url("/app-1a2b3c4d5e6f7a8b.js"))
        .header("accept-encoding", "br")
        .send()
        .await
        .unwrap();
    assert_eq!(brotli.headers()["content-encoding"], "br");

    for path in ["/", "/c/0193abcd"] {
        let page = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(page.headers()["cache-control"], "no-cache", "{path}");
    }
    server.shutdown().await.unwrap();
}

#[cfg(unix)]
#[tokio::test]
async fn the_data_directory_and_database_are_private_to_the_server_user() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let data_dir = parent.path().join("fresh-data");
    let mut config = wadi_server::Config::for_tests(data_dir.clone());
    config.addr = "127.0.0.1:0".parse().unwrap();
    let mut server = TestServer::start_with(config).await;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data_dir), 0o700, "the data directory");
    assert_eq!(mode(&data_dir.join("wadi.db")), 0o600, "the database");
    let wal = data_dir.join("wadi.db-wal");
    if wal.exists() {
        assert_eq!(mode(&wal), 0o600, "its write-ahead log");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_can_require_a_token_or_live_on_their_own_listener() {
    let mut guarded = TestServer::configured(common::Engine::Sqlite, |config| {
        config.metrics_token = Some("metrics-secret".into());
    })
    .await;
    let url = guarded.url("/metrics");
    let anonymous = guarded.http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let wrong = guarded
        .http
        .get(&url)
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let allowed = guarded
        .http
        .get(&url)
        .bearer_auth("metrics-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), StatusCode::OK);
    assert!(allowed.text().await.unwrap().contains("wadi_active_runs"));
    guarded.stop().await.unwrap();

    let metrics_port = common::net::free_port();
    let mut split = TestServer::configured(common::Engine::Sqlite, |config| {
        config.metrics_addr = Some(([127, 0, 0, 1], metrics_port).into());
    })
    .await;
    let public = split.http.get(split.url("/metrics")).send().await.unwrap();
    assert_eq!(
        public.status(),
        StatusCode::NOT_FOUND,
        "not on the public port"
    );
    let private = split
        .http
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(private.status(), StatusCode::OK);
    assert!(private.text().await.unwrap().contains("wadi_instance_info"));
    split.stop().await.unwrap();
}

#[tokio::test]
async fn every_response_names_its_request_and_errors_quote_it() {
    let server = TestServer::start().await;
    let response = server
        .http
        .get(server.url("/api/conversations"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let id = response
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["requestId"], id.as_str());
    // A proxy's id is kept; a malformed one is replaced.
    let response = server
        .http
        .get(server.url("/healthz"))
        .header("X-Request-Id", "edge-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "edge-42");
    let response = server
        .http
        .get(server.url("/healthz"))
        .header("X-Request-Id", "bad id\twith tabs")
        .send()
        .await
        .unwrap();
    assert_ne!(response.headers()["x-request-id"], "bad id\twith tabs");
    // The embedded auth service's errors carry it too.
    let response = server
        .http
        .post(server.url("/auth/v1/token?grant_type=password"))
        .json(&serde_json::json!({"email": "nobody@example.com", "password": "nope nope"}))
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["request_id"], id.as_str());
}

#[tokio::test]
async fn responses_carry_security_headers() {
    let server = TestServer::start().await;
    for path in ["/", "/api/config", "/c/some-client-route"] {
        let response = server.http.get(server.url(path)).send().await.unwrap();
        let headers = response.headers();
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert!(
            headers.get("strict-transport-security").is_none(),
            "plain http"
        );
    }
    let report = server
        .http
        .post(server.url("/api/csp-report"))
        .header("content-type", "application/csp-report")
        .body(r#"{"csp-report":{"violated-directive":"script-src"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(report.status(), StatusCode::NO_CONTENT);
    assert_eq!(server.metric("wadi_csp_violations_total").await, 1.0);

    // The route is public: what is not a report is refused and not counted, and a flood is
    // counted in full but logged only up to a budget (20, then 20 a minute).
    let post = |body: &'static str| {
        server
            .http
            .post(server.url("/api/csp-report"))
            .header("content-type", "application/csp-report")
            .body(body)
            .send()
    };
    let refused = post("not a report").await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "invalid_json");
    for _ in 0..30 {
        let report = post(r#"{"csp-report":{"violated-directive":"img-src"}}"#)
            .await
            .unwrap();
        assert_eq!(report.status(), StatusCode::NO_CONTENT);
    }
    assert_eq!(server.metric("wadi_csp_violations_total").await, 31.0);
    let unlogged = server.metric("wadi_csp_reports_unlogged_total").await;
    assert!(
        (5.0..=11.0).contains(&unlogged),
        "31 reports against a budget of 20 (plus a slow refill): {unlogged} unlogged"
    );
}
