//! The core: netd's objects and the rules they follow, under every front end (the `netd` CLI,
//! the daemon's API, the Docker and CNI plugins). Front ends parse their input into the typed
//! specs of [`spec`] and call a [`Controller`]; nothing here parses a command line.
//!
//! # The API front ends call
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use netd::core::{Config, Controller, spec::{Attachment, ContainerSpec, Mode, NetworkSpec}};
//! use netd::core::ports::parse_publish;
//!
//! let mut ctl = Controller::open(Config::new("/var/lib/netd".into()))?;
//! let mut net = NetworkSpec::named("n1");
//! net.subnet = Some("10.1.0.0/24".parse()?);
//! ctl.create_network(net).await?;                      // -> store::Network
//! let mut web = ContainerSpec::named("web");
//! let mut at = Attachment::on("n1");
//! at.publish = vec![parse_publish("8080:80")?];
//! web.mode = Mode::Bridge(at);
//! let c = ctl.create_container(web).await?;            // -> store::Container (ip, mac, ports)
//! ctl.publish("web", &[parse_publish("8443:443")?]).await?; // -> the new PortMappings
//! ctl.remove_container("web").await?;
//! ctl.remove_network("n1").await?;
//! # Ok(()) }
//! ```
//!
//! - [`Controller::open`]`(Config)`: the state under `Config::state_dir`, the host namespace,
//!   the bpffs directory (opened only when an eBPF network is used) and datapath tuning.
//! - Changes: `create_network(NetworkSpec)`, `remove_network(name)`,
//!   `create_container(ContainerSpec)`, `remove_container(name)`,
//!   `publish(name, &[Publish])`, `link(a, b, LinkAddrs)`, `gc()`. Each validates first (a
//!   one-line error, nothing made), records what it will make before making it, undoes its
//!   own partial work on failure, and takes the kernel lock only while it changes the kernel.
//! - Reads (never blocked by a change): `networks()`, `network(name)`, `containers()`,
//!   `containers_on(network)`, `container(name)`, `container_dir(name)`.
//! - `datapaths()`: the datapath drivers' own tools (conntrack, counters, drop events,
//!   reload).
//!
//! A `Controller` keeps one database connection: one per thread (it is `Send`, not `Sync`);
//! any number of processes may use the same state dir at once.

use std::path::{Path, PathBuf};

use anyhow::Result;

pub mod container;
pub mod gc;
pub mod ipam;
pub mod link;
pub mod network;
pub mod plan;
pub mod ports;
pub mod publish;
pub mod reservations;
pub mod spec;

use crate::{
    datapath::{DatapathKind, Datapaths, Tuning},
    store::{Container, Network, Store, View as _},
};

/// Where a controller keeps its state and its datapaths' kernel state.
#[derive(Clone, Debug)]
pub struct Config {
    pub state_dir: PathBuf,
    /// The namespace netd manages as the host (`None`: the one it runs in).
    pub host_netns: Option<PathBuf>,
    /// This instance's directory on a bpf filesystem (eBPF datapath only).
    pub bpffs: PathBuf,
    /// The datapath of the default network when netd makes it.
    pub default_datapath: DatapathKind,
    pub tuning: Tuning,
}

impl Config {
    /// The defaults of the CLI, with state under `state_dir`.
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            host_netns: None,
            bpffs: PathBuf::from("/sys/fs/bpf/netd"),
            default_datapath: DatapathKind::default(),
            tuning: Tuning::default(),
        }
    }
}

pub struct Controller {
    store: Store,
    host_netns: PathBuf,
    datapaths: Datapaths,
    default_datapath: DatapathKind,
}

impl Controller {
    pub fn open(config: Config) -> Result<Self> {
        Ok(Self {
            store: Store::open(&config.state_dir)?,
            host_netns: config
                .host_netns
                .unwrap_or_else(|| PathBuf::from("/proc/1/ns/net")),
            datapaths: Datapaths {
                bpffs: config.bpffs,
                state_dir: config.state_dir.clone(),
                tuning: config.tuning,
            },
            default_datapath: config.default_datapath,
        })
    }

    pub fn datapaths(&self) -> &Datapaths {
        &self.datapaths
    }

    /// Where container `name`'s hosts, resolv.conf and hostname files are.
    pub fn container_dir(&self, name: &str) -> PathBuf {
        self.store.container_dir(name)
    }

    pub fn state_dir(&self) -> &Path {
        self.store.dir()
    }

    pub fn networks(&mut self) -> Result<Vec<Network>> {
        self.store.read(|tx| tx.networks())
    }

    pub fn network(&mut self, name: &str) -> Result<Network> {
        self.store.read(|tx| tx.network_required(name))
    }

    pub fn containers(&mut self) -> Result<Vec<Container>> {
        self.store.read(|tx| tx.containers())
    }

    pub fn containers_on(&mut self, network: &str) -> Result<Vec<Container>> {
        self.store.read(|tx| tx.containers_on(network))
    }

    pub fn container(&mut self, name: &str) -> Result<Container> {
        self.store.read(|tx| tx.container_required(name))
    }
}
