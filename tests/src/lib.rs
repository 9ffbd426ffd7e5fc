pub mod cli;
pub mod containerd;
pub mod counters;
pub mod engines;
pub mod flow;
pub mod frames;
pub mod frames6;
pub mod harness;
pub mod netdata;
pub mod progrun;
pub mod rawsock;
pub mod topology;

/// Echo servers, waits and packet counters, shared with the benchmark.
pub use netd_testkit::traffic;
