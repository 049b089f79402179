//! Tells the tests whether a Postgres is configured (`WADI_TEST_POSTGRES_URL`, which `cargo
//! xtask test` sets): without one, the Postgres variants of the store tests and the cluster tests
//! are compiled as ignored, so they show as skipped, never as passed.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(wadi_postgres)");
    println!("cargo::rerun-if-env-changed=WADI_TEST_POSTGRES_URL");
    if std::env::var_os("WADI_TEST_POSTGRES_URL").is_some_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=wadi_postgres");
    }
}
