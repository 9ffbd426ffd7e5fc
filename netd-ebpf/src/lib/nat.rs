//! Rewriting one end (address and port, or ICMP echo identifier) of an IPv4 packet, with the
//! IP and L4 checksums fixed incrementally by the kernel helpers. The helpers know the skb's
//! checksum state: for CHECKSUM_PARTIAL they fix the pseudo-header seed instead of the full
//! sum, for CHECKSUM_COMPLETE they keep `skb->csum` right.

use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, programs::TcContext};
use netd_common::datapath::{IPPROTO_ICMP, Stat};

use super::{
    csum::{ICMP_CSUM_OFF, IP_CSUM_OFF, l4_csum},
    parse::{Flow, Frame as _, L3_OFF, L4_OFF, QUOTED_L3_OFF, QUOTED_L4_OFF, Quoted},
};

const IP_SRC_OFF: usize = L3_OFF + 12;
const IP_DST_OFF: usize = L3_OFF + 16;
const L4_SPORT_OFF: usize = L4_OFF;
const L4_DPORT_OFF: usize = L4_OFF + 2;
const ICMP_ID_OFF: usize = L4_OFF + 4;
const QUOTED_CSUM_OFF: usize = QUOTED_L3_OFF + 10;
const QUOTED_SRC_OFF: usize = QUOTED_L3_OFF + 12;
const QUOTED_DST_OFF: usize = QUOTED_L3_OFF + 16;
const QUOTED_SPORT_OFF: usize = QUOTED_L4_OFF;
const QUOTED_DPORT_OFF: usize = QUOTED_L4_OFF + 2;
const QUOTED_ICMP_ID_OFF: usize = QUOTED_L4_OFF + 4;

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
    let (addr_off, old_addr, old_port) = if rw.src {
        (IP_SRC_OFF, flow.saddr, flow.sport)
    } else {
        (IP_DST_OFF, flow.daddr, flow.dport)
    };
    if old_addr != rw.addr {
        replace_addr(ctx, flow.proto, addr_off, old_addr, rw.addr)?;
    }
    if old_port != rw.port {
        replace_port(ctx, flow.proto, rw.src, old_port, rw.port)?;
    }
    Ok(())
}

#[inline(always)]
fn replace_addr(ctx: &TcContext, proto: u8, off: usize, old: u32, new: u32) -> Result<(), Stat> {
    // TCP and UDP checksums cover the addresses through the pseudo-header; ICMP's doesn't.
    if proto != IPPROTO_ICMP {
        let (csum_off, flags) = l4_csum(proto);
        let flags = flags | u64::from(BPF_F_PSEUDO_HDR) | 4;
        ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), flags)
            .map_err(|_| Stat::RewriteFailed)?;
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)
        .map_err(|_| Stat::RewriteFailed)?;
    ctx.store(off, &new, 0).map_err(|_| Stat::RewriteFailed)
}

#[inline(always)]
fn replace_port(ctx: &TcContext, proto: u8, src: bool, old: u16, new: u16) -> Result<(), Stat> {
    let off = match (proto, src) {
        (IPPROTO_ICMP, _) => ICMP_ID_OFF,
        (_, true) => L4_SPORT_OFF,
        (_, false) => L4_DPORT_OFF,
    };
    let (csum_off, flags) = l4_csum(proto);
    // The helpers take the field's bytes as they are in the packet.
    let (old, new) = (old.to_be(), new.to_be());
    ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), flags | 2)
        .map_err(|_| Stat::RewriteFailed)?;
    ctx.store(off, &new, 0).map_err(|_| Stat::RewriteFailed)
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
    let (outer_off, outer_old, quoted_off, quoted_old, quoted_old_port) = if rw.src {
        (IP_SRC_OFF, flow.saddr, QUOTED_DST_OFF, q.daddr, q.dport)
    } else {
        (IP_DST_OFF, flow.daddr, QUOTED_SRC_OFF, q.saddr, q.sport)
    };
    if outer_old != rw.addr {
        replace_addr(ctx, IPPROTO_ICMP, outer_off, outer_old, rw.addr)?;
    }
    if quoted_old != rw.addr {
        replace_quoted_addr(ctx, quoted_off, quoted_old, rw.addr)?;
    }
    if quoted_old_port != rw.port {
        let off = match (q.proto, rw.src) {
            (IPPROTO_ICMP, _) => QUOTED_ICMP_ID_OFF,
            (_, true) => QUOTED_DPORT_OFF,
            (_, false) => QUOTED_SPORT_OFF,
        };
        let (old, new) = (quoted_old_port.to_be(), rw.port.to_be());
        ctx.l4_csum_replace(ICMP_CSUM_OFF, u64::from(old), u64::from(new), 2)
            .map_err(|_| Stat::RewriteFailed)?;
        ctx.store(off, &new, 0).map_err(|_| Stat::RewriteFailed)?;
    }
    Ok(())
}

#[inline(always)]
fn replace_quoted_addr(ctx: &TcContext, off: usize, old: u32, new: u32) -> Result<(), Stat> {
    let old_csum: u16 = ctx.read(QUOTED_CSUM_OFF).ok_or(Stat::RewriteFailed)?;
    ctx.l3_csum_replace(QUOTED_CSUM_OFF, u64::from(old), u64::from(new), 4)
        .map_err(|_| Stat::RewriteFailed)?;
    let new_csum: u16 = ctx.read(QUOTED_CSUM_OFF).ok_or(Stat::RewriteFailed)?;
    // The ICMP checksum covers the quoted header: both its address and its checksum changed
    // (the two changes cancel out; spelled out so the sum is right by construction).
    ctx.l4_csum_replace(ICMP_CSUM_OFF, u64::from(old), u64::from(new), 4)
        .map_err(|_| Stat::RewriteFailed)?;
    ctx.l4_csum_replace(ICMP_CSUM_OFF, u64::from(old_csum), u64::from(new_csum), 2)
        .map_err(|_| Stat::RewriteFailed)?;
    ctx.store(off, &new, 0).map_err(|_| Stat::RewriteFailed)
}
