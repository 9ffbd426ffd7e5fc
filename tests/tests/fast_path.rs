//! The eBPF fast path's fallbacks: what the redirects can't answer for is left to the host
//! stack, which does what forwarding does (ICMP time exceeded, fragmentation needed,
//! fragmenting), and the stats counters show which path each packet took.

use std::{
    net::{IpAddr, Ipv4Addr, UdpSocket},
    path::Path,
    time::Duration,
};

use tests::{
    cli::{TIMEOUT, create, eventually, output_in, ping_output, stat},
    harness::{HOST_ADDR, HOST_ADDR6, OUTSIDE_ADDR, OUTSIDE_ADDR6, OUTSIDE_LINK, TestEnv, UPLINK},
    traffic::retry_interrupted,
};

/// The network's gateway (the host's address on the bridge).
fn gateway(env: &TestEnv, network: &str) -> String {
    env.netd_json(&["network", "inspect", network])["network"]["gateway"]
        .as_str()
        .unwrap()
        .to_string()
}

/// How much the `reason` counter grows while `f` runs.
fn counted<T>(env: &TestEnv, reason: &str, f: impl FnOnce() -> T) -> (T, u64) {
    let before = stat(env, reason);
    let out = f();
    (out, stat(env, reason) - before)
}

#[test]
fn ttl_1_is_left_to_the_stack_which_answers_time_exceeded() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.61.0.0/24"]);
    let c = create(&env, "c", &["--network", "n"]);
    let far = OUTSIDE_ADDR.to_string();
    // The control: an echo request with room to spare goes the fast path.
    let (reply, fast) = counted(&env, "fast_path_out", || {
        ping_output(&env, &c.ns, &["-c1", "-W2", &far])
    });
    assert!(reply.contains("1 received"), "{reply}");
    assert_eq!(fast, 1, "{reply}");
    // TTL 1 would expire on the host: the stack answers, from the gateway.
    let (reply, fast) = counted(&env, "fast_path_out", || {
        ping_output(&env, &c.ns, &["-c1", "-W2", "-t", "1", &far])
    });
    assert!(
        reply.contains(&format!(
            "From {} icmp_seq=1 Time to live exceeded",
            gateway(&env, "n")
        )),
        "{reply}"
    );
    assert_eq!(fast, 0, "a packet with TTL 1 took the fast path");
}

#[test]
fn an_unresolved_neighbour_is_resolved_on_the_way_and_the_first_packet_arrives() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.62.0.0/24"]);
    let c = create(&env, "c", &["--network", "n"]);
    let host = env.host_ns();
    let neighbour = || {
        output_in(
            &env,
            &host,
            "ip",
            &["neigh", "show", &OUTSIDE_ADDR.to_string()],
        )
    };
    output_in(&env, &host, "ip", &["neigh", "flush", "dev", UPLINK]);
    assert!(
        !neighbour().contains("lladdr"),
        "the outside is still resolved: {}",
        neighbour()
    );
    let (reply, fast) = counted(&env, "fast_path_out", || {
        ping_output(&env, &c.ns, &["-c1", "-W2", &OUTSIDE_ADDR.to_string()])
    });
    assert!(
        reply.contains("1 received"),
        "the first packet was lost: {reply}"
    );
    assert_eq!(fast, 1, "bpf_redirect_neigh resolves the next hop itself");
    assert!(neighbour().contains("lladdr"), "{}", neighbour());
}

/// Whether a burst of 50 pings from `ns` to `far` (0.5 s) gets any answer.
fn burst_answered(env: &TestEnv, ns: &Path, far: IpAddr) -> bool {
    let far = far.to_string();
    let reply = ping_output(env, ns, &["-q", "-c", "50", "-i", "0.01", "-W", "1", &far]);
    !reply.contains(" 0 received")
}

#[test]
fn a_next_hop_that_changed_its_mac_is_found_again_as_forwarding_would() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.64.0.0/24"]);
    let c = create(&env, "c", &["--network", "n"]);
    next_hop_found_again(&env, &c.ns, HOST_ADDR.into(), OUTSIDE_ADDR.into());
}

#[test]
fn an_ipv6_next_hop_that_changed_its_mac_is_found_again_as_forwarding_would() {
    let env = TestEnv::dual_stack();
    env.netd_ok(&[
        "network",
        "create",
        "n",
        "--ipv6",
        "--subnet",
        "10.65.0.0/24",
    ]);
    let c = create(&env, "c", &["--network", "n"]);
    next_hop_found_again(&env, &c.ns, HOST_ADDR6.into(), OUTSIDE_ADDR6.into());
}

/// Changes the MAC of the outside (`far`, the host's next hop) under the pings of the
/// container in `ns`, and checks that the fast path finds the new one within 30 s, as the
/// stack's forwarding does. The host is `host_addr` to the outside.
fn next_hop_found_again(env: &TestEnv, ns: &Path, host_addr: IpAddr, far: IpAddr) {
    let host = env.host_ns();
    let outside = env.outside_ns();
    let family = if far.is_ipv4() { "ipv4" } else { "ipv6" };
    // The outside never asks for the host's MAC (which would teach the host its new one): only
    // the host's own neighbour state machine can notice the change. Its timers short, so that
    // an entry goes stale within seconds and is probed a second after its next use (the
    // reachable time longer than that delay, else each answered probe keeps it in use).
    let link = output_in(env, &host, "ip", &["-br", "link", "show", UPLINK]);
    let uplink_mac = link.split_whitespace().nth(2).unwrap().to_string();
    let host_addr = host_addr.to_string();
    let permanent = [
        "neigh",
        "replace",
        &host_addr,
        "lladdr",
        &uplink_mac,
        "dev",
        OUTSIDE_LINK,
        "nud",
        "permanent",
    ];
    for (knob, value) in [
        ("base_reachable_time_ms", "4000"),
        ("delay_first_probe_time", "1"),
    ] {
        let key = format!("net.{family}.neigh.{UPLINK}.{knob}={value}");
        output_in(env, &host, "sysctl", &["-qw", &key]);
    }
    let (answered, fast) = counted(env, "fast_path_out", || burst_answered(env, ns, far));
    assert!(answered, "the control burst got no answer");
    assert!(
        fast >= 50,
        "the control burst didn't take the fast path: {fast}"
    );
    let new_mac = "02:00:00:00:64:01";
    output_in(
        env,
        &outside,
        "ip",
        &["link", "set", OUTSIDE_LINK, "address", new_mac],
    );
    // A new MAC flushes the outside's neighbours, permanent ones too.
    output_in(env, &outside, "ip", &permanent);
    // Forwarding through the stack finds the new MAC once its entry for the next hop went
    // stale and a probe to the old one went unanswered; the fast path must too.
    let (found, fast) = counted(env, "fast_path_out", || {
        eventually(Duration::from_secs(30), || burst_answered(env, ns, far))
    });
    let neighbour = output_in(env, &host, "ip", &["neigh", "show", &far.to_string()]);
    assert!(
        found,
        "no answer 30 s after the next hop's MAC changed: {neighbour}"
    );
    assert!(fast > 0, "nothing took the fast path");
    assert!(neighbour.contains(new_mac), "{neighbour}");
}

#[test]
fn bigger_than_the_uplink_mtu_is_left_to_the_stack_which_answers_fragmentation_needed() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.63.0.0/24"]);
    let c = create(&env, "c", &["--network", "n"]);
    output_in(
        &env,
        &env.host_ns(),
        "ip",
        &["link", "set", UPLINK, "mtu", "1400"],
    );
    let far = OUTSIDE_ADDR.to_string();
    // The control: 1400 bytes fit and go the fast path.
    let (reply, fast) = counted(&env, "fast_path_out", || {
        ping_output(&env, &c.ns, &["-c1", "-W2", "-M", "do", "-s", "1372", &far])
    });
    assert!(reply.contains("1 received"), "{reply}");
    assert_eq!(fast, 1, "{reply}");
    // 1401 bytes with DF don't fit the uplink: the stack says so, with the uplink's MTU.
    let (reply, fast) = counted(&env, "fast_path_out", || {
        ping_output(&env, &c.ns, &["-c1", "-W2", "-M", "do", "-s", "1373", &far])
    });
    assert!(
        reply.contains(&format!(
            "From {} icmp_seq=1 Frag needed and DF set (mtu = 1400)",
            gateway(&env, "n")
        )),
        "{reply}"
    );
    assert_eq!(
        fast, 0,
        "a packet bigger than the uplink's MTU took the fast path"
    );
    // Path MTU discovery: the container's kernel learnt it.
    let route = output_in(&env, &c.ns, "ip", &["route", "get", &far]);
    assert!(route.contains("mtu 1400"), "{route}");
}

/// Datagrams from `sock` leave without DF, so a router may fragment them.
fn without_df(sock: &UdpSocket) {
    use std::os::fd::AsRawFd as _;
    let dont: libc::c_int = libc::IP_PMTUDISC_DONT;
    // SAFETY: an int option of a live socket, passed with its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const dont).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "IP_MTU_DISCOVER: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn inbound_bigger_than_the_containers_mtu_is_fragmented_by_the_stack() {
    let env = TestEnv::new();
    env.netd_ok(&[
        "network",
        "create",
        "n",
        "--subnet",
        "10.64.0.0/24",
        "--mtu",
        "1200",
    ]);
    let c = create(&env, "c", &["--network", "n", "-p", "5300:53/udp"]);
    let server = env.in_ns(&c.ns, || {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 53)).unwrap()
    });
    server.set_read_timeout(Some(TIMEOUT)).unwrap();
    let client = env.in_ns(&env.outside_ns(), || {
        UdpSocket::bind((OUTSIDE_ADDR, 0)).unwrap()
    });
    without_df(&client);
    let mut buf = [0u8; 2000];
    for (size, fast_path) in [(1000, 1), (1400, 0)] {
        let data = vec![7u8; size];
        let (received, fast) = counted(&env, "fast_path_in", || {
            client.send_to(&data, (HOST_ADDR, 5300)).unwrap();
            retry_interrupted(|| server.recv_from(&mut buf)).map(|(n, _)| n)
        });
        assert_eq!(received.unwrap(), size, "the datagram arrived whole");
        assert_eq!(fast, fast_path, "{size} bytes into an MTU of 1200");
    }
    let reassembled = output_in(&env, &c.ns, "nstat", &["-azs", "IpReasmOKs"]);
    let count = reassembled
        .lines()
        .find_map(|l| l.strip_prefix("IpReasmOKs"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok());
    assert_eq!(
        count,
        Some(1),
        "the container reassembled one datagram: {reassembled}"
    );
}

#[test]
fn a_policy_rule_on_the_bridge_applies_to_the_fast_path_as_to_forwarding() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.66.0.0/24"]);
    let c = create(&env, "c", &["--network", "n"]);
    let bridge = env.netd_json(&["network", "inspect", "n"])["network"]["bridge"]
        .as_str()
        .unwrap()
        .to_string();
    let far = OUTSIDE_ADDR.to_string();
    // The control: out by the fast path.
    let (reply, fast) = counted(&env, "fast_path_out", || {
        ping_output(&env, &c.ns, &["-c1", "-W2", &far])
    });
    assert!(reply.contains("1 received"), "{reply}");
    assert_eq!(fast, 1, "{reply}");
    // What arrives on the bridge is routed by nothing (a kill switch): forwarding drops it, and
    // the fast path must not route around the rule.
    output_in(
        &env,
        &env.host_ns(),
        "ip",
        &["rule", "add", "iif", &bridge, "pref", "100", "blackhole"],
    );
    let (reply, fast) = counted(&env, "fast_path_out", || {
        ping_output(&env, &c.ns, &["-c1", "-W2", &far])
    });
    assert!(reply.contains(" 0 received"), "{reply}");
    assert_eq!(fast, 0, "the fast path routed around the bridge's rule");
}
