//! The integration-test harness: every test gets its own netd in a sandbox
//! ([`netd_testkit::Instance`], here named `TestEnv`), which removes everything it made, and
//! every process it started, on success, failure and panic, and fails the test when it can't.

pub use netd_testkit::{HOST_ADDR, Instance as TestEnv, OUTSIDE_ADDR, UPLINK};
