//! containerd 1.6 (Debian's, with its `ctr`) runs a container on a netd network through
//! netd-cni: `ctr run --cni` gives it a netd address, it reaches the outside masqueraded and
//! the host reaches it, and killing its task and removing it leaves nothing in netd.
//! (ctr passes no port mappings to CNI: published ports are the podman and CNI tests'.)

use std::{
    io::Write as _,
    net::{SocketAddr, TcpListener},
};

use serde_json::{Value, json};
use tests::{
    containerd::Containerd,
    engines::tcp_ask,
    harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv},
};

fn containerd_with_netd_network(env: &TestEnv) -> Option<Containerd> {
    let conflist = json!({
        "cniVersion": "0.4.0",
        "name": "netdnet",
        "plugins": [{
            "type": "netd-cni",
            "subnet": "10.88.9.0/24",
            "stateDir": env.state_dir,
            "bpffs": env.bpffs,
            "hostNetns": env.host_ns(),
            "hostCgroup": env.cgroup,
        }],
    });
    Containerd::start(env, &[&conflist])
        .map_err(|why| eprintln!("skipped: {why}"))
        .ok()
}

/// A TCP server in the outside namespace on `port` that answers each connection with the
/// address it came from.
fn peer_address_server(env: &TestEnv, port: u16) {
    let listener = env.in_ns(&env.outside_ns(), || {
        TcpListener::bind((OUTSIDE_ADDR, port)).unwrap()
    });
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let peer = conn.peer_addr().unwrap().ip().to_string();
            let _ = conn.write_all(peer.as_bytes());
        }
    });
}

fn netd_containers(env: &TestEnv) -> Vec<Value> {
    env.netd_json(&["container", "ls", "--json"])
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn ctr_run_cni_gets_a_netd_address_and_leaves_nothing() {
    let env = TestEnv::new();
    let Some(mut ctrd) = containerd_with_netd_network(&env) else {
        return;
    };
    // The container's own process serves its name on port 80.
    ctrd.run_cni(
        "web",
        &["sh", "-c", "while true; do echo web | nc -l -p 80; done"],
    );

    // netd made the endpoint, and the container's eth0 has its address and default route.
    let listed = netd_containers(&env);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let ip = listed[0]["ip"].as_str().unwrap().to_string();
    assert!(ip.starts_with("10.88.9."), "{ip}");
    let addr = ctrd.exec("web", "addr", &["ip", "-4", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("inet {ip}/24")), "{addr}");
    let routes = ctrd.exec("web", "route", &["ip", "route"]);
    assert!(
        routes.contains("default via 10.88.9.1 dev eth0"),
        "{routes}"
    );

    // The host reaches it through netd's bridge.
    let web = SocketAddr::from((ip.parse::<std::net::Ipv4Addr>().unwrap(), 80));
    assert_eq!(tcp_ask(&env, &env.host_ns(), web).unwrap().trim(), "web");
    // It reaches the outside, masqueraded to the host's address.
    peer_address_server(&env, 9000);
    let seen = ctrd.exec(
        "web",
        "out",
        &["nc", "-w", "2", &OUTSIDE_ADDR.to_string(), "9000"],
    );
    assert_eq!(seen, HOST_ADDR.to_string(), "the outside saw {seen:?}");

    // Killing the task makes ctr DEL the network; then the container goes.
    ctrd.ctr(&["task", "kill", "-s", "SIGKILL", "web"]);
    let status = ctrd.wait_run("web");
    assert_eq!(status.code(), Some(137), "ctr run returned {status}");
    assert_eq!(ctrd.ctr(&["task", "ls", "-q"]), "");
    ctrd.ctr(&["container", "rm", "web"]);
    assert_eq!(netd_containers(&env), Vec::<Value>::new());
    assert!(tcp_ask(&env, &env.host_ns(), web).is_err());
}

/// The README's example: a foreground `ctr run --cni --rm` whose command exits by itself. The
/// command succeeds only with a netd address on eth0; ctr DELs the network and removes the
/// container on the way out.
#[test]
fn ctr_run_cni_rm_to_the_end_leaves_nothing() {
    let env = TestEnv::new();
    let Some(ctrd) = containerd_with_netd_network(&env) else {
        return;
    };
    let has_address = "ip -4 addr show eth0 | grep -q 'inet 10.88.9.' && ip route | grep -q 'default via 10.88.9.1'";
    let status = ctrd.run_cni_to_end("once", &["sh", "-c", has_address]);
    assert!(
        status.success(),
        "the container had no netd address ({status})"
    );
    assert_eq!(ctrd.ctr(&["container", "ls", "-q"]), "");
    assert_eq!(netd_containers(&env), Vec::<Value>::new());
    // The negative control: the same check against another subnet fails.
    let other = ctrd.run_cni_to_end(
        "other",
        &["sh", "-c", "ip -4 addr show eth0 | grep -q 'inet 10.99.'"],
    );
    assert_eq!(other.code(), Some(1));
}

/// `ctr run -d` never DELs the network (ctr's limitation): the endpoint outlives the container,
/// and the next ADD on the network removes it, its namespace gone.
#[test]
fn the_next_add_removes_what_a_detached_ctr_run_left() {
    let env = TestEnv::new();
    let Some(ctrd) = containerd_with_netd_network(&env) else {
        return;
    };
    ctrd.run_cni_detached("bg", &["sleep", "1d"]);
    let listed = netd_containers(&env);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let (ip, veth) = (
        listed[0]["ip"].as_str().unwrap(),
        listed[0]["host_veth"].as_str().unwrap(),
    );
    ctrd.ctr(&["task", "kill", "-s", "SIGKILL", "bg"]);
    ctrd.wait_task("bg", "STOPPED");
    ctrd.ctr(&["task", "rm", "bg"]);
    ctrd.ctr(&["container", "rm", "bg"]);
    assert_eq!(netd_containers(&env).len(), 1, "ctr sent a DEL after all");
    // The kernel removes the veth with the namespace, asynchronously.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while env
        .run_in(&env.host_ns(), "ip", &["link", "show", veth])
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{veth} outlived its namespace"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // The next container gets the address the orphan held: it went first.
    let same_address = format!("ip -4 addr show eth0 | grep -q 'inet {ip}/'");
    let status = ctrd.run_cni_to_end("next", &["sh", "-c", &same_address]);
    assert!(
        status.success(),
        "the next container did not get {ip} ({status})"
    );
    assert_eq!(netd_containers(&env), Vec::<Value>::new());
}
