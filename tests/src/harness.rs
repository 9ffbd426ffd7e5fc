//! The integration-test harness: every test gets its own netd in a sandbox
//! ([`netd_testkit::Instance`], here named `TestEnv`), which removes everything it made, and
//! every process it started, on success, failure and panic, and fails the test when it can't.

pub use netd_testkit::{HOST_ADDR, Instance as TestEnv, OUTSIDE_ADDR, UPLINK};

/// The named namespaces `env` made that exist, sorted.
pub fn namespaces(env: &TestEnv) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(netd::netns::NETNS_RUN_DIR)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&env.prefix))
        .collect();
    names.sort();
    names
}

/// The interfaces of `env`'s sandbox host namespace, sorted.
pub fn host_links(env: &TestEnv) -> Vec<String> {
    let out = env.run_in(&env.host_ns(), "ip", &["-o", "link"]);
    let mut links: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .collect();
    links.sort();
    links
}

/// `env`'s networks and containers as `ls --json` lists them.
pub fn netd_state(env: &TestEnv) -> String {
    format!(
        "{}{}",
        env.netd_ok(&["network", "ls", "--json"]),
        env.netd_ok(&["container", "ls", "--json"])
    )
}
