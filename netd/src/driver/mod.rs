//! Drivers: the kernel plumbing of netd's objects. `bridge` makes and removes a network's
//! bridge and a container's namespace and veth (and calls the datapath for each); `p2p` the
//! point-to-point veths of `netd link`. Each validates what it can without changing the kernel,
//! then sets up; a teardown tries every step and returns every failure.
//!
//! `netlink`, `netns`, `etcfiles` and `exec` are the tools they are made of.

pub mod bridge;
pub mod etcfiles;
pub mod exec;
pub mod netlink;
pub mod netns;
pub mod p2p;

use anyhow::Result;

/// What a teardown couldn't remove: every step is tried, each failure is kept.
#[derive(Debug, Default)]
pub struct Failures(Vec<String>);

impl Failures {
    /// Keeps `result`'s error, if any, naming `what` failed.
    pub fn note(&mut self, what: &str, result: Result<()>) {
        if let Err(e) = result {
            self.0.push(format!("{what}: {e:#}"));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok` when nothing failed, else one line naming each failure.
    pub fn into_result(self, context: &str) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        anyhow::bail!("{context}: {}", self.0.join("; "))
    }
}
