//! netd's eBPF programs: one program per attach point, shared logic in modules.
#![no_std]
#![no_main]

mod conntrack;
mod counter;
mod nat;
mod parse;
mod stats;
mod uplink;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
