//! The programs on each container's host-side veth.
//!
//! `endpoint_ingress` sees every frame the container sends, before the bridge. Tagged frames,
//! protocols other than IPv4 and ARP (and IPv6 beyond link-local addresses) are dropped; the
//! checks then run in the order Docker's FORWARD chain makes them:
//!
//! 1. anti-spoofing: the source MAC, an ARP sender and an IPv4 source are the container's own;
//! 2. another network's containers are out of reach;
//! 3. `--icc=false`: the network's other containers are reachable only along a `--link`
//!    (to the linked container's exposed ports, and its replies from them);
//! 4. `--internal`: nothing leaves the network but to its gateway.
//!
//! A packet to a container of the same network that passes is delivered straight into that
//! container's namespace (`bpf_redirect_peer`), and one routed out of the uplink or another
//! interface netd masquerades on is sent straight to it (`fib`): the fast path, skipping the
//! bridge and netfilter. Everything else that passes goes on to the bridge (ARP, broadcast,
//! the host). A masquerading network's packet that the FIB routes out of an interface netd
//! doesn't masquerade on (no address, attaching failed) is dropped (`unmasqueraded`): it
//! would leave with the container's private source.
//!
//! `endpoint_egress` is the destination side: what reaches the container other than by the
//! fast paths (see [`endpoint_egress`]).
//!
//! Every drop is counted (per reason and per container) and reported as an event.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_redirect_peer,
    macros::classifier,
    programs::TcContext,
};
use netd_common::datapath::{
    EndpointInfo, IPPROTO_TCP, IPPROTO_UDP, MARK_ADMITTED, NET_ICC, NET_INTERNAL, NET_MASQUERADE,
    Stat, VethInfo,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::lib::{
    events::{self, Tuple},
    fib::{self, Route},
    frag, maps,
    parse::{self, FRAG_FIRST, FRAG_LATER, Frame as _, L3_OFF, is_vlan_tag},
    policy::{floods, in_subnet, link_allows},
    stats,
};

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
/// is dropped.
enum Verdict {
    Pass,
    Deliver(u32),
    Leave { tuple: Tuple, masquerade: bool },
    Drop(Stat, Tuple),
}

#[classifier]
pub fn endpoint_ingress(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    let Some(veth) = maps::veth(ifindex) else {
        // Not (or no longer) a netd container: the bridge decides.
        return TC_ACT_UNSPEC;
    };
    let from = Sender { veth, ifindex };
    match decide(&ctx, &from) {
        Verdict::Pass => {
            stats::count(Stat::PolicyPass);
            TC_ACT_UNSPEC
        }
        Verdict::Deliver(peer) => {
            stats::count(Stat::FastPathLocal);
            // SAFETY: a helper without preconditions; it returns TC_ACT_REDIRECT, or
            // TC_ACT_SHOT when `peer` is not a veth (endpoints are).
            unsafe { bpf_redirect_peer(peer, 0) as i32 }
        }
        Verdict::Leave { tuple, masquerade } => leave(&ctx, &from, tuple, masquerade),
        Verdict::Drop(reason, tuple) => drop_counted(&from, reason, tuple),
    }
}

/// A packet routed beyond the network: straight to its interface when netd masquerades there
/// (the fast path), else on to the stack. A masquerading network's packet leaves only through
/// an interface whose egress masquerades it: routed anywhere else, or where the lookup can't
/// say, the stack would send it out with the container's private source, so it is dropped.
#[inline(always)]
fn leave(ctx: &TcContext, from: &Sender, tuple: Tuple, masquerade: bool) -> i32 {
    match fib::route(ctx) {
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
    stats::count(Stat::PolicyPass);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn drop_counted(from: &Sender, reason: Stat, tuple: Tuple) -> i32 {
    stats::count(events::dropped(&tuple, reason, from.addr(), from.ifindex));
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
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return not_ipv4(ctx, from, eth.ether_type);
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
        None => to_elsewhere(from, tuple),
    }
}

/// A frame that is neither IPv4 nor ARP. Without ICC the bridge must not carry it between
/// containers at all; with ICC only IPv6 between link-local addresses (neighbour discovery,
/// link-local multicast) goes on to the bridge: netd gives containers IPv4 only, so nothing
/// else of theirs may be routed, and other protocols have no business on the network.
#[inline(always)]
fn not_ipv4(ctx: &TcContext, from: &Sender, ether_type: u16) -> Verdict {
    if from.veth.net_flags & NET_ICC == 0 {
        return Verdict::Drop(Stat::IccDenied, Tuple::default());
    }
    if ether_type != EtherType::Ipv6 as u16 {
        return Verdict::Drop(Stat::NotIp, Tuple::default());
    }
    match ctx.read::<Ipv6Hdr>(L3_OFF) {
        Some(ip) if ipv6_link_local_source(&ip.src_addr) && ipv6_on_link(&ip.dst_addr) => {
            Verdict::Pass
        }
        Some(_) => Verdict::Drop(Stat::Ipv6, Tuple::default()),
        None => Verdict::Drop(Stat::TruncatedL3, Tuple::default()),
    }
}

/// fe80::/10, or the unspecified address (duplicate address detection).
#[inline(always)]
fn ipv6_link_local_source(addr: &[u8; 16]) -> bool {
    is_ipv6_link_local(addr) || u128::from_be_bytes(*addr) == 0
}

/// fe80::/10, or a multicast group of link-local scope (ff02::/16).
#[inline(always)]
fn ipv6_on_link(addr: &[u8; 16]) -> bool {
    is_ipv6_link_local(addr) || addr[0] == 0xff && addr[1] & 0x0f == 2
}

#[inline(always)]
fn is_ipv6_link_local(addr: &[u8; 16]) -> bool {
    addr[0] == 0xfe && addr[1] & 0xc0 == 0x80
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
/// addressed to it (it always is after the sender's ARP; anything else takes the bridge).
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
        Verdict::Deliver(to.ifindex)
    } else {
        Verdict::Pass
    }
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
/// network reaches nothing outside its subnet.
#[inline(always)]
fn to_elsewhere(from: &Sender, tuple: Tuple) -> Verdict {
    let Some(net) = maps::network(from.veth.network_id) else {
        return Verdict::Pass;
    };
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
/// network (neither masquerading nor internal), and only IPv4 there. So the rules hold
/// whatever interface a packet was routed in through.
#[classifier]
pub fn endpoint_egress(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    let Some(veth) = maps::veth(ifindex) else {
        return TC_ACT_UNSPEC;
    };
    match admit(&ctx, veth) {
        Ok(()) => {
            stats::count(Stat::ToContainer);
            TC_ACT_UNSPEC
        }
        Err((reason, tuple)) => {
            stats::count(events::dropped(&tuple, reason, veth.addr[0], ifindex));
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn admit(ctx: &TcContext, to: &VethInfo) -> Result<(), (Stat, Tuple)> {
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
fn from_beyond(ctx: &TcContext, to: &VethInfo) -> Result<(), (Stat, Tuple)> {
    let Some(eth) = ctx.read::<EthHdr>(0) else {
        return Err((Stat::TruncatedL2, Tuple::default()));
    };
    if ctx.vlan_offloaded() || is_vlan_tag(eth.ether_type) {
        return Err((Stat::Vlan, Tuple::default()));
    }
    if eth.ether_type == EtherType::Arp as u16 {
        // A bridge port netd doesn't own: address resolution only, nothing is routed by it.
        return Ok(());
    }
    if eth.ether_type == EtherType::Ipv6 as u16 {
        return Err((Stat::Ipv6, Tuple::default()));
    }
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return Err((Stat::NotIp, Tuple::default()));
    }
    if to.net_flags & NET_INTERNAL != 0 {
        return Err((Stat::Internal, ends_of(ctx)));
    }
    if to.net_flags & NET_MASQUERADE == 0 {
        return Ok(());
    }
    match parse::ipv4_flow(ctx) {
        Ok(flow) if flow.quoted.is_some() => Err((Stat::IcmpNoFlow, Tuple::of(&flow))),
        Ok(flow) => Err((Stat::Unsolicited, Tuple::of(&flow))),
        Err(reason) => Err((reason, ends_of(ctx))),
    }
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
