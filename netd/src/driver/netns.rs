//! Network namespaces: named ones under /run/netns (what `ip netns` shows), entering one, and
//! running a closure inside one on a scoped thread (setns only affects the calling thread).

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

/// Runs `f` on a new thread inside the network namespace at `path`, or right here when `None`
/// (a new thread would be in the caller's namespace anyway; not starting one saves a clone
/// and a join per netlink connection or sysctl of the host).
pub fn run_in<T: Send>(path: Option<&Path>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let Some(path) = path else {
        return f();
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(path)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread inside a network namespace panicked"))?
    })
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
    let bound = std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("bind-mount the new namespace on {}", path.display()))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace creation thread panicked"))?
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
