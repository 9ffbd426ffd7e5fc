//! The optional XDP program on the host's uplink (`--uplink-xdp`): it drops the new flows
//! `uplink_ingress` would refuse (straight to a container, to an internal network, from a
//! source a published port doesn't allow) before the kernel builds an skb for them, and passes
//! everything else on to the TC programs unchanged. It never rewrites a packet.
//!
//! A packet it can't fully parse, an ICMP error, or one of a tracked flow passes: TC decides,
//! and counts it, as without this program.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};

use crate::lib::{
    conntrack,
    inbound::{Inbound, inbound},
    maps, parse, stats,
    verdict::{dropped, now_ns},
};

#[xdp]
pub fn uplink_xdp(ctx: XdpContext) -> u32 {
    if refused(&ctx) { XDP_DROP } else { XDP_PASS }
}

/// Whether the packet is a new flow `uplink_ingress` would refuse: counted and reported
/// here, the same way.
#[inline(always)]
fn refused(ctx: &XdpContext) -> bool {
    let Ok(flow) = parse::ipv4_flow(ctx) else {
        return false;
    };
    let Some(cfg) = maps::config() else {
        return false;
    };
    if flow.quoted.is_some() {
        return false;
    }
    let Inbound::Refused(reason, container) = inbound(&flow, cfg) else {
        return false;
    };
    // Refusals are rare and this lookup costly: only now ask whether a flow explains it.
    if conntrack::is_live(&conntrack::key_of(&flow), now_ns(), cfg) {
        return false;
    }
    stats::count(dropped(ctx, &flow, reason, container));
    true
}
