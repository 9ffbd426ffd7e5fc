//! The records netd keeps: what each network and container is, and how far its kernel
//! objects got. They are stored one row each (see `store`), and `State` holds them all in
//! memory: the JSON document of netd before the database, which the migration reads, and the
//! fixture of the planner's unit tests.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::Result;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::core::spec::DEFAULT_IFNAME;
pub use crate::core::spec::{Link, PortMapping};
use crate::datapath::{self, DatapathKind, Protocol};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Network {
    pub id: u32,
    pub name: String,
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Where container addresses come from (the subnet unless `--ip-range`).
    pub ip_range: Ipv4Net,
    /// A dual-stack network's IPv6 subnet and the bridge's address in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<Ipv6Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
    pub mtu: u32,
    pub icc: bool,
    pub internal: bool,
    pub masquerade: bool,
    /// Default host address for published ports (`--host-ip`); all addresses when `None`.
    pub host_ip: Option<Ipv4Addr>,
    pub datapath: DatapathKind,
    /// Whether the network is being made, is there, or is being removed.
    #[serde(default)]
    pub status: Status,
    /// The process making or removing it: if it's gone, `gc` finishes the job.
    #[serde(default)]
    pub owner_pid: u32,
    /// `--conntrack-limit`: the most flows its containers may have together.
    #[serde(default)]
    pub conntrack_limit: Option<u32>,
}

impl Network {
    /// The network as the datapath drivers see it.
    pub fn spec(&self) -> datapath::NetworkSpec {
        datapath::NetworkSpec {
            id: self.id,
            name: self.name.clone(),
            bridge: self.bridge.clone(),
            subnet: self.subnet,
            gateway: self.gateway,
            subnet6: self.subnet6,
            gateway6: self.gateway6,
            icc: self.icc,
            internal: self.internal,
            masquerade: self.masquerade,
            conntrack_limit: self.conntrack_limit,
        }
    }
}

/// How a container gets its network (the record's side of `core::spec::Mode`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "of")]
pub enum Mode {
    /// Its own namespace with a veth on a netd network.
    Bridge,
    /// The host's namespace.
    Host,
    /// Its own namespace, loopback only.
    None,
    /// Another container's namespace.
    Container(String),
}

/// A point-to-point veth made by `netd link A B`, as seen from one of the two containers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLink {
    pub peer: String,
    pub ifname: String,
    /// This end's address, when the container has none of its own (`--network none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// The peer end's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_ip: Option<Ipv4Addr>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being created; if its owner is gone, the next command removes it.
    Creating,
    #[default]
    Running,
    /// Being removed, or what a removal couldn't remove: if its owner is gone, the next
    /// command tries again.
    Removing,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Running => "running",
            Status::Removing => "removing",
        }
    }

    pub fn from_name(name: &str) -> anyhow::Result<Self> {
        [Status::Creating, Status::Running, Status::Removing]
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| anyhow::anyhow!("unknown status {name:?} in the state"))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Container {
    pub name: String,
    pub status: Status,
    /// The process creating or removing the container: if it's gone, `gc` finishes the job.
    pub creator_pid: u32,
    /// Whether the datapath has the container's endpoint (set once `add_endpoint` returned),
    /// so a removal knows a failure to remove it is real.
    #[serde(default)]
    pub endpoint_added: bool,
    pub mode: Mode,
    /// The network namespace the container uses.
    pub netns: PathBuf,
    /// Whether netd made that namespace (and so removes it).
    pub owns_netns: bool,
    pub network: Option<String>,
    pub ip: Option<Ipv4Addr>,
    /// Its IPv6 address on a dual-stack network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    pub mac: Option<String>,
    /// Host end of the veth pair.
    pub host_veth: Option<String>,
    /// The container end's name when it isn't [`DEFAULT_IFNAME`] (see [`Container::ifname`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// Its interface index, recorded with the endpoint: the datapath's entries are keyed by
    /// it, and a removal interrupted after the veth went must still find them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ifindex: Option<u32>,
    pub hostname: String,
    pub dns: Vec<IpAddr>,
    pub dns_search: Vec<String>,
    pub add_hosts: Vec<(String, IpAddr)>,
    pub links: Vec<Link>,
    pub peer_links: Vec<PeerLink>,
    pub ports: Vec<PortMapping>,
    /// `--expose`d ports, one entry per port: with the published ones, what a `--link` to
    /// this container opens.
    #[serde(default)]
    pub exposed: Vec<Exposed>,
    /// `--publish-allow`: the source ranges its published ports accept (any when empty).
    #[serde(default)]
    pub publish_allow: Vec<IpNet>,
    /// `--conntrack-limit`: the most flows it may have.
    #[serde(default)]
    pub conntrack_limit: Option<u32>,
}

impl Container {
    /// The name of the container end of its veth, in its namespace.
    pub fn ifname(&self) -> &str {
        self.ifname.as_deref().unwrap_or(DEFAULT_IFNAME)
    }

    /// The ports a `--link` to this container opens: exposed and published ones (Docker's
    /// link rules cover both).
    pub fn link_ports(&self) -> BTreeSet<(Protocol, u16)> {
        self.exposed
            .iter()
            .map(|e| (e.proto, e.port))
            .chain(self.ports.iter().map(|p| (p.proto, p.container_port)))
            .collect()
    }
}

/// One `--expose`d container port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Exposed {
    pub proto: Protocol,
    pub port: u16,
}

impl Exposed {
    /// `exposed` sorted and without repeats, as records keep them (Docker sends them in its
    /// map's random order).
    pub fn canonical(mut exposed: Vec<Exposed>) -> Vec<Exposed> {
        exposed.sort_unstable();
        exposed.dedup();
        exposed
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub networks: BTreeMap<String, Network>,
    pub containers: BTreeMap<String, Container>,
    pub next_network_id: u32,
}

impl State {
    pub fn network(&self, name: &str) -> Result<&Network> {
        self.networks
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no network named {name:?}"))
    }

    pub fn container(&self, name: &str) -> Result<&Container> {
        self.containers
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no container named {name:?}"))
    }

    /// Containers attached to network `name`.
    pub fn containers_on<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Container> {
        self.containers
            .values()
            .filter(move |c| c.network.as_deref() == Some(name))
    }
}
