//! IPv6 as a container sends it: the fixed header, a bounded walk over the extension headers
//! to the upper-layer protocol, and what neighbour discovery announces in a packet.

use netd_common::datapath::{Addr, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Stat};

use aya_ebpf::programs::TcContext;
use network_types::eth::{EthHdr, EtherType};

use super::parse::{FRAG_FIRST, FRAG_LATER, FRAG_NONE, Frame as _, L3_OFF};

/// Whether the frame is an untagged IPv6 one (what an IPv4 program hands over by tail call
/// once its parse found no IPv4).
#[inline(always)]
pub fn is_untagged_frame(ctx: &TcContext) -> bool {
    ctx.read::<EthHdr>(0)
        .is_some_and(|eth| eth.ether_type == EtherType::Ipv6 as u16)
}

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// Extension headers followed before the packet is dropped: real traffic carries two at most
/// (hop-by-hop for MLD, a fragment header), and each one is a few instructions the verifier
/// walks unrolled.
const MAX_EXT_HEADERS: usize = 6;
pub const FIXED_LEN: usize = 40;
/// The fragment header's offset (in 8-byte units, the top 13 bits) and "more fragments" flag.
const FRAG_OFFSET_MASK: u16 = 0xfff8;
const FRAG_MORE: u16 = 1;

const ICMPV6_MLD_QUERY: u8 = 130;
const ICMPV6_MLD_REPORT: u8 = 131;
const ICMPV6_MLD_DONE: u8 = 132;
const ICMPV6_ROUTER_SOLICIT: u8 = 133;
const ICMPV6_ROUTER_ADVERT: u8 = 134;
const ICMPV6_NEIGHBOUR_SOLICIT: u8 = 135;
const ICMPV6_NEIGHBOUR_ADVERT: u8 = 136;
const ICMPV6_REDIRECT: u8 = 137;
const ICMPV6_MLD2_REPORT: u8 = 143;
/// Neighbour discovery options that name a link-layer address (RFC 4861 4.6.1).
const ND_OPT_SOURCE_LLADDR: u8 = 1;
const ND_OPT_TARGET_LLADDR: u8 = 2;
/// Options read after a solicitation or advertisement: a real one carries one.
const MAX_ND_OPTIONS: usize = 3;
/// Where the target address sits in a neighbour solicitation or advertisement, and where the
/// options start in those and in a router solicitation.
const ND_TARGET_OFF: usize = 8;
const NS_NA_OPTIONS_OFF: usize = 24;
const RS_OPTIONS_OFF: usize = 8;

/// The IPv6 fixed header, addresses as map words (wire byte order).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Fixed {
    pub vtc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: Addr,
    pub dst: Addr,
}

/// What the isolation needs of an IPv6 packet.
pub struct Packet {
    pub src: Addr,
    pub dst: Addr,
    /// The upper-layer protocol, past the extension headers.
    pub proto: u8,
    /// Ports for TCP and UDP (not a later fragment), host byte order.
    pub sport: u16,
    pub dport: u16,
    /// The ICMPv6 type (not a later fragment), else 0.
    pub icmp_type: u8,
    /// `FRAG_*`, and the fragment header's identification (what a datagram's fragments
    /// share) when there is one.
    pub frag: u8,
    pub frag_id: u32,
    pub l4_off: usize,
    /// Where the packet ends in the frame (padding after it aside).
    pub end: usize,
}

/// Parses an untagged Ethernet + IPv6 frame down to its upper-layer header. An `Err` is the
/// reason the packet can't be checked, and is dropped.
///
/// Headers are copied out with `bpf_skb_load_bytes`, not read in place: at the offsets the
/// walk computes, LLVM merges the packet pointers of the walk's paths into code the verifier
/// refuses. The helper calls cost IPv6 only (between containers too), never IPv4.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, Stat> {
    let ip: Fixed = ctx.load(L3_OFF).map_err(|_| Stat::TruncatedL3)?;
    if ip.vtc_flow[0] >> 4 != 6 {
        return Err(Stat::BadIpHeader);
    }
    let end = L3_OFF + FIXED_LEN + usize::from(u16::from_be_bytes(ip.payload_len));
    if (ctx.len() as usize) < end {
        return Err(Stat::TruncatedL3);
    }
    let mut p = Packet {
        src: ip.src,
        dst: ip.dst,
        proto: ip.next_header,
        sport: 0,
        dport: 0,
        icmp_type: 0,
        frag: FRAG_NONE,
        frag_id: 0,
        l4_off: L3_OFF + FIXED_LEN,
        end,
    };
    walk_extension_headers(ctx, &mut p)?;
    // The last extension header runs past the payload length.
    if p.l4_off > p.end {
        return Err(Stat::TruncatedL3);
    }
    if p.frag == FRAG_LATER {
        return Ok(p);
    }
    match p.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            // A TCP header is longer, but the ports are all the policy reads.
            let ports: [u8; 4] = read_within(ctx, p.l4_off, p.end).ok_or(Stat::TruncatedL4)?;
            p.sport = u16::from_be_bytes([ports[0], ports[1]]);
            p.dport = u16::from_be_bytes([ports[2], ports[3]]);
        }
        IPPROTO_ICMPV6 => {
            let head: [u8; 4] = read_within(ctx, p.l4_off, p.end).ok_or(Stat::TruncatedL4)?;
            p.icmp_type = head[0];
        }
        _ => {}
    }
    Ok(p)
}

/// Follows the extension headers to the upper-layer protocol, at most [`MAX_EXT_HEADERS`].
#[inline(always)]
fn walk_extension_headers(ctx: &TcContext, p: &mut Packet) -> Result<(), Stat> {
    for _ in 0..MAX_EXT_HEADERS {
        match p.proto {
            IPPROTO_HOPOPTS | IPPROTO_DSTOPTS | IPPROTO_ROUTING => {
                // Next header, length in 8-byte units past the first 8; for a routing header,
                // its type and the segments left.
                let h: [u8; 4] = read_within(ctx, p.l4_off, p.end).ok_or(Stat::TruncatedL3)?;
                if p.proto == IPPROTO_HOPOPTS && p.l4_off != L3_OFF + FIXED_LEN {
                    return Err(Stat::Ipv6Header);
                }
                // Segments left: the packet is bound for another address than the one checked.
                if p.proto == IPPROTO_ROUTING && h[3] != 0 {
                    return Err(Stat::Ipv6Header);
                }
                p.proto = h[0];
                p.l4_off += (usize::from(h[1]) + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let h: [u8; 8] = read_within(ctx, p.l4_off, p.end).ok_or(Stat::TruncatedL3)?;
                if p.frag != FRAG_NONE {
                    return Err(Stat::Ipv6Header);
                }
                let offset_flags = u16::from_be_bytes([h[2], h[3]]);
                p.frag_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                p.frag = if offset_flags & FRAG_OFFSET_MASK != 0 {
                    FRAG_LATER
                } else if offset_flags & FRAG_MORE != 0 {
                    FRAG_FIRST
                } else {
                    // An atomic fragment: the whole datagram.
                    FRAG_NONE
                };
                p.proto = h[0];
                p.l4_off += 8;
            }
            IPPROTO_AH => {
                // Its length is in 4-byte units, past the first 8 bytes.
                let h: [u8; 2] = read_within(ctx, p.l4_off, p.end).ok_or(Stat::TruncatedL3)?;
                p.proto = h[0];
                p.l4_off += (usize::from(h[1]) + 2) * 4;
            }
            _ => return Ok(()),
        }
        if p.frag == FRAG_LATER {
            // Beyond the fragment header is the middle of a datagram, not a header.
            return Ok(());
        }
    }
    match p.proto {
        IPPROTO_HOPOPTS | IPPROTO_DSTOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_AH => {
            Err(Stat::Ipv6Header)
        }
        _ => Ok(()),
    }
}

/// The `T` at `off`, if it ends by `end` (the packet's end) and within the frame.
#[inline(always)]
pub fn read_within<T: Copy>(ctx: &TcContext, off: usize, end: usize) -> Option<T> {
    if off + core::mem::size_of::<T>() > end {
        return None;
    }
    ctx.load(off).ok()
}

impl Packet {
    /// Neighbour or router solicitation, or neighbour advertisement: address resolution,
    /// which goes on to the bridge as ARP does, once [`check_nd`] found it the sender's own.
    #[inline(always)]
    pub fn is_neighbour_discovery(&self) -> bool {
        self.proto == IPPROTO_ICMPV6
            && matches!(
                self.icmp_type,
                ICMPV6_ROUTER_SOLICIT | ICMPV6_NEIGHBOUR_SOLICIT | ICMPV6_NEIGHBOUR_ADVERT
            )
    }

    /// A multicast listener query, report or done: how the bridge learns where to send a
    /// group's packets.
    #[inline(always)]
    pub fn is_mld(&self) -> bool {
        self.proto == IPPROTO_ICMPV6
            && matches!(
                self.icmp_type,
                ICMPV6_MLD_QUERY | ICMPV6_MLD_REPORT | ICMPV6_MLD_DONE | ICMPV6_MLD2_REPORT
            )
    }
}

/// Checks the neighbour discovery a container sends: no router advertisement or redirect,
/// no fragmented discovery (RFC 6980), a neighbour advertisement only for its own address
/// (`owns` says which are; of link-local ones, the one its MAC makes, see
/// [`link_local_of`]), and every link-layer address option its own MAC. Anything else passes
/// unchanged. A function of its own: inlined, its registers' spills would deepen
/// `endpoint_ingress6`'s frame to where, with the hairpin check's FIB lookup called on top,
/// the chain is exactly the 512 bytes the verifier allows (496 this way).
#[inline(never)]
pub fn check_nd(
    ctx: &TcContext,
    p: &Packet,
    mac: &[u8; 6],
    owns: impl Fn(Addr) -> bool,
) -> Result<(), Stat> {
    if p.proto != IPPROTO_ICMPV6 || p.frag == FRAG_LATER {
        return Ok(());
    }
    let options_off = match p.icmp_type {
        ICMPV6_ROUTER_ADVERT | ICMPV6_REDIRECT => return Err(Stat::SpoofedNd),
        ICMPV6_ROUTER_SOLICIT => RS_OPTIONS_OFF,
        ICMPV6_NEIGHBOUR_SOLICIT => NS_NA_OPTIONS_OFF,
        ICMPV6_NEIGHBOUR_ADVERT => {
            let target: Addr =
                read_within(ctx, p.l4_off + ND_TARGET_OFF, p.end).ok_or(Stat::TruncatedL4)?;
            let own = if is_link_local(&target) {
                target == link_local_of(mac)
            } else {
                owns(target)
            };
            if !own {
                return Err(Stat::SpoofedNd);
            }
            NS_NA_OPTIONS_OFF
        }
        _ => return Ok(()),
    };
    if p.frag != FRAG_NONE {
        return Err(Stat::Ipv6Header);
    }
    check_nd_options(ctx, p.l4_off + options_off, p.end, mac)
}

/// Every source or target link-layer address option from `off` on names `mac`.
#[inline(always)]
fn check_nd_options(
    ctx: &TcContext,
    mut off: usize,
    end: usize,
    mac: &[u8; 6],
) -> Result<(), Stat> {
    for _ in 0..MAX_ND_OPTIONS {
        if off >= end {
            return Ok(());
        }
        // Type, length (in 8-byte units), and for the link-layer options the MAC.
        let opt: [u8; 8] = read_within(ctx, off, end).ok_or(Stat::TruncatedL4)?;
        if opt[1] == 0 {
            // RFC 4861: a zero length is invalid, the whole message is discarded.
            return Err(Stat::SpoofedNd);
        }
        let names_mac = opt[0] == ND_OPT_SOURCE_LLADDR || opt[0] == ND_OPT_TARGET_LLADDR;
        if names_mac && opt[2..8] != mac[..] {
            return Err(Stat::SpoofedNd);
        }
        off += usize::from(opt[1]) * 8;
    }
    if off < end {
        // More options than a real message carries: one unread could name another MAC.
        return Err(Stat::SpoofedNd);
    }
    Ok(())
}

/// fe80::/10.
#[inline(always)]
pub fn is_link_local(addr: &Addr) -> bool {
    let b = addr[0].to_ne_bytes();
    b[0] == 0xfe && b[1] & 0xc0 == 0x80
}

/// The link-local address of an interface with `mac`: fe80::/64 with the modified EUI-64
/// interface identifier (RFC 4291 appendix A), which netd has the kernel make
/// (`addr_gen_mode` 0).
#[inline(always)]
pub fn link_local_of(mac: &[u8; 6]) -> Addr {
    [
        u32::from_ne_bytes([0xfe, 0x80, 0, 0]),
        0,
        u32::from_ne_bytes([mac[0] ^ 0x02, mac[1], mac[2], 0xff]),
        u32::from_ne_bytes([0xfe, mac[3], mac[4], mac[5]]),
    ]
}

/// ff00::/8.
#[inline(always)]
pub fn is_multicast(addr: &Addr) -> bool {
    addr[0].to_ne_bytes()[0] == 0xff
}

/// A link-local address, or a multicast group of link-local scope (ff02::/16, what neighbour
/// discovery and MLD use): nothing the stack routes beyond the link.
#[inline(always)]
pub fn is_link_scope(addr: &Addr) -> bool {
    let b = addr[0].to_ne_bytes();
    is_link_local(addr) || b[0] == 0xff && b[1] & 0x0f == 2
}

/// An address that carries an IPv4 one: IPv4-mapped (::ffff:0:0/96) or IPv4-compatible
/// (::/96, loopback and unspecified included). No packet from a network comes from one.
#[inline(always)]
pub fn embeds_ipv4(addr: &Addr) -> bool {
    addr[0] | addr[1] == 0 && (addr[2] == 0 || addr[2] == u32::from_be(0xffff))
}

/// The unspecified address (::), the source of duplicate address detection.
#[inline(always)]
pub fn is_unspecified(addr: &Addr) -> bool {
    addr[0] | addr[1] | addr[2] | addr[3] == 0
}

/// Whether `addr` is in the `prefix_len` bits of `subnet` (both map words, wire order).
#[inline(always)]
pub fn in_subnet(addr: &Addr, subnet: &Addr, prefix_len: u8) -> bool {
    let mut left = u32::from(prefix_len.min(128));
    for i in 0..4 {
        let bits = left.min(32);
        let mask = if bits == 0 {
            0
        } else {
            u32::MAX << (32 - bits)
        };
        if u32::from_be(addr[i]) & mask != u32::from_be(subnet[i]) & mask {
            return false;
        }
        left -= bits;
    }
    true
}
