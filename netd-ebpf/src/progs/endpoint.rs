//! The programs on each container's host-side veth.
//!
//! `endpoint_ingress` sees every frame the container sends, before the bridge. Tagged frames
//! and protocols other than IPv4, IPv6 and ARP are dropped; the checks then run in the order
//! Docker's FORWARD chain makes them, for both families:
//!
//! 1. anti-spoofing: the source MAC, an ARP sender and an IP source are the container's own
//!    (IPv6: or link-local, on the link only); neighbour discovery names only its own MAC and,
//!    advertised, its own addresses; no router advertisements or redirects;
//! 2. another network's containers are out of reach;
//! 3. `--icc=false`: the network's other containers are reachable only along a `--link`
//!    (to the linked container's exposed ports, and its replies from them);
//! 4. `--internal`: nothing leaves the network but to its gateway.
//!
//! A packet to a container of the same network that passes is delivered straight into that
//! container's namespace (`bpf_redirect_peer`), and one routed out of the uplink or another
//! interface netd masquerades on is sent straight to it (`fib`): the fast path, skipping the
//! bridge and netfilter. Everything else that passes goes on to the bridge (ARP, neighbour
//! discovery, broadcast, the host). A masquerading network's packet that the FIB routes out
//! of an interface netd doesn't masquerade on (no address, attaching failed) is dropped
//! (`unmasqueraded`): it would leave with the container's private source.
//!
//! IPv6 is checked in a program of its own, `endpoint_ingress6`, which `endpoint_ingress`
//! hands an IPv6 frame over to by tail call (through `ENDPOINT6_PROGS`) once its source MAC
//! and tag are checked: each program has a 512-byte stack, and IPv6's checks with the FIB
//! lookup of its fast path out don't fit on top of IPv4's. Beyond the network, a routed
//! network's IPv6 goes through the stack; a masquerading network's only where the FIB routes
//! it out of an interface netd masquerades IPv6 on (NAT66 on its egress), straight there as
//! IPv4's (the stack's when the fast path can't take it), else it is dropped
//! (`unmasqueraded`). Without `endpoint_ingress6` in its slot, IPv6 is dropped (`ipv6`).
//!
//! `endpoint_egress` is the destination side: what reaches the container other than by the
//! fast paths (see [`endpoint_egress`]).
//!
//! Every drop is counted (per reason and per container) and reported as an event.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_redirect_peer,
    macros::{classifier, map},
    maps::ProgramArray,
    programs::TcContext,
};
use netd_common::datapath::{
    Addr, EndpointInfo, IPPROTO_TCP, IPPROTO_UDP, MARK_ADMITTED, NET_ICC, NET_INTERNAL,
    NET_MASQUERADE, Stat, VethInfo,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::lib::{
    events::{self, Tuple, Tuple6},
    fib::{self, Route, Route6},
    frag,
    ipv6::{self, Packet},
    maps,
    parse::{self, FRAG_FIRST, FRAG_LATER, Frame as _, L3_OFF, is_vlan_tag},
    policy::{floods, in_subnet, link_allows, link_allows6},
    stats,
};

/// The IPv6 program, in `ENDPOINT6_PROGS`.
const INGRESS6: u32 = 0;

/// `endpoint_ingress6`, which `endpoint_ingress` hands IPv6 over to with a tail call (the
/// IPv4 path pays an EtherType check, and each program has its own 512-byte stack). A map of
/// its own rather than a slot of another program array: a pinned program array's entries
/// can't be copied into a bigger one by `netd reload`. Filled by userspace before
/// `endpoint_ingress` is pinned for containers to attach.
#[map]
static ENDPOINT6_PROGS: ProgramArray = ProgramArray::pinned(1, 0);

/// Offset in an ARP packet for Ethernet/IPv4 of the sender's hardware address, followed by
/// its protocol address.
const ARP_SHA_OFF: usize = L3_OFF + 8;

#[derive(Clone, Copy)]
#[repr(C)]
struct ArpSender {
    mac: [u8; 6],
    addr: [u8; 4],
}

/// Which part of its datagram an IPv4 packet is (`parse::FRAG_*`), and the datagram's
/// identification.
struct Datagram {
    frag: u8,
    id: u16,
}

/// The container a frame comes from (one lookup: this runs on every frame a container sends)
/// and its host-side veth.
struct Sender {
    veth: &'static VethInfo,
    ifindex: u32,
}

impl Sender {
    /// The container's address (wire byte order).
    #[inline(always)]
    fn addr(&self) -> u32 {
        self.veth.addr[0]
    }
}

/// What becomes of a frame: it goes on to the bridge, or is delivered into the namespace of
/// the container behind host-side veth `ifindex`, or leaves the network (straight to its
/// interface when netd masquerades there; `masquerade`: only through such an interface), or
/// is IPv6 (`endpoint_ingress6` decides), or is dropped.
enum Verdict {
    Pass,
    Deliver(u32),
    Leave { tuple: Tuple, masquerade: bool },
    Ipv6,
    Drop(Stat, Tuple),
}

/// [`Verdict`] for IPv6: what leaves the network is already redirected to its interface
/// (with the TC action doing it) or goes on to the stack.
enum Verdict6 {
    Pass,
    Deliver(u32),
    Forwarded(i32),
    Drop(Stat, Tuple6),
}

#[classifier]
pub fn endpoint_ingress(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    let Some(veth) = maps::veth(ifindex) else {
        return container_gone();
    };
    let from = Sender { veth, ifindex };
    match decide(&ctx, &from) {
        Verdict::Pass => passed(),
        Verdict::Deliver(peer) => deliver(peer),
        Verdict::Leave { tuple, masquerade } => leave(&ctx, &from, tuple, masquerade),
        Verdict::Ipv6 => hand_to_ingress6(&ctx, &from),
        Verdict::Drop(reason, tuple) => drop_counted(&from, reason, tuple),
    }
}

/// IPv6 from a container, handed over by `endpoint_ingress` (its source MAC and tag
/// checked): the same policy as IPv4's, and the same fast paths.
#[classifier]
pub fn endpoint_ingress6(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    let Some(veth) = maps::veth(ifindex) else {
        return container_gone();
    };
    let from = Sender { veth, ifindex };
    match decide6(&ctx, &from) {
        Verdict6::Pass => passed(),
        Verdict6::Deliver(peer) => deliver(peer),
        Verdict6::Forwarded(action) => {
            stats::count(Stat::FastPathOut);
            action
        }
        Verdict6::Drop(reason, tuple) => drop6_counted(&from, reason, &tuple),
    }
}

/// A frame on the veth of a container netd no longer has (its programs go with the veth,
/// which is off the bridge and down by then): nothing checks it any more, so it is dropped.
#[inline(always)]
fn container_gone() -> i32 {
    stats::count(Stat::NoEndpoint);
    TC_ACT_SHOT
}

/// Hands an IPv6 frame over to `endpoint_ingress6` with a tail call, which doesn't return
/// unless the slot is empty (userspace fills it before this program is pinned): then the frame
/// is dropped, as nothing would check it.
#[inline(always)]
fn hand_to_ingress6(ctx: &TcContext, from: &Sender) -> i32 {
    // SAFETY: a tail call with this program's own context.
    unsafe { ENDPOINT6_PROGS.tail_call(ctx, INGRESS6) };
    drop6_counted(from, Stat::Ipv6, &Tuple6::default())
}

/// A frame the policy lets through, on to the bridge.
#[inline(always)]
fn passed() -> i32 {
    stats::count(Stat::PolicyPass);
    TC_ACT_UNSPEC
}

/// The fast path between two containers of a network: straight into the namespace of the
/// container behind host-side veth `peer`.
#[inline(always)]
fn deliver(peer: u32) -> i32 {
    stats::count(Stat::FastPathLocal);
    // SAFETY: a helper without preconditions; it returns TC_ACT_REDIRECT, or TC_ACT_SHOT
    // when `peer` is not a veth (endpoints are).
    unsafe { bpf_redirect_peer(peer, 0) as i32 }
}

/// A packet routed beyond the network: straight to its interface when netd masquerades there
/// (the fast path), else on to the stack. A masquerading network's packet leaves only through
/// an interface whose egress masquerades it: routed anywhere else, or where the lookup can't
/// say, the stack would send it out with the container's private source, so it is dropped.
#[inline(always)]
fn leave(ctx: &TcContext, from: &Sender, tuple: Tuple, masquerade: bool) -> i32 {
    match fib::route(ctx, from.veth.bridge_ifindex) {
        Route::Out(hop) if maps::masquerades_on(hop.ifindex) => {
            if let Some(action) = fib::forward(ctx, &hop) {
                stats::count(Stat::FastPathOut);
                return action;
            }
        }
        Route::Out(_) | Route::Unknown if masquerade => {
            return drop_counted(from, Stat::Unmasqueraded, tuple);
        }
        Route::Out(_) | Route::Unknown | Route::Stack => {}
    }
    passed()
}

#[inline(always)]
fn drop_counted(from: &Sender, reason: Stat, tuple: Tuple) -> i32 {
    stats::count(events::dropped(&tuple, reason, from.addr(), from.ifindex));
    TC_ACT_SHOT
}

#[inline(always)]
fn drop6_counted(from: &Sender, reason: Stat, tuple: &Tuple6) -> i32 {
    stats::count(events::dropped6(tuple, reason, from.addr(), from.ifindex));
    TC_ACT_SHOT
}

#[inline(always)]
fn decide(ctx: &TcContext, from: &Sender) -> Verdict {
    let Some(eth) = ctx.read::<EthHdr>(0) else {
        return Verdict::Drop(Stat::TruncatedL2, Tuple::default());
    };
    if eth.src_addr != from.veth.mac {
        return Verdict::Drop(Stat::SpoofedMac, ipv4_tuple(ctx, &eth));
    }
    // Tagged frames are nothing a container needs, and the stack would untag a priority tag
    // (VLAN 0) and route what it carries: dropped whatever the tag.
    if ctx.vlan_offloaded() || is_vlan_tag(eth.ether_type) {
        return Verdict::Drop(Stat::Vlan, Tuple::default());
    }
    if eth.ether_type == EtherType::Arp as u16 {
        return check_arp(ctx, from);
    }
    if eth.ether_type == EtherType::Ipv6 as u16 {
        return Verdict::Ipv6;
    }
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return Verdict::Drop(Stat::NotIp, Tuple::default());
    }
    let Some(ip) = ctx.read::<Ipv4Hdr>(L3_OFF) else {
        return Verdict::Drop(Stat::TruncatedL3, Tuple::default());
    };
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return Verdict::Drop(Stat::BadIpHeader, Tuple::default());
    }
    let tuple = tuple_of(ctx, &ip);
    if tuple.saddr != from.addr() {
        return Verdict::Drop(Stat::SpoofedAddr, tuple);
    }
    let datagram = Datagram {
        frag: parse::frag_kind(&ip),
        id: u16::from_be_bytes(ip.id),
    };
    match maps::endpoint(tuple.daddr) {
        Some(to) => to_container(from, to, tuple, &datagram, &eth),
        None => to_elsewhere(from, tuple, &eth),
    }
}

/// An IPv6 frame, checked as IPv4 is: the source is the container's (a link-local source
/// stays on the link, the unspecified one only detects duplicate addresses or reports
/// multicast listening), its neighbour discovery is its own; then by destination. What can't
/// be parsed to its upper-layer header is dropped.
#[inline(always)]
fn decide6(ctx: &TcContext, from: &Sender) -> Verdict6 {
    let Some(eth) = ctx.read::<EthHdr>(0) else {
        return Verdict6::Drop(Stat::TruncatedL2, Tuple6::default());
    };
    let p = match ipv6::parse(ctx) {
        Ok(p) => p,
        Err(reason) => return Verdict6::Drop(reason, Tuple6::default()),
    };
    let tuple = Tuple6::of(&p);
    let owns = |addr: Addr| maps::endpoint6(addr).is_some_and(|ep| ep.ifindex == from.ifindex);
    if !source_allowed6(&p, &from.veth.mac, owns) {
        return Verdict6::Drop(Stat::SpoofedAddr, tuple);
    }
    if let Err(reason) = ipv6::check_nd(ctx, &p, &from.veth.mac, owns) {
        return Verdict6::Drop(reason, tuple);
    }
    // Address resolution and multicast listening go on to the bridge whatever the policy, as
    // ARP does (without them the gateway can't be reached), but only on the link: addressed
    // anywhere else, an internal network's container could send them out through the host.
    // Without ICC, listening is reported to groups only: a listener query or report sent to
    // another container is traffic between the two like any other.
    let listening =
        p.is_mld() && (from.veth.net_flags & NET_ICC != 0 || ipv6::is_multicast(&p.dst));
    if (p.is_neighbour_discovery() || listening) && on_the_link6(from, &p.dst) {
        return Verdict6::Pass;
    }
    if ipv6::is_multicast(&p.dst) || ipv6::is_link_local(&p.dst) {
        return to_link_scope6(from, &eth, tuple);
    }
    match maps::endpoint6(p.dst) {
        Some(to) => to_container6(from, to, &p, &eth, tuple),
        None => to_elsewhere6(ctx, from, &p, &eth, tuple),
    }
}

/// Whether `dst` is on the container's link: link-local, a group of link-local scope, or in
/// its network's IPv6 subnet (the gateway, the other containers).
#[inline(always)]
fn on_the_link6(from: &Sender, dst: &Addr) -> bool {
    ipv6::is_link_scope(dst)
        || maps::network6(from.veth.network_id)
            .is_some_and(|net| ipv6::in_subnet(dst, &net.subnet, net.prefix_len))
}

/// Whether the container may send from `p`'s source: its own address; its own link-local
/// one (the one of its MAC `mac`: netd makes the interface derive it so) on the link only
/// (the stack routes none beyond it); the unspecified one for duplicate address detection
/// and multicast listener reports, before it has an address.
#[inline(always)]
fn source_allowed6(p: &Packet, mac: &[u8; 6], owns: impl Fn(Addr) -> bool) -> bool {
    if ipv6::is_link_local(&p.src) {
        return p.src == ipv6::link_local_of(mac) && ipv6::is_link_scope(&p.dst);
    }
    if ipv6::is_unspecified(&p.src) {
        return ipv6::is_link_scope(&p.dst) && (p.is_neighbour_discovery() || p.is_mld());
    }
    owns(p.src)
}

/// To a link-local address or a multicast group: it stays on the bridge's link. With ICC it
/// goes on to the bridge; without, only to the host (the bridge's MAC): the bridge would
/// flood a group to the other containers.
#[inline(always)]
fn to_link_scope6(from: &Sender, eth: &EthHdr, tuple: Tuple6) -> Verdict6 {
    if addressed_to_bridge(from, eth) {
        Verdict6::Pass
    } else {
        Verdict6::Drop(Stat::IccDenied, tuple)
    }
}

/// [`addressed_within`] for a frame to the gateway, the host or beyond the network: without
/// ICC, only to the bridge's MAC (the network's, from the IPv4 entry IPv6 shares).
#[inline(always)]
fn addressed_to_bridge(from: &Sender, eth: &EthHdr) -> bool {
    from.veth.net_flags & NET_ICC != 0
        || maps::network(from.veth.network_id).is_some_and(|net| eth.dst_addr == net.bridge_mac)
}

/// [`to_container`] for IPv6.
#[inline(always)]
fn to_container6(
    from: &Sender,
    to: &EndpointInfo,
    p: &Packet,
    eth: &EthHdr,
    tuple: Tuple6,
) -> Verdict6 {
    if to.network_id != from.veth.network_id {
        return Verdict6::Drop(Stat::OtherNetwork, tuple);
    }
    if from.veth.net_flags & NET_ICC == 0 && !linked6(p, &tuple) {
        return Verdict6::Drop(Stat::IccDenied, tuple);
    }
    if eth.dst_addr == to.mac {
        return Verdict6::Deliver(to.ifindex);
    }
    if !addressed_within(from, eth, &to.mac) {
        return Verdict6::Drop(Stat::IccDenied, tuple);
    }
    Verdict6::Pass
}

/// Docker's link rules for IPv6 (see [`link_allows6`]); a later fragment by its first
/// fragment's ports, as [`linked`].
#[inline(always)]
fn linked6(p: &Packet, tuple: &Tuple6) -> bool {
    let datagram = frag::key6(p.src, p.dst, p.proto, p.frag_id);
    if p.frag == FRAG_LATER {
        return frag::ports6(&datagram).is_some_and(|(sport, dport)| {
            link_allows6(&Tuple6 {
                sport,
                dport,
                ..Tuple6::of(p)
            })
        });
    }
    let allowed = link_allows6(tuple);
    if allowed && p.frag == FRAG_FIRST {
        frag::remember6(&datagram, p.sport, p.dport);
    }
    allowed
}

/// [`to_elsewhere`] for IPv6 (without ICC, all of it to the bridge's MAC): the gateway is
/// always reachable, the subnet with ICC; beyond
/// it a routed network's packets go to the stack, a masquerading network's only where the
/// stack would send them out masqueraded (straight there, the fast path, when it can; or
/// where the stack answers them itself), an internal network's only to a port published for
/// its own containers on a host address (hairpin).
#[inline(always)]
fn to_elsewhere6(
    ctx: &TcContext,
    from: &Sender,
    p: &Packet,
    eth: &EthHdr,
    tuple: Tuple6,
) -> Verdict6 {
    let Some(net) = maps::network6(from.veth.network_id) else {
        return Verdict6::Drop(Stat::Ipv6, tuple);
    };
    if !addressed_to_bridge(from, eth) {
        return Verdict6::Drop(Stat::IccDenied, tuple);
    }
    if p.dst == net.gateway {
        return Verdict6::Pass;
    }
    if ipv6::in_subnet(&p.dst, &net.subnet, net.prefix_len) {
        return if net.flags & NET_ICC != 0 {
            Verdict6::Pass
        } else {
            Verdict6::Drop(Stat::IccDenied, tuple)
        };
    }
    if net.flags & NET_INTERNAL != 0 {
        if hairpin_within6(ctx, from, p) {
            return Verdict6::Pass;
        }
        return Verdict6::Drop(Stat::Internal, tuple);
    }
    if net.flags & NET_MASQUERADE != 0 {
        return match fib::route6(ctx, from.veth.bridge_ifindex) {
            Route6::Out(hop) if maps::masquerade_addr6(hop.ifindex).is_some() => {
                fib::forward6(ctx, &hop).map_or(Verdict6::Pass, Verdict6::Forwarded)
            }
            Route6::Stack => Verdict6::Pass,
            Route6::Out(_) | Route6::Unknown => Verdict6::Drop(Stat::Unmasqueraded, tuple),
        };
    }
    Verdict6::Pass
}

/// [`hairpin_within`] for IPv6: to a port published on a host address for a container of the
/// same network.
#[inline(always)]
fn hairpin_within6(ctx: &TcContext, from: &Sender, p: &Packet) -> bool {
    maps::published_to6(ctx, &p.dst, p.dport, p.proto, false)
        .is_some_and(|target| target.network_id == from.veth.network_id)
}

/// An ARP packet must announce the container's own MAC and address (0.0.0.0 for a probe).
#[inline(always)]
fn check_arp(ctx: &TcContext, from: &Sender) -> Verdict {
    // The sender's hardware and protocol address, in one read (one bounds check).
    let Some(sender) = ctx.read::<ArpSender>(ARP_SHA_OFF) else {
        return Verdict::Drop(Stat::TruncatedL3, Tuple::default());
    };
    let (sha, spa) = (sender.mac, u32::from_ne_bytes(sender.addr));
    if sha != from.veth.mac {
        return Verdict::Drop(Stat::SpoofedMac, Tuple::default());
    }
    if spa != from.addr() && spa != 0 {
        let tuple = Tuple {
            saddr: spa,
            ..Tuple::default()
        };
        return Verdict::Drop(Stat::SpoofedAddr, tuple);
    }
    Verdict::Pass
}

/// A packet to another container: allowed on the same network when the network has ICC or a
/// link opens the port, then delivered straight into the container when the frame is already
/// addressed to it (it always is after the sender's ARP). Anything else takes the bridge, which
/// forwards by MAC: without ICC only a frame addressed to the container may go (see
/// [`addressed_within`]).
#[inline(always)]
fn to_container(
    from: &Sender,
    to: &EndpointInfo,
    tuple: Tuple,
    datagram: &Datagram,
    eth: &EthHdr,
) -> Verdict {
    if to.network_id != from.veth.network_id {
        return Verdict::Drop(Stat::OtherNetwork, tuple);
    }
    if from.veth.net_flags & NET_ICC == 0 && !linked(&tuple, datagram) {
        return Verdict::Drop(Stat::IccDenied, tuple);
    }
    if eth.dst_addr == to.mac {
        return Verdict::Deliver(to.ifindex);
    }
    if !addressed_within(from, eth, &to.mac) {
        return Verdict::Drop(Stat::IccDenied, tuple);
    }
    Verdict::Pass
}

/// Whether a frame the policy let through may go on to the bridge with its destination MAC:
/// with ICC any; without, only `allowed` (the IP destination's own MAC: the bridge's, or the
/// container's a link reaches). The bridge forwards by MAC alone, so a packet allowed for the
/// gateway or a linked port but addressed to another container's MAC (or to all of them)
/// would reach that container past the policy.
#[inline(always)]
fn addressed_within(from: &Sender, eth: &EthHdr, allowed: &[u8; 6]) -> bool {
    from.veth.net_flags & NET_ICC != 0 || eth.dst_addr == *allowed
}

/// Whether a `--link` lets the packet through: by its ports; a later fragment (no ports) by
/// its first fragment's, remembered when that one was let through, so the whole datagram gets
/// the first fragment's verdict.
#[inline(always)]
fn linked(t: &Tuple, datagram: &Datagram) -> bool {
    if datagram.frag == FRAG_LATER {
        return frag::ports_of(t, datagram.id)
            .is_some_and(|(sport, dport)| link_allows(&Tuple { sport, dport, ..*t }));
    }
    let allowed = link_allows(t);
    if allowed && datagram.frag == FRAG_FIRST {
        frag::remember_ports(t, datagram.id);
    }
    allowed
}

/// A packet to anything but a container: the gateway is always reachable; an internal
/// network reaches nothing outside its subnet. Without ICC all of it goes to the bridge's
/// MAC. A container whose network is gone (being removed) sends nothing.
#[inline(always)]
fn to_elsewhere(from: &Sender, tuple: Tuple, eth: &EthHdr) -> Verdict {
    let Some(net) = maps::network(from.veth.network_id) else {
        return Verdict::Drop(Stat::NoEndpoint, tuple);
    };
    if !addressed_within(from, eth, &net.bridge_mac) {
        return Verdict::Drop(Stat::IccDenied, tuple);
    }
    if tuple.daddr == net.gateway[0] {
        return Verdict::Pass;
    }
    // Without ICC no other address of the subnet, nor a broadcast or multicast group the
    // bridge would flood to the other containers.
    if net.flags & NET_ICC == 0 && (in_subnet(tuple.daddr, net) || floods(tuple.daddr)) {
        return Verdict::Drop(Stat::IccDenied, tuple);
    }
    if in_subnet(tuple.daddr, net) {
        return Verdict::Pass;
    }
    if net.flags & NET_INTERNAL != 0 {
        if hairpin_within(from, &tuple) {
            return Verdict::Pass;
        }
        return Verdict::Drop(Stat::Internal, tuple);
    }
    // The stack doesn't route a broadcast or a multicast group: the bridge floods it to the
    // network (the FIB would answer with the default route).
    if floods(tuple.daddr) {
        return Verdict::Pass;
    }
    Verdict::Leave {
        tuple,
        masquerade: net.flags & NET_MASQUERADE != 0,
    }
}

/// Whether a packet from an `--internal` network's container goes to a port published on the
/// host's address for a container of the same network: hairpin (the bridge's program
/// translates it), which stays within the network, as on the iptables datapath (DNAT first,
/// then the isolation rules see a packet between two of the network's containers).
#[inline(always)]
fn hairpin_within(from: &Sender, t: &Tuple) -> bool {
    let Some(cfg) = maps::config() else {
        return false;
    };
    maps::published(t.daddr, t.dport, t.proto, cfg, false)
        .is_some_and(|target| target.network_id == from.veth.network_id)
}

/// The 5-tuple of an untagged IPv4 frame for a drop event (zero for anything else).
#[inline(always)]
fn ipv4_tuple(ctx: &TcContext, eth: &EthHdr) -> Tuple {
    if eth.ether_type != EtherType::Ipv4 as u16 || ctx.vlan_offloaded() {
        return Tuple::default();
    }
    match ctx.read::<Ipv4Hdr>(L3_OFF) {
        Some(ip) if ip.vihl >> 4 == 4 && ip.vihl & 0x0f >= 5 => tuple_of(ctx, &ip),
        _ => Tuple::default(),
    }
}

/// The addresses and, for TCP and UDP (not a later fragment), the ports of an IPv4 packet.
/// Header options are skipped: the policy needs no more than the ports.
#[inline(always)]
fn tuple_of(ctx: &TcContext, ip: &Ipv4Hdr) -> Tuple {
    let mut t = Tuple {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        proto: ip.proto,
        ..Tuple::default()
    };
    let later_fragment = parse::frag_kind(ip) == FRAG_LATER;
    if (t.proto == IPPROTO_TCP || t.proto == IPPROTO_UDP) && !later_fragment {
        let l4 = L3_OFF + usize::from(ip.vihl & 0x0f) * 4;
        if let Some(ports) = ctx.read::<[u8; 4]>(l4) {
            t.sport = u16::from_be_bytes([ports[0], ports[1]]);
            t.dport = u16::from_be_bytes([ports[2], ports[3]]);
        }
    }
    t
}

/// The destination side, on the veth's egress: every frame towards the container that the
/// fast paths didn't deliver straight into it. From the host itself, from the container's own
/// network (its veths, whose program checked the sender, or its bridge, routed through the
/// gateway) and translated by netd (`MARK_ADMITTED`), a frame gets in; from anywhere else
/// (the uplink without a translation, a second NIC, a VPN, another bridge), only on a routed
/// network (neither masquerading nor internal), IPv4 or IPv6. So the rules hold whatever
/// interface a packet was routed in through.
#[classifier]
pub fn endpoint_egress(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    let Some(veth) = maps::veth(ifindex) else {
        return container_gone();
    };
    let container = veth.addr[0];
    let reason = match admit(&ctx, veth) {
        Ok(()) => {
            stats::count(Stat::ToContainer);
            return TC_ACT_UNSPEC;
        }
        Err(Refused::V4(reason, tuple)) => events::dropped(&tuple, reason, container, ifindex),
        Err(Refused::V6(reason, tuple)) => events::dropped6(&tuple, reason, container, ifindex),
    };
    stats::count(reason);
    TC_ACT_SHOT
}

/// Why a frame is kept from a container, with what was parsed of it.
enum Refused {
    V4(Stat, Tuple),
    V6(Stat, Tuple6),
}

impl From<(Stat, Tuple)> for Refused {
    #[inline(always)]
    fn from((reason, tuple): (Stat, Tuple)) -> Self {
        Refused::V4(reason, tuple)
    }
}

#[inline(always)]
fn admit(ctx: &TcContext, to: &VethInfo) -> Result<(), Refused> {
    // SAFETY: the context's skb pointer is valid for the whole program run.
    let (mark, from_ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ingress_ifindex) };
    // 0: sent by the host itself.
    if mark & MARK_ADMITTED != 0 || from_ifindex == 0 || from_ifindex == to.bridge_ifindex {
        return Ok(());
    }
    if maps::veth(from_ifindex).is_some_and(|from| from.network_id == to.network_id) {
        return Ok(());
    }
    from_beyond(ctx, to)
}

/// A frame from beyond the container's network that netd didn't translate.
#[inline(always)]
fn from_beyond(ctx: &TcContext, to: &VethInfo) -> Result<(), Refused> {
    let Some(eth) = ctx.read::<EthHdr>(0) else {
        return Err((Stat::TruncatedL2, Tuple::default()).into());
    };
    if ctx.vlan_offloaded() || is_vlan_tag(eth.ether_type) {
        return Err((Stat::Vlan, Tuple::default()).into());
    }
    if eth.ether_type == EtherType::Arp as u16 {
        // A bridge port netd doesn't own: address resolution only, nothing is routed by it.
        return Ok(());
    }
    if eth.ether_type == EtherType::Ipv6 as u16 {
        return from_beyond6(ctx, to);
    }
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return Err((Stat::NotIp, Tuple::default()).into());
    }
    if to.net_flags & NET_INTERNAL != 0 {
        return Err((Stat::Internal, ends_of(ctx)).into());
    }
    if to.net_flags & NET_MASQUERADE == 0 {
        return Ok(());
    }
    match parse::ipv4_flow(ctx) {
        Ok(flow) if flow.quoted.is_some() => Err((Stat::IcmpNoFlow, Tuple::of(&flow)).into()),
        Ok(flow) => Err((Stat::Unsolicited, Tuple::of(&flow)).into()),
        Err(reason) => Err((reason, ends_of(ctx)).into()),
    }
}

/// IPv6 from beyond the network: a routed network's (the stack routed it, as IPv4); nothing
/// for an internal one, nor for a masquerading one (what NAT66 translated carries the mark).
#[inline(always)]
fn from_beyond6(ctx: &TcContext, to: &VethInfo) -> Result<(), Refused> {
    let reason = if to.net_flags & NET_INTERNAL != 0 {
        Stat::Internal
    } else if to.net_flags & NET_MASQUERADE != 0 {
        Stat::Unsolicited
    } else {
        return Ok(());
    };
    let tuple = ipv6::parse(ctx).map_or_else(|_| Tuple6::default(), |p| Tuple6::of(&p));
    Err(Refused::V6(reason, tuple))
}

/// The addresses of an IPv4 frame, for a drop event (zero where unreadable).
#[inline(always)]
fn ends_of(ctx: &TcContext) -> Tuple {
    let (saddr, daddr) = parse::ipv4_ends(ctx).unwrap_or_default();
    Tuple {
        saddr,
        daddr,
        ..Tuple::default()
    }
}
