//! The iptables datapath installs Docker 20.10's rule set in the sandbox host namespace and
//! removes every rule and chain again; and the rules are the ones a real dockerd 20.10 writes
//! for the same network and ports. (Traffic through it is tested with the controller.)

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use netd::{
    datapath::{self, NetworkSpec, PortSpec, Protocol},
    netns,
};
use netd_bench::bench::docker::{self, Dockerd};
use tests::harness::TestEnv;

fn iptables_save(env: &TestEnv) -> String {
    let out = env.run_in(&env.host_ns(), "iptables-save", &[]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The datapaths of `env`'s instance, to drive the iptables one directly.
fn datapaths(env: &TestEnv) -> datapath::Datapaths {
    // The iptables datapath needs no bpffs: this directory is never opened.
    datapath::Datapaths {
        bpffs: env.bpffs.clone(),
        state_dir: env.state_dir.clone(),
        tuning: Default::default(),
    }
}

#[test]
fn iptables_datapath_installs_and_removes_docker_rules() {
    let env = TestEnv::new();
    let net = NetworkSpec {
        id: 1,
        name: "bridge".into(),
        bridge: "netd0".into(),
        subnet: "172.17.0.0/16".parse().unwrap(),
        gateway: "172.17.0.1".parse().unwrap(),
        subnet6: None,
        gateway6: None,
        icc: false,
        internal: false,
        masquerade: true,
        conntrack_limit: None,
    };
    let port = PortSpec {
        network_id: 1,
        proto: Protocol::Udp,
        host_ip: Some("198.18.0.2".parse().unwrap()),
        host_port: 5353,
        container_ip: "172.17.0.2".parse().unwrap(),
        container_ip6: None,
        container_port: 53,
        allow: vec![],
    };
    let datapaths = datapaths(&env);
    netns::run_in(Some(&env.host_ns()), || {
        let dp = datapaths.open(datapath::DatapathKind::Iptables)?;
        dp.setup_network(&net)?;
        dp.publish(&net, std::slice::from_ref(&port))
    })
    .unwrap();

    let rules = iptables_save(&env);
    for expected in [
        "-A PREROUTING ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j NETD",
        "-A POSTROUTING -s 172.17.0.0/16 ! -o netd0 -j MASQUERADE",
        "-A NETD -d 198.18.0.2/32 -p udp -m udp --dport 5353 -j DNAT --to-destination 172.17.0.2:53",
        "-A FORWARD -i netd0 -o netd0 -j DROP",
        "-A NETD-ISOLATION-STAGE-2 -o netd0 -j DROP",
    ] {
        assert!(
            rules.contains(expected),
            "missing {expected:?} in:\n{rules}"
        );
    }
    // Docker's order: the USER chain first, then isolation, then the bridge's rules.
    let forward: Vec<&str> = rules
        .lines()
        .filter(|l| l.starts_with("-A FORWARD"))
        .collect();
    assert_eq!(forward[0], "-A FORWARD -j NETD-USER", "{forward:?}");
    assert_eq!(
        forward[1], "-A FORWARD -j NETD-ISOLATION-STAGE-1",
        "{forward:?}"
    );

    netns::run_in(Some(&env.host_ns()), || {
        let dp = datapaths.open(datapath::DatapathKind::Iptables)?;
        dp.unpublish(&net, std::slice::from_ref(&port))?;
        dp.teardown_network(&net)
    })
    .unwrap();
    let rules = iptables_save(&env);
    assert!(!rules.contains("NETD"), "left behind:\n{rules}");
}

/// A network's teardown deletes the rules naming its bridge as the kernel has them: rules an
/// older netd wrote for an `--internal` network (this one writes no FORWARD jump, conntrack
/// ACCEPT or stage-2 DROP there) go too, and one deleted by hand fails none of the others, so
/// netd's chains go with the last network.
#[test]
fn teardown_removes_an_older_netds_rules_and_copes_with_one_deleted_by_hand() {
    let env = TestEnv::new();
    let net = NetworkSpec {
        id: 1,
        name: "internal".into(),
        bridge: "netd0".into(),
        subnet: "172.18.0.0/16".parse().unwrap(),
        gateway: "172.18.0.1".parse().unwrap(),
        subnet6: None,
        gateway6: None,
        icc: true,
        internal: true,
        masquerade: true,
        conntrack_limit: None,
    };
    let datapaths = datapaths(&env);
    netns::run_in(Some(&env.host_ns()), || {
        datapaths
            .open(datapath::DatapathKind::Iptables)?
            .setup_network(&net)
    })
    .unwrap();
    for rule in [
        "-I FORWARD -o netd0 -j NETD",
        "-I FORWARD -o netd0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-I NETD-ISOLATION-STAGE-2 -o netd0 -j DROP",
        "-D NETD-ISOLATION-STAGE-1 ! -d 172.18.0.0/16 -i netd0 -j DROP",
    ] {
        let args: Vec<&str> = rule.split_whitespace().collect();
        let out = env.run_in(&env.host_ns(), "iptables", &args);
        assert!(out.status.success(), "iptables {rule}: {out:?}");
    }

    netns::run_in(Some(&env.host_ns()), || {
        datapaths
            .open(datapath::DatapathKind::Iptables)?
            .teardown_network(&net)
    })
    .unwrap();
    let rules = iptables_save(&env);
    assert!(!rules.contains("NETD"), "left behind:\n{rules}");
}

/// `iptables-save` of `ns`, normalised for comparison: Docker's names made netd's (DOCKER →
/// NETD, docker0 → netd0), counters and comments dropped, and per table each chain's policy
/// and its rules in order.
fn normalised_rules(env: &TestEnv, ns: &Path) -> BTreeMap<String, Vec<String>> {
    normalised(env, ns, "iptables-save")
}

/// [`normalised_rules`] of `tool` (`iptables-save` or `ip6tables-save`).
fn normalised(env: &TestEnv, ns: &Path, tool: &str) -> BTreeMap<String, Vec<String>> {
    let out = env.run_in(ns, tool, &[]);
    assert!(out.status.success(), "{tool}");
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut table = String::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let line = line.replace("DOCKER", "NETD").replace("docker0", "netd0");
        if let Some(name) = line.strip_prefix('*') {
            table = name.to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            let mut fields = decl.split_whitespace();
            let (chain, policy) = (fields.next().unwrap(), fields.next().unwrap());
            chains
                .entry(format!("{table} {chain}"))
                .or_default()
                .push(format!("policy {policy}"));
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, _) = rule.split_once(' ').unwrap();
            chains
                .entry(format!("{table} {chain}"))
                .or_default()
                .push(line.clone());
        }
    }
    chains
}

/// The rules a dockerd 20.10 without the userland proxy (the rules netd mirrors) writes for
/// what `in_docker` makes, in a sandbox of its own; the dockerd is gone on return.
fn docker_rules(in_docker: impl FnOnce(&Dockerd)) -> BTreeMap<String, Vec<String>> {
    let env = TestEnv::new();
    let dockerd = Dockerd::start_with_proxy(&env.host_ns(), &env.state_dir.join("docker"), false)
        .unwrap_or_else(|e| panic!("dockerd cannot run here: {e:#}"));
    in_docker(&dockerd);
    normalised_rules(&env, &env.host_ns())
}

/// The rules netd's iptables datapath writes for what `in_netd` makes, in a sandbox of its
/// own.
fn netd_rules(in_netd: impl FnOnce(&TestEnv)) -> BTreeMap<String, Vec<String>> {
    let env = TestEnv::new();
    in_netd(&env);
    normalised_rules(&env, &env.host_ns())
}

/// Asserts that the two rule sets are the same, naming each chain that differs.
fn assert_same_rules(docker: &BTreeMap<String, Vec<String>>, netd: &BTreeMap<String, Vec<String>>) {
    let chains: BTreeSet<&String> = docker.keys().chain(netd.keys()).collect();
    let differences: Vec<String> = chains
        .into_iter()
        .filter(|c| docker.get(*c) != netd.get(*c))
        .map(|c| {
            format!(
                "{c}:\n  docker: {:?}\n  netd:   {:?}",
                docker.get(c),
                netd.get(c)
            )
        })
        .collect();
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// The address of netd container `name`.
fn netd_ip(env: &TestEnv, name: &str) -> String {
    env.netd_json(&["container", "inspect", name])["ip"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_iptables_datapath_writes_the_rules_dockerd_20_10_writes_for_the_same_ports() {
    // Docker's default bridge (172.17.0.0/16 on docker0), one container publishing a TCP and
    // a UDP port; netd's default network with the same container and ports.
    let mut docker_ip = None;
    let docker = docker_rules(|d| {
        let web = d
            .run(
                "web",
                &[
                    (8080, 80, docker::Protocol::Tcp),
                    (5353, 53, docker::Protocol::Udp),
                ],
            )
            .unwrap();
        docker_ip = Some(web.ip.to_string());
    });
    let netd = netd_rules(|env| {
        let name = env.name("web");
        env.netd_ok(&[
            "--datapath",
            "iptables",
            "container",
            "create",
            &name,
            "-p",
            "8080:80",
            "-p",
            "5353:53/udp",
        ]);
        assert_eq!(
            Some(netd_ip(env, &name)),
            docker_ip,
            "the first container's address"
        );
    });
    assert_same_rules(&docker, &with_known_differences_undone(&docker, netd));
}

#[test]
fn the_iptables_datapath_writes_dockerds_rules_for_networks_without_icc_and_internal_ones() {
    // Two user-defined networks, one without ICC, one internal, with a container each
    // publishing a port.
    let networks: [(&str, &str, &str, &str); 2] = [
        ("quiet", "10.50.0.0/24", "br-quiet", "--icc=false"),
        ("inner", "10.51.0.0/24", "br-inner", "--internal"),
    ];
    let docker = docker_rules(|d| {
        d.run("plain", &[]).unwrap();
        for (i, (name, subnet, bridge, flag)) in networks.iter().enumerate() {
            let bridge_opt = format!("com.docker.network.bridge.name={bridge}");
            let mut args = vec!["network", "create", "--subnet", subnet, "-o", &bridge_opt];
            match *flag {
                "--icc=false" => args.extend(["-o", "com.docker.network.bridge.enable_icc=false"]),
                _ => args.push("--internal"),
            }
            args.push(name);
            d.docker(&args).unwrap();
            let port = format!("{}:80", 9090 + i);
            let c = format!("c-{name}");
            d.docker(&[
                "run",
                "-d",
                "--name",
                &c,
                "--network",
                name,
                "-p",
                &port,
                "busybox",
                "sleep",
                "1d",
            ])
            .unwrap();
        }
    });
    let netd = netd_rules(|env| {
        env.netd_ok(&[
            "--datapath",
            "iptables",
            "container",
            "create",
            &env.name("plain"),
        ]);
        for (i, (name, subnet, bridge, flag)) in networks.iter().enumerate() {
            env.netd_ok(&[
                "--datapath",
                "iptables",
                "network",
                "create",
                name,
                "--subnet",
                subnet,
                "--bridge",
                bridge,
                flag,
            ]);
            let c = env.name(&format!("c-{name}"));
            let port = format!("{}:80", 9090 + i);
            env.netd_ok(&["container", "create", &c, "--network", name, "-p", &port]);
        }
    });
    let netd = undo_differences(&docker, netd, KNOWN_DIFFERENCES_USER_NETWORKS);
    assert_same_rules(&docker, &netd);
}

/// [`KNOWN_DIFFERENCES`] for the default bridge and a user network without ICC, then an
/// internal network's published port: Docker publishes nothing on an internal network; netd
/// translates the port for the network's own containers (hairpin) and the host, as its eBPF
/// datapath does, and from elsewhere the isolation rules drop it all the same.
const KNOWN_DIFFERENCES_USER_NETWORKS: &[(&str, Option<&str>, Option<&str>)] = &[
    ("filter FORWARD", Some("policy DROP"), Some("policy ACCEPT")),
    ("filter FORWARD", None, Some("-A FORWARD -o netd0 -j DROP")),
    (
        "filter FORWARD",
        None,
        Some("-A FORWARD -o br-quiet -j DROP"),
    ),
    (
        "filter NETD-ISOLATION-STAGE-1",
        None,
        Some("-A NETD-ISOLATION-STAGE-1 -s 172.17.0.0/16 ! -i netd0 -j DROP"),
    ),
    (
        "filter NETD-ISOLATION-STAGE-1",
        None,
        Some("-A NETD-ISOLATION-STAGE-1 -s 10.50.0.0/24 ! -i br-quiet -j DROP"),
    ),
    (
        "nat OUTPUT",
        Some("-A OUTPUT -m addrtype --dst-type LOCAL -j NETD"),
        Some("-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j NETD"),
    ),
    // Nor from outside: a loopback destination DNATed in PREROUTING escapes the stack's
    // martian check (a port published on 127.0.0.1 reachable from the host's neighbours).
    (
        "nat PREROUTING",
        Some("-A PREROUTING -m addrtype --dst-type LOCAL -j NETD"),
        Some("-A PREROUTING ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j NETD"),
    ),
    (
        "nat POSTROUTING",
        Some("-A POSTROUTING -o br-quiet -m addrtype --src-type LOCAL -j MASQUERADE"),
        None,
    ),
    (
        "nat POSTROUTING",
        Some("-A POSTROUTING -o netd0 -m addrtype --src-type LOCAL -j MASQUERADE"),
        None,
    ),
    (
        "nat NETD",
        None,
        Some("-A NETD -p tcp -m tcp --dport 9091 -j DNAT --to-destination 10.51.0.2:80"),
    ),
    (
        "nat POSTROUTING",
        None,
        Some(
            "-A POSTROUTING -s 10.51.0.2/32 -d 10.51.0.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE",
        ),
    ),
];

#[test]
fn the_iptables_datapath_writes_the_ip6tables_rules_dockerd_20_10_writes_for_a_dual_stack_network()
{
    // A dual-stack user network with a container publishing a port, in Docker (ip6tables on)
    // and in netd, with the same bridge name and subnets.
    let (subnet, subnet6, bridge) = ("10.60.0.0/24", "fd00:60::/64", "netd-br1");
    let env = TestEnv::new();
    let options = docker::Options {
        userland_proxy: false,
        ip6tables: true,
        ..Default::default()
    };
    let dockerd = Dockerd::start_with(&env.host_ns(), &env.state_dir.join("docker"), &options)
        .unwrap_or_else(|e| panic!("dockerd cannot run here: {e:#}"));
    let bridge_opt = format!("com.docker.network.bridge.name={bridge}");
    dockerd
        .docker(&[
            "network",
            "create",
            "--ipv6",
            "--subnet",
            subnet,
            "--subnet",
            subnet6,
            "-o",
            &bridge_opt,
            "n6",
        ])
        .unwrap();
    dockerd
        .docker(&[
            "run",
            "-d",
            "--name",
            "web",
            "--network",
            "n6",
            "-p",
            "8080:80",
            "busybox",
            "sleep",
            "1d",
        ])
        .unwrap();
    let docker = normalised(&env, &env.host_ns(), "ip6tables-save");
    drop(dockerd);
    drop(env);

    let env = TestEnv::new();
    env.netd_ok(&[
        "--datapath",
        "iptables",
        "network",
        "create",
        "n6",
        "--ipv6",
        "--subnet",
        subnet,
        "--subnet",
        subnet6,
    ]);
    env.netd_ok(&[
        "container",
        "create",
        &env.name("web"),
        "--network",
        "n6",
        "-p",
        "8080:80",
    ]);
    let netd = normalised(&env, &env.host_ns(), "ip6tables-save");
    let netd = undo_differences(&docker, netd, KNOWN_DIFFERENCES_IPV6);
    assert_same_rules(&docker, &netd);
}

/// Where netd's ip6tables rules differ from dockerd 20.10's (`ip6tables`, no proxy): the
/// policy, loopback and hairpin differences of [`KNOWN_DIFFERENCES`], then those noted below.
const KNOWN_DIFFERENCES_IPV6: &[(&str, Option<&str>, Option<&str>)] = &[
    ("filter FORWARD", Some("policy DROP"), Some("policy ACCEPT")),
    (
        "filter FORWARD",
        None,
        Some("-A FORWARD -o netd-br1 -j DROP"),
    ),
    (
        "filter NETD-ISOLATION-STAGE-1",
        None,
        Some("-A NETD-ISOLATION-STAGE-1 -s fd00:60::/64 ! -i netd-br1 -j DROP"),
    ),
    (
        "nat OUTPUT",
        Some("-A OUTPUT -m addrtype --dst-type LOCAL -j NETD"),
        Some("-A OUTPUT ! -d ::1/128 -m addrtype --dst-type LOCAL -j NETD"),
    ),
    (
        "nat PREROUTING",
        Some("-A PREROUTING -m addrtype --dst-type LOCAL -j NETD"),
        Some("-A PREROUTING ! -d ::1/128 -m addrtype --dst-type LOCAL -j NETD"),
    ),
    (
        "nat POSTROUTING",
        Some("-A POSTROUTING -o netd-br1 -m addrtype --src-type LOCAL -j MASQUERADE"),
        None,
    ),
    // Docker 20.10 publishes ports over IPv4 only (moby#25407); netd over both families, with
    // the IPv4 rules' IPv6 twins.
    (
        "filter NETD",
        None,
        Some(
            "-A NETD -d fd00:60::2/128 ! -i netd-br1 -o netd-br1 -p tcp -m tcp --dport 80 -j ACCEPT",
        ),
    ),
    (
        "nat NETD",
        None,
        Some("-A NETD -p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00:60::2]:80"),
    ),
    (
        "nat POSTROUTING",
        None,
        Some(
            "-A POSTROUTING -s fd00:60::2/128 -d fd00:60::2/128 -p tcp -m tcp --dport 80 -j MASQUERADE",
        ),
    ),
    // Docker 20.10 makes no DOCKER-USER chain in ip6tables; netd the same as in iptables.
    ("filter FORWARD", None, Some("-A FORWARD -j NETD-USER")),
    ("filter NETD-USER", None, Some("policy -")),
    ("filter NETD-USER", None, Some("-A NETD-USER -j RETURN")),
    // Docker isolates docker0 in ip6tables too, though docker0 has no IPv6; netd's default
    // network isn't made here, and has no IPv6 rules when it is.
    (
        "filter NETD-ISOLATION-STAGE-1",
        Some("-A NETD-ISOLATION-STAGE-1 -i netd0 ! -o netd0 -j NETD-ISOLATION-STAGE-2"),
        None,
    ),
    (
        "filter NETD-ISOLATION-STAGE-2",
        Some("-A NETD-ISOLATION-STAGE-2 -o netd0 -j DROP"),
        None,
    ),
];

/// Where netd's rules differ from dockerd 20.10's (`--userland-proxy=false`), each on purpose
/// (said beside it): (chain, Docker's line, netd's line), `None` for a line only the other
/// has. The comparison fails when one of these goes away too, so the list stays true.
const KNOWN_DIFFERENCES: &[(&str, Option<&str>, Option<&str>)] = &[
    // Docker sets FORWARD's policy to DROP; netd appends a DROP for its bridge instead (the
    // host's policy is the host's).
    ("filter FORWARD", Some("policy DROP"), Some("policy ACCEPT")),
    ("filter FORWARD", None, Some("-A FORWARD -o netd0 -j DROP")),
    // A masquerading network's source from anywhere but its bridge is spoofed; Docker's
    // MASQUERADE would start a flow in a container's name for it.
    (
        "filter NETD-ISOLATION-STAGE-1",
        None,
        Some("-A NETD-ISOLATION-STAGE-1 -s 172.17.0.0/16 ! -i netd0 -j DROP"),
    ),
    // Without the proxy Docker DNATs loopback too (and sets route_localnet on the bridge, which
    // lets neighbours reach the host's loopback services: CVE-2020-8558); netd doesn't.
    (
        "nat OUTPUT",
        Some("-A OUTPUT -m addrtype --dst-type LOCAL -j NETD"),
        Some("-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j NETD"),
    ),
    // Nor from outside: a loopback destination DNATed in PREROUTING escapes the stack's
    // martian check (a port published on 127.0.0.1 reachable from the host's neighbours).
    (
        "nat PREROUTING",
        Some("-A PREROUTING -m addrtype --dst-type LOCAL -j NETD"),
        Some("-A PREROUTING ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j NETD"),
    ),
    // Without the proxy Docker masquerades host-sourced traffic into the bridge (hairpin).
    (
        "nat POSTROUTING",
        Some("-A POSTROUTING -o netd0 -m addrtype --src-type LOCAL -j MASQUERADE"),
        None,
    ),
];

/// `netd`'s rules with [`KNOWN_DIFFERENCES`] undone, each checked to still be there.
fn with_known_differences_undone(
    docker: &BTreeMap<String, Vec<String>>,
    netd: BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, Vec<String>> {
    undo_differences(docker, netd, KNOWN_DIFFERENCES)
}

/// `netd`'s rules with `differences` undone, each checked to still be there; a chain left
/// empty (one Docker doesn't make) goes too.
fn undo_differences(
    docker: &BTreeMap<String, Vec<String>>,
    mut netd: BTreeMap<String, Vec<String>>,
    differences: &[(&str, Option<&str>, Option<&str>)],
) -> BTreeMap<String, Vec<String>> {
    for &(chain, docker_line, netd_line) in differences {
        let ours = netd
            .get_mut(chain)
            .unwrap_or_else(|| panic!("netd has no {chain}"));
        let at = match netd_line {
            Some(line) => {
                let at = ours.iter().position(|l| l == line);
                let at = at.unwrap_or_else(|| panic!("fixed? netd's {chain} lacks {line:?}"));
                ours.remove(at);
                at
            }
            None => {
                let line = docker_line.unwrap();
                docker[chain].iter().position(|l| l == line).unwrap()
            }
        };
        if let Some(line) = docker_line {
            assert!(
                docker[chain].iter().any(|l| l == line),
                "Docker's {chain} lacks {line:?}"
            );
            assert!(
                !ours.iter().any(|l| l == line),
                "fixed? netd's {chain} has {line:?}"
            );
            ours.insert(at.min(ours.len()), line.to_string());
        }
    }
    netd.retain(|_, rules| !rules.is_empty());
    netd
}
