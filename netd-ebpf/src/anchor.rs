//! Exists so that netd's build.rs can depend on this crate; the programs are in the binary.
#![no_std]
