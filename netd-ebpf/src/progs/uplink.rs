//! The two NAT programs, on the host's uplink and on every other interface of the host that
//! routes out (a second NIC, a VPN: `NAT_IFACES`), each masquerading to its own interface's
//! address. Each packet goes parse → conntrack → nat:
//!
//! - egress (leaving the host): a packet of a tracked flow gets its direction's rewrite
//!   (masqueraded flows: source → host:port; published-port replies: source → host:published
//!   port); a new flow from a container of a masquerading network is masqueraded to the
//!   address of the interface it leaves through (dropped, `unmasqueraded`, on an interface
//!   netd has no address for; `martian` when it came into the host elsewhere than through
//!   the container's veth or bridge).
//! - ingress (arriving from outside): a packet of a tracked flow gets its rewrite (replies to
//!   masqueraded flows: destination → container); a new flow is decided by `lib::inbound`: to a
//!   published port it is DNATed to the container, straight to a container it is mostly
//!   dropped. A packet translated to a container goes straight into its namespace (`fib`),
//!   else the host stack routes it to the container's bridge. `uplink_xdp` (optional) makes
//!   the same drops earlier.
//!
//! ICMP errors (destination unreachable, time exceeded) about a tracked flow are translated
//! with the packet they quote, in both directions.
//!
//! IPv6 goes the same way in programs of its own (`uplink_egress6`, `uplink_ingress6`,
//! reached by a tail call): NAT66, masquerading to the interface's IPv6 address
//! (`NAT6_ADDRS`), ports published over IPv6 DNATed, ICMPv6 errors (Packet Too Big above
//! all) translated, fragmented datagrams as IPv4's; translated packets take the same fast
//! path into the container's namespace.
//!
//! Fail closed: a packet to a container of a masquerading or internal network that is not
//! translated here (it can't be parsed, an ICMP error about no flow of it, a refused new flow)
//! is dropped with the reason, and so is one leaving with the source of such a container: no
//! packet leaves with a masqueraded container's private address. Everything else
//! (the host's own traffic, routed networks) passes untouched. A packet translated to a
//! container that the fast path can't deliver is marked (`MARK_ADMITTED`) for the program on
//! the container's veth, which lets nothing else in from beyond its network.

use aya_ebpf::{
    macros::{classifier, map},
    maps::ProgramArray,
    programs::TcContext,
};
use netd_common::datapath::{
    Addr, CT_NAT_SNAT, Config, CtKey, MARK_ADMITTED, NET_INTERNAL, NET_MASQUERADE, Stat,
};

use crate::lib::{
    conntrack::{self, Path, v4},
    events::{self, Tuple, Tuple6},
    fib, frag,
    inbound::{Inbound, inbound},
    ipv6, maps, nat,
    nat66::{self, Drop6, Flow6, Rewrite6},
    parse::{self, Flow, Frame as _, L3_OFF, Quoted},
    stats,
    verdict::{dropped, now_ns, verdict},
};
use network_types::eth::EtherType;

/// The IPv6 programs, in `NAT66_PROGS`.
const EGRESS6: u32 = 0;
const INGRESS6: u32 = 1;

/// NAT66's programs: the IPv4 ones hand an IPv6 packet over with a tail call (the IPv4 path
/// pays nothing for it, and each program has a stack of its own: together they would not
/// fit the 512 bytes one has). Filled by userspace before the IPv4 programs are attached.
#[map]
static NAT66_PROGS: ProgramArray = ProgramArray::pinned(2, 0);

#[classifier]
pub fn uplink_egress(ctx: TcContext) -> i32 {
    verdict(egress(&ctx))
}

#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    let outcome = ingress(&ctx);
    deliver(&ctx, outcome, fib::deliver_to_container)
}

/// The action for a packet that came in with `outcome`: one translated to a container goes
/// straight into its namespace (`to_container`, the fast path) or, where that can't take it,
/// is marked for the program on the container's veth and left to the stack.
#[inline(always)]
fn deliver(ctx: &TcContext, outcome: Stat, to_container: fn(&TcContext) -> Option<i32>) -> i32 {
    if matches!(outcome, Stat::SnatHit | Stat::DnatNew | Stat::DnatHit) {
        if let Some(action) = to_container(ctx) {
            stats::count(outcome);
            stats::count(Stat::FastPathIn);
            return action;
        }
        admit(ctx);
    } else if outcome == Stat::IcmpError {
        admit(ctx);
    }
    verdict(outcome)
}

/// Marks a packet translated towards a container, for the program on its veth: the stack
/// delivers it (the mark goes no further: crossing into the container's namespace clears it).
#[inline(always)]
fn admit(ctx: &TcContext) {
    // SAFETY: the context's skb pointer is valid for the whole program run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | MARK_ADMITTED);
}

/// A parsed packet that belongs to no tracked flow: the direction decides whether it starts one.
struct Untracked {
    flow: Flow,
    cfg: &'static Config,
    key: CtKey,
    now: u64,
}

/// What both directions do first: parse the packet, then translate ICMP errors about tracked
/// flows and packets of tracked flows. `Err` is the finished packet's outcome.
#[inline(always)]
fn translate_tracked(ctx: &TcContext, path: Path) -> Result<Untracked, Stat> {
    let flow = match parse::ipv4_flow(ctx) {
        Ok(flow) => flow,
        Err(Stat::NotIpv4) if ipv6::is_untagged_frame(ctx) => return Err(hand_to_nat66(ctx, path)),
        Err(reason) => return Err(untranslatable(ctx, reason, path)),
    };
    let cfg = maps::config().ok_or(Stat::NoNat)?;
    let now = now_ns();
    if let Some(quoted) = &flow.quoted {
        return Err(icmp_error(ctx, &flow, quoted, now, cfg, path));
    }
    let key = conntrack::key_of(&flow);
    if let Some(hit) = conntrack::track(ctx, &key, &flow, now, cfg, path).map(conntrack::hit_of) {
        return Err(rewrite(ctx, &flow, &hit.rewrite, hit_stat(hit.nat)));
    }
    Ok(Untracked {
        flow,
        cfg,
        key,
        now,
    })
}

#[inline(always)]
fn egress(ctx: &TcContext) -> Stat {
    let Untracked {
        flow,
        cfg,
        key,
        now,
    } = match translate_tracked(ctx, Path::Out) {
        Ok(untracked) => untracked,
        Err(outcome) => return outcome,
    };
    let Some(ep) = maps::endpoint(flow.saddr) else {
        return Stat::NoNat;
    };
    // A container whose network is gone (being removed): what its network was is unknown.
    let Some(flags) = maps::network(ep.network_id).map(|net| net.flags) else {
        return dropped(ctx, &flow, Stat::NoEndpoint, flow.saddr);
    };
    if flags & NET_INTERNAL != 0 {
        return dropped(ctx, &flow, Stat::Internal, flow.saddr);
    }
    if flags & NET_MASQUERADE == 0 {
        return Stat::NoNat;
    }
    if !entered_from_container(ctx, ep.ifindex) {
        return dropped(ctx, &flow, Stat::Martian, flow.saddr);
    }
    // A flow starts only where netd knows the interface's address: anywhere else it would
    // leave with the container's private source.
    let Some(nat_addr) =
        maps::masquerade_addr(ctx.ifindex(), cfg).filter(|_| conntrack::may_start_flow(&flow))
    else {
        return dropped(ctx, &flow, Stat::Unmasqueraded, flow.saddr);
    };
    match conntrack::start_snat(ctx, &key, &flow, flow.saddr, v4(nat_addr), now, cfg) {
        Ok(port) => {
            let rw = nat::Rewrite {
                src: true,
                addr: nat_addr,
                port,
            };
            rewrite(ctx, &flow, &rw, Stat::SnatNew)
        }
        Err(reason) => dropped(ctx, &flow, reason, flow.saddr),
    }
}

/// Whether a packet with a container's source came into the host where that container's
/// packets do: its host-side veth `veth` (the fast path out) or its network's bridge (the
/// stack's path; the veth is its port, looked up only then), whose program checked the
/// source; or from no interface (the host's own, or a fragment the host cut: fragments don't
/// keep the way in). Come in anywhere else (an interface without netd's programs), the source
/// is spoofed, and a flow masqueraded in the container's name would bring the answers into the
/// container.
#[inline(always)]
fn entered_from_container(ctx: &TcContext, veth: u32) -> bool {
    // SAFETY: the context's skb pointer is valid for the whole program run.
    let way_in = unsafe { (*ctx.skb.skb).ingress_ifindex };
    way_in == 0
        || way_in == veth
        || maps::veth(veth).is_some_and(|info| info.bridge_ifindex == way_in)
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> Stat {
    let Untracked {
        flow,
        cfg,
        key,
        now,
    } = match translate_tracked(ctx, Path::In) {
        Ok(untracked) => untracked,
        Err(outcome) => return outcome,
    };
    // A container's address (any of a container subnet) as the source of a packet from
    // outside is spoofed: routed back out, it would start a masqueraded flow in the
    // container's name, whose replies reach the container.
    if maps::in_container_subnet(flow.saddr) {
        return dropped(ctx, &flow, Stat::Martian, flow.saddr);
    }
    let target = match inbound(&flow, cfg) {
        Inbound::Published(target) => target,
        Inbound::Refused(reason, container) => return dropped(ctx, &flow, reason, container),
        Inbound::Stack => return Stat::NoNat,
    };
    if !conntrack::may_start_flow(&flow) {
        return dropped(ctx, &flow, Stat::Unsolicited, target.addr[0]);
    }
    match conntrack::start_dnat(ctx, &key, &flow, &target, target.addr[0], now, cfg) {
        Ok(()) => {
            let rw = nat::Rewrite {
                src: false,
                addr: target.addr[0],
                port: target.port,
            };
            rewrite(ctx, &flow, &rw, Stat::DnatNew)
        }
        Err(reason) => dropped(ctx, &flow, reason, target.addr[0]),
    }
}

/// An ICMP error about a tracked flow, translated as the flow's packets in its direction.
#[inline(always)]
fn icmp_error(
    ctx: &TcContext,
    flow: &Flow,
    q: &Quoted,
    now: u64,
    cfg: &Config,
    path: Path,
) -> Stat {
    if let Some(reason) = forged_error(flow.saddr, q.daddr, path) {
        return dropped(ctx, flow, reason, flow.saddr);
    }
    let key = conntrack::quoted_key(q);
    let Some(hit) = conntrack::flow_of_error(&key, now, cfg, path).map(conntrack::hit_of) else {
        return untranslatable(ctx, Stat::IcmpNoFlow, path);
    };
    match nat::apply_icmp_error(ctx, flow, q, &hit.rewrite) {
        Ok(()) => Stat::IcmpError,
        Err(reason) => reason,
    }
}

/// Why an ICMP error from `saddr` about a packet sent to `quoted_daddr` can't be genuine on
/// `path`, if it can't: from outside, a source in a container subnet is spoofed (`martian`);
/// going out, a container reports only on packets it got itself, not on another container's
/// flows (`icmp_no_flow`). The host's own errors go on.
#[inline(always)]
fn forged_error(saddr: u32, quoted_daddr: u32, path: Path) -> Option<Stat> {
    match path {
        Path::In if maps::in_container_subnet(saddr) => Some(Stat::Martian),
        Path::Out if saddr != quoted_daddr && maps::endpoint(saddr).is_some() => {
            Some(Stat::IcmpNoFlow)
        }
        _ => None,
    }
}

/// Applies `rw`; a failure drops the packet and counts it against its container (the
/// source of a rewritten source, the new destination of a rewritten destination).
#[inline(always)]
fn rewrite(ctx: &TcContext, flow: &Flow, rw: &nat::Rewrite, done: Stat) -> Stat {
    match nat::apply(ctx, flow, rw) {
        Ok(()) => {
            frag::remember(flow);
            done
        }
        Err(reason) => dropped(ctx, flow, reason, if rw.src { flow.saddr } else { rw.addr }),
    }
}

#[inline(always)]
fn hit_stat(nat: u8) -> Stat {
    if nat == CT_NAT_SNAT {
        Stat::SnatHit
    } else {
        Stat::DnatHit
    }
}

/// A packet NAT can't translate, for `reason`: dropped when it goes to a container of a
/// masquerading or internal network (coming in) or comes from one (going out), where passing
/// it would reach the container unchecked or leak its private address; else the stack's.
/// Tagged frames are judged by what they carry, IPv6 as well: the stack strips priority tags
/// and routes what they carry. One with more tags than are read is dropped: what it carries,
/// and whose it is, is unknown.
#[inline(always)]
fn untranslatable(ctx: &TcContext, reason: Stat, path: Path) -> Stat {
    let not_nat = if reason == Stat::NotIpv4 {
        reason
    } else {
        Stat::NoNat
    };
    let Some((ether_type, l3)) = parse::carried(ctx) else {
        return not_nat;
    };
    if ether_type == EtherType::Ipv6 as u16 {
        return untranslatable6(ctx, reason, path, l3);
    }
    if parse::is_vlan_tag(ether_type) {
        return Stat::Vlan;
    }
    let Some((saddr, daddr)) = (ether_type == EtherType::Ipv4 as u16)
        .then(|| parse::ipv4_ends_at(ctx, l3))
        .flatten()
    else {
        return not_nat;
    };
    let container = if path == Path::In { daddr } else { saddr };
    if !maps::is_sealed(container) {
        return Stat::NoNat;
    }
    let reason = untranslatable_reason(reason, path);
    let tuple = Tuple {
        saddr,
        daddr,
        ..Tuple::default()
    };
    events::dropped(&tuple, reason, container, ctx.ifindex())
}

/// Hands an IPv6 packet to NAT66's program for `path`. Returns only if that fails (the
/// slot is empty: userspace fills it before attaching these programs): then the packet is
/// dropped, as nothing checks it.
#[inline(always)]
fn hand_to_nat66(ctx: &TcContext, path: Path) -> Stat {
    let slot = if path == Path::Out { EGRESS6 } else { INGRESS6 };
    // SAFETY: a tail call with this program's own context.
    unsafe { NAT66_PROGS.tail_call(ctx, slot) };
    Stat::Ipv6
}

#[classifier]
pub fn uplink_egress6(ctx: TcContext) -> i32 {
    verdict(translate6(&ctx, Path::Out))
}

#[classifier]
pub fn uplink_ingress6(ctx: TcContext) -> i32 {
    let outcome = translate6(&ctx, Path::In);
    deliver(&ctx, outcome, fib::deliver6_to_container)
}

/// Why an untranslatable packet of a container is dropped: an ICMP error leaving about no
/// flow of it would leave with its own address, `unmasqueraded` as any such packet.
#[inline(always)]
fn untranslatable_reason(reason: Stat, path: Path) -> Stat {
    if path == Path::Out && reason == Stat::IcmpNoFlow {
        Stat::Unmasqueraded
    } else {
        reason
    }
}

/// NAT66: an IPv6 packet in either direction, as IPv4's. A tracked flow's packets and ICMPv6
/// errors about it are translated; a new flow leaving from a masquerading network's container
/// is masqueraded to the interface's IPv6 address; a new flow from outside is decided by
/// [`inbound6`]. The rest (the host's own, routed networks') is the stack's.
///
/// Each step is a function of its own (a BPF-to-BPF call) called from here, the packet parsed
/// into a per-CPU slot, and drops reported here: inlined or nested, the steps' stack frames
/// would add up to more than the 512 bytes a program has.
#[inline(always)]
fn translate6(ctx: &TcContext, path: Path) -> Stat {
    let Some(flow) = nat66::scratch() else {
        return Stat::NoNat;
    };
    if let Err(reason) = nat66::parse_into(ctx, flow) {
        return untranslatable6(ctx, reason, path, L3_OFF);
    }
    let outcome = if flow.quoted.is_some() {
        icmp_error6(ctx, flow, path)
    } else if let Some(outcome) = tracked6(ctx, flow, path) {
        outcome
    } else if path == Path::In && maps::in_container_subnet6(&flow.saddr) {
        // Spoofed, as IPv4's container-subnet sources (`ingress`).
        Err(Drop6 {
            reason: Stat::Martian,
            container: flow.saddr[0],
        })
    } else if !flow.has_l4_header() {
        // A later fragment whose flow ended since its first fragment: it starts none.
        Ok(untranslatable6(ctx, Stat::Fragment, path, L3_OFF))
    } else if path == Path::Out {
        masquerade6(ctx, flow)
    } else {
        inbound6(ctx, flow)
    };
    outcome.unwrap_or_else(|drop| nat66::dropped(ctx, flow, drop))
}

/// A packet of a tracked IPv6 flow, translated; `None` for one of no flow.
#[inline(never)]
fn tracked6(ctx: &TcContext, flow: &Flow6, path: Path) -> Option<Result<Stat, Drop6>> {
    let cfg = maps::config()?;
    let entry = conntrack::track(ctx, &nat66::key_of(flow), flow, now_ns(), cfg, path)?;
    Some(rewrite6(
        ctx,
        flow,
        &nat66::rewrite_of(entry),
        hit_stat(entry.nat),
    ))
}

/// A new IPv6 flow leaving: masqueraded when it is from a masquerading network's container,
/// where netd knows the interface's IPv6 address (dropped anywhere else: it would leave with
/// the container's own source).
#[inline(never)]
fn masquerade6(ctx: &TcContext, flow: &Flow6) -> Result<Stat, Drop6> {
    let Some((cfg, ep)) = maps::config().zip(maps::endpoint6(flow.saddr)) else {
        return Ok(Stat::NoNat);
    };
    let Some(from) = maps::veth(ep.ifindex) else {
        return Ok(Stat::NoNat);
    };
    let container = from.addr[0];
    let refused = |reason| Err(Drop6 { reason, container });
    if from.net_flags & NET_INTERNAL != 0 {
        return refused(Stat::Internal);
    }
    if from.net_flags & NET_MASQUERADE == 0 {
        return Ok(Stat::NoNat);
    }
    if !entered_from_container(ctx, ep.ifindex) {
        return refused(Stat::Martian);
    }
    let Some(nat_addr) =
        maps::masquerade_addr6(ctx.ifindex()).filter(|_| conntrack::may_start_flow(flow))
    else {
        return refused(Stat::Unmasqueraded);
    };
    let key = nat66::key_of(flow);
    match conntrack::start_snat(ctx, &key, flow, container, nat_addr, now_ns(), cfg) {
        Ok(port) => {
            let rw = Rewrite6 {
                src: true,
                addr: nat_addr,
                port,
            };
            rewrite6(ctx, flow, &rw, Stat::SnatNew)
        }
        Err(reason) => refused(reason),
    }
}

/// A new IPv6 flow from outside, decided as [`inbound`] decides IPv4's: to a port published
/// on its destination (or on every address, the destination one of the host's) it is DNATed
/// to the container, unless the container's network is internal, the source outside the
/// port's `--publish-allow` ranges or a martian; else, to a container of a masquerading or
/// internal network it is dropped; the stack routes the rest.
#[inline(never)]
fn inbound6(ctx: &TcContext, flow: &Flow6) -> Result<Stat, Drop6> {
    let (Some(cfg), Some(target)) = (
        maps::config(),
        maps::published_to6(ctx, &flow.daddr, flow.dport, flow.proto, false),
    ) else {
        return refuse_inbound6(flow);
    };
    let Some(to) = maps::container6(target.addr) else {
        return Err(Drop6 {
            reason: Stat::NoEndpoint,
            container: 0,
        });
    };
    let container = to.addr[0];
    let refused = |reason| Err(Drop6 { reason, container });
    if to.net_flags & NET_INTERNAL != 0 {
        return refused(Stat::Internal);
    }
    if !maps::publish_allows6(&target, flow.proto, flow.saddr) {
        return refused(Stat::PublishDenied);
    }
    if martian6(ctx, &flow.saddr) {
        return refused(Stat::Martian);
    }
    if !conntrack::may_start_flow(flow) {
        return refused(Stat::Unsolicited);
    }
    let key = nat66::key_of(flow);
    if let Err(reason) = conntrack::start_dnat(ctx, &key, flow, &target, container, now_ns(), cfg) {
        return refused(reason);
    }
    let rw = Rewrite6 {
        src: false,
        addr: target.addr,
        port: target.port,
    };
    rewrite6(ctx, flow, &rw, Stat::DnatNew)
}

/// Whether `saddr` can't be the source of a packet from outside: one embedding an IPv4
/// address (unspecified and loopback included: an IPv4-mapped source would reach a socket as
/// that IPv4 address), multicast, link-local (never routed), a container's, or one of the
/// host's. Translated to a container, such a packet would make it answer the host or another
/// container.
#[inline(always)]
fn martian6(ctx: &TcContext, saddr: &Addr) -> bool {
    ipv6::embeds_ipv4(saddr)
        || ipv6::is_multicast(saddr)
        || ipv6::is_link_local(saddr)
        || maps::in_container_subnet6(saddr)
        || fib::is_local6(ctx, saddr)
}

/// A new IPv6 flow from outside to no published port: dropped when it is to a container of a
/// masquerading or internal network; the stack routes the rest.
#[inline(always)]
fn refuse_inbound6(flow: &Flow6) -> Result<Stat, Drop6> {
    let Some(to) = maps::container6(flow.daddr) else {
        return Ok(Stat::NoNat);
    };
    let reason = if to.net_flags & NET_INTERNAL != 0 {
        Stat::Internal
    } else if to.net_flags & NET_MASQUERADE != 0 {
        Stat::Unsolicited
    } else {
        return Ok(Stat::NoNat);
    };
    Err(Drop6 {
        reason,
        container: to.addr[0],
    })
}

/// An ICMPv6 error about a tracked flow, translated as the flow's packets in its direction;
/// about no flow, as [`untranslatable6`].
#[inline(never)]
fn icmp_error6(ctx: &TcContext, flow: &Flow6, path: Path) -> Result<Stat, Drop6> {
    let (Some(cfg), Some(q)) = (maps::config(), &flow.quoted) else {
        return Ok(Stat::NoNat);
    };
    if let Some(reason) = forged_error6(&flow.saddr, &q.daddr, path) {
        return Err(Drop6 {
            reason,
            container: flow.saddr[0],
        });
    }
    let Some(entry) = conntrack::flow_of_error(&nat66::quoted_key(q), now_ns(), cfg, path) else {
        return Ok(untranslatable6(ctx, Stat::IcmpNoFlow, path, L3_OFF));
    };
    match nat66::apply_icmp_error(ctx, flow, q, &nat66::rewrite_of(entry)) {
        Ok(()) => Ok(Stat::IcmpError),
        Err(reason) => Ok(reason),
    }
}

/// [`forged_error`] for IPv6 (a container's own address, from outside).
#[inline(always)]
fn forged_error6(saddr: &Addr, quoted_daddr: &Addr, path: Path) -> Option<Stat> {
    match path {
        Path::In if maps::in_container_subnet6(saddr) => Some(Stat::Martian),
        Path::Out if saddr != quoted_daddr && maps::endpoint6(*saddr).is_some() => {
            Some(Stat::IcmpNoFlow)
        }
        _ => None,
    }
}

/// [`rewrite`] for IPv6.
#[inline(always)]
fn rewrite6(ctx: &TcContext, flow: &Flow6, rw: &Rewrite6, done: Stat) -> Result<Stat, Drop6> {
    nat66::apply(ctx, flow, rw)
        .map(|()| {
            flow.remember_ports();
            done
        })
        .map_err(|reason| {
            let end = if rw.src { flow.saddr } else { rw.addr };
            Drop6 {
                reason,
                container: maps::container6(end).map_or(0, |c| c.addr[0]),
            }
        })
}

/// [`untranslatable`] for the IPv6 packet at `l3`: dropped when it goes to (comes from) a
/// container of a masquerading or internal network.
#[inline(never)]
fn untranslatable6(ctx: &TcContext, reason: Stat, path: Path, l3: usize) -> Stat {
    let (Ok(saddr), Ok(daddr)) = (
        ctx.load::<Addr>(l3 + nat66::SRC_IN_IP),
        ctx.load::<Addr>(l3 + nat66::DST_IN_IP),
    ) else {
        return Stat::NoNat;
    };
    let end = if path == Path::In { daddr } else { saddr };
    let Some(container) =
        maps::container6(end).filter(|c| c.net_flags & (NET_MASQUERADE | NET_INTERNAL) != 0)
    else {
        return Stat::NoNat;
    };
    let reason = untranslatable_reason(reason, path);
    let tuple = Tuple6 {
        saddr,
        daddr,
        ..Tuple6::default()
    };
    events::dropped6(&tuple, reason, container.addr[0], ctx.ifindex())
}
