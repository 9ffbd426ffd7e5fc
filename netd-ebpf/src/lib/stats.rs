//! Per-reason packet counters (`STATS`), read by `netd stats`.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap},
};
use netd_common::datapath::{ENDPOINTS_MAX, EndpointDropKey, Stat};

use super::maps;

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Stat::COUNT, 0);
#[map]
static ENDPOINT_DROPS: PerCpuHashMap<EndpointDropKey, u64> =
    PerCpuHashMap::pinned(ENDPOINTS_MAX, 0);

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

/// Counts a packet of the container at `addr` (wire byte order) dropped for `reason`. An
/// address no container has (none, or a spoofed source anywhere in a container subnet) is not
/// counted: keys a sender picks would fill the map, and the containers' drops go uncounted.
#[inline(always)]
pub fn count_endpoint_drop(addr: u32, reason: Stat) {
    if maps::endpoint(addr).is_none() {
        return;
    }
    let key = EndpointDropKey {
        endpoint: maps::endpoint_key(addr),
        reason: reason as u32,
    };
    match ENDPOINT_DROPS.get_ptr_mut(&key) {
        // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
        Some(slot) => unsafe { *slot += 1 },
        None => {
            // Another program on this CPU can't have raced us; a full map loses the count.
            let _ = ENDPOINT_DROPS.insert(&key, &1, u64::from(BPF_NOEXIST));
        }
    }
}
