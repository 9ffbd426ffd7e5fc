//! Where the checksums of a translated packet are, and how the kernel helpers update them.

use aya_ebpf::bindings::BPF_F_MARK_MANGLED_0;
use netd_common::datapath::{IPPROTO_TCP, IPPROTO_UDP};

use super::parse::{L3_OFF, L4_OFF};

pub const IP_CSUM_OFF: usize = L3_OFF + 10;
const TCP_CSUM_OFF: usize = L4_OFF + 16;
const UDP_CSUM_OFF: usize = L4_OFF + 6;
pub const ICMP_CSUM_OFF: usize = L4_OFF + 2;

/// Where the L4 checksum is, and the helper flags for it. UDP's checksum is optional: with
/// BPF_F_MARK_MANGLED_0 a zero one stays zero and a computed zero becomes 0xffff.
#[inline(always)]
pub fn l4_csum(proto: u8) -> (usize, u64) {
    match proto {
        IPPROTO_TCP => (TCP_CSUM_OFF, 0),
        IPPROTO_UDP => (UDP_CSUM_OFF, u64::from(BPF_F_MARK_MANGLED_0)),
        _ => (ICMP_CSUM_OFF, 0),
    }
}
