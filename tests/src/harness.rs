//! The integration-test harness: every test gets its own netd in a sandbox
//! ([`netd_testkit::Instance`], here named `TestEnv`), which removes everything it made, and
//! every process it started, on success, failure and panic, and fails the test when it can't.

use std::path::PathBuf;

pub use netd_testkit::{HOST_ADDR, Instance as TestEnv, OUTSIDE_ADDR, UPLINK};

/// The netd binary under test (`NETD_BIN`); panics, naming the fix, when it isn't set.
pub fn netd_bin() -> PathBuf {
    netd_testkit::netd_bin().unwrap_or_else(|e| panic!("{e:#}"))
}
