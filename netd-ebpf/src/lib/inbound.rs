//! The decision on a new flow arriving from outside, shared by the uplink's TC and XDP
//! programs.

use netd_common::datapath::{Config, NET_INTERNAL, NET_MASQUERADE, PublishedTarget, Stat};

use super::{maps, parse::Flow};

/// What becomes of a new flow arriving from outside.
pub enum Inbound {
    /// To a published port: DNAT to this container.
    Published(PublishedTarget),
    /// Dropped for this reason, counted against the container at this address.
    Refused(Stat, u32),
    /// Not for a container: the stack decides.
    Stack,
}

/// Decides a new flow from outside (one no tracked flow explains), the way Docker's nat
/// PREROUTING and filter FORWARD chains do: a published port DNATs to its container (never to
/// one of an `--internal` network, nor from a source outside the port's `--publish-allow`
/// ranges); a flow routed straight to a container gets in only on a network that neither is
/// internal nor masquerades (there, outbound flows are not tracked, so their replies look
/// just like this).
#[inline(always)]
pub fn inbound(flow: &Flow, cfg: &Config) -> Inbound {
    let daddr_is_host = flow.daddr == cfg.uplink_addr[0];
    if let Some(target) = maps::published(flow.daddr, flow.dport, flow.proto, daddr_is_host) {
        let container = target.addr[0];
        if maps::is_internal(target.network_id) {
            return Inbound::Refused(Stat::Internal, container);
        }
        if !maps::publish_allows(&target, flow.proto, flow.saddr) {
            return Inbound::Refused(Stat::PublishDenied, container);
        }
        return Inbound::Published(target);
    }
    match maps::endpoint(flow.daddr).and_then(|ep| maps::network(ep.network_id)) {
        Some(net) if net.flags & NET_INTERNAL != 0 => Inbound::Refused(Stat::Internal, flow.daddr),
        Some(net) if net.flags & NET_MASQUERADE != 0 => {
            Inbound::Refused(Stat::Unsolicited, flow.daddr)
        }
        _ => Inbound::Stack,
    }
}
