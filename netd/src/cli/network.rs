//! `netd network create/rm/ls/inspect`.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Result, bail};
use clap::{ArgAction, Subcommand};
use ipnet::IpNet;

use super::{Global, views};
use crate::core::{
    ipam,
    spec::{DEFAULT_MTU, NetworkSpec},
};

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// Create a network.
    Create(CreateArgs),
    /// Remove a network (it must have no containers).
    Rm { name: String },
    /// List networks.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show a network as JSON.
    Inspect { name: String },
}

/// `netd network create` as typed.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    pub name: String,
    /// IPv4 subnet (default: the first free private /16 or /20); with --ipv6, an IPv6 one
    /// too (default: a free ULA /64). At most one of each family.
    #[arg(long)]
    pub subnet: Vec<String>,
    /// The bridge's address in each family's subnet (default: the subnet's first host).
    #[arg(long)]
    pub gateway: Vec<IpAddr>,
    /// Dual-stack: containers get an IPv6 address and route too (masqueraded with NAT66 unless
    /// --masquerade=false).
    #[arg(long)]
    pub ipv6: bool,
    /// Allocate container addresses from this part of the subnet.
    #[arg(long)]
    pub ip_range: Option<String>,
    /// Bridge interface name (default: netd0 for `bridge`, netd-brN otherwise).
    #[arg(long)]
    pub bridge: Option<String>,
    #[arg(long)]
    pub mtu: Option<u32>,
    /// Let containers on the network talk to each other.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub icc: bool,
    /// No traffic in or out of the network beyond its containers and gateway.
    #[arg(long)]
    pub internal: bool,
    /// Masquerade traffic leaving the host.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub masquerade: bool,
    /// Default host address for published ports.
    #[arg(long)]
    pub host_ip: Option<Ipv4Addr>,
    /// The most connections (tracked flows) the network's containers may have together;
    /// new ones over it are dropped (eBPF datapath).
    #[arg(long, value_name = "FLOWS")]
    pub conntrack_limit: Option<u32>,
}

impl CreateArgs {
    /// The spec these arguments ask for, new networks using `global`'s datapath.
    pub fn spec(self, global: &Global) -> Result<NetworkSpec> {
        let mut subnet = None;
        let mut subnet6 = None;
        for text in &self.subnet {
            let (slot, family) = match ipam::parse_subnet(text)? {
                IpNet::V4(net) => (subnet.replace(net).map(IpNet::from), "IPv4"),
                IpNet::V6(net) => (subnet6.replace(net).map(IpNet::from), "IPv6"),
            };
            if let Some(first) = slot {
                bail!("two {family} subnets ({first} and {text}): give one of each family");
            }
        }
        let mut gateway = None;
        let mut gateway6 = None;
        for ip in &self.gateway {
            let first = match ip {
                IpAddr::V4(ip) => gateway.replace(*ip).map(IpAddr::from),
                IpAddr::V6(ip) => gateway6.replace(*ip).map(IpAddr::from),
            };
            if let Some(first) = first {
                bail!("two gateways of one family ({first} and {ip}): give one of each");
            }
        }
        let spec = NetworkSpec {
            subnet,
            gateway,
            ipv6: self.ipv6,
            subnet6,
            gateway6,
            ip_range: self
                .ip_range
                .as_deref()
                .map(ipam::parse_range)
                .transpose()?,
            bridge: self.bridge,
            mtu: self.mtu.unwrap_or(DEFAULT_MTU),
            icc: self.icc,
            internal: self.internal,
            masquerade: self.masquerade,
            host_ip: self.host_ip,
            conntrack_limit: self.conntrack_limit,
            datapath: global.datapath_kind()?,
            name: self.name,
        };
        spec.validate()?;
        Ok(spec)
    }
}

pub async fn run(global: &Global, cmd: NetworkCommand) -> Result<()> {
    match cmd {
        NetworkCommand::Create(args) => {
            // Parsed before the state is opened: bad input changes nothing.
            let spec = args.spec(global)?;
            let net = global.controller()?.create_network(spec).await?;
            println!("{}", views::network_created(&net));
        }
        NetworkCommand::Rm { name } => {
            global.controller()?.remove_network(&name).await?;
            println!("{name}");
        }
        NetworkCommand::Ls { json } => views::network_ls(&mut global.controller()?, json)?,
        NetworkCommand::Inspect { name } => {
            views::network_inspect(&mut global.controller()?, &name)?
        }
    }
    Ok(())
}
