//! The per-protocol packet counter: the first end-to-end proof of the toolchain.

/// Name of the per-CPU array of [`ProtoCount`], indexed by [`Proto`].
pub const PROTO_COUNTS_MAP: &str = "PROTO_COUNTS";
/// Name of the TC program that fills it.
pub const COUNTER_PROG: &str = "count_protocols";

/// Slots of the counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp = 0,
    Udp = 1,
    Icmp = 2,
    Other = 3,
}

impl Proto {
    pub const ALL: [Proto; 4] = [Proto::Tcp, Proto::Udp, Proto::Icmp, Proto::Other];

    pub const fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Other => "other",
        }
    }
}

/// Packets and bytes seen for one protocol on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ProtoCount {
    pub packets: u64,
    pub bytes: u64,
}

crate::user_pod!(ProtoCount);
