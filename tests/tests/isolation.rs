//! Isolation in the eBPF datapath, with real packets through networks and containers made by
//! the CLI: `--icc=false` and `--link`, `--internal`, anti-spoofing, other networks, and the
//! drop counters and events that report each refusal.

use std::{net::Ipv4Addr, path::PathBuf, process::Stdio, thread, time::Duration};

use tests::{
    harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv, UPLINK},
    traffic::{echo_requests_received, stat, wait_listening},
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
fn without_icc_only_links_to_exposed_ports_and_their_replies_pass() {
    for datapath in ["ebpf", "iptables"] {
        icc_false_on(datapath);
    }
}

/// `--icc=false` and `--link` on a network of `datapath`; the eBPF one also counts the
/// refusals and stops what the bridge would flood.
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
    assert!(
        !connects(&env, &client.ns, web.ip, 81),
        "{datapath}: not exposed"
    );
    assert!(
        !connects(&env, &stranger.ns, web.ip, 80),
        "{datapath}: not linked"
    );
    assert!(
        !connects(&env, &web.ns, client.ip, 80),
        "{datapath}: against the link"
    );
    assert!(
        !pings(&env, &client.ns, web.ip, None),
        "{datapath}: ICMP isn't linked"
    );
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
    let denied = stat(&env, "icc_denied");
    assert!(!connects(&env, &stranger.ns, web.ip, 80));
    assert!(stat(&env, "icc_denied") > denied);
    assert!(endpoint_drops_for(&env, stranger.ip, "icc_denied") > 0);
    // Nothing the bridge would flood to the others: broadcast, multicast, IPv6.
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
    listen(&env, &c1.ns, &[80]);
    let gateway = gateway_of(&env, "vault");
    assert!(pings(&env, &c2.ns, c1.ip, None));
    assert!(connects(&env, &c2.ns, c1.ip, 80));
    assert!(pings(&env, &c2.ns, gateway, None));
    assert!(!pings(&env, &c2.ns, OUTSIDE_ADDR, None), "nothing out");
    assert!(
        !pings(&env, &c2.ns, HOST_ADDR, None),
        "not even the host's uplink"
    );
    assert!(
        !connects(&env, &env.outside_ns(), HOST_ADDR, 8080),
        "nothing in through a published port"
    );
    // Nor routed straight to a container through the host.
    let subnet = env.netd_json(&["network", "inspect", "vault"])["network"]["subnet"]
        .as_str()
        .unwrap()
        .to_string();
    let route = env.run_in(
        &env.outside_ns(),
        "ip",
        &["route", "add", &subnet, "via", &HOST_ADDR.to_string()],
    );
    assert!(route.status.success(), "{route:?}");
    let echoes = echo_requests_received(&c1.ns);
    assert!(
        !pings(&env, &env.outside_ns(), c1.ip, None),
        "nothing routed in"
    );
    assert_eq!(
        echo_requests_received(&c1.ns),
        echoes,
        "stopped before the container"
    );
    assert!(stat(&env, "internal") >= 4);
    assert!(
        endpoint_drops(&env, c1.ip) > 0,
        "the refused published port"
    );
    assert!(endpoint_drops(&env, c2.ip) >= 2);
}

#[test]
fn spoofed_addresses_and_macs_are_dropped_and_counted() {
    let env = TestEnv::new();
    let c1 = create(&env, "c1", &[]);
    let c2 = create(&env, "c2", &[]);
    assert!(pings(&env, &c1.ns, c2.ip, None));

    let spoofed = Ipv4Addr::new(172, 17, 0, 200);
    let ip = |args: &[&str]| assert!(env.run_in(&c1.ns, "ip", args).status.success());
    ip(&["addr", "add", &format!("{spoofed}/16"), "dev", "eth0"]);
    assert!(!pings(&env, &c1.ns, c2.ip, Some(spoofed)));
    assert!(stat(&env, "spoofed_addr") > 0);
    assert!(
        endpoint_drops_for(&env, c1.ip, "spoofed_addr") > 0,
        "counted against the sender"
    );
    let drops = endpoint_drops(&env, c1.ip);

    ip(&["addr", "del", &format!("{spoofed}/16"), "dev", "eth0"]);
    ip(&["link", "set", "eth0", "address", "02:42:ac:11:99:99"]);
    assert!(!pings(&env, &c1.ns, c2.ip, None));
    assert!(stat(&env, "spoofed_mac") > 0);
    assert!(endpoint_drops_for(&env, c1.ip, "spoofed_mac") > 0);
    assert!(endpoint_drops(&env, c1.ip) > drops);
    let text = env.netd_ok(&["stats"]);
    assert!(
        text.lines().any(|l| l.starts_with(&c1.ip.to_string())
            && l.contains("spoofed_addr=")
            && l.contains("spoofed_mac=")),
        "{text}"
    );
}

#[test]
fn containers_of_another_network_are_out_of_reach() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "blue"]);
    env.netd_ok(&["network", "create", "red"]);
    let b = create(&env, "b", &["--network", "blue"]);
    let r = create(&env, "r", &["--network", "red"]);
    listen(&env, &r.ns, &[80]);
    assert!(!pings(&env, &b.ns, r.ip, None));
    assert!(!connects(&env, &b.ns, r.ip, 80));
    assert!(stat(&env, "other_network") >= 2);
    assert!(endpoint_drops(&env, b.ip) >= 2);
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
    env.run_in(
        &env.outside_ns(),
        "nc",
        &[
            "-z",
            "-w",
            "1",
            "-s",
            &src.to_string(),
            &HOST_ADDR.to_string(),
            &port.to_string(),
        ],
    )
    .status
    .success()
}

#[test]
fn published_ports_accept_new_flows_only_from_their_allowed_sources() {
    for datapath in ["ebpf", "iptables"] {
        publish_allow_on(datapath);
    }
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

    // The ranges go with the container (its address goes to the next one).
    env.netd_ok(&["container", "rm", &one.name]);
    let again = create(&env, "again", &["--network", "pub", "-p", "8080:80"]);
    listen(&env, &again.ns, &[80]);
    assert!(connects_from(&env, second, 8080), "{datapath}");
}

#[test]
fn new_flows_routed_straight_to_a_container_are_refused() {
    for (datapath, xdp) in [("ebpf", "false"), ("ebpf", "true"), ("iptables", "false")] {
        unsolicited_on(datapath, xdp);
    }
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
    let echoes = echo_requests_received(&c.ns);
    assert!(!pings(&env, &env.outside_ns(), c.ip, None), "{what}");
    assert_eq!(echo_requests_received(&c.ns), echoes, "{what}");
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
