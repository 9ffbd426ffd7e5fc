//! CNI conformance of `netd-cni`, driving the plugin binary as libcni does (the `CNI_*`
//! variables and the config on stdin): every verb at every version, bad config, missing
//! namespace, DEL twice, GC, concurrent ADDs, and published ports with real traffic.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use serde_json::{Value, json};
use tests::{
    engines::{CniOutcome, cni, cni_with_env, tcp_ask, tcp_name_server, udp_ask, udp_name_server},
    harness::{HOST_ADDR, HOST_ADDR6, OUTSIDE_ADDR6, TestEnv, proxies},
};

const SUBNET: &str = "10.89.0.0/24";

fn config(env: &TestEnv, version: &str, runtime: Value) -> Value {
    network_config(env, "cninet", SUBNET, version, runtime)
}

fn network_config(env: &TestEnv, name: &str, subnet: &str, version: &str, runtime: Value) -> Value {
    json!({
        "cniVersion": version,
        "name": name,
        "type": "netd-cni",
        "subnet": subnet,
        "stateDir": env.state_dir,
        "bpffs": env.bpffs,
        "hostNetns": env.host_ns(),
        "hostCgroup": env.cgroup,
        "capabilities": { "portMappings": true, "ips": true },
        "runtimeConfig": runtime,
    })
}

/// A container's namespace, as a runtime makes it before calling the plugin.
fn container_ns(env: &TestEnv, base: &str) -> PathBuf {
    netd::netns::create(&env.name(base)).unwrap()
}

fn call(command: &str, id: &str, netns: Option<&PathBuf>, config: &Value) -> CniOutcome {
    call_if(command, id, "eth0", netns, config)
}

/// [`call`] for the container's interface `ifname`.
fn call_if(
    command: &str,
    id: &str,
    ifname: &str,
    netns: Option<&PathBuf>,
    config: &Value,
) -> CniOutcome {
    cni(
        Some(command),
        Some((id, ifname)),
        netns.map(PathBuf::as_path),
        &config.to_string(),
    )
}

/// The runtime config publishing TCP `host_port` to `container_port`.
fn tcp_port(host_port: u16, container_port: u16) -> Value {
    json!({ "portMappings": [{ "hostPort": host_port, "containerPort": container_port, "protocol": "tcp" }] })
}

fn host(port: u16) -> SocketAddr {
    SocketAddr::from((HOST_ADDR, port))
}

fn containers(env: &TestEnv) -> Vec<Value> {
    env.netd_json(&["container", "ls", "--json"])
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn version_lists_the_three_versions() {
    for asked in ["0.4.0", "1.0.0", "1.1.0"] {
        let out = cni(
            Some("VERSION"),
            None,
            None,
            &json!({ "cniVersion": asked }).to_string(),
        )
        .ok();
        assert_eq!(out["cniVersion"], asked);
        assert_eq!(out["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
    }
}

#[test]
fn add_check_del_at_every_version_with_a_published_port() {
    let env = TestEnv::new();
    for (i, version) in ["0.4.0", "1.0.0", "1.1.0"].into_iter().enumerate() {
        let port = 8080 + i as u16;
        let cfg = config(
            &env,
            version,
            json!({ "portMappings": [{ "hostPort": port, "containerPort": 80, "protocol": "tcp", "hostIP": "" }] }),
        );
        let ns = container_ns(&env, &format!("c{i}"));
        let id = format!("ctr{i}");
        let result = call("ADD", &id, Some(&ns), &cfg).ok();

        assert_eq!(result["cniVersion"], version);
        let iface = &result["interfaces"][0];
        assert_eq!(iface["name"], "eth0");
        assert_eq!(iface["sandbox"], ns.display().to_string());
        let ip = &result["ips"][0];
        assert_eq!(ip["interface"], 0);
        assert_eq!(ip["gateway"], "10.89.0.1");
        let address = ip["address"].as_str().unwrap();
        assert!(address.starts_with("10.89.0.") && address.ends_with("/24"));
        assert_eq!(ip["version"].is_string(), version == "0.4.0", "{result}");
        assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");
        // The MAC in the result is the interface's.
        let link = env.run_in(&ns, "ip", &["-br", "link", "show", "eth0"]);
        let link = String::from_utf8_lossy(&link.stdout);
        assert!(
            link.contains(iface["mac"].as_str().unwrap()),
            "{link} vs {iface}"
        );

        // The published port works from outside, through netd's datapath.
        tcp_name_server(&env, &ns, 80, &id);
        assert_eq!(tcp_ask(&env, &env.outside_ns(), host(port)).unwrap(), id);

        let mut check = cfg.clone();
        check["prevResult"] = result.clone();
        call("CHECK", &id, Some(&ns), &check).ok();
        let mut wrong = check.clone();
        wrong["prevResult"]["ips"][0]["address"] = json!("10.89.0.250/24");
        assert_eq!(call("CHECK", &id, Some(&ns), &wrong).code(), 100);

        call("DEL", &id, Some(&ns), &cfg).ok();
        assert!(
            tcp_ask(&env, &env.outside_ns(), host(port)).is_err(),
            "port {port} still answers after DEL"
        );
        // DEL is idempotent, and the namespace is optional for it.
        call("DEL", &id, Some(&ns), &cfg).ok();
        call("DEL", &id, None, &cfg).ok();
        assert_eq!(call("CHECK", &id, Some(&ns), &check).code(), 3);
    }
    assert!(containers(&env).is_empty());
}

/// Chained after a plugin that made an interface, ADD's result keeps the earlier result and
/// adds its own (its address pointing at its own interface).
#[test]
fn add_after_another_plugin_keeps_its_result() {
    let env = TestEnv::new();
    let ns = container_ns(&env, "c");
    let mut cfg = config(&env, "1.0.0", json!({}));
    cfg["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{ "name": "tap0", "sandbox": ns }],
        "ips": [{ "address": "192.0.2.7/24", "interface": 0 }],
        "routes": [{ "dst": "192.0.2.0/24" }],
        "dns": { "nameservers": ["192.0.2.53"] },
    });
    let result = call("ADD", "ctr", Some(&ns), &cfg).ok();
    assert_eq!(result["interfaces"][0]["name"], "tap0", "{result}");
    assert_eq!(result["interfaces"][1]["name"], "eth0", "{result}");
    assert_eq!(result["ips"][0]["address"], "192.0.2.7/24", "{result}");
    assert_eq!(result["ips"][1]["interface"], 1, "{result}");
    let ours = result["ips"][1]["address"].as_str().unwrap();
    assert!(
        ours.starts_with("10.89.0.") && ours.ends_with("/24"),
        "{result}"
    );
    assert_eq!(result["routes"][0]["dst"], "192.0.2.0/24", "{result}");
    assert_eq!(result["routes"][1]["dst"], "0.0.0.0/0", "{result}");
    assert_eq!(result["dns"]["nameservers"][0], "192.0.2.53", "{result}");
    call("DEL", "ctr", Some(&ns), &cfg).ok();
    assert!(containers(&env).is_empty());
}

#[test]
fn status_and_gc_need_1_1_0() {
    let env = TestEnv::new();
    cni(
        Some("STATUS"),
        None,
        None,
        &config(&env, "1.1.0", json!({})).to_string(),
    )
    .ok();
    for verb in ["STATUS", "GC"] {
        let old = config(&env, "1.0.0", json!({})).to_string();
        assert_eq!(cni(Some(verb), None, None, &old).code(), 1, "{verb}");
    }
    // STATUS fails with code 50 when the instance can't be opened.
    let mut broken = config(&env, "1.1.0", json!({}));
    broken["stateDir"] = json!("/proc/netd-no-such-dir");
    assert_eq!(
        cni(Some("STATUS"), None, None, &broken.to_string()).code(),
        50
    );
}

#[test]
fn gc_removes_the_attachments_the_runtime_no_longer_lists() {
    let env = TestEnv::new();
    let cfg = config(&env, "1.1.0", json!({}));
    let (ns_a, ns_b) = (container_ns(&env, "a"), container_ns(&env, "b"));
    let a = call("ADD", "keep", Some(&ns_a), &cfg).ok();
    call("ADD", "gone", Some(&ns_b), &cfg).ok();
    // A container of the CLI's on the same network is not the runtime's: GC leaves it.
    let cli = env.name("cli");
    env.netd_ok(&["container", "create", &cli, "--network", "cninet"]);
    assert_eq!(containers(&env).len(), 3);

    // Without the list, nothing says which attachments are live: nothing goes.
    assert_eq!(cni(Some("GC"), None, None, &cfg.to_string()).code(), 7);
    assert_eq!(containers(&env).len(), 3);

    let mut gc = cfg.clone();
    gc["cni.dev/valid-attachments"] = json!([{ "containerID": "keep", "ifname": "eth0" }]);
    cni(Some("GC"), None, None, &gc.to_string()).ok();

    let left: Vec<String> = containers(&env)
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&cli));
    let mut check = cfg.clone();
    check["prevResult"] = a;
    call("CHECK", "keep", Some(&ns_a), &check).ok();
    // CHECK finds a lost default route, and a downed interface.
    env.run_in(&ns_a, "ip", &["route", "del", "default"]);
    assert_eq!(call("CHECK", "keep", Some(&ns_a), &check).code(), 100);
    env.run_in(
        &ns_a,
        "ip",
        &["route", "add", "default", "via", "10.89.0.1"],
    );
    call("CHECK", "keep", Some(&ns_a), &check).ok();
    env.run_in(&ns_a, "ip", &["link", "set", "eth0", "down"]);
    assert_eq!(call("CHECK", "keep", Some(&ns_a), &check).code(), 100);
    assert_eq!(call("CHECK", "gone", Some(&ns_b), &cfg).code(), 3);
    let eth0 = env.run_in(&ns_b, "ip", &["link", "show", "eth0"]);
    assert!(!eth0.status.success(), "GC left eth0 in the namespace");
    call("DEL", "keep", Some(&ns_a), &cfg).ok();
    env.netd_ok(&["container", "rm", &cli]);
}

#[test]
fn bad_input_gets_the_spec_error_code_and_leaves_nothing() {
    let env = TestEnv::new();
    let ns = container_ns(&env, "c");
    let good = config(&env, "1.0.0", json!({}));
    let with = |key: &str, value: Value| {
        let mut c = good.clone();
        c[key] = value;
        c.to_string()
    };
    let id = Some(("ctr", "eth0"));
    let cases: Vec<(&str, CniOutcome, u64)> = vec![
        (
            "not JSON",
            cni(Some("ADD"), id, Some(&ns), "{cniVersion"),
            6,
        ),
        (
            "unknown version",
            cni(
                Some("ADD"),
                id,
                Some(&ns),
                &with("cniVersion", json!("0.2.0")),
            ),
            1,
        ),
        (
            "bad subnet",
            cni(Some("ADD"), id, Some(&ns), &with("subnet", json!("banana"))),
            7,
        ),
        (
            "bad network name",
            cni(Some("ADD"), id, Some(&ns), &with("name", json!("no/slash"))),
            7,
        ),
        (
            "sctp port",
            cni(
                Some("ADD"),
                id,
                Some(&ns),
                &with(
                    "runtimeConfig",
                    json!({ "portMappings": [{ "hostPort": 1, "containerPort": 1, "protocol": "sctp" }] }),
                ),
            ),
            2,
        ),
        (
            "no CNI_COMMAND",
            cni(None, id, Some(&ns), &good.to_string()),
            4,
        ),
        (
            "no CNI_NETNS",
            cni(Some("ADD"), id, None, &good.to_string()),
            4,
        ),
        (
            "no CNI_CONTAINERID",
            cni(Some("ADD"), None, Some(&ns), &good.to_string()),
            4,
        ),
        (
            "unknown CNI_ARGS key",
            cni_with_env(
                Some("ADD"),
                id,
                Some(&ns),
                &good.to_string(),
                &[("CNI_ARGS", "COLOUR=blue")],
            ),
            2,
        ),
        (
            "CNI_IFNAME too long",
            cni(
                Some("ADD"),
                Some(("ctr", "a-sixteen-letter")),
                Some(&ns),
                &good.to_string(),
            ),
            4,
        ),
        (
            "CNI_IFNAME with a slash",
            cni(
                Some("ADD"),
                Some(("ctr", "eth/1")),
                Some(&ns),
                &good.to_string(),
            ),
            4,
        ),
        (
            "port 0",
            cni(
                Some("ADD"),
                id,
                Some(&ns),
                &with(
                    "runtimeConfig",
                    json!({ "portMappings": [{ "hostPort": 0, "containerPort": 80 }] }),
                ),
            ),
            7,
        ),
        (
            "an ips prefix other than the subnet's",
            cni(
                Some("ADD"),
                id,
                Some(&ns),
                &with("runtimeConfig", json!({ "ips": ["10.89.0.5/16"] })),
            ),
            7,
        ),
        (
            "prevResult not an object",
            cni(Some("ADD"), id, Some(&ns), &with("prevResult", json!([]))),
            7,
        ),
        (
            "the host's namespace",
            cni(Some("ADD"), id, Some(&env.host_ns()), &good.to_string()),
            4,
        ),
        (
            "missing namespace",
            cni(
                Some("ADD"),
                id,
                Some(&PathBuf::from("/run/netns/netd-no-such-ns")),
                &good.to_string(),
            ),
            3,
        ),
    ];
    for (what, outcome, code) in cases {
        assert_eq!(outcome.code(), code, "{what}: {}", outcome.out);
        assert!(
            outcome.out["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}"
        );
        assert_eq!(outcome.out["cniVersion"].as_str().map(str::len), Some(5));
    }
    assert!(containers(&env).is_empty());
    let networks = env.netd_json(&["network", "ls", "--json"]);
    assert_eq!(networks, json!([]), "a failed first ADD leaves its network");
    // The positive control: the same call with everything right succeeds (unknown CNI_ARGS
    // keys are fine with IgnoreUnknown; IP= is the address asked for).
    let result = cni_with_env(
        Some("ADD"),
        id,
        Some(&ns),
        &good.to_string(),
        &[("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=x;IP=10.89.0.42")],
    )
    .ok();
    assert_eq!(result["ips"][0]["address"], "10.89.0.42/24");
    // And an existing network with another subnet, or without the isolation the config
    // asks for, is a config error.
    for (key, value) in [
        ("subnet", json!("10.90.0.0/24")),
        ("icc", json!(false)),
        ("internal", json!(true)),
        ("masquerade", json!(false)),
        ("datapath", json!("iptables")),
    ] {
        let other = with(key, value);
        let outcome = cni(Some("ADD"), Some(("ctr2", "eth0")), Some(&ns), &other);
        assert_eq!(outcome.code(), 7, "{key}: {}", outcome.out);
    }
    assert_eq!(containers(&env).len(), 1);
    call("DEL", "ctr", Some(&ns), &good).ok();
    // DEL on an instance that never ran succeeds and makes nothing.
    let mut nowhere = good.clone();
    let never = env.state_dir.join("never");
    nowhere["stateDir"] = json!(never);
    call("DEL", "ctr", Some(&ns), &nowhere).ok();
    // CHECK finds no container there, STATUS says ready (the first ADD would make the
    // instance), GC has nothing to collect; none of them makes anything.
    assert_eq!(call("CHECK", "ctr", Some(&ns), &nowhere).code(), 3);
    nowhere["cniVersion"] = json!("1.1.0");
    cni(Some("STATUS"), None, None, &nowhere.to_string()).ok();
    nowhere["cni.dev/valid-attachments"] = json!([]);
    cni(Some("GC"), None, None, &nowhere.to_string()).ok();
    assert!(!never.exists());
    // An ADD that made its network and then failed takes the network away again.
    let fresh = network_config(
        &env,
        "fresh",
        "10.91.0.0/24",
        "1.0.0",
        json!({ "ips": ["10.0.0.1/24"] }),
    );
    assert_eq!(call("ADD", "ctr3", Some(&ns), &fresh).code(), 100);
    let networks = env.netd_json(&["network", "ls", "--json"]);
    assert!(!networks.to_string().contains("\"fresh\""), "{networks}");
}

/// One namespace on two netd networks (a runtime's `eth0` and `eth1`): each ifname is an
/// endpoint of its own, with its own address, published port and default route (the first
/// network's in use); DEL of one leaves the other working, and it takes the default route over.
#[test]
fn two_interfaces_on_two_networks_in_one_namespace() {
    let env = TestEnv::new();
    let net_a = config(&env, "1.0.0", tcp_port(8090, 80));
    let net_b = network_config(&env, "cninet2", "10.89.1.0/24", "1.0.0", tcp_port(8091, 81));
    let ns = container_ns(&env, "multi");
    let a = call_if("ADD", "pod", "eth0", Some(&ns), &net_a).ok();
    let b = call_if("ADD", "pod", "eth1", Some(&ns), &net_b).ok();
    assert_eq!(a["interfaces"][0]["name"], "eth0");
    assert_eq!(b["interfaces"][0]["name"], "eth1");
    assert_eq!(b["ips"][0]["gateway"], "10.89.1.1");
    let b_ip: std::net::Ipv4Addr = b["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let addr = env.run_in(&ns, "ip", &["-4", "-br", "addr"]);
    let addr = String::from_utf8_lossy(&addr.stdout);
    assert!(
        addr.contains(&format!("{b_ip}/24")) && addr.contains("10.89.0."),
        "{addr}"
    );
    assert_eq!(containers(&env).len(), 2);
    tcp_name_server(&env, &ns, 80, "on-a");
    tcp_name_server(&env, &ns, 81, "on-b");

    let outside = env.outside_ns();
    assert_eq!(tcp_ask(&env, &outside, host(8090)).unwrap(), "on-a");
    // Network b's gateway side (the host) reaches the container through eth1.
    let b_addr = SocketAddr::from((b_ip, 81));
    assert_eq!(tcp_ask(&env, &env.host_ns(), b_addr).unwrap(), "on-b");
    let checked = |result: &Value, net: &Value| {
        let mut check = net.clone();
        check["prevResult"] = result.clone();
        check
    };
    call_if("CHECK", "pod", "eth0", Some(&ns), &checked(&a, &net_a)).ok();
    call_if("CHECK", "pod", "eth1", Some(&ns), &checked(&b, &net_b)).ok();
    // CHECK looks at the interface named: eth1 doesn't have eth0's address.
    let crossed = call_if("CHECK", "pod", "eth1", Some(&ns), &checked(&a, &net_b));
    assert_eq!(crossed.code(), 100);
    // An ifname the namespace has already, on another network: refused, nothing changes.
    let again = call_if("ADD", "pod2", "eth1", Some(&ns), &net_a);
    assert_eq!(again.code(), 100, "{}", again.out);
    assert_eq!(containers(&env).len(), 2);
    call_if("CHECK", "pod", "eth1", Some(&ns), &checked(&b, &net_b)).ok();

    call_if("DEL", "pod", "eth0", Some(&ns), &net_a).ok();
    let eth0 = env.run_in(&ns, "ip", &["link", "show", "eth0"]);
    assert!(!eth0.status.success(), "DEL of eth0 left it");
    assert_eq!(containers(&env).len(), 1);
    assert_eq!(call_if("CHECK", "pod", "eth0", Some(&ns), &net_a).code(), 3);
    call_if("CHECK", "pod", "eth1", Some(&ns), &checked(&b, &net_b)).ok();
    assert_eq!(tcp_ask(&env, &env.host_ns(), b_addr).unwrap(), "on-b");
    // eth1's own default route is the one left: its published port answers the outside.
    assert!(tcp_ask(&env, &outside, host(8090)).is_err());
    assert_eq!(tcp_ask(&env, &outside, host(8091)).unwrap(), "on-b");

    call_if("DEL", "pod", "eth1", Some(&ns), &net_b).ok();
    assert!(tcp_ask(&env, &outside, host(8091)).is_err());
    assert!(containers(&env).is_empty());
}

/// A container whose namespace went without a DEL (a runtime that never sends one, as
/// `ctr run -d`): the next ADD on its network removes its endpoint, so its address and
/// published port are free again.
#[test]
fn an_add_removes_the_endpoints_whose_namespace_is_gone() {
    let env = TestEnv::new();
    let cfg = config(&env, "1.0.0", tcp_port(8092, 80));
    let (gone_name, kept) = (env.name("gone"), container_ns(&env, "kept"));
    let gone = netd::netns::create(&gone_name).unwrap();
    let first = call("ADD", "gone", Some(&gone), &cfg).ok();
    let plain = config(&env, "1.0.0", json!({}));
    call("ADD", "kept", Some(&kept), &plain).ok();
    let veth = containers(&env)
        .iter()
        .find(|c| c["netns"] == gone.display().to_string())
        .map(|c| c["host_veth"].as_str().unwrap().to_string())
        .unwrap();
    netd::netns::remove(&gone_name).unwrap();
    // The kernel removes the veth with the namespace, asynchronously.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while host_links(&env).contains(&format!("{veth}@")) {
        assert!(
            std::time::Instant::now() < deadline,
            "{veth} outlived its namespace"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(containers(&env).len(), 2, "no DEL came: netd still has it");

    // The same port and address for the next container: only free if the orphan went.
    let next = container_ns(&env, "next");
    let mut runtime = tcp_port(8092, 80);
    runtime["ips"] = json!([first["ips"][0]["address"]]);
    let second = config(&env, "1.0.0", runtime);
    call("ADD", "next", Some(&next), &second).ok();
    tcp_name_server(&env, &next, 80, "next");
    assert_eq!(
        tcp_ask(&env, &env.outside_ns(), host(8092)).unwrap(),
        "next"
    );
    // The endpoint whose namespace lives on is untouched.
    let left: Vec<String> = containers(&env)
        .iter()
        .map(|c| c["netns"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&kept.display().to_string()));
    call("CHECK", "kept", Some(&kept), &plain).ok();
    call("DEL", "next", Some(&next), &second).ok();
    call("DEL", "kept", Some(&kept), &plain).ok();
}

#[test]
fn concurrent_adds_get_distinct_addresses() {
    let env = TestEnv::new();
    let cfg = config(&env, "1.0.0", json!({}));
    let namespaces: Vec<PathBuf> = (0..8)
        .map(|i| container_ns(&env, &format!("p{i}")))
        .collect();
    let addresses: Vec<String> = std::thread::scope(|s| {
        let calls: Vec<_> = namespaces
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let cfg = &cfg;
                s.spawn(move || call("ADD", &format!("pod{i}"), Some(ns), cfg).ok())
            })
            .collect();
        calls
            .into_iter()
            .map(|c| c.join().unwrap()["ips"][0]["address"].to_string())
            .collect()
    });
    let distinct: std::collections::HashSet<_> = addresses.iter().collect();
    assert_eq!(distinct.len(), 8, "{addresses:?}");
    for (i, ns) in namespaces.iter().enumerate() {
        call("DEL", &format!("pod{i}"), Some(ns), &cfg).ok();
    }
    assert!(containers(&env).is_empty());
}

/// The reference portmap plugin's check: a UDP flow to a published port, its container
/// removed, a second container publishing the same port: the same flow reaches the second.
#[test]
fn a_stale_udp_flow_does_not_capture_the_next_containers_port() {
    let env = TestEnv::new();
    let port =
        json!({ "portMappings": [{ "hostPort": 5353, "containerPort": 53, "protocol": "udp" }] });
    let first = config(&env, "1.0.0", port.clone());
    let (ns1, ns2) = (container_ns(&env, "u1"), container_ns(&env, "u2"));
    call("ADD", "first", Some(&ns1), &first).ok();
    udp_name_server(&env, &ns1, 53, "first");
    let outside = env.outside_ns();
    assert_eq!(
        udp_ask(&env, &outside, 40000, host(5353)).as_deref(),
        Some("first")
    );
    call("DEL", "first", Some(&ns1), &first).ok();

    // Another address than the first's, so only a correct translation reaches it.
    let mut runtime = port;
    runtime["ips"] = json!(["10.89.0.77/24"]);
    let second = config(&env, "1.0.0", runtime);
    let result = call("ADD", "second", Some(&ns2), &second).ok();
    assert_eq!(result["ips"][0]["address"], "10.89.0.77/24");
    udp_name_server(&env, &ns2, 53, "second");
    assert_eq!(
        udp_ask(&env, &outside, 40000, host(5353)).as_deref(),
        Some("second")
    );
    call("DEL", "second", Some(&ns2), &second).ok();
}

/// An ADD killed at any step (the runtime's timeout, a crash): the DEL that follows removes
/// what it made, and the same container can be added again.
#[test]
fn del_cleans_up_after_an_add_killed_at_any_step() {
    let env = TestEnv::new();
    let cfg = config(&env, "1.0.0", tcp_port(8080, 80)).to_string();
    let ns = container_ns(&env, "k");
    let id = Some(("killed", "eth0"));
    // The network first, so the steps are the container's.
    let plain = config(&env, "1.0.0", json!({})).to_string();
    cni(
        Some("ADD"),
        Some(("first", "eth0")),
        Some(&container_ns(&env, "f")),
        &plain,
    )
    .ok();
    let steps = fault_steps_of_an_add(&env, &cfg);
    let links_before = host_links(&env);
    for step in &steps {
        let killed = cni_with_env(
            Some("ADD"),
            id,
            Some(&ns),
            &cfg,
            &[("NETD_FAULT_KILL_AT", step)],
        );
        assert_eq!(killed.signal, Some(9), "ADD not killed at {step}");
        cni(Some("DEL"), id, Some(&ns), &cfg).ok();
        assert_eq!(
            containers(&env).len(),
            1,
            "killed at {step}: DEL left a container"
        );
        assert_eq!(
            host_links(&env),
            links_before,
            "killed at {step}: DEL left a link"
        );
        let eth0 = env.run_in(&ns, "ip", &["link", "show", "eth0"]);
        assert!(!eth0.status.success(), "killed at {step}: DEL left eth0");
        // The positive control: the port is free again.
        cni(Some("ADD"), Some(("again", "eth0")), Some(&ns), &cfg).ok();
        cni(Some("DEL"), Some(("again", "eth0")), Some(&ns), &cfg).ok();
    }
    cni(Some("DEL"), Some(("first", "eth0")), None, &plain).ok();
}

/// The fault-injection steps a container ADD passes (netd built with `fault-injection`, as
/// `cargo xtask test` builds it).
fn fault_steps_of_an_add(env: &TestEnv, cfg: &str) -> Vec<String> {
    let ns = container_ns(env, "s");
    let id = Some(("steps", "eth0"));
    let listed = cni_with_env(Some("ADD"), id, Some(&ns), cfg, &[("NETD_FAULT_LIST", "1")]);
    let steps: Vec<String> = listed
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("netd-step "))
        .map(String::from)
        .collect();
    listed.ok();
    assert!(
        !steps.is_empty(),
        "no steps: is netd-cni built with fault-injection?"
    );
    cni(Some("DEL"), id, Some(&ns), cfg).ok();
    steps
}

fn host_links(env: &TestEnv) -> String {
    let out = env.run_in(&env.host_ns(), "ip", &["-br", "link"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_dual_stack_add_gives_both_families_and_publishes_on_both() {
    let env = TestEnv::dual_stack();
    let mut cfg = config(
        &env,
        "0.4.0",
        json!({
            "portMappings": [{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }],
            "ips": ["10.89.0.7/24", "fd00:89::7/64"],
        }),
    );
    cfg["ipv6"] = json!(true);
    cfg["subnet6"] = json!("fd00:89::/64");
    cfg["datapath"] = json!("iptables");
    let ns = container_ns(&env, "c6");
    let result = call("ADD", "ctr6", Some(&ns), &cfg).ok();
    assert_eq!(result["ips"][0]["address"], "10.89.0.7/24", "{result}");
    assert_eq!(result["ips"][1]["address"], "fd00:89::7/64", "{result}");
    assert_eq!(result["ips"][1]["gateway"], "fd00:89::1");
    assert_eq!(result["ips"][1]["version"], "6");
    assert_eq!(
        result["routes"][1],
        json!({ "dst": "::/0", "gw": "fd00:89::1" })
    );

    // Both families reach the published port from the outside, and host processes through
    // loopback (the userland proxies netd-cni started: its own executable).
    let server = tests::cli::echo_servers(&env, &ns, "[::]:80".parse().unwrap(), 4);
    for host in [HOST_ADDR6.into(), HOST_ADDR.into()] {
        let reply = tests::cli::tcp_echo(&env, &env.outside_ns(), SocketAddr::new(host, 8080));
        assert_eq!(reply.unwrap(), "netd", "to {host}");
    }
    for lo in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
        let reply = tests::cli::tcp_echo(&env, &env.host_ns(), SocketAddr::new(lo, 8080));
        assert_eq!(reply.unwrap(), "netd", "to {lo}");
    }
    server.join().unwrap();
    assert_eq!(proxies(&env).len(), 2, "{:?}", proxies(&env));

    let mut check = cfg.clone();
    check["prevResult"] = result.clone();
    call("CHECK", "ctr6", Some(&ns), &check).ok();
    check["prevResult"]["ips"][1]["address"] = json!("fd00:89::8/64");
    assert_eq!(call("CHECK", "ctr6", Some(&ns), &check).code(), 100);

    // Two addresses of one family, and IPv6 on a network made without it, are refused.
    let mut two = cfg.clone();
    two["runtimeConfig"]["ips"] = json!(["fd00:89::8/64", "fd00:89::9/64"]);
    let other = container_ns(&env, "c7");
    assert_eq!(call("ADD", "ctr7", Some(&other), &two).code(), 7);
    let mut v4 = cfg.clone();
    v4["ipv6"] = json!(false);
    v4.as_object_mut().unwrap().remove("subnet6");
    assert_eq!(call("ADD", "ctr7", Some(&other), &v4).code(), 7);

    call("DEL", "ctr6", Some(&ns), &cfg).ok();
    assert!(containers(&env).is_empty());
    assert_eq!(proxies(&env), Vec::<String>::new());
    env.netd_ok(&["network", "rm", "cninet"]);
    let rules =
        String::from_utf8(env.run_in(&env.host_ns(), "ip6tables-save", &[]).stdout).unwrap();
    assert!(!rules.contains("NETD"), "left:\n{rules}");
}

#[test]
fn a_dual_stack_network_on_the_ebpf_datapath_masquerades_or_routes_its_ipv6() {
    let env = TestEnv::dual_stack();
    let mut cfg = config(&env, "0.4.0", json!({}));
    cfg["ipv6"] = json!(true);
    cfg["subnet6"] = json!("fd00:8a::/64");
    let ip6_of = |result: &Value| -> Ipv6Addr {
        let cidr = result["ips"][1]["address"].as_str().unwrap();
        cidr.split('/').next().unwrap().parse().unwrap()
    };

    // Masquerading (the default): the container gets an IPv6 address and route, and reaches
    // the outside over IPv6 as the host (NAT66).
    let a = container_ns(&env, "a");
    let result = call("ADD", "ctra", Some(&a), &cfg).ok();
    assert!(
        ip6_of(&result).to_string().starts_with("fd00:8a::"),
        "{result}"
    );
    assert_eq!(
        result["routes"][1],
        json!({ "dst": "::/0", "gw": "fd00:8a::1" })
    );
    let outside = SocketAddr::new(OUTSIDE_ADDR6.into(), 9000);
    let server = tests::cli::echo_server(&env, &env.outside_ns(), outside);
    tests::cli::assert_echoed(&env, &a, outside);
    assert_eq!(server.join().unwrap().ip(), IpAddr::from(HOST_ADDR6));
    call("DEL", "ctra", Some(&a), &cfg).ok();
    assert!(containers(&env).is_empty());
    env.netd_ok(&["network", "rm", "cninet"]);

    // Routed, its containers reach each other over IPv6 (the programs' fast path).
    cfg["masquerade"] = json!(false);
    let b = container_ns(&env, "b");
    let a6 = ip6_of(&call("ADD", "ctra", Some(&a), &cfg).ok());
    call("ADD", "ctrb", Some(&b), &cfg).ok();
    let server = tests::cli::echo_server(&env, &a, SocketAddr::new(a6.into(), 80));
    tests::cli::assert_echoed(&env, &b, SocketAddr::new(a6.into(), 80));
    server.join().unwrap();

    call("DEL", "ctrb", Some(&b), &cfg).ok();
    call("DEL", "ctra", Some(&a), &cfg).ok();
    assert!(containers(&env).is_empty());
    env.netd_ok(&["network", "rm", "cninet"]);
}
