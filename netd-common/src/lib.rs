//! Map keys and values shared by the eBPF programs and the userspace controller.
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides agree byte for byte.
#![no_std]

pub mod datapath;

/// Implements aya's `Pod` for map types on the userspace side.
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is `repr(C)`, `Copy` and has no implicit padding (bytemuck checks).
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use user_pod;
