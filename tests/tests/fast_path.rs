//! The eBPF fast path's fallbacks: what the redirects can't answer for is left to the host
//! stack, which does what forwarding does (ICMP time exceeded, fragmentation needed,
//! fragmenting), and the stats counters show which path each packet took.

use std::net::{Ipv4Addr, UdpSocket};

use tests::{
    cli::{TIMEOUT, create, output_in, ping_output, stat},
    harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv, UPLINK},
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
