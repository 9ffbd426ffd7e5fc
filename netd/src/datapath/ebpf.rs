//! The eBPF datapath: the programs of netd-ebpf and the pinned maps they read, which this
//! driver fills. Attach points (links pinned under the instance's bpffs dir):
//!
//! - the host's uplink (the default route's interface), ingress and egress: masquerade,
//!   published ports (IPv6 ones too, for what arrives from outside), ICMP errors about both;
//!   attached with the first network, detached with the last; with `--uplink-xdp`, also its
//!   XDP hook: refused new flows dropped early;
//! - the same NAT programs on every other interface of the host that can route out (an IPv4
//!   address that is not netd's: a second NIC, a VPN), masquerading to that interface's
//!   address (`NAT_IFACES`); followed with the uplink (`EbpfDatapath::follow_host`); the
//!   global IPv6 address of the uplink and of each of them, where it has one, is the NAT66
//!   source there (`NAT6_ADDRS`);
//! - each network's bridge, ingress: hairpin (containers to published ports via the host,
//!   IPv6 ones in a program of their own, reached by tail call through `BRIDGE6_PROGS`); the
//!   bridge must exist when `setup_network` is called;
//! - each container's host-side veth, ingress: the isolation policy and the fast paths
//!   (IPv6's in a program of its own, reached by tail call through `ENDPOINT6_PROGS`);
//!   egress: the destination side (only the host, the
//!   container's own network and what netd translated get in, whatever interface a packet
//!   came through); legacy TC filters (no RCU grace period per container, see
//!   `Pins::attach_pinned_filter`) attached by `add_endpoint` (before the veth is up or on
//!   the bridge), detached with the veth (`remove_endpoint` comes once the veth is off the
//!   bridge and down);
//! - the host cgroup (cgroup v2 root by default), connect, sendmsg, recvmsg and getpeername
//!   of both families: host processes to published ports (on a host address, `HOST_ADDRS` and
//!   `HOST_ADDRS6`, or loopback), in the host namespace only.
//!
//! Every call works on the pins alone, so any netd process (or none: the programs keep
//! running) sees the same datapath, and `reload_programs` upgrades it in place.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{Context as _, Result, bail};
use aya::{Ebpf, maps::lpm_trie::Key, programs::TcAttachType};
use netd_common::datapath::{
    AF_INET, AF_INET6, Addr, BRIDGE_INGRESS_PROG, BRIDGE6_PROGS, BRIDGE6_PROGS_MAP,
    CONNTRACK_DEFAULT_MAX, Config, CtLimit, CtLimitKey, ENDPOINT_EGRESS_PROG,
    ENDPOINT_INGRESS_PROG, ENDPOINT6_PROGS, ENDPOINT6_PROGS_MAP, EndpointKey, HOST_SOCK_PROGS,
    NAT6_ADDRS_MAP, NAT66_PROGS, NAT66_PROGS_MAP, PUBLISHED_MAP, PUBLISHED_MAX, Timeouts,
    UPLINK_EGRESS_PROG, UPLINK_INGRESS_PROG, UPLINK_XDP_PROG, addr_v4, addr_v6, v4_octets,
    v6_octets,
};

use super::{Datapath, EndpointSpec, NetworkSpec, PortSpec};
use crate::bpf::Pins;

pub mod conntrack;
pub mod events;
pub mod host;
pub mod maps;
pub mod stats;

/// The NAT programs (on the uplink and every other interface masqueraded through), with
/// their attach directions.
const UPLINK_PROGS: [(&str, TcAttachType); 2] = [
    (UPLINK_INGRESS_PROG, TcAttachType::Ingress),
    (UPLINK_EGRESS_PROG, TcAttachType::Egress),
];

/// The hairpin program on each network's bridge, with its attach direction.
const BRIDGE_PROGS: [(&str, TcAttachType); 1] = [(BRIDGE_INGRESS_PROG, TcAttachType::Ingress)];

/// The programs on each container's host-side veth, with their attach directions.
const ENDPOINT_PROGS: [(&str, TcAttachType); 2] = [
    (ENDPOINT_INGRESS_PROG, TcAttachType::Ingress),
    (ENDPOINT_EGRESS_PROG, TcAttachType::Egress),
];

/// What following the host changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Followed {
    /// The new uplink, when the default route's interface or its address changed.
    pub uplink: Option<String>,
    /// Interfaces masquerade goes through from now on (the NAT programs attached).
    pub added: Vec<String>,
    /// Interfaces it no longer goes through (gone, without an address, netd's own).
    pub removed: Vec<String>,
}

/// The eBPF object: the caller's, or loaded the first time a program must be attached
/// (loading creates the maps not pinned yet, attaching loads the programs into the kernel).
enum Object<'a> {
    Given(&'a mut Ebpf),
    Lazy(Option<Ebpf>),
}

impl Object<'_> {
    fn get(&mut self, dp: &EbpfDatapath) -> Result<&mut Ebpf> {
        match self {
            Object::Given(ebpf) => Ok(ebpf),
            Object::Lazy(Some(ebpf)) => Ok(ebpf),
            Object::Lazy(none) => Ok(none.insert(dp.pins.load_sized(dp.conntrack_max)?)),
        }
    }
}

pub struct EbpfDatapath {
    pins: Pins,
    conntrack_max: u32,
    timeouts: Timeouts,
    host_cgroup: HostCgroup,
    uplink_xdp: bool,
}

/// Where the host socket programs go.
enum HostCgroup {
    /// The cgroup v2 root (every process), found when the programs are attached: finding it
    /// reads the mount table, which grows with every container's namespace mount.
    Root,
    At(PathBuf),
    Nowhere,
}

impl EbpfDatapath {
    pub fn new(pins: Pins) -> Self {
        Self {
            pins,
            conntrack_max: CONNTRACK_DEFAULT_MAX,
            timeouts: Timeouts::default(),
            // Every process by default: the program only acts in the host namespace, whatever
            // the cgroup holds.
            host_cgroup: HostCgroup::Root,
            uplink_xdp: false,
        }
    }

    /// The cgroup whose processes reach published ports through host addresses and loopback
    /// (socket-level redirection); `None` leaves host processes alone.
    pub fn with_host_cgroup(mut self, cgroup: Option<PathBuf>) -> Self {
        self.host_cgroup = cgroup.map_or(HostCgroup::Nowhere, HostCgroup::At);
        self
    }

    /// Size of the conntrack table when the datapath creates it (entries, two per flow).
    pub fn with_conntrack_max(mut self, entries: u32) -> Self {
        self.conntrack_max = entries;
        self
    }

    /// Conntrack timeouts (written at every `setup_network`).
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Whether setting up a network also attaches `uplink_xdp` to the uplink.
    pub fn with_uplink_xdp(mut self, on: bool) -> Self {
        self.uplink_xdp = on;
        self
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Replaces every attached program with this binary's build of it, atomically (an
    /// upgrade: no packet goes untranslated, no flow is lost since the maps stay, or are
    /// copied into bigger ones, see [`Pins::load_upgrading`]). Returns how many attachments
    /// were replaced.
    pub fn reload_programs(&self) -> Result<usize> {
        // Interfaces gone since took their NAT programs along, their pins left behind:
        // nothing to replace (or put back) there.
        self.detach_nat_programs(|name| nix::net::if_::if_nametoindex(name).is_err())?;
        let (mut ebpf, upgrade) = self.pins.load_upgrading(self.conntrack_max)?;
        // Every program through the verifier before any pin moves: until the swap, a failure
        // leaves the old pins, and the old programs never stopped running.
        let before = crate::bpf::load_programs(&mut ebpf)
            .and_then(|()| self.fill_subnets6())
            .and_then(|()| self.pins.attached())
            .and_then(|before| upgrade.swap().map(|()| before));
        let mut before = match before {
            Ok(before) => before,
            Err(e) => {
                upgrade.abort();
                return Err(e);
            }
        };
        let mut endpoints = Vec::new();
        let replaced = match self.replace_programs(&mut ebpf, &mut endpoints) {
            Ok(replaced) => replaced,
            Err(e) => {
                // The old programs back everywhere, then the old pins: as before the reload.
                if let Err(back) = self.pins.put_back(&mut before, &endpoints) {
                    // Some run this build on the new maps: a `netd reload` again finishes.
                    upgrade.finish()?;
                    return Err(e.context(format!(
                        "putting the old programs back failed too ({back:#}); run `netd reload` again"
                    )));
                }
                upgrade.abort();
                return Err(e);
            }
        };
        upgrade.finish()?;
        // The host as it is now: interfaces that appeared get this build's NAT programs.
        if maps::networks(&self.pins)?.keys().next().is_some() {
            self.follow(&mut Object::Given(&mut ebpf))?;
        }
        Ok(replaced)
    }

    /// Puts each dual-stack network's IPv6 subnet in `SUBNETS6`, where a network an earlier
    /// build made has none (that build had no such map): this build's programs take a source
    /// in no subnet there, from outside, for one that may be outside.
    fn fill_subnets6(&self) -> Result<()> {
        let mut subnets6 = maps::subnets6(&self.pins)?;
        for (id, info6) in maps::networks6(&self.pins)?.iter().filter_map(Result::ok) {
            subnets6
                .insert(&maps::subnet6_key(&info6), id, 0)
                .with_context(|| format!("add the IPv6 subnet of network id {id}"))?;
        }
        Ok(())
    }

    /// The host-side veths of the containers, by name (those still there).
    fn veth_names(&self) -> Result<Vec<String>> {
        Ok(maps::veths(&self.pins)?
            .keys()
            .filter_map(Result::ok)
            .filter_map(|ifindex| nix::net::if_::if_indextoname(ifindex).ok())
            .map(|name| name.to_string_lossy().into_owned())
            // nix gives an empty name for an index no interface has.
            .filter(|name| !name.is_empty())
            .collect())
    }

    /// Replaces every attached program with its build in `ebpf`; returns how many. The
    /// endpoint filters replaced are added to `endpoints` (program, veth, direction).
    fn replace_programs(
        &self,
        ebpf: &mut Ebpf,
        endpoints: &mut Vec<(&'static str, String, TcAttachType)>,
    ) -> Result<usize> {
        // A build older than `HOST_ADDRS` left it to be created empty.
        self.sync_host_addrs()?;
        self.fill_generic_timeout()?;
        let mut replaced = 0;
        crate::bpf::fill_prog_array(ebpf, NAT66_PROGS_MAP, &NAT66_PROGS)?;
        crate::bpf::fill_prog_array(ebpf, BRIDGE6_PROGS_MAP, &BRIDGE6_PROGS)?;
        crate::bpf::fill_prog_array(ebpf, ENDPOINT6_PROGS_MAP, &ENDPOINT6_PROGS)?;
        for (prog, dir) in UPLINK_PROGS.iter().chain(&BRIDGE_PROGS) {
            for iface in self.pins.tc_attachments(prog, *dir)? {
                self.pins.replace_tc(ebpf, prog, &iface, *dir)?;
                replaced += 1;
            }
        }
        for iface in self.pins.xdp_attachments(UPLINK_XDP_PROG)? {
            self.pins.replace_xdp(ebpf, UPLINK_XDP_PROG, &iface)?;
            replaced += 1;
        }
        let mut host_sockets = false;
        for prog in HOST_SOCK_PROGS {
            if self.pins.cgroup_link(prog).exists() {
                self.pins.replace_cgroup(ebpf, prog)?;
                replaced += 1;
                host_sockets = true;
            }
        }
        // A build older than the IPv6 ones had only the IPv4 programs on the cgroup.
        if host_sockets {
            self.attach_host_sockets(ebpf)?;
        }
        for iface in self.veth_names()? {
            for (prog, dir) in ENDPOINT_PROGS {
                self.pins.replace_filter(ebpf, prog, &iface, dir)?;
                endpoints.push((prog, iface.clone(), dir));
                replaced += 1;
            }
        }
        // Containers made from now on get this build too.
        for (prog, _) in ENDPOINT_PROGS {
            self.pins.pin_tc_program(ebpf, prog)?;
        }
        Ok(replaced)
    }

    /// Gives the configuration the generic timeout where a build older than it left a 0
    /// (flows of other IP protocols would die at once).
    fn fill_generic_timeout(&self) -> Result<()> {
        let mut config = maps::read_config(&self.pins)?;
        if config.uplink_ifindex == 0 || config.timeouts.generic != 0 {
            return Ok(());
        }
        config.timeouts.generic = self.timeouts.generic;
        maps::config(&self.pins)?
            .set(0, config, 0)
            .context("write the datapath configuration")
    }

    /// Attaches `progs` to `iface` where they are not attached yet. On failure, detaches what
    /// this call attached.
    fn attach(
        &self,
        ebpf: &mut Ebpf,
        iface: &str,
        progs: &[(&'static str, TcAttachType)],
    ) -> Result<()> {
        let mut attached = Vec::new();
        for &(prog, dir) in progs {
            if self.pins.tc_attached(prog, iface, dir) {
                continue;
            }
            if let Err(e) = self.pins.attach_tc(ebpf, prog, iface, dir) {
                for (prog, dir) in attached {
                    let _ = self.pins.detach_tc(prog, iface, dir);
                }
                return Err(e);
            }
            attached.push((prog, dir));
        }
        Ok(())
    }

    /// Attaches the NAT programs to `iface` where they are not attached yet, NAT66's in their
    /// program array first.
    fn attach_nat_programs(&self, ebpf: &mut Ebpf, iface: &str) -> Result<()> {
        crate::bpf::fill_prog_array(ebpf, NAT66_PROGS_MAP, &NAT66_PROGS)?;
        self.attach(ebpf, iface, &UPLINK_PROGS)
    }

    /// Attaches the hairpin program to a network's bridge, IPv6 hairpin's in its program
    /// array first.
    fn attach_bridge_program(&self, ebpf: &mut Ebpf, bridge: &str) -> Result<()> {
        crate::bpf::fill_prog_array(ebpf, BRIDGE6_PROGS_MAP, &BRIDGE6_PROGS)?;
        self.attach(ebpf, bridge, &BRIDGE_PROGS)
    }

    /// Attaches the endpoint programs to a container's veth, from their pins (no object load,
    /// no verifier run); the first container loads the object to pin them, IPv6's in its
    /// program array first. On failure, detaches what this call attached.
    fn attach_endpoint_programs(&self, iface: &str) -> Result<()> {
        if ENDPOINT_PROGS
            .iter()
            .any(|(prog, _)| !self.pins.program(prog).exists())
        {
            let mut ebpf = self.pins.load_sized(self.conntrack_max)?;
            crate::bpf::fill_prog_array(&mut ebpf, ENDPOINT6_PROGS_MAP, &ENDPOINT6_PROGS)?;
            for (prog, _) in ENDPOINT_PROGS {
                self.pins.pin_tc_program(&mut ebpf, prog)?;
            }
        }
        for (done, (prog, dir)) in ENDPOINT_PROGS.iter().enumerate() {
            if let Err(e) = self.pins.attach_pinned_filter(prog, iface, *dir) {
                self.detach_endpoint_programs(iface, &ENDPOINT_PROGS[..done]);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Detaches `progs` from a container's veth (best effort: a veth that is gone has nothing
    /// attached any more).
    fn detach_endpoint_programs(&self, iface: &str, progs: &[(&str, TcAttachType)]) {
        for (_, dir) in progs {
            let _ = self.pins.detach_filter(iface, *dir);
        }
    }

    /// Attaches the uplink's XDP program when asked to and not attached yet.
    fn attach_uplink_xdp(&self, ebpf: &mut Ebpf, uplink: &str) -> Result<()> {
        if !self.uplink_xdp || self.pins.xdp_link(UPLINK_XDP_PROG, uplink).exists() {
            return Ok(());
        }
        self.pins.attach_xdp(ebpf, UPLINK_XDP_PROG, uplink)
    }

    /// Attaches the host socket programs to the host cgroup, when there is one, where they are
    /// not attached yet. On failure, detaches what this call attached.
    fn attach_host_sockets(&self, ebpf: &mut Ebpf) -> Result<()> {
        let cgroup = match &self.host_cgroup {
            HostCgroup::Root => host::cgroup2_root(),
            HostCgroup::At(path) => Some(path.clone()),
            HostCgroup::Nowhere => None,
        };
        let Some(cgroup) = cgroup else {
            return Ok(());
        };
        let mut attached = Vec::new();
        for prog in HOST_SOCK_PROGS {
            if self.pins.cgroup_link(prog).exists() {
                continue;
            }
            if let Err(e) = self.pins.attach_cgroup_sock_addr(ebpf, prog, &cgroup) {
                for prog in attached {
                    let _ = self.pins.detach_pinned(&self.pins.cgroup_link(prog));
                }
                return Err(e);
            }
            attached.push(prog);
        }
        Ok(())
    }

    /// Detaches the host-wide programs: the NAT ones (TC, and XDP on the uplink) from every
    /// interface they are on, and the cgroup ones. Tries them all, then names every one it
    /// couldn't detach.
    fn detach_host(&self) -> Result<()> {
        // First, so the endpoints' fast path stops sending packets there.
        if let Ok(mut nat_ifaces) = maps::nat_ifaces(&self.pins) {
            let all: Vec<u32> = nat_ifaces.keys().filter_map(Result::ok).collect();
            for ifindex in all {
                let _ = nat_ifaces.remove(&ifindex);
            }
        }
        if let Ok(mut nat6_addrs) = maps::nat6_addrs(&self.pins) {
            let all: Vec<u32> = nat6_addrs.keys().filter_map(Result::ok).collect();
            for ifindex in all {
                let _ = nat6_addrs.remove(&ifindex);
            }
        }
        let mut failed = Vec::new();
        if let Err(e) = self.detach_nat_programs(|_| true) {
            failed.push(format!("{e:#}"));
        }
        let xdp = self.pins.xdp_attachments(UPLINK_XDP_PROG)?;
        let pins = xdp
            .iter()
            .map(|iface| self.pins.xdp_link(UPLINK_XDP_PROG, iface))
            .chain(HOST_SOCK_PROGS.map(|prog| self.pins.cgroup_link(prog)));
        for pin in pins {
            if let Err(e) = self.pins.detach_pinned(&pin) {
                failed.push(format!("{e:#}"));
            }
        }
        if !failed.is_empty() {
            bail!("left attached: {}", failed.join("; "));
        }
        Ok(())
    }

    /// Detaches the NAT programs from the interfaces `unwanted` names; returns those
    /// interfaces. Tries them all, then names every one it couldn't detach.
    fn detach_nat_programs(&self, unwanted: impl Fn(&str) -> bool) -> Result<Vec<String>> {
        let (mut detached, mut failed) = (Vec::new(), Vec::new());
        for (prog, dir) in UPLINK_PROGS {
            for iface in self.pins.tc_attachments(prog, dir)? {
                if !unwanted(&iface) {
                    continue;
                }
                match self.pins.detach_tc(prog, &iface, dir) {
                    Ok(_) if !detached.contains(&iface) => detached.push(iface),
                    Ok(_) => {}
                    Err(e) => failed.push(format!("{prog} on {iface}: {e:#}")),
                }
            }
        }
        if !failed.is_empty() {
            bail!("could not detach {}", failed.join("; "));
        }
        Ok(detached)
    }

    /// Follows the host: its addresses (`HOST_ADDRS`), the uplink and the other interfaces
    /// masquerade goes through. When the default route's interface or its address changed
    /// since the networks were set up, the uplink's programs (the XDP one too, if attached)
    /// go to the new interface and its address into the configuration, so masquerading and
    /// published ports go on from there (flows masqueraded to the old address die with it);
    /// interfaces that appeared get the NAT programs, those gone or without an address lose
    /// them. Nothing to do without a network.
    pub fn follow_host(&self) -> Result<Followed> {
        if maps::networks(&self.pins)?.keys().next().is_none() {
            return Ok(Followed::default());
        }
        self.follow(&mut Object::Lazy(None))
    }

    fn follow(&self, object: &mut Object<'_>) -> Result<Followed> {
        self.sync_host_addrs()?;
        let current = maps::read_config(&self.pins)?;
        let uplink = host::find_uplink()?;
        let mut known: HashSet<u32> = maps::nat_ifaces(&self.pins)?
            .keys()
            .filter_map(Result::ok)
            .collect();
        known.insert(current.uplink_ifindex);
        let mut followed = Followed::default();
        let same_addr = v4_octets(&current.uplink_addr) == uplink.addr.octets();
        if current.uplink_ifindex != uplink.index || !same_addr {
            self.move_uplink(object, &current, &uplink, &known)?;
            followed.uplink = Some(uplink.name.clone());
        }
        (followed.added, followed.removed) = self.follow_nat_ifaces(object, &uplink, &known)?;
        Ok(followed)
    }

    /// Makes `uplink` the uplink: the NAT programs on it (the XDP one too, moved from the old
    /// uplink if it was there), its address the masquerade source in the configuration. The
    /// old uplink is left to [`Self::follow_nat_ifaces`]: it keeps masquerading, to its own
    /// address, while it has one.
    fn move_uplink(
        &self,
        object: &mut Object<'_>,
        current: &Config,
        uplink: &host::Iface,
        known: &HashSet<u32>,
    ) -> Result<()> {
        if current.uplink_ifindex != uplink.index {
            self.ensure_nat_programs(object, uplink, known)?;
            let xdp = self.pins.xdp_attachments(UPLINK_XDP_PROG)?;
            if !xdp.is_empty() && !xdp.contains(&uplink.name) {
                for iface in &xdp {
                    self.pins
                        .detach_pinned(&self.pins.xdp_link(UPLINK_XDP_PROG, iface))?;
                }
                self.pins
                    .attach_xdp(object.get(self)?, UPLINK_XDP_PROG, &uplink.name)?;
            }
        }
        let config = Config {
            uplink_addr: addr_v4(uplink.addr.octets()),
            uplink_ifindex: uplink.index,
            ..*current
        };
        maps::config(&self.pins)?
            .set(0, config, 0)
            .context("write the datapath configuration")
    }

    /// Puts the NAT programs on every interface besides the uplink that can route out (an
    /// IPv4 address that is not netd's) and records its address in `NAT_IFACES` (its global
    /// IPv6 address, and the uplink's, in `NAT6_ADDRS`); takes them off every other
    /// interface. In that order, so an interface is in `NAT_IFACES` and `NAT6_ADDRS` (where
    /// the endpoints' fast path sends packets) only while its programs masquerade there. An
    /// interface the programs can't be attached to is left out, with a warning: what is
    /// routed there is dropped (`unmasqueraded`). Returns the interfaces added and removed.
    fn follow_nat_ifaces(
        &self,
        object: &mut Object<'_>,
        uplink: &host::Iface,
        known: &HashSet<u32>,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let mut kept = Vec::new();
        let mut added = Vec::new();
        for iface in self.nat_candidates(uplink)? {
            match self.ensure_nat_programs(object, &iface, known) {
                Ok(attached) => {
                    if attached {
                        added.push(iface.name.clone());
                    }
                    kept.push(iface);
                }
                Err(e) => eprintln!(
                    "netd: warning: nothing is masqueraded through {}: {e:#}",
                    iface.name
                ),
            }
        }
        let mut nat_ifaces = maps::nat_ifaces(&self.pins)?;
        for iface in &kept {
            nat_ifaces
                .insert(iface.index, maps::nat_iface(iface.addr), 0)
                .with_context(|| format!("masquerade through {}", iface.name))?;
        }
        let stale: Vec<u32> = nat_ifaces
            .keys()
            .filter_map(Result::ok)
            .filter(|index| kept.iter().all(|iface| iface.index != *index))
            .collect();
        for index in stale {
            nat_ifaces
                .remove(&index)
                .with_context(|| format!("stop masquerading through interface {index}"))?;
        }
        self.sync_nat6_addrs(std::iter::once(uplink.index).chain(kept.iter().map(|i| i.index)))?;
        let removed = self.detach_nat_programs(|name| {
            name != uplink.name && kept.iter().all(|iface| iface.name != name)
        })?;
        Ok((added, removed))
    }

    /// The interfaces besides the uplink that masquerade goes through: every one with an IPv4
    /// address (loopback aside) but netd's own: a container's veth, or a bridge (its address
    /// in a network's subnet, or its MAC netd's for its address: an iptables network's too,
    /// whose isolation the fast path would otherwise skip).
    fn nat_candidates(&self, uplink: &host::Iface) -> Result<Vec<host::Iface>> {
        let subnets = maps::subnets(&self.pins)?;
        let veths = maps::veths(&self.pins)?;
        let bridges = host::netd_bridges()?;
        Ok(host::ipv4_interfaces()?
            .into_iter()
            .filter(|iface| iface.index != uplink.index && !bridges.contains(&iface.name))
            .filter(|iface| {
                let addr = u32::from_ne_bytes(iface.addr.octets());
                subnets.get(&Key::new(32, addr), 0).is_err() && veths.get(&iface.index, 0).is_err()
            })
            .collect())
    }

    /// Attaches the NAT programs to `iface` unless they are there already (pinned under its
    /// name for its index, one of `known`). Pins under its name for another index are an
    /// interface of that name that is gone, whose programs went with it: replaced. Returns
    /// whether it attached them.
    fn ensure_nat_programs(
        &self,
        object: &mut Object<'_>,
        iface: &host::Iface,
        known: &HashSet<u32>,
    ) -> Result<bool> {
        let attached = UPLINK_PROGS
            .iter()
            .all(|(prog, dir)| self.pins.tc_attached(prog, &iface.name, *dir));
        if attached && known.contains(&iface.index) {
            return Ok(false);
        }
        self.detach_nat_programs(|name| name == iface.name)?;
        self.attach_nat_programs(object.get(self)?, &iface.name)?;
        Ok(true)
    }

    /// The `ENDPOINTS` entry of a dual-stack container's IPv6 address (`key6`), if it has one.
    fn add_endpoint6(
        &self,
        endpoints: &mut maps::Endpoints,
        key6: Option<EndpointKey>,
        ep: &EndpointSpec,
    ) -> Result<()> {
        let (Some(key6), Some(ip6)) = (key6, ep.ip6) else {
            return Ok(());
        };
        endpoints
            .insert(key6, maps::endpoint_info(ep), 0)
            .with_context(|| format!("add endpoint {ip6} of {}", ep.container))
    }

    /// What the endpoint programs need to know of `ep`: the veth it sits behind, and the
    /// ports its links open.
    fn add_policy(&self, net: &NetworkSpec, ep: &EndpointSpec) -> Result<()> {
        let bridge = nix::net::if_::if_nametoindex(net.bridge.as_str())
            .with_context(|| format!("find bridge {}", net.bridge))?;
        maps::veths(&self.pins)?
            .insert(ep.host_ifindex, maps::veth_info(net, ep, bridge), 0)
            .with_context(|| format!("add veth {} of {}", ep.host_ifname, ep.container))?;
        let mut links = maps::links(&self.pins)?;
        for link in &ep.links {
            let keys =
                std::iter::once(maps::link_key(ep.ip, link)).chain(maps::link_key6(ep.ip6, link));
            for key in keys {
                links
                    .insert(key, 1, 0)
                    .with_context(|| format!("add a link of {} to {}", ep.container, link.peer))?;
            }
        }
        Ok(())
    }

    /// Undoes `add_policy`, and removes the links of other containers to `ep` (the address
    /// may go to another container). Best effort: what is not there needs no removing.
    fn remove_policy(&self, ep: &EndpointSpec) {
        if let Ok(mut veths) = maps::veths(&self.pins) {
            let _ = veths.remove(&ep.host_ifindex);
        }
        let Ok(mut links) = maps::links(&self.pins) else {
            return;
        };
        let addrs = [
            Some(maps::endpoint_key(ep.ip)),
            ep.ip6.map(maps::endpoint_key6),
        ];
        let of_ep = |addr: &Addr, family: u8| {
            addrs
                .iter()
                .flatten()
                .any(|k| k.addr == *addr && k.family == family)
        };
        let stale: Vec<_> = links
            .keys()
            .filter_map(Result::ok)
            .filter(|k| of_ep(&k.src, k.family) || of_ep(&k.dst, k.family))
            .collect();
        for key in stale {
            let _ = links.remove(&key);
        }
    }

    /// Detaches the endpoint program from the host-side veth `ifindex` of an endpoint left on a
    /// network being torn down (one whose veth is gone has nothing attached any more).
    fn detach_endpoint(&self, ifindex: u32) -> Result<()> {
        let _ = maps::veths(&self.pins)?.remove(&ifindex);
        let Ok(ifname) = nix::net::if_::if_indextoname(ifindex) else {
            return Ok(());
        };
        let ifname = ifname.to_string_lossy();
        for (_, dir) in ENDPOINT_PROGS {
            self.pins.detach_filter(&ifname, dir)?;
        }
        Ok(())
    }

    /// The source ranges `port` accepts new flows from (`--publish-allow`).
    fn allow_sources(&self, port: &PortSpec) -> Result<()> {
        let mut allow = maps::publish_allow(&self.pins)?;
        for key in maps::publish_allow_keys(port) {
            allow
                .insert(&key, 1, 0)
                .with_context(|| format!("allow sources of {}", describe(port)))?;
        }
        Ok(())
    }

    /// Undoes `allow_sources` (best effort: what is not there needs no removing). The ranges
    /// are keyed by the container's side of the port, so another host port still published
    /// onto it (`-p 8080:80 -p 9090:80`) shares them: those stay.
    fn forget_sources(&self, port: &PortSpec) {
        let keys = maps::publish_allow_keys(port);
        if keys.is_empty() {
            return;
        }
        let (Ok(mut allow), Ok(published)) =
            (maps::publish_allow(&self.pins), maps::published(&self.pins))
        else {
            return;
        };
        let still_published: HashSet<_> = published
            .iter()
            .filter_map(Result::ok)
            .map(|(key, target)| (target.addr, target.port, key.proto, key.family))
            .collect();
        for key in keys {
            let k = key.data();
            if !still_published.contains(&(k.target, k.port, k.proto, k.family)) {
                let _ = allow.remove(&key);
            }
        }
    }

    /// Publishes `port` in each family it is published in (its `PUBLISHED` entries, and its
    /// source ranges first: a restricted port is never open to all, even for a moment). None
    /// of its entries may be there already; on failure, removes what it wrote.
    fn publish_port(
        &self,
        published: &mut maps::Published,
        net: &NetworkSpec,
        port: &PortSpec,
    ) -> Result<()> {
        let entries = maps::published_entries(port);
        if entries.is_empty() {
            bail!(
                "{}: the container has no address of its family",
                describe(port)
            );
        }
        if let Some((key, _)) = entries
            .iter()
            .find(|(key, _)| published.get(key, 0).is_ok())
        {
            bail!("{} is already published", describe_side(port, key));
        }
        let mut written = 0;
        let result = self.allow_sources(port).and_then(|()| {
            for (key, target) in &entries {
                published
                    .insert(key, target, 0)
                    .map_err(|e| map_full_or(e, PUBLISHED_MAP, PUBLISHED_MAX, "published ports"))
                    .with_context(|| {
                        format!("publish {} on {}", describe_side(port, key), net.name)
                    })?;
                written += 1;
            }
            Ok(())
        });
        if result.is_err() {
            for (key, _) in &entries[..written] {
                let _ = published.remove(key);
            }
            self.forget_sources(port);
        }
        result
    }

    /// Caps the flows counted under `key` at `limit` (`--conntrack-limit`); no cap for `None`.
    fn set_limit(&self, key: CtLimitKey, limit: Option<u32>) -> Result<()> {
        let Some(max) = limit else {
            return Ok(());
        };
        let limit = CtLimit {
            max: u64::from(max),
            count: 0,
        };
        maps::ct_limits(&self.pins)?
            .insert(key, limit, 0)
            .context("set the conntrack limit")
    }

    /// Undoes `set_limit` (best effort: what is not there needs no removing).
    fn forget_limit(&self, key: &CtLimitKey) {
        if let Ok(mut limits) = maps::ct_limits(&self.pins) {
            let _ = limits.remove(key);
        }
    }

    /// Removes `net`'s IPv6 side from `NETWORKS6` and `SUBNETS6` (best effort: an IPv4-only
    /// network has none).
    fn forget_network6(&self, net: &NetworkSpec) {
        if let Ok(mut networks6) = maps::networks6(&self.pins) {
            let _ = networks6.remove(&net.id);
        }
        if let (Ok(mut subnets6), Some(info6)) =
            (maps::subnets6(&self.pins), maps::network6_info(net))
        {
            let _ = subnets6.remove(&maps::subnet6_key(&info6));
        }
    }

    /// Removes `net`'s subnet from `SUBNETS` (best effort: what is not there needs no removing).
    fn forget_subnet(&self, net: &NetworkSpec) {
        if let Ok(mut subnets) = maps::subnets(&self.pins) {
            let _ = subnets.remove(&maps::subnet_key(net));
        }
    }

    fn write_config(&self, uplink: &host::Iface) -> Result<()> {
        let (nat_port_min, nat_port_max) = host::nat_port_range()?;
        let config = Config {
            uplink_addr: addr_v4(uplink.addr.octets()),
            uplink_ifindex: uplink.index,
            family: AF_INET,
            _pad: [0; 3],
            timeouts: self.timeouts,
            netns_cookie: host::netns_cookie()?,
            nat_port_min,
            nat_port_max,
            _pad2: 0,
        };
        maps::config(&self.pins)?
            .set(0, config, 0)
            .context("write the datapath configuration")?;
        let nat_ifaces: Vec<u32> = maps::nat_ifaces(&self.pins)?
            .keys()
            .filter_map(Result::ok)
            .collect();
        self.sync_nat6_addrs(std::iter::once(uplink.index).chain(nat_ifaces))?;
        self.sync_host_addrs()
    }

    /// Records in `NAT6_ADDRS` the IPv6 address NAT66 masquerades to ([`host::nat66_addrs`]) of
    /// each of `ifindexes` (the uplink and the `NAT_IFACES` interfaces: those the NAT programs
    /// are on) that has one, and removes every other entry: a masquerading network's IPv6 flow
    /// routed out of an interface without one is dropped. Nothing to do on pins older than the map (until `netd reload`,
    /// whose follow fills it, the programs running there do no NAT66).
    fn sync_nat6_addrs(&self, ifindexes: impl IntoIterator<Item = u32>) -> Result<()> {
        if !self.pins.map(NAT6_ADDRS_MAP).exists() {
            return Ok(());
        }
        let addrs = host::nat66_addrs()?;
        let wanted: HashMap<u32, Ipv6Addr> = ifindexes
            .into_iter()
            .filter_map(|index| Some((index, *addrs.get(&index)?)))
            .collect();
        let mut map = maps::nat6_addrs(&self.pins)?;
        let stale: Vec<u32> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|index| !wanted.contains_key(index))
            .collect();
        for index in stale {
            map.remove(&index)
                .with_context(|| format!("stop NAT66 through interface {index}"))?;
        }
        for (&index, &ip) in &wanted {
            let value = maps::nat6_iface(ip);
            if map.get(&index, 0).ok() != Some(value) {
                map.insert(index, value, 0)
                    .with_context(|| format!("NAT66 through interface {index} to {ip}"))?;
            }
        }
        Ok(())
    }

    /// Mirrors the host's addresses into `HOST_ADDRS` and `HOST_ADDRS6` (where wildcard
    /// published ports are reached): adds the new ones, removes those gone.
    fn sync_host_addrs(&self) -> Result<()> {
        let (mut v4, mut v6) = (HashMap::new(), HashMap::new());
        for ip in host::host_addrs()? {
            match ip {
                IpAddr::V4(v) => v4.insert(u32::from_ne_bytes(v.octets()), ip),
                IpAddr::V6(v) => v6.insert(addr_v6(v.octets()), ip),
            };
        }
        mirror(&mut maps::host_addrs(&self.pins)?, v4)
            .context("mirror the host's IPv4 addresses")?;
        mirror(&mut maps::host_addrs6(&self.pins)?, v6).context("mirror the host's IPv6 addresses")
    }
}

/// Makes the keys of set `map` those of `current` (each with the address it stands for).
fn mirror<K: aya::Pod + Eq + std::hash::Hash>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, u8>,
    current: HashMap<K, IpAddr>,
) -> Result<()> {
    let mirrored: HashSet<K> = map.keys().filter_map(Result::ok).collect();
    for gone in mirrored.iter().filter(|k| !current.contains_key(k)) {
        let _ = map.remove(gone);
    }
    for (new, ip) in current.iter().filter(|(k, _)| !mirrored.contains(k)) {
        map.insert(new, 1, 0).with_context(|| format!("add {ip}"))?;
    }
    Ok(())
}

impl Datapath for EbpfDatapath {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn setup_network(&self, net: &NetworkSpec) -> Result<()> {
        let uplink = host::find_uplink()?;
        // Loading pins the maps (or reuses the pinned ones) before anything is written.
        let mut ebpf = self.pins.load_sized(self.conntrack_max)?;
        let mut networks = maps::networks(&self.pins)?;
        if networks.get(&net.id, 0).is_ok() {
            bail!("network {} (id {}) is already set up", net.name, net.id);
        }
        let first = networks.keys().next().is_none();
        let attached = self
            .attach_nat_programs(&mut ebpf, &uplink.name)
            .and_then(|()| self.attach_uplink_xdp(&mut ebpf, &uplink.name))
            .and_then(|()| self.attach_host_sockets(&mut ebpf))
            .and_then(|()| self.write_config(&uplink))
            .and_then(|()| self.set_limit(maps::network_limit_key(net.id), net.conntrack_limit))
            .and_then(|()| {
                maps::subnets(&self.pins)?
                    .insert(&maps::subnet_key(net), net.id, 0)
                    .with_context(|| format!("add the subnet of network {}", net.name))
            })
            .and_then(|()| {
                networks
                    .insert(net.id, maps::network_info(net), 0)
                    .with_context(|| format!("add network {}", net.name))
            })
            .and_then(|()| {
                let Some(info6) = maps::network6_info(net) else {
                    return Ok(());
                };
                maps::networks6(&self.pins)?
                    .insert(net.id, info6, 0)
                    .with_context(|| format!("add the IPv6 side of network {}", net.name))?;
                maps::subnets6(&self.pins)?
                    .insert(&maps::subnet6_key(&info6), net.id, 0)
                    .with_context(|| format!("add the IPv6 subnet of network {}", net.name))
            })
            .and_then(|()| self.attach_bridge_program(&mut ebpf, &net.bridge))
            .and_then(|()| self.follow(&mut Object::Given(&mut ebpf)).map(drop));
        if let Err(e) = attached {
            let _ = networks.remove(&net.id);
            self.forget_network6(net);
            self.forget_limit(&maps::network_limit_key(net.id));
            self.forget_subnet(net);
            if first {
                let _ = self.detach_host();
            }
            return Err(e);
        }
        Ok(())
    }

    fn teardown_network(&self, net: &NetworkSpec) -> Result<()> {
        let mut networks = maps::networks(&self.pins)?;
        networks
            .get(&net.id, 0)
            .with_context(|| format!("network {} (id {}) is not set up", net.name, net.id))?;
        // The containers first, the network's entry last: until then the programs still know
        // the network (one whose network is gone gets nothing through).
        let mut endpoints = maps::endpoints(&self.pins)?;
        let stale: Vec<_> = endpoints
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, ep)| ep.network_id == net.id)
            .collect();
        for (key, ep) in stale {
            endpoints.remove(&key)?;
            // A dual-stack container's IPv6 entry goes with its IPv4 one.
            if key.family == AF_INET6 {
                continue;
            }
            self.detach_endpoint(ep.ifindex)?;
            self.forget_limit(&maps::container_limit_key(Ipv4Addr::from(v4_octets(
                &key.addr,
            ))));
        }
        let mut published = maps::published(&self.pins)?;
        let stale: Vec<_> = published
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, target)| target.network_id == net.id)
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            published.remove(&key)?;
        }
        let mut allow = maps::publish_allow(&self.pins)?;
        let stale: Vec<_> = allow
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                let target = &k.data().target;
                match k.data().family {
                    AF_INET6 => net
                        .subnet6
                        .is_some_and(|s| s.contains(&Ipv6Addr::from(v6_octets(target)))),
                    _ => net.subnet.contains(&Ipv4Addr::from(v4_octets(target))),
                }
            })
            .collect();
        for key in stale {
            allow.remove(&key)?;
        }
        networks.remove(&net.id)?;
        self.forget_subnet(net);
        self.forget_network6(net);
        let subnets = std::iter::once(net.subnet.into()).chain(net.subnet6.map(Into::into));
        conntrack::flush_networks(&self.pins, &subnets.collect::<Vec<_>>())?;
        self.forget_limit(&maps::network_limit_key(net.id));
        self.pins
            .detach_tc(BRIDGE_INGRESS_PROG, &net.bridge, TcAttachType::Ingress)?;
        if networks.keys().next().is_none() {
            self.detach_host()?;
        }
        Ok(())
    }

    fn add_endpoint(&self, net: &NetworkSpec, ep: &EndpointSpec) -> Result<()> {
        let mut endpoints = maps::endpoints(&self.pins)?;
        let key = maps::endpoint_key(ep.ip);
        let key6 = ep.ip6.map(maps::endpoint_key6);
        // Both checked before anything is added: the rollback below removes both keys.
        if endpoints.get(&key, 0).is_ok() {
            bail!("endpoint {} is already on a network", ep.ip);
        }
        if let (Some(key6), Some(ip6)) = (key6, ep.ip6)
            && endpoints.get(&key6, 0).is_ok()
        {
            bail!("endpoint {ip6} is already on a network");
        }
        endpoints
            .insert(key, maps::endpoint_info(ep), 0)
            .with_context(|| {
                format!("add endpoint {} of {} to {}", ep.ip, ep.container, net.name)
            })?;
        let limit_key = maps::container_limit_key(ep.ip);
        let policed = self
            .add_endpoint6(&mut endpoints, key6, ep)
            .and_then(|()| self.set_limit(limit_key, ep.conntrack_limit))
            .and_then(|()| self.add_policy(net, ep))
            .and_then(|()| self.attach_endpoint_programs(&ep.host_ifname));
        if let Err(e) = policed {
            self.forget_limit(&limit_key);
            self.remove_policy(ep);
            for key in std::iter::once(key).chain(key6) {
                let _ = endpoints.remove(&key);
            }
            return Err(e);
        }
        Ok(())
    }

    fn remove_endpoint(&self, net: &NetworkSpec, ep: &EndpointSpec) -> Result<()> {
        let mut endpoints = maps::endpoints(&self.pins)?;
        endpoints
            .remove(&maps::endpoint_key(ep.ip))
            .with_context(|| format!("endpoint {} is not on {}", ep.ip, net.name))?;
        // Its IPv6 entry goes with it; one that can't be removed is reported once the rest is.
        let ipv6_gone = ep.ip6.map_or(Ok(()), |ip6| {
            endpoints
                .remove(&maps::endpoint_key6(ip6))
                .with_context(|| format!("endpoint {ip6} is not on {}", net.name))
        });
        // The programs stay on the veth, off the bridge and down or gone by now, until it is
        // deleted: detaching them from a live device waits for an RCU grace period each
        // (about 10 ms here), from one being deleted it doesn't.
        self.remove_policy(ep);
        self.forget_limit(&maps::container_limit_key(ep.ip));
        // The address may go to another container: its flows and counts must not follow.
        stats::forget_endpoint(&self.pins, ep.ip)?;
        let addrs = std::iter::once(IpAddr::V4(ep.ip)).chain(ep.ip6.map(IpAddr::V6));
        conntrack::flush_addresses(&self.pins, &addrs.collect::<Vec<_>>())?;
        ipv6_gone
    }

    fn publish(&self, net: &NetworkSpec, ports: &[PortSpec]) -> Result<()> {
        let mut published = maps::published(&self.pins)?;
        for (done, port) in ports.iter().enumerate() {
            if let Err(e) = self.publish_port(&mut published, net, port) {
                for port in &ports[..done] {
                    for (key, _) in maps::published_entries(port) {
                        let _ = published.remove(&key);
                    }
                    self.forget_sources(port);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn unpublish(&self, net: &NetworkSpec, ports: &[PortSpec]) -> Result<()> {
        let mut published = maps::published(&self.pins)?;
        let mut missing = Vec::new();
        for port in ports {
            let entries = maps::published_entries(port);
            if entries.is_empty() {
                missing.push(describe(port));
            }
            // Each family's side, whatever became of the other's.
            for (key, _) in entries {
                if published.remove(&key).is_err() {
                    missing.push(describe_side(port, &key));
                }
            }
            self.forget_sources(port);
        }
        if !missing.is_empty() {
            bail!("not published on {}: {}", net.name, missing.join(", "));
        }
        Ok(())
    }

    /// The bridge program redirects hairpin packets to the container's veth itself.
    fn bridge_hairpin(&self) -> bool {
        false
    }
}

/// `e`, or when it says map `name` has no room left: that, naming its limit of `max` `what`.
fn map_full_or(e: aya::maps::MapError, name: &str, max: u32, what: &str) -> anyhow::Error {
    match &e {
        aya::maps::MapError::SyscallError(aya::sys::SyscallError { io_error, .. })
            if io_error.raw_os_error() == Some(libc::E2BIG) =>
        {
            anyhow::anyhow!("the eBPF datapath's {name} map is full ({max} {what})")
        }
        _ => e.into(),
    }
}

/// `tcp 198.18.0.2:8080` or `udp *:53`.
fn describe(port: &PortSpec) -> String {
    let proto = match port.proto {
        super::Protocol::Tcp => "tcp",
        super::Protocol::Udp => "udp",
    };
    match port.host_ip {
        Some(ip) => format!("{proto} {}", std::net::SocketAddr::new(ip, port.host_port)),
        None => format!("{proto} *:{}", port.host_port),
    }
}

/// [`describe`], saying which side of a port published on any address `key` is (`udp *:53
/// over IPv6`).
fn describe_side(port: &PortSpec, key: &netd_common::datapath::PublishedKey) -> String {
    match (port.host_ip, key.family) {
        (None, AF_INET6) => format!("{} over IPv6", describe(port)),
        _ => describe(port),
    }
}
