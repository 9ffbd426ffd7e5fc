//! The program on each container's host-side veth, ingress: it sees every frame the container
//! sends, before the bridge. The checks run in the order Docker's FORWARD chain makes them:
//!
//! 1. anti-spoofing: the source MAC, an ARP sender and an IPv4 source are the container's own;
//! 2. another network's containers are out of reach;
//! 3. `--icc=false`: the network's other containers are reachable only along a `--link`
//!    (to the linked container's exposed ports, and its replies from them);
//! 4. `--internal`: nothing leaves the network but to its gateway.
//!
//! A packet to a container of the same network that passes is delivered straight into that
//! container's namespace (`bpf_redirect_peer`), and one routed out of the uplink is sent
//! straight to it (`fib`): the fast path, skipping the bridge and netfilter. Everything else
//! that passes goes on to the bridge (ARP, broadcast, the host). Every drop is counted (per reason and per container) and reported as an event.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_redirect_peer,
    macros::classifier,
    programs::TcContext,
};
use netd_common::datapath::{
    EndpointInfo, IPPROTO_TCP, IPPROTO_UDP, NET_ICC, NET_INTERNAL, Stat, VethInfo,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::lib::{
    events::{self, Tuple},
    fib, maps,
    parse::{Frame as _, L3_OFF},
    policy::{floods, in_subnet, link_allows},
    stats,
};

/// Offsets in an ARP packet for Ethernet/IPv4 of the sender's hardware and protocol address.
const ARP_SHA_OFF: usize = L3_OFF + 8;
const ARP_SPA_OFF: usize = L3_OFF + 14;
/// The fragment offset of an IPv4 header: non-zero for every fragment but the first.
const IPV4_OFFSET_MASK: u16 = 0x1fff;

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
/// the container behind host-side veth `ifindex`, or leaves the network (straight to the
/// uplink when that is where it is routed), or is dropped.
enum Verdict {
    Pass,
    Deliver(u32),
    Leave,
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
        Verdict::Leave => {
            let forwarded =
                maps::config().and_then(|cfg| fib::forward_to_uplink(&ctx, cfg.uplink_ifindex));
            let (action, stat) = forwarded.unwrap_or((TC_ACT_UNSPEC, Stat::PolicyPass));
            stats::count(stat);
            action
        }
        Verdict::Drop(reason, tuple) => {
            stats::count(events::dropped(&tuple, reason, from.addr(), from.ifindex));
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn decide(ctx: &TcContext, from: &Sender) -> Verdict {
    let Some(eth) = ctx.read::<EthHdr>(0) else {
        return not_ipv4(from);
    };
    if eth.src_addr != from.veth.mac {
        return Verdict::Drop(Stat::SpoofedMac, Tuple::default());
    }
    if eth.ether_type == EtherType::Arp as u16 {
        return check_arp(ctx, from);
    }
    // SAFETY: the context's skb pointer is valid for the whole program run.
    let vlan_tagged = unsafe { (*ctx.skb.skb).vlan_present } != 0;
    if eth.ether_type != EtherType::Ipv4 as u16 || vlan_tagged {
        return not_ipv4(from);
    }
    let Some(ip) = ctx.read::<Ipv4Hdr>(L3_OFF) else {
        return not_ipv4(from);
    };
    let tuple = tuple_of(ctx, &ip);
    if tuple.saddr != from.addr() {
        return Verdict::Drop(Stat::SpoofedAddr, tuple);
    }
    match maps::endpoint(tuple.daddr) {
        Some(to) => to_container(from, to, tuple, &eth),
        None => to_elsewhere(from, tuple),
    }
}

/// A frame that is not (parsable, untagged) IPv4 or ARP: without ICC the bridge must not
/// carry it between containers (IPv6 link-local, raw Ethernet, VLANs: netd gives containers
/// IPv4 only); with ICC the bridge and the stack deal with it as with any frame.
#[inline(always)]
fn not_ipv4(from: &Sender) -> Verdict {
    if from.veth.net_flags & NET_ICC == 0 {
        Verdict::Drop(Stat::IccDenied, Tuple::default())
    } else {
        Verdict::Pass
    }
}

/// An ARP packet must announce the container's own MAC and address (0.0.0.0 for a probe).
#[inline(always)]
fn check_arp(ctx: &TcContext, from: &Sender) -> Verdict {
    let (Some(sha), Some(spa)) = (
        ctx.read::<[u8; 6]>(ARP_SHA_OFF),
        ctx.read::<u32>(ARP_SPA_OFF),
    ) else {
        return Verdict::Pass;
    };
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
fn to_container(from: &Sender, to: &EndpointInfo, tuple: Tuple, eth: &EthHdr) -> Verdict {
    if to.network_id != from.veth.network_id {
        return Verdict::Drop(Stat::OtherNetwork, tuple);
    }
    if from.veth.net_flags & NET_ICC == 0 && !link_allows(&tuple) {
        return Verdict::Drop(Stat::IccDenied, tuple);
    }
    if eth.dst_addr == to.mac {
        Verdict::Deliver(to.ifindex)
    } else {
        Verdict::Pass
    }
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
        return Verdict::Drop(Stat::Internal, tuple);
    }
    Verdict::Leave
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
    let later_fragment = u16::from_be_bytes(ip.frags) & IPV4_OFFSET_MASK != 0;
    if (t.proto == IPPROTO_TCP || t.proto == IPPROTO_UDP) && !later_fragment {
        let l4 = L3_OFF + usize::from(ip.vihl & 0x0f) * 4;
        if let Some(ports) = ctx.read::<[u8; 4]>(l4) {
            t.sport = u16::from_be_bytes([ports[0], ports[1]]);
            t.dport = u16::from_be_bytes([ports[2], ports[3]]);
        }
    }
    t
}
