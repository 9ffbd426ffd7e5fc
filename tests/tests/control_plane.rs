//! The control plane through the `netd` CLI: networks, containers, modes, links, /etc files,
//! concurrency, bad input and crash recovery, with real namespaces and real packets.

use std::{
    collections::HashSet,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use netd::netns;
use tests::{
    cli::connect_error,
    harness::{OUTSIDE_ADDR, TestEnv, host_links, namespaces, netd_state},
    traffic::{echo_server, retry_interrupted, tcp_echo},
};

fn ip_of(env: &TestEnv, name: &str) -> String {
    let c = env.netd_json(&["container", "inspect", name]);
    c["ip"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no ip: {c}"))
        .to_string()
}

fn ns(name: &str) -> PathBuf {
    netns::path_of(name)
}

fn pings(env: &TestEnv, from: &Path, to: &str) -> bool {
    env.run_in(from, "ping", &["-c", "1", "-W", "2", to])
        .status
        .success()
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

#[test]
fn a_none_container_is_isolated_and_keeps_loopback() {
    let env = TestEnv::new();
    let c = env.name("iso");
    env.netd_ok(&["container", "create", &c, "--network", "none"]);
    let links = String::from_utf8(env.run_in(&ns(&c), "ip", &["-o", "link"]).stdout).unwrap();
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    // A server inside answers on its own loopback...
    let server = echo_server(&ns(&c), 8000);
    assert_eq!(tcp_echo(&ns(&c), addr("127.0.0.1", 8000)).unwrap(), "netd");
    server.join().unwrap();
    // ...and the host, whose 127.0.0.1 is its own, can't reach it: its own stack refuses.
    let server = echo_server(&ns(&c), 8001);
    assert_eq!(
        connect_error(&env, &env.host_ns(), addr("127.0.0.1", 8001)),
        std::io::ErrorKind::ConnectionRefused
    );
    // The control: the same listener answers inside.
    assert_eq!(tcp_echo(&ns(&c), addr("127.0.0.1", 8001)).unwrap(), "netd");
    server.join().unwrap();
}

#[test]
fn host_and_container_reach_each_other_by_ping_and_tcp() {
    let env = TestEnv::new();
    let c = env.name("hc");
    env.netd_ok(&["container", "create", &c]);
    let ip = ip_of(&env, &c);
    let gateway = env.netd_json(&["network", "inspect", "bridge"])["network"]["gateway"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(pings(&env, &env.host_ns(), &ip));
    assert!(pings(&env, &ns(&c), &gateway));
    let server = echo_server(&ns(&c), 8000);
    assert_eq!(tcp_echo(&env.host_ns(), addr(&ip, 8000)).unwrap(), "netd");
    server.join().unwrap();
    let server = echo_server(&env.host_ns(), 8001);
    assert_eq!(tcp_echo(&ns(&c), addr(&gateway, 8001)).unwrap(), "netd");
    assert_eq!(server.join().unwrap().ip().to_string(), ip);
}

#[test]
fn containers_reach_each_other_over_the_bridge() {
    let env = TestEnv::new();
    let (a, b) = (env.name("a"), env.name("b"));
    env.netd_ok(&["network", "create", "n1", "--subnet", "10.91.0.0/24"]);
    env.netd_ok(&["container", "create", &a, "--network", "n1"]);
    env.netd_ok(&[
        "container",
        "create",
        &b,
        "--network",
        "n1",
        "--ip",
        "10.91.0.50",
    ]);
    assert_eq!(ip_of(&env, &a), "10.91.0.2");
    assert!(pings(&env, &ns(&a), "10.91.0.50"));
    let server = echo_server(&ns(&b), 9000);
    assert_eq!(tcp_echo(&ns(&a), addr("10.91.0.50", 9000)).unwrap(), "netd");
    assert_eq!(server.join().unwrap().ip().to_string(), "10.91.0.2");
    // MAC derived from the address, MTU from the network, eth0 inside.
    let link = String::from_utf8(
        env.run_in(&ns(&b), "ip", &["-o", "link", "show", "eth0"])
            .stdout,
    )
    .unwrap();
    assert!(
        link.contains("02:42:0a:5b:00:32") && link.contains("mtu 1500"),
        "{link}"
    );
}

/// A container on a network without IPv6 makes no IPv6 address and sends no IPv6 of its own,
/// and neither does the host end of its veth (a bridge port): otherwise each new container's
/// router solicitations and MLD reports are flooded to every port of the bridge.
#[test]
fn a_network_without_ipv6_carries_no_ipv6_chatter() {
    let env = TestEnv::new();
    let a = env.name("a");
    env.netd_ok(&["network", "create", "n1", "--subnet", "10.92.0.0/24"]);
    env.netd_ok(&["container", "create", &a, "--network", "n1"]);
    let host_veth = env.netd_json(&["container", "inspect", &a])["host_veth"]
        .as_str()
        .unwrap()
        .to_string();
    // A link-local address would have been made at once; its MLD report within the second.
    std::thread::sleep(Duration::from_millis(1500));
    let text =
        |ns: &Path, args: &[&str]| String::from_utf8(env.run_in(ns, "ip", args).stdout).unwrap();
    let inside = text(&ns(&a), &["-6", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        inside.trim().is_empty(),
        "the container has IPv6 addresses: {inside}"
    );
    let host_end = text(
        &env.host_ns(),
        &["-6", "-o", "addr", "show", "dev", &host_veth],
    );
    assert!(
        host_end.trim().is_empty(),
        "the bridge port has IPv6 addresses: {host_end}"
    );
    // What each end sent, from the kernel's per-interface IPv6 counters.
    let sent = |ns: &Path, file: &str| {
        let snmp6 = String::from_utf8(env.run_in(ns, "cat", &[file]).stdout).unwrap();
        snmp6
            .lines()
            .find_map(|l| l.strip_prefix("Ip6OutRequests"))
            .map(|n| n.trim().parse::<u64>().unwrap())
    };
    assert_eq!(
        sent(&ns(&a), "/proc/net/dev_snmp6/eth0"),
        Some(0),
        "the container sent IPv6"
    );
    let port = format!("/proc/net/dev_snmp6/{host_veth}");
    assert_eq!(
        sent(&env.host_ns(), &port),
        Some(0),
        "the bridge port sent IPv6"
    );
    // The network still works.
    assert!(pings(&env, &ns(&a), "10.92.0.1"));
}

/// `container rm` leaves the veth pair to the namespace's removal. A process still in the
/// namespace keeps both, but the host end is down and off the bridge at once: the process
/// reaches nothing, and the next container given the address works. The pair goes when the
/// process ends.
#[test]
fn a_process_left_in_a_removed_containers_namespace_reaches_nothing() {
    let env = TestEnv::new();
    let (a, b, next) = (env.name("a"), env.name("b"), env.name("next"));
    env.netd_ok(&["network", "create", "n1", "--subnet", "10.92.0.0/24"]);
    for (c, ip) in [(&a, "10.92.0.10"), (&b, "10.92.0.20")] {
        env.netd_ok(&["container", "create", c, "--network", "n1", "--ip", ip]);
    }
    let veth = env.netd_json(&["container", "inspect", &a])["host_veth"]
        .as_str()
        .unwrap()
        .to_string();
    let pid = env.spawn_in(&ns(&a), "sleep", &["60"]);
    wait_until("the process is in the namespace", || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    });
    let held = PathBuf::from(format!("/proc/{pid}/ns/net"));
    assert!(pings(&env, &held, "10.92.0.20"), "before the removal");

    env.netd_ok(&["container", "rm", &a]);
    let shown = env.run_in(&env.host_ns(), "ip", &["-j", "link", "show", &veth]);
    let link: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    let link = &link[0];
    assert!(
        link["master"].is_null() && !link["flags"].as_array().unwrap().contains(&"UP".into()),
        "the host end is still on the network: {link}"
    );
    assert!(!pings(&env, &held, "10.92.0.20"), "the process reached b");
    env.netd_ok(&[
        "container",
        "create",
        &next,
        "--network",
        "n1",
        "--ip",
        "10.92.0.10",
    ]);
    assert!(
        pings(&env, &ns(&next), "10.92.0.20"),
        "the address's next container"
    );

    let has_veth = || {
        host_links(&env)
            .iter()
            .any(|l| l.starts_with(&format!("{veth}@")))
    };
    assert!(has_veth(), "the process keeps the pair");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    wait_until("the pair goes with the namespace", || !has_veth());
}

/// Waits up to five seconds for `done`, failing with `what`.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The outside sees the host's uplink address for a container's connection (masquerade), and
/// a published port reaches the container; the same test runs on both datapaths.
fn masquerade_and_published_port(datapath: &str) {
    let env = TestEnv::new();
    let c = env.name("web");
    env.netd_ok(&[
        "--datapath",
        datapath,
        "network",
        "create",
        "n",
        "--subnet",
        "10.92.0.0/24",
    ]);
    env.netd_ok(&[
        "container",
        "create",
        &c,
        "--network",
        "n",
        "-p",
        "8080:80",
        "-p",
        "5353:53/udp",
    ]);
    assert_eq!(
        env.netd_ok(&["port", &c]),
        "80/tcp -> 0.0.0.0:8080\n53/udp -> 0.0.0.0:5353\n"
    );

    let server = echo_server(&env.outside_ns(), 7000);
    assert!(pings(&env, &ns(&c), &OUTSIDE_ADDR.to_string()));
    assert_eq!(
        tcp_echo(&ns(&c), addr(&OUTSIDE_ADDR.to_string(), 7000)).unwrap(),
        "netd"
    );
    assert_eq!(
        server.join().unwrap().ip().to_string(),
        "198.18.0.2",
        "masqueraded to the uplink address"
    );

    let server = echo_server(&ns(&c), 80);
    assert_eq!(
        tcp_echo(&env.outside_ns(), addr("198.18.0.2", 8080)).unwrap(),
        "netd"
    );
    assert_eq!(
        server.join().unwrap().ip(),
        std::net::IpAddr::V4(OUTSIDE_ADDR),
        "DNAT keeps the client address"
    );

    env.netd_ok(&["container", "rm", &c]);
    env.netd_ok(&["network", "rm", "n"]);
    let rules = String::from_utf8(env.run_in(&env.host_ns(), "iptables-save", &[]).stdout).unwrap();
    assert!(!rules.contains("NETD"), "{datapath} left rules:\n{rules}");
}

#[test]
fn masquerade_and_published_port_ebpf() {
    masquerade_and_published_port("ebpf");
}

#[test]
fn masquerade_and_published_port_iptables() {
    masquerade_and_published_port("iptables");
}

#[test]
fn host_none_and_container_modes() {
    let env = TestEnv::new();
    let (h, owner, sharer) = (env.name("h"), env.name("own"), env.name("share"));
    env.netd_ok(&["container", "create", &h, "--network", "host"]);
    let out = env.netd_ok(&["exec", &h, "--", "ip", "-o", "addr"]);
    assert!(
        out.contains("198.18.0.2"),
        "host mode sees the host's uplink: {out}"
    );

    env.netd_ok(&["container", "create", &owner]);
    env.netd_ok(&[
        "container",
        "create",
        &sharer,
        "--network",
        &format!("container:{owner}"),
    ]);
    let ip = ip_of(&env, &owner);
    let out = env.netd_ok(&["exec", &sharer, "--", "ip", "-o", "addr", "show", "eth0"]);
    assert!(out.contains(&ip), "the sharer sees the owner's eth0: {out}");
    let err = env.netd_err(&["container", "rm", &owner]);
    assert!(
        err.contains("shares its network namespace") && err.contains(&sharer),
        "{err}"
    );
    env.netd_ok(&["container", "rm", &sharer]);
    env.netd_ok(&["container", "rm", &owner]);
    env.netd_ok(&["container", "rm", &h]);
    assert!(!netns::exists(&owner));
}

#[test]
fn netd_link_joins_two_containers_point_to_point() {
    let env = TestEnv::new();
    let (a, b) = (env.name("pa"), env.name("pb"));
    env.netd_ok(&["network", "create", "na", "--subnet", "10.93.0.0/24"]);
    env.netd_ok(&["network", "create", "nb", "--subnet", "10.94.0.0/24"]);
    env.netd_ok(&["container", "create", &a, "--network", "na"]);
    env.netd_ok(&["container", "create", &b, "--network", "nb"]);
    env.netd_ok(&["link", &a, &b]);
    let route = String::from_utf8(
        env.run_in(&ns(&a), "ip", &["route", "get", "10.94.0.2"])
            .stdout,
    )
    .unwrap();
    assert!(route.contains("dev p2p"), "to b over the p2p link: {route}");
    let server = echo_server(&ns(&b), 9100);
    assert_eq!(tcp_echo(&ns(&a), addr("10.94.0.2", 9100)).unwrap(), "netd");
    assert_eq!(
        server.join().unwrap().ip().to_string(),
        "10.93.0.2",
        "no NAT on a p2p link"
    );
    let err = env.netd_err(&["link", &a, &b]);
    assert!(err.contains("already linked"), "{err}");
    env.netd_ok(&["container", "rm", &a]);
    let links = String::from_utf8(env.run_in(&ns(&b), "ip", &["-o", "link"]).stdout).unwrap();
    assert!(!links.contains("p2p"), "the peer end went with a: {links}");
}

#[test]
fn hosts_and_resolv_conf_follow_flags_and_links() {
    let env = TestEnv::new();
    let (db, web) = (env.name("db"), env.name("web"));
    env.netd_ok(&["network", "create", "n", "--subnet", "10.95.0.0/24"]);
    env.netd_ok(&[
        "container",
        "create",
        &db,
        "--network",
        "n",
        "--ip",
        "10.95.0.10",
    ]);
    env.netd_ok(&[
        "container",
        "create",
        &web,
        "--network",
        "n",
        "--hostname",
        "frontend",
        "--add-host",
        "registry:10.9.9.9",
        "--dns",
        "10.0.0.53",
        "--dns-search",
        "corp.example",
        "--link",
        &format!("{db}:database"),
    ]);
    let hosts = env.netd_ok(&["exec", &web, "--", "cat", "/etc/hosts"]);
    assert!(hosts.contains("127.0.0.1\tlocalhost"), "{hosts}");
    assert!(hosts.contains("10.95.0.2\tfrontend"), "{hosts}");
    assert!(
        hosts.contains(&format!("10.95.0.10\tdatabase {db}")),
        "{hosts}"
    );
    assert!(hosts.contains("10.9.9.9\tregistry"), "{hosts}");
    let resolv = env.netd_ok(&["exec", &web, "--", "cat", "/etc/resolv.conf"]);
    assert_eq!(resolv, "search corp.example\nnameserver 10.0.0.53\n");
    assert_eq!(env.netd_ok(&["exec", &web, "--", "hostname"]), "frontend\n");
    // The machine's own files are untouched.
    assert!(
        !std::fs::read_to_string("/etc/hosts")
            .unwrap()
            .contains("frontend")
    );

    // Re-created with a new address, the linked container's entry follows it.
    env.netd_ok(&["container", "rm", &db]);
    env.netd_ok(&[
        "container",
        "create",
        &db,
        "--network",
        "n",
        "--ip",
        "10.95.0.20",
    ]);
    let hosts = env.netd_ok(&["exec", &web, "--", "cat", "/etc/hosts"]);
    assert!(
        hosts.contains(&format!("10.95.0.20\tdatabase {db}")),
        "{hosts}"
    );

    // Without --dns, the host's resolv.conf minus loopback nameservers.
    let plain = env.name("plain");
    env.netd_ok(&["container", "create", &plain, "--network", "n"]);
    let resolv = env.netd_ok(&["exec", &plain, "--", "cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains("nameserver ") && !resolv.contains("nameserver 127."),
        "{resolv}"
    );
}

#[test]
fn fifty_concurrent_creates_all_succeed_with_distinct_addresses() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.96.0.0/24"]);
    let names: Vec<String> = (0..50).map(|i| env.name(&format!("k{i}"))).collect();
    let children: Vec<_> = names
        .iter()
        .map(|n| {
            env.netd_cmd(&["container", "create", n, "--network", "n"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ips: HashSet<String> = names.iter().map(|n| ip_of(&env, n)).collect();
    assert_eq!(ips.len(), 50);
    let listed = env.netd_json(&["container", "ls", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 50);
}

/// Runs every `netd ARGS` of `commands` at once and asserts that each succeeded.
fn all_at_once(env: &TestEnv, commands: &[Vec<String>]) {
    let children: Vec<_> = commands
        .iter()
        .map(|args| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            env.netd_cmd(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (child, args) in children.into_iter().zip(commands) {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "netd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// The host ends of veths on `bridge`.
fn bridge_ports(env: &TestEnv, bridge: &str) -> usize {
    String::from_utf8(
        env.run_in(
            &env.host_ns(),
            "ip",
            &["-o", "link", "show", "master", bridge],
        )
        .stdout,
    )
    .unwrap()
    .lines()
    .count()
}

#[test]
fn concurrent_removes_creates_and_publishes_leave_consistent_state_and_nothing_leaked() {
    use netd_common::datapath::{ENDPOINTS_MAP, PUBLISHED_MAP, VETHS_MAP};
    use tests::cli::map_entries;
    const N: u16 = 8;
    let env = TestEnv::new();
    env.netd_ok(&[
        "network",
        "create",
        "n",
        "--subnet",
        "10.69.0.0/24",
        "--bridge",
        "brcc",
    ]);
    let old: Vec<String> = (0..2 * N).map(|i| env.name(&format!("o{i}"))).collect();
    let new: Vec<String> = (0..N).map(|i| env.name(&format!("n{i}"))).collect();
    all_at_once(
        &env,
        &(0..2 * N)
            .map(|i| {
                let port = format!("{}:80", 8100 + i);
                strings(&[
                    "container",
                    "create",
                    &old[usize::from(i)],
                    "--network",
                    "n",
                    "-p",
                    &port,
                ])
            })
            .collect::<Vec<_>>(),
    );
    let per_container =
        [ENDPOINTS_MAP, VETHS_MAP].map(|m| map_entries(&env, m) / usize::from(2 * N));
    let per_port = map_entries(&env, PUBLISHED_MAP) / usize::from(2 * N);
    assert!(
        per_container.iter().all(|&e| e > 0) && per_port > 0,
        "no map entries"
    );

    // At once: the first half removed, as many created, the second half publishing one more.
    let (gone, kept) = old.split_at(usize::from(N));
    let mut commands: Vec<Vec<String>> = gone
        .iter()
        .map(|c| strings(&["container", "rm", c]))
        .collect();
    for (i, c) in (0u16..).zip(&new) {
        let port = format!("{}:80", 8200 + i);
        commands.push(strings(&[
            "container",
            "create",
            c,
            "--network",
            "n",
            "-p",
            &port,
        ]));
    }
    for (i, c) in (0u16..).zip(kept) {
        commands.push(strings(&["publish", c, "-p", &format!("{}:81", 8300 + i)]));
    }
    all_at_once(&env, &commands);

    let listed: HashSet<String> = env
        .netd_json(&["container", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    let expected: HashSet<String> = kept.iter().chain(&new).cloned().collect();
    assert_eq!(listed, expected);
    let ips: HashSet<String> = expected.iter().map(|c| ip_of(&env, c)).collect();
    assert_eq!(ips.len(), expected.len(), "an address handed out twice");
    for (i, c) in (0u16..).zip(kept) {
        assert_eq!(
            env.netd_ok(&["port", c]),
            format!(
                "80/tcp -> 0.0.0.0:{}\n81/tcp -> 0.0.0.0:{}\n",
                8100 + N + i,
                8300 + i
            )
        );
    }
    // Nothing of the removed ones is left: namespaces, veths, map entries, ports.
    assert!(
        gone.iter().all(|c| !netns::exists(c)),
        "a removed namespace is left"
    );
    assert_eq!(bridge_ports(&env, "brcc"), expected.len());
    assert_eq!(
        [ENDPOINTS_MAP, VETHS_MAP].map(|m| map_entries(&env, m)),
        per_container.map(|e| e * expected.len())
    );
    assert_eq!(
        map_entries(&env, PUBLISHED_MAP),
        per_port * usize::from(3 * N)
    );
    assert_eq!(
        connect_error(&env, &env.outside_ns(), addr("198.18.0.2", 8100)),
        std::io::ErrorKind::ConnectionRefused,
        "a removed container's port still answers"
    );
    // And what was made works: a new container's port, a kept one's new port.
    for (c, port, cport) in [(&new[0], 8200, 80), (&kept[0], 8300, 81)] {
        let server = echo_server(&ns(c), cport);
        assert_eq!(
            tcp_echo(&env.outside_ns(), addr("198.18.0.2", port)).unwrap(),
            "netd"
        );
        server.join().unwrap();
    }
}

/// What a failed command must leave exactly as it was.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    namespaces: Vec<String>,
    host_links: Vec<String>,
    state: String,
}

fn snapshot(env: &TestEnv) -> Snapshot {
    Snapshot {
        namespaces: namespaces(env),
        host_links: host_links(env),
        state: netd_state(env),
    }
}

#[test]
fn bad_input_is_refused_in_one_line_and_leaves_nothing() {
    let env = TestEnv::new();
    let (c1, c2, bad) = (env.name("c1"), env.name("c2"), env.name("bad"));
    env.netd_ok(&["network", "create", "n", "--subnet", "10.97.0.0/24"]);
    env.netd_ok(&[
        "network",
        "create",
        "tiny",
        "--subnet",
        "10.98.0.0/29",
        "--ip-range",
        "10.98.0.0/30",
    ]);
    env.netd_ok(&[
        "container",
        "create",
        &c1,
        "--network",
        "n",
        "--ip",
        "10.97.0.5",
        "-p",
        "8080:80",
    ]);
    env.netd_ok(&["container", "create", &c2, "--network", "tiny"]);
    let long_bridge = "b23456789012345x";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["network", "create", "x", "--subnet", "10.99.0.0/33"],
            "10.99.0.0/33",
        ),
        (
            vec!["network", "create", "x", "--subnet", "banana"],
            "banana",
        ),
        (
            vec!["network", "create", "x", "--subnet", "10.97.0.128/25"],
            "overlaps",
        ),
        (
            vec!["network", "create", "x", "--subnet", "198.18.0.0/16"],
            "in use on the host",
        ),
        (
            vec![
                "network",
                "create",
                "x",
                "--subnet",
                "10.99.0.0/24",
                "--gateway",
                "10.100.0.1",
            ],
            "10.100.0.1",
        ),
        (
            vec![
                "network",
                "create",
                "x",
                "--subnet",
                "10.99.0.0/24",
                "--ip-range",
                "10.99.1.0/25",
            ],
            "10.99.1.0/25",
        ),
        (
            vec!["network", "create", "n", "--subnet", "10.99.0.0/24"],
            "already exists",
        ),
        (
            vec![
                "network",
                "create",
                "x",
                "--subnet",
                "10.99.0.0/24",
                "--bridge",
                long_bridge,
            ],
            long_bridge,
        ),
        (vec!["network", "rm", "n"], "has containers"),
        (vec!["network", "rm", "nosuch"], "nosuch"),
        (
            vec!["container", "create", &bad, "--network", "nosuch"],
            "nosuch",
        ),
        (
            vec!["container", "create", &c1, "--network", "n"],
            "already exists",
        ),
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "--ip",
                "10.96.0.9",
            ],
            "10.96.0.9",
        ),
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "--ip",
                "10.97.0.5",
            ],
            "already in use",
        ),
        (
            vec!["container", "create", &bad, "--network", "tiny"],
            "exhausted",
        ),
        (
            vec!["container", "create", &bad, "--network", "n", "-p", "0:80"],
            "0:80",
        ),
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "-p",
                "8081:70000",
            ],
            "70000",
        ),
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "-p",
                "8000-8002:80-81",
            ],
            "different lengths",
        ),
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "-p",
                "8082:80/sctp",
            ],
            "sctp",
        ),
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "-p",
                "8080:81",
            ],
            "8080/tcp is already published",
        ),
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "--pid",
                "999999999",
            ],
            "999999999",
        ),
        (
            vec!["container", "create", "bad/name", "--network", "n"],
            "bad/name",
        ),
        (vec!["container", "rm", "nosuch"], "nosuch"),
        (
            vec![
                "--datapath",
                "nosuch",
                "network",
                "create",
                "x",
                "--subnet",
                "10.99.0.0/24",
            ],
            "nosuch",
        ),
        // Names that name modes, and text that would become lines of the container's /etc
        // files.
        (
            vec!["network", "create", "none", "--subnet", "10.99.0.0/24"],
            "reserved",
        ),
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "--dns-search",
                "x\nnameserver 6.6.6.6",
            ],
            "--dns-search",
        ),
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "--add-host",
                "a b:9.9.9.9",
            ],
            "--add-host",
        ),
        (
            vec!["container", "create", &bad, "--hostname", "bad host!"],
            "--hostname",
        ),
        // Usage errors: clap's message alone, on one line.
        (vec!["network", "create", "x", "--mtu", "-1"], "'-1'"),
        (
            vec!["network", "create", "x", "--gateway", "10.1.0.1x"],
            "10.1.0.1x",
        ),
        (
            vec!["--conntrack-max", "0", "network", "create", "x"],
            "2..=16777216",
        ),
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "none",
                "--publish-allow",
                "10.0.0.0/8",
            ],
            "--publish-allow",
        ),
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "--mac",
                "00:00:00:00:00:00",
            ],
            "all zero",
        ),
        // Ports on an address the host doesn't have (TEST-NET-1).
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "-p",
                "192.0.2.7:8081:80",
            ],
            "publishing on 192.0.2.7: not an address of the host",
        ),
        (
            vec!["publish", &c1, "-p", "192.0.2.7:8082:80"],
            "publishing on 192.0.2.7: not an address of the host",
        ),
        (
            vec![
                "network",
                "create",
                "x",
                "--subnet",
                "10.99.0.0/24",
                "--host-ip",
                "192.0.2.7",
            ],
            "publishing on 192.0.2.7: not an address of the host",
        ),
        // c1's MAC, derived from 10.97.0.5; the bridge's, from the gateway.
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "--mac",
                "02:42:0a:61:00:05",
            ],
            "is taken on network",
        ),
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "--mac",
                "02:42:0a:61:00:01",
            ],
            "bridge's",
        ),
        (
            vec!["network", "create", "x", "--subnet", "169.254.0.0/16"],
            "overlaps 169.254.0.0/16",
        ),
        (
            vec![
                "network",
                "create",
                "x",
                "--subnet",
                "10.99.0.0/24",
                "--ip-range",
                "10.99.0.5/25",
            ],
            "host bits set",
        ),
        (
            vec![
                "container",
                "create",
                &bad,
                "--network",
                "n",
                "-p",
                "8081:80",
                "--publish-allow",
                "10.0.0.5/8",
            ],
            "host bits set",
        ),
    ];
    for (args, needle) in cases {
        let before = snapshot(&env);
        let err = env.netd_err(&args);
        assert!(
            err.contains(needle),
            "netd {args:?}: {err:?} should name {needle:?}"
        );
        assert_eq!(
            snapshot(&env),
            before,
            "netd {args:?} left something behind"
        );
    }
}

#[test]
fn a_create_killed_midway_is_cleaned_up_by_the_next_command() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.99.0.0/24"]);
    let victim = env.name("victim");
    let mut child = env
        .netd_cmd(&[
            "container",
            "create",
            &victim,
            "--network",
            "n",
            "--ip",
            "10.99.0.7",
        ])
        .env("NETD_TEST_PAUSE_AFTER", "container-veth")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "paused after container-veth");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    // It left a namespace and a veth behind...
    assert!(netns::exists(&victim));
    let links =
        || String::from_utf8(env.run_in(&env.host_ns(), "ip", &["-o", "link"]).stdout).unwrap();
    assert!(links().contains("veth"));
    // ...which the next command removes, releasing the address.
    let out = env.netd_ok(&["gc"]);
    assert!(out.contains(&victim), "{out}");
    assert!(!netns::exists(&victim));
    assert!(!links().contains("veth"), "{}", links());
    let again = env.name("again");
    env.netd_ok(&[
        "container",
        "create",
        &again,
        "--network",
        "n",
        "--ip",
        "10.99.0.7",
    ]);
}

#[test]
fn listings_have_tables_and_json() {
    let env = TestEnv::new();
    let c = env.name("ls");
    env.netd_ok(&["container", "create", &c, "-p", "9090:90"]);
    let table = env.netd_ok(&["container", "ls"]);
    assert!(
        table.starts_with("NAME")
            && table.contains(&c)
            && table.contains("running")
            && table.contains("90/tcp -> 0.0.0.0:9090"),
        "{table}"
    );
    let nets = env.netd_ok(&["network", "ls"]);
    assert!(
        nets.contains("bridge") && nets.contains("netd0") && nets.contains("172.17.0.0/16"),
        "{nets}"
    );
    let json = env.netd_json(&["network", "ls", "--json"]);
    assert_eq!(json[0]["name"], "bridge");
    assert_eq!(
        json[0]["containers"], 1,
        "the table's CONTAINERS column: {json}"
    );
}

#[test]
fn publish_adds_ports_to_a_running_container() {
    let env = TestEnv::new();
    let (c, other) = (env.name("pub"), env.name("other"));
    env.netd_ok(&["container", "create", &c, "-p", "8080:80"]);
    env.netd_ok(&["container", "create", &other]);
    assert_eq!(
        env.netd_ok(&["publish", &c, "-p", "8081:81"]),
        "81/tcp -> 0.0.0.0:8081\n"
    );
    let server = echo_server(&ns(&c), 81);
    assert_eq!(
        tcp_echo(&env.outside_ns(), addr("198.18.0.2", 8081)).unwrap(),
        "netd"
    );
    server.join().unwrap();
    let err = env.netd_err(&["publish", &other, "-p", "8081:90"]);
    assert!(err.contains("8081/tcp is already published"), "{err}");
    assert_eq!(
        env.netd_ok(&["port", &c]),
        "80/tcp -> 0.0.0.0:8080\n81/tcp -> 0.0.0.0:8081\n"
    );
}

/// Two containers using the same source port towards one server both get through with
/// distinct translated ports, and an ICMP port-unreachable about a translated flow reaches
/// the container; the same test runs on both datapaths.
fn nat_ports_and_icmp_errors(datapath: &str) {
    use std::net::UdpSocket;
    let env = TestEnv::new();
    env.netd_ok(&[
        "--datapath",
        datapath,
        "network",
        "create",
        "n",
        "--subnet",
        "10.87.0.0/24",
    ]);
    let names = [env.name("u1"), env.name("u2")];
    for n in &names {
        env.netd_ok(&["container", "create", n, "--network", "n"]);
    }
    let server = env.in_ns(&env.outside_ns(), || {
        UdpSocket::bind((OUTSIDE_ADDR, 5300)).unwrap()
    });
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut peers = Vec::new();
    for n in &names {
        let sock = env.in_ns(&ns(n), || UdpSocket::bind("0.0.0.0:40000").unwrap());
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        sock.send_to(b"hi", (OUTSIDE_ADDR, 5300)).unwrap();
        let mut buf = [0u8; 8];
        let (_, peer) = retry_interrupted(|| server.recv_from(&mut buf)).unwrap();
        server.send_to(b"back", peer).unwrap();
        let (len, _) = retry_interrupted(|| sock.recv_from(&mut buf)).unwrap();
        assert_eq!(&buf[..len], b"back");
        peers.push(peer);
    }
    assert!(
        peers
            .iter()
            .all(|p| p.ip() == std::net::IpAddr::V4("198.18.0.2".parse().unwrap())),
        "{peers:?}"
    );
    assert_ne!(
        peers[0].port(),
        peers[1].port(),
        "two flows shared a translated port"
    );

    // Nothing listens on 5301: the outside's port unreachable must come back to the container.
    let refused = env.in_ns(&ns(&names[0]), || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.connect((OUTSIDE_ADDR, 5301)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        sock.send(b"anyone?").unwrap();
        retry_interrupted(|| sock.recv(&mut [0u8; 8]))
            .unwrap_err()
            .kind()
    });
    assert_eq!(refused, std::io::ErrorKind::ConnectionRefused);
}

#[test]
fn nat_ports_and_icmp_errors_ebpf() {
    nat_ports_and_icmp_errors("ebpf");
}

#[test]
fn nat_ports_and_icmp_errors_iptables() {
    nat_ports_and_icmp_errors("iptables");
}

#[test]
fn conntrack_size_and_timeouts_are_configurable() {
    let env = TestEnv::new();
    let c = env.name("ct");
    let tuning = ["--conntrack-max", "4096", "--conntrack-timeout", "udp=1"];
    env.netd_ok(
        &[
            &tuning[..],
            &["network", "create", "n", "--subnet", "10.86.0.0/24"],
        ]
        .concat(),
    );
    env.netd_ok(&["container", "create", &c, "--network", "n"]);
    let map = env.bpffs.join("maps/CONNTRACK");
    let shown = String::from_utf8(
        std::process::Command::new("bpftool")
            .args(["map", "show", "pinned"])
            .arg(&map)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(shown.contains("max_entries 4096"), "{shown}");

    env.in_ns(&ns(&c), || {
        std::net::UdpSocket::bind("0.0.0.0:0")
            .unwrap()
            .send_to(b"x", (OUTSIDE_ADDR, 5400))
            .unwrap();
    });
    let flows = env.netd_json(&["conntrack", "ls", "--json"]);
    assert_eq!(flows.as_array().unwrap().len(), 1, "{flows}");
    std::thread::sleep(Duration::from_millis(2500));
    // Timed out after 1 s: hidden from listings at once, its two entries removed by a sweep
    // once idle twice that (until then a new flow with its tuple could take them over).
    assert_eq!(tests::cli::flows(&env), Vec::<serde_json::Value>::new());
    assert_eq!(tests::cli::conntrack_entries(&env), 2);
    assert_eq!(
        env.netd_ok(&["conntrack", "sweep"]),
        "2 expired entries removed\n"
    );
    assert_eq!(tests::cli::conntrack_entries(&env), 0);

    let err = env.netd_err(&["--conntrack-timeout", "tcp_forever=1", "network", "ls"]);
    assert!(err.contains("tcp_forever"), "{err}");
}

#[test]
fn a_full_conntrack_table_makes_room_for_new_flows() {
    use std::net::UdpSocket;
    const FLOWS: usize = 100;
    let env = TestEnv::new();
    // 64 entries: 32 flows.
    env.netd_ok(&[
        "--conntrack-max",
        "64",
        "network",
        "create",
        "n",
        "--subnet",
        "10.68.0.0/24",
    ]);
    let c = env.name("many");
    env.netd_ok(&["container", "create", &c, "--network", "n"]);
    let server = env.in_ns(&env.outside_ns(), || {
        UdpSocket::bind((OUTSIDE_ADDR, 5500)).unwrap()
    });
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let echo = std::thread::spawn(move || {
        for _ in 0..FLOWS {
            let mut buf = [0u8; 8];
            let (n, peer) = retry_interrupted(|| server.recv_from(&mut buf)).unwrap();
            server.send_to(&buf[..n], peer).unwrap();
        }
    });
    // Each from a socket of its own (a new flow), each answered through its translation.
    // The sockets stay open, so no flow's source port is taken again by a later one.
    let sockets: Vec<UdpSocket> = (0..FLOWS)
        .map(|i| {
            env.in_ns(&ns(&c), || {
                let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                sock.send_to(&i.to_be_bytes(), (OUTSIDE_ADDR, 5500))
                    .unwrap();
                let mut buf = [0u8; 8];
                let (n, _) = retry_interrupted(|| sock.recv_from(&mut buf))
                    .unwrap_or_else(|e| panic!("flow {i} got no answer: {e}"));
                assert_eq!(buf[..n], i.to_be_bytes());
                sock
            })
        })
        .collect();
    let newest = sockets[FLOWS - 1].local_addr().unwrap().port();
    echo.join().unwrap();
    let stats = env.netd_json(&["stats", "--json"]);
    let count = |reason: &str| {
        stats["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["reason"] == reason)
            .unwrap()["packets"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(count("snat_new"), FLOWS as u64);
    assert_eq!(count("conntrack_full"), 0, "a new flow was refused");
    // Older flows made room for the newest (which ones the kernel's LRU picks is its own).
    let live: Vec<u64> = tests::cli::flows(&env)
        .iter()
        .map(|f| f["original"]["sport"].as_u64().unwrap())
        .collect();
    assert!(live.contains(&u64::from(newest)), "the newest flow is gone");
}

#[test]
fn datapath_commands_before_any_network_say_so_and_make_nothing() {
    let env = TestEnv::new();
    for args in [
        &["reload"][..],
        &["stats"],
        &["conntrack", "ls"],
        &["conntrack", "flush"],
    ] {
        let err = env.netd_err(args);
        assert!(err.contains("no eBPF datapath"), "{args:?}: {err}");
    }
    assert!(
        !env.bpffs.join("maps").exists(),
        "a command that found no datapath made its pins"
    );
}
