//! Specs for the datapath tests: one network like Docker's default bridge, its containers
//! and published ports, as the controller would hand them to the datapath.

use std::net::Ipv4Addr;

use netd::datapath::{EndpointSpec, NetworkSpec, PortSpec, Protocol};

pub const BRIDGE: &str = "netd0";
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 1);
pub const C1: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 2);
pub const C2: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 3);

pub fn network() -> NetworkSpec {
    NetworkSpec {
        id: 1,
        name: "bridge".into(),
        bridge: BRIDGE.into(),
        subnet: "172.17.0.0/16".parse().unwrap(),
        gateway: GATEWAY,
        subnet6: None,
        gateway6: None,
        icc: true,
        internal: false,
        masquerade: true,
        conntrack_limit: None,
    }
}

pub fn endpoint(ip: Ipv4Addr, host_ifname: &str, host_ifindex: u32) -> EndpointSpec {
    EndpointSpec {
        network_id: 1,
        container: format!("c-{ip}"),
        ip,
        ip6: None,
        mac: [0x02, 0x42, 172, 17, 0, ip.octets()[3]],
        host_ifname: host_ifname.into(),
        host_ifindex,
        links: vec![],
        conntrack_limit: None,
    }
}

pub fn port(
    proto: Protocol,
    host_ip: Option<Ipv4Addr>,
    host_port: u16,
    container_ip: Ipv4Addr,
    container_port: u16,
) -> PortSpec {
    PortSpec {
        network_id: 1,
        proto,
        host_ip: host_ip.map(Into::into),
        host_port,
        container_ip,
        container_ip6: None,
        container_port,
        allow: vec![],
    }
}
