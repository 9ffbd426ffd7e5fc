pub mod frames;
pub mod harness;
pub mod netdata;
