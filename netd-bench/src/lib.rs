//! netd's benchmark and demo, kept out of the product: both drive the `netd` binary named by
//! `NETD_BIN` (`cargo xtask bench|demo` build it and set it) in sandboxes of their own.
pub mod bench;
pub mod demo;
