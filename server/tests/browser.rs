//! End-to-end: the `wadi` binary (serving the built web app) started alone in an empty
//! directory, driven through headless Chromium, with a fake model whose pace each test controls. Run by `cargo
//! xtask test` (which builds the binary and installs Chromium); see `common::browser`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    browser::{App, Browser, Proxy, Scenario},
    upstream::{FakeUpstream, Script, Step},
};

const DESKTOP: (u32, u32) = (1280, 800);
const PHONE: (u32, u32) = (390, 844);
const PASSWORD: &str = "correct horse battery";
const ENTER: &str = "\u{e007}";

fn unique_email() -> String {
    format!("e2e-{}@example.com", uuid::Uuid::new_v4())
}

/// Creates an account through the sign-in screen and waits for the app.
async fn sign_up(browser: &Browser, url: &str, email: &str) {
    browser.goto(url).await;
    browser.click("form.card button.link").await;
    browser.type_into("input[name=email]", email).await;
    browser.type_into("input[name=password]", PASSWORD).await;
    browser.click("form.card button[type=submit]").await;
    browser.find("nav.sidebar").await;
}

async fn sign_in(browser: &Browser, url: &str, email: &str) {
    browser.goto(url).await;
    browser.type_into("input[name=email]", email).await;
    browser.type_into("input[name=password]", PASSWORD).await;
    browser.click("form.card button[type=submit]").await;
    browser.find("nav.sidebar").await;
}

/// A desktop window in the dark scheme, signed in as `email` at `url`.
async fn dark_desktop(scenario: &Scenario, name: &str, url: &str, email: &str) -> Browser {
    let browser = scenario.browser_in(name, DESKTOP.0, DESKTOP.1, true).await;
    sign_in(&browser, url, email).await;
    browser
}

/// Starts a conversation from the sidebar; returns its id (from the URL).
async fn new_conversation(browser: &Browser) -> String {
    browser.click("button.new").await;
    browser.find("textarea[aria-label=Message]").await;
    let path = browser
        .until(
            "a conversation URL",
            "location.pathname.startsWith('/c/') && location.pathname",
        )
        .await;
    path.as_str().unwrap().trim_start_matches("/c/").to_owned()
}

async fn send(browser: &Browser, text: &str) {
    let composer = browser.find("textarea[aria-label=Message]").await;
    composer.send_keys(text).await.unwrap();
    composer.send_keys(ENTER).await.unwrap();
}

/// Waits until the socket is connected (no banner).
async fn online(browser: &Browser) {
    browser
        .until(
            "the socket to connect",
            "!document.querySelector('.banner') && document.querySelector('.messages')",
        )
        .await;
}

const STREAMING: &str =
    "(document.querySelector('.message.streaming .content') || {}).innerText || ''";
const LAST_ANSWER: &str = "(() => { const all = document.querySelectorAll('.message.assistant:not(.streaming) .content'); return all.length ? all[all.length - 1].innerText : ''; })()";

async fn streaming_contains(browser: &Browser, text: &str) {
    browser
        .until(
            &format!("the streaming answer to show {text:?}"),
            &format!("{STREAMING}.includes({text:?})"),
        )
        .await;
}

async fn answer_is(browser: &Browser, text: &str) -> String {
    let shown = browser
        .until(
            &format!("the answer {text:?}"),
            &format!("{LAST_ANSWER}.trim() === {text:?} && {LAST_ANSWER}"),
        )
        .await;
    shown.as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_one_binary_chats_streams_and_keeps_everything_across_a_reload() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let browser = scenario.browser("chat", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &app.url(), &unique_email()).await;
        let id = new_conversation(&browser).await;
        online(&browser).await;
        send(&browser, "Tell me about rivers").await;
        // The user's message shows at once.
        browser
            .until("the user message", "[...document.querySelectorAll('.message.user')].some(m => m.innerText.includes('Tell me about rivers'))")
            .await;
        let request = upstream.next_request().await;
        // The answer arrives in several steps.
        request.token("Rivers ");
        streaming_contains(&browser, "Rivers").await;
        assert!(!browser.js(&format!("return {STREAMING}")).await.as_str().unwrap().contains("flow"));
        request.token("flow ");
        streaming_contains(&browser, "Rivers flow").await;
        request.token("downhill.");
        request.send(Step::Finish);
        answer_is(&browser, "Rivers flow downhill.").await;
        browser.screenshot("chat-desktop-light").await;

        // Reload: the conversation and the answer are still there.
        browser.client.refresh().await.unwrap();
        answer_is(&browser, "Rivers flow downhill.").await;
        let path = browser.js("return location.pathname").await;
        assert_eq!(path.as_str().unwrap(), format!("/c/{id}"));
        browser
            .until("the conversation in the sidebar", "document.querySelector('.conversation.active a').innerText.includes('Tell me about rivers')")
            .await;
        // Started alone in an empty directory, it made its own database there.
        assert!(app.dir.path().join("wadi-data").join("wadi.db").is_file());
        // All of it ran under the strict Content-Security-Policy, breaking none of it.
        assert_no_csp_violation(&app).await;
    })
    .await;
}

/// The page is served under a strict policy, and no browser reported a violation of it (a
/// blocked script, style or connection is reported to `/api/csp-report` and counted).
async fn assert_no_csp_violation(app: &App) {
    let page = reqwest::get(app.url()).await.unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    // The page starts the app from a file: no inline script is allowed at all.
    assert!(
        csp.contains("script-src 'self' 'wasm-unsafe-eval';"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let metrics = reqwest::get(format!("{}/metrics", app.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("wadi_csp_violations_total 0"),
        "a CSP violation was reported:\n{metrics}"
    );
}

#[tokio::test]
async fn the_one_binary_runs_with_no_configuration_at_all() {
    Scenario::run(|scenario| async move {
        let app = App::start_bare(&[]).await;
        let page = reqwest::get(app.url()).await.unwrap();
        assert_eq!(page.status(), 200);
        assert!(page.text().await.unwrap().contains("<title>WADI</title>"));
        let config: serde_json::Value = reqwest::get(format!("{}/api/config", app.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            config["demoModel"], true,
            "no model configured: the demo answers"
        );
        // And the demo model really answers in the browser.
        let browser = scenario.browser("bare", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &app.url(), &unique_email()).await;
        new_conversation(&browser).await;
        online(&browser).await;
        send(&browser, "hello?").await;
        browser
            .until(
                "the demo answer",
                &format!("{LAST_ANSWER}.includes('demo model')"),
            )
            .await;
        assert!(app.dir.path().join("wadi-data").join("wadi.db").is_file());
    })
    .await;
}

#[tokio::test]
async fn stop_ends_the_answer_where_it_is_and_it_stays_after_a_reload() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let browser = scenario.browser("stop", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &app.url(), &unique_email()).await;
        new_conversation(&browser).await;
        online(&browser).await;
        send(&browser, "Count slowly").await;
        let request = upstream.next_request().await;
        request.token("one ");
        request.token("two ");
        streaming_contains(&browser, "one two").await;
        browser.click("button.stop").await;
        request.cancelled().await;
        let shown = answer_is(&browser, "one two").await;
        // Nothing more arrives, even if the upstream still tried.
        request.token("three");
        browser
            .until("the stopped note", "[...document.querySelectorAll('.message.assistant .note')].some(n => n.innerText.includes('Stopped'))")
            .await;
        browser.client.refresh().await.unwrap();
        assert_eq!(answer_is(&browser, "one two").await, shown);
    })
    .await;
}

#[tokio::test]
async fn a_dropped_connection_shows_a_banner_and_the_answer_completes_exactly() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let proxy = Proxy::start(app.addr).await;
        let browser = scenario.browser("reconnect", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &proxy.url(), &unique_email()).await;
        new_conversation(&browser).await;
        online(&browser).await;
        send(&browser, "A long story please").await;
        let request = upstream.next_request().await;
        let words: Vec<String> = (1..=12).map(|i| format!("w{i} ")).collect();
        for word in &words[..4] {
            request.token(word);
        }
        streaming_contains(&browser, "w4").await;
        // The network drops: the banner shows while the run goes on server-side.
        proxy.cut();
        browser
            .until("the reconnect banner", "document.querySelector('.banner')")
            .await;
        for word in &words[4..8] {
            request.token(word);
        }
        // Back online: the client resumes from its last seq.
        online(&browser).await;
        for word in &words[8..] {
            request.token(word);
        }
        request.send(Step::Finish);
        let expected: String = words.concat();
        answer_is(&browser, expected.trim()).await;
    })
    .await;
}

#[tokio::test]
async fn a_short_lived_token_is_refreshed_on_time_while_a_long_answer_streams() {
    // A 30 s token and a 60 s answer at 20 tokens a second: frames arrive every 50 ms, far
    // faster than any timer floor, and the refresh must still fire (twice) on time.
    const TOKENS: usize = 1_200;
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Tokens {
            tokens: (1..=TOKENS).map(|i| format!("t{i} ")).collect(),
            pace: Duration::from_millis(50),
        })
        .await;
        let app = App::start(
            &upstream.base_url,
            &[("WADI_ACCESS_TOKEN_TTL", "30s"), ("WADI_JWT_LEEWAY", "0s")],
        )
        .await;
        let browser = scenario.browser("refresh", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &app.url(), &unique_email()).await;
        new_conversation(&browser).await;
        online(&browser).await;
        let token = "return JSON.parse(localStorage.getItem('wadi.session')).access_token";
        let first_token = browser.js(token).await;
        // Any reconnect would show the banner: record if it ever appears.
        browser
            .js("window.__banner = false; new MutationObserver(() => { if (document.querySelector('.banner')) window.__banner = true; }).observe(document.body, {childList: true, subtree: true}); return true;")
            .await;
        send(&browser, "Take your time").await;
        let _ = upstream.next_request().await;
        let expected: String = (1..=TOKENS).map(|i| format!("t{i} ")).collect();
        let expected = expected.trim();
        browser
            .until_within(
                "the whole answer",
                &format!("{LAST_ANSWER}.trim() === {expected:?}"),
                Duration::from_secs(120),
            )
            .await;
        let last_token = browser.js(token).await;
        assert_ne!(first_token, last_token, "the token was refreshed");
        assert_eq!(
            browser.js("return window.__banner").await,
            serde_json::json!(false),
            "the socket was never interrupted"
        );
        // The server closed no socket: no `token_expired` (4001), no reconnect.
        let metrics = reqwest::get(format!("{}/metrics", app.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let closes: Vec<&str> = metrics
            .lines()
            .filter(|line| line.starts_with("wadi_ws_closes_total{"))
            .collect();
        assert!(closes.is_empty(), "sockets were closed: {closes:?}");
        let failures: Vec<&str> = metrics
            .lines()
            .filter(|line| line.starts_with("wadi_auth_failures_total{"))
            .collect();
        assert!(failures.is_empty(), "auth failed: {failures:?}");
    })
    .await;
}

#[tokio::test]
async fn html_in_model_output_is_shown_as_text_and_runs_nothing() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let browser = scenario.browser("xss", DESKTOP.0, DESKTOP.1).await;
        let email = unique_email();
        sign_up(&browser, &app.url(), &email).await;
        let id = new_conversation(&browser).await;
        online(&browser).await;
        send(&browser, "Say something nasty").await;
        let request = upstream.next_request().await;
        request.token("<img src=x onerror=\"window.__pwned=1\"> and ");
        request.token("<script>window.__pwned=2</script> and [link](javascript:window.__pwned=3)");
        // Code is highlighted, and what it holds is still text.
        request.token("\n\n```js\nconst x = \"<script>window.__pwned=5</script>\"; // 42\n```\n");
        request.send(Step::Finish);
        browser
            .until("the answer", &format!("{LAST_ANSWER}.includes('<script>')"))
            .await;
        let answer = browser.js(&format!("return {LAST_ANSWER}")).await;
        assert!(
            answer.as_str().unwrap().contains("<img src=x onerror="),
            "{answer}"
        );
        assert_eq!(
            browser
                .js("return document.querySelectorAll('.message img, .message script').length")
                .await,
            serde_json::json!(0)
        );
        let code = browser
            .js(
                "const code = document.querySelector('.message.assistant .code code'); \
                 return [code.querySelector('.hl-k').textContent, code.querySelector('.hl-s').textContent, \
                         code.querySelector('.hl-c').textContent]",
            )
            .await;
        assert_eq!(
            code,
            serde_json::json!(["const", "\"<script>window.__pwned=5</script>\"", "// 42"])
        );
        browser.screenshot("code-highlighted").await;
        let dark = dark_desktop(&scenario, "code-dark", &format!("{}/c/{id}", app.url()), &email).await;
        dark.find(".message.assistant .code .hl-k").await;
        dark.screenshot("code-highlighted-dark").await;
        // Clicking the link runs nothing either.
        browser.click(".message.assistant a").await;
        assert_eq!(
            browser.js("return typeof window.__pwned").await,
            serde_json::json!("undefined")
        );
        // And a script injected past the sanitiser would not run: the policy forbids inline
        // scripts (this one is reported as a violation).
        let injected = browser
            .js(
                "const s = document.createElement('script'); s.textContent = 'window.__pwned = 4'; \
                 document.body.appendChild(s); return typeof window.__pwned",
            )
            .await;
        assert_eq!(injected, serde_json::json!("undefined"));
    })
    .await;
}

#[tokio::test]
async fn two_tabs_on_one_conversation_both_show_the_streaming_answer() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let email = unique_email();
        let first = scenario.browser("tab-1", DESKTOP.0, DESKTOP.1).await;
        sign_up(&first, &app.url(), &email).await;
        let id = new_conversation(&first).await;
        online(&first).await;
        // The second tab prefers the dark scheme (and provides its screenshot).
        let second = dark_desktop(&scenario, "tab-2", &format!("{}/c/{id}", app.url()), &email).await;
        online(&second).await;
        send(&first, "Both of you listen").await;
        let request = upstream.next_request().await;
        request.token("hello ");
        streaming_contains(&first, "hello").await;
        streaming_contains(&second, "hello").await;
        request.token("both");
        request.send(Step::Finish);
        answer_is(&first, "hello both").await;
        answer_is(&second, "hello both").await;
        let background = second.js("return getComputedStyle(document.body).backgroundColor").await;
        assert_eq!(background.as_str().unwrap(), "rgb(21, 23, 27)", "dark scheme followed");
        second.screenshot("chat-desktop-dark").await;
        // The second tab learns of the message it did not send.
        second
            .until("the other tab's message", "[...document.querySelectorAll('.message.user')].some(m => m.innerText.includes('Both of you listen'))")
            .await;
    })
    .await;
}

#[tokio::test]
async fn conversations_can_be_renamed_and_deleted() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Tokens { tokens: vec!["ok".into()], pace: Duration::from_millis(10) }).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let browser = scenario.browser("manage", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &app.url(), &unique_email()).await;
        new_conversation(&browser).await;
        browser.click(".conversation.active button[aria-label=Rename]").await;
        let input = browser.find(".conversation input.rename").await;
        // Select all (Ctrl+A) and type over it, as a person would.
        input.send_keys("\u{e009}a\u{e000}Holiday plans").await.unwrap();
        input.send_keys(ENTER).await.unwrap();
        browser
            .until("the new title in the sidebar", "document.querySelector('.conversation.active a') && document.querySelector('.conversation.active a').innerText === 'Holiday plans'")
            .await;
        browser.until("the new title in the header", "document.querySelector('.chat-head .title').innerText === 'Holiday plans'").await;
        browser.click(".conversation.active button[aria-label=Delete]").await;
        browser.client.accept_alert().await.unwrap();
        browser.until("the conversation to go", "!document.querySelector('.conversation')").await;
        browser.until("the home screen", "location.pathname === '/' && document.querySelector('.welcome')").await;
        browser.client.refresh().await.unwrap();
        browser.find(".welcome").await;
        assert_eq!(browser.js("return document.querySelectorAll('.conversation').length").await, serde_json::json!(0));
    })
    .await;
}

#[tokio::test]
async fn a_phone_sized_screen_can_chat() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Tokens { tokens: vec!["Small ".into(), "screens ".into(), "work.".into()], pace: Duration::from_millis(30) }).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let browser = scenario.browser("phone", PHONE.0, PHONE.1).await;
        sign_up(&browser, &app.url(), &unique_email()).await;
        // The sidebar is tucked away; the menu button opens it.
        browser.click(".welcome .menu-toggle").await;
        // Open, and done sliding in (it animates), before anything in it is clicked.
        browser
            .until(
                "the sidebar to open",
                "document.querySelector('.shell.sidebar-open') && document.querySelector('nav.sidebar').getBoundingClientRect().left >= 0",
            )
            .await;
        new_conversation(&browser).await;
        browser.until("the sidebar to close", "!document.querySelector('.shell.sidebar-open')").await;
        online(&browser).await;
        send(&browser, "Does this fit?").await;
        answer_is(&browser, "Small screens work.").await;
        // The composer and the answer are inside the viewport, with no sideways scrolling.
        let fits = browser
            .js("const c = document.querySelector('.composer').getBoundingClientRect(); return c.bottom <= window.innerHeight + 1 && c.right <= window.innerWidth + 1 && document.documentElement.scrollWidth <= window.innerWidth;")
            .await;
        assert_eq!(fits, serde_json::json!(true));
        browser.screenshot("chat-phone-light").await;
    })
    .await;
}

#[tokio::test]
async fn without_websockets_messages_go_over_rest_and_answers_over_sse() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let proxy = Proxy::without_websockets(app.addr).await;
        // On a phone in the dark scheme, for good measure (and its screenshot).
        let browser = scenario.browser_in("fallback", PHONE.0, PHONE.1, true).await;
        sign_up(&browser, &proxy.url(), &unique_email()).await;
        // On a phone the sidebar is tucked away: start from the welcome screen.
        browser.click(".welcome button.primary").await;
        browser.find("textarea[aria-label=Message]").await;
        browser
            .until("the fallback banner", "(document.querySelector('.banner') || {}).innerText && document.querySelector('.banner').innerText.includes('HTTP')")
            .await;
        send(&browser, "Can you hear me over HTTP?").await;
        let request = upstream.next_request().await;
        request.token("Loud ");
        streaming_contains(&browser, "Loud").await;
        request.token("and clear.");
        request.send(Step::Finish);
        answer_is(&browser, "Loud and clear.").await;
        browser.screenshot("chat-phone-dark").await;
    })
    .await;
}

#[tokio::test]
async fn a_message_too_large_for_a_socket_frame_goes_over_rest_and_streams_as_usual() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        // 6 000 quotes are 6 KB of content (the limit is 32 KiB) but 12 KB as a frame.
        let app = App::start(&upstream.base_url, &[("WADI_MAX_FRAME_BYTES", "8192")]).await;
        let browser = scenario.browser("big-frame", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &app.url(), &unique_email()).await;
        new_conversation(&browser).await;
        online(&browser).await;
        let quotes = "\"".repeat(6_000);
        browser
            .js(&format!(
                "const t = document.querySelector('textarea[aria-label=Message]'); \
                 t.value = {quotes:?}; t.dispatchEvent(new Event('input', {{bubbles: true}})); \
                 return true"
            ))
            .await;
        browser
            .find("textarea[aria-label=Message]")
            .await
            .send_keys(ENTER)
            .await
            .unwrap();
        // The socket would have closed (1009) on that frame: the message went over REST, and
        // the answer streams on the socket, which stayed.
        let request = upstream.next_request().await;
        let (_, sent) = request.messages().last().unwrap().clone();
        assert_eq!(sent, quotes);
        request.token("Received ");
        streaming_contains(&browser, "Received").await;
        request.token("in full.");
        request.send(Step::Finish);
        answer_is(&browser, "Received in full.").await;
        online(&browser).await;
    })
    .await;
}

#[tokio::test]
async fn a_twenty_thousand_token_answer_streams_without_falling_behind() {
    Scenario::run(|scenario| async move {
        let tokens: Vec<String> = (0..20_000).map(|i| format!("w{i} ")).collect();
        let expected_len: usize = tokens.iter().map(String::len).sum::<usize>() - 1;
        let upstream = FakeUpstream::start(Script::Tokens {
            tokens,
            pace: Duration::ZERO,
        })
        .await;
        let app = App::start(&upstream.base_url, &[]).await;
        let browser = scenario.browser("long", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &app.url(), &unique_email()).await;
        new_conversation(&browser).await;
        online(&browser).await;
        send(&browser, "Write a lot").await;
        let started = std::time::Instant::now();
        // The whole answer lands, in order, and the page keeps up with the stream.
        browser
            .until(
                "the long answer",
                &format!("{LAST_ANSWER}.trim().length === {expected_len}"),
            )
            .await;
        eprintln!("20 000 tokens shown in {:?}", started.elapsed());
        let tail = browser
            .js(&format!("return {LAST_ANSWER}.trim().slice(-13)"))
            .await;
        assert_eq!(tail.as_str().unwrap(), "w19998 w19999");
        let head = browser
            .js(&format!("return {LAST_ANSWER}.slice(0, 9)"))
            .await;
        assert_eq!(head.as_str().unwrap(), "w0 w1 w2 ");
    })
    .await;
}

/// Records, in the page, every animation frame's interval and every DOM node a streaming
/// answer's kept blocks lose (a kept block must never be re-rendered).
const FRAME_RECORDER: &str = r#"
window.__frames = []; window.__rewrites = 0; window.__recording = true;
let last = performance.now();
window.__kept = 0;
window.__work = [];
const tick = (now) => {
  window.__frames.push(now - last); last = now;
  // From this frame's callbacks to after its style, layout and paint: the frame's work.
  const began = performance.now();
  setTimeout(() => window.__work.push(performance.now() - began), 0);
  const kept = document.querySelectorAll('.streaming .md-block:not(.tail)').length;
  window.__kept = Math.max(window.__kept, kept);
  if (window.__recording) requestAnimationFrame(tick);
};
requestAnimationFrame(tick);
new MutationObserver((records) => {
  for (const record of records) {
    const parent = record.target;
    const kept = parent.classList && parent.classList.contains('md-block') && !parent.classList.contains('tail');
    if (kept && record.removedNodes.length) window.__rewrites += 1;
  }
}).observe(document.body, { childList: true, subtree: true });
"#;

const FINAL_PARAGRAPHS: &str = ".message.assistant:not(.streaming) .content p";

/// The recorded frames: count, interval p50, p99 and max (ms), frames longer than two, kept
/// blocks rewritten, the most blocks kept at once, and each frame's work (ms from its
/// animation-frame callbacks to after its rendering) p50, p99 and max.
const FRAME_STATS: &str = r#"
window.__recording = false;
const f = window.__frames.slice(1).sort((a, b) => a - b);
const at = (q) => f[Math.min(f.length - 1, Math.floor(q * f.length))];
const w = window.__work.slice().sort((a, b) => a - b);
const work = (q) => w[Math.min(w.length - 1, Math.floor(q * w.length))];
return { frames: f.length, p50: at(0.5), p99: at(0.99), max: f[f.length - 1],
         slow: f.filter((ms) => ms > 34).length, rewrites: window.__rewrites, kept: window.__kept,
         work_p50: work(0.5), work_p99: work(0.99), work_max: w[w.length - 1] };
"#;

/// A 20 000-token Markdown answer (a paragraph every 40 tokens, a list every 1 000): streamed
/// once with the whole answer re-rendered per frame (`?render=full`, the old way) and once with
/// only its last block re-rendered. Prints the frame intervals of both for
/// `docs/performance.md`; asserts that kept blocks are never re-rendered.
#[tokio::test]
async fn a_long_answer_re_renders_only_its_unfinished_last_block() {
    Scenario::run(|scenario| async move {
        let mut tokens = Vec::new();
        for i in 0..20_000 {
            tokens.push(match i {
                i if i % 1000 == 999 => format!("w{i}\n\n- item {i}\n- item b\n\n"),
                i if i % 40 == 39 => format!("w{i}\n\n"),
                i => format!("w{i} "),
            });
        }
        let upstream = FakeUpstream::start(Script::Tokens {
            tokens,
            // As fast as it comes by default; `WADI_BROWSER_RENDER_PACE_MS=1` streams for about
            // 50 s, the measurement in docs/performance.md.
            pace: Duration::from_millis(
                std::env::var("WADI_BROWSER_RENDER_PACE_MS")
                    .ok()
                    .and_then(|ms| ms.parse().ok())
                    .unwrap_or(0),
            ),
        })
        .await;
        let app = App::start(&upstream.base_url, &[]).await;
        let last: Vec<String> = (19_960..20_000).map(|i| format!("w{i}")).collect();
        let last = last.join(" ");
        let mut figures = Vec::new();
        for mode in ["full", "incremental"] {
            let browser = scenario
                .browser(&format!("render-{mode}"), DESKTOP.0, DESKTOP.1)
                .await;
            let query = if mode == "full" { "?render=full" } else { "" };
            sign_up(&browser, &format!("{}{query}", app.url()), &unique_email()).await;
            new_conversation(&browser).await;
            online(&browser).await;
            browser.js(FRAME_RECORDER).await;
            let started = std::time::Instant::now();
            send(&browser, "Write a lot").await;
            browser
                .until_within(
                    "the long answer",
                    &format!(
                        "(() => {{ const p = document.querySelectorAll('{FINAL_PARAGRAPHS}'); \
                         return p.length && p[p.length - 1].innerText.trim() === {last:?}; }})()"
                    ),
                    Duration::from_secs(120),
                )
                .await;
            let shown_in = started.elapsed();
            let stats = browser
                .js(
                    FRAME_STATS,
                )
                .await;
            let paragraphs = browser
                .js(&format!("return document.querySelectorAll('{FINAL_PARAGRAPHS}').length"))
                .await;
            // A paragraph every 40 tokens (the lists' items are tight: no <p>).
            assert_eq!(paragraphs.as_u64(), Some(500), "{mode}");
            eprintln!(
                "render {mode}: 20 000 tokens shown in {shown_in:?}; frames {} interval p50 {:.1} ms \
                 p99 {:.1} ms max {:.1} ms, {} longer than two frames; work per frame p50 {:.1} ms \
                 p99 {:.1} ms max {:.1} ms; blocks kept {}, kept blocks rewritten {}",
                stats["frames"],
                stats["p50"].as_f64().unwrap_or(0.0),
                stats["p99"].as_f64().unwrap_or(0.0),
                stats["max"].as_f64().unwrap_or(0.0),
                stats["slow"],
                stats["work_p50"].as_f64().unwrap_or(0.0),
                stats["work_p99"].as_f64().unwrap_or(0.0),
                stats["work_max"].as_f64().unwrap_or(0.0),
                stats["kept"],
                stats["rewrites"]
            );
            figures.push(stats);
        }
        // Blocks were kept while streaming, and never re-rendered (the full mode keeps none).
        assert_eq!(figures[0]["kept"].as_u64(), Some(0));
        assert!(figures[1]["kept"].as_u64() >= Some(1), "{:?}", figures[1]);
        assert_eq!(figures[1]["rewrites"].as_u64(), Some(0));
    })
    .await;
}

/// Writes a path of `count` messages (user and assistant in turn, `m0`, `m1`, …) into a
/// conversation, straight into the app's SQLite file, in one transaction.
async fn seed_thread(app: &App, conversation: &str, count: usize) {
    use sqlx::{Connection, Executor};
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(app.dir.path().join("wadi-data").join("wadi.db"))
        .busy_timeout(Duration::from_secs(10));
    let mut connection = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    let conversation: uuid::Uuid = conversation.parse().unwrap();
    let mut transaction = connection.begin().await.unwrap();
    let mut parent: Option<uuid::Uuid> = None;
    for i in 0..count {
        let id = uuid::Uuid::now_v7();
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        transaction
            .execute(
                sqlx::query(
                    "INSERT INTO messages (id, conversation_id, role, content, created_at, parent_id) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(id)
                .bind(conversation)
                .bind(role)
                .bind(format!("m{i}"))
                .bind(i64::try_from(i).unwrap())
                .bind(parent),
            )
            .await
            .unwrap();
        parent = Some(id);
    }
    transaction.commit().await.unwrap();
    connection.close().await.unwrap();
}

/// How many messages the page holds, and the first one's text.
const THREAD_SHOWN: &str = r#"
const all = document.querySelectorAll('.messages .message .content');
return { count: all.length, first: all.length ? all[0].textContent.trim() : '' };
"#;

/// A 2 000-message thread opens with its newest page, and scrolling up loads the rest a page at
/// a time while what the user reads stays where it is. Prints how long it took to open and the
/// frame intervals while scrolling through it, for `docs/performance.md`.
#[tokio::test]
async fn a_two_thousand_message_thread_opens_fast_and_loads_as_it_scrolls_up() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Tokens {
            tokens: vec!["ok".into()],
            pace: Duration::ZERO,
        })
        .await;
        let app = App::start(&upstream.base_url, &[]).await;
        let browser = scenario.browser("long-thread", DESKTOP.0, DESKTOP.1).await;
        let email = unique_email();
        sign_up(&browser, &app.url(), &email).await;
        let conversation = new_conversation(&browser).await;
        seed_thread(&app, &conversation, 2000).await;

        let started = std::time::Instant::now();
        browser
            .goto(&format!("{}/c/{conversation}", app.url()))
            .await;
        browser
            .until(
                "the newest message",
                "Array.from(document.querySelectorAll('.messages .message .content')).some(e => e.textContent.trim() === 'm1999')",
            )
            .await;
        let opened_in = started.elapsed();
        let shown = browser.js(THREAD_SHOWN).await;
        // Only the newest page is in the page.
        assert_eq!(shown["count"].as_u64(), Some(100), "{shown}");
        assert_eq!(shown["first"].as_str(), Some("m1900"));
        browser.find(".messages .older").await;
        browser.screenshot("long-thread-newest").await;

        browser.js(FRAME_RECORDER).await;
        let scrolling = std::time::Instant::now();
        let mut pages = 1;
        loop {
            // To the top: the page before loads, and the message that was first stays on screen
            // where it was.
            let before = browser
                .js(
                    "const list = document.querySelector('.messages'); list.scrollTop = 0; \
                     const first = document.querySelector('.messages .message'); \
                     return { key: first.querySelector('.content').textContent.trim(), \
                              top: first.getBoundingClientRect().top };",
                )
                .await;
            let key = before["key"].as_str().unwrap().to_owned();
            if key == "m0" {
                break;
            }
            browser
                .until(
                    "the page before to load",
                    &format!(
                        "Array.from(document.querySelectorAll('.messages .message .content')) \
                         .findIndex(e => e.textContent.trim() === {key:?}) > 0"
                    ),
                )
                .await;
            pages += 1;
            // Within a few frames (the page's messages near the view render and take their
            // real heights), the message that was first is back where it was on screen.
            let top = before["top"].as_f64().unwrap();
            browser
                .until_within(
                    &format!("{key} to stay where it was when page {pages} went in above it"),
                    &format!(
                        "(() => {{ const kept = Array.from(document.querySelectorAll('.messages .message .content')) \
                         .find(e => e.textContent.trim() === {key:?}); \
                         return Math.abs(kept.closest('.message').getBoundingClientRect().top - {top}) <= 2; }})()"
                    ),
                    Duration::from_secs(2),
                )
                .await;
        }
        let scrolled_in = scrolling.elapsed();
        let shown = browser.js(THREAD_SHOWN).await;
        assert_eq!(shown["count"].as_u64(), Some(2000), "{shown}");
        assert_eq!(pages, 20);
        assert!(browser.js("return document.querySelector('.messages .older') === null").await.as_bool().unwrap());
        let frames = browser.js(FRAME_STATS).await;
        eprintln!(
            "2 000 messages: newest page shown in {opened_in:?}; all 20 pages scrolled in in \
             {scrolled_in:?}; frames {} interval p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
            frames["frames"],
            frames["p50"].as_f64().unwrap_or(0.0),
            frames["p99"].as_f64().unwrap_or(0.0),
            frames["max"].as_f64().unwrap_or(0.0),
        );
        browser.screenshot("long-thread-oldest").await;
        let dark = dark_desktop(&scenario, "long-thread-dark", &format!("{}/c/{conversation}", app.url()), &email).await;
        dark.find(".messages .older").await;
        dark.screenshot("long-thread-newest-dark").await;
    })
    .await;
}

/// The text of every message shown, in order.
const SHOWN: &str = "Array.from(document.querySelectorAll('.message:not(.streaming) .content')).map(e => e.innerText.trim()).join(' | ')";

async fn shown_is(browser: &Browser, expected: &str) {
    browser
        .until(
            &format!("the conversation to read {expected:?}"),
            &format!("{SHOWN} === {expected:?}"),
        )
        .await;
}

/// Answers the model's next request with `text`; returns what the model was sent.
async fn model_answers(upstream: &FakeUpstream, text: &str) -> Vec<String> {
    let request = upstream.next_request().await;
    request.token(text);
    request.send(Step::Finish);
    request
        .messages()
        .into_iter()
        .map(|(_, content)| content)
        .collect()
}

#[tokio::test]
async fn answers_are_regenerated_and_messages_edited_with_every_version_kept() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let email = unique_email();
        let browser = scenario.browser("branches", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &app.url(), &email).await;
        let id = new_conversation(&browser).await;
        online(&browser).await;
        send(&browser, "Name a colour").await;
        assert_eq!(model_answers(&upstream, "Blue").await, ["Name a colour"]);
        shown_is(&browser, "Name a colour | Blue").await;

        // Regenerate: the model is asked again with the same history; both answers are kept.
        browser.click(".message.assistant button.regenerate").await;
        assert_eq!(model_answers(&upstream, "Green").await, ["Name a colour"]);
        shown_is(&browser, "Name a colour | Green").await;
        browser
            .until("the versions", "document.querySelector('.message.assistant .versions .count')?.innerText === '2/2'")
            .await;
        browser.screenshot("regenerated-light").await;
        browser.click(".message.assistant button.prev").await;
        shown_is(&browser, "Name a colour | Blue").await;
        browser
            .until("1/2", "document.querySelector('.message.assistant .versions .count')?.innerText === '1/2'")
            .await;
        browser.click(".message.assistant button.next").await;
        shown_is(&browser, "Name a colour | Green").await;

        // A follow-up on the first answer's branch sees that answer.
        browser.click(".message.assistant button.prev").await;
        shown_is(&browser, "Name a colour | Blue").await;
        send(&browser, "Why?").await;
        assert_eq!(
            model_answers(&upstream, "It is calm").await,
            ["Name a colour", "Blue", "Why?"]
        );
        shown_is(&browser, "Name a colour | Blue | Why? | It is calm").await;

        // Edit the first message, mid-thread: a new version, answered from scratch.
        browser.click(".message.user button.edit-message").await;
        let editor = browser.find("textarea[aria-label='Edit message']").await;
        editor.clear().await.unwrap();
        editor.send_keys("Name a fruit").await.unwrap();
        editor.send_keys(ENTER).await.unwrap();
        assert_eq!(model_answers(&upstream, "Apple").await, ["Name a fruit"]);
        shown_is(&browser, "Name a fruit | Apple").await;
        browser
            .until("the edited versions", "document.querySelector('.message.user .versions .count')?.innerText === '2/2'")
            .await;
        browser.screenshot("edited-light").await;
        // The original is one click away, with everything that followed it.
        browser.click(".message.user button.prev").await;
        shown_is(&browser, "Name a colour | Blue | Why? | It is calm").await;

        // The tree survives a reload; the newest branch shows first. Dark scheme too.
        let dark = dark_desktop(&scenario, "branches-dark", &format!("{}/c/{id}", app.url()), &email).await;
        shown_is(&dark, "Name a fruit | Apple").await;
        dark.click(".message.user button.prev").await;
        shown_is(&dark, "Name a colour | Blue | Why? | It is calm").await;
        dark.screenshot("versions-dark").await;
    })
    .await;
}

const ESCAPE: &str = "\u{e00c}";
const ARROW_UP: &str = "\u{e013}";
/// Ctrl+Shift+O, then release the modifiers.
const NEW_CHAT: &str = "\u{e009}\u{e008}o\u{e000}";

#[tokio::test]
async fn keyboard_shortcuts_stop_edit_and_start_a_conversation() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let browser = scenario.browser("keys", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &app.url(), &unique_email()).await;
        let first = new_conversation(&browser).await;
        online(&browser).await;
        send(&browser, "Tell me a story").await;
        let request = upstream.next_request().await;
        request.token("Once upon");
        streaming_contains(&browser, "Once upon").await;
        // Esc stops the answer: the model request itself is cancelled.
        let composer = browser.find("textarea[aria-label=Message]").await;
        composer.send_keys(ESCAPE).await.unwrap();
        request.cancelled().await;
        shown_is(&browser, "Tell me a story | Once upon").await;
        browser
            .until("the stopped note", "document.querySelector('.message.assistant .note')?.innerText === 'Stopped'")
            .await;

        // ↑ in the empty composer edits the last message sent; Esc closes the editor.
        composer.send_keys(ARROW_UP).await.unwrap();
        browser
            .until(
                "the editor, focused, holding the message",
                "document.activeElement?.getAttribute('aria-label') === 'Edit message' && document.activeElement.value === 'Tell me a story'",
            )
            .await;
        browser.screenshot("edit-light").await;
        browser.find("textarea[aria-label='Edit message']").await.send_keys(ESCAPE).await.unwrap();
        browser
            .until("the editor to close", "!document.querySelector('textarea[aria-label=\"Edit message\"]')")
            .await;
        shown_is(&browser, "Tell me a story | Once upon").await;

        // Ctrl+Shift+O starts a new conversation.
        browser.find("textarea[aria-label=Message]").await.send_keys(NEW_CHAT).await.unwrap();
        let second = browser
            .until(
                "another conversation",
                &format!("location.pathname.startsWith('/c/') && location.pathname !== '/c/{first}' && location.pathname"),
            )
            .await;
        assert_ne!(second.as_str().unwrap(), format!("/c/{first}"));
        browser.find("textarea[aria-label=Message]").await;
    })
    .await;
}

#[tokio::test]
async fn messages_typed_during_an_answer_are_queued_and_conversations_export() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let email = unique_email();
        let browser = scenario.browser("queue", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &app.url(), &email).await;
        let id = new_conversation(&browser).await;
        online(&browser).await;
        send(&browser, "One").await;
        let first = upstream.next_request().await;
        first.token("A");
        streaming_contains(&browser, "A").await;
        // Typed while the answer is written: queued, not refused.
        send(&browser, "Two").await;
        send(&browser, "Three").await;
        browser
            .until(
                "two queued messages",
                "document.querySelectorAll('.note.queued').length === 2",
            )
            .await;
        browser.screenshot("queued-light").await;
        // Three is cancelled before its turn.
        browser
            .js("document.querySelectorAll('.note.queued button.cancel')[1].click(); return true")
            .await;
        browser
            .until(
                "one queued message",
                "document.querySelectorAll('.note.queued').length === 1",
            )
            .await;
        first.token("1");
        first.send(Step::Finish);
        // The answer ends: Two goes out, after it.
        assert_eq!(model_answers(&upstream, "A2").await, ["One", "A1", "Two"]);
        shown_is(&browser, "One | A1 | Two | A2").await;
        send(&browser, "Four").await;
        assert_eq!(
            model_answers(&upstream, "A4").await,
            ["One", "A1", "Two", "A2", "Four"],
            "the cancelled message was never sent"
        );
        shown_is(&browser, "One | A1 | Two | A2 | Four | A4").await;

        // Export: the downloads' names and contents, caught as the app makes them.
        let dark = dark_desktop(
            &scenario,
            "export-dark",
            &format!("{}/c/{id}", app.url()),
            &email,
        )
        .await;
        shown_is(&dark, "One | A1 | Two | A2 | Four | A4").await;
        dark.js("window.__files = []; const made = URL.createObjectURL; \
             URL.createObjectURL = (blob) => { window.__files.push({blob}); return made(blob); }; \
             HTMLAnchorElement.prototype.click = function () { \
               window.__files[window.__files.length - 1].name = this.download; }; return true")
            .await;
        dark.click(".export summary").await;
        dark.screenshot("export-dark").await;
        dark.click(".export .menu button:nth-child(1)").await;
        dark.until(
            "the Markdown file",
            "window.__files.length === 1 && window.__files[0].name",
        )
        .await;
        dark.click(".export .menu button:nth-child(2)").await;
        dark.until(
            "the JSON file",
            "window.__files.length === 2 && window.__files[1].name",
        )
        .await;
        let names = dark.js("return window.__files.map(f => f.name)").await;
        assert_eq!(names, serde_json::json!(["one.md", "one.json"]));
        let markdown = dark.js("return window.__files[0].blob.text()").await;
        let markdown = markdown.as_str().unwrap();
        assert!(markdown.starts_with("# One\n"), "{markdown}");
        assert!(
            markdown.contains("Four") && markdown.contains("A4"),
            "{markdown}"
        );
        let json = dark.js("return window.__files[1].blob.text()").await;
        let json: serde_json::Value = serde_json::from_str(json.as_str().unwrap()).unwrap();
        assert_eq!(json["messages"].as_array().unwrap().len(), 6);
    })
    .await;
}

#[tokio::test]
async fn a_conversation_switches_model_and_gets_its_own_system_prompt() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let app = App::start(&upstream.base_url, &[("WADI_MODELS", "deep-thinker,quick-one")]).await;
        let email = unique_email();
        let browser = scenario.browser("models", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &app.url(), &email).await;
        let id = new_conversation(&browser).await;
        online(&browser).await;
        let select = "select[aria-label=Model]";
        browser
            .until("the model list", &format!("document.querySelectorAll('{select} option').length === 3"))
            .await;
        assert_eq!(browser.js(&format!("return document.querySelector('{select}').value")).await, "gpt-4o-mini");
        // Pick another model: the next answer comes from it, and says so on hover.
        browser
            .js(&format!(
                "const s = document.querySelector('{select}'); s.value = 'quick-one'; \
                 s.dispatchEvent(new Event('change', {{bubbles: true}})); return true"
            ))
            .await;
        browser.click(".prompt-toggle").await;
        browser.type_into("textarea[aria-label='System prompt']", "Answer in French.").await;
        browser.screenshot("system-prompt-light").await;
        browser.click(".system-prompt button[type=submit]").await;
        browser
            .until("the prompt to be saved", "document.querySelector('.prompt-toggle.set')")
            .await;
        send(&browser, "Hello").await;
        let request = upstream.next_request().await;
        assert_eq!(request.body["model"], "quick-one");
        assert_eq!(request.messages()[0], ("system".to_owned(), "Answer in French.".to_owned()));
        request.token("Bonjour");
        request.send(Step::Finish);
        shown_is(&browser, "Hello | Bonjour").await;
        browser
            .until(
                "the model on the answer",
                "document.querySelector('.message.assistant')?.title?.startsWith('quick-one')",
            )
            .await;
        // Kept across a reload (and shown in the dark scheme).
        let dark = dark_desktop(&scenario, "models-dark", &format!("{}/c/{id}", app.url()), &email).await;
        dark.until("the saved model", &format!("document.querySelector('{select}')?.value === 'quick-one'")).await;
        dark.click(".prompt-toggle").await;
        dark.until(
            "the saved prompt",
            "document.querySelector(\"textarea[aria-label='System prompt']\")?.value === 'Answer in French.'",
        )
        .await;
        dark.screenshot("system-prompt-dark").await;
    })
    .await;
}

/// Ctrl+K, then release the modifier.
const SEARCH: &str = "\u{e009}k\u{e000}";

#[tokio::test]
async fn search_finds_a_message_on_an_old_branch_and_opens_it_there() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let email = unique_email();
        let browser = scenario.browser("search", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &app.url(), &email).await;
        let birds = new_conversation(&browser).await;
        online(&browser).await;
        send(&browser, "Which birds are pink?").await;
        model_answers(&upstream, "Flamingos are pink.").await;
        shown_is(&browser, "Which birds are pink? | Flamingos are pink.").await;
        // A second answer replaces it on screen; the first stays on its branch.
        browser.click(".message.assistant button.regenerate").await;
        model_answers(&upstream, "Roseate spoonbills.").await;
        shown_is(&browser, "Which birds are pink? | Roseate spoonbills.").await;
        // Another conversation, open when searching.
        new_conversation(&browser).await;
        online(&browser).await;
        send(&browser, "Something else entirely").await;
        model_answers(&upstream, "Sure.").await;
        shown_is(&browser, "Something else entirely | Sure.").await;

        browser.find("textarea[aria-label=Message]").await.send_keys(SEARCH).await.unwrap();
        browser.find("input[aria-label=Search]").await.send_keys("flaming").await.unwrap();
        browser
            .until(
                "the marked hit",
                "document.querySelector('.search .message-hit mark')?.innerText.toLowerCase() === 'flamingos'",
            )
            .await;
        browser.screenshot("search-light").await;
        browser.click(".search .message-hit").await;
        browser
            .until("its conversation", &format!("location.pathname === '/c/{birds}'"))
            .await;
        shown_is(&browser, "Which birds are pink? | Flamingos are pink.").await;
        browser
            .until(
                "the found message marked",
                "document.querySelector('.message.found')?.innerText.includes('Flamingos')",
            )
            .await;
        assert_eq!(browser.js("return !!document.querySelector('.search')").await, false);

        // Dark scheme: the dialog from the sidebar button; Esc closes it.
        let dark = dark_desktop(&scenario, "search-dark", &app.url(), &email).await;
        dark.click(".open-search").await;
        dark.find("input[aria-label=Search]").await.send_keys("pink").await.unwrap();
        dark.until("results", "document.querySelectorAll('.search .hit').length >= 2").await;
        dark.screenshot("search-dark").await;
        dark.find("input[aria-label=Search]").await.send_keys(ESCAPE).await.unwrap();
        dark.until("the dialog to close", "!document.querySelector('.search')").await;
    })
    .await;
}

#[tokio::test]
async fn another_tab_sees_new_conversations_and_finished_answers_live() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let email = unique_email();
        let first = scenario.browser("live-1", DESKTOP.0, DESKTOP.1).await;
        sign_up(&first, &app.url(), &email).await;
        let elsewhere = new_conversation(&first).await;
        // The second tab (another device, say) shows that conversation.
        let second = dark_desktop(&scenario, "live-2", &format!("{}/c/{elsewhere}", app.url()), &email).await;
        online(&second).await;
        let count = "document.querySelectorAll('.sidebar .conversation').length";
        second.until("one conversation listed", &format!("{count} === 1")).await;

        // A conversation started in the first tab appears in the second, without a reload.
        let started = new_conversation(&first).await;
        second.until("the new conversation listed", &format!("{count} === 2")).await;
        online(&first).await;
        send(&first, "Background question").await;
        model_answers(&upstream, "Background answer").await;
        answer_is(&first, "Background answer").await;
        // Its title follows the first message, and its finished answer gets a dot there.
        second
            .until(
                "the dot on the conversation that was answered",
                &format!(
                    "document.querySelector('.conversation.unread a[href=\"/c/{started}\"]')?.innerText.includes('Background question')"
                ),
            )
            .await;
        second.screenshot("live-sidebar-dark").await;
        // Opening it clears the dot.
        second.click(&format!(".conversation a[href=\"/c/{started}\"]")).await;
        shown_is(&second, "Background question | Background answer").await;
        second
            .until("no dot", "!document.querySelector('.conversation.unread')")
            .await;
        // The first tab, showing it, never got a dot.
        assert_eq!(first.js("return !!document.querySelector('.conversation.unread')").await, false);
    })
    .await;
}

/// Holds, in the page, the first conversation-list answer that carries `First title` until
/// `window.__release()`; `window.__delivered` is set two frames after it was handed over.
const HOLD_FIRST_TITLE_LIST: &str = r#"
const original = window.fetch;
window.__origFetch = original;
window.__held = false;
window.fetch = async function (input, init) {
    const url = typeof input === 'string' ? input : input.url;
    const method = ((init && init.method) || (typeof input === 'string' ? 'GET' : input.method)).toUpperCase();
    const response = await original.call(window, input, init);
    if (method === 'GET' && new URL(url, location.href).pathname === '/api/conversations' && !window.__held) {
        const text = await response.clone().text();
        if (text.includes('First title')) {
            window.__held = true;
            await new Promise(release => { window.__release = release; });
            requestAnimationFrame(() => requestAnimationFrame(() => { window.__delivered = true; }));
        }
    }
    return response;
};
return true;
"#;

/// Renames `conversation` over REST, outside the app (as another device would).
async fn rename_elsewhere(browser: &Browser, conversation: &str, title: &str) {
    browser
        .js(&format!(
            "const s = JSON.parse(localStorage.getItem('wadi.session')); \
             window.__renamed = null; \
             window.__origFetch('/api/conversations/{conversation}', {{method: 'PATCH', \
               headers: {{'Authorization': 'Bearer ' + s.access_token, 'Content-Type': 'application/json'}}, \
               body: JSON.stringify({{title: '{title}'}})}}).then(r => {{ window.__renamed = r.status; }}); \
             return true;"
        ))
        .await;
    browser
        .until("the rename answered", "window.__renamed === 200")
        .await;
}

/// Every change reloads the conversation list; when two reloads' answers arrive out of order,
/// the list keeps the newer one instead of going back to what the older one said.
#[tokio::test]
async fn the_conversation_list_never_goes_back_to_an_older_answer() {
    Scenario::run(|scenario| async move {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let app = App::start(&upstream.base_url, &[]).await;
        let browser = scenario.browser("list-order", DESKTOP.0, DESKTOP.1).await;
        sign_up(&browser, &app.url(), &unique_email()).await;
        let conversation = new_conversation(&browser).await;
        online(&browser).await;
        browser.js(HOLD_FIRST_TITLE_LIST).await;
        let title = format!("document.querySelector('.sidebar .conversation a[href=\"/c/{conversation}\"]')?.innerText");
        // The first rename's list reload is answered, and its answer held in the page.
        rename_elsewhere(&browser, &conversation, "First title").await;
        browser.until("the first list answer held", "window.__held").await;
        // The second rename's reload overtakes it.
        rename_elsewhere(&browser, &conversation, "Second title").await;
        browser.until("the second title listed", &format!("{title} === 'Second title'")).await;
        // Then the older answer arrives: it is dropped.
        browser.js("window.__release(); return true").await;
        browser.until("the older answer handed over", "window.__delivered").await;
        assert_eq!(browser.js(&format!("return {title}")).await, serde_json::json!("Second title"));
    })
    .await;
}
