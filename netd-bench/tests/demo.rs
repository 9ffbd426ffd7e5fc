//! `cargo xtask demo` end to end: the demo binary drives netd (`NETD_BIN`) through real
//! traffic in a sandbox, checks each claim against the kernel, and leaves nothing behind.

use std::{path::Path, process::Command};

#[test]
fn the_demo_shows_real_traffic_through_netd_and_leaves_nothing() {
    let run = Command::new(env!("CARGO_BIN_EXE_netd-bench"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the demo failed: {stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for expected in [
        // Through the published port, echoed back, from the outside's own address (DNAT).
        "the outside sent \"hello 1\" to 198.18.0.2:8080 and got it echoed back",
        "the outside sent \"hello 3\" to 198.18.0.2:8080 and got it echoed back",
        "saw every connection come from 198.18.0.1",
        // Out to the outside, which saw the host's address (masquerade).
        "sent \"hello from a container\" to 198.18.0.1:7000 and got it echoed back",
        "the outside saw the connection come from 198.18.0.2 (masquerade)",
        // Straight to the container: dropped.
        "connect to 10.88.0.2:80: no answer (dropped on the uplink",
        // The datapath's own record of those flows, and no netfilter rule anywhere.
        "tcp dnat ",
        "tcp snat ",
        "new flows translated by eBPF: ",
        "netfilter rules in the host namespace: 0",
        "demo finished: everything it made is gone",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }

    // The demo's names carry its process id: nothing of that name is left.
    let prefix = format!("netd-demo-{}", run_pid(&stdout));
    let left_namespaces: Vec<String> = std::fs::read_dir("/run/netns")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert_eq!(left_namespaces, Vec::<String>::new());
    let pins = format!("/sys/fs/bpf/netd-{prefix}");
    assert!(!Path::new(&pins).exists(), "{pins} left");
    let cgroup = netd_testkit::cgroup2_root()
        .unwrap()
        .join(format!("netd-{prefix}"));
    assert!(!cgroup.exists(), "{} left", cgroup.display());
}

/// The demo's process id, from the sandbox names it prints (`netd-demo-PID-host`).
fn run_pid(stdout: &str) -> u32 {
    let at = stdout
        .find("netd-demo-")
        .expect("the demo names its sandbox")
        + 10;
    let digits: String = stdout[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}
