//! Isolation in the eBPF datapath, with real packets through networks and containers made by
//! the CLI: `--icc=false` and `--link`, `--internal`, anti-spoofing, other networks, and the
//! drop counters and events that report each refusal.

use std::{net::Ipv4Addr, path::PathBuf, process::Stdio, thread, time::Duration};

use tests::{
    counters,
    harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv, UPLINK},
    rawsock,
    traffic::{echo_requests_received, snmp_counter, stat, wait_listening},
};

/// A container made with `netd container create NAME ARGS`: its name, namespace and address.
struct Container {
    name: String,
    ns: PathBuf,
    ip: Ipv4Addr,
}

fn create(env: &TestEnv, base: &str, args: &[&str]) -> Container {
    let name = env.name(base);
    let mut all = vec!["container", "create", name.as_str()];
    all.extend_from_slice(args);
    env.netd_ok(&all);
    let info = env.netd_json(&["container", "inspect", &name]);
    Container {
        ns: netd::netns::path_of(&name),
        ip: info["ip"].as_str().unwrap().parse().unwrap(),
        name,
    }
}

/// Whether `count` pings from `ns` to `dst` (from `src` when given) get an answer.
fn pings(env: &TestEnv, ns: &std::path::Path, dst: Ipv4Addr, src: Option<Ipv4Addr>) -> bool {
    let dst = dst.to_string();
    let mut args = vec!["-c", "1", "-W", "1"];
    let src = src.map(|s| s.to_string());
    if let Some(src) = &src {
        args.extend_from_slice(&["-I", src]);
    }
    args.push(&dst);
    env.run_in(ns, "ping", &args).status.success()
}

/// Whether a TCP connection from `ns` to `dst:port` is accepted.
fn connects(env: &TestEnv, ns: &std::path::Path, dst: Ipv4Addr, port: u16) -> bool {
    env.run_in(
        ns,
        "nc",
        &["-z", "-w", "1", &dst.to_string(), &port.to_string()],
    )
    .status
    .success()
}

/// Starts TCP listeners on `ports` in `ns` and waits until they listen.
fn listen(env: &TestEnv, ns: &std::path::Path, ports: &[u16]) {
    for port in ports {
        env.spawn_in(ns, "nc", &["-lk", &port.to_string()]);
    }
    for port in ports {
        wait_listening(ns, *port);
    }
}

/// TCP segments the namespace at `ns` received (`InSegs` of /proc/net/snmp), after letting
/// those of a connection just closed (its last ACK) arrive.
fn tcp_segments_received(ns: &std::path::Path) -> u64 {
    thread::sleep(Duration::from_millis(200));
    snmp_counter(ns, "Tcp", "InSegs").unwrap_or_else(|e| panic!("{e:#}"))
}

fn gateway_of(env: &TestEnv, network: &str) -> Ipv4Addr {
    env.netd_json(&["network", "inspect", network])["network"]["gateway"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Dropped packets of the container at `ip`, as `netd stats` shows them.
fn endpoint_drops(env: &TestEnv, ip: Ipv4Addr) -> u64 {
    let stats = env.netd_json(&["stats", "--json"]);
    stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint"] == ip.to_string())
        .map_or(0, |e| e["dropped"].as_u64().unwrap())
}

/// Packets of the container at `ip` dropped for `reason`, as `netd stats` shows them.
fn endpoint_drops_for(env: &TestEnv, ip: Ipv4Addr, reason: &str) -> u64 {
    let stats = env.netd_json(&["stats", "--json"]);
    stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint"] == ip.to_string())
        .and_then(|e| {
            e["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["reason"] == reason)
        })
        .map_or(0, |r| r["packets"].as_u64().unwrap())
}

#[test]
fn without_icc_only_links_to_exposed_ports_and_their_replies_pass_ebpf() {
    icc_false_on("ebpf");
}

#[test]
fn without_icc_only_links_to_exposed_ports_and_their_replies_pass_iptables() {
    icc_false_on("iptables");
}

/// What refused traffic between containers of network `net` counted: `icc_denied` on the
/// eBPF datapath, Docker's `-i BRIDGE -o BRIDGE -j DROP` on the iptables one.
fn icc_refusals(env: &TestEnv, datapath: &str, net: &str) -> u64 {
    if datapath == "ebpf" {
        return stat(env, "icc_denied");
    }
    let bridge = env.netd_json(&["network", "inspect", net])["network"]["bridge"]
        .as_str()
        .unwrap()
        .to_string();
    counters::iptables_drops(env, "FORWARD", &bridge, &bridge)
}

/// `--icc=false` and `--link` on a network of `datapath`: each refusal is counted as such
/// and reaches nothing at the receiver, next to what the link lets through to the same
/// listener; the eBPF datapath also stops what the bridge would flood.
fn icc_false_on(datapath: &str) {
    let env = TestEnv::new();
    env.netd_ok(&[
        "--datapath",
        datapath,
        "network",
        "create",
        "quiet",
        "--icc=false",
    ]);
    let web = create(&env, "web", &["--network", "quiet", "--expose", "80"]);
    let link = format!("{}:db", web.name);
    let client = create(&env, "client", &["--network", "quiet", "--link", &link]);
    let stranger = create(&env, "stranger", &["--network", "quiet"]);
    listen(&env, &web.ns, &[80, 81]);
    listen(&env, &client.ns, &[80]);

    assert!(
        connects(&env, &client.ns, web.ip, 80),
        "{datapath}: along the link"
    );
    let refused = |from: &Container, to: &Container, port: u16, what: &str| {
        let (denied, segments) = (
            icc_refusals(&env, datapath, "quiet"),
            tcp_segments_received(&to.ns),
        );
        assert!(!connects(&env, &from.ns, to.ip, port), "{datapath}: {what}");
        assert_eq!(
            tcp_segments_received(&to.ns),
            segments,
            "{datapath}: {what}: reached {}",
            to.ip
        );
        assert!(
            icc_refusals(&env, datapath, "quiet") > denied,
            "{datapath}: {what}: not counted"
        );
    };
    refused(&client, &web, 81, "not exposed");
    refused(&stranger, &web, 80, "not linked");
    refused(&web, &client, 80, "against the link");
    // ICMP isn't linked; the host's echo to the same container is answered.
    let (denied, echoes) = (
        icc_refusals(&env, datapath, "quiet"),
        echo_requests_received(&web.ns),
    );
    assert!(
        !pings(&env, &client.ns, web.ip, None),
        "{datapath}: ICMP isn't linked"
    );
    assert_eq!(echo_requests_received(&web.ns), echoes, "{datapath}");
    assert!(icc_refusals(&env, datapath, "quiet") > denied, "{datapath}");
    assert!(pings(&env, &env.host_ns(), web.ip, None), "{datapath}");
    // The gateway (the host) stays reachable.
    assert!(pings(&env, &stranger.ns, gateway_of(&env, "quiet"), None));
    if datapath != "ebpf" {
        // The linked container goes first; the link's rules still go with the linking one.
        env.netd_ok(&["container", "rm", &web.name]);
        env.netd_ok(&["container", "rm", &client.name]);
        let rules = env.run_in(&env.host_ns(), "iptables-save", &["-t", "filter"]);
        let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
        for ip in [web.ip, client.ip] {
            assert!(
                !rules.contains(&format!("{ip}/32")),
                "{ip} left in:\n{rules}"
            );
        }
        return;
    }
    assert!(endpoint_drops_for(&env, stranger.ip, "icc_denied") > 0);
    // Nothing the bridge would flood to the others: broadcast, multicast, IPv6. netd gives a
    // container on a network without IPv6 no IPv6 address, but its root can make one (its
    // MAC's link-local one: any other is a spoofed source).
    let mac = tests::rawsock::mac_of(&env, &stranger.ns, "eth0");
    let own = format!("{}/64", tests::frames6::link_local(mac));
    let own_ipv6 = ["-6", "addr", "add", &own, "dev", "eth0", "nodad"];
    assert!(env.run_in(&stranger.ns, "ip", &own_ipv6).status.success());
    for args in [
        ["-b", "-c1", "-W1", "255.255.255.255"],
        ["-b", "-c1", "-W1", "224.0.0.1"],
        ["-6", "-c1", "-W1", "ff02::1%eth0"],
    ] {
        let denied = stat(&env, "icc_denied");
        let _ = env.run_in(&stranger.ns, "ping", &args);
        assert!(stat(&env, "icc_denied") > denied, "ping {args:?}");
    }
}

/// Packets the counting rule `iptables -I FORWARD -s SRC -d DST` (no target) saw in the
/// host namespace.
fn forwarded(env: &TestEnv, src: Ipv4Addr, dst: Ipv4Addr) -> u64 {
    let out = env.run_in(&env.host_ns(), "iptables", &["-w", "-nvxL", "FORWARD"]);
    assert!(out.status.success());
    let (src, dst) = (src.to_string(), dst.to_string());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[f.len() - 2] == src && f[f.len() - 1] == dst)
        .map(|f| f[0].parse().unwrap())
        .expect("the counting rule")
}

fn count_forwarded(env: &TestEnv, src: Ipv4Addr, dst: Ipv4Addr) {
    let (src, dst) = (src.to_string(), dst.to_string());
    let out = env.run_in(
        &env.host_ns(),
        "iptables",
        &["-w", "-I", "FORWARD", "1", "-s", &src, "-d", &dst],
    );
    assert!(out.status.success(), "{out:?}");
}

/// iperf3 from `client` to `server` for a second; Gbit/s.
fn throughput(env: &TestEnv, client: &Container, server: &Container) -> f64 {
    env.spawn_in(&server.ns, "iperf3", &["-s", "-1"]);
    wait_listening(&server.ns, 5201);
    let out = env.run_in(
        &client.ns,
        "iperf3",
        &["-c", &server.ip.to_string(), "-t", "1", "-J"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
        / 1e9
}

#[test]
fn containers_of_a_network_talk_over_the_fast_path_past_the_bridge_and_netfilter() {
    let env = TestEnv::new();
    // The same traffic on an iptables network goes through the bridge: the control that
    // shows the counting rule sees bridged traffic when br_netfilter hands it over.
    env.netd_ok(&["--datapath", "iptables", "network", "create", "slow"]);
    let s1 = create(&env, "s1", &["--network", "slow"]);
    let s2 = create(&env, "s2", &["--network", "slow"]);
    let c1 = create(&env, "c1", &[]);
    let c2 = create(&env, "c2", &[]);
    count_forwarded(&env, c1.ip, c2.ip);
    count_forwarded(&env, s1.ip, s2.ip);
    for call_iptables in ["1", "0"] {
        netd::netlink::set_sysctl(
            Some(&env.host_ns()),
            "net.bridge.bridge-nf-call-iptables",
            call_iptables,
        )
        .unwrap();
        let fast = stat(&env, "fast_path_local");
        assert!(pings(&env, &c1.ns, c2.ip, None));
        listen(&env, &c2.ns, &[80]);
        assert!(connects(&env, &c1.ns, c2.ip, 80));
        assert!(
            stat(&env, "fast_path_local") >= fast + 4,
            "echo, reply, SYN, SYN-ACK at least"
        );
        assert_eq!(forwarded(&env, c1.ip, c2.ip), 0, "netfilter saw none");

        let slow = forwarded(&env, s1.ip, s2.ip);
        assert!(pings(&env, &s1.ns, s2.ip, None));
        if call_iptables == "1" {
            assert!(forwarded(&env, s1.ip, s2.ip) > slow, "the control counts");
        }
    }
    eprintln!(
        "iperf3 container to container: fast path {:.1} Gbit/s, bridge (iptables network) {:.1} Gbit/s",
        throughput(&env, &c1, &c2),
        throughput(&env, &s1, &s2)
    );
}

#[test]
fn published_ports_and_the_outside_are_reached_past_the_bridge_and_netfilter() {
    let env = TestEnv::new();
    let c = create(&env, "c", &["-p", "8080:80"]);
    listen(&env, &c.ns, &[80]);
    listen(&env, &env.outside_ns(), &[9000]);
    // The host learns the container's MAC from its ARP: until then the stack delivers.
    assert!(pings(&env, &c.ns, gateway_of(&env, "bridge"), None));
    // The control: an iptables network's traffic out is forwarded by the stack.
    env.netd_ok(&["--datapath", "iptables", "network", "create", "slow"]);
    let s = create(&env, "s", &["--network", "slow"]);
    count_forwarded(&env, s.ip, OUTSIDE_ADDR);
    count_forwarded(&env, c.ip, OUTSIDE_ADDR);
    count_forwarded(&env, OUTSIDE_ADDR, c.ip);
    for call_iptables in ["1", "0"] {
        netd::netlink::set_sysctl(
            Some(&env.host_ns()),
            "net.bridge.bridge-nf-call-iptables",
            call_iptables,
        )
        .unwrap();
        let (fast_in, fast_out) = (stat(&env, "fast_path_in"), stat(&env, "fast_path_out"));
        assert!(connects(&env, &env.outside_ns(), HOST_ADDR, 8080));
        assert!(connects(&env, &c.ns, OUTSIDE_ADDR, 9000));
        assert!(pings(&env, &c.ns, OUTSIDE_ADDR, None));
        // In: the published port's SYN and ACK, the SYN-ACK to the container's connection,
        // the echo reply. Out: the container's SYN and ACK, the SYN-ACK of the published
        // port, the echo request.
        assert!(stat(&env, "fast_path_in") >= fast_in + 4);
        assert!(stat(&env, "fast_path_out") >= fast_out + 4);
        assert_eq!(
            forwarded(&env, c.ip, OUTSIDE_ADDR),
            0,
            "netfilter saw none out"
        );
        assert_eq!(
            forwarded(&env, OUTSIDE_ADDR, c.ip),
            0,
            "netfilter saw none in"
        );

        let slow = forwarded(&env, s.ip, OUTSIDE_ADDR);
        assert!(pings(&env, &s.ns, OUTSIDE_ADDR, None));
        assert!(
            forwarded(&env, s.ip, OUTSIDE_ADDR) > slow,
            "the control counts"
        );
    }
}

#[test]
fn an_internal_network_reaches_only_its_containers_and_gateway() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "vault", "--internal"]);
    let c1 = create(&env, "c1", &["--network", "vault", "-p", "8080:80"]);
    let c2 = create(&env, "c2", &["--network", "vault"]);
    // The controls: the same traffic from and to containers of networks that aren't
    // internal (a masquerading one, and a routed one the outside has a route to).
    env.netd_ok(&["network", "create", "open", "--masquerade=false"]);
    let free = create(&env, "free", &["-p", "8081:80"]);
    let routed = create(&env, "routed", &["--network", "open"]);
    listen(&env, &c1.ns, &[80]);
    listen(&env, &free.ns, &[80]);
    let gateway = gateway_of(&env, "vault");
    assert!(pings(&env, &c2.ns, c1.ip, None));
    assert!(connects(&env, &c2.ns, c1.ip, 80));
    assert!(pings(&env, &c2.ns, gateway, None));
    for subnet in ["vault", "open"].map(|n| subnet_of(&env, n)) {
        let route = env.run_in(
            &env.outside_ns(),
            "ip",
            &["route", "add", &subnet, "via", &HOST_ADDR.to_string()],
        );
        assert!(route.status.success(), "{route:?}");
    }
    let refused = |what: &str,
                   receiver: &std::path::Path,
                   count: fn(&std::path::Path) -> u64,
                   attempt: &dyn Fn() -> bool| {
        let (internal, received) = (stat(&env, "internal"), count(receiver));
        assert!(!attempt(), "{what}");
        assert_eq!(count(receiver), received, "{what}: reached the receiver");
        assert!(stat(&env, "internal") > internal, "{what}: not counted");
    };

    assert!(pings(&env, &free.ns, OUTSIDE_ADDR, None));
    refused(
        "nothing out",
        &env.outside_ns(),
        echo_requests_received,
        &|| pings(&env, &c2.ns, OUTSIDE_ADDR, None),
    );
    assert!(pings(&env, &free.ns, HOST_ADDR, None));
    refused(
        "not even the host's uplink",
        &env.host_ns(),
        echo_requests_received,
        &|| pings(&env, &c2.ns, HOST_ADDR, None),
    );
    assert!(connects(&env, &env.outside_ns(), HOST_ADDR, 8081));
    refused(
        "nothing in through a published port",
        &c1.ns,
        tcp_segments_received,
        &|| connects(&env, &env.outside_ns(), HOST_ADDR, 8080),
    );
    // Nor routed straight to a container through the host.
    assert!(pings(&env, &env.outside_ns(), routed.ip, None));
    refused("nothing routed in", &c1.ns, echo_requests_received, &|| {
        pings(&env, &env.outside_ns(), c1.ip, None)
    });
    assert!(
        endpoint_drops_for(&env, c1.ip, "internal") >= 2,
        "the refused published port and route"
    );
    assert!(endpoint_drops_for(&env, c2.ip, "internal") >= 2);
}

fn subnet_of(env: &TestEnv, network: &str) -> String {
    env.netd_json(&["network", "inspect", network])["network"]["subnet"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Pings from `c1` to `c2` (from `src` when given) that `c2` received, as `c2` counts them.
fn echoes_delivered(env: &TestEnv, c1: &Container, c2: &Container, src: Option<Ipv4Addr>) -> u64 {
    let before = echo_requests_received(&c2.ns);
    let _ = pings(env, &c1.ns, c2.ip, src);
    echo_requests_received(&c2.ns) - before
}

#[test]
fn spoofed_addresses_and_macs_are_dropped_and_counted() {
    let env = TestEnv::new();
    let c1 = create(&env, "c1", &[]);
    let c2 = create(&env, "c2", &[]);
    // The control: c1's own echo reaches c2 (and c1 knows c2's MAC from here on).
    assert_eq!(echoes_delivered(&env, &c1, &c2, None), 1);

    let spoofed = Ipv4Addr::new(172, 17, 0, 200);
    let ip = |args: &[&str]| assert!(env.run_in(&c1.ns, "ip", args).status.success());
    ip(&["addr", "add", &format!("{spoofed}/16"), "dev", "eth0"]);
    let (counted, drops) = (
        stat(&env, "spoofed_addr"),
        endpoint_drops_for(&env, c1.ip, "spoofed_addr"),
    );
    assert_eq!(
        echoes_delivered(&env, &c1, &c2, Some(spoofed)),
        0,
        "an echo from a spoofed address reached c2"
    );
    assert!(stat(&env, "spoofed_addr") > counted);
    assert!(
        endpoint_drops_for(&env, c1.ip, "spoofed_addr") > drops,
        "counted against the sender"
    );
    ip(&["addr", "del", &format!("{spoofed}/16"), "dev", "eth0"]);
    assert_eq!(
        echoes_delivered(&env, &c1, &c2, None),
        1,
        "the control again"
    );

    let own_mac = netd::core::ipam::format_mac(netd::core::ipam::mac_for(c1.ip));
    let (counted, drops) = (
        stat(&env, "spoofed_mac"),
        endpoint_drops_for(&env, c1.ip, "spoofed_mac"),
    );
    ip(&["link", "set", "eth0", "address", "02:42:ac:11:99:99"]);
    assert_eq!(
        echoes_delivered(&env, &c1, &c2, None),
        0,
        "an echo from a spoofed MAC reached c2"
    );
    assert!(stat(&env, "spoofed_mac") > counted);
    assert!(endpoint_drops_for(&env, c1.ip, "spoofed_mac") > drops);
    ip(&["link", "set", "eth0", "address", &own_mac]);
    assert_eq!(
        echoes_delivered(&env, &c1, &c2, None),
        1,
        "the control again"
    );
    let text = env.netd_ok(&["stats"]);
    assert!(
        text.lines().any(|l| l.starts_with(&c1.ip.to_string())
            && l.contains("spoofed_addr=")
            && l.contains("spoofed_mac=")),
        "{text}"
    );
}

/// The MAC `ns` has for `ip` on its eth0, if any.
fn neighbour(env: &TestEnv, ns: &std::path::Path, ip: Ipv4Addr) -> Option<String> {
    let out = env.run_in(ns, "ip", &["neigh", "show", &ip.to_string(), "dev", "eth0"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "lladdr");
    words.next().map(str::to_string)
}

#[test]
fn a_container_cannot_take_over_the_gateway_with_gratuitous_arp() {
    let env = TestEnv::new();
    let c1 = create(&env, "c1", &[]);
    let c2 = create(&env, "c2", &[]);
    let gateway = gateway_of(&env, "bridge");
    let gateway_mac = netd::core::ipam::format_mac(netd::core::ipam::mac_for(gateway));
    let c1_mac = netd::core::ipam::mac_for(c1.ip);
    // c2 knows the gateway, and (for the control) a wrong MAC for c1.
    assert!(pings(&env, &c2.ns, gateway, None));
    assert_eq!(neighbour(&env, &c2.ns, gateway), Some(gateway_mac.clone()));
    let wrong = env.run_in(
        &c2.ns,
        "ip",
        &[
            "neigh",
            "replace",
            &c1.ip.to_string(),
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            "eth0",
            "nud",
            "stale",
        ],
    );
    assert!(wrong.status.success(), "{wrong:?}");
    let announce = |ip: Ipv4Addr| {
        let frame = rawsock::gratuitous_arp(c1_mac, ip);
        rawsock::send_frames(&env, &c1.ns, "eth0", &[frame]);
        thread::sleep(Duration::from_millis(300));
    };
    // The control: c1 announcing its own address corrects c2's entry.
    announce(c1.ip);
    assert_eq!(
        neighbour(&env, &c2.ns, c1.ip),
        Some(netd::core::ipam::format_mac(c1_mac))
    );

    let (counted, drops) = (
        stat(&env, "spoofed_addr"),
        endpoint_drops_for(&env, c1.ip, "spoofed_addr"),
    );
    announce(gateway);
    assert_eq!(
        neighbour(&env, &c2.ns, gateway),
        Some(gateway_mac),
        "c1 took the gateway over"
    );
    assert!(stat(&env, "spoofed_addr") > counted);
    assert!(endpoint_drops_for(&env, c1.ip, "spoofed_addr") > drops);
    // And c2's traffic still leaves through the gateway.
    assert!(pings(&env, &c2.ns, OUTSIDE_ADDR, None));
}

#[test]
fn containers_of_another_network_are_out_of_reach() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "blue"]);
    env.netd_ok(&["network", "create", "red"]);
    let b = create(&env, "b", &["--network", "blue"]);
    let r = create(&env, "r", &["--network", "red"]);
    let r2 = create(&env, "r2", &["--network", "red"]);
    listen(&env, &r.ns, &[80]);
    // The controls: r's own network reaches it.
    assert!(pings(&env, &r2.ns, r.ip, None));
    assert!(connects(&env, &r2.ns, r.ip, 80));
    let (counted, echoes, segments) = (
        stat(&env, "other_network"),
        echo_requests_received(&r.ns),
        tcp_segments_received(&r.ns),
    );
    assert!(!pings(&env, &b.ns, r.ip, None));
    assert_eq!(echo_requests_received(&r.ns), echoes, "an echo got in");
    assert!(!connects(&env, &b.ns, r.ip, 80));
    assert_eq!(tcp_segments_received(&r.ns), segments, "a SYN got in");
    assert!(stat(&env, "other_network") >= counted + 2);
    assert!(endpoint_drops_for(&env, b.ip, "other_network") >= 2);
    // Both still reach the outside.
    assert!(pings(&env, &b.ns, OUTSIDE_ADDR, None));
    assert!(pings(&env, &r.ns, OUTSIDE_ADDR, None));
}

/// Runs `netd monitor ARGS` while `cause` runs, and returns the first line it prints that
/// `wanted` accepts (within 10 s). Other drops (a container's IPv6 autoconfiguration on a
/// network without ICC, say) may come first.
fn monitor(
    env: &TestEnv,
    args: &[&str],
    cause: impl FnOnce(),
    wanted: impl Fn(&str) -> bool,
) -> String {
    let mut all = vec!["monitor"];
    all.extend_from_slice(args);
    let mut child = env
        .netd_cmd(&all)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start netd monitor");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    cause();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if wanted(&line) => break Some(line),
            Ok(line) => seen.push(line),
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    found.unwrap_or_else(|| panic!("netd monitor {args:?}: no such event in {seen:?}"))
}

#[test]
fn monitor_streams_each_drop_with_its_reason_and_five_tuple() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "quiet", "--icc=false"]);
    let c1 = create(&env, "c1", &["--network", "quiet"]);
    let c2 = create(&env, "c2", &["--network", "quiet"]);
    listen(&env, &c2.ns, &[80]);

    let echo = format!("icc_denied icmp {}:", c1.ip);
    let line = monitor(
        &env,
        &[],
        || assert!(!pings(&env, &c1.ns, c2.ip, None)),
        |l| l.starts_with(&echo),
    );
    assert!(line.contains(&format!("-> {}:", c2.ip)), "{line}");

    let line = monitor(
        &env,
        &["--json"],
        || assert!(!connects(&env, &c1.ns, c2.ip, 80)),
        |l| l.contains("\"tcp\""),
    );
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["reason"], "icc_denied", "{event}");
    // No event asked for: done at once.
    assert_eq!(env.netd_ok(&["monitor", "--count", "0"]), "");
    assert_eq!(event["saddr"], c1.ip.to_string(), "{event}");
    assert_eq!(event["daddr"], c2.ip.to_string(), "{event}");
    assert_eq!(event["dport"], 80, "{event}");
    assert!(event["sport"].as_u64().unwrap() >= 1024, "{event}");
    // --count ends the stream (the buffer keeps this drop for a monitor started after it).
    assert!(!pings(&env, &c1.ns, c2.ip, None));
    let out = env.netd_ok(&["monitor", "--count", "1"]);
    assert_eq!(out.lines().count(), 1, "{out}");
}

/// Whether a TCP connection from the outside, from source address `src`, to the host's
/// `port` is accepted.
fn connects_from(env: &TestEnv, src: Ipv4Addr, port: u16) -> bool {
    connects_from_to(env, src, HOST_ADDR, port)
}

/// Whether a TCP connection from the outside, from source address `src`, to `dst:port` is
/// accepted.
fn connects_from_to(env: &TestEnv, src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> bool {
    env.run_in(
        &env.outside_ns(),
        "nc",
        &[
            "-z",
            "-w",
            "1",
            "-s",
            &src.to_string(),
            &dst.to_string(),
            &port.to_string(),
        ],
    )
    .status
    .success()
}

#[test]
fn published_ports_accept_new_flows_only_from_their_allowed_sources_ebpf() {
    publish_allow_on("ebpf");
}

#[test]
fn published_ports_accept_new_flows_only_from_their_allowed_sources_iptables() {
    publish_allow_on("iptables");
}

/// `--publish-allow` on a network of `datapath`; the eBPF one also counts the refusals.
fn publish_allow_on(datapath: &str) {
    let env = TestEnv::new();
    env.netd_ok(&["--datapath", datapath, "network", "create", "pub"]);
    let second = Ipv4Addr::new(198, 18, 0, 77);
    let out = env.run_in(
        &env.outside_ns(),
        "ip",
        &["addr", "add", &format!("{second}/24"), "dev", "out0"],
    );
    assert!(out.status.success(), "{out:?}");
    let allow_one = format!("{OUTSIDE_ADDR}/32");
    let one = create(
        &env,
        "one",
        &[
            "--network",
            "pub",
            "-p",
            "8080:80",
            "--publish-allow",
            &allow_one,
        ],
    );
    let range = create(
        &env,
        "range",
        &[
            "--network",
            "pub",
            "-p",
            "8081:80",
            "--publish-allow",
            "10.9.0.0/16",
            "--publish-allow",
            "198.18.0.64/26",
        ],
    );
    let open = create(&env, "open", &["--network", "pub", "-p", "8082:80"]);
    for c in [&one, &range, &open] {
        listen(&env, &c.ns, &[80]);
    }

    assert!(connects_from(&env, OUTSIDE_ADDR, 8080), "{datapath}");
    assert!(!connects_from(&env, second, 8080), "{datapath}");
    assert!(
        connects_from(&env, second, 8081),
        "{datapath}: in 198.18.0.64/26"
    );
    assert!(!connects_from(&env, OUTSIDE_ADDR, 8081), "{datapath}");
    assert!(
        connects_from(&env, OUTSIDE_ADDR, 8082),
        "{datapath}: open to all"
    );
    assert!(connects_from(&env, second, 8082), "{datapath}");
    // Routed straight to the container's address, a source outside the ranges gets nowhere
    // either (on the iptables datapath the allowed one does, as Docker's rules let it).
    let route = [&format!("{}/32", one.ip), "via", &HOST_ADDR.to_string()];
    let out = env.run_in(
        &env.outside_ns(),
        "ip",
        &[&["route", "add"][..], &route].concat(),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        !connects_from_to(&env, second, one.ip, 80),
        "{datapath}: straight to the container"
    );
    if datapath == "iptables" {
        assert!(connects_from_to(&env, OUTSIDE_ADDR, one.ip, 80));
    }
    // The ranges hold for other containers (hairpin through the host's address) and host
    // processes.
    assert!(
        !connects(&env, &open.ns, HOST_ADDR, 8080),
        "{datapath}: hairpin from outside the range"
    );
    assert!(connects(&env, &one.ns, HOST_ADDR, 8082), "{datapath}");
    assert!(
        !connects(&env, &env.host_ns(), HOST_ADDR, 8080),
        "{datapath}: a host process from outside the range"
    );
    assert!(
        connects(&env, &env.host_ns(), HOST_ADDR, 8082),
        "{datapath}"
    );
    if datapath == "ebpf" {
        assert!(stat(&env, "publish_denied") >= 3);
        assert!(endpoint_drops(&env, one.ip) > 0);
        assert!(endpoint_drops(&env, range.ip) > 0);
        assert_eq!(endpoint_drops(&env, open.ip), 0);
    }

    // Two host ports onto one restricted container port share its ranges: unpublishing one
    // leaves the other's.
    env.netd_ok(&["publish", &range.name, "-p", "8091:80"]);
    assert!(connects_from(&env, second, 8091), "{datapath}");
    env.netd_ok(&["unpublish", &range.name, "8081:80"]);
    assert!(
        !connects_from(&env, second, 8081),
        "{datapath}: unpublished"
    );
    assert!(
        connects_from(&env, second, 8091),
        "{datapath}: the other host port keeps its ranges"
    );
    assert!(!connects_from(&env, OUTSIDE_ADDR, 8091), "{datapath}");

    // The ranges go with the container (its address goes to the next one).
    env.netd_ok(&["container", "rm", &one.name]);
    let again = create(&env, "again", &["--network", "pub", "-p", "8080:80"]);
    listen(&env, &again.ns, &[80]);
    assert!(connects_from(&env, second, 8080), "{datapath}");
}

#[test]
fn new_flows_routed_straight_to_a_container_are_refused_ebpf() {
    unsolicited_on("ebpf", "false");
}

#[test]
fn new_flows_routed_straight_to_a_container_are_refused_ebpf_uplink_xdp() {
    unsolicited_on("ebpf", "true");
}

#[test]
fn new_flows_routed_straight_to_a_container_are_refused_iptables() {
    unsolicited_on("iptables", "false");
}

/// From the outside, with a route to the network through the host: a container is reached only
/// through its published port, and its own flows still get their replies. On the eBPF
/// datapath the refusals are counted, and with `--uplink-xdp` made by the uplink's XDP hook.
fn unsolicited_on(datapath: &str, xdp: &str) {
    let env = TestEnv::new();
    let what = format!("{datapath}, uplink xdp {xdp}");
    env.netd_ok(&[
        "--datapath",
        datapath,
        &format!("--uplink-xdp={xdp}"),
        "network",
        "create",
        "n",
        "--subnet",
        "10.93.0.0/24",
    ]);
    let c = create(&env, "c", &["--network", "n", "-p", "8080:80"]);
    listen(&env, &c.ns, &[80, 81]);
    let route = env.run_in(
        &env.outside_ns(),
        "ip",
        &[
            "route",
            "add",
            "10.93.0.0/24",
            "via",
            &HOST_ADDR.to_string(),
        ],
    );
    assert!(route.status.success(), "{route:?}");

    let bridge = env.netd_json(&["network", "inspect", "n"])["network"]["bridge"]
        .as_str()
        .unwrap()
        .to_string();
    // Docker's FORWARD policy DROP, as netd's iptables datapath writes it.
    let policy_drops = || counters::iptables_drops(&env, "FORWARD", "*", &bridge);
    let dropped = if datapath == "iptables" {
        policy_drops()
    } else {
        0
    };
    let segments = tcp_segments_received(&c.ns);
    let refused = || assert!(!connects(&env, &env.outside_ns(), c.ip, 81), "{what}");
    if datapath == "ebpf" {
        let to = format!("{}:81", c.ip);
        let line = monitor(&env, &[], refused, |l| {
            l.starts_with("unsolicited tcp") && l.contains(&to)
        });
        assert!(line.contains(&OUTSIDE_ADDR.to_string()), "{what}: {line}");
    } else {
        refused();
    }
    assert_eq!(
        tcp_segments_received(&c.ns),
        segments,
        "{what}: a SYN got in"
    );
    let echoes = echo_requests_received(&c.ns);
    assert!(!pings(&env, &env.outside_ns(), c.ip, None), "{what}");
    assert_eq!(echo_requests_received(&c.ns), echoes, "{what}");
    if datapath == "iptables" {
        assert!(
            policy_drops() >= dropped + 2,
            "{what}: the SYN and the echo"
        );
    }
    assert!(connects(&env, &env.outside_ns(), HOST_ADDR, 8080), "{what}");
    assert!(
        pings(&env, &c.ns, OUTSIDE_ADDR, None),
        "{what}: replies get in"
    );

    let link = env.run_in(&env.host_ns(), "ip", &["link", "show", UPLINK]);
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    assert_eq!(link.contains("prog/xdp"), xdp == "true", "{what}: {link}");
    if datapath == "ebpf" {
        assert!(stat(&env, "unsolicited") >= 2, "{what}");
        assert!(endpoint_drops_for(&env, c.ip, "unsolicited") >= 2, "{what}");
    }
    env.netd_ok(&["container", "rm", &c.name]);
    env.netd_ok(&["network", "rm", "n"]);
    let link = env.run_in(&env.host_ns(), "ip", &["link", "show", UPLINK]);
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "{what}: detached with the last network"
    );
}

#[test]
fn an_uplink_that_cannot_take_xdp_fails_the_network_in_one_line_leaving_nothing() {
    let env = TestEnv::new();
    // veth runs native XDP only for frames that fit a page: not with a 9000-byte peer.
    let mtu = env.run_in(
        &env.outside_ns(),
        "ip",
        &["link", "set", "out0", "mtu", "9000"],
    );
    assert!(mtu.status.success(), "{mtu:?}");
    let err = env.netd_err(&["--uplink-xdp", "network", "create", "n"]);
    assert!(err.contains("uplink_xdp") && err.contains("MTU"), "{err}");
    assert!(env.netd_ok(&["network", "ls", "--json"]).trim() == "[]");
    let links = std::fs::read_dir(env.bpffs.join("links")).unwrap().count();
    assert_eq!(links, 0, "the uplink's TC programs were rolled back too");
    // Without XDP the same uplink is fine.
    env.netd_ok(&["network", "create", "n"]);
}
