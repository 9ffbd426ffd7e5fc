//! Where the checksums of a translated packet are, how the kernel helpers update them, and
//! the incremental update of a checksum the program fixes itself.

use aya_ebpf::bindings::BPF_F_MARK_MANGLED_0;
use netd_common::datapath::{IPPROTO_TCP, IPPROTO_UDP};

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

/// A one's complement checksum `sum` once a 32-bit word it covers changed from `old` to `new`
/// (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')); all in the packet's byte order, read as the
/// machine's (one's complement sums don't depend on byte order).
#[inline(always)]
pub fn replace32(sum: u16, old: u32, new: u32) -> u16 {
    fold(
        u32::from(!sum)
            + u32::from(!(old as u16))
            + u32::from(!((old >> 16) as u16))
            + (new & 0xffff)
            + (new >> 16),
    )
}

/// [`replace32`] for a 16-bit word.
#[inline(always)]
pub fn replace16(sum: u16, old: u16, new: u16) -> u16 {
    fold(u32::from(!sum) + u32::from(!old) + u32::from(new))
}

/// Folds a sum of 16-bit words into 16 bits, complemented.
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
