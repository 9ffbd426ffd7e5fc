//! The one place the engine front ends (Docker driver, CNI plugin) call netd's controller.
//!
//! Everything above this file speaks in the types below; everything below it is the
//! controller the CLI uses (same networks, containers, datapaths and state), so the engines
//! carry no second copy of the logic. When the controller's API changes, only this file does.

use std::{net::Ipv4Addr, os::fd::AsRawFd as _, path::PathBuf};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;

use crate::{
    container,
    controller::Ctx,
    datapath::{Protocol, Tuning},
    ipam,
    netlink::Netlink,
    network,
    ports::proto_name,
    state::{Container, Mode, Network},
};

/// Which netd instance: the same options as the CLI's globals.
#[derive(Clone, Debug)]
pub struct Instance {
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    /// The host namespace's path (the one the process runs in when `None`).
    pub host_netns: Option<PathBuf>,
}

/// A network as an engine asks for it; `None` fields take the CLI's defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkOptions {
    pub name: String,
    pub subnet: Option<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    pub ip_range: Option<Ipv4Net>,
    pub bridge: Option<String>,
    pub mtu: Option<u32>,
    pub icc: bool,
    pub internal: bool,
    pub masquerade: bool,
    pub host_ip: Option<Ipv4Addr>,
    /// `ebpf` or `iptables` (the CLI's default when `None`).
    pub datapath: Option<String>,
}

/// What an engine needs to know of an existing network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkInfo {
    pub name: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub ip_range: Ipv4Net,
    pub mtu: u32,
    pub internal: bool,
}

/// One published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Port {
    pub proto: Protocol,
    /// Every host address when `None`.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
}

/// A container endpoint to make on a network.
#[derive(Clone, Debug, Default)]
pub struct AttachRequest {
    /// netd's name for it (unique per instance).
    pub name: String,
    pub network: String,
    /// The namespace to configure; netd makes one of its own (named `name`) when `None`.
    pub netns: Option<PathBuf>,
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<[u8; 6]>,
    pub ports: Vec<Port>,
}

/// A container endpoint as it exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub name: String,
    pub network: String,
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub mac: [u8; 6],
    pub host_veth: String,
    pub ports: Vec<Port>,
}

/// The interface name netd gives the container end of a veth.
pub const CONTAINER_IFNAME: &str = "eth0";

/// netd's controller, locked for as long as this lives (like one CLI command).
pub struct Core {
    ctx: Ctx,
}

impl Core {
    /// Locks the instance's state; `datapath` is the one new networks get.
    pub fn open(instance: &Instance, datapath: Option<&str>) -> Result<Self> {
        let ctx = Ctx::open(
            &instance.state_dir,
            instance.host_netns.as_deref(),
            &instance.bpffs,
            datapath.unwrap_or("ebpf"),
            Tuning::default(),
        )?;
        Ok(Self { ctx })
    }

    pub fn network(&self, name: &str) -> Result<Option<NetworkInfo>> {
        Ok(self.ctx.store.load()?.networks.get(name).map(info_of))
    }

    pub fn networks(&self) -> Result<Vec<NetworkInfo>> {
        Ok(self
            .ctx
            .store
            .load()?
            .networks
            .values()
            .map(info_of)
            .collect())
    }

    /// Creates a network (the caller opened this `Core` with the datapath it wants).
    pub async fn create_network(&self, opts: &NetworkOptions) -> Result<NetworkInfo> {
        let mut state = self.ctx.store.load()?;
        let req = network::Request {
            name: opts.name.clone(),
            subnet: opts.subnet.map(|s| s.to_string()),
            gateway: opts.gateway,
            ip_range: opts.ip_range.map(|r| r.to_string()),
            bridge: opts.bridge.clone(),
            mtu: opts.mtu,
            icc: opts.icc,
            internal: opts.internal,
            masquerade: opts.masquerade,
            host_ip: opts.host_ip,
        };
        let net = network::create(&self.ctx, &mut state, req).await?;
        self.ctx.store.save(&state)?;
        Ok(info_of(&net))
    }

    pub async fn remove_network(&self, name: &str) -> Result<()> {
        let mut state = self.ctx.store.load()?;
        container::collect_garbage(&self.ctx, &mut state).await?;
        network::remove(&self.ctx, &mut state, name).await?;
        self.ctx.store.save(&state)
    }

    /// A private subnet overlapping nothing on the host, no netd network and none of `also`.
    pub async fn free_subnet(&self, also: &[Ipv4Net]) -> Result<Ipv4Net> {
        let mut taken = Netlink::in_ns(None)?.ipv4_networks_in_use().await?;
        taken.extend(self.networks()?.iter().map(|n| n.subnet));
        taken.extend_from_slice(also);
        ipam::free_subnet(&taken)
    }

    /// Makes a container endpoint: veth, address, routes, datapath entries, published ports.
    pub async fn attach(&self, req: &AttachRequest) -> Result<Attachment> {
        let publish = req.ports.iter().map(publish_spec).collect();
        let c = container::create(
            &self.ctx,
            container::Request {
                name: req.name.clone(),
                network: req.network.clone(),
                netns: req.netns.clone(),
                ip: req.ip,
                mac: req.mac.map(ipam::format_mac),
                publish,
                ..Default::default()
            },
        )
        .await?;
        let state = self.ctx.store.load()?;
        attachment_of(&state.networks, &c)
            .with_context(|| format!("container {:?} has no bridge endpoint", req.name))
    }

    pub fn attachment(&self, name: &str) -> Result<Option<Attachment>> {
        let state = self.ctx.store.load()?;
        Ok(state
            .containers
            .get(name)
            .and_then(|c| attachment_of(&state.networks, c)))
    }

    /// Every endpoint on `network` whose name starts with `prefix`.
    pub fn attachments_on(&self, network: &str, prefix: &str) -> Result<Vec<Attachment>> {
        let state = self.ctx.store.load()?;
        Ok(state
            .containers_on(network)
            .filter(|c| c.name.starts_with(prefix))
            .filter_map(|c| attachment_of(&state.networks, c))
            .collect())
    }

    /// Removes an endpoint and everything it has; `false` if there was none.
    pub async fn detach(&self, name: &str) -> Result<bool> {
        if !self.ctx.store.load()?.containers.contains_key(name) {
            return Ok(false);
        }
        container::remove(&self.ctx, name).await?;
        Ok(true)
    }

    /// Publishes more ports of an existing endpoint.
    pub async fn publish(&self, name: &str, ports: &[Port]) -> Result<()> {
        let specs: Vec<String> = ports.iter().map(publish_spec).collect();
        container::publish(&self.ctx, name, &specs).await?;
        Ok(())
    }

    /// Checks that an endpoint's kernel objects are there: the host end of its veth, and the
    /// container end in its namespace, up, with its address.
    pub async fn check_attachment(&self, a: &Attachment) -> Result<()> {
        Netlink::in_ns(None)?
            .require_link(&a.host_veth)
            .await
            .context("the host end of the veth is gone")?;
        let inside = Netlink::in_ns(Some(&a.netns))?;
        let index = inside
            .require_link(CONTAINER_IFNAME)
            .await
            .with_context(|| format!("{CONTAINER_IFNAME} is gone from the container"))?;
        if !inside.ipv4_addresses(index).await?.contains(&a.ip) {
            anyhow::bail!("{CONTAINER_IFNAME} no longer has the address {}", a.ip);
        }
        Ok(())
    }

    /// Moves the container end of `a`'s veth out of its namespace into the host's, named
    /// `host_name` there (for an engine that moves it into its own sandbox itself).
    pub async fn hand_out_interface(&self, a: &Attachment, host_name: &str) -> Result<()> {
        // This thread is in the host namespace (the process entered it before any thread).
        let host = std::fs::File::open("/proc/thread-self/ns/net")
            .context("open the host's network namespace")?;
        let inside = Netlink::in_ns(Some(&a.netns))?;
        let Some(index) = inside.link_index(CONTAINER_IFNAME).await? else {
            // Handed out already (a second Join after a Leave moved it back).
            Netlink::in_ns(None)?.require_link(host_name).await?;
            return Ok(());
        };
        inside
            .set_link(index, "move the container interface to the host", |m| {
                m.setns_by_fd(host.as_raw_fd()).name(host_name.to_string())
            })
            .await
    }
}

fn info_of(n: &Network) -> NetworkInfo {
    NetworkInfo {
        name: n.name.clone(),
        subnet: n.subnet,
        gateway: n.gateway,
        ip_range: n.ip_range,
        mtu: n.mtu,
        internal: n.internal,
    }
}

fn attachment_of(
    networks: &std::collections::BTreeMap<String, Network>,
    c: &Container,
) -> Option<Attachment> {
    if c.mode != Mode::Bridge {
        return None;
    }
    let net = networks.get(c.network.as_deref()?)?;
    Some(Attachment {
        name: c.name.clone(),
        network: net.name.clone(),
        netns: c.netns.clone(),
        ip: c.ip?,
        prefix_len: net.subnet.prefix_len(),
        gateway: net.gateway,
        mac: ipam::parse_mac(c.mac.as_deref()?).ok()?,
        host_veth: c.host_veth.clone()?,
        ports: c
            .ports
            .iter()
            .map(|p| Port {
                proto: p.proto,
                host_ip: p.host_ip,
                host_port: p.host_port,
                container_port: p.container_port,
            })
            .collect(),
    })
}

/// The CLI's `-p` text for one port (today's controller parses ports from it).
fn publish_spec(p: &Port) -> String {
    let ip = p.host_ip.map(|ip| format!("{ip}:")).unwrap_or_default();
    format!(
        "{ip}{}:{}/{}",
        p.host_port,
        p.container_port,
        proto_name(p.proto)
    )
}
