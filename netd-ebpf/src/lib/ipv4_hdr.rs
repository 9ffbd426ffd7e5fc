//! The IPv4 header's fields that NAT and forwarding change (the addresses, the TTL), written
//! together with the header checksum: one `bpf_skb_store_bytes` call for the bytes from the TTL
//! to the destination address, the checksum fixed in the program (RFC 1624), where a store and
//! a `bpf_l3_csum_replace` call were two. The header checksum is always complete and covers
//! the header alone, so the sum is the helper's.
//!
//! Not a direct packet write: a program that writes the packet directly gets a prologue that
//! unclones every cloned skb it sees, written or not (each TCP data segment a local socket
//! sends is a clone), while the helper makes the packet writable only when it writes.

use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;

use super::{
    csum::{replace16, replace32},
    parse::{Frame as _, L3_OFF},
};

/// Offset of the TTL in the IPv4 header.
const TTL_IN_IP: usize = 8;

/// The IPv4 header from the TTL to the destination address, as it is in the packet.
#[derive(Clone, Copy)]
#[repr(C)]
struct TtlToDst {
    ttl: u8,
    proto: u8,
    csum: u16,
    src: u32,
    dst: u32,
}

/// Sets the source (`src`) or destination address of the IPv4 header at `l3_off` to `new` (as
/// it is in the packet); returns the header checksum before and after.
#[inline(always)]
pub fn set_addr(ctx: &TcContext, l3_off: usize, src: bool, new: u32) -> Option<(u16, u16)> {
    let off = l3_off + TTL_IN_IP;
    let mut h: TtlToDst = ctx.read(off)?;
    let before = h.csum;
    let field = if src { &mut h.src } else { &mut h.dst };
    h.csum = replace32(before, *field, new);
    *field = new;
    ctx.store(off, &h, 0).ok()?;
    Some((before, h.csum))
}

/// Decrements the TTL of the packet's IPv4 header `ip` (as it is in the packet now, read by the
/// caller), as forwarding does; `None` for a TTL of 0.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, ip: &Ipv4Hdr) -> Option<()> {
    let mut h = TtlToDst {
        ttl: ip.ttl,
        proto: ip.proto,
        csum: u16::from_ne_bytes(ip.check),
        src: u32::from_ne_bytes(ip.src_addr),
        dst: u32::from_ne_bytes(ip.dst_addr),
    };
    // The 16-bit word of the checksum, as it is in the packet.
    let old = u16::from_ne_bytes([h.ttl, h.proto]);
    h.ttl = h.ttl.checked_sub(1)?;
    h.csum = replace16(h.csum, old, u16::from_ne_bytes([h.ttl, h.proto]));
    ctx.store(L3_OFF + TTL_IN_IP, &h, 0).ok()
}
