//! Planning: what a network or container will be, worked out from the request and the state
//! alone. Pure: no kernel call, no write; what it needs from the host (the subnets in use, a
//! free veth name) is passed in, so every rule here has a unit test.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use anyhow::{Result, bail};
use ipnet::IpNet;

use super::{
    ipam,
    ports::{self, Publish},
    spec::{
        Attachment, ContainerSpec, DEFAULT_BRIDGE, DEFAULT_IFNAME, DEFAULT_NETWORK, Link, Mode,
        Netns, NetworkSpec,
    },
};
use crate::{
    netns,
    store::{
        Container, Network, Status, View,
        model::{self, Exposed},
    },
};

/// Plans network `spec`; `in_use` are the subnets (of both families) already routed on the
/// host.
pub fn network(view: &impl View, spec: &NetworkSpec, in_use: &[IpNet]) -> Result<Network> {
    spec.validate()?;
    if view.network(&spec.name)?.is_some() {
        bail!("network {:?} already exists", spec.name);
    }
    let networks = view.networks()?;
    let taken: Vec<(IpNet, &str)> = networks
        .iter()
        .flat_map(|n| {
            let v6 = n.subnet6.map(IpNet::from);
            [Some(IpNet::from(n.subnet)), v6]
                .into_iter()
                .flatten()
                .map(|s| (s, n.name.as_str()))
        })
        .collect();
    // Every subnet a new one must not overlap: the networks' and the host's.
    let all_in_use: Vec<IpNet> = taken
        .iter()
        .map(|(n, _)| *n)
        .chain(in_use.iter().copied())
        .collect();
    let subnet = match spec.subnet {
        Some(subnet) => check_free(subnet.into(), &taken, in_use).map(|()| subnet)?,
        None => ipam::free_subnet(&all_in_use)?,
    };
    let (gateway, ip_range) = ipam::gateway_and_range(subnet, spec.gateway, spec.ip_range)?;
    let subnet6 = match (spec.ipv6, spec.subnet6) {
        (false, _) => None,
        (true, Some(subnet6)) => {
            Some(check_free(subnet6.into(), &taken, in_use).map(|()| subnet6)?)
        }
        (true, None) => Some(ipam::free_subnet6(&all_in_use)?),
    };
    let gateway6 = subnet6
        .map(|s| ipam::gateway6(s, spec.gateway6))
        .transpose()?;
    let id = view.next_network_id()?;
    let bridge = match &spec.bridge {
        Some(b) => b.clone(),
        None if spec.name == DEFAULT_NETWORK => DEFAULT_BRIDGE.to_string(),
        // The id's name, or the next one no network took (`--bridge` may have).
        None => (id..)
            .map(|n| format!("netd-br{n}"))
            .find(|name| networks.iter().all(|n| &n.bridge != name))
            .expect("fewer networks than names"),
    };
    if let Some(other) = networks.iter().find(|n| n.bridge == bridge) {
        bail!(
            "bridge {bridge} is already used by network {:?}",
            other.name
        );
    }
    Ok(Network {
        id,
        name: spec.name.clone(),
        bridge,
        subnet,
        gateway,
        ip_range,
        subnet6,
        gateway6,
        mtu: spec.mtu,
        icc: spec.icc,
        internal: spec.internal,
        masquerade: spec.masquerade,
        host_ip: spec.host_ip,
        datapath: spec.datapath,
        status: Status::Creating,
        owner_pid: std::process::id(),
        conntrack_limit: spec.conntrack_limit,
    })
}

/// Checks that `subnet` overlaps no network's subnet in `taken` and nothing routed on the host.
fn check_free(subnet: IpNet, taken: &[(IpNet, &str)], in_use: &[IpNet]) -> Result<()> {
    if let Some((other, name)) = taken.iter().find(|(n, _)| ipam::overlaps(n, &subnet)) {
        bail!("subnet {subnet} overlaps network {name:?} ({other})");
    }
    if let Some(used) = in_use.iter().find(|u| ipam::overlaps(*u, &subnet)) {
        bail!("subnet {subnet} overlaps {used}, already in use on the host");
    }
    Ok(())
}

/// What planning a container needs from outside the state.
pub struct Host {
    /// The host namespace's path (for `--network host`).
    pub netns: PathBuf,
    /// A veth name free on the host (for bridge mode).
    pub free_veth: String,
}

/// Plans container `spec`, recorded as `creating` by this process.
pub fn container(view: &impl View, spec: &ContainerSpec, host: &Host) -> Result<Container> {
    spec.validate()?;
    if view.container(&spec.name)?.is_some() {
        bail!("container {:?} already exists", spec.name);
    }
    let (netns, owns_netns) = namespace_of(view, spec, host)?;
    let mut c = Container {
        name: spec.name.clone(),
        status: Status::Creating,
        creator_pid: std::process::id(),
        endpoint_added: false,
        mode: record_mode(&spec.mode),
        netns,
        owns_netns,
        network: None,
        ip: None,
        ip6: None,
        mac: None,
        host_veth: None,
        ifname: None,
        host_ifindex: None,
        hostname: spec.hostname.clone().unwrap_or_else(|| spec.name.clone()),
        dns: spec.dns.clone(),
        dns_search: spec.dns_search.clone(),
        add_hosts: spec.add_hosts.clone(),
        links: spec
            .links
            .iter()
            .map(|l| check_link(view, l))
            .collect::<Result<_>>()?,
        peer_links: vec![],
        ports: vec![],
        exposed: exposed_ports(&spec.expose),
        publish_allow: vec![],
        conntrack_limit: None,
    };
    if let Mode::Bridge(at) = &spec.mode {
        attach(view, &mut c, at, &spec.expose, host)?;
    }
    Ok(c)
}

/// Fills in a bridge-mode container's address, MAC, veth and published ports.
fn attach(
    view: &impl View,
    c: &mut Container,
    at: &Attachment,
    expose: &[Publish],
    host: &Host,
) -> Result<()> {
    let net = view
        .network(&at.network)?
        .ok_or_else(|| anyhow::anyhow!("no network named {:?}", at.network))?;
    if net.status != Status::Running {
        bail!("network {:?} is {}", net.name, net.status.name());
    }
    let mut used = view.addresses_on(&net.name)?;
    // An address an engine's IPAM (Docker's) handed out is for the endpoint it was handed to:
    // another container gets it only by asking for it.
    if at.ip.is_none() {
        used.extend(view.handed_out(net.subnet.into())?);
    }
    if let (None, Some(subnet6)) = (at.ip6, net.subnet6) {
        used.extend(view.handed_out(subnet6.into())?);
    }
    let asked = at.ip.map(IpAddr::from);
    let range = net.ip_range.into();
    let IpAddr::V4(ip) = address(net.subnet.into(), range, net.gateway.into(), &used, asked)?
    else {
        unreachable!("an IPv4 pool gives IPv4 addresses");
    };
    let ip6 = match (net.subnet6, net.gateway6) {
        (Some(subnet6), Some(gateway6)) => {
            let (subnet6, asked) = (IpNet::from(subnet6), at.ip6.map(IpAddr::from));
            let IpAddr::V6(ip6) = address(subnet6, subnet6, gateway6.into(), &used, asked)? else {
                unreachable!("an IPv6 pool gives IPv6 addresses");
            };
            Some(ip6)
        }
        _ => None,
    };
    if ip6.is_none() {
        refuse_ipv6_without_address(&net.name, at)?;
    }
    let mut requests = at.publish.clone();
    if at.publish_all {
        requests.extend(expose.iter().cloned());
    }
    c.network = Some(net.name.clone());
    c.ip = Some(ip);
    c.ip6 = ip6;
    c.mac = Some(free_mac(view, &net, at.mac, ip)?);
    c.host_veth = Some(host.free_veth.clone());
    c.ifname = at.ifname.clone().filter(|n| n != DEFAULT_IFNAME);
    c.publish_allow = at.publish_allow.clone();
    c.conntrack_limit = at.conntrack_limit;
    c.ports = ports::assign(&requests, net.host_ip.map(IpAddr::from), |m| {
        view.port_clash(m)
    })?;
    Ok(())
}

/// The MAC `asked` for, or else the one derived from `ip`, written out, if no container on
/// `net` has it and it isn't the bridge's: the bridge forwards by MAC, so two holders would
/// each get some of the other's frames.
fn free_mac(
    view: &impl View,
    net: &Network,
    asked: Option<[u8; 6]>,
    ip: Ipv4Addr,
) -> Result<String> {
    let mac = asked.unwrap_or_else(|| ipam::mac_for(ip));
    let text = ipam::format_mac(mac);
    let what = match asked {
        Some(_) => format!("MAC {text}"),
        None => format!("MAC {text} (derived from {ip})"),
    };
    if mac == ipam::mac_for(net.gateway) {
        bail!("{what} is network {:?}'s bridge's", net.name);
    }
    if let Some(holder) = view.mac_holder(&net.name, &text)? {
        bail!(
            "{what} is taken on network {:?} by container {holder:?}",
            net.name
        );
    }
    Ok(text)
}

/// The address `asked` for if it is free in the pool, else the pool's lowest free one.
fn address(
    subnet: IpNet,
    range: IpNet,
    gateway: IpAddr,
    used: &HashSet<IpAddr>,
    asked: Option<IpAddr>,
) -> Result<IpAddr> {
    let pool = ipam::Pool {
        subnet,
        range,
        gateway,
        used,
    };
    match asked {
        Some(ip) => pool.check(ip).map(|()| ip),
        None => pool.allocate(),
    }
}

/// On a network without IPv6, whatever asks for IPv6 is an error rather than left out.
fn refuse_ipv6_without_address(network: &str, at: &Attachment) -> Result<()> {
    let why = format!("network {network:?} has no IPv6 (create it with --ipv6)");
    if let Some(ip6) = at.ip6 {
        bail!("--ip6 {ip6}: {why}");
    }
    if let Some(ip) = at
        .publish
        .iter()
        .find_map(|p| p.host_ip.filter(IpAddr::is_ipv6))
    {
        bail!("publishing on {ip}: {why}");
    }
    if let Some(range) = at.publish_allow.iter().find(|r| matches!(r, IpNet::V6(_))) {
        bail!("--publish-allow {range}: {why}");
    }
    Ok(())
}

fn record_mode(mode: &Mode) -> model::Mode {
    match mode {
        Mode::Bridge(_) => model::Mode::Bridge,
        Mode::Host => model::Mode::Host,
        Mode::None => model::Mode::None,
        Mode::Container(other) => model::Mode::Container(other.clone()),
    }
}

/// The namespace a container uses, and whether netd makes (and later removes) it.
fn namespace_of(view: &impl View, spec: &ContainerSpec, host: &Host) -> Result<(PathBuf, bool)> {
    match (&spec.mode, &spec.netns) {
        (Mode::Container(other), _) => {
            let other = view
                .container(other)?
                .ok_or_else(|| anyhow::anyhow!("no container named {other:?}"))?;
            Ok((other.netns, false))
        }
        (Mode::Host, _) => Ok((host.netns.clone(), false)),
        (_, Netns::Path(path)) => Ok((path.clone(), false)),
        (_, Netns::Pid(pid)) => Ok((PathBuf::from(format!("/proc/{pid}/ns/net")), false)),
        (_, Netns::Own) => Ok((netns::path_of(&spec.name), true)),
    }
}

fn check_link(view: &impl View, link: &Link) -> Result<model::Link> {
    if view.container(&link.container)?.is_none() {
        let spec = if link.alias == link.container {
            link.container.clone()
        } else {
            format!("{}:{}", link.container, link.alias)
        };
        bail!("--link {spec}: no container named {:?}", link.container);
    }
    Ok(link.clone())
}

/// `--expose` requests, one entry per port.
fn exposed_ports(expose: &[Publish]) -> Vec<Exposed> {
    let each = expose
        .iter()
        .flat_map(|e| {
            (e.container_ports.0..=e.container_ports.1).map(|port| Exposed {
                proto: e.proto,
                port,
            })
        })
        .collect();
    Exposed::canonical(each)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        core::ports::{parse_expose, parse_publish},
        datapath::DatapathKind,
        store::State,
    };

    fn host() -> Host {
        Host {
            netns: "/proc/1/ns/net".into(),
            free_veth: "veth1234567".into(),
        }
    }

    /// A state with network `n` (10.9.0.0/29) holding container `db` at 10.9.0.2 publishing
    /// 8080/tcp.
    fn state() -> State {
        let mut state = State::default();
        let mut spec = NetworkSpec::named("n");
        spec.subnet = Some("10.9.0.0/29".parse().unwrap());
        let mut net = network(&state, &spec, &[]).unwrap();
        net.status = Status::Running;
        state.networks.insert("n".into(), net);
        state.next_network_id = 2;
        let mut db = ContainerSpec::named("db");
        let mut at = Attachment::on("n");
        at.publish = vec![parse_publish("8080:80").unwrap()];
        db.mode = Mode::Bridge(at);
        let db = container(&state, &db, &host()).unwrap();
        state.containers.insert("db".into(), db);
        state
    }

    #[test]
    fn a_network_takes_the_first_free_subnet_and_its_own_bridge() {
        let state = state();
        let in_use = ["172.17.0.0/16".parse().unwrap()];
        let net = network(&state, &NetworkSpec::named("m"), &in_use).unwrap();
        assert_eq!(net.subnet6, None);
        assert_eq!(net.subnet.to_string(), "172.18.0.0/16");
        assert_eq!(net.gateway.to_string(), "172.18.0.1");
        assert_eq!((net.id, net.bridge.as_str()), (2, "netd-br2"));
        assert_eq!(net.status, Status::Creating);
        let default = network(&state, &NetworkSpec::named("bridge"), &[]).unwrap();
        assert_eq!(default.bridge, "netd0");
    }

    #[test]
    fn a_bridge_name_a_network_chose_is_skipped_by_the_next_ones() {
        let mut state = state();
        let mut spec = NetworkSpec::named("picked");
        spec.bridge = Some("netd-br3".into());
        let picked = network(&state, &spec, &[]).unwrap();
        state.next_network_id = picked.id + 1;
        state.networks.insert("picked".into(), picked);
        let next = network(&state, &NetworkSpec::named("m"), &[]).unwrap();
        assert_eq!((next.id, next.bridge.as_str()), (3, "netd-br4"));
    }

    #[test]
    fn a_network_refuses_overlaps_and_taken_names() {
        let state = state();
        let mut spec = NetworkSpec::named("n");
        let err = network(&state, &spec, &[]).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        spec.name = "m".into();
        spec.subnet = Some("10.9.0.0/24".parse().unwrap());
        let err = network(&state, &spec, &[]).unwrap_err().to_string();
        assert!(err.contains("overlaps network \"n\""), "{err}");
        spec.subnet = Some("10.10.0.0/24".parse().unwrap());
        let err = network(&state, &spec, &["10.10.0.0/16".parse().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("in use on the host"), "{err}");
        spec.bridge = Some("netd-br1".into());
        let err = network(&state, &spec, &[]).unwrap_err().to_string();
        assert!(err.contains("already used by network"), "{err}");
        spec.datapath = DatapathKind::Iptables;
        spec.bridge = None;
        assert_eq!(
            network(&state, &spec, &[]).unwrap().datapath,
            DatapathKind::Iptables
        );
    }

    #[test]
    fn a_container_gets_the_next_address_docker_mac_and_free_ports() {
        let state = state();
        let mut spec = ContainerSpec::named("web");
        let mut at = Attachment::on("n");
        at.publish = vec![parse_publish("80").unwrap()];
        at.publish_all = true;
        spec.mode = Mode::Bridge(at);
        spec.expose = vec![parse_expose("90").unwrap()];
        let c = container(&state, &spec, &host()).unwrap();
        assert_eq!(c.ip.unwrap().to_string(), "10.9.0.3");
        assert_eq!(c.mac.as_deref(), Some("02:42:0a:09:00:03"));
        assert_eq!(c.host_veth.as_deref(), Some("veth1234567"));
        let ports: Vec<u16> = c.ports.iter().map(|p| p.host_port).collect();
        assert_eq!(ports, [49153, 49154]);
        assert_eq!(c.exposed.len(), 1);
        assert!(c.owns_netns && c.status == Status::Creating);
    }

    #[test]
    fn a_container_refuses_taken_addresses_ports_and_missing_links() {
        let state = state();
        let mut spec = ContainerSpec::named("web");
        let mut at = Attachment::on("n");
        at.ip = Some("10.9.0.2".parse().unwrap());
        spec.mode = Mode::Bridge(at.clone());
        let err = container(&state, &spec, &host()).unwrap_err().to_string();
        assert!(err.contains("10.9.0.2 is already in use"), "{err}");
        at.ip = None;
        at.publish = vec![parse_publish("8080:81").unwrap()];
        spec.mode = Mode::Bridge(at);
        let err = container(&state, &spec, &host()).unwrap_err().to_string();
        assert!(err.contains("8080/tcp is already published"), "{err}");
        let mut spec = ContainerSpec::named("web");
        spec.mode = Mode::None;
        spec.links = vec![Link {
            container: "nosuch".into(),
            alias: "x".into(),
        }];
        let err = container(&state, &spec, &host()).unwrap_err().to_string();
        assert!(err.contains("--link nosuch:x"), "{err}");
    }

    #[test]
    fn a_container_refuses_a_mac_taken_on_its_network() {
        let mut state = state();
        let with_mac = |name: &str, mac: Option<&str>| {
            let mut spec = ContainerSpec::named(name);
            let mut at = Attachment::on("n");
            at.mac = mac.map(|m| ipam::parse_mac(m).unwrap());
            spec.mode = Mode::Bridge(at);
            spec
        };
        // db's, derived from its address; the bridge's, derived from the gateway's.
        let err = container(&state, &with_mac("web", Some("02:42:0a:09:00:02")), &host())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("taken on network \"n\" by container \"db\""),
            "{err}"
        );
        let err = container(&state, &with_mac("web", Some("02:42:0a:09:00:01")), &host())
            .unwrap_err()
            .to_string();
        assert!(err.contains("network \"n\"'s bridge's"), "{err}");
        // A MAC asked for is the one another address would derive: that address's container
        // can't have it.
        let web = container(&state, &with_mac("web", Some("02:42:0a:09:00:04")), &host()).unwrap();
        assert_eq!(web.ip.unwrap().to_string(), "10.9.0.3");
        state.containers.insert("web".into(), web);
        let err = container(&state, &with_mac("app", None), &host())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MAC 02:42:0a:09:00:04 (derived from 10.9.0.4) is taken"),
            "{err}"
        );
    }

    /// `state()` with the dual-stack network `d6` (10.6.0.0/24 and fd00:6::/64).
    fn dual_stack() -> State {
        let mut state = state();
        let mut spec = NetworkSpec::named("d6");
        spec.subnet = Some("10.6.0.0/24".parse().unwrap());
        spec.ipv6 = true;
        spec.subnet6 = Some("fd00:6::/64".parse().unwrap());
        spec.datapath = DatapathKind::Iptables;
        let mut net = network(&state, &spec, &[]).unwrap();
        net.status = Status::Running;
        state.networks.insert("d6".into(), net);
        state.next_network_id = 3;
        state
    }

    #[test]
    fn a_dual_stack_network_takes_a_free_ula_64_and_refuses_overlaps() {
        let state = dual_stack();
        assert_eq!(
            state.networks["d6"].gateway6.unwrap().to_string(),
            "fd00:6::1"
        );
        let mut spec = NetworkSpec::named("m");
        spec.ipv6 = true;
        spec.datapath = DatapathKind::Iptables;
        let in_use = ["fd4e:6574:6400::/64".parse().unwrap()];
        let net = network(&state, &spec, &in_use).unwrap();
        assert_eq!(net.subnet6.unwrap().to_string(), "fd4e:6574:6400:1::/64");
        assert_eq!(net.gateway6.unwrap().to_string(), "fd4e:6574:6400:1::1");
        spec.subnet6 = Some("fd00:6::/48".parse().unwrap());
        let err = network(&state, &spec, &[]).unwrap_err().to_string();
        assert!(err.contains("overlaps network \"d6\""), "{err}");
        spec.subnet6 = Some("fd00:7::/64".parse().unwrap());
        let err = network(&state, &spec, &["fd00::/16".parse().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("in use on the host"), "{err}");
        spec.ipv6 = false;
        spec.subnet6 = None;
        assert_eq!(network(&state, &spec, &in_use).unwrap().subnet6, None);
    }

    #[test]
    fn a_dual_stack_container_gets_both_addresses_and_refuses_taken_ones() {
        let mut state = dual_stack();
        let mut spec = ContainerSpec::named("web");
        spec.mode = Mode::Bridge(Attachment::on("d6"));
        let c = container(&state, &spec, &host()).unwrap();
        assert_eq!(c.ip.unwrap().to_string(), "10.6.0.2");
        assert_eq!(c.ip6.unwrap().to_string(), "fd00:6::2");
        state.containers.insert("web".into(), c);
        let mut at = Attachment::on("d6");
        at.ip6 = Some("fd00:6::2".parse().unwrap());
        spec.name = "api".into();
        spec.mode = Mode::Bridge(at.clone());
        let err = container(&state, &spec, &host()).unwrap_err().to_string();
        assert!(err.contains("fd00:6::2 is already in use"), "{err}");
        at.ip6 = Some("fd00:6::99".parse().unwrap());
        spec.mode = Mode::Bridge(at);
        let c = container(&state, &spec, &host()).unwrap();
        assert_eq!(
            (c.ip.unwrap().to_string(), c.ip6.unwrap().to_string()),
            ("10.6.0.3".into(), "fd00:6::99".into())
        );
    }

    #[test]
    fn ipv6_on_a_network_without_it_is_refused() {
        let state = state();
        let mut spec = ContainerSpec::named("web");
        let mut at = Attachment::on("n");
        at.ip6 = Some("fd00::2".parse().unwrap());
        spec.mode = Mode::Bridge(at);
        let err = container(&state, &spec, &host()).unwrap_err().to_string();
        assert!(
            err.contains("--ip6 fd00::2") && err.contains("no IPv6"),
            "{err}"
        );
        let mut at = Attachment::on("n");
        at.publish = vec![parse_publish("[::1]:8081:80").unwrap()];
        spec.mode = Mode::Bridge(at);
        let err = container(&state, &spec, &host()).unwrap_err().to_string();
        assert!(err.contains("publishing on ::1"), "{err}");
        let mut at = Attachment::on("n");
        at.publish_allow = vec!["2001:db8::/32".parse().unwrap()];
        spec.mode = Mode::Bridge(at);
        let err = container(&state, &spec, &host()).unwrap_err().to_string();
        assert!(err.contains("--publish-allow 2001:db8::/32"), "{err}");
    }

    #[test]
    fn a_container_exhausts_the_pool() {
        let mut state = state();
        for i in 3..=6 {
            let mut spec = ContainerSpec::named(&format!("c{i}"));
            spec.mode = Mode::Bridge(Attachment::on("n"));
            let c = container(&state, &spec, &host()).unwrap();
            state.containers.insert(c.name.clone(), c);
        }
        let mut spec = ContainerSpec::named("last");
        spec.mode = Mode::Bridge(Attachment::on("n"));
        let err = container(&state, &spec, &host()).unwrap_err().to_string();
        assert!(err.contains("exhausted"), "{err}");
    }

    #[test]
    fn namespaces_by_mode() {
        let state = state();
        let mut spec = ContainerSpec::named("h");
        spec.mode = Mode::Host;
        let c = container(&state, &spec, &host()).unwrap();
        assert_eq!(
            (c.netns.to_str(), c.owns_netns),
            (Some("/proc/1/ns/net"), false)
        );
        spec.mode = Mode::Container("db".into());
        let c = container(&state, &spec, &host()).unwrap();
        assert_eq!(c.netns, netns::path_of("db"));
        spec.mode = Mode::None;
        spec.netns = Netns::Pid(42);
        let c = container(&state, &spec, &host()).unwrap();
        assert_eq!(c.netns.to_str(), Some("/proc/42/ns/net"));
        spec.mode = Mode::Container("nosuch".into());
        spec.netns = Netns::Own;
        assert!(container(&state, &spec, &host()).is_err());
    }
}
