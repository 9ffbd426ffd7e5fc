//! netd: container networking for Linux with an eBPF datapath.
pub mod bpf;
pub mod container;
pub mod controller;
pub mod daemon;
pub mod datapath;
pub mod etcfiles;
pub mod exec;
pub mod ipam;
pub mod netlink;
pub mod netns;
pub mod network;
pub mod output;
pub mod ports;
pub mod state;
pub mod views;
