//! The IPv4 header's fields that NAT and forwarding change (the addresses, the TTL), written
//! together with the header checksum: one `bpf_skb_store_bytes` call for the bytes from the TTL
//! to the destination address, the checksum fixed in the program (RFC 1624), where a store and
//! a `bpf_l3_csum_replace` call were two. The header checksum is always complete and covers
//! the header alone, so the sum is the helper's. The same store takes along what is next to
//! those bytes and changes with them: the ports right after a header without options (NAT of
//! address and port), the Ethernet header before it (forwarding: new MACs, TTL down).
//!
//! Not a direct packet write: a program that writes the packet directly gets a prologue that
//! unclones every cloned skb it sees, written or not (each TCP data segment a local socket
//! sends is a clone), while the helper makes the packet writable only when it writes.

use aya_ebpf::programs::TcContext;
use network_types::{eth::EtherType, ip::Ipv4Hdr};

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

impl TtlToDst {
    /// Sets the source (`src`) or destination address to `new`, the checksum with it.
    #[inline(always)]
    fn readdress(&mut self, src: bool, new: u32) {
        let field = if src { &mut self.src } else { &mut self.dst };
        self.csum = replace32(self.csum, *field, new);
        *field = new;
    }
}

/// Sets the source (`src`) or destination address of the IPv4 header at `l3_off` to `new` (as
/// it is in the packet); returns the header checksum before and after.
#[inline(always)]
pub fn set_addr(ctx: &TcContext, l3_off: usize, src: bool, new: u32) -> Option<(u16, u16)> {
    let off = l3_off + TTL_IN_IP;
    let mut h: TtlToDst = ctx.read(off)?;
    let before = h.csum;
    h.readdress(src, new);
    ctx.store(off, &h, 0).ok()?;
    Some((before, h.csum))
}

/// The IPv4 header from the TTL to the destination address and, right after it (a header
/// without options), the TCP or UDP ports, as they are in the packet.
#[derive(Clone, Copy)]
#[repr(C)]
struct TtlToPorts {
    head: TtlToDst,
    sport: u16,
    dport: u16,
}

/// Offset of the L4 header after an IPv4 header without options.
pub const L4_OFF_WITHOUT_OPTIONS: usize = L3_OFF + 20;

/// [`set_addr`] and, in the same store, the source (`src`) or destination port to `port` (as
/// it is in the packet), for the packet's own header when it has no options (its ports follow
/// it): one `bpf_skb_store_bytes` call where two were made.
#[inline(always)]
pub fn set_addr_and_port(ctx: &TcContext, src: bool, new: u32, port: u16) -> Option<()> {
    let off = L3_OFF + TTL_IN_IP;
    let mut h: TtlToPorts = ctx.read(off)?;
    h.head.readdress(src, new);
    if src {
        h.sport = port;
    } else {
        h.dport = port;
    }
    ctx.store(off, &h, 0).ok()
}

/// The Ethernet header of an untagged IPv4 frame and the fixed 20 bytes of the IPv4 header
/// (options, if any, follow untouched), as in the packet.
#[derive(Clone, Copy)]
#[repr(C)]
struct EthIp {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    ether_type: u16,
    ip: Ipv4Hdr,
}
const _: () = assert!(core::mem::size_of::<EthIp>() == 34);

/// What routing does to an untagged IPv4 frame it forwards, for its IPv4 header `ip` (as it
/// is in the packet now, read by the caller): readdressed from `src_mac` to `dst_mac`, TTL
/// down by one, in one store where readdressing and the TTL took one each. `None` for a TTL
/// of 0.
#[inline(always)]
pub fn forward_as(ctx: &TcContext, ip: &Ipv4Hdr, dst_mac: [u8; 6], src_mac: [u8; 6]) -> Option<()> {
    let frame = EthIp {
        dst_mac,
        src_mac,
        ether_type: EtherType::Ipv4 as u16,
        ip: one_hop_further(ip)?,
    };
    ctx.store(0, &frame, 0).ok()
}

/// Decrements the TTL of the packet's IPv4 header `ip` (as it is in the packet now, read by the
/// caller), as forwarding does; `None` for a TTL of 0.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, ip: &Ipv4Hdr) -> Option<()> {
    let ip = one_hop_further(ip)?;
    let h = TtlToDst {
        ttl: ip.ttl,
        proto: ip.proto,
        csum: u16::from_ne_bytes(ip.check),
        src: u32::from_ne_bytes(ip.src_addr),
        dst: u32::from_ne_bytes(ip.dst_addr),
    };
    ctx.store(L3_OFF + TTL_IN_IP, &h, 0).ok()
}

/// Header `ip` with its TTL down by one and its checksum fixed; `None` for a TTL of 0.
#[inline(always)]
fn one_hop_further(ip: &Ipv4Hdr) -> Option<Ipv4Hdr> {
    let mut ip = *ip;
    // The 16-bit word of the checksum, as it is in the packet.
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl = ip.ttl.checked_sub(1)?;
    let new = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.check = replace16(u16::from_ne_bytes(ip.check), old, new).to_ne_bytes();
    Some(ip)
}
