//! IPv6 frames for the datapath tests: the fixed header, extension headers, UDP and ICMPv6
//! with correct checksums (a real receiver checks them), neighbour and router discovery.

use std::net::Ipv6Addr;

use crate::frames::{ACK, ETH_LEN, eth, sum16};

const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMPV6: u8 = 58;
const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DSTOPTS: u8 = 60;

/// An extension header.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    DestOpts,
    Routing {
        segments_left: u8,
    },
    /// `offset` in 8-byte units.
    Fragment {
        offset: u16,
        more: bool,
    },
}

impl Ext {
    fn number(self) -> u8 {
        match self {
            Ext::HopByHop => HOPOPTS,
            Ext::DestOpts => DSTOPTS,
            Ext::Routing { .. } => ROUTING,
            Ext::Fragment { .. } => FRAGMENT,
        }
    }

    /// The header's 8 bytes, `next` its next header.
    fn bytes(self, next: u8) -> [u8; 8] {
        match self {
            // One PadN option filling the header.
            Ext::HopByHop | Ext::DestOpts => [next, 0, 1, 4, 0, 0, 0, 0],
            Ext::Routing { segments_left } => [next, 0, 4, segments_left, 0, 0, 0, 0],
            Ext::Fragment { offset, more } => {
                let field = (offset << 3) | u16::from(more);
                let [hi, lo] = field.to_be_bytes();
                [next, 0, hi, lo, 0, 0, 0x12, 0x34]
            }
        }
    }
}

/// An IPv6 packet from `src` to `dst`, hop limit `hops`, through the extension headers `ext`
/// to `proto` carrying `l4` (as it is: see [`udp`] and [`icmpv6`] for checksums).
fn packet(src: Ipv6Addr, dst: Ipv6Addr, hops: u8, ext: &[Ext], proto: u8, l4: &[u8]) -> Vec<u8> {
    let payload_len = ext.len() * 8 + l4.len();
    let first = ext.first().map_or(proto, |e| e.number());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(payload_len as u16).to_be_bytes());
    ip.extend_from_slice(&[first, hops]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    for (i, e) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(proto, |n| n.number());
        ip.extend_from_slice(&e.bytes(next));
    }
    ip.extend_from_slice(l4);
    ip
}

/// An Ethernet frame of [`packet`].
pub fn frame(src: Ipv6Addr, dst: Ipv6Addr, ext: &[Ext], proto: u8, l4: &[u8]) -> Vec<u8> {
    eth(ETHERTYPE_IPV6, &packet(src, dst, 64, ext, proto, l4))
}

/// The checksum seed of the IPv6 pseudo-header.
fn pseudo_header_sum(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u32 {
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    u32::from(sum16(&pseudo, 0))
}

/// Whether the upper-layer checksum of `frame` (an Ethernet frame of an IPv6 packet without
/// extension headers) is right: what a receiver checks.
pub fn l4_checksum_ok(frame: &[u8]) -> bool {
    let ip = &frame[ETH_LEN..];
    let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let src: [u8; 16] = ip[8..24].try_into().unwrap();
    let dst: [u8; 16] = ip[24..40].try_into().unwrap();
    let seed = pseudo_header_sum(src.into(), dst.into(), ip[6], len);
    sum16(&ip[40..40 + len], seed) == 0xffff
}

/// A UDP datagram with its checksum.
pub fn udp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut l4 = Vec::with_capacity(len);
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&(len as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    let csum = !sum16(&l4, pseudo_header_sum(src, dst, UDP, len));
    l4[6..8].copy_from_slice(&csum.to_be_bytes());
    l4
}

/// An Ethernet frame of a UDP datagram carrying `payload` (the IPv6 twin of
/// [`crate::frames::udp_frame_carrying`]).
pub fn udp_frame_carrying(
    src: Ipv6Addr,
    sport: u16,
    dst: Ipv6Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    frame(src, dst, &[], UDP, &udp(src, sport, dst, dport, payload))
}

/// A TCP segment with `flags` (and, with ACK, acknowledging a peer's first sequence number),
/// no options or payload, with its checksum.
pub fn tcp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    let ack: u32 = if flags & ACK != 0 { 1001 } else { 0 };
    let mut l4 = Vec::with_capacity(20);
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&1000u32.to_be_bytes());
    l4.extend_from_slice(&ack.to_be_bytes());
    // Data offset (5 words), flags, window, checksum, urgent pointer.
    l4.extend_from_slice(&[5 << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    let csum = !sum16(&l4, pseudo_header_sum(src, dst, TCP, l4.len()));
    l4[16..18].copy_from_slice(&csum.to_be_bytes());
    l4
}

/// An ICMPv6 message of `type_`/`code` with `body` after the checksum, checksummed.
pub fn icmpv6(src: Ipv6Addr, dst: Ipv6Addr, type_: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut l4 = vec![type_, code, 0, 0];
    l4.extend_from_slice(body);
    let csum = !sum16(&l4, pseudo_header_sum(src, dst, ICMPV6, l4.len()));
    l4[2..4].copy_from_slice(&csum.to_be_bytes());
    l4
}

const ROUTER_ADVERT: u8 = 134;
const NEIGHBOUR_SOLICIT: u8 = 135;
const NEIGHBOUR_ADVERT: u8 = 136;
pub const ND_REDIRECT: u8 = 137;
const OPT_SOURCE_LLADDR: u8 = 1;
const OPT_TARGET_LLADDR: u8 = 2;
const OPT_PREFIX_INFO: u8 = 3;

/// A link-layer address option.
fn lladdr_option(kind: u8, mac: [u8; 6]) -> Vec<u8> {
    let mut opt = vec![kind, 1];
    opt.extend_from_slice(&mac);
    opt
}

/// A neighbour solicitation for `target`, announcing `mac` as the sender's (no option: none).
pub fn neighbour_solicit(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    mac: Option<[u8; 6]>,
) -> Vec<u8> {
    let mut body = vec![0u8; 4];
    body.extend_from_slice(&target.octets());
    if let Some(mac) = mac {
        body.extend(lladdr_option(OPT_SOURCE_LLADDR, mac));
    }
    icmpv6(src, dst, NEIGHBOUR_SOLICIT, 0, &body)
}

/// An unsolicited neighbour advertisement (override set) that `target` is at `mac`.
pub fn neighbour_advert(src: Ipv6Addr, dst: Ipv6Addr, target: Ipv6Addr, mac: [u8; 6]) -> Vec<u8> {
    let mut body = vec![0x20, 0, 0, 0];
    body.extend_from_slice(&target.octets());
    body.extend(lladdr_option(OPT_TARGET_LLADDR, mac));
    icmpv6(src, dst, NEIGHBOUR_ADVERT, 0, &body)
}

/// A router advertisement from `mac`, a default router for 30 minutes, announcing `prefix`/64
/// for address autoconfiguration.
pub fn router_advert(src: Ipv6Addr, dst: Ipv6Addr, mac: [u8; 6], prefix: Ipv6Addr) -> Vec<u8> {
    // Hop limit, flags, router lifetime (s), reachable time, retransmission timer.
    let mut body = vec![64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    body.extend(lladdr_option(OPT_SOURCE_LLADDR, mac));
    // Prefix information: /64, on-link and autonomous, a day valid and preferred.
    body.extend_from_slice(&[OPT_PREFIX_INFO, 4, 64, 0xc0]);
    body.extend_from_slice(&86_400u32.to_be_bytes());
    body.extend_from_slice(&86_400u32.to_be_bytes());
    body.extend_from_slice(&[0; 4]);
    body.extend_from_slice(&prefix.octets());
    icmpv6(src, dst, ROUTER_ADVERT, 0, &body)
}

/// The solicited-node multicast group of `addr` (ff02::1:ffXX:XXXX).
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
    ])
}

/// The Ethernet multicast address of IPv6 group `group` (33:33 and its last 32 bits).
pub fn multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The link-local address the kernel derives from `mac` (modified EUI-64).
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 2,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}
