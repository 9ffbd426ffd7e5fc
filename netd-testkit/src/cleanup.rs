//! Clean-up that fails loudly: a guard that can't remove what it made says so and fails, so a
//! leak shows as a red test (or a failed benchmark) instead of a namespace left on the machine.

use std::fmt::Display;

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

/// Removes the directory tree at `path`; one that isn't there is fine.
pub fn remove_tree(path: &std::path::Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::Error::new(e).context(format!("remove {}", path.display())))
        }
        _ => Ok(()),
    }
}
