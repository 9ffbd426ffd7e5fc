//! Real traffic through the eBPF datapath attached to the sandbox's uplink: containers on a
//! bridge reach the outside namespace masqueraded as the host, and the outside reaches them
//! through published ports, with no netfilter rule and no kernel conntrack involved.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    thread,
    time::Duration,
};

use netd::datapath::Protocol;
use netd_common::datapath::HOST_SOCK_PROGS;
use tests::{
    harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv, UPLINK, bound_connect},
    netdata::{port, port as port_spec},
    topology::{
        TestCgroup, connect_from_cgroup, containers, containers_with, datapath_in,
        disable_tx_checksum_offload, publish, udp_from_cgroup,
    },
    traffic::{nstat, output_in, retry_interrupted, stat},
};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts `count` connections on `listener`; each sends data and half-closes, and gets its
/// data back. Returns each connection's peer address.
fn tcp_echo_server(listener: TcpListener, count: usize) -> thread::JoinHandle<Vec<SocketAddr>> {
    thread::spawn(move || {
        (0..count)
            .map(|_| {
                let (mut conn, peer) = listener.accept().unwrap();
                conn.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut data = Vec::new();
                conn.read_to_end(&mut data).unwrap();
                conn.write_all(&data).unwrap();
                peer
            })
            .collect()
    })
}

/// Connects to `server` (from `bind` when given), sends `data`, half-closes and returns what
/// came back.
fn tcp_round_trip(server: SocketAddr, bind: Option<SocketAddr>, data: &[u8]) -> Vec<u8> {
    let stream = match bind {
        None => TcpStream::connect_timeout(&server, TIMEOUT).unwrap(),
        Some(local) => {
            // std has no bind-before-connect: go through a socket2-free route with nix.
            bound_connect(local, server)
        }
    };
    let mut stream = stream;
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(data).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).unwrap();
    back
}

/// Some bytes that aren't all alike, so a mangled segment shows.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn udp_bound_in(env: &TestEnv, ns: &Path, addr: SocketAddr) -> UdpSocket {
    let sock = env.in_ns(ns, || UdpSocket::bind(addr).unwrap());
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    sock
}

fn ping(env: &TestEnv, ns: &Path, dst: Ipv4Addr, count: u32) {
    let out = env.run_in(
        ns,
        "ping",
        &[
            "-c",
            &count.to_string(),
            "-i",
            "0.1",
            "-W",
            "2",
            &dst.to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "ping {dst}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn masquerade_tcp_udp_and_ping_reach_the_outside_as_the_host() {
    let env = TestEnv::new();
    let c = &containers(&env, 1)[0];

    // TCP: 4 MiB each way, so segments are GSO/GRO-sized; the server sees the host address.
    let listener = env.in_ns(&env.outside_ns(), || {
        TcpListener::bind((OUTSIDE_ADDR, 9000)).unwrap()
    });
    let server = tcp_echo_server(listener, 1);
    let data = payload(4 << 20);
    let back = env.in_ns(&c.ns, || {
        tcp_round_trip((OUTSIDE_ADDR, 9000).into(), None, &data)
    });
    assert!(back == data, "TCP data came back changed");
    assert_eq!(server.join().unwrap()[0].ip(), HOST_ADDR);

    // UDP.
    let server = udp_bound_in(&env, &env.outside_ns(), (OUTSIDE_ADDR, 9001).into());
    let client = udp_bound_in(&env, &c.ns, (Ipv4Addr::UNSPECIFIED, 0).into());
    client.send_to(b"question", (OUTSIDE_ADDR, 9001)).unwrap();
    let mut buf = [0u8; 64];
    let (n, peer) = retry_interrupted(|| server.recv_from(&mut buf)).unwrap();
    assert_eq!((&buf[..n], peer.ip()), (&b"question"[..], HOST_ADDR.into()));
    server.send_to(b"answer", peer).unwrap();
    let (n, from) = retry_interrupted(|| client.recv_from(&mut buf)).unwrap();
    assert_eq!(
        (&buf[..n], from),
        (&b"answer"[..], SocketAddr::from((OUTSIDE_ADDR, 9001)))
    );

    // ICMP echo.
    ping(&env, &c.ns, OUTSIDE_ADDR, 3);

    // The flows as `netd conntrack ls` shows them, then gone after a flush.
    let flows = env.netd_json(&["conntrack", "ls", "--json"]);
    let flows = flows.as_array().unwrap();
    for proto in ["tcp", "udp", "icmp"] {
        let flow = flows
            .iter()
            .find(|f| f["proto"] == proto)
            .unwrap_or_else(|| panic!("no {proto} flow: {flows:?}"));
        assert_eq!(flow["nat"], "snat");
        assert_eq!(flow["original"]["src"], c.ip.to_string());
        assert_eq!(flow["reply"]["dst"], HOST_ADDR.to_string());
        assert!(flow["reply"]["packets"].as_u64().unwrap() > 0, "{flow}");
    }
    let tcp = flows.iter().find(|f| f["proto"] == "tcp").unwrap();
    assert!(
        tcp["original"]["bytes"].as_u64().unwrap() > 4 << 20,
        "{tcp}"
    );
    assert!(
        ["FIN_WAIT", "TIME_WAIT"].contains(&tcp["state"].as_str().unwrap()),
        "{tcp}"
    );
    assert_eq!(stat(&env, "snat_new"), 3);
    assert_eq!(
        stat(&env, "port_exhausted") + stat(&env, "conntrack_full") + stat(&env, "rewrite_failed"),
        0
    );
    // The tables for people name the same things.
    let table = env.netd_ok(&["conntrack", "ls"]);
    assert!(
        table.contains("tcp snat") && table.contains(&format!("src={}", c.ip)),
        "{table}"
    );
    let stats_table = env.netd_ok(&["stats"]);
    assert!(
        stats_table
            .lines()
            .any(|l| l.starts_with("snat_new") && l.ends_with(" 3")),
        "{stats_table}"
    );
    env.netd_ok(&["conntrack", "flush"]);
    assert_eq!(
        env.netd_json(&["conntrack", "ls", "--json"]),
        serde_json::json!([])
    );
}

#[test]
fn two_containers_with_the_same_source_port_to_the_same_server_both_work() {
    let env = TestEnv::new();
    let cs = containers(&env, 2);
    let listener = env.in_ns(&env.outside_ns(), || {
        TcpListener::bind((OUTSIDE_ADDR, 9000)).unwrap()
    });
    let server = tcp_echo_server(listener, 2);
    for (i, c) in cs.iter().enumerate() {
        let msg = format!("from container {i}");
        let back = env.in_ns(&c.ns, || {
            tcp_round_trip(
                (OUTSIDE_ADDR, 9000).into(),
                // In the NAT range (below the ephemeral ports), so it may be kept.
                Some((c.ip, 20000).into()),
                msg.as_bytes(),
            )
        });
        assert_eq!(back, msg.as_bytes());
    }
    let peers = server.join().unwrap();
    assert!(peers.iter().all(|p| p.ip() == HOST_ADDR), "{peers:?}");
    assert_ne!(
        peers[0].port(),
        peers[1].port(),
        "two flows shared a translated port: {peers:?}"
    );
    assert!(
        peers.iter().any(|p| p.port() == 20000),
        "the first flow keeps its port: {peers:?}"
    );
}

#[test]
fn published_ports_reach_containers_and_replies_leave_from_the_published_address() {
    let env = TestEnv::new();
    let cs = containers(&env, 2);
    publish(
        &env,
        &[
            port(Protocol::Tcp, None, 8080, cs[0].ip, 80),
            port(Protocol::Udp, Some(HOST_ADDR), 5353, cs[1].ip, 53),
        ],
    );

    // TCP to any host address: a connect() only completes when the SYN-ACK comes from the
    // address and port it was sent to.
    let listener = env.in_ns(&cs[0].ns, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, 80)).unwrap()
    });
    let server = tcp_echo_server(listener, 1);
    let data = payload(1 << 20);
    let back = env.in_ns(&env.outside_ns(), || {
        tcp_round_trip((HOST_ADDR, 8080).into(), None, &data)
    });
    assert!(back == data, "TCP data came back changed");
    // Like Docker: the container sees the real client.
    assert_eq!(server.join().unwrap()[0].ip(), OUTSIDE_ADDR);

    // UDP to the bound address.
    let server = udp_bound_in(&env, &cs[1].ns, (Ipv4Addr::UNSPECIFIED, 53).into());
    let client = udp_bound_in(&env, &env.outside_ns(), (OUTSIDE_ADDR, 0).into());
    client.send_to(b"query", (HOST_ADDR, 5353)).unwrap();
    let mut buf = [0u8; 64];
    let (n, peer) = retry_interrupted(|| server.recv_from(&mut buf)).unwrap();
    assert_eq!((&buf[..n], peer.ip()), (&b"query"[..], OUTSIDE_ADDR.into()));
    server.send_to(b"response", peer).unwrap();
    let (n, from) = retry_interrupted(|| client.recv_from(&mut buf)).unwrap();
    assert_eq!(
        (&buf[..n], from),
        (&b"response"[..], SocketAddr::from((HOST_ADDR, 5353)))
    );

    // Unpublished: the host answers for itself (a refused connection).
    let refused = env.in_ns(&env.outside_ns(), || {
        TcpStream::connect_timeout(&(HOST_ADDR, 8081).into(), TIMEOUT)
    });
    assert_eq!(
        refused.map(drop).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the host's own stack answers for an unpublished port"
    );
}

fn kernel_conntrack_count(env: &TestEnv) -> u64 {
    output_in(&env.host_ns(), "conntrack", &["-C"])
        .trim()
        .parse()
        .unwrap()
}

/// The checksum error counters of `nstat` in `ns` that are not zero.
fn checksum_errors(ns: &Path) -> Vec<String> {
    output_in(ns, "nstat", &["-azs"])
        .lines()
        .filter(|l| l.contains("CsumErr"))
        .filter(|l| l.split_whitespace().nth(1) != Some("0"))
        .map(str::to_string)
        .collect()
}

#[test]
fn no_netfilter_rule_no_kernel_conntrack_and_no_checksum_error() {
    let env = TestEnv::new();
    let cs = containers(&env, 2);
    publish(&env, &[port(Protocol::Tcp, None, 8080, cs[1].ip, 80)]);
    let before = kernel_conntrack_count(&env);
    // Checksums left for offload (CHECKSUM_PARTIAL) are computed in software when they leave
    // the uplink and the containers' veths, so the receivers check what the datapath wrote.
    for ifname in [UPLINK, "vc0", "vc1"] {
        disable_tx_checksum_offload(&env, &env.host_ns(), ifname);
    }

    let listener = env.in_ns(&env.outside_ns(), || {
        TcpListener::bind((OUTSIDE_ADDR, 9000)).unwrap()
    });
    let server = tcp_echo_server(listener, 1);
    let data = payload(2 << 20);
    assert!(
        env.in_ns(&cs[0].ns, || tcp_round_trip(
            (OUTSIDE_ADDR, 9000).into(),
            None,
            &data
        )) == data
    );
    server.join().unwrap();
    let listener = env.in_ns(&cs[1].ns, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, 80)).unwrap()
    });
    let server = tcp_echo_server(listener, 1);
    assert!(
        env.in_ns(&env.outside_ns(), || tcp_round_trip(
            (HOST_ADDR, 8080).into(),
            None,
            &data
        )) == data
    );
    server.join().unwrap();
    let server = udp_bound_in(&env, &env.outside_ns(), (OUTSIDE_ADDR, 9001).into());
    let client = udp_bound_in(&env, &cs[0].ns, (Ipv4Addr::UNSPECIFIED, 0).into());
    for _ in 0..10 {
        client
            .send_to(&payload(1000), (OUTSIDE_ADDR, 9001))
            .unwrap();
        let mut buf = [0u8; 2000];
        let (n, peer) = retry_interrupted(|| server.recv_from(&mut buf)).unwrap();
        server.send_to(&buf[..n], peer).unwrap();
        retry_interrupted(|| client.recv_from(&mut buf)).unwrap();
    }
    ping(&env, &cs[0].ns, OUTSIDE_ADDR, 2);

    let host = env.host_ns();
    let iptables = output_in(&host, "iptables-save", &[]);
    assert!(
        !iptables.lines().any(|l| l.starts_with("-A")),
        "iptables rules in the host namespace:\n{iptables}"
    );
    let ip6tables = output_in(&host, "ip6tables-save", &[]);
    assert!(
        !ip6tables.lines().any(|l| l.starts_with("-A")),
        "ip6tables rules:\n{ip6tables}"
    );
    let nft = output_in(&host, "nft", &["list", "ruleset"]);
    assert!(
        nft.trim().is_empty(),
        "nftables ruleset in the host namespace:\n{nft}"
    );
    assert_eq!(
        kernel_conntrack_count(&env),
        before,
        "the kernel conntrack table grew"
    );
    for ns in [
        env.host_ns(),
        env.outside_ns(),
        cs[0].ns.clone(),
        cs[1].ns.clone(),
    ] {
        assert_eq!(
            checksum_errors(&ns),
            Vec::<String>::new(),
            "in {}",
            ns.display()
        );
    }
}

#[test]
fn icmp_errors_about_masqueraded_flows_reach_the_container() {
    let env = TestEnv::new();
    let c = &containers(&env, 1)[0];

    // Port unreachable: a connected UDP socket learns of it as ECONNREFUSED.
    let sock = env.in_ns(&c.ns, || {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap()
    });
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    sock.connect((OUTSIDE_ADDR, 9999)).unwrap();
    sock.send(b"anyone there?").unwrap();
    let err = retry_interrupted(|| sock.recv(&mut [0u8; 64])).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    // The outside namespace becomes a router towards 198.19.0.0/16 (back through the host,
    // on a path with MTU 1000), so it answers about masqueraded packets with TTL exceeded and
    // fragmentation needed.
    let out = env.outside_ns();
    netd::netlink::set_sysctl(Some(&out), "net.ipv4.ip_forward", "1").unwrap();
    tests::topology::ip_in(
        &env,
        &out,
        &[
            "route",
            "add",
            "198.19.0.0/16",
            "via",
            &HOST_ADDR.to_string(),
            "mtu",
            "lock",
            "1000",
        ],
    );
    let far = "198.19.0.1";
    let traced = env.run_in(&c.ns, "ping", &["-n", "-c", "1", "-t", "2", "-W", "2", far]);
    let text = String::from_utf8_lossy(&traced.stdout);
    assert!(
        text.contains(&format!("From {OUTSIDE_ADDR}")) && text.contains("Time to live exceeded"),
        "{text}"
    );

    let big = env.run_in(
        &c.ns,
        "ping",
        &["-n", "-c", "1", "-M", "do", "-s", "1200", "-W", "2", far],
    );
    let text = String::from_utf8_lossy(&big.stdout);
    assert!(
        text.contains("Frag needed") || text.contains("mtu = 1000"),
        "{text}"
    );
    // Path MTU discovery worked: the container's kernel now knows the path's MTU.
    let route = output_in(&c.ns, "ip", &["route", "get", far]);
    assert!(route.contains("mtu 1000"), "{route}");
    assert_eq!(
        stat(&env, "icmp_error"),
        3,
        "each error went through the datapath's translation"
    );
}

#[test]
fn a_thousand_concurrent_flows_from_ten_containers_to_one_server_port_all_complete() {
    const CONTAINERS: u8 = 10;
    const PER_CONTAINER: usize = 100;
    let env = TestEnv::new();
    let cs = containers(&env, CONTAINERS);
    let listener = env.in_ns(&env.outside_ns(), || {
        TcpListener::bind((OUTSIDE_ADDR, 9000)).unwrap()
    });
    let total = usize::from(CONTAINERS) * PER_CONTAINER;
    // The server answers each connection on its own thread and keeps it open until the client
    // closes, so all the flows are live at once.
    let server = thread::spawn(move || {
        let handlers: Vec<_> = (0..total)
            .map(|_| {
                let (mut conn, peer) = listener.accept().unwrap();
                thread::spawn(move || {
                    conn.set_read_timeout(Some(Duration::from_secs(30)))
                        .unwrap();
                    let mut id = [0u8; 8];
                    conn.read_exact(&mut id).unwrap();
                    conn.write_all(&id).unwrap();
                    conn.read_to_end(&mut Vec::new()).unwrap();
                    peer
                })
            })
            .collect();
        handlers
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    thread::scope(|s| {
        for (i, c) in cs.iter().enumerate() {
            let env = &env;
            s.spawn(move || {
                // Open them all first, then talk on each: every flow is open at the same time.
                let mut conns: Vec<TcpStream> = env.in_ns(&c.ns, || {
                    (0..PER_CONTAINER)
                        .map(|_| {
                            TcpStream::connect_timeout(&(OUTSIDE_ADDR, 9000).into(), TIMEOUT)
                                .unwrap()
                        })
                        .collect()
                });
                for (j, conn) in conns.iter_mut().enumerate() {
                    let id = ((i * PER_CONTAINER + j) as u64).to_be_bytes();
                    conn.set_read_timeout(Some(Duration::from_secs(30)))
                        .unwrap();
                    conn.write_all(&id).unwrap();
                    let mut back = [0u8; 8];
                    conn.read_exact(&mut back).unwrap();
                    assert_eq!(back, id);
                }
            });
        }
    });
    let live = env.netd_json(&["conntrack", "ls", "--json"]);
    let tcp_flows = live
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["proto"] == "tcp")
        .count();
    assert_eq!(tcp_flows, total, "every flow is tracked");
    let peers = server.join().unwrap();
    assert!(peers.iter().all(|p| p.ip() == HOST_ADDR));
    let ports: std::collections::HashSet<u16> = peers.iter().map(SocketAddr::port).collect();
    assert_eq!(
        ports.len(),
        total,
        "a translated port was used twice towards the same server"
    );
    assert_eq!(stat(&env, "port_exhausted"), 0);
}

#[test]
fn hairpin_containers_reach_published_ports_through_the_host_address() {
    let env = TestEnv::new();
    let cs = containers(&env, 2);
    publish(&env, &[port(Protocol::Tcp, None, 8080, cs[0].ip, 80)]);
    let listener = env.in_ns(&cs[0].ns, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, 80)).unwrap()
    });
    let server = tcp_echo_server(listener, 3);
    let data = payload(1 << 20);
    // Another container, and the published container itself, through the uplink address and
    // through the gateway address (both are the host's).
    for (c, host) in [
        (&cs[1], HOST_ADDR),
        (&cs[0], HOST_ADDR),
        (&cs[1], tests::netdata::GATEWAY),
    ] {
        let back = env.in_ns(&c.ns, || tcp_round_trip((host, 8080).into(), None, &data));
        assert!(
            back == data,
            "hairpin from {} via {host}: data came back changed",
            c.ip
        );
    }
    // Like Docker's hairpin MASQUERADE: the server sees the gateway.
    let peers = server.join().unwrap();
    assert!(
        peers.iter().all(|p| p.ip() == tests::netdata::GATEWAY),
        "{peers:?}"
    );
    assert_eq!(stat(&env, "hairpin_new"), 3);
    assert_eq!(stat(&env, "no_endpoint"), 0);
}

/// A TCP server on `addr` in `ns` answering one connection with `tag`.
fn tag_server(
    env: &TestEnv,
    ns: &Path,
    addr: SocketAddr,
    tag: &'static str,
) -> (SocketAddr, thread::JoinHandle<()>) {
    let listener = env.in_ns(ns, || TcpListener::bind(addr).unwrap());
    let bound = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        // Read what the client sends first, so closing doesn't reset the connection.
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        conn.read_to_end(&mut Vec::new()).unwrap();
        conn.write_all(tag.as_bytes()).unwrap();
    });
    (bound, server)
}

#[test]
fn host_processes_reach_published_ports_on_host_addresses_and_loopback_only_in_the_host() {
    let env = TestEnv::new();
    let cgroup = TestCgroup::new(&env);
    let c = &containers_with(&env, 1, Some(&cgroup.path))[0];
    // Any free port of the machine's own loopback, so the machine's namespace can be checked
    // without taking a port something else uses.
    let (machine, machine_server) = tag_server(
        &env,
        Path::new("/proc/self/ns/net"),
        (Ipv4Addr::LOCALHOST, 0).into(),
        "machine",
    );
    let port = machine.port();
    publish(
        &env,
        &[
            port_spec(Protocol::Tcp, None, port, c.ip, 80),
            port_spec(Protocol::Tcp, Some(Ipv4Addr::LOCALHOST), 8081, c.ip, 80),
            port_spec(Protocol::Udp, None, 5353, c.ip, 53),
        ],
    );

    let listener = env.in_ns(&c.ns, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, 80)).unwrap()
    });
    let server = tcp_echo_server(listener, 3);
    let host = env.host_ns();
    for addr in [
        (HOST_ADDR, port),
        (Ipv4Addr::LOCALHOST, port),
        (Ipv4Addr::LOCALHOST, 8081),
    ] {
        // Echoed by the container, and the peer is the address asked for.
        let expected = format!("hello {}:{}", addr.0, addr.1);
        assert_eq!(
            connect_from_cgroup(&cgroup, Some(&host), addr.into()),
            expected
        );
    }
    // The host connects directly from its bridge address: no NAT, no proxy.
    let peers = server.join().unwrap();
    assert!(
        peers.iter().all(|p| p.ip() == tests::netdata::GATEWAY),
        "{peers:?}"
    );

    // UDP without connect(): sent to the container, answered from the address asked for.
    let dns = udp_bound_in(&env, &c.ns, (Ipv4Addr::UNSPECIFIED, 53).into());
    let answers = thread::spawn(move || {
        for _ in 0..2 {
            let mut buf = [0u8; 64];
            let (n, peer) = retry_interrupted(|| dns.recv_from(&mut buf)).unwrap();
            dns.send_to(&buf[..n], peer).unwrap();
        }
    });
    for ip in [HOST_ADDR, Ipv4Addr::LOCALHOST] {
        let reply = udp_from_cgroup(&cgroup, Some(&host), (ip, 5353).into());
        assert_eq!(reply, format!("query {ip}:5353"));
    }
    answers.join().unwrap();

    // The same connect() in another namespace of the cgroup is left alone: the outside's own
    // loopback, and the machine's.
    let out = env.outside_ns();
    let (outside, outside_server) =
        tag_server(&env, &out, (Ipv4Addr::LOCALHOST, port).into(), "outside");
    assert_eq!(
        connect_from_cgroup(&cgroup, Some(&out), outside),
        format!("outside {outside}")
    );
    outside_server.join().unwrap();
    assert_eq!(
        connect_from_cgroup(&cgroup, None, machine),
        format!("machine {machine}")
    );
    machine_server.join().unwrap();
}

/// The ID of the program behind each of this instance's pinned links whose pin name ends
/// with `kind` (`ingress`/`egress`: TC, `cgroup`: the host's socket programs), by pin name,
/// and of the endpoint filter on each of `veths` (classic TC filters, which have no link).
fn attached_program_ids(env: &TestEnv, kind: &[&str], veths: &[String]) -> BTreeMap<String, u64> {
    let mut ids = BTreeMap::new();
    for link in std::fs::read_dir(env.bpffs.join("links")).unwrap() {
        let link = link.unwrap().path();
        if !kind
            .iter()
            .any(|k| link.to_string_lossy().ends_with(&format!("@{k}")))
        {
            continue;
        }
        let shown = output_in(
            &env.host_ns(),
            "bpftool",
            &["-j", "link", "show", "pinned", link.to_str().unwrap()],
        );
        let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
        let name = link.file_name().unwrap().to_string_lossy().into_owned();
        ids.insert(name, shown["prog_id"].as_u64().unwrap());
    }
    for veth in veths {
        for dir in TC {
            ids.insert(format!("{veth}@{dir}"), endpoint_filter_id(env, veth, dir));
        }
    }
    ids
}

/// The program ID of the endpoint filter on `veth`'s `dir` (ingress: what the container sends,
/// egress: what reaches it).
fn endpoint_filter_id(env: &TestEnv, veth: &str, dir: &str) -> u64 {
    let shown = output_in(
        &env.host_ns(),
        "tc",
        &["-j", "filter", "show", "dev", veth, dir],
    );
    let filters: serde_json::Value = serde_json::from_str(&shown).unwrap();
    filters
        .as_array()
        .unwrap()
        .iter()
        .find_map(|f| f["options"]["prog"]["id"].as_u64())
        .unwrap_or_else(|| panic!("no BPF filter on {veth}: {shown}"))
}

const TC: &[&str] = &["ingress", "egress"];

/// The bridge of the reload test's network.
const RELOAD_BRIDGE: &str = "brreload";

/// Every TC program of the reload test's instance, by attachment: the host-wide ones from
/// their link pins (TCX), or as classic filters (`NETD_ATTACH=clsact`, which have no link),
/// and the endpoint filters on `veths`.
fn tc_program_ids(env: &TestEnv, veths: &[String]) -> BTreeMap<String, u64> {
    let mut ids = attached_program_ids(env, TC, veths);
    if std::env::var("NETD_ATTACH").as_deref() == Ok("clsact") {
        for (dev, dir) in [
            (UPLINK, "ingress"),
            (UPLINK, "egress"),
            (RELOAD_BRIDGE, "ingress"),
        ] {
            ids.insert(format!("{dev}@{dir}"), endpoint_filter_id(env, dev, dir));
        }
    }
    ids
}

/// `reload` replaces the host's socket programs on the cgroup (`host_connect4` and the rest)
/// too: an upgrade leaves no old build redirecting host connections. From a build that had
/// only the IPv4 ones, it attaches the IPv6 ones.
#[test]
fn reload_replaces_the_host_socket_programs_too() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.78.0.0/24"]);
    let mut before = attached_program_ids(&env, &["cgroup"], &[]);
    assert_eq!(before.len(), HOST_SOCK_PROGS.len(), "{before:?}");
    // As an older build left the cgroup: its links unpinned, they are gone.
    let ipv6_ones: Vec<String> = before
        .keys()
        .filter(|link| link.contains('6'))
        .cloned()
        .collect();
    assert_eq!(ipv6_ones.len(), 4, "{ipv6_ones:?}");
    for link in &ipv6_ones {
        std::fs::remove_file(env.bpffs.join("links").join(link)).unwrap();
        before.remove(link);
    }
    env.netd_ok(&["reload"]);
    let after = attached_program_ids(&env, &["cgroup"], &[]);
    assert_eq!(after.len(), HOST_SOCK_PROGS.len(), "{after:?}");
    for (attachment, id) in &before {
        assert_ne!(*id, after[attachment], "reload kept {attachment}'s program");
    }
}

#[test]
fn reload_replaces_every_program_under_a_running_flow_and_new_containers_get_the_new_one() {
    use tests::cli::{create, pings};
    let env = TestEnv::new();
    env.netd_ok(&[
        "network",
        "create",
        "n",
        "--subnet",
        "10.79.0.0/24",
        "--bridge",
        RELOAD_BRIDGE,
    ]);
    let srv = create(&env, "srv", &["--network", "n", "-p", "8080:5201"]);
    env.spawn_in(&srv.ns, "iperf3", &["-s", "-1", "-p", "5201"]);
    netd::netns::wait_tcp_listener(&srv.ns, 5201, TIMEOUT).unwrap();
    let flow = tests::flow::Flow::start(&env, HOST_ADDR.into(), 8080);
    let veth_of = |name: &str| {
        env.netd_json(&["container", "inspect", name])["host_veth"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let veths = [veth_of(&srv.name)];
    flow.assert_moving(&env, TIMEOUT, "before any reload");
    let mut ids = tc_program_ids(&env, &veths);
    // Uplink ingress and egress, bridge ingress, the container's veth ingress and egress.
    assert_eq!(ids.len(), 5, "{ids:?}");
    // An upgrade, three times over, while the flow runs: every program is a new one each
    // time, and the flow carries on through the new ones.
    for round in 0..3 {
        let out = env.netd_ok(&["reload"]);
        // Uplink ingress and egress, bridge ingress, the veth's ingress and egress, and the
        // host's eight socket programs (four per family).
        assert!(out.contains("13 programs replaced"), "{out}");
        let now = tc_program_ids(&env, &veths);
        assert_eq!(
            now.keys().collect::<Vec<_>>(),
            ids.keys().collect::<Vec<_>>()
        );
        for (attachment, id) in &now {
            assert_ne!(
                *id, ids[attachment],
                "reload {round} kept {attachment}'s program"
            );
        }
        flow.assert_moving(&env, TIMEOUT, &format!("after reload {round}"));
        ids = now;
    }
    // A container made after the reload runs the reloaded endpoint program.
    let late = create(&env, "late", &["--network", "n"]);
    for dir in TC {
        assert_eq!(
            endpoint_filter_id(&env, &veth_of(&late.name), dir),
            ids[&format!("{}@{dir}", veths[0])],
            "the new container got another build on its veth's {dir}"
        );
    }
    assert!(pings(&env, &late.ns, OUTSIDE_ADDR));

    flow.stop_and_assert_never_stalled();
}

#[test]
fn the_driver_refuses_duplicates_rolls_back_and_detaches_with_the_last_network() {
    use netd::datapath::Datapath as _;
    let env = TestEnv::new();
    let c = &containers(&env, 1)[0];
    ping(&env, &c.ns, OUTSIDE_ADDR, 1);
    assert_eq!(source_seen_outside(&env, &c.ns), HOST_ADDR, "masqueraded");
    let net = tests::netdata::network();
    let links = env.bpffs.join("links");
    let attached = || std::fs::read_dir(&links).unwrap().count();
    assert_eq!(attached(), 3, "uplink ingress and egress, bridge ingress");
    let veth_filter = || {
        output_in(
            &env.host_ns(),
            "tc",
            &["filter", "show", "dev", &c.host_if, "ingress"],
        )
    };
    assert!(
        veth_filter().contains("endpoint_ingres"),
        "the container's veth ingress: {}",
        veth_filter()
    );
    datapath_in(&env, |dp| {
        let err = dp.setup_network(&net).unwrap_err();
        assert!(format!("{err:#}").contains("already set up"), "{err:#}");
        let ep = tests::netdata::endpoint(c.ip, &c.host_if, 1);
        let err = dp.add_endpoint(&net, &ep).unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("endpoint {} is already on a network", c.ip)),
            "{err:#}"
        );
        // A batch with a clash publishes nothing.
        dp.publish(&net, &[port(Protocol::Udp, None, 7000, c.ip, 7000)])
            .unwrap();
        let batch = [
            port(Protocol::Tcp, None, 7001, c.ip, 7001),
            port(Protocol::Udp, None, 7000, c.ip, 7000),
        ];
        let err = dp.publish(&net, &batch).unwrap_err();
        assert!(format!("{err:#}").contains("already published"), "{err:#}");
        dp.unpublish(&net, &batch[1..]).unwrap();
        let err = dp.unpublish(&net, &batch[..1]).unwrap_err();
        assert!(format!("{err:#}").contains("not published"), "{err:#}");
        dp.teardown_network(&net).unwrap();
    });
    assert_eq!(attached(), 0, "the last network took the programs with it");
    assert_eq!(veth_filter(), "", "and the container's filter");
    // Nothing masquerades any more: a datagram reaches the outside with the container's own
    // address (it did with the host's while the programs were there).
    assert_eq!(source_seen_outside(&env, &c.ns), c.ip, "still translated");
    assert_eq!(
        env.netd_json(&["conntrack", "ls", "--json"]),
        serde_json::json!([])
    );
}

/// The source address the outside sees on a datagram sent from `ns`.
fn source_seen_outside(env: &TestEnv, ns: &Path) -> Ipv4Addr {
    let server = udp_bound_in(env, &env.outside_ns(), (OUTSIDE_ADDR, 9001).into());
    let client = udp_bound_in(env, ns, (Ipv4Addr::UNSPECIFIED, 0).into());
    client.send_to(b"who?", (OUTSIDE_ADDR, 9001)).unwrap();
    let (_, peer) = retry_interrupted(|| server.recv_from(&mut [0u8; 16])).unwrap();
    match peer.ip() {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("{other}"),
    }
}

/// The MAC address of `ifname` in `ns`.
fn mac_of(ns: &Path, ifname: &str) -> [u8; 6] {
    let json: serde_json::Value =
        serde_json::from_str(&output_in(ns, "ip", &["-j", "link", "show", ifname])).unwrap();
    let text = json[0]["address"].as_str().unwrap();
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

#[test]
fn fully_checksummed_packets_are_translated_with_checksums_the_receivers_accept() {
    use tests::frames::{SYN, send_raw, tcp_frame, udp_frame, with_macs};
    let env = TestEnv::new();
    let c = &containers(&env, 1)[0];
    publish(
        &env,
        &[
            port(Protocol::Udp, None, 5353, c.ip, 53),
            port(Protocol::Tcp, None, 8080, c.ip, 80),
        ],
    );
    let out = env.outside_ns();
    let host = env.host_ns();
    let (uplink_mac, outside_mac) = (mac_of(&host, "up0"), mac_of(&out, "out0"));
    let (bridge_mac, container_mac) =
        (mac_of(&host, tests::netdata::BRIDGE), mac_of(&c.ns, "eth0"));

    // Outside → published UDP port, with a full checksum and with none: DNAT on packets
    // without offload state, checked in full by the container's UDP stack.
    let server = udp_bound_in(&env, &c.ns, (Ipv4Addr::UNSPECIFIED, 53).into());
    for with_csum in [true, false] {
        let frame = with_macs(
            udp_frame(OUTSIDE_ADDR, 6000, HOST_ADDR, 5353, with_csum),
            uplink_mac,
            outside_mac,
        );
        env.in_ns(&out, || send_raw("out0", &frame));
        let mut buf = [0u8; 64];
        let (n, from) = retry_interrupted(|| server.recv_from(&mut buf)).unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"netd udp!"[..], SocketAddr::from((OUTSIDE_ADDR, 6000)))
        );
    }

    // Container → outside, masqueraded, received by the outside's UDP stack.
    let sink = udp_bound_in(&env, &out, (OUTSIDE_ADDR, 9001).into());
    let frame = with_macs(
        udp_frame(c.ip, 7000, OUTSIDE_ADDR, 9001, true),
        bridge_mac,
        container_mac,
    );
    env.in_ns(&c.ns, || send_raw("eth0", &frame));
    let mut buf = [0u8; 64];
    let (n, from) = retry_interrupted(|| sink.recv_from(&mut buf)).unwrap();
    assert_eq!(
        (&buf[..n], from),
        (&b"netd udp!"[..], SocketAddr::from((HOST_ADDR, 7000)))
    );

    // Outside → published TCP port: the container's TCP stack accepts the SYN (and answers it).
    let _listener = env.in_ns(&c.ns, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, 80)).unwrap()
    });
    let sent_before = nstat(&c.ns, "TcpOutSegs");
    let frame = with_macs(
        tcp_frame(OUTSIDE_ADDR, 6001, HOST_ADDR, 8080, SYN),
        uplink_mac,
        outside_mac,
    );
    env.in_ns(&out, || send_raw("out0", &frame));
    for _ in 0..100 {
        if nstat(&c.ns, "TcpOutSegs") > sent_before {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        nstat(&c.ns, "TcpOutSegs") > sent_before,
        "the container never answered the SYN"
    );
    for ns in [host, out, c.ns.clone()] {
        assert_eq!(
            checksum_errors(&ns),
            Vec::<String>::new(),
            "in {}",
            ns.display()
        );
    }
}

#[test]
fn a_client_port_a_host_service_listens_on_still_reaches_a_published_port() {
    let env = TestEnv::new();
    let c = &containers(&env, 1)[0];
    publish(&env, &[port(Protocol::Tcp, None, 8080, c.ip, 80)]);
    // A service of the host listens on every address at 7000; a client happens to connect
    // from port 7000. Its connection's reply tuple (container:80 → client:7000) is the
    // client's, not the host's: the listener has nothing to do with it.
    let _host_service = env.in_ns(&env.host_ns(), || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, 7000)).unwrap()
    });
    let listener = env.in_ns(&c.ns, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, 80)).unwrap()
    });
    let server = tcp_echo_server(listener, 1);
    let back = env.in_ns(&env.outside_ns(), || {
        tcp_round_trip(
            (HOST_ADDR, 8080).into(),
            Some((OUTSIDE_ADDR, 7000).into()),
            b"hello",
        )
    });
    assert_eq!(back, b"hello");
    assert_eq!(
        server.join().unwrap()[0],
        SocketAddr::from((OUTSIDE_ADDR, 7000))
    );
}

#[test]
fn masquerade_never_takes_the_tuple_of_a_host_connection() {
    let env = TestEnv::new();
    let c = &containers(&env, 1)[0];
    let listener = env.in_ns(&env.outside_ns(), || {
        TcpListener::bind((OUTSIDE_ADDR, 9000)).unwrap()
    });
    let server = thread::spawn(move || {
        let accepted: Vec<_> = (0..2).map(|_| listener.accept().unwrap()).collect();
        accepted
            .into_iter()
            .map(|(mut conn, peer)| {
                conn.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut data = [0u8; 4];
                conn.read_exact(&mut data).unwrap();
                conn.write_all(&data).unwrap();
                peer
            })
            .collect::<Vec<_>>()
    });
    // A process of the host holds HOST_ADDR:20000 → server; a container then uses source port
    // 20000 (in the NAT range) towards the same server. Both must work: the flow gets
    // another port.
    let mut host_conn = env.in_ns(&env.host_ns(), || {
        bound_connect((HOST_ADDR, 20000).into(), (OUTSIDE_ADDR, 9000).into())
    });
    let mut container_conn = env.in_ns(&c.ns, || {
        bound_connect((c.ip, 20000).into(), (OUTSIDE_ADDR, 9000).into())
    });
    for (conn, tag) in [(&mut host_conn, b"host"), (&mut container_conn, b"ctnr")] {
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        conn.write_all(tag).unwrap();
        let mut back = [0u8; 4];
        conn.read_exact(&mut back).unwrap();
        assert_eq!(&back, tag);
    }
    let peers = server.join().unwrap();
    assert!(peers.iter().all(|p| p.ip() == HOST_ADDR), "{peers:?}");
    assert_ne!(peers[0].port(), peers[1].port(), "{peers:?}");
}

#[test]
fn a_failed_setup_leaves_nothing_attached() {
    use netd::datapath::Datapath as _;
    let env = TestEnv::new();
    let net = tests::netdata::network();
    // The bridge doesn't exist yet: the uplink programs attached on the way are taken back.
    let err = datapath_in(&env, |dp| dp.setup_network(&net).unwrap_err());
    assert!(
        format!("{err:#}").contains(tests::netdata::BRIDGE),
        "{err:#}"
    );
    assert_eq!(
        std::fs::read_dir(env.bpffs.join("links")).unwrap().count(),
        0
    );
    // Once the bridge is there, the same call works.
    tests::topology::ip_in(
        &env,
        &env.host_ns(),
        &["link", "add", tests::netdata::BRIDGE, "type", "bridge"],
    );
    datapath_in(&env, |dp| dp.setup_network(&net).unwrap());
    assert_eq!(
        std::fs::read_dir(env.bpffs.join("links")).unwrap().count(),
        3
    );
}
