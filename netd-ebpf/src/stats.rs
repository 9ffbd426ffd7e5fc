//! Per-reason packet counters (`STATS`), read by `netd stats`.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use netd_common::datapath::Stat;

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Stat::COUNT, 0);

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}
