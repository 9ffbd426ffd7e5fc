//! netd: container networking for Linux with an eBPF datapath.
pub mod bench;
pub mod bpf;
pub mod counter;
pub mod datapath;
pub mod demo;
pub mod netlink;
pub mod netns;
pub mod output;
pub mod sandbox;
