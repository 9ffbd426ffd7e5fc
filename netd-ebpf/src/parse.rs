//! Bounds-checked header parsing. Every read goes through `TcContext::load`, which fails
//! (instead of reading past the packet) when the frame is shorter than the header.

use aya_ebpf::programs::TcContext;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

/// The IP protocol number carried by an Ethernet frame, or `None` for non-IP and truncated
/// frames. For IPv6 this is the first next-header value (extension headers are not walked).
#[inline(always)]
pub fn ip_protocol(ctx: &TcContext) -> Option<u8> {
    let eth: EthHdr = ctx.load(0).ok()?;
    if eth.ether_type == EtherType::Ipv4 as u16 {
        let ip: Ipv4Hdr = ctx.load(EthHdr::LEN).ok()?;
        Some(ip.proto)
    } else if eth.ether_type == EtherType::Ipv6 as u16 {
        let ip: Ipv6Hdr = ctx.load(EthHdr::LEN).ok()?;
        Some(ip.next_hdr)
    } else {
        None
    }
}
