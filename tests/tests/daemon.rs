//! `netd daemon` is not on the packet path: a flow through a published port keeps going while
//! the daemon is killed with SIGKILL and started again, and SIGTERM stops it cleanly.

use std::{
    process::{Child, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tests::harness::TestEnv;

fn start_daemon(env: &TestEnv) -> Child {
    env.netd_cmd(&["daemon", "--sweep-interval", "0.5"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).unwrap();
}

#[test]
fn a_flow_through_a_published_port_survives_kill_9_and_restart_of_the_daemon() {
    let env = TestEnv::new();
    let srv = env.name("srv");
    env.netd_ok(&["network", "create", "n", "--subnet", "10.89.0.0/24"]);
    env.netd_ok(&[
        "container",
        "create",
        &srv,
        "--network",
        "n",
        "-p",
        "15201:5201",
    ]);
    let srv_ns = netd::netns::path_of(&srv);
    env.spawn_in(&srv_ns, "iperf3", &["-s", "-p", "5201"]);
    netd::netns::wait_tcp_listener(&srv_ns, 5201, Duration::from_secs(5)).unwrap();

    let first = start_daemon(&env);
    let client = env
        .cmd_in(
            &env.outside_ns(),
            "iperf3",
            &[
                "-c",
                "198.18.0.2",
                "-p",
                "15201",
                "-t",
                "4",
                "-i",
                "0.5",
                "-J",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    signal(&first, Signal::SIGKILL);
    let killed = first.wait_with_output().unwrap();
    assert!(!killed.status.success());
    let second = start_daemon(&env);

    let out = client.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    assert!(
        report["error"].is_null(),
        "iperf3 failed: {}",
        report["error"]
    );
    let intervals = report["intervals"].as_array().unwrap();
    assert!(intervals.len() >= 7, "{} intervals", intervals.len());
    for (i, interval) in intervals.iter().enumerate() {
        let bytes = interval["sum"]["bytes"].as_u64().unwrap();
        assert!(bytes > 0, "interval {i} carried nothing: the flow stalled");
    }

    signal(&second, Signal::SIGTERM);
    let stopped = second.wait_with_output().unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("netd daemon: stopped"));
}
