//! The datapath: what makes NAT, forwarding and filtering decisions for netd's networks.
//!
//! One trait, one file per driver, a factory that picks by name (the shape of netavark's
//! `FirewallDriver`). The controller describes networks, endpoints and published ports with the
//! plain types below and never reaches into a driver.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

pub mod ebpf;
pub mod iptables;
mod link_update;
pub mod pinned_maps;
pub mod pins;
pub mod proxy;

// What the datapath's tools report, named here so that nothing outside datapath/ names a
// driver's module.
pub use ebpf::{
    conntrack::Flow,
    events::Drop,
    stats::{Counter, EndpointDrops},
};

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
    /// A dual-stack network's IPv6 subnet and bridge address.
    pub subnet6: Option<Ipv6Net>,
    pub gateway6: Option<Ipv6Addr>,
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
        crate::core::ipam::mac_for(self.gateway)
    }
}

/// One container's interface on a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    pub network_id: u32,
    pub container: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address on a dual-stack network.
    pub ip6: Option<Ipv6Addr>,
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
    /// The peer's IPv6 address, when both ends have one.
    pub peer6: Option<Ipv6Addr>,
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
/// `container_ip:container_port`, or over IPv6 to `container_ip6`. A `-p` range is one
/// `PortSpec` per port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub network_id: u32,
    pub proto: Protocol,
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_ip: Ipv4Addr,
    /// The container's IPv6 address on a dual-stack network.
    pub container_ip6: Option<Ipv6Addr>,
    pub container_port: u16,
    /// New flows only from these source ranges (`--publish-allow`); from anywhere if empty.
    /// Once any range is given, a family with none accepts no new flow.
    pub allow: Vec<IpNet>,
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
    /// A container left `net`; its veth is off the bridge and down, or gone.
    fn remove_endpoint(&self, net: &NetworkSpec, ep: &EndpointSpec) -> Result<()>;
    /// Publishes ports of an endpoint of `net`.
    fn publish(&self, net: &NetworkSpec, ports: &[PortSpec]) -> Result<()>;
    fn unpublish(&self, net: &NetworkSpec, ports: &[PortSpec]) -> Result<()>;
    /// Whether the bridge must send a frame back out of the port it came in on (hairpin
    /// mode): the way a container's packet to its own published port, translated on the
    /// bridge's side, returns to it.
    fn bridge_hairpin(&self) -> bool;
    /// Brings the processes the datapath runs for published ports (the iptables datapath's
    /// userland proxies) in line with `published`, every port published on its networks:
    /// starts those that died, ends those no port needs. None by default.
    fn reconcile_ports(&self, published: &[PortSpec]) -> Result<proxy::Reconciled> {
        let _ = published;
        Ok(proxy::Reconciled::default())
    }
}

/// The datapath drivers: what `--datapath` names, and what each network records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathKind {
    /// TC/XDP eBPF programs with pinned maps (the default).
    #[default]
    Ebpf,
    /// Docker 20.10's iptables rules, the baseline.
    Iptables,
}

impl DatapathKind {
    pub const ALL: [DatapathKind; 2] = [DatapathKind::Ebpf, DatapathKind::Iptables];

    pub fn name(self) -> &'static str {
        match self {
            DatapathKind::Ebpf => "ebpf",
            DatapathKind::Iptables => "iptables",
        }
    }
}

impl std::fmt::Display for DatapathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DatapathKind {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                anyhow::anyhow!("unknown datapath {name:?} (known: {})", known.join(", "))
            })
    }
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
    /// The cgroup whose processes reach published ports through host addresses (eBPF
    /// datapath); `None`: the cgroup v2 root, every process.
    pub host_cgroup: Option<PathBuf>,
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
            "generic" => &mut t.generic,
            other => anyhow::bail!(
                "unknown conntrack timeout {other:?} (known: tcp_syn_sent, tcp_syn_recv, tcp_established, tcp_fin_wait, tcp_time_wait, tcp_close, udp, udp_stream, icmp, generic)"
            ),
        };
        *slot = secs;
        Ok(())
    }
}

/// Where this netd instance's datapaths keep their kernel state, and how they are tuned. The
/// bpf filesystem is opened only when the eBPF datapath is used, so the iptables datapath and
/// the listings work without one.
#[derive(Clone, Debug)]
pub struct Datapaths {
    pub bpffs: PathBuf,
    /// netd's state dir, where the iptables datapath records its userland proxies.
    pub state_dir: PathBuf,
    pub tuning: Tuning,
}

impl Datapaths {
    /// Opens the driver `kind`.
    pub fn open(&self, kind: DatapathKind) -> Result<Box<dyn Datapath>> {
        match kind {
            DatapathKind::Ebpf => {
                let mut dp = ebpf::EbpfDatapath::new(self.pins()?)
                    .with_timeouts(self.tuning.timeouts)
                    .with_uplink_xdp(self.tuning.uplink_xdp);
                if let Some(max) = self.tuning.conntrack_max {
                    dp = dp.with_conntrack_max(max);
                }
                if let Some(cgroup) = &self.tuning.host_cgroup {
                    dp = dp.with_host_cgroup(Some(cgroup.clone()));
                }
                Ok(Box::new(dp))
            }
            DatapathKind::Iptables => Ok(Box::new(iptables::IptablesDatapath::new(
                proxy::Proxies::new(&self.state_dir),
            ))),
        }
    }

    /// The eBPF datapath's pin directory, made when needed (setting up a network).
    fn pins(&self) -> Result<crate::bpf::Pins> {
        crate::bpf::Pins::open(&self.bpffs)
    }

    /// The eBPF datapath's pins, once an eBPF network set it up (nothing is created here: a
    /// command that only reads or replaces finds nothing to work on before).
    fn set_up_pins(&self) -> Result<crate::bpf::Pins> {
        crate::bpf::Pins::existing(&self.bpffs)
            .filter(|p| p.map(netd_common::datapath::CONFIG_MAP).exists())
            .with_context(|| {
                format!(
                    "no eBPF datapath under {}: no eBPF network was created",
                    self.bpffs.display()
                )
            })
    }

    /// Whether the eBPF datapath's connection tracking exists yet (an eBPF network was set
    /// up; without a bpffs, none was).
    fn has_conntrack(&self) -> bool {
        crate::bpf::Pins::existing(&self.bpffs)
            .is_some_and(|p| p.map(netd_common::datapath::CONNTRACK_MAP).exists())
    }

    /// Calls `visit` with each live flow of the eBPF connection tracking table.
    pub fn conntrack_for_each_flow(&self, visit: impl FnMut(Flow) -> Result<()>) -> Result<()> {
        ebpf::conntrack::for_each_flow(&self.set_up_pins()?, visit)
    }

    /// Removes the entries of timed-out flows; 0 when no table exists yet.
    pub fn conntrack_sweep(&self) -> Result<usize> {
        if !self.has_conntrack() {
            return Ok(0);
        }
        ebpf::conntrack::sweep(&self.set_up_pins()?)
    }

    /// Moves the eBPF datapath's NAT programs and addresses along with the host: a new
    /// default route, uplink address, or interface routing out (see
    /// [`ebpf::EbpfDatapath::follow_host`]).
    pub fn follow_host(&self) -> Result<ebpf::Followed> {
        let Ok(pins) = self.set_up_pins() else {
            return Ok(ebpf::Followed::default());
        };
        let mut dp = ebpf::EbpfDatapath::new(pins);
        if let Some(max) = self.tuning.conntrack_max {
            dp = dp.with_conntrack_max(max);
        }
        dp.follow_host()
    }

    /// Removes every flow.
    pub fn conntrack_flush(&self) -> Result<usize> {
        ebpf::conntrack::flush(&self.set_up_pins()?)
    }

    /// The eBPF datapath's counters per reason, and drops per container.
    pub fn stats(&self) -> Result<(Vec<Counter>, Vec<EndpointDrops>)> {
        let pins = self.set_up_pins()?;
        Ok((
            ebpf::stats::read(&pins)?,
            ebpf::stats::read_endpoint_drops(&pins)?,
        ))
    }

    /// Calls `each` for every packet the eBPF datapath drops, `count` times or forever.
    pub async fn follow_drops(
        &self,
        count: Option<usize>,
        each: impl FnMut(Drop) -> Result<()>,
    ) -> Result<()> {
        ebpf::events::follow(&self.set_up_pins()?, count, each).await
    }

    /// Replaces the attached eBPF programs with this binary's; returns how many.
    pub fn reload(&self) -> Result<usize> {
        ebpf::EbpfDatapath::new(self.set_up_pins()?).reload_programs()
    }
}
