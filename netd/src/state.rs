//! netd's state: one JSON document under `--state-dir`, read and written under an exclusive
//! lock held for the whole of each command, replaced atomically (write a temp file, fsync,
//! rename) so a crash leaves either the old or the new document, never a torn one.
//!
//! A container is recorded as `creating` before any kernel object is made for it; a command
//! that finds such a record from a process that died (`kill -9` mid-create) removes what it
//! names (see `container::collect_garbage`). Address allocations are not stored separately:
//! they are the addresses of the recorded containers, so they can't leak.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::datapath::{NetworkSpec, Protocol};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Network {
    pub id: u32,
    pub name: String,
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Where container addresses come from (the subnet unless `--ip-range`).
    pub ip_range: Ipv4Net,
    pub mtu: u32,
    pub icc: bool,
    pub internal: bool,
    pub masquerade: bool,
    /// Default host address for published ports (`--host-ip`); all addresses when `None`.
    pub host_ip: Option<Ipv4Addr>,
    pub datapath: String,
    /// `--conntrack-limit`: the most flows its containers may have together.
    #[serde(default)]
    pub conntrack_limit: Option<u32>,
}

impl Network {
    pub fn spec(&self) -> NetworkSpec {
        NetworkSpec {
            id: self.id,
            name: self.name.clone(),
            bridge: self.bridge.clone(),
            subnet: self.subnet,
            gateway: self.gateway,
            icc: self.icc,
            internal: self.internal,
            masquerade: self.masquerade,
            conntrack_limit: self.conntrack_limit,
        }
    }
}

/// How a container gets its network.
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

/// One published port (a `-p` range is one entry per port).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub proto: Protocol,
    /// `None`: every host address.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
}

/// A `--link OTHER[:ALIAS]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub container: String,
    pub alias: String,
}

/// A point-to-point veth made by `netd link A B`, as seen from one of the two containers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLink {
    pub peer: String,
    pub ifname: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being created; if its creator is gone, the next command removes it.
    Creating,
    Running,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Container {
    pub name: String,
    pub status: Status,
    /// The process that recorded a `creating` container: if it's gone, the record is garbage.
    pub creator_pid: u32,
    pub mode: Mode,
    /// The network namespace the container uses.
    pub netns: PathBuf,
    /// Whether netd made that namespace (and so removes it).
    pub owns_netns: bool,
    pub network: Option<String>,
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<String>,
    /// Host end of the veth pair.
    pub host_veth: Option<String>,
    pub hostname: String,
    pub dns: Vec<Ipv4Addr>,
    pub dns_search: Vec<String>,
    pub add_hosts: Vec<(String, Ipv4Addr)>,
    pub links: Vec<Link>,
    pub peer_links: Vec<PeerLink>,
    pub ports: Vec<PortMapping>,
    /// `--expose`d ports, one entry per port: with the published ones, what a `--link` to
    /// this container opens.
    #[serde(default)]
    pub exposed: Vec<Exposed>,
    /// `--publish-allow`: the source ranges its published ports accept (any when empty).
    #[serde(default)]
    pub publish_allow: Vec<Ipv4Net>,
    /// `--conntrack-limit`: the most flows it may have.
    #[serde(default)]
    pub conntrack_limit: Option<u32>,
}

impl Container {
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exposed {
    pub proto: Protocol,
    pub port: u16,
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

/// The state dir, locked: only one netd command changes (or reads) state at a time.
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl Store {
    /// Takes the lock, waiting for any other netd command to finish.
    pub fn lock(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("create state dir {}", dir.display()))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .with_context(|| format!("open {}/lock", dir.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .context("lock the state dir")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn load(&self) -> Result<State> {
        match fs::read(self.path()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("read {}", self.path().display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e).with_context(|| format!("read {}", self.path().display())),
        }
    }

    /// Replaces the stored state atomically: a process killed at any point leaves the old or
    /// the new document. No fsync: what the state describes (namespaces, links, programs)
    /// doesn't survive a power loss either, and the rename is what crash safety needs.
    pub fn save(&self, state: &State) -> Result<()> {
        let tmp = self.dir.join("state.json.tmp");
        let mut file = File::create(&tmp).with_context(|| format!("write {}", tmp.display()))?;
        file.write_all(&serde_json::to_vec_pretty(state)?)?;
        fs::rename(&tmp, self.path()).with_context(|| format!("replace {}", self.path().display()))
    }

    /// Where a container's hosts, resolv.conf and hostname files live.
    pub fn container_dir(&self, name: &str) -> PathBuf {
        self.dir.join("containers").join(name)
    }
}
