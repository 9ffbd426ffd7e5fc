//! The `netd` command line: clap's argument structs, one file per command, each parsing its
//! arguments into the core's typed specs (one-line errors) and printing the result with
//! `views`. `main.rs` parses and dispatches here.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use crate::{
    core::{Config, Controller},
    datapath::{DatapathKind, Tuning},
};

pub mod container;
pub mod daemon;
pub mod datapath;
pub mod exec;
pub mod gc;
pub mod link;
pub mod network;
pub mod output;
pub mod proxy;
pub mod publish;
pub mod views;

/// The options every command takes.
#[derive(clap::Args)]
pub struct Global {
    /// The network namespace netd manages as "the host" (default: the one it runs in).
    #[arg(long, global = true, value_name = "PATH")]
    pub host_netns: Option<PathBuf>,
    /// Where netd keeps its state.
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/netd",
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,
    /// This instance's directory on a bpf filesystem, for pinned maps, programs and links.
    #[arg(
        long,
        global = true,
        default_value = "/sys/fs/bpf/netd",
        value_name = "DIR"
    )]
    pub bpffs: PathBuf,
    /// The datapath new networks use: ebpf, or iptables (Docker's rules, the baseline).
    #[arg(long, global = true, default_value = "ebpf", value_name = "NAME")]
    pub datapath: String,
    /// Entries of the eBPF connection-tracking table (two per flow), when it is created:
    /// 2 to 16777216.
    #[arg(
        long,
        global = true,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(2..=16_777_216)
    )]
    pub conntrack_max: Option<u32>,
    /// A conntrack timeout, NAME=SECONDS (tcp_established, tcp_syn_sent, udp, icmp, generic
    /// for other IP protocols, ...),
    /// applied when a network is set up; netfilter's defaults otherwise.
    #[arg(long, global = true, value_name = "NAME=SECS")]
    pub conntrack_timeout: Vec<String>,
    /// Also attach an XDP program to the uplink, which drops refused new flows (straight to a
    /// container, to an internal network, from a source a published port doesn't allow)
    /// before the kernel builds an skb for them; attached with the first network.
    #[arg(long, global = true, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub uplink_xdp: bool,
    /// The cgroup (v2) whose processes reach published ports through the host's addresses and
    /// loopback (eBPF datapath; default: the cgroup v2 root, every process); attached when the
    /// first network is set up.
    #[arg(long, global = true, value_name = "DIR")]
    pub host_cgroup: Option<PathBuf>,
}

impl Global {
    /// The controller's configuration these options describe.
    pub fn config(&self) -> Result<Config> {
        let mut tuning = Tuning {
            conntrack_max: self.conntrack_max,
            uplink_xdp: self.uplink_xdp,
            host_cgroup: self.host_cgroup.clone(),
            ..Default::default()
        };
        for spec in &self.conntrack_timeout {
            tuning.set_timeout(spec)?;
        }
        Ok(Config {
            state_dir: self.state_dir.clone(),
            host_netns: self.host_netns.clone(),
            bpffs: self.bpffs.clone(),
            default_datapath: self.datapath_kind()?,
            tuning,
        })
    }

    pub fn datapath_kind(&self) -> Result<DatapathKind> {
        self.datapath.parse()
    }

    pub fn controller(&self) -> Result<Controller> {
        Controller::open(self.config()?)
    }
}

/// What the `netd` binary runs: a command, or one of the processes netd starts itself.
#[derive(Subcommand)]
pub enum Invocation {
    #[command(flatten)]
    Command(Box<Command>),
    /// The iptables datapath's userland proxy for one published port on loopback.
    #[command(hide = true)]
    Proxy(proxy::Args),
}

/// The commands of the core and its datapaths.
#[derive(Subcommand)]
pub enum Command {
    /// Networks: a bridge, an address pool and the datapath that serves them.
    #[command(subcommand)]
    Network(network::NetworkCommand),
    /// Containers: a network namespace joined to a network.
    #[command(subcommand)]
    Container(container::ContainerCommand),
    /// Run a command inside a container's network namespace, with its /etc files.
    Exec(exec::Args),
    /// The ports a container publishes, like `docker port`.
    Port(publish::PortArgs),
    /// Publish more ports of an existing container.
    Publish(publish::Args),
    /// Unpublish ports of a container: new connections to them are refused, established ones
    /// carry on.
    Unpublish(publish::UnpublishArgs),
    /// A point-to-point veth between two containers, with /32 routes to each other.
    Link(link::Args),
    /// Remove what a netd command that died midway left behind.
    Gc,
    /// Run the long-running part: conntrack sweeping and clean-up (the datapath doesn't need
    /// it to forward; it can be killed and restarted at any time).
    Daemon(daemon::Args),
    /// The eBPF datapath's connection tracking table.
    #[command(subcommand)]
    Conntrack(datapath::ConntrackCommand),
    /// Replace the attached eBPF programs with this binary's, atomically (an upgrade: flows and
    /// maps stay).
    Reload,
    /// The eBPF datapath's packet counters, per reason (drops included).
    Stats(datapath::StatsArgs),
    /// Stream the packets the eBPF datapath drops: reason and 5-tuple, one per line.
    Monitor(datapath::MonitorArgs),
}

/// Runs `command`.
pub async fn run(global: &Global, command: Command) -> Result<()> {
    match command {
        Command::Network(cmd) => network::run(global, cmd).await,
        Command::Container(cmd) => container::run(global, cmd).await,
        Command::Exec(args) => exec::run(global, args),
        Command::Port(args) => publish::port(global, args),
        Command::Publish(args) => publish::run(global, args).await,
        Command::Unpublish(args) => publish::unpublish(global, args).await,
        Command::Link(args) => link::run(global, args).await,
        Command::Gc => gc::run(global).await,
        Command::Daemon(args) => daemon::run(global, args).await,
        Command::Conntrack(cmd) => datapath::conntrack(global, cmd),
        Command::Reload => datapath::reload(global),
        Command::Stats(args) => datapath::stats(global, args),
        Command::Monitor(args) => datapath::monitor(global, args).await,
    }
}
