//! `netd daemon`: it sweeps expired flows and removes half-made containers, which nothing else
//! does without a command; and it is not on the packet path: a flow through a published port
//! keeps going while the daemon is killed with SIGKILL and started again, and SIGTERM stops it
//! cleanly.

use std::{
    io::{BufRead as _, BufReader},
    net::UdpSocket,
    process::{Child, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tests::{
    cli::{conntrack_entries, create, eventually, flows, pings, wait_until_serving},
    flow::Flow,
    harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv},
    topology::{LAN_ADDR, NIC1_ADDR, second_nic},
    traffic::retry_interrupted,
};

/// Starts `netd daemon` and waits until it serves its API socket.
fn start_daemon(env: &TestEnv) -> Child {
    let mut daemon = env
        .netd_cmd(&["daemon", "--sweep-interval", "0.5"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_serving(&mut daemon, &env.state_dir.join("netd.sock"));
    daemon
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
    let flow = Flow::start(&env, HOST_ADDR.into(), 15201);
    // Killed once the flow carries data, and the flow carries more before the restart.
    flow.assert_moving(&env, Duration::from_secs(2), "before the kill");
    signal(&first, Signal::SIGKILL);
    let killed = first.wait_with_output().unwrap();
    assert!(!killed.status.success());
    flow.assert_moving(&env, Duration::from_secs(2), "without a daemon");
    let second = start_daemon(&env);
    flow.assert_moving(&env, Duration::from_secs(2), "after the restart");
    flow.stop_and_assert_never_stalled();

    signal(&second, Signal::SIGTERM);
    let stopped = second.wait_with_output().unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("netd daemon: stopped"));
}

/// Starts `netd container create NAME --network n` paused after its veth step and kills it
/// there: a half-made container (state `creating`, a namespace, a veth) whose creator is dead.
fn half_made_container(env: &TestEnv, name: &str) {
    let mut child = env
        .netd_cmd(&["container", "create", name, "--network", "n"])
        .env("NETD_TEST_PAUSE_AFTER", "container-veth")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "paused after container-veth");
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
}

fn container_names(env: &TestEnv) -> Vec<String> {
    env.netd_json(&["container", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_daemon_sweeps_expired_flows_and_removes_half_made_containers() {
    let env = TestEnv::new();
    env.netd_ok(&[
        "--conntrack-timeout",
        "udp=1",
        "network",
        "create",
        "n",
        "--subnet",
        "10.88.0.0/24",
    ]);
    let c = create(&env, "live", &["--network", "n"]);
    env.in_ns(&c.ns, || {
        UdpSocket::bind("0.0.0.0:0")
            .unwrap()
            .send_to(b"x", (OUTSIDE_ADDR, 5400))
            .unwrap()
    });
    let victim = env.name("victim");
    half_made_container(&env, &victim);

    // Without a daemon, nothing goes away by itself: the flow's two entries outlive its
    // timeout, the dead creator's namespace stays.
    std::thread::sleep(Duration::from_millis(2200));
    assert!(flows(&env).is_empty(), "expired: hidden from listings");
    assert_eq!(conntrack_entries(&env), 2, "but still in the table");
    assert!(netd::netns::exists(&victim));
    assert!(container_names(&env).contains(&victim));

    let daemon = start_daemon(&env);
    assert!(
        eventually(Duration::from_secs(5), || conntrack_entries(&env) == 0),
        "the daemon did not sweep the expired flow"
    );
    assert!(
        eventually(Duration::from_secs(5), || !netd::netns::exists(&victim)),
        "the daemon did not remove the half-made container's namespace"
    );
    assert_eq!(container_names(&env), std::slice::from_ref(&c.name));
    // The live container is untouched and still reaches the outside.
    assert!(pings(&env, &c.ns, OUTSIDE_ADDR));

    signal(&daemon, Signal::SIGTERM);
    let stopped = daemon.wait_with_output().unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
}

/// A second NIC that appears while the daemon runs is masqueraded through within a round: a
/// container's datagram to the neighbour there arrives from the NIC's address (before, the
/// eBPF datapath had no address for it and dropped it: never the container's own source).
#[test]
fn the_daemon_masquerades_through_a_nic_that_appears() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.87.0.0/24"]);
    let c = create(&env, "c", &["--network", "n"]);
    let daemon = start_daemon(&env);
    let lan = second_nic(&env);
    let neighbour = env.in_ns(&lan, || UdpSocket::bind((LAN_ADDR, 5500)).unwrap());
    neighbour
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let container = env.in_ns(&c.ns, || UdpSocket::bind("0.0.0.0:0").unwrap());
    let mut buf = [0u8; 16];
    let mut sources = Vec::new();
    let arrived = eventually(Duration::from_secs(5), || {
        container.send_to(b"hello", (LAN_ADDR, 5500)).unwrap();
        match retry_interrupted(|| neighbour.recv_from(&mut buf)) {
            Ok((_, from)) => {
                sources.push(from.ip());
                true
            }
            Err(_) => false,
        }
    });
    assert!(arrived, "nothing arrived through nic1");
    assert_eq!(sources, [NIC1_ADDR]);
    signal(&daemon, Signal::SIGTERM);
    let stopped = daemon.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        log.contains("netd daemon: masquerading through nic1"),
        "{log}"
    );
}

#[test]
fn a_daemon_replaces_only_the_socket_of_a_daemon_that_is_gone() {
    let env = TestEnv::new();
    std::fs::create_dir_all(&env.state_dir).unwrap();
    // Any other file at the socket's path stays as it was.
    let file = env.state_dir.join("precious");
    std::fs::write(&file, "keep").unwrap();
    let err = env.netd_err(&["daemon", "--socket", file.to_str().unwrap()]);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    // A live daemon's socket: a second daemon doesn't take it, the first still serves.
    let first = start_daemon(&env);
    let socket = env.state_dir.join("netd.sock");
    let err = env.netd_err(&["daemon"]);
    assert!(err.contains("a daemon already serves"), "{err}");
    std::os::unix::net::UnixStream::connect(&socket).expect("the first daemon lost its socket");
    // Killed, its socket is stale: the next daemon takes it.
    signal(&first, Signal::SIGKILL);
    first.wait_with_output().unwrap();
    let second = start_daemon(&env);
    signal(&second, Signal::SIGTERM);
    assert!(second.wait_with_output().unwrap().status.success());
}

#[test]
fn a_sweep_interval_no_timer_can_have_is_refused_before_anything_is_served() {
    let env = TestEnv::new();
    for bad in ["0", "-1", "nan", "1e-12", "1e30"] {
        let err = env.netd_err(&["daemon", "--sweep-interval", bad]);
        assert!(err.contains("invalid --sweep-interval"), "{bad}: {err}");
        assert!(!env.state_dir.join("netd.sock").exists(), "{bad}");
    }
}
