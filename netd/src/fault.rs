//! Fault injection for the crash-recovery tests, compiled only with the `fault-injection`
//! feature (`cargo xtask test` builds netd with it; a release build has none of this).
//!
//! Every step of a command that changes the kernel calls [`step`] with its name. With
//! `NETD_FAULT_KILL_AT=NAME`, netd kills itself with SIGKILL there, as `kill -9` would; with
//! `NETD_TEST_PAUSE_AFTER=NAME` it prints `paused after NAME` and sleeps, so a test can kill
//! it at a known point; with `NETD_FAULT_LIST=1` it prints every step it passes, so a test
//! can enumerate them.

#[cfg(feature = "fault-injection")]
pub fn step(name: &str) {
    if std::env::var_os("NETD_FAULT_LIST").is_some() {
        eprintln!("netd-step {name}");
    }
    if std::env::var("NETD_FAULT_KILL_AT").is_ok_and(|s| s == name) {
        // SAFETY: raise has no preconditions; SIGKILL ends the process here.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    if std::env::var("NETD_TEST_PAUSE_AFTER").is_ok_and(|s| s == name) {
        eprintln!("paused after {name}");
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn step(_name: &str) {}
