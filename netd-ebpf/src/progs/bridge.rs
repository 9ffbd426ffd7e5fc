//! The programs on each network bridge's ingress: what containers send to the host. Only
//! hairpin traffic is handled here (Docker's hairpin MASQUERADE case): a container reaching a
//! published port through a host address is DNATed to the published container and SNATed to
//! the network's gateway, and the target's replies are translated back. Both directions are
//! redirected straight to the destination container's veth: the host stack would drop them
//! as martians (a local source address arriving from outside). A published port's
//! `--publish-allow` ranges apply to its containers as to the outside, and the source's
//! isolation as on the iptables datapath (no other network, `--icc=false` only along a link).
//!
//! IPv6 goes the same way in a program of its own (`bridge_ingress6`, reached by a tail call
//! through `BRIDGE6_PROGS`): a container of a dual-stack network reaching a port published
//! over IPv6 on a host address is DNATed to the target's IPv6 address and SNATed to its
//! network's IPv6 gateway; replies and ICMPv6 errors are translated back, fragmented
//! datagrams by their first fragment's ports (as NAT66's).
//!
//! Everything else passes untouched; outgoing traffic is masqueraded where it leaves the host
//! (the uplink, or another interface netd masquerades on).

use aya_ebpf::{
    helpers::bpf_redirect,
    macros::{classifier, map},
    maps::{PerCpuArray, ProgramArray},
    programs::TcContext,
};
use netd_common::datapath::{
    Addr, Config, EndpointInfo, NET_ICC, NET_INTERNAL, NetworkInfo, PublishedTarget, Stat,
};
use network_types::eth::EthHdr;

use crate::lib::{
    conntrack::{self, Path},
    events::{Tuple, Tuple6},
    fib, frag, ipv6, maps, nat,
    nat66::{self, Drop6, Flow6, Rewrite6},
    parse::{self, Flow, Frame as _, Quoted},
    policy::{link_allows, link_allows6},
    stats,
    verdict::{dropped, now_ns, verdict},
};

/// The IPv6 program, in `BRIDGE6_PROGS`.
const INGRESS6: u32 = 0;

/// IPv6 hairpin's program: `bridge_ingress` hands an IPv6 frame over with a tail call (the
/// IPv4 path pays an EtherType check, and each program has its own verifier budget and
/// 512-byte stack). A map of its own rather than a third slot of `NAT66_PROGS`: a pinned
/// program array's entries can't be copied into a bigger one by `netd reload`, a new map is
/// made and pinned. Filled by userspace before `bridge_ingress` is attached.
#[map]
static BRIDGE6_PROGS: ProgramArray = ProgramArray::pinned(1, 0);

/// What became of a hairpin packet: translated and redirected to a container's host-side veth
/// (with the TC action doing it), else `Done`.
enum Outcome {
    Redirected(Stat, i32),
    Done(Stat),
}

#[classifier]
pub fn bridge_ingress(ctx: TcContext) -> i32 {
    finish(hairpin(&ctx))
}

/// Counts what became of the packet and turns it into a TC action.
#[inline(always)]
fn finish(outcome: Outcome) -> i32 {
    match outcome {
        Outcome::Done(stat) => verdict(stat),
        Outcome::Redirected(stat, action) => {
            stats::count(stat);
            action
        }
    }
}

#[inline(always)]
fn hairpin(ctx: &TcContext) -> Outcome {
    // What can't be parsed is no hairpin flow: it goes on to the host, where the endpoint
    // program has checked it already and the uplink translates it or drops it.
    let flow = match parse::ipv4_flow(ctx) {
        Ok(flow) => flow,
        Err(Stat::NotIpv4) if ipv6::is_untagged_frame(ctx) => {
            return Outcome::Done(hand_to_hairpin6(ctx));
        }
        Err(_) => return Outcome::Done(Stat::NoNat),
    };
    let Some(cfg) = maps::config() else {
        return Outcome::Done(Stat::NoNat);
    };
    let now = now_ns();
    if let Some(q) = &flow.quoted {
        return icmp_error(ctx, &flow, q, now, cfg);
    }
    let key = conntrack::key_of(&flow);
    if let Some(hit) =
        conntrack::track(ctx, &key, &flow, now, cfg, Path::Hairpin).map(conntrack::hit_of)
    {
        let Some(ep) = maps::endpoint(hit.rewrite.addr) else {
            return Outcome::Done(dropped(ctx, &flow, Stat::NoEndpoint, flow.saddr));
        };
        let Some(second) = hit.second else {
            return Outcome::Done(dropped(ctx, &flow, Stat::RewriteFailed, flow.saddr));
        };
        return translate(ctx, &flow, &hit.rewrite, &second, Stat::HairpinHit, ep);
    }
    // A new flow: from a container of a netd network to a port published on a host address.
    let Some(src_net_id) = maps::endpoint(flow.saddr).map(|src| src.network_id) else {
        return Outcome::Done(Stat::NoNat);
    };
    let Some(net) = maps::network(src_net_id) else {
        return Outcome::Done(Stat::NoNat);
    };
    let gateway = net.gateway[0];
    let to_gateway = flow.daddr == gateway;
    let Some(target) = maps::published(flow.daddr, flow.dport, flow.proto, cfg, to_gateway) else {
        return Outcome::Done(Stat::NoNat);
    };
    let Some(ep) = maps::endpoint(target.addr[0]) else {
        return Outcome::Done(Stat::NoNat);
    };
    let along_link = || {
        link_allows(&Tuple {
            saddr: flow.saddr,
            daddr: target.addr[0],
            sport: flow.sport,
            dport: target.port,
            proto: flow.proto,
        })
    };
    if let Some(reason) = source_isolation(net, src_net_id, ep.network_id, along_link) {
        return Outcome::Done(dropped(ctx, &flow, reason, flow.saddr));
    }
    if !maps::publish_allows(&target, flow.proto, flow.saddr) {
        return Outcome::Done(dropped(ctx, &flow, Stat::PublishDenied, target.addr[0]));
    }
    if !conntrack::may_start_flow(&flow) {
        return Outcome::Done(Stat::NoNat);
    }
    let started = conntrack::start_hairpin(
        ctx,
        &key,
        &flow,
        &target,
        flow.saddr,
        conntrack::v4(gateway),
        now,
        cfg,
    );
    match started {
        Ok(port) => {
            let dst = nat::Rewrite {
                src: false,
                addr: target.addr[0],
                port: target.port,
            };
            let src = nat::Rewrite {
                src: true,
                addr: gateway,
                port,
            };
            translate(ctx, &flow, &dst, &src, Stat::HairpinNew, ep)
        }
        Err(reason) => Outcome::Done(dropped(ctx, &flow, reason, flow.saddr)),
    }
}

/// An ICMP error about a hairpin flow (from its target to the gateway, or from its client to
/// the host address): translated both ways like the flow's packets, the packet it quotes
/// with it, and redirected to the container it is for. About anything else: the host's.
///
/// Only the container that got the quoted packet may send it, back to that packet's source
/// (no router is on a hairpin flow's way): anyone else's error about the flow (another
/// network's container naming it) is dropped.
#[inline(always)]
fn icmp_error(ctx: &TcContext, flow: &Flow, q: &Quoted, now: u64, cfg: &Config) -> Outcome {
    let key = conntrack::quoted_key(q);
    let Some(hit) = conntrack::flow_of_error(&key, now, cfg, Path::Hairpin).map(conntrack::hit_of)
    else {
        return Outcome::Done(Stat::NoNat);
    };
    if flow.saddr != q.daddr || flow.daddr != q.saddr {
        return Outcome::Done(dropped(ctx, flow, Stat::IcmpNoFlow, flow.saddr));
    }
    let (Some(ep), Some(second)) = (maps::endpoint(hit.rewrite.addr), hit.second) else {
        return Outcome::Done(dropped(ctx, flow, Stat::NoEndpoint, flow.saddr));
    };
    let redirected = nat::apply_icmp_error(ctx, flow, q, &hit.rewrite)
        .and_then(|()| nat::apply_icmp_error(ctx, flow, q, &second))
        .and_then(|()| redirect_to(ctx, ep));
    match redirected {
        Ok(action) => Outcome::Redirected(Stat::IcmpError, action),
        Err(reason) => Outcome::Done(dropped(ctx, flow, reason, flow.saddr)),
    }
}

/// The source's isolation, as the iptables datapath applies it to a hairpin flow once DNAT
/// made it a flow between two containers: another network's container is out of reach (the
/// isolation chains; for an `--internal` source, anything beyond its subnet), and on an
/// `--icc=false` network only a `--link` (`linked`: along one to the target's port) reaches
/// the target. `net` is the source's network, of either family.
#[inline(always)]
fn source_isolation(
    net: &NetworkInfo,
    src_net_id: u32,
    target_net_id: u32,
    linked: impl FnOnce() -> bool,
) -> Option<Stat> {
    if target_net_id != src_net_id {
        return Some(if net.flags & NET_INTERNAL != 0 {
            Stat::Internal
        } else {
            Stat::OtherNetwork
        });
    }
    (net.flags & NET_ICC == 0 && !linked()).then_some(Stat::IccDenied)
}

#[inline(always)]
fn translate(
    ctx: &TcContext,
    flow: &Flow,
    dst: &nat::Rewrite,
    src: &nat::Rewrite,
    done: Stat,
    ep: &'static EndpointInfo,
) -> Outcome {
    let redirected = nat::apply(ctx, flow, dst)
        .and_then(|()| nat::apply(ctx, flow, src))
        .and_then(|()| redirect_to(ctx, ep));
    match redirected {
        Ok(action) => {
            frag::remember(flow);
            Outcome::Redirected(done, action)
        }
        Err(reason) => Outcome::Done(dropped(ctx, flow, reason, flow.saddr)),
    }
}

/// Sends the frame out of the container's host-side veth: from the bridge's MAC (the frame
/// was addressed to it) to the container's.
#[inline(always)]
fn redirect_to(ctx: &TcContext, ep: &EndpointInfo) -> Result<i32, Stat> {
    let eth: EthHdr = ctx.read(0).ok_or(Stat::RewriteFailed)?;
    fib::set_macs(ctx, ep.mac, eth.dst_addr).map_err(|_| Stat::RewriteFailed)?;
    // SAFETY: a helper without preconditions; it returns TC_ACT_REDIRECT (TC_ACT_SHOT for
    // invalid flags, which 0 is not).
    Ok(unsafe { bpf_redirect(ep.ifindex, 0) } as i32)
}

/// Hands an IPv6 frame to `bridge_ingress6`. Returns only if that fails (the slot is empty:
/// userspace fills it before attaching this program): the frame then goes on to the host as
/// before IPv6 hairpin, the endpoint program having checked it; nothing is translated.
#[inline(always)]
fn hand_to_hairpin6(ctx: &TcContext) -> Stat {
    // SAFETY: a tail call with this program's own context.
    unsafe { BRIDGE6_PROGS.tail_call(ctx, INGRESS6) };
    Stat::NoNat
}

#[classifier]
pub fn bridge_ingress6(ctx: TcContext) -> i32 {
    finish(hairpin6(&ctx))
}

/// IPv6 hairpin, as [`hairpin`]: a hairpin flow's packets and ICMPv6 errors about it are
/// translated; a new flow from a container of a dual-stack network to a port published over
/// IPv6 on a host address (on its address, or on every address when it is the host's or the
/// network's IPv6 gateway) starts one, within the source's isolation and the port's
/// `--publish-allow` ranges.
///
/// What can't be parsed or translated here (a fragment, neighbour discovery, an extension
/// header in a quoted packet, a header cut short) is no hairpin flow: it goes on to the host,
/// as for IPv4. The endpoint program has checked it already (its IPv6 parse drops what it
/// can't walk; the isolation applies), and what the host routes out, NAT66 on the way out
/// translates or drops. Every packet translated here is redirected whole; one whose second
/// rewrite or redirect fails is dropped, never passed on half-translated.
///
/// Each step is a function of its own called from here, the packet parsed into NAT66's
/// per-CPU slot (see `progs::uplink`'s `translate6`).
#[inline(always)]
fn hairpin6(ctx: &TcContext) -> Outcome {
    let (Some(flow), Some(hairpin)) = (nat66::scratch(), HAIRPINS6.get_ptr_mut(0)) else {
        return Outcome::Done(Stat::NoNat);
    };
    // SAFETY: per-CPU slot, used only within this program run.
    let hairpin = unsafe { &mut *hairpin };
    if nat66::parse_into(ctx, flow).is_err() {
        return Outcome::Done(Stat::NoNat);
    }
    let outcome = if flow.quoted.is_some() {
        icmp_error6(ctx, flow)
    } else if let Some(outcome) = tracked6(ctx, flow) {
        outcome
    } else if !flow.has_l4_header() {
        // A later fragment starts no flow.
        Ok(Outcome::Done(Stat::NoNat))
    } else {
        match new_flow6(ctx, flow, hairpin) {
            NewFlow6::Hairpin => start6(ctx, flow, hairpin),
            NewFlow6::Host => Ok(Outcome::Done(Stat::NoNat)),
            NewFlow6::Refused(drop) => Err(drop),
        }
    };
    outcome.unwrap_or_else(|drop| Outcome::Done(nat66::dropped(ctx, flow, drop)))
}

/// A packet of a hairpin IPv6 flow, translated both ways; `None` for one of no such flow.
#[inline(never)]
fn tracked6(ctx: &TcContext, flow: &Flow6) -> Option<Result<Outcome, Drop6>> {
    let cfg = maps::config()?;
    let key = nat66::key_of(flow);
    let entry = conntrack::track(ctx, &key, flow, now_ns(), cfg, Path::Hairpin)?;
    let dst = nat66::rewrite_of(entry);
    let Some(ep) = maps::endpoint6(dst.addr) else {
        return Some(Err(sender_drop(flow, Stat::NoEndpoint)));
    };
    let Some(src) = nat66::second_rewrite_of(entry) else {
        return Some(Err(sender_drop(flow, Stat::RewriteFailed)));
    };
    let translated = translate6(ctx, flow, &Rewrites6 { dst, src }, ep);
    Some(redirected6(flow, Stat::HairpinHit, translated))
}

/// Where a new IPv6 hairpin flow goes, and from where.
struct Hairpin6 {
    target: PublishedTarget,
    /// The target container.
    ep: EndpointInfo,
    /// The source container's network's IPv6 gateway: the flow's new source.
    gateway: Addr,
    /// The source container's IPv4 address: its flows are counted there.
    container: u32,
}

/// Where [`new_flow6`] leaves the flow [`start6`] starts: on the program's stack it would
/// leave too little of the 512 bytes for conntrack's calls under `start6`.
#[map]
static HAIRPINS6: PerCpuArray<Hairpin6> = PerCpuArray::with_max_entries(1, 0);

/// What a new IPv6 flow is to the bridge. It fits a register: a bigger value is returned
/// through the caller's stack, whose address LLVM may leave in r0, which the verifier refuses
/// ("cannot return stack pointer to the caller").
enum NewFlow6 {
    /// The host's.
    Host,
    /// A hairpin flow to start.
    Hairpin,
    Refused(Drop6),
}

/// A new IPv6 flow: a hairpin flow, left in `h`, when it is from a container of a dual-stack
/// network to a port published on a host address and the source may reach the port. A
/// function of its own, apart from [`start6`]: together their stack frames and conntrack's
/// call would not fit.
#[inline(never)]
fn new_flow6(ctx: &TcContext, flow: &Flow6, h: &mut Hairpin6) -> NewFlow6 {
    let Some(from) = maps::container6(flow.saddr) else {
        return NewFlow6::Host;
    };
    let Some(net) = maps::network6(from.network_id) else {
        return NewFlow6::Host;
    };
    let gateway = net.gateway;
    let Some(target) = maps::published_to6(
        ctx,
        &flow.daddr,
        flow.dport,
        flow.proto,
        flow.daddr == gateway,
    ) else {
        return NewFlow6::Host;
    };
    let Some(ep) = maps::endpoint6(target.addr) else {
        return NewFlow6::Host;
    };
    let along_link = || {
        link_allows6(&Tuple6 {
            saddr: flow.saddr,
            daddr: target.addr,
            sport: flow.sport,
            dport: target.port,
            proto: flow.proto,
        })
    };
    let container = from.addr[0];
    if let Some(reason) = source_isolation(net, from.network_id, ep.network_id, along_link) {
        return NewFlow6::Refused(Drop6 { reason, container });
    }
    if !maps::publish_allows6(&target, flow.proto, flow.saddr) {
        return NewFlow6::Refused(Drop6 {
            reason: Stat::PublishDenied,
            container: maps::veth(ep.ifindex).map_or(0, |to| to.addr[0]),
        });
    }
    if !conntrack::may_start_flow(flow) {
        return NewFlow6::Host;
    }
    *h = Hairpin6 {
        target,
        ep: *ep,
        gateway,
        container,
    };
    NewFlow6::Hairpin
}

/// Starts hairpin flow `h` with `flow`'s packet: tracked, then translated and redirected.
#[inline(never)]
fn start6(ctx: &TcContext, flow: &Flow6, h: &Hairpin6) -> Result<Outcome, Drop6> {
    let Some(cfg) = maps::config() else {
        return Ok(Outcome::Done(Stat::NoNat));
    };
    let container = h.container;
    let key = nat66::key_of(flow);
    let port = conntrack::start_hairpin(
        ctx,
        &key,
        flow,
        &h.target,
        container,
        h.gateway,
        now_ns(),
        cfg,
    )
    .map_err(|reason| Drop6 { reason, container })?;
    let rw = Rewrites6 {
        dst: Rewrite6 {
            src: false,
            addr: h.target.addr,
            port: h.target.port,
        },
        src: Rewrite6 {
            src: true,
            addr: h.gateway,
            port,
        },
    };
    redirected6(flow, Stat::HairpinNew, translate6(ctx, flow, &rw, &h.ep))
}

/// An ICMPv6 error about a hairpin flow, translated both ways with the packet it quotes (as
/// [`icmp_error`], and only from the container that got the quoted packet) and redirected to
/// the container it is for. About anything else: the host's.
#[inline(never)]
fn icmp_error6(ctx: &TcContext, flow: &Flow6) -> Result<Outcome, Drop6> {
    let (Some(cfg), Some(q)) = (maps::config(), &flow.quoted) else {
        return Ok(Outcome::Done(Stat::NoNat));
    };
    let key = nat66::quoted_key(q);
    let Some(entry) = conntrack::flow_of_error(&key, now_ns(), cfg, Path::Hairpin) else {
        return Ok(Outcome::Done(Stat::NoNat));
    };
    if flow.saddr != q.daddr || flow.daddr != q.saddr {
        return Err(sender_drop(flow, Stat::IcmpNoFlow));
    }
    let dst = nat66::rewrite_of(entry);
    let (Some(ep), Some(src)) = (maps::endpoint6(dst.addr), nat66::second_rewrite_of(entry)) else {
        return Err(sender_drop(flow, Stat::NoEndpoint));
    };
    let translated = nat66::apply_icmp_error(ctx, flow, q, &dst)
        .and_then(|()| nat66::apply_icmp_error(ctx, flow, q, &src))
        .and_then(|()| redirect_to(ctx, ep));
    redirected6(flow, Stat::IcmpError, translated)
}

/// The rewrites of a hairpin packet: of its destination, then of its source.
struct Rewrites6 {
    dst: Rewrite6,
    src: Rewrite6,
}

/// [`translate`] for IPv6: the action redirecting the translated packet to `ep`. A function
/// of its own: within [`start6`] it would take the stack conntrack's call needs.
#[inline(never)]
fn translate6(
    ctx: &TcContext,
    flow: &Flow6,
    rw: &Rewrites6,
    ep: &EndpointInfo,
) -> Result<i32, Stat> {
    nat66::apply(ctx, flow, &rw.dst).and_then(|()| nat66::apply(ctx, flow, &rw.src))?;
    flow.remember_ports();
    redirect_to(ctx, ep)
}

/// What became of a packet [`translate6`] was given: redirected (`done`), or dropped.
#[inline(always)]
fn redirected6(flow: &Flow6, done: Stat, translated: Result<i32, Stat>) -> Result<Outcome, Drop6> {
    translated
        .map(|action| Outcome::Redirected(done, action))
        .map_err(|reason| sender_drop(flow, reason))
}

/// A drop of an IPv6 packet counted against its sender, as IPv4 hairpin counts them.
#[inline(always)]
fn sender_drop(flow: &Flow6, reason: Stat) -> Drop6 {
    Drop6 {
        reason,
        container: maps::container6(flow.saddr).map_or(0, |from| from.addr[0]),
    }
}
