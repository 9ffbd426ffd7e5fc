//! Where the checksums of a translated packet are, and how the kernel helpers update them.

use aya_ebpf::bindings::BPF_F_MARK_MANGLED_0;
use netd_common::datapath::{IPPROTO_TCP, IPPROTO_UDP};

use super::parse::L3_OFF;

pub const IP_CSUM_OFF: usize = L3_OFF + 10;
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;
const ICMP_CSUM_OFF: usize = 2;

/// Where the L4 checksum of the header at `l4_off` is, and the helper flags for it. UDP's
/// checksum is optional: with BPF_F_MARK_MANGLED_0 a zero one stays zero and a computed zero
/// becomes 0xffff.
#[inline(always)]
pub fn l4_csum(proto: u8, l4_off: usize) -> (usize, u64) {
    match proto {
        IPPROTO_TCP => (l4_off + TCP_CSUM_OFF, 0),
        IPPROTO_UDP => (l4_off + UDP_CSUM_OFF, u64::from(BPF_F_MARK_MANGLED_0)),
        _ => (icmp_csum(l4_off), 0),
    }
}

/// Where the checksum of the ICMP header at `l4_off` is.
#[inline(always)]
pub fn icmp_csum(l4_off: usize) -> usize {
    l4_off + ICMP_CSUM_OFF
}

/// Whether the L4 checksum of `proto` covers the addresses (through the pseudo-header): TCP's
/// and UDP's do; ICMP's doesn't, and other protocols' are none of NAT's business.
#[inline(always)]
pub fn covers_addresses(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP
}
