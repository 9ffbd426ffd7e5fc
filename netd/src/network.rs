//! `netd network create/rm/ls/inspect`: a network is a bridge in the host namespace with the
//! gateway address on it, an address pool, and the datapath that serves it.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, bail};
use clap::ArgAction;
use ipnet::{IpNet, Ipv4Net};

use crate::{
    controller::Ctx,
    ipam,
    netlink::{Netlink, set_sysctl},
    state::{Network, State},
};

/// Docker's default network: created on first use.
pub const DEFAULT_NETWORK: &str = "bridge";
pub const DEFAULT_BRIDGE: &str = "netd0";
const DEFAULT_MTU: u32 = 1500;
/// Linux's limit on interface names (IFNAMSIZ less the NUL).
pub const MAX_IFNAME: usize = 15;

/// `netd network create` as asked (the CLI's arguments).
#[derive(Debug, Default, clap::Args)]
pub struct Request {
    pub name: String,
    /// IPv4 subnet (default: the first free private /16 or /20).
    #[arg(long)]
    pub subnet: Option<String>,
    /// The bridge's address (default: the subnet's first host).
    #[arg(long)]
    pub gateway: Option<Ipv4Addr>,
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

/// Checks a name for a network or container: what Docker accepts, and short enough for a
/// namespace file name.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !ok {
        bail!(
            "invalid {kind} name {name:?}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        );
    }
    Ok(())
}

pub fn validate_ifname(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_IFNAME || name.contains(['/', ' ', ':']) {
        bail!(
            "invalid interface name {name:?}: must be 1-{MAX_IFNAME} bytes without '/', ':' or spaces"
        );
    }
    Ok(())
}

/// Creates the network described by `req` and records it in `state` (the caller saves).
/// On failure nothing is left: the bridge is removed again.
pub async fn create(ctx: &Ctx, state: &mut State, req: Request) -> Result<Network> {
    validate_name("network", &req.name)?;
    if state.networks.contains_key(&req.name) {
        bail!("network {:?} already exists", req.name);
    }
    let host = Netlink::in_ns(None)?;
    let in_use = host.ipv4_networks_in_use().await?;
    let taken: Vec<Ipv4Net> = state.networks.values().map(|n| n.subnet).collect();
    let subnet = match &req.subnet {
        Some(text) => {
            let subnet = ipam::parse_subnet(text)?;
            if let Some(other) = state
                .networks
                .values()
                .find(|n| ipam::overlaps(&n.subnet, &subnet))
            {
                bail!(
                    "subnet {subnet} overlaps network {:?} ({})",
                    other.name,
                    other.subnet
                );
            }
            if let Some(used) = in_use.iter().find(|u| ipam::overlaps(u, &subnet)) {
                bail!("subnet {subnet} overlaps {used}, already in use on the host");
            }
            subnet
        }
        None => ipam::free_subnet(&[in_use, taken].concat())?,
    };
    let (gateway, ip_range) =
        ipam::gateway_and_range(subnet, req.gateway, req.ip_range.as_deref())?;
    let id = state.next_network_id.max(1);
    let bridge = match req.bridge {
        Some(b) => b,
        None if req.name == DEFAULT_NETWORK => DEFAULT_BRIDGE.to_string(),
        None => format!("netd-br{id}"),
    };
    validate_ifname(&bridge)?;
    if let Some(other) = state.networks.values().find(|n| n.bridge == bridge) {
        bail!(
            "bridge {bridge} is already used by network {:?}",
            other.name
        );
    }
    if host.link_index(&bridge).await?.is_some() {
        bail!("interface {bridge} already exists on the host");
    }
    let mtu = req.mtu.unwrap_or(DEFAULT_MTU);
    if !(68..=65535).contains(&mtu) {
        bail!("invalid MTU {mtu}: must be 68-65535");
    }
    crate::datapath::check_name(&ctx.datapath)?;
    let net = Network {
        id,
        name: req.name,
        bridge,
        subnet,
        gateway,
        ip_range,
        mtu,
        icc: req.icc,
        internal: req.internal,
        masquerade: req.masquerade,
        host_ip: req.host_ip,
        datapath: ctx.datapath.clone(),
        conntrack_limit: req.conntrack_limit,
    };
    if let Err(e) = realize(ctx, &host, &net).await {
        undo(ctx, &host, &net).await;
        return Err(e);
    }
    state.next_network_id = id + 1;
    state.networks.insert(net.name.clone(), net.clone());
    Ok(net)
}

async fn realize(ctx: &Ctx, host: &Netlink, net: &Network) -> Result<()> {
    let index = host
        .add_bridge(&net.bridge, Some(net.mtu), net.spec().bridge_mac())
        .await?;
    host.add_addr(
        index,
        IpNet::new(net.gateway.into(), net.subnet.prefix_len())?,
    )
    .await?;
    // Containers' traffic to the outside is routed by the host.
    set_sysctl(None, "net.ipv4.ip_forward", "1")?;
    ctx.datapath(&net.datapath)?
        .setup_network(&net.spec())
        .with_context(|| format!("set up the {} datapath for {}", net.datapath, net.name))
}

/// Best-effort removal of whatever `realize` made.
async fn undo(ctx: &Ctx, host: &Netlink, net: &Network) {
    if let Ok(dp) = ctx.datapath(&net.datapath) {
        let _ = dp.teardown_network(&net.spec());
    }
    if let Ok(Some(index)) = host.link_index(&net.bridge).await {
        let _ = host.del_link(index).await;
    }
}

/// The default network, made on first use on the first free private subnet.
pub async fn ensure_default(ctx: &Ctx, state: &mut State) -> Result<()> {
    if !state.networks.contains_key(DEFAULT_NETWORK) {
        let req = Request {
            name: DEFAULT_NETWORK.into(),
            icc: true,
            masquerade: true,
            ..Default::default()
        };
        create(ctx, state, req).await?;
    }
    Ok(())
}

/// Removes network `name` (refused while containers use it).
pub async fn remove(ctx: &Ctx, state: &mut State, name: &str) -> Result<()> {
    let net = state.network(name)?.clone();
    let users: Vec<&str> = state.containers_on(name).map(|c| c.name.as_str()).collect();
    if !users.is_empty() {
        bail!("network {name:?} has containers: {}", users.join(", "));
    }
    ctx.datapath(&net.datapath)?.teardown_network(&net.spec())?;
    let host = Netlink::in_ns(None)?;
    if let Some(index) = host.link_index(&net.bridge).await? {
        host.del_link(index).await?;
    }
    state.networks.remove(name);
    Ok(())
}
