//! netd: container networking for Linux with an eBPF datapath.
//!
//! Layers, one folder each (see ARCHITECTURE.md):
//! - [`cli`]: the `netd` command line (clap), parsing into the core's typed specs;
//! - [`core`]: the typed specs, the planner and the [`core::Controller`] every front end calls;
//! - [`driver`]: the kernel plumbing (bridge, veths, namespaces, `netd link`'s veths);
//! - [`store`]: the state, an SQLite database;
//! - [`datapath`]: the NAT, forwarding and filtering drivers (eBPF, iptables).
pub mod cli;
pub mod core;
pub mod datapath;
pub mod driver;
pub mod fault;
pub mod store;

// Short paths kept for the datapath drivers, the benchmark and the tests.
pub use datapath::pins as bpf;
pub use driver::{netlink, netns};
