//! The program on each network bridge's ingress: what containers send to the host. Only
//! hairpin traffic is handled here (Docker's hairpin MASQUERADE case): a container reaching a
//! published port through a host address is DNATed to the published container and SNATed to
//! the network's gateway, and the target's replies are translated back. Both directions are
//! redirected straight to the destination container's veth: the host stack would drop them
//! as martians (a local source address arriving from outside).
//!
//! Everything else passes untouched; outgoing traffic is masqueraded on the uplink.

use aya_ebpf::{helpers::bpf_redirect, macros::classifier, programs::TcContext};
use netd_common::datapath::{EndpointInfo, Stat};
use network_types::eth::EthHdr;

use crate::{
    conntrack, fib, maps, nat,
    parse::{self, Flow},
    stats,
    uplink::{now_ns, verdict},
};

/// Where a hairpin packet goes: `Forward` to a container's host-side veth, else `Done`.
enum Outcome {
    Forward(Stat, &'static EndpointInfo),
    Done(Stat),
}

#[classifier]
pub fn bridge_ingress(ctx: TcContext) -> i32 {
    match hairpin(&ctx) {
        Outcome::Done(stat) => verdict(stat),
        Outcome::Forward(stat, ep) => match redirect_to(&ctx, ep) {
            Ok(action) => {
                stats::count(stat);
                action
            }
            Err(reason) => verdict(reason),
        },
    }
}

#[inline(always)]
fn hairpin(ctx: &TcContext) -> Outcome {
    let flow = match parse::ipv4_flow(ctx) {
        Ok(flow) => flow,
        Err(reason) => return Outcome::Done(reason),
    };
    let Some(cfg) = maps::config() else {
        return Outcome::Done(Stat::NoNat);
    };
    let key = conntrack::key_of(&flow);
    let now = now_ns();
    if let Some(hit) = conntrack::track(&key, &flow, ctx.len(), now, cfg, true) {
        let Some(ep) = maps::endpoint(hit.rewrite.addr) else {
            stats::count_endpoint_drop(flow.saddr, Stat::NoEndpoint);
            return Outcome::Done(Stat::NoEndpoint);
        };
        let Some(second) = hit.second else {
            return Outcome::Done(Stat::RewriteFailed);
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
    let daddr_is_host = flow.daddr == cfg.uplink_addr[0] || flow.daddr == gateway;
    let Some(target) = maps::published(flow.daddr, flow.dport, flow.proto, daddr_is_host) else {
        return Outcome::Done(Stat::NoNat);
    };
    let Some(ep) = maps::endpoint(target.addr[0]) else {
        return Outcome::Done(Stat::NoNat);
    };
    // An internal network's published ports are out of reach from its neighbours too.
    if ep.network_id != src_net_id && maps::is_internal(ep.network_id) {
        stats::count_endpoint_drop(target.addr[0], Stat::Internal);
        return Outcome::Done(Stat::Internal);
    }
    if !conntrack::may_start_flow(&flow) {
        return Outcome::Done(Stat::NoNat);
    }
    let started = conntrack::start_hairpin(
        ctx,
        &key,
        &flow,
        target.addr[0],
        target.port,
        gateway,
        ctx.len(),
        now,
        cfg,
    );
    match started {
        Ok((dst, src)) => translate(ctx, &flow, &dst, &src, Stat::HairpinNew, ep),
        Err(reason) => {
            stats::count_endpoint_drop(flow.saddr, reason);
            Outcome::Done(reason)
        }
    }
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
    if let Err(reason) = nat::apply(ctx, flow, dst).and_then(|()| nat::apply(ctx, flow, src)) {
        stats::count_endpoint_drop(flow.saddr, reason);
        return Outcome::Done(reason);
    }
    Outcome::Forward(done, ep)
}

/// Sends the frame out of the container's host-side veth: from the bridge's MAC (the frame
/// was addressed to it) to the container's.
#[inline(always)]
fn redirect_to(ctx: &TcContext, ep: &EndpointInfo) -> Result<i32, Stat> {
    let eth: EthHdr = parse::load(ctx, 0).ok_or(Stat::RewriteFailed)?;
    fib::set_macs(ctx, ep.mac, eth.dst_addr).map_err(|_| Stat::RewriteFailed)?;
    // SAFETY: a helper without preconditions; it returns TC_ACT_REDIRECT (TC_ACT_SHOT for
    // invalid flags, which 0 is not).
    Ok(unsafe { bpf_redirect(ep.ifindex, 0) } as i32)
}
