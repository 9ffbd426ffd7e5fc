//! `cargo xtask setup` is idempotent: run twice, the second run installs nothing and says so.

use std::process::Command;

fn setup() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("setup")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "xtask setup failed: {stderr}");
    stderr
}

#[test]
fn setup_run_twice_installs_nothing_the_second_time() {
    setup();
    let second = setup();
    assert!(
        second.contains("setup: nothing installed"),
        "second run: {second}"
    );
    assert!(
        !second.contains("setup: installing"),
        "second run: {second}"
    );
}
