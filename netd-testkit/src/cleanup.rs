//! Clean-up that fails loudly: a guard that can't remove what it made says so and fails, so a
//! leak shows as a red test (or a failed benchmark) instead of a namespace left on the machine.

use std::{fmt::Display, path::Path};

use anyhow::Context as _;

/// Clean-up failures a guard collects while it removes what it made.
pub struct Cleanup {
    what: String,
    failures: Vec<String>,
}

impl Cleanup {
    /// Clean-up of `what` (named in the failure message).
    pub fn of(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            failures: Vec::new(),
        }
    }

    /// Records `result`'s failure, if any, and goes on.
    pub fn check<E: Display>(&mut self, result: Result<(), E>) {
        if let Err(e) = result {
            self.failures.push(format!("{e:#}"));
        }
    }

    /// Panics naming every failure; when the thread is already panicking (a failed test
    /// unwinding), prints them instead: a second panic would abort and hide the first.
    pub fn finish(self) {
        if self.failures.is_empty() {
            return;
        }
        let message = format!(
            "clean-up of {} failed: {}",
            self.what,
            self.failures.join("; ")
        );
        if std::thread::panicking() {
            eprintln!("{message}");
        } else {
            panic!("{message}");
        }
    }
}

/// Ends, by PID, every process in the network namespace at `ns` (what netd started there: the
/// iptables datapath's userland proxies of containers a test left for the instance to
/// remove), and waits until they have exited.
pub fn end_processes_in(ns: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let ns_link = format!("net:[{}]", std::fs::metadata(ns)?.ino());
    let in_ns = |pid: &i32| {
        std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|l| l.as_os_str() == ns_link.as_str())
    };
    let inside: Vec<i32> = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != std::process::id() as i32)
        .filter(in_ns)
        .collect();
    for pid in &inside {
        // Gone already is fine.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::SIGKILL).ok();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // An exited process has no namespace left to show, even before it is reaped.
    while let Some(pid) = inside.iter().find(|pid| in_ns(pid)) {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("process {pid} in {} did not exit", ns.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// Removes the directory tree at `path`; one that isn't there is fine.
pub fn remove_tree(path: &Path) -> anyhow::Result<()> {
    gone(std::fs::remove_dir_all(path), "remove", path)
}

/// Removes the (empty) cgroup directory at `path`; one that isn't there is fine.
pub fn remove_cgroup(path: &Path) -> anyhow::Result<()> {
    gone(std::fs::remove_dir(path), "remove cgroup", path)
}

/// Removes the cgroup tree `relative` (cgroups only, children first) from every cgroup
/// hierarchy mounted: a runtime using cgroupfs on a hybrid machine makes its parent in each
/// v1 controller's hierarchy as well as in the unified one. Reports each it couldn't remove.
pub fn remove_cgroup_everywhere(relative: &str) -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    let mut left = Vec::new();
    for point in mounts.lines().filter_map(|l| {
        let mut fields = l.split_whitespace().skip(1);
        let (point, fstype) = (fields.next()?, fields.next()?);
        matches!(fstype, "cgroup" | "cgroup2").then_some(point)
    }) {
        if let Err(e) = remove_cgroup_tree(&Path::new(point).join(relative)) {
            left.push(format!("{e:#}"));
        }
    }
    if left.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", left.join("; "))
    }
}

/// Removes the cgroup at `path` and the cgroups under it, deepest first.
fn remove_cgroup_tree(path: &Path) -> anyhow::Result<()> {
    let children = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("read {}", path.display()))),
    };
    for entry in children.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    remove_cgroup(path)
}

/// `removed`, with "it was not there" counted as done.
fn gone(removed: std::io::Result<()>, what: &str, path: &Path) -> anyhow::Result<()> {
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::Error::new(e).context(format!("{what} {}", path.display())))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing() -> Cleanup {
        let mut cleanup = Cleanup::of("a thing");
        cleanup.check(Ok::<(), String>(()));
        cleanup.check(Err("it stuck"));
        cleanup
    }

    #[test]
    fn a_failure_panics_naming_it() {
        let panic = std::panic::catch_unwind(|| failing().finish()).unwrap_err();
        assert_eq!(
            panic.downcast_ref::<String>().unwrap(),
            "clean-up of a thing failed: it stuck"
        );
    }

    #[test]
    fn while_unwinding_a_failure_is_printed_and_the_first_panic_stays() {
        struct Guard;
        impl Drop for Guard {
            fn drop(&mut self) {
                failing().finish();
            }
        }
        let panic = std::panic::catch_unwind(|| {
            let _guard = Guard;
            panic!("the test's own failure");
        })
        .unwrap_err();
        assert_eq!(
            *panic.downcast_ref::<&str>().unwrap(),
            "the test's own failure"
        );
    }

    #[test]
    fn nothing_to_report_is_quiet() {
        let mut cleanup = Cleanup::of("a thing");
        cleanup.check(remove_tree(Path::new("/nonexistent/netd-testkit")));
        cleanup.finish();
    }
}
