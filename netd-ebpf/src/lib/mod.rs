//! What the programs share, one module per concern.

pub mod conntrack;
pub mod csum;
pub mod events;
pub mod fib;
pub mod frag;
pub mod inbound;
pub mod ipv4_hdr;
pub mod ipv6;
pub mod maps;
pub mod nat;
pub mod nat66;
pub mod parse;
pub mod policy;
pub mod sockets;
pub mod stats;
pub mod tcp_window;
pub mod verdict;
