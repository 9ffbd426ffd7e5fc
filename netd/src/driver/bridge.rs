//! The bridge driver: a network is a bridge in the host namespace with the gateway address on
//! it; a container is a network namespace and, in bridge mode, a veth pair with one end on
//! the bridge. Each object is checked without changing the kernel (`check_*`), then made
//! (`setup_*`, which stops at the first failure), and removed by `teardown_*`, which tries
//! every step and returns what failed. Teardowns are idempotent, so `gc` can run them on
//! whatever a killed command left.

use std::{
    hash::{BuildHasher as _, Hasher as _},
    net::{IpAddr, UdpSocket},
    path::Path,
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnet::IpNet;

use super::{
    Failures,
    netlink::{Netlink, disable_ipv6, enable_ipv6_without_dad, no_such_device, set_sysctl},
    netns,
};
use crate::{
    core::{ipam, spec::Netns},
    datapath::{Datapath, EndpointSpec, LinkSpec, PortSpec},
    fault,
    store::{
        Container, Network,
        model::{PortMapping, Status},
    },
};

/// The subnets routed on the host, of both families (a new network must overlap none).
pub async fn host_subnets() -> Result<Vec<IpNet>> {
    Netlink::in_ns(None)?.networks_in_use().await
}

/// Checks that the host has each address in `addrs` that ports would be published on, as
/// Docker's proxy finds when it binds them: published on an address the host lacks, a port
/// would catch only what the host forwards for someone else. The unspecified address stands
/// for all of them, and a loopback address is the host's whether or not its loopback has it
/// yet (no packet to it is forwarded).
pub fn check_host_has(addrs: impl IntoIterator<Item = IpAddr>) -> Result<()> {
    let checked = |ip: &IpAddr| !ip.is_unspecified() && !ip.is_loopback();
    for ip in addrs.into_iter().filter(checked) {
        UdpSocket::bind((ip, 0))
            .map_err(|e| anyhow!("publishing on {ip}: not an address of the host ({e})"))?;
    }
    Ok(())
}

/// Checks that network `net` can be made: its bridge's name is free on the host.
pub async fn check_network(net: &Network) -> Result<()> {
    if Netlink::in_ns(None)?
        .link_index(&net.bridge)
        .await?
        .is_some()
    {
        bail!("interface {} already exists on the host", net.bridge);
    }
    Ok(())
}

/// Makes network `net`: the bridge with its MAC, MTU and the gateway address, forwarding on,
/// and the datapath's part.
pub async fn setup_network(net: &Network, dp: &dyn Datapath) -> Result<()> {
    let host = Netlink::in_ns(None)?;
    let index = host
        .add_bridge(&net.bridge, Some(net.mtu), net.spec().bridge_mac())
        .await?;
    fault::step("network-bridge");
    host.add_addr(
        index,
        IpNet::new(net.gateway.into(), net.subnet.prefix_len())?,
    )
    .await?;
    // Containers' traffic to the outside is routed by the host.
    set_sysctl(None, "net.ipv4.ip_forward", "1")?;
    if let (Some(subnet6), Some(gateway6)) = (net.subnet6, net.gateway6) {
        // On even where the host keeps IPv6 off for new interfaces.
        enable_ipv6_without_dad(None, &net.bridge)?;
        host.add_addr(index, IpNet::new(gateway6.into(), subnet6.prefix_len())?)
            .await?;
        // As Docker: the host routes IPv6 too. A host that takes its own IPv6 route from
        // router advertisements needs accept_ra=2 on its uplink to keep doing so.
        set_sysctl(None, "net.ipv6.conf.all.forwarding", "1")?;
    } else {
        // Off even where the host turns it on for new interfaces: its containers have none,
        // and IPv6 a container crafts anyway must not be routed on.
        disable_ipv6(&net.bridge)?;
    }
    dp.setup_network(&net.spec())
        .with_context(|| format!("set up the {} datapath for {}", net.datapath, net.name))?;
    fault::step("network-datapath");
    Ok(())
}

/// Removes network `net`'s datapath part and bridge. `datapath_ready`: the datapath's
/// `setup_network` is known to have completed, so failing to undo it is an error (otherwise
/// it may never have run, and its undo is best effort).
pub async fn teardown_network(net: &Network, dp: &dyn Datapath, datapath_ready: bool) -> Failures {
    let mut failed = Failures::default();
    let undone = dp.teardown_network(&net.spec());
    if datapath_ready {
        failed.note(&format!("the {} datapath", net.datapath), undone);
    }
    fault::step("network-datapath-removed");
    failed.note(
        &format!("bridge {}", net.bridge),
        remove_link(None, &net.bridge).await,
    );
    failed
}

/// Takes container `c`'s host-side veth off its network, if it is there: off the bridge and
/// down in one request, so nothing passes through it from then on; then deletes it, unless `c`
/// is running (an `rm`) and the veth's other end is in the namespace netd made, removed next.
/// The kernel deletes the pair when it dismantles that namespace, after the command returns:
/// a veth's own deletion takes 16–28 ms here, the namespace's about 1.4. (A process left in
/// the namespace keeps the pair, down and off the bridge, until it exits.) A create that
/// failed and `gc` delete it before they return, so they leave nothing behind even for a
/// moment.
async fn release_veth(c: &Container, veth: &str) -> Result<()> {
    let host = Netlink::in_ns(None)?;
    let Some(index) = host.link_index(veth).await? else {
        return Ok(());
    };
    let taken_off = host
        .set_link(index, "take the veth off its bridge", |m| {
            m.down().nocontroller()
        })
        .await;
    match taken_off {
        // Gone already (see `del_link`): an engine's container killed, then DELed.
        Err(e) if no_such_device(&e) => return Ok(()),
        taken_off => taken_off?,
    }
    if c.status == Status::Running && container_end_inside(c).await? {
        return Ok(());
    }
    host.del_link(index).await
}

/// Whether the container end of `c`'s veth is in a namespace netd made for `c`: an engine that
/// moves it into a sandbox of its own (Docker) takes it out of there.
async fn container_end_inside(c: &Container) -> Result<bool> {
    if !(c.owns_netns && netns::exists(&c.name)) {
        return Ok(false);
    }
    let inside = Netlink::in_ns(Some(&c.netns))?;
    Ok(inside.link_index(c.ifname()).await?.is_some())
}

/// Deletes interface `name` in namespace `ns` (the host's when `None`) if it is there.
async fn remove_link(ns: Option<&Path>, name: &str) -> Result<()> {
    Netlink::in_ns(ns)?.remove_link(name).await
}

/// `veth` + 7 hex characters, like Docker's host-side names, not yet used on the host.
pub async fn free_veth_name(seed: &str) -> Result<String> {
    let host = Netlink::in_ns(None)?;
    for attempt in 0u32..16 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write(seed.as_bytes());
        h.write_u32(attempt);
        let name = format!("veth{:07x}", h.finish() & 0x0fff_ffff);
        if host.link_index(&name).await?.is_none() {
            return Ok(name);
        }
    }
    bail!("no free veth name")
}

/// Checks the namespace a container asks for: an existing one must exist, its own must not.
pub fn check_netns(name: &str, asked: &Netns) -> Result<()> {
    let exists = |path: &Path| {
        path.try_exists()
            .with_context(|| format!("check {}", path.display()))
    };
    match asked {
        Netns::Path(path) if !exists(path)? => {
            bail!("network namespace {} does not exist", path.display())
        }
        Netns::Pid(pid) if !exists(Path::new(&format!("/proc/{pid}/ns/net")))? => {
            bail!("no process with PID {pid}")
        }
        Netns::Own if netns::exists(name) => {
            bail!("network namespace {name:?} already exists")
        }
        _ => Ok(()),
    }
}

/// A container's network on a bridge network: `net` with its datapath, and the links its
/// endpoint opens.
pub struct OnNetwork<'a> {
    pub net: &'a Network,
    pub dp: &'a dyn Datapath,
    pub links: Vec<LinkSpec>,
}

/// A datapath step of a container's setup, reported once done so the caller can record it
/// (a removal then knows the object is there, and a failure to remove it is real).
pub enum Stage {
    /// The datapath has the endpoint, on the veth of this index.
    Endpoint(u32),
    Published,
}

/// Makes container `c`'s namespace (when netd owns it), loopback, and on a bridge network its
/// veth, endpoint and published ports, calling `done` after each datapath step.
pub async fn setup_container(
    c: &Container,
    on: Option<&OnNetwork<'_>>,
    mut done: impl FnMut(Stage) -> Result<()>,
) -> Result<()> {
    if c.owns_netns {
        netns::create(&c.name)?;
    }
    fault::step("container-netns");
    let inside = Netlink::in_ns(Some(&c.netns))?;
    let lo = inside.require_link("lo").await?;
    inside.set_up(lo).await?;
    if let Some(on) = on {
        connect_veth(on.net, c, &inside).await?;
        fault::step("container-veth");
        let ep = endpoint_spec(on, c).await?;
        // The datapath's programs go on the veth before it is up and on the bridge: a running
        // container (`--netns`, `--pid`) must not send a frame past them.
        on.dp.add_endpoint(&on.net.spec(), &ep)?;
        plug_veth(on, c).await?;
        fault::step("container-endpoint");
        done(Stage::Endpoint(ep.host_ifindex))?;
        on.dp
            .publish(&on.net.spec(), &port_specs(c, &c.ports, on.net.id))?;
        fault::step("container-publish");
        done(Stage::Published)?;
    }
    Ok(())
}

/// The veth pair: the container end (`eth0` unless named otherwise) with the address, MAC and
/// MTU, and a default route via the gateway; the host end stays down and off the bridge (see
/// [`plug_veth`]).
async fn connect_veth(net: &Network, c: &Container, inside: &Netlink) -> Result<()> {
    let (Some(host_name), Some(mac), Some(ip)) = (&c.host_veth, &c.mac, c.ip) else {
        bail!("container {:?} has no veth planned", c.name);
    };
    let mac = ipam::parse_mac(mac)?;
    if inside.link_index(c.ifname()).await?.is_some() {
        bail!("the namespace has an interface {} already", c.ifname());
    }
    let host = Netlink::in_ns(None)?;
    host.add_veth_into(host_name, net.mtu, c.ifname(), &c.netns, mac)
        .await?;
    // Before either end is up, no IPv6 addresses where nothing uses them: a bridge port needs
    // none of its own, and a container on a network without IPv6 none. Otherwise each end
    // makes a link-local address and sends router solicitations and MLD reports, which the
    // bridge floods to every port: with 1,000 containers, a create took 16 ms instead of 9.
    // By netlink: a write under /proc/sys/net costs time linear in the number of namespaces.
    let host_end = host.require_link(host_name).await?;
    host.no_ipv6_autoconf(host_end).await?;
    let inner = inside.require_link(c.ifname()).await?;
    if net.subnet6.is_none() {
        inside.no_ipv6_autoconf(inner).await?;
    }
    inside.set_up(inner).await?;
    inside
        .add_addr(inner, IpNet::new(ip.into(), net.subnet.prefix_len())?)
        .await?;
    inside.add_default_route(net.gateway.into(), inner).await?;
    if let (Some(ip6), Some(subnet6), Some(gateway6)) = (c.ip6, net.subnet6, net.gateway6) {
        enable_ipv6_without_dad(Some(&c.netns), c.ifname())?;
        inside
            .add_addr(inner, IpNet::new(ip6.into(), subnet6.prefix_len())?)
            .await?;
        inside.add_default_route(gateway6.into(), inner).await?;
    }
    Ok(())
}

/// Puts the host end of container `c`'s veth on the network's bridge (in hairpin mode if the
/// datapath needs it) and up.
async fn plug_veth(on: &OnNetwork<'_>, c: &Container) -> Result<()> {
    let Some(host_name) = &c.host_veth else {
        bail!("container {:?} has no veth planned", c.name);
    };
    let host = Netlink::in_ns(None)?;
    let bridge = host.require_link(&on.net.bridge).await?;
    let host_end = host.require_link(host_name).await?;
    host.set_link(host_end, "attach the veth to the bridge", |m| {
        m.controller(bridge)
    })
    .await?;
    if on.dp.bridge_hairpin() {
        host.set_hairpin(host_end).await?;
    }
    host.set_up(host_end).await
}

/// The datapath's view of container `c`'s endpoint (its veth's index as recorded, else as
/// the veth has it, else 0: no veth was made).
async fn endpoint_spec(on: &OnNetwork<'_>, c: &Container) -> Result<EndpointSpec> {
    let (Some(host_ifname), Some(mac), Some(ip)) = (&c.host_veth, &c.mac, c.ip) else {
        bail!("container {:?} is not on a bridge network", c.name);
    };
    let host_ifindex = match c.host_ifindex {
        Some(index) => index,
        None => Netlink::in_ns(None)?
            .link_index(host_ifname)
            .await?
            .unwrap_or(0),
    };
    Ok(EndpointSpec {
        network_id: on.net.id,
        container: c.name.clone(),
        ip,
        ip6: c.ip6,
        mac: ipam::parse_mac(mac)?,
        host_ifname: host_ifname.clone(),
        host_ifindex,
        links: on.links.clone(),
        conntrack_limit: c.conntrack_limit,
    })
}

/// The datapath's view of `ports` of container `c`.
pub fn port_specs(c: &Container, ports: &[PortMapping], network_id: u32) -> Vec<PortSpec> {
    let Some(container_ip) = c.ip else {
        return vec![];
    };
    ports
        .iter()
        .map(|p| PortSpec {
            network_id,
            proto: p.proto,
            host_ip: p.host_ip,
            host_port: p.host_port,
            container_ip,
            container_ip6: c.ip6,
            container_port: p.container_port,
            allow: c.publish_allow.clone(),
        })
        .collect()
}

/// What a container teardown must remove from the datapath: the ports and endpoint known to
/// be there (their removal must succeed) and those that may be (best effort).
pub struct Published<'a> {
    pub sure: &'a [PortMapping],
    pub maybe: &'a [PortMapping],
}

/// Unpublishes `ports` of `c` that may or may not have been published (their publish was
/// interrupted): the datapath removes those it has and reports the others as not published,
/// which is no failure here, so its answer is not kept.
pub fn unpublish_if_there(on: &OnNetwork<'_>, c: &Container, ports: &[PortMapping]) {
    if !ports.is_empty() {
        on.dp
            .unpublish(&on.net.spec(), &port_specs(c, ports, on.net.id))
            .ok();
    }
}

/// Removes everything container `c` may have: its ports, endpoint, veth, `netd link` ends,
/// namespace (when netd made it) and files. Used by rm, by a failed create and by gc, so each
/// leaves the same nothing behind.
pub async fn teardown_container(
    c: &Container,
    on: Option<&OnNetwork<'_>>,
    ports: Published<'_>,
    files: &Path,
) -> Failures {
    let mut failed = Failures::default();
    let mut endpoint = None;
    if let Some(on) = on {
        let spec = on.net.spec();
        if !ports.sure.is_empty() {
            let undone = on
                .dp
                .unpublish(&spec, &port_specs(c, ports.sure, on.net.id));
            failed.note("unpublish", undone);
        }
        unpublish_if_there(on, c, ports.maybe);
        fault::step("container-unpublished");
        // Read while the veth is still there (its index).
        endpoint = Some(endpoint_spec(on, c).await);
    }
    let mut veth_released = true;
    if let Some(veth) = &c.host_veth {
        let released = release_veth(c, veth).await;
        veth_released = released.is_ok();
        failed.note(&format!("veth {veth}"), released);
        fault::step("container-veth-removed");
    }
    // The endpoint's policy stays while its veth may still be on the bridge: without it, the
    // programs there would let the veth's frames through unchecked.
    if let (Some(on), Some(ep), true) = (on, endpoint, veth_released) {
        match ep {
            Ok(ep) => {
                let undone = on.dp.remove_endpoint(&on.net.spec(), &ep);
                if c.endpoint_added {
                    failed.note("the datapath endpoint", undone);
                }
            }
            Err(e) => failed.note("the datapath endpoint", Err(e)),
        }
    }
    if netns_reachable(c) {
        for link in &c.peer_links {
            let gone = remove_link(Some(&c.netns), &link.ifname).await;
            failed.note(&format!("link {}", link.ifname), gone);
        }
    }
    if c.owns_netns && netns::exists(&c.name) {
        failed.note("the namespace", netns::remove(&c.name));
        fault::step("container-netns-removed");
    }
    if files.exists() {
        let gone =
            std::fs::remove_dir_all(files).with_context(|| format!("remove {}", files.display()));
        failed.note("the /etc files", gone);
    }
    failed
}

/// Whether `c`'s namespace is still there to clean inside (a killed create may not have made
/// it; a process's namespace goes with the process).
fn netns_reachable(c: &Container) -> bool {
    c.netns.exists()
}
