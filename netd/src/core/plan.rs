//! Planning: what a network or container will be, worked out from the request and the state
//! alone. Pure: no kernel call, no write; what it needs from the host (the subnets in use, a
//! free veth name) is passed in, so every rule here has a unit test.

use std::path::PathBuf;

use anyhow::{Result, bail};
use ipnet::Ipv4Net;

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

/// Plans network `spec`; `in_use` are the subnets already routed on the host.
pub fn network(view: &impl View, spec: &NetworkSpec, in_use: &[Ipv4Net]) -> Result<Network> {
    spec.validate()?;
    if view.network(&spec.name)?.is_some() {
        bail!("network {:?} already exists", spec.name);
    }
    let networks = view.networks()?;
    let subnet = match spec.subnet {
        Some(subnet) => {
            if let Some(other) = networks.iter().find(|n| ipam::overlaps(&n.subnet, &subnet)) {
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
        None => {
            let taken: Vec<Ipv4Net> = networks.iter().map(|n| n.subnet).collect();
            ipam::free_subnet(&[in_use, &taken].concat())?
        }
    };
    let (gateway, ip_range) = ipam::gateway_and_range(subnet, spec.gateway, spec.ip_range)?;
    let id = view.next_network_id()?;
    let bridge = match &spec.bridge {
        Some(b) => b.clone(),
        None if spec.name == DEFAULT_NETWORK => DEFAULT_BRIDGE.to_string(),
        None => format!("netd-br{id}"),
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
    let used = view.addresses_on(&net.name)?;
    let pool = ipam::Pool {
        subnet: net.subnet,
        range: net.ip_range,
        gateway: net.gateway,
        used: &used,
    };
    let ip = match at.ip {
        Some(ip) => pool.check(ip).map(|()| ip)?,
        None => pool.allocate()?,
    };
    let mut requests = at.publish.clone();
    if at.publish_all {
        requests.extend(expose.iter().cloned());
    }
    c.network = Some(net.name.clone());
    c.ip = Some(ip);
    c.mac = Some(ipam::format_mac(
        at.mac.unwrap_or_else(|| ipam::mac_for(ip)),
    ));
    c.host_veth = Some(host.free_veth.clone());
    c.ifname = at.ifname.clone().filter(|n| n != DEFAULT_IFNAME);
    c.publish_allow = at.publish_allow.clone();
    c.conntrack_limit = at.conntrack_limit;
    c.ports = ports::assign(&requests, net.host_ip, |m| view.port_clash(m))?;
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
        assert_eq!(net.subnet.to_string(), "172.18.0.0/16");
        assert_eq!(net.gateway.to_string(), "172.18.0.1");
        assert_eq!((net.id, net.bridge.as_str()), (2, "netd-br2"));
        assert_eq!(net.status, Status::Creating);
        let default = network(&state, &NetworkSpec::named("bridge"), &[]).unwrap();
        assert_eq!(default.bridge, "netd0");
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
