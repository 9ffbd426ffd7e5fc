//! netd's eBPF programs, laid out like Cilium's `bpf/`: one file per attach point in `progs`,
//! the logic they share in `lib`. A program file imports only from `lib`, never from another
//! program file.
#![no_std]
#![no_main]
// Map keys and values go to the helpers by reference: by value they would be copied onto the
// 512-byte BPF stack first (a CtEntry is 152 bytes), and map-value pointers would be lost.
#![allow(clippy::needless_borrows_for_generic_args)]
// The library folder, as in Cilium's `bpf/lib`: the crate's library target is `anchor.rs`, so
// `lib` here is an ordinary module (the lint expects a `lib.rs` crate root).
#![allow(special_module_name)]

mod lib;
mod progs;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
