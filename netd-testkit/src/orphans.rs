//! What instances of a test or benchmark process that was killed left behind. Killed (a CI
//! job cut off, SIGKILL), a process runs no `Drop`, so its instances' namespaces, pin dirs,
//! state dirs and cgroups stay. The first instance a process makes removes those of every
//! process that is gone, so the next run on the machine leaves it clean.
//!
//! Only names of this kit's making count: an instance prefix is `nt` (tests) or `nb` (the
//! benchmark) and the making process's PID, then anything. Nothing of a process that still
//! runs is touched, and no process is ended: a resource something still holds stays, and is
//! named on stderr.

use std::path::Path;

use netd::netns;

use crate::cleanup::{remove_cgroup, remove_tree};

/// The PID in an instance prefix at the start of `name` (`nt<PID>x<N>...`, `nb<PID><arm>...`).
fn maker_pid(name: &str) -> Option<i32> {
    let rest = name
        .strip_prefix("nt")
        .or_else(|| name.strip_prefix("nb"))?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse().ok().filter(|pid| *pid > 0)
}

/// Whether process `pid` is gone (no such process; a PID reused since counts as running).
fn gone(pid: i32) -> bool {
    let signal_none = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None);
    signal_none == Err(nix::errno::Errno::ESRCH)
}

/// Names in `dir`, less `strip`, whose maker is gone (none when `dir` can't be read).
fn orphans_in(dir: &Path, strip: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| {
            name.strip_prefix(strip)
                .and_then(maker_pid)
                .is_some_and(gone)
        })
        .collect()
}

/// Removes the orphans of gone processes (see the module) from the namespaces' run dir and
/// `bpffs`, `temp`'s and `cgroups`' `netd-` dirs. Returns what it couldn't remove.
pub fn sweep(bpffs: &Path, temp: &Path, cgroups: Option<&Path>) -> Vec<String> {
    let mut left = Vec::new();
    let mut remove_each =
        |dir: &Path, strip: &str, remove: &dyn Fn(&Path) -> anyhow::Result<()>| {
            for name in orphans_in(dir, strip) {
                if let Err(e) = remove(&dir.join(name)) {
                    left.push(format!("{e:#}"));
                }
            }
        };
    remove_each(Path::new(netns::NETNS_RUN_DIR), "", &|path| {
        netns::remove(&path.file_name().unwrap_or_default().to_string_lossy())
    });
    remove_each(bpffs, "netd-", &remove_tree);
    remove_each(temp, "netd-", &remove_tree);
    if let Some(dir) = cgroups {
        remove_each(dir, "netd-", &remove_cgroup);
    }
    left
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn the_maker_is_read_from_both_prefixes() {
        assert_eq!(maker_pid("nt4242x0-host"), Some(4242));
        assert_eq!(maker_pid("nt4242x17"), Some(4242));
        assert_eq!(maker_pid("nb977ebpf-xdp-out"), Some(977));
        assert_eq!(maker_pid("ntx0-host"), None);
        assert_eq!(maker_pid("nt0x0"), None);
        assert_eq!(maker_pid("docker0"), None);
        assert_eq!(maker_pid("netns-nt12x0"), None);
    }

    /// The PID of a process that ran and is gone.
    fn dead_pid() -> i32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        pid
    }

    /// A scratch dir and a namespace, removed on drop (the sweep under test removes the
    /// namespace unless it fails).
    struct Scratch {
        dir: PathBuf,
        netns: String,
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let mut cleanup = crate::cleanup::Cleanup::of("the orphan sweep's scratch");
            if netns::path_of(&self.netns).exists() {
                cleanup.check(netns::remove(&self.netns));
            }
            cleanup.check(remove_tree(&self.dir));
            cleanup.finish();
        }
    }

    #[test]
    fn a_gone_makers_leftovers_go_and_a_running_ones_stay() {
        let dead = format!("nt{}x0", dead_pid());
        let running = format!("nt{}x9999", std::process::id());
        let scratch = Scratch {
            dir: std::env::temp_dir().join(format!("orphans-{running}")),
            netns: format!("{dead}-host"),
        };
        let [bpffs, temp, cgroups] = ["bpf", "tmp", "cg"].map(|d| scratch.dir.join(d));
        for dir in [&bpffs, &temp, &cgroups] {
            for prefix in [&dead, &running] {
                std::fs::create_dir_all(dir.join(format!("netd-{prefix}/pins"))).unwrap();
            }
        }
        // Not a kit's name: stays whatever its number.
        std::fs::create_dir_all(temp.join("netd-other1")).unwrap();
        netns::create(&scratch.netns).unwrap();

        // The cgroup stand-in is a plain dir with a subdir, which rmdir refuses: reported.
        let left = sweep(&bpffs, &temp, Some(&cgroups));

        let exists = |dir: &Path, prefix: &str| dir.join(format!("netd-{prefix}")).exists();
        assert!(
            !netns::path_of(&scratch.netns).exists(),
            "{} is left",
            scratch.netns
        );
        assert!(!exists(&bpffs, &dead) && !exists(&temp, &dead));
        assert!(exists(&bpffs, &running) && exists(&temp, &running) && exists(&cgroups, &running));
        assert!(temp.join("netd-other1").exists());
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].contains(&format!("netd-{dead}")), "{left:?}");
    }
}
