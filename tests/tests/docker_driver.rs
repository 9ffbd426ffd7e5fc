//! Docker 20.10 (Debian's docker.io) runs containers on netd networks through netd's network
//! and IPAM driver: a dockerd of its own in the sandbox host namespace, with Docker's own
//! networking off (no docker0, no iptables rules, no proxy), discovering the driver's socket
//! in a plugin dir only it sees.

use std::{net::SocketAddr, path::PathBuf};

use netd::bench::docker::{Dockerd, IMAGE, Options};
use tests::{
    engines::{NetdDaemon, tcp_ask, tcp_name_server},
    harness::{HOST_ADDR, TestEnv},
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
        let env = TestEnv::new();
        let name = format!("netd{}", env.prefix);
        let plugins: PathBuf = env.state_dir.join("plugins");
        let socket = plugins.join(format!("{name}.sock"));
        let dir = plugins.to_str().unwrap();
        let daemon = NetdDaemon::start(
            &env,
            &["--docker-plugin", &name, "--docker-plugin-dir", dir],
            &socket,
        );
        let dockerd = Dockerd::start_with(
            &env.host_ns(),
            &env.state_dir.join("docker"),
            &Options {
                docker_networking: false,
                plugin_dir: Some(plugins),
            },
        )
        .unwrap_or_else(|e| panic!("dockerd cannot run here: {e:#}"));
        Self {
            env,
            name,
            dockerd: Some(dockerd),
            daemon: Some(daemon),
        }
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
    fn netns_of(&self, container: &str) -> PathBuf {
        let pid = self.docker(&["inspect", "-f", "{{.State.Pid}}", container]);
        PathBuf::from(format!("/proc/{pid}/ns/net"))
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

    w.docker(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "n1",
        "-p",
        "8080:80",
        IMAGE,
        "sleep",
        "1d",
    ]);
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
    // Not Docker's doing: it wrote no NAT rule and runs no proxy.
    let nat = w
        .env
        .run_in(&w.env.host_ns(), "iptables-save", &["-t", "nat"]);
    let nat = String::from_utf8_lossy(&nat.stdout);
    assert!(
        !nat.contains("-A "),
        "rules in the sandbox's nat table:\n{nat}"
    );

    w.docker(&["rm", "-f", "web"]);
    assert!(w.netd_names("container").is_empty());
    assert!(tcp_ask(&w.env, &w.env.outside_ns(), published).is_err());
    w.docker(&["network", "rm", "n1"]);
    assert!(w.netd_names("network").is_empty());
    assert_eq!(w.host_links(), links_before, "links left on the host");
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
