//! The benchmark's arms. Each is built fresh in its own sandbox for every round and removed
//! after it: `ceiling` (a plain veth pair), and netd with each datapath.

use std::{net::Ipv4Addr, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use super::{
    Path,
    tools::{CRR_PORT, Endpoint, IPERF_PORT, PUBLISH_SHIFT, SOCKPERF_PORT},
};
use crate::{
    netlink::{Netlink, set_sysctl},
    netns,
    sandbox::{HOST_ADDR, Instance, OUTSIDE_ADDR},
};

/// Every arm the benchmark knows, in the order it alternates them.
pub const ARMS: &[&str] = &["ceiling", "ebpf", "iptables"];

/// The subnet of the benchmark network and its two containers' addresses.
const SUBNET: &str = "172.30.0.0/24";
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 10);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 11);

/// What the kernel shows for an arm: evidence that each arm uses only its own datapath.
#[derive(Debug, Default, serde::Serialize)]
pub struct Fairness {
    pub netfilter_rules: usize,
    pub kernel_conntrack: u64,
    pub bpf_programs_attached: usize,
}

/// A built arm.
pub enum World {
    Ceiling(Ceiling),
    Netd(Instance),
}

impl World {
    pub async fn build(arm: &str, prefix: &str) -> Result<Self> {
        match arm {
            "ceiling" => Ok(Self::Ceiling(Ceiling::build(prefix).await?)),
            datapath => Ok(Self::Netd(build_netd(datapath, prefix).await?)),
        }
    }

    /// Where a path's client and server run in this arm.
    pub fn endpoint(&self, path: Path) -> Endpoint {
        match self {
            // One veth pair is the ceiling for every path.
            Self::Ceiling(c) => Endpoint {
                client_ns: netns::path_of(&c.client),
                server_ns: netns::path_of(&c.server),
                target: CEILING_SERVER,
                port_shift: 0,
            },
            Self::Netd(inst) => netd_endpoint(inst, path),
        }
    }

    pub fn fairness(&self) -> Result<Fairness> {
        let ns = match self {
            Self::Ceiling(c) => netns::path_of(&c.server),
            Self::Netd(inst) => inst.sandbox.host_path(),
        };
        fairness_of(&ns)
    }
}

const CEILING_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const CEILING_SERVER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);

/// Two namespaces joined by a veth pair: no bridge, no netfilter, no eBPF.
pub struct Ceiling {
    client: String,
    server: String,
}

impl Ceiling {
    async fn build(prefix: &str) -> Result<Self> {
        let this = Self {
            client: format!("{prefix}-a"),
            server: format!("{prefix}-b"),
        };
        let client = netns::create(&this.client)?;
        let server = netns::create(&this.server)?;
        for ns in [&client, &server] {
            // As in the netd sandboxes: no IPv6 autoconfiguration traffic.
            set_sysctl(Some(ns), "net.ipv6.conf.all.disable_ipv6", "1")?;
            set_sysctl(Some(ns), "net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        let c = Netlink::in_ns(Some(&client))?;
        let s = Netlink::in_ns(Some(&server))?;
        c.add_veth("ca", "cb", None).await?;
        let peer = c.require_link("cb").await?;
        c.move_to_ns(peer, &server).await?;
        for (nl, link, addr) in [(&c, "ca", CEILING_CLIENT), (&s, "cb", CEILING_SERVER)] {
            let index = nl.require_link(link).await?;
            nl.add_addr(index, ipnet::IpNet::new(addr.into(), 24)?)
                .await?;
            nl.set_up(index).await?;
            let lo = nl.require_link("lo").await?;
            nl.set_up(lo).await?;
        }
        Ok(this)
    }
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        let _ = netns::remove(&self.client);
        let _ = netns::remove(&self.server);
    }
}

/// A sandbox with one network and two containers: `srv` publishes the three servers' ports
/// (shifted by [`PUBLISH_SHIFT`]), `cli` is the client for the container paths.
async fn build_netd(datapath: &str, prefix: &str) -> Result<Instance> {
    let inst = Instance::create(prefix).await?;
    inst.netd(&[
        "--datapath",
        datapath,
        "network",
        "create",
        "bench",
        "--subnet",
        SUBNET,
    ])?;
    let mut publish = Vec::new();
    for port in [IPERF_PORT, SOCKPERF_PORT, CRR_PORT] {
        publish.push("-p".to_string());
        publish.push(format!("{}:{port}", port + PUBLISH_SHIFT));
    }
    let server = inst.name("srv");
    let mut args = vec!["container", "create", &server, "--network", "bench", "--ip"];
    let server_ip = SERVER_IP.to_string();
    args.push(&server_ip);
    args.extend(publish.iter().map(String::as_str));
    inst.netd(&args)?;
    let client = inst.name("cli");
    let client_ip = CLIENT_IP.to_string();
    inst.netd(&[
        "container",
        "create",
        &client,
        "--network",
        "bench",
        "--ip",
        &client_ip,
    ])?;
    Ok(inst)
}

fn netd_endpoint(inst: &Instance, path: Path) -> Endpoint {
    let container = |base: &str| netns::path_of(&inst.name(base));
    match path {
        Path::Published => Endpoint {
            client_ns: inst.sandbox.outside_path(),
            server_ns: container("srv"),
            target: HOST_ADDR,
            port_shift: PUBLISH_SHIFT,
        },
        Path::Masquerade => Endpoint {
            client_ns: container("cli"),
            server_ns: inst.sandbox.outside_path(),
            target: OUTSIDE_ADDR,
            port_shift: 0,
        },
        Path::ContainerToContainer => Endpoint {
            client_ns: container("cli"),
            server_ns: container("srv"),
            target: SERVER_IP,
            port_shift: 0,
        },
    }
}

fn output_in(ns: &std::path::Path, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg("--")
        .arg(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn fairness_of(ns: &PathBuf) -> Result<Fairness> {
    let rules = output_in(ns, "iptables-save", &[])?;
    let conntrack = output_in(ns, "conntrack", &["-C"])?;
    let bpf = output_in(ns, "bpftool", &["net", "show"])?;
    Ok(Fairness {
        netfilter_rules: rules.lines().filter(|l| l.starts_with("-A ")).count(),
        kernel_conntrack: conntrack.trim().parse().unwrap_or(0),
        bpf_programs_attached: bpf.lines().filter(|l| l.contains(" prog_id ")).count(),
    })
}
