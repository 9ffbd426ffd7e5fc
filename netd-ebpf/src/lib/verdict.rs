//! Turning what a TC program did with a packet into its action, counted.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_coarse_ns,
};
use netd_common::datapath::Stat;

use super::{
    events::{self, Tuple},
    parse::{Flow, Frame},
    stats,
};

/// TCX_NEXT: the next program, or the stack, decides.
pub const PASS: i32 = TC_ACT_UNSPEC;
pub const DROP: i32 = TC_ACT_SHOT;

/// Counts what happened to the packet and turns it into a TC action.
#[inline(always)]
pub fn verdict(outcome: Stat) -> i32 {
    stats::count(outcome);
    if outcome.drops() { DROP } else { PASS }
}

/// Drops `flow`'s packet for `reason`, counted against the container at `container` and
/// reported as an event.
#[inline(always)]
pub fn dropped(ctx: &impl Frame, flow: &Flow, reason: Stat, container: u32) -> Stat {
    events::dropped(&Tuple::of(flow), reason, container, ctx.ifindex())
}

/// CLOCK_MONOTONIC as of the last tick: flows time out after seconds, and the coarse clock
/// reads a variable where `bpf_ktime_get_ns` reads the clocksource (TSC) and scales it.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}
