//! `count_protocols`: counts packets and bytes per L4 protocol on the interface it is attached
//! to, and passes every packet on untouched.

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC, macros::classifier, macros::map, maps::PerCpuArray,
    programs::TcContext,
};
use netd_common::counter::{Proto, ProtoCount};

use crate::parse;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

/// Pinned by name so the counts outlive the netd process that loaded the program.
#[map]
static PROTO_COUNTS: PerCpuArray<ProtoCount> = PerCpuArray::pinned(Proto::ALL.len() as u32, 0);

#[classifier]
pub fn count_protocols(ctx: TcContext) -> i32 {
    let proto = match parse::ip_protocol(&ctx) {
        Some(IPPROTO_TCP) => Proto::Tcp,
        Some(IPPROTO_UDP) => Proto::Udp,
        Some(IPPROTO_ICMP | IPPROTO_ICMPV6) => Proto::Icmp,
        _ => Proto::Other,
    };
    if let Some(slot) = PROTO_COUNTS.get_ptr_mut(proto as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += u64::from(ctx.len());
        }
    }
    // TC_ACT_UNSPEC is TCX_NEXT: let the next program (or the stack) decide.
    TC_ACT_UNSPEC
}
