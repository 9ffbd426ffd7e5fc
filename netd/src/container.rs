//! `netd container create/rm`, `netd link` and garbage collection.
//!
//! Create records the container as `creating` first, then makes the kernel objects; any
//! failure removes them again with the same teardown `rm` uses, and so does the next command
//! when the creator died midway (`kill -9`).

use std::{
    collections::HashSet,
    hash::{BuildHasher as _, Hasher as _},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use anyhow::{Context as _, Result, bail};
use ipnet::{IpNet, Ipv4Net};

use crate::{
    controller::Ctx,
    datapath::{EndpointSpec, LinkSpec, PortSpec},
    etcfiles, ipam,
    netlink::Netlink,
    netns, network,
    ports::{self, Publish},
    state::{Container, Exposed, Link, Mode, PeerLink, PortMapping, State, Status},
};

/// `netd container create` as asked (the CLI's arguments).
#[derive(Debug, Default, clap::Args)]
pub struct Request {
    pub name: String,
    /// A network name, or host, none, container:OTHER.
    #[arg(long, default_value = "bridge")]
    pub network: String,
    /// Configure this existing network namespace instead of making one.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Configure the network namespace of this process instead of making one.
    #[arg(long)]
    pub pid: Option<u32>,
    #[arg(long)]
    pub ip: Option<Ipv4Addr>,
    #[arg(long)]
    pub mac: Option<String>,
    #[arg(long)]
    pub hostname: Option<String>,
    #[arg(long)]
    pub dns: Vec<Ipv4Addr>,
    #[arg(long)]
    pub dns_search: Vec<String>,
    /// HOST:IP
    #[arg(long = "add-host")]
    pub add_hosts: Vec<String>,
    /// OTHER[:ALIAS]
    #[arg(long = "link")]
    pub links: Vec<String>,
    /// [IP:]HOSTPORT[-END]:CPORT[-END][/tcp|/udp]
    #[arg(short = 'p', long)]
    pub publish: Vec<String>,
    /// Publish every --expose'd port on a free host port.
    #[arg(short = 'P', long)]
    pub publish_all: bool,
    /// Published ports accept new connections only from this source range (repeatable;
    /// from anywhere when not given).
    #[arg(long, value_name = "CIDR")]
    pub publish_allow: Vec<Ipv4Net>,
    /// PORT[-END][/tcp|/udp]
    #[arg(long)]
    pub expose: Vec<String>,
    /// The most connections (tracked flows) the container may have; new ones over it are
    /// dropped (eBPF datapath).
    #[arg(long, value_name = "FLOWS")]
    pub conntrack_limit: Option<u32>,
}

fn parse_mode(network: &str) -> Mode {
    match network {
        "host" => Mode::Host,
        "none" => Mode::None,
        other => match other.strip_prefix("container:") {
            Some(c) => Mode::Container(c.to_string()),
            None => Mode::Bridge,
        },
    }
}

/// Test seam: `NETD_TEST_PAUSE_AFTER=STEP` makes create sleep after STEP, so a test can
/// `kill -9` it at a known point.
fn pause_after(step: &str) {
    if std::env::var("NETD_TEST_PAUSE_AFTER").is_ok_and(|s| s == step) {
        eprintln!("paused after {step}");
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

pub async fn create(ctx: &Ctx, req: Request) -> Result<Container> {
    let mut state = ctx.store.load()?;
    collect_garbage(ctx, &mut state).await?;
    let planned = plan(ctx, &mut state, req).await?;
    let name = planned.name.clone();
    state.containers.insert(name.clone(), planned.clone());
    ctx.store.save(&state)?;
    pause_after("record");
    if let Err(e) = realize(ctx, &state, &planned).await {
        teardown(ctx, &state, &planned).await;
        state.containers.remove(&name);
        ctx.store.save(&state)?;
        return Err(e);
    }
    state.containers.get_mut(&name).expect("recorded").status = Status::Running;
    refresh_linkers(ctx, &state, &name)?;
    ctx.store.save(&state)?;
    Ok(state.containers[&name].clone())
}

/// Validates the request and works out everything the container will be, without touching
/// the kernel (except to make the default network on first use).
async fn plan(ctx: &Ctx, state: &mut State, req: Request) -> Result<Container> {
    network::validate_name("container", &req.name)?;
    if state.containers.contains_key(&req.name) {
        bail!("container {:?} already exists", req.name);
    }
    let mode = parse_mode(&req.network);
    let (netns, owns_netns) = namespace_of(ctx, state, &req, &mode)?;
    let mut c = Container {
        name: req.name.clone(),
        status: Status::Creating,
        creator_pid: std::process::id(),
        mode: mode.clone(),
        netns,
        owns_netns,
        network: None,
        ip: None,
        mac: None,
        host_veth: None,
        hostname: req.hostname.clone().unwrap_or_else(|| req.name.clone()),
        dns: req.dns.clone(),
        dns_search: req.dns_search.clone(),
        add_hosts: req
            .add_hosts
            .iter()
            .map(|h| parse_add_host(h))
            .collect::<Result<_>>()?,
        links: req
            .links
            .iter()
            .map(|l| parse_link(state, l))
            .collect::<Result<_>>()?,
        peer_links: vec![],
        ports: vec![],
        exposed: exposed_ports(&req.expose)?,
        publish_allow: req.publish_allow.clone(),
        conntrack_limit: req.conntrack_limit,
    };
    let wants_ports = !req.publish.is_empty() || req.publish_all;
    if mode != Mode::Bridge {
        if wants_ports {
            bail!(
                "published ports need a bridge network, not --network {}",
                req.network
            );
        }
        if req.ip.is_some() || req.mac.is_some() {
            bail!(
                "--ip and --mac need a bridge network, not --network {}",
                req.network
            );
        }
        return Ok(c);
    }
    if req.network == network::DEFAULT_NETWORK {
        network::ensure_default(ctx, state).await?;
        ctx.store.save(state)?;
    }
    let net = state.network(&req.network)?.clone();
    let used: HashSet<Ipv4Addr> = state
        .containers_on(&net.name)
        .filter_map(|c| c.ip)
        .collect();
    let pool = ipam::Pool {
        subnet: net.subnet,
        range: net.ip_range,
        gateway: net.gateway,
        used: &used,
    };
    let ip = match req.ip {
        Some(ip) => pool.check(ip).map(|()| ip)?,
        None => pool.allocate()?,
    };
    let mac = match &req.mac {
        Some(text) => ipam::parse_mac(text)?,
        None => ipam::mac_for(ip),
    };
    c.network = Some(net.name.clone());
    c.ip = Some(ip);
    c.mac = Some(ipam::format_mac(mac));
    c.host_veth = Some(free_veth_name(&req.name).await?);
    c.ports = plan_ports(state, &req, net.host_ip)?;
    Ok(c)
}

/// The namespace a container uses, and whether netd makes (and later removes) it.
fn namespace_of(ctx: &Ctx, state: &State, req: &Request, mode: &Mode) -> Result<(PathBuf, bool)> {
    if let Mode::Container(other) = mode {
        let other = state.container(other)?;
        return Ok((other.netns.clone(), false));
    }
    if *mode == Mode::Host {
        return Ok((ctx.host_netns.clone(), false));
    }
    match (&req.netns, req.pid) {
        (Some(_), Some(_)) => bail!("--netns and --pid are alternatives: give one"),
        (Some(path), None) => {
            if !path.exists() {
                bail!("network namespace {} does not exist", path.display());
            }
            Ok((path.clone(), false))
        }
        (None, Some(pid)) => {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if !path.exists() {
                bail!("no process with PID {pid}");
            }
            Ok((path, false))
        }
        (None, None) => {
            if netns::exists(&req.name) {
                bail!("network namespace {:?} already exists", req.name);
            }
            Ok((netns::path_of(&req.name), true))
        }
    }
}

fn parse_add_host(spec: &str) -> Result<(String, Ipv4Addr)> {
    let (host, ip) = spec
        .rsplit_once(':')
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| anyhow::anyhow!("invalid --add-host {spec:?}: expected HOST:IP"))?;
    let ip = ip.parse().map_err(|_| {
        anyhow::anyhow!("invalid --add-host {spec:?}: {ip:?} is not an IPv4 address")
    })?;
    Ok((host.to_string(), ip))
}

fn parse_link(state: &State, spec: &str) -> Result<Link> {
    let (container, alias) = spec.split_once(':').unwrap_or((spec, spec));
    state
        .container(container)
        .with_context(|| format!("--link {spec}"))?;
    Ok(Link {
        container: container.to_string(),
        alias: alias.to_string(),
    })
}

fn plan_ports(state: &State, req: &Request, host_ip: Option<Ipv4Addr>) -> Result<Vec<PortMapping>> {
    let mut requests: Vec<Publish> = req
        .publish
        .iter()
        .map(|p| ports::parse_publish(p))
        .collect::<Result<_>>()?;
    let exposed: Vec<Publish> = req
        .expose
        .iter()
        .map(|e| ports::parse_expose(e))
        .collect::<Result<_>>()?;
    if req.publish_all {
        requests.extend(exposed);
    }
    let taken: Vec<PortMapping> = state
        .containers
        .values()
        .flat_map(|c| c.ports.clone())
        .collect();
    ports::assign(&requests, host_ip, &taken)
}

/// `veth` + 7 hex characters, like Docker's host-side names, not yet used on the host.
async fn free_veth_name(seed: &str) -> Result<String> {
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

/// Makes the kernel objects of a planned container.
async fn realize(ctx: &Ctx, state: &State, c: &Container) -> Result<()> {
    if c.owns_netns {
        netns::create(&c.name)?;
    }
    pause_after("netns");
    let inside = Netlink::in_ns(Some(&c.netns))?;
    let lo = inside.require_link("lo").await?;
    inside.set_up(lo).await?;
    if c.mode == Mode::Bridge {
        connect_veth(state, c, &inside).await?;
        pause_after("veth");
        let net = state.network(c.network.as_deref().expect("bridge mode"))?;
        let dp = ctx.datapath(&net.datapath)?;
        // The datapath's programs go on the veth before it is up and on the bridge: a running
        // container (`--netns`, `--pid`) must not send a frame past them.
        dp.add_endpoint(&net.spec(), &endpoint_spec(state, c, net.id).await?)?;
        plug_veth(state, c).await?;
        dp.publish(&net.spec(), &port_specs(c, net.id))?;
    }
    etcfiles::write(&ctx.store.container_dir(&c.name), c, state)
}

/// The veth pair: container end `eth0` with the address, MAC and MTU, and a default route via
/// the gateway; the host end stays down and off the bridge (see [`plug_veth`]).
async fn connect_veth(state: &State, c: &Container, inside: &Netlink) -> Result<()> {
    let net = state.network(c.network.as_deref().expect("bridge mode"))?;
    let host_name = c.host_veth.as_deref().expect("bridge mode");
    let mac = ipam::parse_mac(c.mac.as_deref().expect("bridge mode"))?;
    let host = Netlink::in_ns(None)?;
    host.add_veth_into(host_name, net.mtu, "eth0", &c.netns, mac)
        .await?;
    let eth0 = inside.require_link("eth0").await?;
    inside.set_up(eth0).await?;
    let ip = c.ip.expect("bridge mode");
    inside
        .add_addr(eth0, IpNet::new(ip.into(), net.subnet.prefix_len())?)
        .await?;
    inside
        .add_route(
            "0.0.0.0/0".parse()?,
            Some(IpAddr::V4(net.gateway)),
            Some(eth0),
        )
        .await
}

/// Puts the host end of the container's veth on the network's bridge and up.
async fn plug_veth(state: &State, c: &Container) -> Result<()> {
    let net = state.network(c.network.as_deref().expect("bridge mode"))?;
    let host = Netlink::in_ns(None)?;
    let bridge = host.require_link(&net.bridge).await?;
    let host_end = host
        .require_link(c.host_veth.as_deref().expect("bridge mode"))
        .await?;
    host.set_link(host_end, "attach the veth to the bridge", |m| {
        m.controller(bridge)
    })
    .await?;
    host.set_up(host_end).await
}

async fn endpoint_spec(state: &State, c: &Container, network_id: u32) -> Result<EndpointSpec> {
    let host_ifname = c.host_veth.clone().expect("bridge mode");
    let host_ifindex = Netlink::in_ns(None)?.require_link(&host_ifname).await?;
    Ok(EndpointSpec {
        network_id,
        container: c.name.clone(),
        ip: c.ip.expect("bridge mode"),
        mac: ipam::parse_mac(c.mac.as_deref().expect("bridge mode"))?,
        host_ifname,
        host_ifindex,
        links: link_specs(state, c),
        conntrack_limit: c.conntrack_limit,
    })
}

/// What `c`'s `--link`s open: every exposed and published port of each linked container
/// still there.
fn link_specs(state: &State, c: &Container) -> Vec<LinkSpec> {
    c.links
        .iter()
        .filter_map(|link| state.containers.get(&link.container))
        .filter_map(|peer| Some((peer.ip?, peer.link_ports())))
        .flat_map(|(ip, ports)| {
            ports.into_iter().map(move |(proto, port)| LinkSpec {
                peer: ip,
                proto,
                port,
            })
        })
        .collect()
}

/// `--expose` requests, one entry per port.
fn exposed_ports(expose: &[String]) -> Result<Vec<Exposed>> {
    let mut out = Vec::new();
    for spec in expose {
        let e = ports::parse_expose(spec)?;
        for port in e.container_ports.0..=e.container_ports.1 {
            out.push(Exposed {
                proto: e.proto,
                port,
            });
        }
    }
    Ok(out)
}

fn port_specs(c: &Container, network_id: u32) -> Vec<PortSpec> {
    specs_of(c, &c.ports, network_id)
}

/// The datapath's view of `ports` of container `c`.
fn specs_of(c: &Container, ports: &[PortMapping], network_id: u32) -> Vec<PortSpec> {
    ports
        .iter()
        .map(|p| PortSpec {
            network_id,
            proto: p.proto,
            host_ip: p.host_ip,
            host_port: p.host_port,
            container_ip: c.ip.expect("bridge mode"),
            container_port: p.container_port,
            allow: c.publish_allow.clone(),
        })
        .collect()
}

/// Best-effort removal of everything a container may have: used by rm, by a failed create
/// and by garbage collection, so each of them leaves the same nothing behind.
async fn teardown(ctx: &Ctx, state: &State, c: &Container) {
    let datapath = c
        .network
        .as_deref()
        .and_then(|n| state.networks.get(n))
        .and_then(|net| Some((net, ctx.datapath(&net.datapath).ok()?)));
    let mut endpoint = None;
    if let Some((net, dp)) = &datapath {
        let _ = dp.unpublish(&net.spec(), &port_specs(c, net.id));
        // Read while the veth is still there (its index).
        endpoint = endpoint_spec(state, c, net.id).await.ok();
    }
    // The veth goes before the endpoint's programs are detached: on a device being deleted
    // they detach without an RCU grace period of their own (about 10 ms each here).
    if let Ok(host) = Netlink::in_ns(None)
        && let Some(veth) = &c.host_veth
        && let Ok(Some(index)) = host.link_index(veth).await
    {
        let _ = host.del_link(index).await;
    }
    if let (Some((net, dp)), Some(ep)) = (&datapath, &endpoint) {
        let _ = dp.remove_endpoint(&net.spec(), ep);
    }
    if let Ok(inside) = Netlink::in_ns(Some(&c.netns)) {
        for link in &c.peer_links {
            if let Ok(Some(index)) = inside.link_index(&link.ifname).await {
                let _ = inside.del_link(index).await;
            }
        }
    }
    if c.owns_netns {
        let _ = netns::remove(&c.name);
    }
    let _ = std::fs::remove_dir_all(ctx.store.container_dir(&c.name));
}

pub async fn remove(ctx: &Ctx, name: &str) -> Result<()> {
    let mut state = ctx.store.load()?;
    collect_garbage(ctx, &mut state).await?;
    let c = state.container(name)?.clone();
    let sharers: Vec<&str> = state
        .containers
        .values()
        .filter(|o| o.mode == Mode::Container(name.to_string()))
        .map(|o| o.name.as_str())
        .collect();
    if !sharers.is_empty() {
        bail!(
            "container {name:?} shares its network namespace with: {}",
            sharers.join(", ")
        );
    }
    teardown(ctx, &state, &c).await;
    state.containers.remove(name);
    for other in state.containers.values_mut() {
        other.peer_links.retain(|l| l.peer != name);
    }
    refresh_linkers(ctx, &state, name)?;
    ctx.store.save(&state)
}

/// Rewrites the files of the containers that link to `name`, so their hosts entries follow
/// it when it is re-created with another address (or goes).
fn refresh_linkers(ctx: &Ctx, state: &State, name: &str) -> Result<()> {
    let linkers = state
        .containers
        .values()
        .filter(|c| c.status == Status::Running && c.links.iter().any(|l| l.container == name));
    for c in linkers {
        etcfiles::write(&ctx.store.container_dir(&c.name), c, state)?;
    }
    Ok(())
}

fn process_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// Removes containers whose creator died before finishing. Returns their names.
pub async fn collect_garbage(ctx: &Ctx, state: &mut State) -> Result<Vec<String>> {
    let dead: Vec<Container> = state
        .containers
        .values()
        .filter(|c| c.status == Status::Creating && !process_alive(c.creator_pid))
        .cloned()
        .collect();
    for c in &dead {
        teardown(ctx, state, c).await;
        state.containers.remove(&c.name);
    }
    if !dead.is_empty() {
        ctx.store.save(state)?;
    }
    Ok(dead.into_iter().map(|c| c.name).collect())
}

/// `netd link A B`: a point-to-point veth between two containers, each end carrying its
/// container's own address, with a /32 route to the peer over it.
pub async fn link(ctx: &Ctx, a: &str, b: &str) -> Result<()> {
    let mut state = ctx.store.load()?;
    collect_garbage(ctx, &mut state).await?;
    if a == b {
        bail!("cannot link container {a:?} to itself");
    }
    let (ca, cb) = (state.container(a)?.clone(), state.container(b)?.clone());
    for c in [&ca, &cb] {
        if c.ip.is_none() {
            bail!(
                "container {:?} has no address to link with (network mode {:?})",
                c.name,
                c.mode
            );
        }
        if c.peer_links
            .iter()
            .any(|l| l.peer == if c.name == a { b } else { a })
        {
            bail!("containers {a:?} and {b:?} are already linked");
        }
    }
    let suffix = &free_veth_name(&format!("{a}/{b}")).await?[4..];
    let (end_a, end_b) = (format!("p2p{suffix}a"), format!("p2p{suffix}b"));
    let host = Netlink::in_ns(None)?;
    host.add_veth(&end_a, &end_b, None).await?;
    let made = wire_peer_link(&host, &ca, &end_a, &cb, &end_b).await;
    if let Err(e) = made {
        for (c, end) in [(&ca, &end_a), (&cb, &end_b)] {
            for nl in [Netlink::in_ns(None), Netlink::in_ns(Some(&c.netns))]
                .into_iter()
                .flatten()
            {
                if let Ok(Some(index)) = nl.link_index(end).await {
                    let _ = nl.del_link(index).await;
                }
            }
        }
        return Err(e);
    }
    for (name, peer, ifname) in [(a, b, end_a), (b, a, end_b)] {
        let c = state.containers.get_mut(name).expect("checked");
        c.peer_links.push(PeerLink {
            peer: peer.to_string(),
            ifname,
        });
    }
    ctx.store.save(&state)
}

async fn wire_peer_link(
    host: &Netlink,
    ca: &Container,
    end_a: &str,
    cb: &Container,
    end_b: &str,
) -> Result<()> {
    for (c, end, peer) in [(ca, end_a, cb), (cb, end_b, ca)] {
        let index = host.require_link(end).await?;
        host.move_to_ns(index, &c.netns).await?;
        let inside = Netlink::in_ns(Some(&c.netns))?;
        let index = inside.require_link(end).await?;
        inside
            .add_addr(index, IpNet::new(c.ip.expect("checked").into(), 32)?)
            .await?;
        inside.set_up(index).await?;
        inside
            .add_route(
                IpNet::new(peer.ip.expect("checked").into(), 32)?,
                None,
                Some(index),
            )
            .await?;
    }
    Ok(())
}

/// `netd publish NAME -p SPEC...`: publishes more ports of a running container (checked for
/// clashes like at create).
pub async fn publish(ctx: &Ctx, name: &str, specs: &[String]) -> Result<Vec<PortMapping>> {
    let mut state = ctx.store.load()?;
    collect_garbage(ctx, &mut state).await?;
    let c = state.container(name)?.clone();
    let Some(network) = c.network.as_deref().filter(|_| c.mode == Mode::Bridge) else {
        bail!("container {name:?} is not on a bridge network: it has no ports to publish");
    };
    let net = state.network(network)?.clone();
    let requests: Vec<Publish> = specs
        .iter()
        .map(|p| ports::parse_publish(p))
        .collect::<Result<_>>()?;
    let taken: Vec<PortMapping> = state
        .containers
        .values()
        .flat_map(|c| c.ports.clone())
        .collect();
    let added = ports::assign(&requests, net.host_ip, &taken)?;
    ctx.datapath(&net.datapath)?
        .publish(&net.spec(), &specs_of(&c, &added, net.id))?;
    state
        .containers
        .get_mut(name)
        .expect("checked")
        .ports
        .extend(added.iter().cloned());
    ctx.store.save(&state)?;
    Ok(added)
}
