//! The program on each network bridge's ingress: what containers send to the host. Only
//! hairpin traffic is handled here (Docker's hairpin MASQUERADE case): a container reaching a
//! published port through a host address is DNATed to the published container and SNATed to
//! the network's gateway, and the target's replies are translated back. Both directions are
//! redirected straight to the destination container's veth: the host stack would drop them
//! as martians (a local source address arriving from outside). A published port's
//! `--publish-allow` ranges apply to its containers as to the outside, and the source's
//! isolation as on the iptables datapath (no other network, `--icc=false` only along a link).
//!
//! Everything else passes untouched; outgoing traffic is masqueraded where it leaves the host
//! (the uplink, or another interface netd masquerades on).

use aya_ebpf::{helpers::bpf_redirect, macros::classifier, programs::TcContext};
use netd_common::datapath::{
    Config, EndpointInfo, NET_ICC, NET_INTERNAL, NetworkInfo, PublishedTarget, Stat,
};
use network_types::eth::EthHdr;

use crate::lib::{
    conntrack::{self, Path},
    events::Tuple,
    fib, frag, maps, nat,
    parse::{self, Flow, Frame as _, Quoted},
    policy::link_allows,
    stats,
    verdict::{dropped, now_ns, verdict},
};

/// What became of a hairpin packet: translated and redirected to a container's host-side veth
/// (with the TC action doing it), else `Done`.
enum Outcome {
    Redirected(Stat, i32),
    Done(Stat),
}

#[classifier]
pub fn bridge_ingress(ctx: TcContext) -> i32 {
    match hairpin(&ctx) {
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
    let Ok(flow) = parse::ipv4_flow(ctx) else {
        return Outcome::Done(Stat::NoNat);
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
    if let Some(reason) = source_isolation(&flow, net, src_net_id, ep, &target) {
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
        target.addr[0],
        target.port,
        gateway,
        now,
        cfg,
    );
    match started {
        Ok((dst, src)) => translate(ctx, &flow, &dst, &src, Stat::HairpinNew, ep),
        Err(reason) => Outcome::Done(dropped(ctx, &flow, reason, flow.saddr)),
    }
}

/// An ICMP error about a hairpin flow (from its target to the gateway, or from its client to
/// the host address): translated both ways like the flow's packets, the packet it quotes
/// with it, and redirected to the container it is for. About anything else: the host's.
#[inline(always)]
fn icmp_error(ctx: &TcContext, flow: &Flow, q: &Quoted, now: u64, cfg: &Config) -> Outcome {
    let key = conntrack::quoted_key(q);
    let Some(hit) = conntrack::flow_of_error(&key, now, cfg, Path::Hairpin).map(conntrack::hit_of)
    else {
        return Outcome::Done(Stat::NoNat);
    };
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
/// `--icc=false` network only a `--link` reaches the target's port.
#[inline(always)]
fn source_isolation(
    flow: &Flow,
    net: &NetworkInfo,
    src_net_id: u32,
    ep: &EndpointInfo,
    target: &PublishedTarget,
) -> Option<Stat> {
    if ep.network_id != src_net_id {
        return Some(if net.flags & NET_INTERNAL != 0 {
            Stat::Internal
        } else {
            Stat::OtherNetwork
        });
    }
    let to_target = Tuple {
        saddr: flow.saddr,
        daddr: target.addr[0],
        sport: flow.sport,
        dport: target.port,
        proto: flow.proto,
    };
    (net.flags & NET_ICC == 0 && !link_allows(&to_target)).then_some(Stat::IccDenied)
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
