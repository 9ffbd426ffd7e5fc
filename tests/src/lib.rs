pub mod frames;
pub mod harness;
pub mod netdata;
pub mod progrun;
pub mod topology;
