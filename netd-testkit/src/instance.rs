//! The one fixture for "netd in a sandbox", for the tests and the benchmark alike: a sandbox
//! (a "host" namespace netd manages and an "outside" one for the internet), a state dir, a
//! bpffs pin dir and a cgroup (v2) of its own, the `netd` binary (`NETD_BIN`) to drive, and a
//! guard that removes all of it, and every process it started, on success, failure and panic.
//!
//! netd attaches its host socket programs (published ports reached through the host's
//! addresses) to the instance's cgroup, never to the machine's root one; every command run
//! through the instance ([`Instance::cmd_in`]) runs in that cgroup.
//!
//! Named namespaces are global, so every name made here comes from [`Instance::name`]:
//! `PREFIX-BASE`, with a prefix unique to the instance, which [`Drop`] sweeps.

use std::{
    fs::File,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::{Context as _, Result, bail};
use netd::netns;

use crate::{
    BPFFS,
    cleanup::{Cleanup, end_processes_in, remove_cgroup, remove_tree},
    orphans,
    sandbox::Sandbox,
};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// One netd confined to a sandbox. Dropping it removes everything it made; what it can't
/// remove fails loudly ([`Cleanup`]).
pub struct Instance {
    pub prefix: String,
    pub sandbox: Sandbox,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    /// The instance's cgroup: netd's host socket programs attach here.
    pub cgroup: PathBuf,
    netd: PathBuf,
    children: Mutex<Vec<Child>>,
}

impl Instance {
    /// A test's instance, with a prefix unique to it (pid + counter); panics naming what
    /// failed. Not from inside an async runtime (it runs one): use [`Instance::create`].
    pub fn new() -> Self {
        let prefix = format!(
            "nt{}x{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("start a runtime");
        runtime
            .block_on(Self::create(&prefix))
            .unwrap_or_else(|e| panic!("create sandbox {prefix}: {e:#}"))
    }

    /// [`Instance::new`] with IPv6 on the sandbox's uplink ([`Sandbox::enable_ipv6`]).
    pub fn dual_stack() -> Self {
        let env = Self::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("start a runtime");
        runtime
            .block_on(env.sandbox.enable_ipv6())
            .unwrap_or_else(|e| panic!("enable IPv6 in sandbox {}: {e:#}", env.prefix));
        env
    }

    /// An instance whose names start with `prefix`.
    pub async fn create(prefix: &str) -> Result<Self> {
        Self::create_with(prefix, crate::netd_bin()?).await
    }

    /// [`Instance::create`], driving the netd binary `netd` (another build of it: the
    /// benchmark's baseline).
    pub async fn create_with(prefix: &str, netd: PathBuf) -> Result<Self> {
        crate::ensure_bpffs()?;
        sweep_orphans_once();
        let cgroup = crate::cgroup2_root()?.join(format!("netd-{prefix}"));
        let inst = Self {
            sandbox: Sandbox::create(prefix).await?,
            state_dir: std::env::temp_dir().join(format!("netd-{prefix}")),
            bpffs: Path::new(BPFFS).join(format!("netd-{prefix}")),
            cgroup,
            prefix: prefix.to_string(),
            netd,
            children: Mutex::new(Vec::new()),
        };
        // On failure `inst` drops, removing the sandbox.
        std::fs::create_dir_all(&inst.state_dir)
            .with_context(|| format!("create {}", inst.state_dir.display()))?;
        std::fs::create_dir(&inst.cgroup)
            .with_context(|| format!("create cgroup {}", inst.cgroup.display()))?;
        Ok(inst)
    }

    /// A name of this instance (`PREFIX-BASE`): a namespace of that name is removed on drop.
    pub fn name(&self, base: &str) -> String {
        format!("{}-{base}", self.prefix)
    }

    pub fn host_ns(&self) -> PathBuf {
        self.sandbox.host_path()
    }

    pub fn outside_ns(&self) -> PathBuf {
        self.sandbox.outside_path()
    }

    /// A `netd` command for this instance (host namespace, state dir, bpffs dir).
    pub fn netd_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.netd);
        cmd.arg("--host-netns")
            .arg(self.host_ns())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--host-cgroup")
            .arg(&self.cgroup)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs netd and returns its output, whatever the exit status.
    pub fn netd(&self, args: &[&str]) -> Output {
        self.netd_cmd(args)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.netd.display()))
    }

    /// Runs netd and returns its stdout; fails with its output when it fails.
    pub fn try_netd(&self, args: &[&str]) -> Result<String> {
        let out = self
            .netd_cmd(args)
            .output()
            .with_context(|| format!("run {}", self.netd.display()))?;
        if !out.status.success() {
            bail!(
                "netd {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8(out.stdout).context("netd printed something other than UTF-8")
    }

    /// Runs netd, asserts success and returns stdout.
    pub fn netd_ok(&self, args: &[&str]) -> String {
        self.try_netd(args).unwrap_or_else(|e| panic!("{e:#}"))
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

    /// A command run inside the namespace at `ns` ([`crate::command_in`]), in the instance's
    /// cgroup.
    pub fn cmd_in(&self, ns: &Path, program: &str, args: &[&str]) -> Command {
        let mut cmd = crate::command_in(ns, program);
        cmd.args(args);
        self.join_cgroup(&mut cmd);
        cmd
    }

    /// Makes `cmd`'s process move itself into the instance's cgroup before it execs.
    fn join_cgroup(&self, cmd: &mut Command) {
        let procs = self.cgroup.join("cgroup.procs");
        let mut file = File::options()
            .write(true)
            .open(&procs)
            .unwrap_or_else(|e| panic!("open {}: {e}", procs.display()));
        // SAFETY: the closure only makes one write(2) (async-signal-safe) on a file opened
        // before the fork; "0" moves the writing process.
        unsafe {
            cmd.pre_exec(move || file.write_all(b"0"));
        }
    }

    /// Runs `program` in `ns` to completion.
    pub fn run_in(&self, ns: &Path, program: &str, args: &[&str]) -> Output {
        self.cmd_in(ns, program, args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }

    /// Starts `program` in `ns` in the background; it is killed when the instance drops.
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

    /// Namespaces named by [`Instance::name`] that still exist (containers left behind).
    fn own_namespaces(&self) -> Result<Vec<String>> {
        let ours = format!("{}-", self.prefix);
        let entries = match std::fs::read_dir(netns::NETNS_RUN_DIR) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            entries => entries.with_context(|| format!("list {}", netns::NETNS_RUN_DIR))?,
        };
        Ok(entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| {
                n.starts_with(&ours) && *n != self.sandbox.host && *n != self.sandbox.outside
            })
            .collect())
    }
}

/// Removes what the instances of killed processes left ([`orphans`]), once per process:
/// before its first instance, so a run after one that was cut off leaves the machine clean.
fn sweep_orphans_once() {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        let cgroups = crate::cgroup2_root().ok();
        let left = orphans::sweep(Path::new(BPFFS), &std::env::temp_dir(), cgroups.as_deref());
        for what in left {
            eprintln!("netd-testkit: a killed run's leftover stays: {what}");
        }
    });
}

impl Default for Instance {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let mut cleanup = Cleanup::of(format!("netd instance {}", self.prefix));
        let children = std::mem::take(self.children.get_mut().unwrap_or_else(|p| p.into_inner()));
        for mut child in children {
            let pid = child.id();
            cleanup.check(
                child
                    .kill()
                    .and_then(|()| child.wait().map(drop))
                    .with_context(|| format!("end process {pid}")),
            );
        }
        match self.own_namespaces() {
            Ok(names) => {
                for name in names {
                    cleanup.check(netns::remove(&name));
                }
            }
            Err(e) => cleanup.check(Err(e)),
        }
        cleanup.check(end_processes_in(&self.host_ns()));
        cleanup.check(self.sandbox.remove());
        cleanup.check(remove_tree(&self.bpffs));
        cleanup.check(remove_tree(&self.state_dir));
        // Last: empty once its processes are gone, and nothing is attached once the pins are.
        cleanup.check(remove_cgroup(&self.cgroup));
        cleanup.finish();
    }
}
