//! The datapath: what makes NAT, forwarding and filtering decisions for netd's networks.
//!
//! One trait, one file per driver, a factory that picks by name (the shape of netavark's
//! `FirewallDriver`). The controller describes networks, endpoints and published ports with the
//! plain types below and never reaches into a driver.

use std::net::Ipv4Addr;

use anyhow::Result;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub mod ebpf;
pub mod iptables;

/// A network as the datapath needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// Small stable id (unique per netd instance), used as a map key.
    pub id: u32,
    pub name: String,
    /// The bridge interface in the host namespace.
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Containers on the network may talk to each other (`--icc`).
    pub icc: bool,
    /// No traffic in or out of the network beyond its containers and gateway (`--internal`).
    pub internal: bool,
    /// Masquerade traffic leaving the host (`--masquerade`, on by default).
    pub masquerade: bool,
    /// The most flows its containers may have together (`--conntrack-limit`).
    pub conntrack_limit: Option<u32>,
}

impl NetworkSpec {
    /// The bridge's MAC: Docker's MAC for the gateway address. A MAC of its own, as Docker
    /// gives its bridges: left unset, a bridge takes its lowest port's, which changes as
    /// containers come and go (the eBPF datapath sends frames from it).
    pub fn bridge_mac(&self) -> [u8; 6] {
        crate::ipam::mac_for(self.gateway)
    }
}

/// One container's interface on a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    pub network_id: u32,
    pub container: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// The host end of the container's veth pair.
    pub host_ifname: String,
    pub host_ifindex: u32,
    /// What `--link` opens for this container on a network with `--icc=false`.
    pub links: Vec<LinkSpec>,
    /// The most flows it may have (`--conntrack-limit`).
    pub conntrack_limit: Option<u32>,
}

/// One port a `--link` opens: the container may reach `peer` on `proto`/`port` (an exposed
/// port of the linked container), and `peer` may answer from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkSpec {
    pub peer: Ipv4Addr,
    pub proto: Protocol,
    pub port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One published port: traffic to `host_ip:host_port` (any host address when `None`) goes to
/// `container_ip:container_port`. A `-p` range is one `PortSpec` per port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub network_id: u32,
    pub proto: Protocol,
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_ip: Ipv4Addr,
    pub container_port: u16,
    /// New flows only from these source ranges (`--publish-allow`); from anywhere if empty.
    pub allow: Vec<Ipv4Net>,
}

/// What every datapath driver does. Calls are idempotent where the name says "ensure"; the
/// others fail on a second identical call. Every method rolls back its own partial work.
pub trait Datapath {
    /// The driver's name, as `--datapath` takes it.
    fn name(&self) -> &'static str;
    /// Prepares the host (the uplink, global programs and maps) and the network's bridge.
    fn setup_network(&self, net: &NetworkSpec) -> Result<()>;
    /// Undoes `setup_network` for this network (and the host part when it was the last one).
    fn teardown_network(&self, net: &NetworkSpec) -> Result<()>;
    /// A container joined `net`.
    fn add_endpoint(&self, net: &NetworkSpec, ep: &EndpointSpec) -> Result<()>;
    fn remove_endpoint(&self, net: &NetworkSpec, ep: &EndpointSpec) -> Result<()>;
    /// Publishes ports of an endpoint of `net`.
    fn publish(&self, net: &NetworkSpec, ports: &[PortSpec]) -> Result<()>;
    fn unpublish(&self, net: &NetworkSpec, ports: &[PortSpec]) -> Result<()>;
}

/// The drivers `--datapath` can name.
pub const DRIVERS: &[&str] = &["ebpf", "iptables"];

/// Checks that `name` is a driver `--datapath` can name.
pub fn check_name(name: &str) -> Result<()> {
    if !DRIVERS.contains(&name) {
        anyhow::bail!("unknown datapath {name:?} (known: {})", DRIVERS.join(", "));
    }
    Ok(())
}

/// Options of the eBPF datapath: the size and timeouts of its connection tracking
/// (`--conntrack-max`, `--conntrack-timeout`; the table is sized when it is first created,
/// timeouts are written whenever a network is set up), and whether the uplink also gets the
/// XDP program (`--uplink-xdp`, when the first network attaches the uplink's programs).
#[derive(Clone, Debug, Default)]
pub struct Tuning {
    pub conntrack_max: Option<u32>,
    pub timeouts: netd_common::datapath::Timeouts,
    pub uplink_xdp: bool,
}

impl Tuning {
    /// Applies a `NAME=SECONDS` timeout, e.g. `tcp_established=3600`.
    pub fn set_timeout(&mut self, spec: &str) -> Result<()> {
        let (name, secs) = spec.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("invalid conntrack timeout {spec:?}: expected NAME=SECONDS")
        })?;
        let secs: u32 = secs.parse().map_err(|_| {
            anyhow::anyhow!(
                "invalid conntrack timeout {spec:?}: {secs:?} is not a number of seconds"
            )
        })?;
        let t = &mut self.timeouts;
        let slot = match name {
            "tcp_syn_sent" => &mut t.tcp_syn_sent,
            "tcp_syn_recv" => &mut t.tcp_syn_recv,
            "tcp_established" => &mut t.tcp_established,
            "tcp_fin_wait" => &mut t.tcp_fin_wait,
            "tcp_time_wait" => &mut t.tcp_time_wait,
            "tcp_close" => &mut t.tcp_close,
            "udp" => &mut t.udp,
            "udp_stream" => &mut t.udp_stream,
            "icmp" => &mut t.icmp,
            other => anyhow::bail!(
                "unknown conntrack timeout {other:?} (known: tcp_syn_sent, tcp_syn_recv, tcp_established, tcp_fin_wait, tcp_time_wait, tcp_close, udp, udp_stream, icmp)"
            ),
        };
        *slot = secs;
        Ok(())
    }
}

/// Opens the driver called `name` for the instance pinned at `pins`.
pub fn open(name: &str, pins: &crate::bpf::Pins, tuning: &Tuning) -> Result<Box<dyn Datapath>> {
    match name {
        "ebpf" => {
            let mut dp = ebpf::EbpfDatapath::new(pins.clone())
                .with_timeouts(tuning.timeouts)
                .with_uplink_xdp(tuning.uplink_xdp);
            if let Some(max) = tuning.conntrack_max {
                dp = dp.with_conntrack_max(max);
            }
            Ok(Box::new(dp))
        }
        "iptables" => Ok(Box::new(iptables::IptablesDatapath)),
        other => check_name(other).map(|()| unreachable!("every driver is matched above")),
    }
}
