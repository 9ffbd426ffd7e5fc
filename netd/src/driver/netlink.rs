//! rtnetlink in a chosen network namespace: links, addresses and routes.
//!
//! A netlink socket belongs to the namespace of the thread that opened it, so [`Netlink::in_ns`]
//! opens it on a thread inside the target namespace and keeps using it from anywhere.

use std::{fs::File, net::IpAddr, os::fd::AsRawFd, path::Path};

use anyhow::{Context as _, Result, anyhow};
use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::netns;

/// Whether `e` is the kernel's answer about an interface that is not there (any more).
pub fn no_such_device(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|cause| cause.downcast_ref().is_some_and(is_enodev))
}

/// Whether netlink answered ENODEV: no such interface.
fn is_enodev(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV)
}

/// A netlink connection bound to one network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a connection in the namespace at `ns`, or in the caller's when `None`.
    /// Must be called inside a tokio runtime, which drives the connection.
    pub fn in_ns(ns: Option<&Path>) -> Result<Self> {
        let runtime = tokio::runtime::Handle::current();
        let (connection, handle, _) = netns::run_in(ns, || {
            let _guard = runtime.enter();
            rtnetlink::new_connection().context("open a netlink socket")
        })?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The index of the link called `name`, if there is one.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.link(name).await?.map(|m| m.header.index))
    }

    /// Deletes the link called `name` if there is one.
    pub async fn remove_link(&self, name: &str) -> Result<()> {
        if let Some(index) = self.link_index(name).await? {
            self.del_link(index).await?;
        }
        Ok(())
    }

    /// The index of the link called `name`, or an error naming it.
    pub async fn require_link(&self, name: &str) -> Result<u32> {
        self.link_index(name)
            .await?
            .ok_or_else(|| anyhow!("no interface named {name:?}"))
    }

    async fn link(&self, name: &str) -> Result<Option<LinkMessage>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if is_enodev(&e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("look up interface {name:?}")),
        }
    }

    /// Names and indexes of every link in the namespace.
    pub async fn links(&self) -> Result<Vec<(u32, String)>> {
        let mut out = Vec::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await.context("list interfaces")? {
            let name = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            out.push((link.header.index, name.unwrap_or_default()));
        }
        Ok(out)
    }

    /// Link `index`, if there is one.
    async fn link_at(&self, index: u32) -> Result<Option<LinkMessage>> {
        let mut links = self.handle.link().get().match_index(index).execute();
        links.try_next().await.context("get interface")
    }

    /// The MAC address of the link `index`.
    pub async fn link_mac(&self, index: u32) -> Result<Option<[u8; 6]>> {
        let Some(link) = self.link_at(index).await? else {
            return Ok(None);
        };
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(mac) => mac.as_slice().try_into().ok(),
            _ => None,
        }))
    }

    /// Whether link `index` is up (administratively).
    pub async fn is_up(&self, index: u32) -> Result<bool> {
        use netlink_packet_route::link::LinkFlags;
        let link = self
            .link_at(index)
            .await?
            .ok_or_else(|| anyhow!("no interface #{index}"))?;
        Ok(link.header.flags.contains(LinkFlags::Up))
    }

    /// Whether the main table's default route of `gateway`'s family goes via `gateway` on link
    /// `dev`.
    pub async fn has_default_route(&self, gateway: IpAddr, dev: u32) -> Result<bool> {
        use netlink_packet_route::route::{RouteAddress, RouteAttribute};
        let family = match gateway {
            IpAddr::V4(_) => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            IpAddr::V6(_) => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        };
        let mut routes = self.handle.route().get(family).execute();
        while let Some(msg) = routes.try_next().await.context("list routes")? {
            if msg.header.destination_prefix_length != 0 {
                continue;
            }
            let via = msg.attributes.iter().any(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => IpAddr::V4(*ip) == gateway,
                RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => IpAddr::V6(*ip) == gateway,
                _ => false,
            });
            let on = msg.attributes.contains(&RouteAttribute::Oif(dev));
            if via && on {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Creates a veth pair `name` <-> `peer` in this namespace.
    pub async fn add_veth(&self, name: &str, peer: &str, mtu: Option<u32>) -> Result<()> {
        let mut msg = LinkVeth::new(name, peer);
        if let Some(mtu) = mtu {
            msg = msg.mtu(mtu);
        }
        self.handle
            .link()
            .add(msg.build())
            .execute()
            .await
            .with_context(|| format!("create veth pair {name}/{peer}"))
    }

    /// Creates a veth pair whose peer is made directly inside the namespace at `peer_ns`,
    /// already named `peer` and carrying `peer_mac`. Making it there instead of moving it
    /// afterwards saves the RCU grace period a namespace move waits for (~15 ms a container).
    pub async fn add_veth_into(
        &self,
        name: &str,
        mtu: u32,
        peer: &str,
        peer_ns: &Path,
        peer_mac: [u8; 6],
    ) -> Result<()> {
        use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth};
        let ns = File::open(peer_ns).with_context(|| format!("open {}", peer_ns.display()))?;
        let peer_msg = LinkUnspec::new_with_name(peer)
            .setns_by_fd(ns.as_raw_fd())
            .address(peer_mac.to_vec())
            .mtu(mtu)
            .build();
        let msg = rtnetlink::LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_string())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .with_context(|| format!("create veth pair {name}/{peer} into {}", peer_ns.display()))
    }

    /// Creates a bridge `name` with MAC `mac`, up.
    pub async fn add_bridge(&self, name: &str, mtu: Option<u32>, mac: [u8; 6]) -> Result<u32> {
        let mut msg = LinkBridge::new(name).up().address(mac.to_vec());
        if let Some(mtu) = mtu {
            msg = msg.mtu(mtu);
        }
        self.handle
            .link()
            .add(msg.build())
            .execute()
            .await
            .with_context(|| format!("create bridge {name}"))?;
        self.require_link(name).await
    }

    /// Deletes the link `index` (for a veth, both ends go). One already gone is deleted: the
    /// kernel may take it meanwhile (a namespace whose last process went is dismantled
    /// asynchronously, its interfaces with it).
    pub async fn del_link(&self, index: u32) -> Result<()> {
        match self.handle.link().del(index).execute().await {
            Err(e) if is_enodev(&e) => Ok(()),
            deleted => deleted.with_context(|| format!("delete interface #{index}")),
        }
    }

    /// Moves the link `index` into the namespace at `ns`.
    pub async fn move_to_ns(&self, index: u32, ns: &Path) -> Result<()> {
        let file = File::open(ns).with_context(|| format!("open {}", ns.display()))?;
        let msg = LinkUnspec::new_with_index(index)
            .setns_by_fd(file.as_raw_fd())
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .with_context(|| format!("move interface #{index} to {}", ns.display()))
    }

    /// Applies `edit` to a change message for link `index` (rename, MAC, MTU, master, up).
    pub async fn set_link(
        &self,
        index: u32,
        what: &str,
        edit: impl FnOnce(
            rtnetlink::LinkMessageBuilder<LinkUnspec>,
        ) -> rtnetlink::LinkMessageBuilder<LinkUnspec>,
    ) -> Result<()> {
        let msg = edit(LinkUnspec::new_with_index(index)).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .with_context(|| format!("{what} (interface #{index})"))
    }

    /// Stops link `index` from making IPv6 addresses of its own (`addr_gen_mode` none): no
    /// link-local address, so no duplicate address detection, router solicitations or MLD
    /// reports from it once up. A link without IPv6 at all (a kernel without it, an MTU under
    /// 1280) makes none already: the kernel's EAFNOSUPPORT is success here.
    pub async fn no_ipv6_autoconf(&self, index: u32) -> Result<()> {
        use netlink_packet_route::link::{
            AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute,
        };
        let msg = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]))
            .build();
        match self.handle.link().set(msg).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EAFNOSUPPORT => Ok(()),
            other => other.with_context(|| {
                format!("stop IPv6 address autoconfiguration (interface #{index})")
            }),
        }
    }

    /// Turns hairpin mode on for bridge port `index`.
    pub async fn set_hairpin(&self, index: u32) -> Result<()> {
        let msg = LinkBridgePort::new(index).hairpin(true).build();
        self.handle
            .link()
            .set_port(msg)
            .execute()
            .await
            .with_context(|| format!("set hairpin mode (interface #{index})"))
    }

    /// Brings link `index` up.
    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.set_link(index, "set interface up", |m| m.up()).await
    }

    /// Adds `addr` to link `index`; an IPv6 one without duplicate address detection (netd
    /// hands out each address once), so it is usable at once instead of seconds later.
    pub async fn add_addr(&self, index: u32, addr: IpNet) -> Result<()> {
        use netlink_packet_route::address::{AddressAttribute, AddressFlags};
        let mut request = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len());
        if addr.addr().is_ipv6() {
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        request
            .execute()
            .await
            .with_context(|| format!("add address {addr} to interface #{index}"))
    }

    /// The addresses (of both families) on link `index`.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpAddr>> {
        use netlink_packet_route::address::AddressAttribute;
        let mut found = Vec::new();
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = addrs.try_next().await.context("list addresses")? {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    found.push(*ip);
                }
            }
        }
        Ok(found)
    }

    /// Every network in use in this namespace, of both families: interface addresses and
    /// route destinations (default routes, IPv6 link-local and multicast excluded). A new
    /// subnet must overlap none of them.
    pub async fn networks_in_use(&self) -> Result<Vec<IpNet>> {
        use netlink_packet_route::{
            address::AddressAttribute,
            route::{RouteAddress, RouteAttribute},
        };
        let mut nets = Vec::new();
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs.try_next().await.context("list addresses")? {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    nets.push(IpNet::new(*ip, msg.header.prefix_len)?.trunc());
                }
            }
        }
        for family in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let mut routes = self.handle.route().get(family).execute();
            while let Some(msg) = routes.try_next().await.context("list routes")? {
                let len = msg.header.destination_prefix_length;
                for attr in &msg.attributes {
                    let ip = match attr {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => IpAddr::V4(*ip),
                        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => IpAddr::V6(*ip),
                        _ => continue,
                    };
                    if len > 0 {
                        nets.push(IpNet::new(ip, len)?.trunc());
                    }
                }
            }
        }
        // Every interface has these; they say nothing about the subnets in use.
        let link_local: IpNet = "fe80::/10".parse()?;
        let multicast: IpNet = "ff00::/8".parse()?;
        nets.retain(|n| {
            !link_local.contains(n) && !multicast.contains(n) && !n.addr().is_loopback()
        });
        Ok(nets)
    }

    /// Adds a route to `dst` via `gateway` (or directly on `dev` when `gateway` is `None`).
    pub async fn add_route(
        &self,
        dst: IpNet,
        gateway: Option<IpAddr>,
        dev: Option<u32>,
    ) -> Result<()> {
        self.handle
            .route()
            .add(route_message(dst, gateway, dev, 0)?)
            .execute()
            .await
            .with_context(|| route_text(dst, gateway))
    }

    /// Adds the default route via `gateway` on `dev`: at metric 0, or behind the one the
    /// namespace has already (it is on another network too) at metric `dev`, which no other
    /// interface's default route has: each network keeps its own, and the first one's is used.
    pub async fn add_default_route(&self, gateway: IpAddr, dev: u32) -> Result<()> {
        let dst = match gateway {
            IpAddr::V4(_) => IpNet::from(ipnet::Ipv4Net::default()),
            IpAddr::V6(_) => IpNet::from(ipnet::Ipv6Net::default()),
        };
        let add = |metric| async move {
            self.handle
                .route()
                .add(route_message(dst, Some(gateway), Some(dev), metric)?)
                .execute()
                .await
                .map_err(anyhow::Error::from)
        };
        let first = add(0).await;
        let taken = first
            .as_ref()
            .err()
            .and_then(|e| e.downcast_ref::<rtnetlink::Error>());
        match taken {
            Some(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {
                add(dev).await
            }
            _ => first,
        }
        .with_context(|| route_text(dst, Some(gateway)))
    }
}

/// A route to `dst` (via `gateway`, on `dev`) at `metric`.
fn route_message(
    dst: IpNet,
    gateway: Option<IpAddr>,
    dev: Option<u32>,
    metric: u32,
) -> Result<netlink_packet_route::route::RouteMessage> {
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .map_err(|e| anyhow!("route to {dst}: {e}"))?
        .priority(metric);
    if let Some(gw) = gateway {
        builder = builder
            .gateway(gw)
            .map_err(|e| anyhow!("route via {gw}: {e}"))?;
    }
    if let Some(dev) = dev {
        builder = builder.output_interface(dev);
    }
    Ok(builder.build())
}

fn route_text(dst: IpNet, gateway: Option<IpAddr>) -> String {
    match gateway {
        Some(gw) => format!("add route {dst} via {gw}"),
        None => format!("add route {dst}"),
    }
}

/// Writes `key` of interface `ifname`'s IPv6 settings (`net.ipv6.conf.IFNAME.KEY`) in the
/// namespace at `ns` (the caller's when `None`); by path, as an interface name may hold dots.
pub fn set_ipv6_conf(ns: Option<&Path>, ifname: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/{key}");
    netns::run_in(ns, || {
        std::fs::write(&path, value)
            .with_context(|| format!("set net.ipv6.conf.{ifname}.{key}={value}"))
    })
}

/// Turns IPv6 off on the host's interface `ifname`: the bridge of a network without IPv6
/// takes no IPv6 in to route, where no rule of the iptables datapath would look at it. An
/// interface with no IPv6 settings (a kernel without IPv6, an MTU under IPv6's 1280) has none
/// to turn off.
pub fn disable_ipv6(ifname: &str) -> Result<()> {
    if !Path::new(&format!("/proc/sys/net/ipv6/conf/{ifname}")).exists() {
        return Ok(());
    }
    set_ipv6_conf(None, ifname, "disable_ipv6", "1")
}

/// Turns IPv6 on for interface `ifname` in namespace `ns` without duplicate address
/// detection: netd's addresses are unique by construction (and the link-local one derives
/// from a MAC made from one), and a tentative link-local address would leave the interface
/// unable to resolve neighbours for a second or two. The link-local address is the EUI-64
/// one of the MAC (`addr_gen_mode` 0, whatever the namespace's default), the one the eBPF
/// datapath lets a container advertise. Off, then on, so addresses made before (on a host
/// whose interfaces start with IPv6 on) are made again so.
pub fn enable_ipv6_without_dad(ns: Option<&Path>, ifname: &str) -> Result<()> {
    set_ipv6_conf(ns, ifname, "disable_ipv6", "1")?;
    set_ipv6_conf(ns, ifname, "accept_dad", "0")?;
    set_ipv6_conf(ns, ifname, "addr_gen_mode", "0")?;
    set_ipv6_conf(ns, ifname, "disable_ipv6", "0")
}

/// Writes a sysctl under /proc/sys/net in the namespace at `ns` (the caller's when `None`).
/// /proc/sys/net is per namespace: the writer thread's namespace decides which one changes.
pub fn set_sysctl(ns: Option<&Path>, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    netns::run_in(ns, || {
        std::fs::write(&path, value).with_context(|| format!("set sysctl {key}={value}"))
    })
}
