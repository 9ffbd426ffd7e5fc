//! The `redirect` arm's map type, shared by its program (`main.rs`) and netd-bench.
#![no_std]

/// Where the program sends a packet for one destination address (the map's key: an IPv4
/// address in the first word, the rest zero; or an IPv6 address, each word as the packet
/// carries it).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Route {
    /// The frame's new destination and source MACs, in frame order.
    pub macs: [u8; 12],
    pub ifindex: u32,
    /// Non-zero: into the namespace of `ifindex`'s veth peer (`bpf_redirect_peer`); zero:
    /// out of `ifindex` (`bpf_redirect`).
    pub peer: u32,
}

// SAFETY: `repr(C)`, plain integers, no padding (12 + 4 + 4 bytes).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Route {}
