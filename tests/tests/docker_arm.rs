//! The Docker arm of the benchmark: a real dockerd in the sandbox host namespace publishes a
//! container's port; a client in the outside namespace reaches it through Docker's DNAT; and
//! dropping the dockerd leaves no process, mount, file or namespace behind.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::Command,
    time::Instant,
};

use netd_bench::bench::docker::{self, Dockerd, Protocol};
use tests::{
    harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv},
    traffic::{echo_server, tcp_request},
};

const MESSAGE: &str = "through docker's DNAT and back";

#[test]
fn docker_publishes_a_container_port_inside_the_sandbox() {
    // `cargo xtask setup` installs docker.io and busybox-static; where it could not, say why.
    if let Err(e) = docker::check_installed() {
        eprintln!("skipped: the Docker arm cannot run here: {e:#}");
        return;
    }
    let env = TestEnv::new();
    let workdir = env.state_dir.join("docker");
    let machine_nat = machine_nat_rules();

    let t = Instant::now();
    let dockerd = Dockerd::start(&env.host_ns(), &workdir)
        .unwrap_or_else(|e| panic!("the Docker arm cannot run here: {e:#}"));
    eprintln!("Dockerd::start: {:?}", t.elapsed());
    let t = Instant::now();
    let web = dockerd
        .run(
            "web",
            &[(8080, 80, Protocol::Tcp), (5353, 53, Protocol::Udp)],
        )
        .unwrap();
    eprintln!("Dockerd::run (2 published ports): {:?}", t.elapsed());

    let server = echo_server(&web.netns, 80);
    let echoed = tcp_request(
        &env.outside_ns(),
        SocketAddr::new(HOST_ADDR.into(), 8080),
        MESSAGE,
    )
    .unwrap();
    assert_eq!(echoed, MESSAGE);
    let peer = server.join().unwrap().ip();
    // The client's own address: DNAT carried it, not docker-proxy (which would show the bridge
    // gateway).
    assert_eq!(peer, IpAddr::from(OUTSIDE_ADDR), "server saw {peer}");

    let nat = String::from_utf8(
        env.run_in(&env.host_ns(), "iptables-save", &["-t", "nat"])
            .stdout,
    )
    .unwrap();
    for expected in [
        format!(
            "-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination {}:80",
            web.ip
        ),
        format!(
            "-A DOCKER ! -i docker0 -p udp -m udp --dport 5353 -j DNAT --to-destination {}:53",
            web.ip
        ),
    ] {
        assert!(nat.contains(&expected), "missing {expected:?} in:\n{nat}");
    }
    assert_eq!(
        machine_nat_rules(),
        machine_nat,
        "the machine's own NAT rules changed"
    );

    time_runs_and_removes(&dockerd);

    let dockerd_pid = dockerd.pid();
    let host_netns = fs::metadata(env.host_ns()).unwrap().ino();
    drop(dockerd);
    assert!(
        !Path::new(&format!("/proc/{dockerd_pid}")).exists(),
        "dockerd still runs"
    );
    let workdir_str = workdir.to_str().unwrap();
    assert_eq!(
        processes_mentioning(workdir_str),
        Vec::<u32>::new(),
        "containerd or shims left"
    );
    assert_eq!(
        processes_in_netns(host_netns),
        Vec::<u32>::new(),
        "processes left in the host ns"
    );
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(workdir_str),
        "mounts left under {workdir_str}:\n{mounts}"
    );
    assert!(!workdir.exists(), "{} left", workdir.display());

    let sandbox = env.sandbox.clone();
    drop(env);
    let netns_list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns_list = String::from_utf8_lossy(&netns_list.stdout);
    // Exact names: another test's prefix can start with ours (nt12x0 vs nt123x0).
    assert!(
        !netns_list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .any(|name| name == sandbox.host || name == sandbox.outside),
        "namespaces left:\n{netns_list}"
    );
}

/// Times `run` for containers without published ports, and checks that `remove` ends each.
fn time_runs_and_removes(dockerd: &Dockerd) {
    for i in 0..3 {
        let name = format!("extra{i}");
        let t = Instant::now();
        let c = dockerd.run(&name, &[]).unwrap();
        let ran = t.elapsed();
        let t = Instant::now();
        dockerd.remove(&name).unwrap();
        eprintln!("Dockerd::run: {ran:?}, Dockerd::remove: {:?}", t.elapsed());
        assert!(!c.netns.exists(), "{name}'s init still runs after remove");
    }
}

/// The NAT rules of the machine's own namespace (read only).
fn machine_nat_rules() -> String {
    let out = Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Processes whose command line mentions `s` (dockerd, containerd and shims name the workdir).
fn processes_mentioning(s: &str) -> Vec<u32> {
    pids()
        .into_iter()
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(s))
        })
        .collect()
}

/// Processes in the network namespace with inode `ino` (docker-proxy would be one).
fn processes_in_netns(ino: u64) -> Vec<u32> {
    pids()
        .into_iter()
        .filter(|pid| fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == ino))
        .collect()
}
