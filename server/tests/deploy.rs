//! The deploy files: the systemd unit passes `systemd-analyze verify` (where systemd is
//! installed), the compose file and Dockerfile agree with the server's settings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::PathBuf, process::Command};

fn deploy(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join(file)
}

#[test]
fn the_systemd_unit_verifies_cleanly() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed here: skipped");
        return;
    };
    assert!(version.status.success());
    let unit = std::fs::read_to_string(deploy("wadi.service")).unwrap();
    for hardening in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "StateDirectory=wadi",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(hardening), "the unit lacks {hardening}");
    }
    // `verify` checks that ExecStart's binary exists: point it at the one just built.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("wadi.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/wadi", env!("CARGO_BIN_EXE_wadi")),
    )
    .unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Warnings (unknown keys, bad values) exit 0 too: none is allowed.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("wadi.service"))
        .collect();
    assert!(output.status.success(), "{stderr}");
    assert!(complaints.is_empty(), "{stderr}");
}

#[test]
fn the_unit_and_the_container_start_the_binary_as_it_is_configured() {
    // The unit's ExecStart and the image's health check are real commands of this binary.
    let unit = std::fs::read_to_string(deploy("wadi.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart=/usr/local/bin/wadi "))
        .unwrap();
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(args, ["--config", "/etc/wadi/wadi.toml"]);
    let output = Command::new(env!("CARGO_BIN_EXE_wadi"))
        .args([
            "--config",
            deploy("wadi.toml").to_str().unwrap(),
            "config",
            "print",
        ])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dockerfile = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    assert!(dockerfile.contains(r#"CMD ["/usr/local/bin/wadi", "healthcheck"]"#));
    assert!(
        dockerfile.contains("USER 10001:10001"),
        "the image runs as non-root"
    );
    let help = Command::new(env!("CARGO_BIN_EXE_wadi"))
        .args(["healthcheck", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    // Every variable the compose file sets is one the server reads.
    let compose = std::fs::read_to_string(deploy("compose.yaml")).unwrap();
    let settings = Command::new(env!("CARGO_BIN_EXE_wadi"))
        .args(["config", "table"])
        .output()
        .unwrap();
    let settings = String::from_utf8(settings.stdout).unwrap();
    for line in compose.lines() {
        let line = line.trim();
        let Some((key, _)) = line.split_once(": ") else {
            continue;
        };
        let variable = key.trim();
        if variable.starts_with("WADI_")
            || [
                "DATABASE_URL",
                "REDIS_URL",
                "OPENAI_API_KEY",
                "OPENAI_BASE_URL",
            ]
            .contains(&variable)
        {
            assert!(
                settings.contains(&format!("`{variable}`")),
                "compose.yaml sets {variable}, which no setting reads"
            );
        }
    }
}
