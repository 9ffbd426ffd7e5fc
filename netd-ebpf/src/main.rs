//! netd's eBPF programs: one program per attach point, shared logic in modules.
#![no_std]
#![no_main]
// Map keys and values go to the helpers by reference: by value they would be copied onto the
// 512-byte BPF stack first (a CtEntry is 152 bytes), and map-value pointers would be lost.
#![allow(clippy::needless_borrows_for_generic_args)]

mod bridge;
mod conntrack;
mod counter;
mod events;
mod fib;
mod host;
mod maps;
mod nat;
mod parse;
mod policy;
mod sockets;
mod stats;
mod uplink;
mod uplink_xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
