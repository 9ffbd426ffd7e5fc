//! Docker 20.10 (Debian's docker.io) runs containers on netd networks through netd's network
//! and IPAM driver: a dockerd of its own in the sandbox host namespace, with Docker's own
//! networking off (no docker0, no iptables rules, no proxy), discovering the driver's socket
//! in a plugin dir only it sees.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use netd_bench::bench::docker::{Dockerd, IMAGE, Options};
use tests::{
    engines::{NetdDaemon, host_tcp_ask, tcp_ask, tcp_name_server},
    flow::Flow,
    harness::{HOST_ADDR, HOST_ADDR6, OUTSIDE_ADDR6, TestEnv},
};

/// A dockerd and a netd daemon serving the driver `name` to it.
struct World {
    env: TestEnv,
    name: String,
    // Dropped first: the containers and networks go while netd still answers.
    dockerd: Option<Dockerd>,
    daemon: Option<NetdDaemon>,
}

impl World {
    fn new() -> Self {
        Self::with_live_restore(false)
    }

    fn with_live_restore(live_restore: bool) -> Self {
        Self::start(live_restore, true)
    }

    /// A dockerd with Docker's own networking (bridge driver, iptables rules) and no netd:
    /// the reference netd's driver is held to.
    fn docker_bridge() -> Self {
        Self::start(false, false)
    }

    fn start(live_restore: bool, with_netd: bool) -> Self {
        Self::start_in(TestEnv::new(), live_restore, with_netd)
    }

    /// A dockerd and netd in a sandbox whose uplink carries IPv6 too.
    fn dual_stack() -> Self {
        Self::start_in(TestEnv::dual_stack(), false, true)
    }

    fn start_in(env: TestEnv, live_restore: bool, with_netd: bool) -> Self {
        let name = format!("netd{}", env.prefix);
        let mut world = Self {
            env,
            name,
            dockerd: None,
            daemon: None,
        };
        if with_netd {
            let args = world.daemon_args();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            world.daemon = Some(NetdDaemon::start(&world.env, &args, &world.socket()));
        }
        let dockerd = Dockerd::start_with(
            &world.env.host_ns(),
            &world.env.state_dir.join("docker"),
            &Options {
                docker_networking: !with_netd,
                plugin_dir: with_netd.then(|| world.env.state_dir.join("plugins")),
                live_restore,
                ..Options::default()
            },
        )
        .unwrap_or_else(|e| panic!("dockerd cannot run here: {e:#}"));
        world.dockerd = Some(dockerd);
        world
    }

    /// `kill -9` the netd daemon and start it again (it rebuilds its view from netd's state).
    fn restart_daemon(&mut self) {
        let args = self.daemon_args();
        self.daemon.take().unwrap().kill();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.daemon = Some(NetdDaemon::start(&self.env, &args, &self.socket()));
    }

    fn socket(&self) -> PathBuf {
        self.env
            .state_dir
            .join("plugins")
            .join(format!("{}.sock", self.name))
    }

    fn daemon_args(&self) -> Vec<String> {
        let dir = self.env.state_dir.join("plugins");
        vec![
            "--docker-plugin".into(),
            self.name.clone(),
            "--docker-plugin-dir".into(),
            dir.display().to_string(),
        ]
    }

    fn docker(&self, args: &[&str]) -> String {
        self.dockerd
            .as_ref()
            .unwrap()
            .docker(args)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn docker_err(&self, args: &[&str]) -> String {
        match self.dockerd.as_ref().unwrap().docker(args) {
            Ok(out) => panic!("docker {args:?} should have failed: {out}"),
            Err(e) => format!("{e:#}"),
        }
    }

    fn netd_names(&self, what: &str) -> Vec<String> {
        self.env
            .netd_json(&[what, "ls", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// The network namespace of a running container (through its init's PID).
    /// `docker run -d --name NAME --network NETWORK EXTRA... IMAGE sleep 1d`.
    fn run(&self, name: &str, network: &str, extra: &[&str]) {
        let args = [
            &["run", "-d", "--name", name, "--network", network][..],
            extra,
            &[IMAGE, "sleep", "1d"],
        ]
        .concat();
        self.docker(&args);
    }

    fn netns_of(&self, container: &str) -> PathBuf {
        let pid = self.docker(&["inspect", "-f", "{{.State.Pid}}", container]);
        PathBuf::from(format!("/proc/{pid}/ns/net"))
    }

    fn ip_of(&self, container: &str) -> Ipv4Addr {
        self.docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            container,
        ])
        .parse()
        .unwrap()
    }

    fn host_links(&self) -> String {
        let out = self.env.run_in(&self.env.host_ns(), "ip", &["-br", "link"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        drop(self.dockerd.take());
        drop(self.daemon.take());
    }
}

#[test]
fn docker_runs_a_published_container_on_a_netd_network() {
    let w = World::new();
    let links_before = w.host_links();
    let d = w.name.as_str();
    w.docker(&[
        "network",
        "create",
        "-d",
        d,
        "--ipam-driver",
        d,
        "--subnet",
        "10.77.0.0/24",
        "n1",
    ]);
    let nets = w.env.netd_json(&["network", "ls", "--json"]);
    let net = &nets[0];
    assert_eq!(net["subnet"], "10.77.0.0/24", "{nets}");
    assert!(net["name"].as_str().unwrap().starts_with("docker-"));

    w.run("web", "n1", &["-p", "8080:80"]);
    let web_ns = w.netns_of("web");
    let ip = w.docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}/{{.IPPrefixLen}} {{.Gateway}} {{.MacAddress}}{{end}}",
        "web",
    ]);
    let containers = w.env.netd_json(&["container", "ls", "--json"]);
    let ours = &containers[0];
    assert_eq!(
        ip,
        format!(
            "{}/24 10.77.0.1 {}",
            ours["ip"].as_str().unwrap(),
            ours["mac"].as_str().unwrap()
        ),
        "docker and netd disagree: {containers}"
    );
    // Docker named the interface and routed through netd's gateway.
    let route = w.env.run_in(&web_ns, "ip", &["route", "show", "default"]);
    assert!(String::from_utf8_lossy(&route.stdout).contains("via 10.77.0.1 dev eth0"));

    tcp_name_server(&w.env, &web_ns, 80, "web");
    let published = SocketAddr::from((HOST_ADDR, 8080));
    assert_eq!(
        tcp_ask(&w.env, &w.env.outside_ns(), published).unwrap(),
        "web"
    );
    assert_eq!(host_tcp_ask(&w.env, published), "web");
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 8080));
    assert_eq!(host_tcp_ask(&w.env, loopback), "web");
    // Hairpin: the container reaches its own published port through the host's address.
    assert_eq!(tcp_ask(&w.env, &web_ns, published).unwrap(), "web");
    let unpublished = SocketAddr::from((HOST_ADDR, 8081));
    assert!(tcp_ask(&w.env, &w.env.outside_ns(), unpublished).is_err());
    assert_eq!(host_tcp_ask(&w.env, unpublished), "");
    // Not Docker's doing: it wrote no NAT rule and runs no proxy.
    let nat = w
        .env
        .run_in(&w.env.host_ns(), "iptables-save", &["-t", "nat"]);
    let nat = String::from_utf8_lossy(&nat.stdout);
    assert!(
        !nat.contains("-A "),
        "rules in the sandbox's nat table:\n{nat}"
    );

    // `-p 18000-18002:80`: one free host port of the range for port 80, as Docker's bridge
    // takes (18000, as the range is free), and no other container port.
    w.run("ranged", "n1", &["-p", "18000-18002:80"]);
    let mappings: Vec<(u64, u64)> = w
        .env
        .netd_json(&["container", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .map(|p| {
            (
                p["host_port"].as_u64().unwrap(),
                p["container_port"].as_u64().unwrap(),
            )
        })
        .filter(|(host, _)| (18000..=18002).contains(host))
        .collect();
    assert_eq!(mappings, [(18000, 80)]);
    w.docker(&["rm", "-f", "ranged"]);

    w.docker(&["rm", "-f", "web"]);
    assert!(w.netd_names("container").is_empty());
    assert!(tcp_ask(&w.env, &w.env.outside_ns(), published).is_err());
    w.docker(&["network", "rm", "n1"]);
    assert!(w.netd_names("network").is_empty());
    assert_eq!(w.host_links(), links_before, "links left on the host");
}

#[test]
fn docker_runs_a_dual_stack_container_on_a_netd_network() {
    let w = World::dual_stack();
    let d = w.name.as_str();
    w.docker(&[
        "network",
        "create",
        "-d",
        d,
        "--ipam-driver",
        d,
        "--ipv6",
        "--subnet",
        "10.78.0.0/24",
        "--subnet",
        "fd00:78::/64",
        "-o",
        "datapath=iptables",
        "n6",
    ]);
    let net = &w.env.netd_json(&["network", "ls", "--json"])[0];
    assert_eq!(
        (net["subnet6"].as_str(), net["gateway6"].as_str()),
        (Some("fd00:78::/64"), Some("fd00:78::1")),
        "{net}"
    );
    w.run(
        "web",
        "n6",
        &["-p", "8080:80", "-p", &format!("[{HOST_ADDR6}]:8081:81")],
    );
    let ns = w.netns_of("web");
    let docker_ip6 = w.docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.GlobalIPv6Address}}/{{.GlobalIPv6PrefixLen}} {{.IPv6Gateway}}{{end}}",
        "web",
    ]);
    let ours = &w.env.netd_json(&["container", "ls", "--json"])[0];
    assert_eq!(
        docker_ip6,
        format!("{}/64 fd00:78::1", ours["ip6"].as_str().unwrap()),
        "docker and netd disagree: {ours}"
    );
    let route = w.env.run_in(&ns, "ip", &["-6", "route", "show", "default"]);
    assert!(
        String::from_utf8_lossy(&route.stdout).contains("via fd00:78::1 dev eth0"),
        "{route:?}"
    );
    // In over both families, out over IPv6 (NAT66).
    let server = tests::cli::echo_servers(&w.env, &ns, "[::]:80".parse().unwrap(), 2);
    for host in [IpAddr::from(HOST_ADDR6), IpAddr::from(HOST_ADDR)] {
        let to = SocketAddr::new(host, 8080);
        tests::cli::assert_echoed(&w.env, &w.env.outside_ns(), to);
    }
    server.join().unwrap();
    // Published on one IPv6 address: that address answers, the IPv4 one doesn't.
    let server = tests::cli::echo_servers(&w.env, &ns, "[::]:81".parse().unwrap(), 1);
    let to = SocketAddr::new(HOST_ADDR6.into(), 8081);
    tests::cli::assert_echoed(&w.env, &w.env.outside_ns(), to);
    server.join().unwrap();
    let v4 = SocketAddr::new(HOST_ADDR.into(), 8081);
    assert!(tests::cli::tcp_echo(&w.env, &w.env.outside_ns(), v4).is_err());
    let outside = SocketAddr::new(OUTSIDE_ADDR6.into(), 9000);
    let server = tests::cli::echo_server(&w.env, &w.env.outside_ns(), outside);
    tests::cli::assert_echoed(&w.env, &ns, outside);
    assert_eq!(server.join().unwrap().ip(), IpAddr::from(HOST_ADDR6));

    w.docker(&["rm", "-f", "web"]);
    w.docker(&["network", "rm", "n6"]);
    assert!(w.netd_names("network").is_empty());
    let rules = w.env.run_in(&w.env.host_ns(), "ip6tables-save", &[]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(!rules.contains("NETD"), "left:\n{rules}");
}

#[test]
fn ipam_picks_a_subnet_and_bad_options_are_refused() {
    let w = World::new();
    let d = w.name.as_str();
    w.docker(&["network", "create", "-d", d, "--ipam-driver", d, "auto"]);
    let subnet = w.docker(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
        "auto",
    ]);
    let nets = w.env.netd_json(&["network", "ls", "--json"]);
    assert_eq!(nets[0]["subnet"], subnet.as_str(), "{nets}");

    let err = w.docker_err(&[
        "network",
        "create",
        "-d",
        d,
        "--ipam-driver",
        d,
        "-o",
        "colour=blue",
        "bad",
    ]);
    assert!(err.contains("unknown option \"colour\""), "{err}");
    let err = w.docker_err(&[
        "network",
        "create",
        "-d",
        d,
        "--ipam-driver",
        d,
        "--subnet",
        subnet.as_str(),
        "clash",
    ]);
    assert!(err.contains("overlaps"), "{err}");
    assert_eq!(w.netd_names("network").len(), 1);
    w.docker(&["network", "rm", "auto"]);
    assert!(w.netd_names("network").is_empty());
}

/// What Docker's bridge does for user-defined networks: `-o icc=false` keeps a network's
/// containers apart, `--internal` keeps them in, `--link` is a name (Docker's DNS).
#[test]
fn icc_false_internal_and_link_behave_as_on_dockers_bridge() {
    let w = World::new();
    let d = w.name.as_str();
    for (name, extra) in [
        ("open", ""),
        ("closed", "icc=false"),
        ("inside", "internal"),
    ] {
        let mut args = vec!["network", "create", "-d", d, "--ipam-driver", d];
        match extra {
            "icc=false" => args.extend(["-o", "icc=false"]),
            "internal" => args.push("--internal"),
            _ => {}
        }
        args.push(name);
        w.docker(&args);
    }
    let run = |name: &str, net: &str, extra: &[&str]| {
        w.run(name, net, extra);
        (w.netns_of(name), w.ip_of(name))
    };
    let (a1, _) = run("a1", "open", &[]);
    let (a2, a2_ip) = run("a2", "open", &[]);
    let (c1, _) = run("c1", "closed", &[]);
    let (c2, c2_ip) = run("c2", "closed", &["--expose", "7000"]);
    let (c3, _) = run("c3", "closed", &["--link", "c2:peer"]);
    let (i1, _) = run("i1", "inside", &[]);
    run("l1", "open", &["--link", "a2:peer"]);
    tcp_name_server(&w.env, &a2, 7000, "a2");
    tcp_name_server(&w.env, &c2, 7000, "c2");
    tcp_name_server(&w.env, &w.env.outside_ns(), 9000, "outside");
    let outside = SocketAddr::from((tests::harness::OUTSIDE_ADDR, 9000));

    assert_eq!(
        tcp_ask(&w.env, &a1, SocketAddr::from((a2_ip, 7000))).unwrap(),
        "a2"
    );
    assert!(
        tcp_ask(&w.env, &c1, SocketAddr::from((c2_ip, 7000))).is_err(),
        "icc=false let c1 reach c2"
    );
    // Docker tells a network driver nothing of a --link on a user-defined network, and its
    // own bridge opens nothing for one there (`link_opens_nothing_on_dockers_own_bridge`).
    assert!(
        tcp_ask(&w.env, &c3, SocketAddr::from((c2_ip, 7000))).is_err(),
        "icc=false let c3 reach c2 through --link, which Docker's bridge doesn't"
    );
    assert_eq!(tcp_ask(&w.env, &a1, outside).unwrap(), "outside");
    assert_eq!(tcp_ask(&w.env, &c1, outside).unwrap(), "outside");
    assert!(
        tcp_ask(&w.env, &i1, outside).is_err(),
        "--internal let i1 out"
    );
    // The link's alias resolves to a2 (Docker's embedded DNS) and reaches it.
    let ping = w.docker(&["exec", "l1", "ping", "-c", "1", "-W", "2", "peer"]);
    assert!(ping.contains(&a2_ip.to_string()), "{ping}");

    w.docker(&["rm", "-f", "a1", "a2", "c1", "c2", "c3", "i1", "l1"]);
    for net in ["open", "closed", "inside"] {
        w.docker(&["network", "rm", net]);
    }
    assert!(w.netd_names("container").is_empty());
    assert!(w.netd_names("network").is_empty());
}

/// The reference for the above: Docker's own bridge driver on a user-defined network with
/// icc=false. Docker hands link information (its `ParentEndpoints`/`ChildEndpoints`) to a
/// driver only for the default `bridge` network, so even its own driver opens nothing for a
/// `--link` here, exposed port or not; the same containers on an icc=true network connect.
#[test]
fn link_opens_nothing_on_dockers_own_bridge() {
    let w = World::docker_bridge();
    for (net, subnet, icc) in [
        ("closed", "10.78.0.0/24", "false"),
        ("open", "10.79.0.0/24", "true"),
    ] {
        let icc = format!("com.docker.network.bridge.enable_icc={icc}");
        w.docker(&["network", "create", "--subnet", subnet, "-o", &icc, net]);
        let db = format!("db-{net}");
        let client = format!("client-{net}");
        let link = format!("{db}:peer");
        w.run(&db, net, &["--expose", "7000"]);
        w.run(&client, net, &["--link", &link]);
        tcp_name_server(&w.env, &w.netns_of(&db), 7000, "db");
        let got = tcp_ask(
            &w.env,
            &w.netns_of(&client),
            SocketAddr::from((w.ip_of(&db), 7000)),
        );
        match net {
            "open" => assert_eq!(got.unwrap(), "db"),
            _ => assert!(got.is_err(), "Docker's bridge opened a --link: {got:?}"),
        }
        w.docker(&["rm", "-f", &db, &client]);
        w.docker(&["network", "rm", net]);
    }
}

/// The datapath carries a flow while the netd daemon is killed and started again, and the new
/// daemon serves Docker from netd's state: it removes the old container and runs a new one.
#[test]
fn a_flow_survives_kill_9_of_the_netd_daemon_which_then_serves_docker_from_its_state() {
    let mut w = World::new();
    let d = w.name.clone();
    w.docker(&["network", "create", "-d", &d, "--ipam-driver", &d, "n1"]);
    w.run("srv", "n1", &["-p", "15201:5201"]);
    let flow = serve_flow(&w, "srv");
    flow.assert_moving(&w.env, Duration::from_secs(2), "before the restart");
    w.restart_daemon();
    flow.assert_moving(&w.env, Duration::from_secs(2), "after the restart");
    flow.stop_and_assert_never_stalled();

    // The restarted daemon knows the endpoint and the network from netd's state.
    w.docker(&["rm", "-f", "srv"]);
    assert!(w.netd_names("container").is_empty());
    w.run("next", "n1", &["-p", "8080:80"]);
    tcp_name_server(&w.env, &w.netns_of("next"), 80, "next");
    let published = SocketAddr::from((HOST_ADDR, 8080));
    assert_eq!(
        tcp_ask(&w.env, &w.env.outside_ns(), published).unwrap(),
        "next"
    );
    w.docker(&["rm", "-f", "next"]);
    w.docker(&["network", "rm", "n1"]);
    assert!(w.netd_names("network").is_empty());
}

/// dockerd restarted with `--live-restore`: the container runs on, its flow through netd's
/// datapath never stalls, and the new dockerd still runs and removes containers through netd.
#[test]
fn a_flow_survives_a_dockerd_restart() {
    let mut w = World::with_live_restore(true);
    let d = w.name.clone();
    w.docker(&["network", "create", "-d", &d, "--ipam-driver", &d, "n1"]);
    w.run("srv", "n1", &["-p", "15201:5201"]);
    let flow = serve_flow(&w, "srv");
    flow.assert_moving(&w.env, Duration::from_secs(2), "before the restart");
    w.dockerd.as_mut().unwrap().restart().unwrap();
    flow.assert_moving(&w.env, Duration::from_secs(2), "after the restart");
    flow.stop_and_assert_never_stalled();

    w.run("next", "n1", &[]);
    assert_eq!(w.netd_names("container").len(), 2);
    w.docker(&["rm", "-f", "srv", "next"]);
    w.docker(&["network", "rm", "n1"]);
    assert!(w.netd_names("container").is_empty());
    assert!(w.netd_names("network").is_empty());
}

/// ProgramExternalConnectivity publishes Docker's port map and records its exposed ports
/// (twice is the same as once); RevokeExternalConnectivity unpublishes them (twice too). Docker
/// moves a container's way out when it joins a network that sorts first: the published port
/// follows it there and back, which takes both (the port can't be on two endpoints at once).
#[test]
fn published_ports_follow_program_and_revoke_external_connectivity() {
    let w = World::new();
    let d = w.name.as_str();
    for net in ["n2", "n1"] {
        w.docker(&["network", "create", "-d", d, "--ipam-driver", d, net]);
    }
    w.run("web", "n2", &["-p", "8080:80", "--expose", "7000/udp"]);
    tcp_name_server(&w.env, &w.netns_of("web"), 80, "web");
    let published = SocketAddr::from((HOST_ADDR, 8080));
    let ask = || tcp_ask(&w.env, &w.env.outside_ns(), published);
    assert_eq!(ask().unwrap(), "web");
    let on = |net: &str, what: &str| {
        let format = format!("{{{{(index .NetworkSettings.Networks \"{net}\").{what}}}}}");
        w.docker(&["inspect", "-f", &format, "web"])
    };
    // netd's container for web's endpoint on `net`, by its address.
    let netd_endpoint = |net: &str| {
        let ip = on(net, "IPAddress");
        let all = w.env.netd_json(&["container", "ls", "--json"]);
        all.as_array()
            .unwrap()
            .iter()
            .find(|c| c["ip"] == ip.as_str())
            .unwrap_or_else(|| panic!("no netd container at {ip}: {all}"))
            .clone()
    };
    let host_ports = |c: &serde_json::Value| -> Vec<u64> {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["host_port"].as_u64().unwrap())
            .collect()
    };
    let ep = netd_endpoint("n2");
    assert_eq!(host_ports(&ep), [8080]);
    assert_eq!(
        ep["exposed"],
        serde_json::json!([{"proto": "tcp", "port": 80}, {"proto": "udp", "port": 7000}])
    );

    // Docker's own requests again (as after a restart of dockerd): nothing changes.
    let request = serde_json::json!({
        "NetworkID": on("n2", "NetworkID"),
        "EndpointID": on("n2", "EndpointID"),
        "Options": {
            "com.docker.network.endpoint.exposedports": [{"Proto": 6, "Port": 80}, {"Proto": 17, "Port": 7000}],
            "com.docker.network.portmap": [{"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080}],
        },
    })
    .to_string();
    let post = |verb: &str| {
        let (status, body) = plugin_post(&w.socket(), verb, &request);
        assert_eq!((status, &body), (200, &serde_json::json!({})), "{verb}");
    };
    post("NetworkDriver.ProgramExternalConnectivity");
    assert_eq!(host_ports(&netd_endpoint("n2")), [8080]);
    assert_eq!(ask().unwrap(), "web");
    // Revoked (twice): new connections are refused; programmed again, they get in.
    post("NetworkDriver.RevokeExternalConnectivity");
    post("NetworkDriver.RevokeExternalConnectivity");
    let ep = netd_endpoint("n2");
    assert!(
        host_ports(&ep).is_empty() && ep["exposed"] == serde_json::json!([]),
        "{ep}"
    );
    assert_eq!(
        ask().unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    post("NetworkDriver.ProgramExternalConnectivity");
    assert_eq!(ask().unwrap(), "web");

    // n1 sorts first: Docker revokes on n2's endpoint and programs n1's.
    w.docker(&["network", "connect", "n1", "web"]);
    assert!(host_ports(&netd_endpoint("n2")).is_empty());
    assert_eq!(host_ports(&netd_endpoint("n1")), [8080]);
    assert_eq!(ask().unwrap(), "web");
    w.docker(&["network", "disconnect", "n1", "web"]);
    assert_eq!(host_ports(&netd_endpoint("n2")), [8080]);
    assert_eq!(ask().unwrap(), "web");

    w.docker(&["rm", "-f", "web"]);
    for net in ["n1", "n2"] {
        w.docker(&["network", "rm", net]);
    }
    assert!(w.netd_names("container").is_empty());
}

/// An iperf3 flow from the outside to `container`'s published port 15201 (container 5201).
fn serve_flow(w: &World, container: &str) -> Flow {
    let ns = w.netns_of(container);
    w.env.spawn_in(&ns, "iperf3", &["-s", "-p", "5201"]);
    netd::netns::wait_tcp_listener(&ns, 5201, Duration::from_secs(5)).unwrap();
    Flow::start(&w.env, HOST_ADDR.into(), 15201)
}

/// One request to the plugin on `socket`, as Docker posts it: the status and the JSON answer.
fn plugin_post(socket: &std::path::Path, verb: &str, body: &str) -> (u16, serde_json::Value) {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        s,
        "POST /{verb} HTTP/1.1\r\nHost: plugin\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply[9..12].parse().unwrap();
    let json = reply.split("\r\n\r\n").nth(1).unwrap();
    (status, serde_json::from_str(json).unwrap())
}

/// What IPAM hands out lives in netd's state: a daemon killed between Docker's RequestPool and
/// its CreateNetwork (or a RequestAddress and its CreateEndpoint) hands none of it out again
/// once restarted; ReleasePool gives the pool back.
#[test]
fn ipam_pools_and_addresses_survive_kill_9_of_the_daemon() {
    let env = TestEnv::new();
    let socket = env.state_dir.join("plugins/p.sock");
    let dir = env.state_dir.join("plugins").display().to_string();
    let args = ["--docker-plugin", "p", "--docker-plugin-dir", &dir];
    let daemon = NetdDaemon::start(&env, &args, &socket);
    let ok = |verb: &str, body: serde_json::Value| {
        let (status, answer) = plugin_post(&socket, verb, &body.to_string());
        assert!(
            status == 200 && answer.get("Error").is_none(),
            "{verb}: {answer}"
        );
        answer
    };
    let auto = serde_json::json!({"AddressSpace": "netd", "Pool": "", "SubPool": "", "Options": {}, "V6": false});
    let address =
        |pool_id: &str| serde_json::json!({"PoolID": pool_id, "Address": "", "Options": {}});
    let first = ok("IpamDriver.RequestPool", auto.clone());
    let pool_id = first["PoolID"].as_str().unwrap().to_string();
    let gateway = serde_json::json!({"PoolID": pool_id, "Address": "",
        "Options": {"RequestAddressType": "com.docker.network.gateway"}});
    ok("IpamDriver.RequestAddress", gateway);
    let handed_out = ok("IpamDriver.RequestAddress", address(&pool_id));

    daemon.kill();
    let _daemon = NetdDaemon::start(&env, &args, &socket);
    // Still handed out: the next automatic pool is another one, and so is the next address.
    let second = ok("IpamDriver.RequestPool", auto.clone());
    assert_ne!(second["Pool"], first["Pool"]);
    let next = ok("IpamDriver.RequestAddress", address(&pool_id));
    assert_ne!(next["Address"], handed_out["Address"]);
    // Nor does `netd network create` pick them.
    env.netd_ok(&["network", "create", "cli"]);
    let cli = &env.netd_json(&["network", "inspect", "cli"])["network"];
    assert!(cli["subnet"].is_string(), "{cli}");
    for pool in [&first, &second] {
        assert_ne!(cli["subnet"], pool["Pool"], "{cli}");
    }
    env.netd_ok(&["network", "rm", "cli"]);
    // Released, the first pool is the first free one again (the pick is deterministic).
    for pool in [&second, &first] {
        ok(
            "IpamDriver.ReleasePool",
            serde_json::json!({"PoolID": pool["PoolID"]}),
        );
    }
    assert_eq!(ok("IpamDriver.RequestPool", auto)["Pool"], first["Pool"]);
}

/// The protocol as Docker's plugin client sees it: activation, 404 for what netd doesn't
/// implement, 400 for a body it can't decode, and errors in the field each API reads.
#[test]
fn the_plugin_socket_speaks_dockers_protocol() {
    let env = TestEnv::new();
    let socket = env.state_dir.join("plugins/p.sock");
    let dir = env.state_dir.join("plugins").display().to_string();
    let _daemon = NetdDaemon::start(
        &env,
        &["--docker-plugin", "p", "--docker-plugin-dir", &dir],
        &socket,
    );
    let post = |verb: &str, body: &str| plugin_post(&socket, verb, body);
    let (status, body) = post("Plugin.Activate", "");
    assert_eq!(status, 200);
    assert_eq!(
        body["Implements"],
        serde_json::json!(["NetworkDriver", "IpamDriver"])
    );
    assert_eq!(
        post("NetworkDriver.GetCapabilities", "").1["Scope"],
        "local"
    );
    let (status, body) = post("NetworkDriver.AllocateNetwork", "{}");
    assert_eq!(status, 404);
    assert!(body["Err"].as_str().unwrap().contains("does not implement"));
    assert_eq!(post("NetworkDriver.CreateNetwork", "{not json").0, 400);
    // Docker's plugin client reads `Err` from any answer but 200, IPAM's too.
    let (status, body) = post("IpamDriver.RequestPool", "{not json");
    assert_eq!(status, 400);
    assert!(
        body["Err"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    // A failed operation: 200 with the API's error field.
    let (status, body) = post("IpamDriver.RequestPool", r#"{"Pool":"10.0.0.0/33"}"#);
    assert_eq!(status, 200);
    assert!(
        body["Error"].as_str().unwrap().contains("10.0.0.0/33"),
        "{body}"
    );
    let (status, body) = post(
        "NetworkDriver.DeleteEndpoint",
        r#"{"NetworkID":"x","EndpointID":"nothex"}"#,
    );
    assert_eq!(status, 200);
    assert!(
        body["Err"].as_str().unwrap().contains("invalid Docker ID"),
        "{body}"
    );
    // An ID is all 64 characters of it, not its first 12.
    let (_, body) = post(
        "NetworkDriver.DeleteEndpoint",
        &format!(
            r#"{{"NetworkID":"{}","EndpointID":"abcdef012345/../x"}}"#,
            "0".repeat(64)
        ),
    );
    assert!(
        body["Err"].as_str().unwrap().contains("invalid Docker ID"),
        "{body}"
    );
    // No address from a pool nobody asked for.
    let (_, body) = post(
        "IpamDriver.RequestAddress",
        r#"{"PoolID":"netd/0.0.0.0/0","Address":""}"#,
    );
    assert!(
        body["Error"].as_str().unwrap().contains("unknown pool"),
        "{body}"
    );
    // A well-formed request succeeds (the positive control).
    let (status, body) = post("IpamDriver.RequestPool", r#"{"Pool":"10.66.0.0/24"}"#);
    assert_eq!(
        (status, body["PoolID"].as_str()),
        (200, Some("netd/10.66.0.0/24"))
    );
    // A pool is one network's: none overlapping it is handed out while it is.
    let (_, again) = post("IpamDriver.RequestPool", r#"{"Pool":"10.66.0.0/25"}"#);
    assert!(
        again["Error"]
            .as_str()
            .unwrap()
            .contains("overlaps pool 10.66.0.0/24"),
        "{again}"
    );
    // An address handed out is not the gateway too.
    let address = |text: &str| {
        post(
            "IpamDriver.RequestAddress",
            &format!(r#"{{"PoolID":"netd/10.66.0.0/24","Address":"10.66.0.9",{text}}}"#),
        )
        .1
    };
    assert_eq!(address(r#""Options":{}"#)["Address"], "10.66.0.9/24");
    let gateway = address(r#""Options":{"RequestAddressType":"com.docker.network.gateway"}"#);
    assert!(
        gateway["Error"]
            .as_str()
            .unwrap()
            .contains("already handed out"),
        "{gateway}"
    );
    // What the IPAM handed out is the endpoint's it was for: netd's own allocation on the
    // network skips it.
    let lowest = post(
        "IpamDriver.RequestAddress",
        r#"{"PoolID":"netd/10.66.0.0/24","Address":""}"#,
    )
    .1;
    assert_eq!(lowest["Address"], "10.66.0.2/24");
    env.netd_ok(&["network", "create", "dn", "--subnet", "10.66.0.0/24"]);
    let c = env.name("c");
    env.netd_ok(&["container", "create", &c, "--network", "dn"]);
    let created = env.netd_json(&["container", "inspect", &c]);
    assert_eq!(created["ip"], "10.66.0.3", "{created}");
    env.netd_ok(&["container", "rm", &c]);
    env.netd_ok(&["network", "rm", "dn"]);
}
