//! Traffic through the iptables datapath where it behaves as Docker's rules do and the eBPF
//! one doesn't have to: `--internal`, and a published port reached at the container's own
//! address. Each refusal is pinned on the rule that made it, by its packet counter.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr},
};

use tests::{
    cli::{assert_echoed, connect_error, create, echo_server, echo_servers, output_in, pings},
    engines::{udp_ask, udp_name_server},
    harness::{HOST_ADDR, OUTSIDE_ADDR, OUTSIDE_ADDR6, TestEnv},
};

/// Packets the `target` rules of filter chain `chain` in the host namespace matched, and its
/// policy when that is `target` (`Chain FORWARD (policy DROP 3 packets, 180 bytes)`).
fn matched(env: &TestEnv, chain: &str, target: &str) -> u64 {
    let listing = output_in(
        env,
        &env.host_ns(),
        "iptables",
        &["-t", "filter", "-L", chain, "-v", "-x", "-n"],
    );
    let by_policy = listing
        .lines()
        .next()
        .and_then(|header| header.split_once(&format!("(policy {target} ")))
        .map_or(0, |(_, rest)| {
            rest.split(' ').next().unwrap().parse().unwrap()
        });
    let by_rules: u64 = listing
        .lines()
        .skip(2)
        .filter(|l| l.split_whitespace().nth(2) == Some(target))
        .map(|l| l.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        .sum();
    by_policy + by_rules
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    (ip, port).into()
}

#[test]
fn an_internal_network_on_the_iptables_datapath_reaches_only_its_gateway() {
    let env = TestEnv::new();
    let inner = "10.65.0.0/24";
    env.netd_ok(&[
        "--datapath",
        "iptables",
        "network",
        "create",
        "inner",
        "--subnet",
        inner,
        "--internal",
    ]);
    let c = create(&env, "c", &["--network", "inner", "-p", "8080:80"]);
    let gateway: Ipv4Addr = env.netd_json(&["network", "inspect", "inner"])["network"]["gateway"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pings(&env, &c.ns, gateway), "the gateway is in reach");

    let isolation = "NETD-ISOLATION-STAGE-1";
    let drops = matched(&env, isolation, "DROP");
    // Out: nothing leaves, the isolation rule for traffic from the bridge to elsewhere drops it.
    assert!(!pings(&env, &c.ns, OUTSIDE_ADDR));
    let server = echo_server(&env, &env.outside_ns(), sock(OUTSIDE_ADDR, 9000));
    assert_eq!(
        connect_error(&env, &c.ns, sock(OUTSIDE_ADDR, 9000)),
        ErrorKind::TimedOut
    );
    assert!(
        matched(&env, isolation, "DROP") >= drops + 2,
        "dropped by {isolation}"
    );
    // The control: the same server answers the host.
    assert_echoed(&env, &env.host_ns(), sock(OUTSIDE_ADDR, 9000));
    server.join().unwrap();

    // In: the published port doesn't let the outside in either.
    let _server = echo_server(&env, &c.ns, sock(Ipv4Addr::UNSPECIFIED, 80));
    let drops = matched(&env, isolation, "DROP");
    assert_eq!(
        connect_error(&env, &env.outside_ns(), sock(HOST_ADDR, 8080)),
        ErrorKind::TimedOut
    );
    assert!(
        matched(&env, isolation, "DROP") > drops,
        "dropped by {isolation}"
    );
    let nat = output_in(&env, &env.host_ns(), "iptables-save", &["-t", "nat"]);
    assert!(
        !nat.contains(&format!("-s {inner} ! -o")),
        "an internal network masquerades: {nat}"
    );
}

#[test]
fn the_iptables_datapath_lets_the_outside_reach_a_published_port_at_the_containers_address() {
    let env = TestEnv::new();
    env.netd_ok(&[
        "--datapath",
        "iptables",
        "network",
        "create",
        "n",
        "--subnet",
        "10.66.0.0/24",
    ]);
    let c = create(&env, "c", &["--network", "n", "-p", "8080:80"]);
    output_in(
        &env,
        &env.outside_ns(),
        "ip",
        &[
            "route",
            "add",
            "10.66.0.0/24",
            "via",
            &HOST_ADDR.to_string(),
        ],
    );
    // Docker's ACCEPT for the published container port matches whatever the destination was
    // before routing, so the container's own address works as well as the host's.
    let addrs = [sock(c.ip, 80), sock(HOST_ADDR, 8080)];
    let server = echo_servers(&env, &c.ns, sock(Ipv4Addr::UNSPECIFIED, 80), addrs.len());
    for addr in addrs {
        assert_echoed(&env, &env.outside_ns(), addr);
    }
    for peer in server.join().unwrap() {
        assert_eq!(peer.ip(), std::net::IpAddr::from(OUTSIDE_ADDR));
    }
    // An unpublished port at the same address meets FORWARD's DROP.
    let _server = echo_server(&env, &c.ns, sock(Ipv4Addr::UNSPECIFIED, 81));
    let drops = matched(&env, "FORWARD", "DROP");
    assert_eq!(
        connect_error(&env, &env.outside_ns(), sock(c.ip, 81)),
        ErrorKind::TimedOut
    );
    assert!(
        matched(&env, "FORWARD", "DROP") > drops,
        "dropped in FORWARD"
    );
}

/// A flow through a published port outlives the port's rules in the kernel's conntrack: when
/// its container goes, its flows go too (Docker's `clearEndpointConnections`), or the next
/// container given the address would get the old flow's datagrams.
#[test]
fn a_removed_containers_flows_do_not_reach_the_next_one_with_its_address() {
    let env = TestEnv::new();
    env.netd_ok(&[
        "--datapath",
        "iptables",
        "network",
        "create",
        "n",
        "--subnet",
        "10.67.0.0/24",
    ]);
    let ip = "10.67.0.9";
    let first = create(
        &env,
        "first",
        &["--network", "n", "--ip", ip, "-p", "5353:53/udp"],
    );
    udp_name_server(&env, &first.ns, 53, "first");
    let (outside, port) = (env.outside_ns(), sock(HOST_ADDR, 5353));
    assert_eq!(
        udp_ask(&env, &outside, 40001, port).as_deref(),
        Some("first")
    );
    env.netd_ok(&["container", "rm", &first.name]);
    let next = create(&env, "next", &["--network", "n", "--ip", ip]);
    udp_name_server(&env, &next.ns, 53, "next");
    assert_eq!(udp_ask(&env, &outside, 40001, port), None);
    // Control: published again, the port reaches it.
    env.netd_ok(&["publish", &next.name, "-p", "5353:53/udp"]);
    assert_eq!(
        udp_ask(&env, &outside, 40002, port).as_deref(),
        Some("next")
    );
}

/// On a host whose interfaces start with IPv6 on, the bridge of a network without IPv6 has it
/// off: no ip6tables rule looks at such a network, so IPv6 a container crafts (its interface
/// has none) must not be routed on, out of an `--internal` network least of all.
#[test]
fn a_network_without_ipv6_routes_no_ipv6_a_container_crafts() {
    let env = TestEnv::dual_stack();
    let host = env.host_ns();
    for key in ["default.disable_ipv6", "all.forwarding"] {
        let value = if key.ends_with("forwarding") {
            "1"
        } else {
            "0"
        };
        netd::netlink::set_sysctl(Some(&host), &format!("net.ipv6.conf.{key}"), value).unwrap();
    }
    env.netd_ok(&[
        "--datapath",
        "iptables",
        "network",
        "create",
        "v4only",
        "--subnet",
        "10.68.0.0/24",
        "--internal",
    ]);
    let c = create(&env, "c", &["--network", "v4only"]);
    let bridge = env.netd_json(&["network", "inspect", "v4only"])["network"]["bridge"]
        .as_str()
        .unwrap()
        .to_string();
    // A datagram to the outside's IPv6 address, at the bridge's MAC.
    let src: std::net::Ipv6Addr = "fd00:68::2".parse().unwrap();
    let packet = tests::rawsock::ipv6(src, OUTSIDE_ADDR6, &tests::rawsock::marker());
    let bridge_mac = tests::rawsock::mac_of(&env, &host, &bridge);
    let own_mac = tests::rawsock::mac_of(&env, &c.ns, "eth0");
    let frame = tests::rawsock::ether(bridge_mac, own_mac, None, 0x86dd, &packet);
    let forwarded = || tests::counters::snmp6(&env, &host, "Ip6OutForwDatagrams");
    let before = forwarded();
    tests::rawsock::send_frames(&env, &c.ns, "eth0", &[frame]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(forwarded(), before, "the host routed a container's IPv6 on");
    let conf = format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6");
    assert_eq!(output_in(&env, &host, "cat", &[&conf]).trim(), "1");
}
