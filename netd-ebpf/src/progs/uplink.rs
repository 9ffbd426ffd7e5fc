//! The two NAT programs, on the host's uplink and on every other interface of the host that
//! routes out (a second NIC, a VPN: `NAT_IFACES`), each masquerading to its own interface's
//! address. Each packet goes parse → conntrack → nat:
//!
//! - egress (leaving the host): a packet of a tracked flow gets its direction's rewrite
//!   (masqueraded flows: source → host:port; published-port replies: source → host:published
//!   port); a new flow from a container of a masquerading network is masqueraded to the
//!   address of the interface it leaves through (dropped, `unmasqueraded`, on an interface
//!   netd has no address for).
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
//! Fail closed: a packet to a container of a masquerading or internal network that is not
//! translated here (it can't be parsed, an ICMP error about no flow of it, a refused new flow)
//! is dropped with the reason, and so is one leaving with the source of such a container: no
//! packet leaves with a masqueraded container's private address. Everything else
//! (the host's own traffic, routed networks) passes untouched. A packet translated to a
//! container that the fast path can't deliver is marked (`MARK_ADMITTED`) for the program on
//! the container's veth, which lets nothing else in from beyond its network.

use aya_ebpf::{macros::classifier, programs::TcContext};
use netd_common::datapath::{
    CT_NAT_SNAT, Config, CtKey, MARK_ADMITTED, NET_INTERNAL, NET_MASQUERADE, Stat,
};

use crate::lib::{
    conntrack::{self, Path},
    events::{self, Tuple},
    fib, frag,
    inbound::{Inbound, inbound},
    maps, nat,
    parse::{self, Flow, Frame as _, Quoted},
    stats,
    verdict::{dropped, now_ns, verdict},
};

#[classifier]
pub fn uplink_egress(ctx: TcContext) -> i32 {
    verdict(egress(&ctx))
}

#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    let outcome = ingress(&ctx);
    if matches!(outcome, Stat::SnatHit | Stat::DnatNew | Stat::DnatHit) {
        if let Some(action) = fib::deliver_to_container(&ctx) {
            stats::count(outcome);
            stats::count(Stat::FastPathIn);
            return action;
        }
        admit(&ctx);
    } else if outcome == Stat::IcmpError {
        admit(&ctx);
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
    let flow = parse::ipv4_flow(ctx).map_err(|reason| untranslatable(ctx, reason, path))?;
    let cfg = maps::config().ok_or(Stat::NoNat)?;
    let now = now_ns();
    if let Some(quoted) = &flow.quoted {
        return Err(icmp_error(ctx, &flow, quoted, now, cfg, path));
    }
    let key = conntrack::key_of(&flow);
    if let Some(hit) = conntrack::track(ctx, &key, &flow, now, cfg, path) {
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
    let Some(flags) = maps::endpoint(flow.saddr)
        .and_then(|ep| maps::network(ep.network_id))
        .map(|net| net.flags)
    else {
        return Stat::NoNat;
    };
    if flags & NET_INTERNAL != 0 {
        return dropped(ctx, &flow, Stat::Internal, flow.saddr);
    }
    if flags & NET_MASQUERADE == 0 {
        return Stat::NoNat;
    }
    // A flow starts only where netd knows the interface's address: anywhere else it would
    // leave with the container's private source.
    let Some(nat_addr) =
        maps::masquerade_addr(ctx.ifindex(), cfg).filter(|_| conntrack::may_start_flow(&flow))
    else {
        return dropped(ctx, &flow, Stat::Unmasqueraded, flow.saddr);
    };
    match conntrack::start_snat(ctx, &key, &flow, nat_addr, now, cfg) {
        Ok(rw) => rewrite(ctx, &flow, &rw, Stat::SnatNew),
        Err(reason) => dropped(ctx, &flow, reason, flow.saddr),
    }
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
    let target = match inbound(&flow, cfg) {
        Inbound::Published(target) => target,
        Inbound::Refused(reason, container) => return dropped(ctx, &flow, reason, container),
        Inbound::Stack => return Stat::NoNat,
    };
    if !conntrack::may_start_flow(&flow) {
        return dropped(ctx, &flow, Stat::Unsolicited, target.addr[0]);
    }
    match conntrack::start_dnat(ctx, &key, &flow, target.addr[0], target.port, now, cfg) {
        Ok(rw) => rewrite(ctx, &flow, &rw, Stat::DnatNew),
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
    let Some(hit) = conntrack::rewrites_for_error(q, now, cfg, path) else {
        return untranslatable(ctx, Stat::IcmpNoFlow, path);
    };
    match nat::apply_icmp_error(ctx, flow, q, &hit.rewrite) {
        Ok(()) => Stat::IcmpError,
        Err(reason) => reason,
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
#[inline(always)]
fn untranslatable(ctx: &TcContext, reason: Stat, path: Path) -> Stat {
    let Some((saddr, daddr)) = parse::ipv4_ends(ctx) else {
        return if reason == Stat::NotIpv4 {
            reason
        } else {
            Stat::NoNat
        };
    };
    let container = if path == Path::In { daddr } else { saddr };
    if !maps::is_sealed(container) {
        return Stat::NoNat;
    }
    let reason = if path == Path::Out && reason == Stat::IcmpNoFlow {
        Stat::Unmasqueraded
    } else {
        reason
    };
    let tuple = Tuple {
        saddr,
        daddr,
        ..Tuple::default()
    };
    events::dropped(&tuple, reason, container, ctx.ifindex())
}
