//! Network namespaces: named ones under /run/netns (what `ip netns` shows), entering one, and
//! running a closure inside one (setns only affects the calling thread, which goes back to its
//! own namespace afterwards).

use std::{
    fs::{self, File, OpenOptions},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};

/// Where `ip netns` keeps its names; netd uses the same place so both tools see each other.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The path of the named namespace `name`.
pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Checks that `name` can be a file name under /run/netns.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 200 || name == "." || name == ".." || name.contains('/') {
        bail!("invalid namespace name {name:?}: must be 1-200 bytes without '/'");
    }
    Ok(())
}

/// Moves the calling thread into the network namespace at `path`. Threads it spawns afterwards
/// inherit the namespace, so call this before starting a multi-threaded runtime.
pub fn enter(path: &Path) -> Result<()> {
    let file =
        File::open(path).with_context(|| format!("open network namespace {}", path.display()))?;
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter network namespace {}", path.display()))
}

/// Runs `f` inside the network namespace at `path` (the current one if `None`), on the calling
/// thread: it enters the namespace and goes back after `f`, even if `f` panics. A thread of its
/// own per call would cost a clone, a join and, on a busy machine, a wait for a CPU to run it
/// (up to milliseconds each, several times a container create).
pub fn run_in<T>(path: Option<&Path>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(path) = path else {
        return f();
    };
    let _back = Home::save()?;
    enter(path)?;
    f()
}

/// The calling thread's network namespace, entered again on drop.
struct Home(File);

impl Home {
    fn save() -> Result<Self> {
        File::open("/proc/thread-self/ns/net")
            .map(Self)
            .context("open this thread's network namespace")
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET) {
            // Carrying on in another namespace would apply the host's changes to it.
            eprintln!("netd: return to the thread's network namespace: {e}");
            std::process::abort();
        }
    }
}

/// Creates the named network namespace `name` and returns its path. Fails if it exists.
pub fn create(name: &str) -> Result<PathBuf> {
    validate_name(name)?;
    share_run_dir()?;
    let path = path_of(name);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                anyhow::anyhow!("network namespace {name:?} already exists")
            }
            _ => anyhow::Error::new(e).context(format!("create {}", path.display())),
        })?;
    let bound = Home::save().and_then(|_back| {
        unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mount the new namespace on {}", path.display()))
    });
    if let Err(e) = bound {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Makes /run/netns a shared mount point, as `ip netns add` does before its first namespace:
/// were it a plain directory, the first `ip netns add` after netd's would bind-mount it over
/// itself, hiding netd's namespace mounts beneath (they could then never be removed by path).
/// Shared, an unmount in one mount namespace also reaches the others.
fn share_run_dir() -> Result<()> {
    fs::create_dir_all(NETNS_RUN_DIR).with_context(|| format!("create {NETNS_RUN_DIR}"))?;
    let share = || {
        mount(
            None::<&str>,
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match share() {
        Ok(()) => return Ok(()),
        // Not a mount point yet: make it one.
        Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(e).with_context(|| format!("make {NETNS_RUN_DIR} shared")),
    }
    mount(
        Some(NETNS_RUN_DIR),
        NETNS_RUN_DIR,
        Some("none"),
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind-mount {NETNS_RUN_DIR} on itself"))?;
    share().with_context(|| format!("make {NETNS_RUN_DIR} shared"))
}

/// Removes the named network namespace `name`; a missing one is not an error. The namespace
/// itself (and the interfaces in it) go away once no process or mount holds it any more.
pub fn remove(name: &str) -> Result<()> {
    validate_name(name)?;
    let path = path_of(name);
    if !path.exists() {
        return Ok(());
    }
    // EINVAL: not a mount point (a half-made namespace); the file still goes.
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(e).with_context(|| format!("unmount {}", path.display())),
    }
    fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))
}

/// Whether the named namespace exists.
pub fn exists(name: &str) -> bool {
    path_of(name).exists()
}

/// Waits until something listens on TCP `port` (IPv4 or dual-stack) in the namespace at `ns`.
pub fn wait_tcp_listener(ns: &Path, port: u16, timeout: std::time::Duration) -> Result<()> {
    let local = format!(":{port:04X}");
    let is_listener = |line: &str| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == "0A"
    };
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        // /proc/thread-self/net shows the namespace of the reading thread.
        let listening = run_in(Some(ns), || {
            let mut tables = fs::read_to_string("/proc/thread-self/net/tcp")?;
            tables += &fs::read_to_string("/proc/thread-self/net/tcp6").unwrap_or_default();
            Ok(tables.lines().any(is_listener))
        })?;
        if listening {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    bail!(
        "nothing listens on TCP port {port} in {} after {timeout:?}",
        ns.display()
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    /// The inode of the calling thread's network namespace.
    fn current() -> u64 {
        fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    /// Removes the named namespace when the test ends, passed or not.
    struct Named(String);

    impl Drop for Named {
        fn drop(&mut self) {
            remove(&self.0).unwrap();
        }
    }

    #[test]
    fn run_in_enters_the_namespace_and_returns_even_after_a_panic() {
        let ns = Named(format!("netd-unit-{}", std::process::id()));
        let path = create(&ns.0).unwrap();
        let home = current();
        assert_eq!(
            current(),
            home,
            "create left the thread in the new namespace"
        );
        let inside = run_in(Some(&path), || Ok(current())).unwrap();
        assert_ne!(inside, home, "run_in did not enter the namespace");
        assert_eq!(inside, fs::metadata(&path).unwrap().ino());
        assert_eq!(current(), home, "run_in did not return");
        let panicked =
            std::panic::catch_unwind(|| run_in(Some(&path), || -> Result<()> { panic!() }));
        assert!(panicked.is_err());
        assert_eq!(
            current(),
            home,
            "a panic inside run_in left the thread there"
        );
        assert_eq!(run_in(None, || Ok(current())).unwrap(), home);
    }
}
