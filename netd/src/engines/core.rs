//! The one place the engine front ends (Docker driver, CNI plugin) call netd's controller.
//!
//! The engines build the core's typed specs ([`NetworkSpec`], [`PortMapping`]) from their own
//! input; this file turns an engine's endpoint into a [`ContainerSpec`] and a container back
//! into what an engine reports, and adds the two kernel steps only engines need (checking an
//! endpoint, handing its interface to an engine that moves it itself). Same networks,
//! containers, datapaths and state as the CLI: no second copy of the logic.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::Arc,
};

use anyhow::{Context as _, Result};
use ipnet::{IpNet, Ipv6Net};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::{
    core::{
        Config, Controller, ipam,
        spec::{
            Attachment as Bridge, ContainerSpec, Mode, Netns, NetworkSpec, PortMapping, Publish,
        },
    },
    netlink::Netlink,
    store::{Container, Network, model},
};

/// A container endpoint to make on a network.
#[derive(Clone, Debug, Default)]
pub struct AttachRequest {
    /// netd's name for it (unique per instance).
    pub name: String,
    pub network: String,
    /// The namespace to configure; netd makes one of its own (named `name`) when `None`.
    pub netns: Option<PathBuf>,
    pub ip: Option<Ipv4Addr>,
    /// On a dual-stack network.
    pub ip6: Option<Ipv6Addr>,
    pub mac: Option<[u8; 6]>,
    pub ports: Vec<PortMapping>,
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
    /// On a dual-stack network: the IPv6 address with its subnet's prefix, and the gateway.
    pub ip6: Option<(Ipv6Net, Ipv6Addr)>,
    pub mac: [u8; 6],
    /// The container end's name in its namespace.
    pub ifname: String,
    pub host_veth: String,
    pub ports: Vec<PortMapping>,
}

/// A controller shared by the tasks and threads of one process (`netd daemon`'s API server
/// and its Docker plugin): one at a time holds it.
pub type SharedController = Arc<Mutex<Controller>>;

/// netd's controller, as the engines use it: one of their own, or held from a process's
/// shared one for as long as the `Core` lives.
pub struct Core {
    ctl: OwnedMutexGuard<Controller>,
}

impl Core {
    /// A controller of its own, on the state `config` names.
    pub fn open(config: Config) -> Result<Self> {
        let ctl = Arc::new(Mutex::new(Controller::open(config)?));
        Ok(Self {
            ctl: ctl
                .try_lock_owned()
                .expect("nobody else has a new controller"),
        })
    }

    /// The shared controller, once nobody else holds it.
    pub async fn lock(shared: SharedController) -> Self {
        Self {
            ctl: shared.lock_owned().await,
        }
    }

    pub fn network(&mut self, name: &str) -> Result<Option<Network>> {
        Ok(self.ctl.networks()?.into_iter().find(|n| n.name == name))
    }

    pub fn networks(&mut self) -> Result<Vec<Network>> {
        self.ctl.networks()
    }

    pub async fn create_network(&mut self, spec: NetworkSpec) -> Result<Network> {
        self.ctl.create_network(spec).await
    }

    /// The network `spec` names: made if missing. Engines call this from processes that race
    /// (a pod start storm): losing the race to create it is fine.
    pub async fn ensure_network(&mut self, spec: NetworkSpec) -> Result<Network> {
        if let Some(net) = self.network(&spec.name)? {
            return Ok(net);
        }
        let name = spec.name.clone();
        match self.ctl.create_network(spec).await {
            Ok(net) => Ok(net),
            Err(e) => self.network(&name)?.ok_or(e),
        }
    }

    pub async fn remove_network(&mut self, name: &str) -> Result<()> {
        self.ctl.remove_network(name).await
    }

    /// A subnet of `v6`'s family (private IPv4, or a ULA /64) overlapping nothing on the
    /// host, no netd network and none of `also`.
    pub async fn free_subnet(&mut self, v6: bool, also: &[IpNet]) -> Result<IpNet> {
        let mut taken = Netlink::in_ns(None)?.networks_in_use().await?;
        for n in self.ctl.networks()? {
            taken.push(n.subnet.into());
            taken.extend(n.subnet6.map(IpNet::from));
        }
        taken.extend_from_slice(also);
        Ok(if v6 {
            ipam::free_subnet6(&taken)?.into()
        } else {
            ipam::free_subnet(&taken)?.into()
        })
    }

    /// Makes a container endpoint: veth, address, routes, datapath entries, published ports.
    pub async fn attach(&mut self, req: &AttachRequest) -> Result<Attachment> {
        self.attach_as(req, None).await
    }

    /// [`Core::attach`] with the container end named `ifname` (`eth0` when `None`).
    pub async fn attach_as(
        &mut self,
        req: &AttachRequest,
        ifname: Option<&str>,
    ) -> Result<Attachment> {
        let mut spec = ContainerSpec::named(&req.name);
        spec.mode = Mode::Bridge(Bridge {
            ip: req.ip,
            ip6: req.ip6,
            mac: req.mac,
            ifname: ifname.map(str::to_string),
            publish: req.ports.iter().map(Publish::from).collect(),
            ..Bridge::on(&req.network)
        });
        spec.netns = req.netns.clone().map_or(Netns::Own, Netns::Path);
        let c = self.ctl.create_container(spec).await?;
        self.attachment_of(&c)?
            .with_context(|| format!("container {:?} has no bridge endpoint", req.name))
    }

    pub fn attachment(&mut self, name: &str) -> Result<Option<Attachment>> {
        match self.ctl.containers()?.into_iter().find(|c| c.name == name) {
            Some(c) => self.attachment_of(&c),
            None => Ok(None),
        }
    }

    /// Every endpoint on `network` whose name starts with `prefix`.
    pub fn attachments_on(&mut self, network: &str, prefix: &str) -> Result<Vec<Attachment>> {
        let mut found = Vec::new();
        for c in self.ctl.containers_on(network)? {
            if c.name.starts_with(prefix)
                && let Some(a) = self.attachment_of(&c)?
            {
                found.push(a);
            }
        }
        Ok(found)
    }

    /// Removes an endpoint and everything it has; `false` if there was none. One whose
    /// creator was killed midway (an ADD killed by the runtime) goes with the garbage.
    pub async fn detach(&mut self, name: &str) -> Result<bool> {
        self.ctl.gc().await?;
        if !self.ctl.containers()?.iter().any(|c| c.name == name) {
            return Ok(false);
        }
        self.ctl.remove_container(name).await?;
        Ok(true)
    }

    /// Removes the endpoints on `network` named with `prefix` whose namespace is gone: its
    /// file, and the veth the kernel removed with it. A runtime that never DELs (`ctr run -d`)
    /// leaves them, holding their addresses and ports. What it couldn't remove.
    pub async fn remove_orphans(&mut self, network: &str, prefix: &str) -> Result<Vec<String>> {
        let host = Netlink::in_ns(None)?;
        let mut failed = Vec::new();
        for a in self.attachments_on(network, prefix)? {
            if a.netns.exists() || host.link_index(&a.host_veth).await?.is_some() {
                continue;
            }
            if let Err(e) = self.detach(&a.name).await {
                failed.push(format!("{}: {e:#}", a.name));
            }
        }
        Ok(failed)
    }

    /// Publishes more ports of an existing endpoint.
    pub async fn publish(&mut self, name: &str, requests: &[Publish]) -> Result<()> {
        self.ctl.publish(name, requests).await?;
        Ok(())
    }

    /// Unpublishes ports of an existing endpoint (each must be published).
    pub async fn unpublish(&mut self, name: &str, ports: &[PortMapping]) -> Result<()> {
        let requests: Vec<Publish> = ports.iter().map(Publish::from).collect();
        self.ctl.unpublish(name, &requests).await?;
        Ok(())
    }

    /// Sets an endpoint's exposed ports (what a `--link` to it opens).
    pub fn set_exposed(&mut self, name: &str, exposed: Vec<model::Exposed>) -> Result<()> {
        self.ctl.set_exposed(name, exposed)
    }

    /// The pools an engine's IPAM handed out and not released (see `core::reservations`).
    pub fn reserved_pools(&mut self) -> Result<Vec<IpNet>> {
        self.ctl.reserved_pools()
    }

    pub fn reserve_pool(&mut self, subnet: IpNet) -> Result<()> {
        self.ctl.reserve_pool(subnet)
    }

    pub fn release_pool(&mut self, subnet: IpNet) -> Result<()> {
        self.ctl.release_pool(subnet)
    }

    pub fn reserved_addresses(&mut self, subnet: IpNet) -> Result<HashSet<IpAddr>> {
        self.ctl.reserved_addresses(subnet)
    }

    pub fn reserve_address(&mut self, subnet: IpNet, ip: IpAddr) -> Result<()> {
        self.ctl.reserve_address(subnet, ip)
    }

    pub fn release_address(&mut self, subnet: IpNet, ip: IpAddr) -> Result<()> {
        self.ctl.release_address(subnet, ip)
    }

    fn attachment_of(&mut self, c: &Container) -> Result<Option<Attachment>> {
        let (model::Mode::Bridge, Some(network), Some(ip), Some(mac), Some(veth)) =
            (&c.mode, &c.network, c.ip, &c.mac, &c.host_veth)
        else {
            return Ok(None);
        };
        let net = self.ctl.network(network)?;
        Ok(Some(Attachment {
            name: c.name.clone(),
            network: net.name.clone(),
            netns: c.netns.clone(),
            ip,
            prefix_len: net.subnet.prefix_len(),
            gateway: net.gateway,
            ip6: match (c.ip6, net.subnet6, net.gateway6) {
                (Some(ip6), Some(subnet6), Some(gateway6)) => {
                    Some((Ipv6Net::new(ip6, subnet6.prefix_len())?, gateway6))
                }
                _ => None,
            },
            mac: ipam::parse_mac(mac)?,
            ifname: c.ifname().to_string(),
            host_veth: veth.clone(),
            ports: c.ports.clone(),
        }))
    }
}

/// Checks that an endpoint's kernel objects are there: the host end of its veth, and the
/// container end in its namespace, up, with its addresses and its default routes.
pub async fn check_attachment(a: &Attachment) -> Result<()> {
    Netlink::in_ns(None)?
        .require_link(&a.host_veth)
        .await
        .context("the host end of the veth is gone")?;
    let inside = Netlink::in_ns(Some(&a.netns))?;
    let index = inside
        .require_link(&a.ifname)
        .await
        .with_context(|| format!("{} is gone from the container", a.ifname))?;
    let have = inside.addresses(index).await?;
    let want = [Some(a.ip.into()), a.ip6.map(|(ip6, _)| ip6.addr().into())];
    if let Some(gone) = want.into_iter().flatten().find(|ip| !have.contains(ip)) {
        anyhow::bail!("{} no longer has the address {gone}", a.ifname);
    }
    if !inside.is_up(index).await? {
        anyhow::bail!("{} is down", a.ifname);
    }
    let gateways = [Some(a.gateway.into()), a.ip6.map(|(_, gw6)| gw6.into())];
    for gateway in gateways.into_iter().flatten() {
        if !inside.has_default_route(gateway, index).await? {
            anyhow::bail!("the default route via {gateway} on {} is gone", a.ifname);
        }
    }
    Ok(())
}

/// Moves the container end of `a`'s veth out of its namespace into the host's, named
/// `host_name` there (for an engine that moves it into its own sandbox itself).
pub async fn hand_out_interface(a: &Attachment, host_name: &str) -> Result<()> {
    // This thread is in the host namespace (the process entered it before any thread).
    let host = std::fs::File::open("/proc/thread-self/ns/net")
        .context("open the host's network namespace")?;
    let inside = Netlink::in_ns(Some(&a.netns))?;
    let Some(index) = inside.link_index(&a.ifname).await? else {
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
