//! Rewriting one end (address and port, or ICMP echo identifier) of an IPv4 packet, with the
//! checksums fixed incrementally: the L4 ones by the kernel helper, which knows the skb's
//! checksum state (for CHECKSUM_PARTIAL it fixes the pseudo-header seed instead of the full
//! sum, for CHECKSUM_COMPLETE it keeps `skb->csum` right), the IP header's with the address
//! (`ipv4_hdr`). IPv4 options are left as they are (the header checksum covers them,
//! unchanged); a later fragment has only its addresses rewritten (its first fragment carried
//! the L4 header and its checksum).

use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, programs::TcContext};
use netd_common::datapath::{IPPROTO_ICMP, Stat};

use super::{
    csum::{covers_addresses, icmp_csum, l4_csum},
    ipv4_hdr,
    parse::{Flow, L3_OFF, Quoted},
};

/// Offsets in a TCP/UDP header (ports) and an ICMP echo header (identifier).
const SPORT_IN_L4: usize = 0;
const DPORT_IN_L4: usize = 2;
const ICMP_ID_IN_L4: usize = 4;

/// A translation of one end of a packet.
#[derive(Clone, Copy)]
pub struct Rewrite {
    /// The source end when true, else the destination.
    pub src: bool,
    /// Wire byte order.
    pub addr: u32,
    /// Host byte order; the echo identifier for ICMP.
    pub port: u16,
}

/// Applies `rw` to the packet `flow` was parsed from.
#[inline(always)]
pub fn apply(ctx: &TcContext, flow: &Flow, rw: &Rewrite) -> Result<(), Stat> {
    let (old_addr, old_port) = if rw.src {
        (flow.saddr, flow.sport)
    } else {
        (flow.daddr, flow.dport)
    };
    let port_changes = old_port != rw.port && flow.has_l4_header();
    if old_addr != rw.addr && port_changes && ports_follow_header(flow) {
        return replace_end(ctx, flow, rw, old_addr, old_port);
    }
    if old_addr != rw.addr {
        replace_addr(ctx, flow, rw.src, old_addr, rw.addr)?;
    }
    if port_changes {
        replace_port(ctx, flow, rw.src, old_port, rw.port)?;
    }
    Ok(())
}

/// Whether the packet's TCP or UDP ports directly follow its IPv4 header (no options).
#[inline(always)]
fn ports_follow_header(flow: &Flow) -> bool {
    covers_addresses(flow.proto) && flow.l4_off == ipv4_hdr::L4_OFF_WITHOUT_OPTIONS
}

/// Both the address and the port of one end (TCP or UDP, its ports right after the IPv4
/// header): the L4 checksum fixed for each, the fields written in one store with the header
/// checksum.
#[inline(always)]
fn replace_end(
    ctx: &TcContext,
    flow: &Flow,
    rw: &Rewrite,
    old_addr: u32,
    old_port: u16,
) -> Result<(), Stat> {
    fix_l4_csum_for_addr(ctx, flow, old_addr, rw.addr)?;
    let new_port = fix_l4_csum_for_port(ctx, flow, old_port, rw.port)?;
    ipv4_hdr::set_addr_and_port(ctx, rw.src, rw.addr, new_port).ok_or(Stat::RewriteFailed)
}

#[inline(always)]
fn replace_addr(ctx: &TcContext, flow: &Flow, src: bool, old: u32, new: u32) -> Result<(), Stat> {
    fix_l4_csum_for_addr(ctx, flow, old, new)?;
    ipv4_hdr::set_addr(ctx, L3_OFF, src, new).ok_or(Stat::RewriteFailed)?;
    Ok(())
}

#[inline(always)]
fn replace_port(ctx: &TcContext, flow: &Flow, src: bool, old: u16, new: u16) -> Result<(), Stat> {
    let in_l4 = match (flow.proto, src) {
        (IPPROTO_ICMP, _) => ICMP_ID_IN_L4,
        (_, true) => SPORT_IN_L4,
        (_, false) => DPORT_IN_L4,
    };
    let new = fix_l4_csum_for_port(ctx, flow, old, new)?;
    ctx.store(flow.l4_off + in_l4, &new, 0)
        .map_err(|_| Stat::RewriteFailed)
}

/// Fixes the L4 checksum for an address changing from `old` to `new`, where it covers the
/// addresses (through the pseudo-header).
#[inline(always)]
fn fix_l4_csum_for_addr(ctx: &TcContext, flow: &Flow, old: u32, new: u32) -> Result<(), Stat> {
    if !(covers_addresses(flow.proto) && flow.has_l4_header()) {
        return Ok(());
    }
    let (csum_off, flags) = l4_csum(flow.proto, flow.l4_off);
    let flags = flags | u64::from(BPF_F_PSEUDO_HDR) | 4;
    ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), flags)
        .map_err(|_| Stat::RewriteFailed)
}

/// Fixes the L4 checksum for a port (echo identifier) changing from `old` to `new`; returns
/// the new one as it goes in the packet.
#[inline(always)]
fn fix_l4_csum_for_port(ctx: &TcContext, flow: &Flow, old: u16, new: u16) -> Result<u16, Stat> {
    let (csum_off, flags) = l4_csum(flow.proto, flow.l4_off);
    // The helpers take the field's bytes as they are in the packet.
    let (old, new) = (old.to_be(), new.to_be());
    ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), flags | 2)
        .map_err(|_| Stat::RewriteFailed)?;
    Ok(new)
}

/// Translates an ICMP error travelling like the packets `rw` is for. The packet it quotes
/// travelled the other way, so where the error's source (destination) changes, the quoted
/// packet's destination (source) address and port change to the same values.
///
/// The quoted IP header's checksum is fixed (so the ICMP checksum only moves with the port);
/// the quoted L4 checksum is left as it was: it is usually cut off, and receivers of ICMP
/// errors don't check it.
#[inline(always)]
pub fn apply_icmp_error(
    ctx: &TcContext,
    flow: &Flow,
    q: &Quoted,
    rw: &Rewrite,
) -> Result<(), Stat> {
    let (outer_old, quoted_old, quoted_old_port) = if rw.src {
        (flow.saddr, q.daddr, q.dport)
    } else {
        (flow.daddr, q.saddr, q.sport)
    };
    if outer_old != rw.addr {
        replace_addr(ctx, flow, rw.src, outer_old, rw.addr)?;
    }
    let icmp_csum_off = icmp_csum(flow.l4_off);
    if quoted_old != rw.addr {
        // The quoted packet's other end: its destination where the error's source changes.
        replace_quoted_addr(ctx, q, icmp_csum_off, !rw.src, quoted_old, rw.addr)?;
    }
    if quoted_old_port != rw.port && (q.sport | q.dport) != 0 {
        let in_l4 = match (q.proto, rw.src) {
            (IPPROTO_ICMP, _) => ICMP_ID_IN_L4,
            (_, true) => DPORT_IN_L4,
            (_, false) => SPORT_IN_L4,
        };
        let (old, new) = (quoted_old_port.to_be(), rw.port.to_be());
        ctx.l4_csum_replace(icmp_csum_off, u64::from(old), u64::from(new), 2)
            .map_err(|_| Stat::RewriteFailed)?;
        ctx.store(q.l4_off + in_l4, &new, 0)
            .map_err(|_| Stat::RewriteFailed)?;
    }
    Ok(())
}

#[inline(always)]
fn replace_quoted_addr(
    ctx: &TcContext,
    q: &Quoted,
    icmp_csum_off: usize,
    src: bool,
    old: u32,
    new: u32,
) -> Result<(), Stat> {
    let (old_csum, new_csum) =
        ipv4_hdr::set_addr(ctx, q.l3_off, src, new).ok_or(Stat::RewriteFailed)?;
    // The ICMP checksum covers the quoted header: both its address and its checksum changed
    // (the two changes cancel out; spelled out so the sum is right by construction).
    ctx.l4_csum_replace(icmp_csum_off, u64::from(old), u64::from(new), 4)
        .map_err(|_| Stat::RewriteFailed)?;
    ctx.l4_csum_replace(icmp_csum_off, u64::from(old_csum), u64::from(new_csum), 2)
        .map_err(|_| Stat::RewriteFailed)
}
