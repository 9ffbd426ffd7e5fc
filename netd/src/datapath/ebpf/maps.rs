//! Typed handles on the datapath's pinned maps, and conversions from the spec types.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap, lpm_trie::Key};
use ipnet::IpNet;
use netd_common::datapath::{
    AF_INET, AF_INET6, Addr, CONFIG_MAP, CONNTRACK_MAPS, CT_LIMITS_MAP, Config, CtEntry, CtKey,
    CtLimit, CtLimitKey, ENDPOINT_DROPS_MAP, ENDPOINTS_MAP, EndpointDropKey, EndpointInfo,
    EndpointKey, HOST_ADDRS_MAP, HOST_ADDRS6_MAP, IPPROTO_TCP, IPPROTO_UDP, LINKS_MAP, LinkKey,
    NAT_IFACES_MAP, NAT6_ADDRS_MAP, NETWORKS_MAP, NETWORKS6_MAP, NatIface, NetworkInfo,
    PUBLISH_ALLOW_MAP, PUBLISH_RESTRICTED, PUBLISHED_MAP, PublishAllowKey, PublishedKey,
    PublishedTarget, STATS_MAP, SUBNETS_MAP, SUBNETS6_MAP, VETHS_MAP, VethInfo, addr_v4, addr_v6,
};

use crate::bpf::Pins;
use crate::datapath::{EndpointSpec, LinkSpec, NetworkSpec, PortSpec, Protocol};

pub type Networks = HashMap<MapData, u32, NetworkInfo>;
pub type Endpoints = HashMap<MapData, EndpointKey, EndpointInfo>;
pub type Published = HashMap<MapData, PublishedKey, PublishedTarget>;
pub type Conntrack = HashMap<MapData, CtKey, CtEntry>;
pub type CtLimits = HashMap<MapData, CtLimitKey, CtLimit>;
pub type ConfigMap = Array<MapData, Config>;
pub type Stats = PerCpuArray<MapData, u64>;
pub type EndpointDrops = PerCpuHashMap<MapData, EndpointDropKey, u64>;
pub type PublishAllow = LpmTrie<MapData, PublishAllowKey, u8>;
pub type Veths = HashMap<MapData, u32, VethInfo>;
pub type Subnets = LpmTrie<MapData, u32, u32>;
pub type Subnets6 = LpmTrie<MapData, Addr, u32>;
pub type Links = HashMap<MapData, LinkKey, u8>;
pub type HostAddrs = HashMap<MapData, u32, u8>;
pub type HostAddrs6 = HashMap<MapData, Addr, u8>;
pub type NatIfaces = HashMap<MapData, u32, NatIface>;

pub fn networks(pins: &Pins) -> Result<Networks> {
    Ok(HashMap::try_from(Map::HashMap(
        pins.open_map(NETWORKS_MAP)?,
    ))?)
}

/// `NETWORKS6`: the IPv6 side of dual-stack networks.
pub fn networks6(pins: &Pins) -> Result<Networks> {
    Ok(HashMap::try_from(Map::HashMap(
        pins.open_map(NETWORKS6_MAP)?,
    ))?)
}

pub fn endpoints(pins: &Pins) -> Result<Endpoints> {
    Ok(HashMap::try_from(Map::HashMap(
        pins.open_map(ENDPOINTS_MAP)?,
    ))?)
}

pub fn published(pins: &Pins) -> Result<Published> {
    Ok(HashMap::try_from(Map::HashMap(
        pins.open_map(PUBLISHED_MAP)?,
    ))?)
}

/// The conntrack tables: assured flows, then the others (a flow's two entries are in one).
pub fn conntrack(pins: &Pins) -> Result<[Conntrack; 2]> {
    let open = |name| -> Result<Conntrack> {
        Ok(HashMap::try_from(Map::LruHashMap(pins.open_map(name)?))?)
    };
    Ok([open(CONNTRACK_MAPS[0])?, open(CONNTRACK_MAPS[1])?])
}

pub fn ct_limits(pins: &Pins) -> Result<CtLimits> {
    Ok(HashMap::try_from(Map::HashMap(
        pins.open_map(CT_LIMITS_MAP)?,
    ))?)
}

/// The `CT_LIMITS` key of the container at `ip`.
pub fn container_limit_key(ip: Ipv4Addr) -> CtLimitKey {
    CtLimitKey {
        addr: addr_v4(ip.octets()),
        network_id: 0,
        family: AF_INET,
        _pad: [0; 3],
    }
}

/// The `CT_LIMITS` key of network `id`.
pub fn network_limit_key(id: u32) -> CtLimitKey {
    CtLimitKey {
        addr: [0; 4],
        network_id: id,
        family: AF_INET,
        _pad: [0; 3],
    }
}

pub fn config(pins: &Pins) -> Result<ConfigMap> {
    Ok(Array::try_from(Map::Array(pins.open_map(CONFIG_MAP)?))?)
}

pub fn stats(pins: &Pins) -> Result<Stats> {
    Ok(PerCpuArray::try_from(Map::PerCpuArray(
        pins.open_map(STATS_MAP)?,
    ))?)
}

pub fn endpoint_drops(pins: &Pins) -> Result<EndpointDrops> {
    Ok(PerCpuHashMap::try_from(Map::PerCpuHashMap(
        pins.open_map(ENDPOINT_DROPS_MAP)?,
    ))?)
}

pub fn publish_allow(pins: &Pins) -> Result<PublishAllow> {
    Ok(LpmTrie::try_from(Map::LpmTrie(
        pins.open_map(PUBLISH_ALLOW_MAP)?,
    ))?)
}

pub fn subnets(pins: &Pins) -> Result<Subnets> {
    Ok(LpmTrie::try_from(Map::LpmTrie(
        pins.open_map(SUBNETS_MAP)?,
    ))?)
}

/// The `SUBNETS` key of a network's subnet.
pub fn subnet_key(net: &NetworkSpec) -> Key<u32> {
    Key::new(
        u32::from(net.subnet.prefix_len()),
        u32::from_ne_bytes(net.subnet.network().octets()),
    )
}

pub fn subnets6(pins: &Pins) -> Result<Subnets6> {
    Ok(LpmTrie::try_from(Map::LpmTrie(
        pins.open_map(SUBNETS6_MAP)?,
    ))?)
}

/// The `SUBNETS6` key of a network's IPv6 side (its `NETWORKS6` entry).
pub fn subnet6_key(info6: &NetworkInfo) -> Key<Addr> {
    Key::new(u32::from(info6.prefix_len), info6.subnet)
}

pub fn veths(pins: &Pins) -> Result<Veths> {
    Ok(HashMap::try_from(Map::HashMap(pins.open_map(VETHS_MAP)?))?)
}

pub fn links(pins: &Pins) -> Result<Links> {
    Ok(HashMap::try_from(Map::HashMap(pins.open_map(LINKS_MAP)?))?)
}

pub fn host_addrs(pins: &Pins) -> Result<HostAddrs> {
    Ok(HashMap::try_from(Map::HashMap(
        pins.open_map(HOST_ADDRS_MAP)?,
    ))?)
}

pub fn host_addrs6(pins: &Pins) -> Result<HostAddrs6> {
    Ok(HashMap::try_from(Map::HashMap(
        pins.open_map(HOST_ADDRS6_MAP)?,
    ))?)
}

pub fn nat_ifaces(pins: &Pins) -> Result<NatIfaces> {
    Ok(HashMap::try_from(Map::HashMap(
        pins.open_map(NAT_IFACES_MAP)?,
    ))?)
}

/// `NAT6_ADDRS`: the IPv6 address NAT66 masquerades to on each interface that has one (the
/// same layout as `NAT_IFACES`).
pub fn nat6_addrs(pins: &Pins) -> Result<NatIfaces> {
    Ok(HashMap::try_from(Map::HashMap(
        pins.open_map(NAT6_ADDRS_MAP)?,
    ))?)
}

/// The `NAT6_ADDRS` value of an interface whose NAT66 address is `addr`.
pub fn nat6_iface(addr: Ipv6Addr) -> NatIface {
    NatIface {
        addr: addr_v6(addr.octets()),
        family: AF_INET6,
        _pad: [0; 3],
    }
}

/// The `NAT_IFACES` value of an interface whose masquerade address is `addr`.
pub fn nat_iface(addr: Ipv4Addr) -> NatIface {
    NatIface {
        addr: addr_v4(addr.octets()),
        family: AF_INET,
        _pad: [0; 3],
    }
}

/// The datapath's configuration, as the last `setup_network` wrote it.
pub fn read_config(pins: &Pins) -> Result<Config> {
    config(pins)?
        .get(&0, 0)
        .context("read the datapath configuration")
}

/// The network's `NET_*` flags.
fn network_flags(net: &NetworkSpec) -> u8 {
    let mut flags = 0;
    for (on, flag) in [
        (net.masquerade, netd_common::datapath::NET_MASQUERADE),
        (net.icc, netd_common::datapath::NET_ICC),
        (net.internal, netd_common::datapath::NET_INTERNAL),
    ] {
        if on {
            flags |= flag;
        }
    }
    flags
}

/// What the programs on `ep`'s host-side veth know of it (`bridge`: the network's bridge's
/// ifindex).
pub fn veth_info(net: &NetworkSpec, ep: &EndpointSpec, bridge: u32) -> VethInfo {
    VethInfo {
        addr: addr_v4(ep.ip.octets()),
        network_id: net.id,
        mac: ep.mac,
        net_flags: network_flags(net),
        _pad: 0,
        bridge_ifindex: bridge,
    }
}

pub fn network_info(net: &NetworkSpec) -> NetworkInfo {
    let flags = network_flags(net);
    NetworkInfo {
        subnet: addr_v4(net.subnet.network().octets()),
        gateway: addr_v4(net.gateway.octets()),
        prefix_len: net.subnet.prefix_len(),
        family: AF_INET,
        flags,
        bridge_mac: net.bridge_mac(),
        _pad: [0; 3],
    }
}

/// The `NETWORKS6` value of a dual-stack network (`None` for an IPv4-only one).
pub fn network6_info(net: &NetworkSpec) -> Option<NetworkInfo> {
    let (subnet, gateway) = net.subnet6.zip(net.gateway6)?;
    Some(NetworkInfo {
        subnet: addr_v6(subnet.network().octets()),
        gateway: addr_v6(gateway.octets()),
        prefix_len: subnet.prefix_len(),
        family: AF_INET6,
        ..network_info(net)
    })
}

/// The `ENDPOINTS` key of the container with IPv6 address `ip`.
pub fn endpoint_key6(ip: Ipv6Addr) -> EndpointKey {
    EndpointKey {
        addr: addr_v6(ip.octets()),
        family: AF_INET6,
        _pad: [0; 3],
    }
}

pub fn endpoint_key(ip: Ipv4Addr) -> EndpointKey {
    EndpointKey {
        addr: addr_v4(ip.octets()),
        family: AF_INET,
        _pad: [0; 3],
    }
}

pub fn endpoint_info(ep: &EndpointSpec) -> EndpointInfo {
    EndpointInfo {
        ifindex: ep.host_ifindex,
        network_id: ep.network_id,
        mac: ep.mac,
        _pad: [0; 2],
    }
}

pub fn proto_number(proto: Protocol) -> u8 {
    match proto {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
    }
}

/// The `PUBLISHED` entries of `port`, one per family it is published in (as the iptables
/// datapath's rules): IPv4 unless its host address is IPv6; IPv6 when the container has an
/// IPv6 address, unless its host address is IPv4. An unspecified host address (`0.0.0.0`,
/// `::`) is the "any" key of its family only. Restricted in both families once any
/// `--publish-allow` range is given: a family without a range of its own accepts no new flow.
pub fn published_entries(port: &PortSpec) -> Vec<(PublishedKey, PublishedTarget)> {
    let flags = if port.allow.is_empty() {
        0
    } else {
        PUBLISH_RESTRICTED
    };
    let entry = |addr, family, target| {
        let key = PublishedKey {
            addr,
            port: port.host_port,
            proto: proto_number(port.proto),
            family,
        };
        let target = PublishedTarget {
            addr: target,
            port: port.container_port,
            flags,
            network_id: port.network_id,
        };
        (key, target)
    };
    let container4 = addr_v4(port.container_ip.octets());
    let container6 = port.container_ip6.map(|ip6| addr_v6(ip6.octets()));
    match port.host_ip {
        None => std::iter::once(entry([0; 4], AF_INET, container4))
            .chain(container6.map(|c6| entry([0; 4], AF_INET6, c6)))
            .collect(),
        Some(IpAddr::V4(ip)) => vec![entry(addr_v4(ip.octets()), AF_INET, container4)],
        Some(IpAddr::V6(ip)) => container6
            .map(|c6| entry(addr_v6(ip.octets()), AF_INET6, c6))
            .into_iter()
            .collect(),
    }
}

/// The key of `link` opened for the container at `ip`.
pub fn link_key(ip: Ipv4Addr, link: &LinkSpec) -> LinkKey {
    LinkKey {
        src: addr_v4(ip.octets()),
        dst: addr_v4(link.peer.octets()),
        port: link.port,
        proto: proto_number(link.proto),
        family: AF_INET,
    }
}

/// The IPv6 twin of [`link_key`], when both ends have an IPv6 address.
pub fn link_key6(ip6: Option<Ipv6Addr>, link: &LinkSpec) -> Option<LinkKey> {
    Some(LinkKey {
        src: addr_v6(ip6?.octets()),
        dst: addr_v6(link.peer6?.octets()),
        port: link.port,
        proto: proto_number(link.proto),
        family: AF_INET6,
    })
}

/// The `PUBLISH_ALLOW` keys of `port`'s source ranges: each family's ranges for the side
/// of the port published in that family (see [`published_entries`]), none for the other.
pub fn publish_allow_keys(port: &PortSpec) -> Vec<Key<PublishAllowKey>> {
    published_entries(port)
        .into_iter()
        .flat_map(|(key, target)| {
            port.allow.iter().filter_map(move |range| {
                let (src, prefix_len) = match (range, key.family) {
                    (IpNet::V4(r), AF_INET) => (addr_v4(r.network().octets()), r.prefix_len()),
                    (IpNet::V6(r), AF_INET6) => (addr_v6(r.network().octets()), r.prefix_len()),
                    _ => return None,
                };
                Some(Key::new(
                    PublishAllowKey::TARGET_BITS + u32::from(prefix_len),
                    PublishAllowKey {
                        target: target.addr,
                        port: target.port,
                        proto: key.proto,
                        family: key.family,
                        src,
                    },
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> PortSpec {
        PortSpec {
            network_id: 3,
            proto: Protocol::Tcp,
            host_ip: None,
            host_port: 8080,
            container_ip: "10.60.0.2".parse().unwrap(),
            container_ip6: Some("fd00:60::2".parse().unwrap()),
            container_port: 80,
            allow: vec![],
        }
    }

    /// The address of `family` in `addr`.
    fn ip_of(family: u8, addr: &netd_common::datapath::Addr) -> IpAddr {
        if family == AF_INET6 {
            Ipv6Addr::from(netd_common::datapath::v6_octets(addr)).into()
        } else {
            Ipv4Addr::from(netd_common::datapath::v4_octets(addr)).into()
        }
    }

    /// The (family, host address, container address, flags) of each of `port`'s entries.
    fn sides(port: &PortSpec) -> Vec<(u8, IpAddr, IpAddr, u16)> {
        published_entries(port)
            .iter()
            .map(|(key, target)| {
                assert_eq!((key.port, key.proto), (8080, IPPROTO_TCP));
                assert_eq!((target.port, target.network_id), (80, 3));
                let f = key.family;
                (f, ip_of(f, &key.addr), ip_of(f, &target.addr), target.flags)
            })
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_port_is_published_in_each_family_it_names() {
        // Any address: both families' "any" keys, to each family's container address.
        assert_eq!(
            sides(&port()),
            [
                (AF_INET, ip("0.0.0.0"), ip("10.60.0.2"), 0),
                (AF_INET6, ip("::"), ip("fd00:60::2"), 0),
            ]
        );
        let v4_only = PortSpec {
            container_ip6: None,
            ..port()
        };
        assert_eq!(
            sides(&v4_only),
            [(AF_INET, ip("0.0.0.0"), ip("10.60.0.2"), 0)]
        );
        // One address, or every address of one family: that family only.
        for (host, family, container) in [
            ("2001:2::2", AF_INET6, "fd00:60::2"),
            ("::", AF_INET6, "fd00:60::2"),
            ("198.18.0.2", AF_INET, "10.60.0.2"),
            ("0.0.0.0", AF_INET, "10.60.0.2"),
        ] {
            let on = PortSpec {
                host_ip: Some(ip(host)),
                ..port()
            };
            assert_eq!(sides(&on), [(family, ip(host), ip(container), 0)], "{host}");
        }
        // An IPv6 address for a container without one: nothing (the planner refuses it).
        let nowhere = PortSpec {
            host_ip: Some(ip("2001:2::2")),
            container_ip6: None,
            ..port()
        };
        assert!(published_entries(&nowhere).is_empty());
    }

    #[test]
    fn each_family_gets_its_own_ranges_and_a_family_without_any_admits_no_one() {
        let restricted = PortSpec {
            allow: vec![
                "198.18.0.64/26".parse().unwrap(),
                "2001:2::1/128".parse().unwrap(),
                "2001:db8:1::7/48".parse().unwrap(),
            ],
            ..port()
        };
        let flags: Vec<u16> = published_entries(&restricted)
            .iter()
            .map(|(_, t)| t.flags)
            .collect();
        assert_eq!(flags, [PUBLISH_RESTRICTED, PUBLISH_RESTRICTED]);
        let keys: Vec<(u32, u8, IpAddr, IpAddr)> = publish_allow_keys(&restricted)
            .iter()
            .map(|k| {
                let d = k.data();
                assert_eq!((d.port, d.proto), (80, IPPROTO_TCP));
                let bits = k.prefix_len() - PublishAllowKey::TARGET_BITS;
                (
                    bits,
                    d.family,
                    ip_of(d.family, &d.target),
                    ip_of(d.family, &d.src),
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                (26, AF_INET, ip("10.60.0.2"), ip("198.18.0.64")),
                (128, AF_INET6, ip("fd00:60::2"), ip("2001:2::1")),
                // The range's network address, as the trie matches it.
                (48, AF_INET6, ip("fd00:60::2"), ip("2001:db8:1::")),
            ]
        );
        // Published over IPv4 only: its IPv6 ranges have no side to go with.
        let on_v4 = PortSpec {
            host_ip: Some(ip("198.18.0.2")),
            ..restricted.clone()
        };
        let families: Vec<u8> = publish_allow_keys(&on_v4)
            .iter()
            .map(|k| k.data().family)
            .collect();
        assert_eq!(families, [AF_INET]);
        // IPv6 ranges only: the IPv4 side is restricted with no range, open to no one.
        let v6_ranges = PortSpec {
            allow: vec!["2001:2::1/128".parse().unwrap()],
            ..port()
        };
        assert_eq!(
            sides(&v6_ranges)[0],
            (AF_INET, ip("0.0.0.0"), ip("10.60.0.2"), PUBLISH_RESTRICTED)
        );
        let families: Vec<u8> = publish_allow_keys(&v6_ranges)
            .iter()
            .map(|k| k.data().family)
            .collect();
        assert_eq!(families, [AF_INET6]);
    }
}
