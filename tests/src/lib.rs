pub mod engines;
pub mod frames;
pub mod harness;
pub mod netdata;
pub mod topology;
