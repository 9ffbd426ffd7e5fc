pub mod counters;
pub mod frames;
pub mod harness;
pub mod netdata;
pub mod progrun;
pub mod rawsock;
pub mod topology;
