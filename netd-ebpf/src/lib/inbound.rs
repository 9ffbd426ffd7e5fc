//! The decision on a new flow arriving from outside, shared by the uplink's TC and XDP
//! programs.

use netd_common::datapath::{Config, NET_INTERNAL, NET_MASQUERADE, PublishedTarget, Stat};

use super::{maps, parse::Flow};

const MULTICAST_FIRST_OCTET: u8 = 224;

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
    if let Some(target) = maps::published(flow.daddr, flow.dport, flow.proto, cfg, false) {
        let container = target.addr[0];
        if maps::is_internal(target.network_id) {
            return Inbound::Refused(Stat::Internal, container);
        }
        if !maps::publish_allows(&target, flow.proto, flow.saddr) {
            return Inbound::Refused(Stat::PublishDenied, container);
        }
        if martian(flow.saddr, cfg) {
            return Inbound::Refused(Stat::Martian, container);
        }
        return Inbound::Published(target);
    }
    let Some(ep) = maps::endpoint(flow.daddr) else {
        return Inbound::Stack;
    };
    match maps::network(ep.network_id) {
        // Its network is gone (being removed): what it was is unknown.
        None => Inbound::Refused(Stat::NoEndpoint, flow.daddr),
        Some(net) if net.flags & NET_INTERNAL != 0 => Inbound::Refused(Stat::Internal, flow.daddr),
        Some(net) if net.flags & NET_MASQUERADE != 0 => {
            Inbound::Refused(Stat::Unsolicited, flow.daddr)
        }
        Some(_) => Inbound::Stack,
    }
}

/// Whether `saddr` can't be the source of a packet from outside: "this" network (0/8),
/// loopback, multicast and beyond (224/3, the limited broadcast included), an address of the
/// host's, or an address of a container subnet (a container, a gateway). Translated to a
/// container, such a packet would make it answer the host or another container; the stack
/// drops these as martians (rp_filter), DNAT must too.
#[inline(always)]
fn martian(saddr: u32, cfg: &Config) -> bool {
    maps::local_only(saddr)
        || saddr.to_ne_bytes()[0] >= MULTICAST_FIRST_OCTET
        || maps::is_host_addr(saddr, cfg)
        || maps::in_container_subnet(saddr)
}
