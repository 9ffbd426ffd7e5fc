//! The integration-test harness: every test gets its own sandbox (a "host" namespace that netd
//! manages and an "outside" one for the internet), its own state dir and bpffs pin dir, and a
//! guard that removes all of it, and every process it started, on success, failure and panic.
//!
//! Named namespaces are global, so every name a test makes comes from [`TestEnv::name`], which
//! is unique to the test (pid + counter) and is remembered for cleanup.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex, Once,
        atomic::{AtomicU32, Ordering},
    },
};

use netd::netns;
use netd_testkit::sandbox::Sandbox;

pub use netd_testkit::sandbox::{HOST_ADDR, OUTSIDE_ADDR, UPLINK};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);
static MOUNT_BPFFS: Once = Once::new();

/// The netd binary under test (`NETD_BIN`); panics, naming the fix, when it isn't set.
pub fn netd_bin() -> PathBuf {
    netd_testkit::netd_bin().unwrap_or_else(|e| panic!("{e:#}"))
}

/// One test's world. Dropping it removes everything it made.
pub struct TestEnv {
    pub prefix: String,
    pub sandbox: Sandbox,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    namespaces: Mutex<Vec<String>>,
    children: Mutex<Vec<Child>>,
}

impl TestEnv {
    pub fn new() -> Self {
        ensure_bpffs();
        let prefix = format!(
            "nt{}x{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let sandbox = runtime
            .block_on(Sandbox::create(&prefix))
            .unwrap_or_else(|e| panic!("create sandbox {prefix}: {e:#}"));
        let env = Self {
            state_dir: std::env::temp_dir().join(format!("netd-{prefix}")),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/netd-{prefix}")),
            prefix,
            sandbox,
            namespaces: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
        };
        std::fs::create_dir_all(&env.state_dir).unwrap();
        env
    }

    /// A name unique to this test (`<prefix><base>`); a namespace of that name is removed on drop.
    pub fn name(&self, base: &str) -> String {
        let name = format!("{}{base}", self.prefix);
        self.namespaces.lock().unwrap().push(name.clone());
        name
    }

    pub fn host_ns(&self) -> PathBuf {
        self.sandbox.host_path()
    }

    pub fn outside_ns(&self) -> PathBuf {
        self.sandbox.outside_path()
    }

    /// A `netd` command for this test's instance (host namespace, state dir, bpffs dir).
    pub fn netd_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(netd_bin());
        cmd.arg("--host-netns")
            .arg(self.host_ns())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs netd and returns its output, whatever the exit status.
    pub fn netd(&self, args: &[&str]) -> Output {
        self.netd_cmd(args).output().expect("run netd")
    }

    /// Runs netd, asserts success and returns stdout.
    pub fn netd_ok(&self, args: &[&str]) -> String {
        let out = self.netd(args);
        assert!(
            out.status.success(),
            "netd {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs netd, asserts failure and returns stderr (which must be one line).
    pub fn netd_err(&self, args: &[&str]) -> String {
        let out = self.netd(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "netd {args:?} should have failed, printed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "error should be one line: {stderr}"
        );
        stderr
    }

    /// Runs netd with `--json` output parsed.
    pub fn netd_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.netd_ok(args);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("netd {args:?}: bad JSON ({e}): {out}"))
    }

    /// A command run inside the namespace at `ns` (`ip netns exec` semantics, without the /sys
    /// remount: the child just setns'es before exec).
    pub fn cmd_in(&self, ns: &Path, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.display()))
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `program` in `ns` to completion.
    pub fn run_in(&self, ns: &Path, program: &str, args: &[&str]) -> Output {
        self.cmd_in(ns, program, args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }

    /// Starts `program` in `ns` in the background; it is killed when the test ends.
    pub fn spawn_in(&self, ns: &Path, program: &str, args: &[&str]) -> u32 {
        let child = self
            .cmd_in(ns, program, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// Runs `f` on a thread inside the namespace at `ns`.
    pub fn in_ns<T: Send>(&self, ns: &Path, f: impl FnOnce() -> T + Send) -> T {
        netns::run_in(Some(ns), || Ok(f())).unwrap()
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for mut child in self.children.lock().unwrap().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in self.namespaces.lock().unwrap().drain(..) {
            let _ = netns::remove(&name);
        }
        self.sandbox.remove();
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// A TCP connection from the fixed local address `local` (SO_REUSEADDR so tests can repeat).
pub fn bound_connect(local: SocketAddr, server: SocketAddr) -> TcpStream {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
    let v4 = |a: SocketAddr| match a {
        SocketAddr::V4(a) => SockaddrIn::from(a),
        SocketAddr::V6(_) => unreachable!("IPv4 only"),
    };
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &v4(local)).unwrap();
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &v4(server)).unwrap();
    TcpStream::from(fd)
}

/// Mounts bpffs at /sys/fs/bpf in this (the machine's) mount namespace when it isn't.
fn ensure_bpffs() {
    MOUNT_BPFFS.call_once(|| {
        let mounted = std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
        if !mounted {
            nix::mount::mount(
                Some("bpf"),
                "/sys/fs/bpf",
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .expect("mount bpffs on /sys/fs/bpf");
        }
    });
}
