//! The test kit keeps its promises: netd's host socket programs attach to the instance's own
//! cgroup (not the machine's root one), the instance's commands run in it, and a clean-up that
//! fails makes the test fail.

use std::{net::SocketAddr, panic::AssertUnwindSafe};

use netd::netns;
use tests::{
    harness::{HOST_ADDR, TestEnv},
    traffic::{echo_server, tcp_echo},
};

#[test]
fn host_programs_act_for_the_instances_cgroup_and_not_for_the_rest_of_the_machine() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.97.0.0/24"]);
    let web = env.name("web");
    env.netd_ok(&[
        "container",
        "create",
        &web,
        "--network",
        "n",
        "-p",
        "8080:80",
    ]);
    let server = echo_server(&netns::path_of(&web), 80);
    let published = SocketAddr::from((HOST_ADDR, 8080));

    // This test's own process is outside the instance's cgroup: had netd attached to the
    // machine's root cgroup, its connect would be redirected to the container too.
    let outside_cgroup = tcp_echo(&env.host_ns(), published).unwrap_err();
    let refused = outside_cgroup
        .root_cause()
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind);
    assert_eq!(
        refused,
        Some(std::io::ErrorKind::ConnectionRefused),
        "{outside_cgroup:#}"
    );

    // A command run through the instance is in its cgroup, and reaches the container.
    let cgroup = env.run_in(&env.host_ns(), "cat", &["/proc/self/cgroup"]);
    let expected = format!(
        "0::/{}\n",
        env.cgroup.file_name().unwrap().to_string_lossy()
    );
    assert!(
        String::from_utf8_lossy(&cgroup.stdout).ends_with(&expected),
        "{}",
        String::from_utf8_lossy(&cgroup.stdout)
    );
    let script = format!("printf netd | nc -q 1 -w 2 {HOST_ADDR} 8080");
    let out = env.run_in(&env.host_ns(), "sh", &["-c", &script]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "netd");
    // From the host, a container is reached over the bridge: from the gateway's address.
    let peer = server.join().unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::from([10, 97, 0, 1]));
}

#[test]
fn a_clean_up_that_fails_fails_the_test_naming_what_was_left() {
    let env = TestEnv::new();
    // A process in the instance's cgroup that the instance didn't start, so won't end: the
    // cgroup can't be removed. In the outside namespace: the drop ends what is left in the
    // host's (netd's userland proxies).
    let mut stray = env
        .cmd_in(&env.outside_ns(), "sleep", &["60"])
        .spawn()
        .unwrap();
    // Past nsenter (which must still find the namespace the drop removes): sleep runs.
    let comm = format!("/proc/{}/comm", stray.id());
    while std::fs::read_to_string(&comm).unwrap() != "sleep\n" {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let cgroup = env.cgroup.clone();
    let dropped = std::panic::catch_unwind(AssertUnwindSafe(|| drop(env)));
    stray.kill().unwrap();
    stray.wait().unwrap();
    std::fs::remove_dir(&cgroup).unwrap();
    let message = dropped.expect_err("the drop should have panicked");
    let message = message.downcast_ref::<String>().expect("a panic message");
    assert!(
        message.contains("clean-up of netd instance") && message.contains("remove cgroup"),
        "{message}"
    );
}
