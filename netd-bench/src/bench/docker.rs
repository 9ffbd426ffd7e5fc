//! The Docker arm of the benchmark: a real dockerd (Debian's docker.io, Docker 20.10) running
//! inside a sandbox host namespace, with containers whose network namespaces the benchmark's
//! servers and clients enter.
//!
//! Isolation from the machine and from other dockerds running at the same time:
//! - network: dockerd is exec'd by `nsenter --net=HOST_NS`, so docker0, its iptables rules,
//!   ip_forward and docker-proxy all live in the sandbox host namespace;
//! - mounts: `unshare --mount --propagation private` gives dockerd its own mount namespace, so
//!   its overlayfs and nsfs mounts never appear in the machine's mount table and all go away
//!   with the last process in that namespace (nothing to unmount by hand);
//! - files: socket, pidfile, data root, exec root (with its containerd) and config file are all
//!   under the caller's workdir;
//! - cgroups: containers go under a cgroup parent of their own, removed on drop.
//!
//! What is still shared: /etc/docker/key.json (Docker 20.10 always keeps its trust key there)
//! and containerd's shim socket directory /run/containerd/s (one socket per running shim).
//!
//! The userland proxy stays on, as in Docker 20.10's default: the benchmark compares netd with
//! Docker as people run it. Traffic from outside the host is DNATed by iptables either way; the
//! proxy only carries connections to published ports from the host itself.

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::fs::{MetadataExt as _, symlink},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use netd_testkit::cleanup::{Cleanup, remove_cgroup, remove_tree};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// The transport protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// The CLI that comes with docker.io. Called by path: a newer `docker` earlier in PATH (e.g.
/// /usr/local/bin) would talk a newer API version than this dockerd.
pub const DOCKER_CLI: &str = "/usr/bin/docker";
const DOCKERD: &str = "/usr/sbin/dockerd";
const BUSYBOX: &str = "/bin/busybox";
/// The image every container runs: a busybox rootfs imported at start (there is no registry).
pub const IMAGE: &str = "busybox";

/// Debian packages the Docker arm needs (`cargo xtask setup` installs them), each with a file
/// that shows it is installed.
const PACKAGES: [(&str, &str); 2] = [("docker.io", DOCKERD), ("busybox-static", BUSYBOX)];

/// How long dockerd gets to answer on its socket after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long any docker CLI call may take before it is killed.
const CLI_TIMEOUT: &str = "60";
/// How long dockerd gets to stop after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest path a unix socket address holds (sun_path less its NUL).
const MAX_SOCKET_PATH: usize = 107;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A container started by [`Dockerd::run`].
#[derive(Clone, Debug)]
pub struct DockerContainer {
    pub name: String,
    /// Its address on Docker's default bridge.
    pub ip: Ipv4Addr,
    /// The PID of its init (`sleep`), as seen from the machine.
    pub pid: u32,
    /// `/proc/PID/ns/net` of its init: enter it to run a server or client in the container.
    pub netns: PathBuf,
}

/// How a [`Dockerd`] runs besides what is always its own.
#[derive(Clone, Debug)]
pub struct Options {
    /// Docker's own networking: docker0, its iptables rules and the userland proxy, as people
    /// run Docker (the benchmark); off for a dockerd whose networks are another driver's.
    pub docker_networking: bool,
    /// Bind-mounted on /run/docker/plugins in dockerd's mount namespace: the plugin sockets
    /// this dockerd (and no other) discovers.
    pub plugin_dir: Option<PathBuf>,
    /// `--live-restore`: containers keep running while dockerd restarts.
    pub live_restore: bool,
    /// With Docker's networking: `--userland-proxy` (Docker's default: on).
    pub userland_proxy: bool,
    /// ip6tables rules for IPv6 networks (`ip6tables`, experimental in 20.10).
    pub ip6tables: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            docker_networking: true,
            plugin_dir: None,
            live_restore: false,
            userland_proxy: true,
            ip6tables: false,
        }
    }
}

/// Where dockerd looks for plugin sockets.
const PLUGIN_SOCKETS: &str = "/run/docker/plugins";

/// A dockerd running inside a sandbox host namespace. Dropping it removes its containers, stops
/// it (and its containerd) and deletes its workdir.
pub struct Dockerd {
    daemon: Child,
    host_ns: PathBuf,
    options: Options,
    workdir: PathBuf,
    socket: PathBuf,
    /// Absolute cgroup (in every hierarchy) that holds this dockerd's containers.
    cgroup_parent: String,
    /// dockerd's own mount namespace, shared by containerd, the shims and docker-proxy; known
    /// once dockerd has answered, and held until its processes are gone.
    mount_ns: Option<MountNs>,
}

impl Dockerd {
    /// Starts dockerd inside the network namespace `host_ns` with its socket, pidfile, data and
    /// exec roots (and its containerd) under `workdir`, waits until it answers, and imports the
    /// busybox image. The userland proxy is on, as in Docker's default.
    pub fn start(host_ns: &Path, workdir: &Path) -> Result<Self> {
        Self::start_with(host_ns, workdir, &Options::default())
    }

    /// [`Dockerd::start`] with `--userland-proxy` as given (off: the rules netd's iptables
    /// datapath mirrors).
    pub fn start_with_proxy(host_ns: &Path, workdir: &Path, userland_proxy: bool) -> Result<Self> {
        let options = Options {
            userland_proxy,
            ..Options::default()
        };
        Self::start_with(host_ns, workdir, &options)
    }

    /// [`Dockerd::start`] with `options`.
    pub fn start_with(host_ns: &Path, workdir: &Path, options: &Options) -> Result<Self> {
        check_installed()?;
        let socket = workdir.join("docker.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "workdir {} is too long for a unix socket path",
                workdir.display()
            );
        }
        fs::create_dir_all(workdir)
            .with_context(|| format!("create dockerd workdir {}", workdir.display()))?;
        // A config of its own keeps a machine-wide /etc/docker/daemon.json out of the
        // comparison.
        let config = if options.ip6tables {
            r#"{"experimental": true, "ip6tables": true}"#
        } else {
            "{}"
        };
        fs::write(workdir.join("daemon.json"), config).context("write daemon.json")?;
        let cgroup_parent = format!(
            "/netd-docker-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let daemon = spawn_dockerd(host_ns, workdir, &socket, &cgroup_parent, options, None)?;
        // From here on, Drop cleans up whatever fails.
        let mut dockerd = Self {
            daemon,
            host_ns: host_ns.to_path_buf(),
            options: options.clone(),
            workdir: workdir.to_path_buf(),
            socket,
            cgroup_parent,
            mount_ns: None,
        };
        dockerd.wait_until_ready()?;
        dockerd.mount_ns = Some(dockerd.own_mount_ns()?);
        dockerd.import_busybox()?;
        Ok(dockerd)
    }

    /// Stops dockerd and starts it again in its mount namespace (kept alive by its containers'
    /// shims); with `live_restore` the containers run on meanwhile.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_daemon()?;
        let ns = self.mount_ns.as_ref().context("dockerd never answered")?;
        let holder = ns
            .pids()
            .into_iter()
            .next()
            .context("no process is left in dockerd's mount namespace")?;
        self.daemon = spawn_dockerd(
            &self.host_ns,
            &self.workdir,
            &self.socket,
            &self.cgroup_parent,
            &self.options,
            Some(holder),
        )?;
        self.wait_until_ready()
    }

    /// dockerd's PID.
    pub fn pid(&self) -> u32 {
        self.daemon.id()
    }

    /// `docker run -d --name NAME [-p HOST:CONTAINER/PROTO]... busybox sleep 1d`.
    pub fn run(&self, name: &str, publish: &[(u16, u16, Protocol)]) -> Result<DockerContainer> {
        let mut args = vec!["run", "-d", "--name", name];
        let ports: Vec<String> = publish
            .iter()
            .map(|(host, container, proto)| format!("{host}:{container}/{}", proto_name(*proto)))
            .collect();
        for port in &ports {
            args.extend(["-p", port]);
        }
        args.extend([IMAGE, "sleep", "1d"]);
        self.docker(&args)?;
        self.inspect(name)
    }

    /// `docker rm -f NAME`.
    pub fn remove(&self, name: &str) -> Result<()> {
        self.docker(&["rm", "-f", name]).map(drop)
    }

    /// The running container's init PID and bridge address.
    fn inspect(&self, name: &str) -> Result<DockerContainer> {
        let out = self.docker(&[
            "inspect",
            "-f",
            "{{.State.Pid}} {{.NetworkSettings.IPAddress}}",
            name,
        ])?;
        let (pid, ip) = out
            .split_once(' ')
            .with_context(|| format!("docker inspect {name}: unexpected output {out:?}"))?;
        let pid: u32 = pid
            .parse()
            .with_context(|| format!("docker inspect {name}: bad PID {pid:?}"))?;
        if pid == 0 {
            bail!("container {name} is not running");
        }
        let ip = ip
            .parse()
            .with_context(|| format!("docker inspect {name}: bad IPv4 address {ip:?}"))?;
        Ok(DockerContainer {
            name: name.to_string(),
            ip,
            pid,
            netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
        })
    }

    /// A docker CLI command for this dockerd, killed after [`CLI_TIMEOUT`] seconds.
    fn cli(&self) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.args(["--kill-after=5", CLI_TIMEOUT, DOCKER_CLI, "-H"])
            .arg(format!("unix://{}", self.socket.display()))
            // The CLI's own config dir, so a machine's ~/.docker (contexts, credential helpers)
            // plays no part.
            .env("DOCKER_CONFIG", self.workdir.join("cli"))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the docker CLI and returns its trimmed stdout; errors carry its first stderr line.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let out = self
            .cli()
            .args(args)
            .output()
            .with_context(|| format!("run {DOCKER_CLI}"))?;
        if !out.status.success() {
            bail!(
                "docker {}: {}",
                args.join(" "),
                failure(out.status, &String::from_utf8_lossy(&out.stderr))
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Polls the socket until dockerd answers; fails early, with its last error, if it exits.
    fn wait_until_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.daemon.try_wait().context("wait for dockerd")? {
                bail!("dockerd exited ({status}): {}", self.last_log_error());
            }
            if self.socket.exists()
                && self
                    .docker(&["version", "-f", "{{.Server.Version}}"])
                    .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "dockerd did not answer on {} within {}s: {}",
                    self.socket.display(),
                    READY_TIMEOUT.as_secs(),
                    self.last_log_error()
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// dockerd's mount namespace; checks that it is not the machine's (ours), because leftover
    /// processes are found by it and dockerd's mounts must stay out of the machine's table.
    fn own_mount_ns(&self) -> Result<MountNs> {
        let ns = MountNs::of(self.pid()).context("read dockerd's mount namespace")?;
        let ours = MountNs::of(std::process::id()).context("read our mount namespace")?;
        if ns.ino == ours.ino {
            bail!("dockerd runs in the machine's mount namespace: unshare --mount did not apply");
        }
        Ok(ns)
    }

    /// Makes the [`IMAGE`] image from busybox-static: /bin/busybox and a symlink per applet.
    fn import_busybox(&self) -> Result<()> {
        let rootfs = self.workdir.join("busybox-rootfs");
        write_busybox_rootfs(&rootfs)?;
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .context("run tar")?;
        let import = self
            .cli()
            .args(["import", "-", IMAGE])
            .stdin(tar.stdout.take().context("tar's stdout")?)
            .output()
            .context("run docker import");
        let tarred = tar.wait().context("wait for tar")?;
        let import = import?;
        if !tarred.success() {
            bail!("tar of the busybox rootfs failed ({tarred})");
        }
        if !import.status.success() {
            bail!(
                "docker import {IMAGE}: {}",
                failure(import.status, &String::from_utf8_lossy(&import.stderr))
            );
        }
        fs::remove_dir_all(&rootfs).with_context(|| format!("remove {}", rootfs.display()))
    }

    /// The last error (or fatal) line of dockerd's log, which says why it could not run.
    fn last_log_error(&self) -> String {
        let log = fs::read_to_string(self.workdir.join("dockerd.log")).unwrap_or_default();
        log.lines()
            .rev()
            .find(|l| l.contains("level=fatal") || l.contains("level=error"))
            .or_else(|| log.lines().last())
            .unwrap_or("dockerd logged nothing")
            .to_string()
    }

    fn remove_all_containers(&self) -> Result<()> {
        let ids = self.docker(&["ps", "-aq"])?;
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if ids.is_empty() {
            return Ok(());
        }
        self.docker(&[&["rm", "-f"][..], &ids].concat()).map(drop)
    }

    /// SIGTERM (dockerd then stops its containerd), SIGKILL if it takes too long.
    fn stop_daemon(&mut self) -> Result<()> {
        if self.daemon.try_wait()?.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).context("SIGTERM dockerd")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.daemon.try_wait()?.is_some() {
                return Ok(());
            }
            sleep(Duration::from_millis(50));
        }
        eprintln!(
            "warning: dockerd {} ignored SIGTERM, killing it",
            self.pid()
        );
        self.daemon.kill().context("SIGKILL dockerd")?;
        self.daemon.wait().map(drop).context("wait for dockerd")
    }

    /// Kills what a clean stop leaves when dockerd hung or died: processes in dockerd's mount
    /// namespace (containerd, shims, docker-proxy) and in its containers' cgroups, then waits
    /// until they are gone so the mount namespace, and with it every mount, goes too.
    fn kill_leftovers(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut left = self.cgroup_pids();
            if let Some(ns) = &self.mount_ns {
                left.extend(ns.pids());
            }
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("dockerd leftovers still running: {left:?}");
            }
            for pid in left {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// This dockerd's cgroup parent in every mounted cgroup hierarchy that has it.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        cgroup_mounts()
            .into_iter()
            .map(|m| m.join(self.cgroup_parent.trim_start_matches('/')))
            .filter(|d| d.is_dir())
            .collect()
    }

    /// PIDs of the processes in the containers' cgroups (from every hierarchy).
    fn cgroup_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .cgroup_dirs()
            .iter()
            .flat_map(|d| subtree(d))
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|procs| {
                procs
                    .lines()
                    .filter_map(|l| l.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Removes the (by now empty) container cgroups and the parent, deepest first.
    fn remove_cgroups(&self, cleanup: &mut Cleanup) {
        for dir in self.cgroup_dirs() {
            for d in subtree(&dir).into_iter().rev() {
                cleanup.check(remove_cgroup(&d));
            }
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let mut cleanup = Cleanup::of(format!("dockerd {}", self.pid()));
        // Only a dockerd that answered can be asked (a hung one would stall every call).
        if self.mount_ns.is_some() {
            cleanup.check(
                self.remove_all_containers()
                    .context("remove dockerd's containers"),
            );
        }
        cleanup.check(self.stop_daemon());
        cleanup.check(self.kill_leftovers());
        // Its last hold: the namespace goes, and with it every mount dockerd made.
        self.mount_ns = None;
        self.remove_cgroups(&mut cleanup);
        cleanup.check(remove_tree(&self.workdir));
        cleanup.finish();
    }
}

/// Whether the Docker arm can run: a one-line error that names the missing package.
pub fn check_installed() -> Result<()> {
    for (package, file) in PACKAGES {
        if !Path::new(file).exists() {
            bail!("{package} is not installed (no {file}): `cargo xtask setup` installs it");
        }
    }
    Ok(())
}

/// `nsenter --net=HOST_NS unshare --mount --propagation private dockerd ...`, or into the mount
/// namespace of process `rejoin` (a restart). Both tools exec (neither forks), and so does the
/// shell that mounts a plugin dir, so the child's PID is dockerd's.
fn spawn_dockerd(
    host_ns: &Path,
    workdir: &Path,
    socket: &Path,
    cgroup_parent: &str,
    options: &Options,
    rejoin: Option<u32>,
) -> Result<Child> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(workdir.join("dockerd.log"))
        .context("open dockerd.log")?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", host_ns.display()));
    if let Some(pid) = rejoin {
        cmd.arg(format!("--mount=/proc/{pid}/ns/mnt")).arg("--");
    } else {
        cmd.args(["--", "unshare", "--mount", "--propagation", "private", "--"]);
    }
    if let Some(dir) = options.plugin_dir.as_ref().filter(|_| rejoin.is_none()) {
        fs::create_dir_all(PLUGIN_SOCKETS).with_context(|| format!("create {PLUGIN_SOCKETS}"))?;
        cmd.args([
            "sh",
            "-c",
            &format!("mount --bind \"$0\" {PLUGIN_SOCKETS} && exec \"$@\""),
        ])
        .arg(dir);
    }
    let networking: &[&str] = if options.docker_networking {
        &["--iptables=true", "--ip-forward=true"]
    } else {
        &[
            "--iptables=false",
            "--ip-forward=false",
            "--userland-proxy=false",
            "--bridge=none",
        ]
    };
    cmd.arg(DOCKERD)
        .arg(format!("--host=unix://{}", socket.display()))
        .arg(format!(
            "--config-file={}",
            workdir.join("daemon.json").display()
        ))
        .arg(format!("--data-root={}", workdir.join("data").display()))
        .arg(format!("--exec-root={}", workdir.join("exec").display()))
        .arg(format!(
            "--pidfile={}",
            workdir.join("dockerd.pid").display()
        ))
        .arg(format!("--cgroup-parent={cgroup_parent}"))
        // Explicit so that a missing overlayfs fails here instead of falling back to vfs,
        // whose full copies per container would distort `run` timings.
        .arg("--storage-driver=overlay2")
        .args(networking)
        .args(
            options
                .docker_networking
                .then(|| format!("--userland-proxy={}", options.userland_proxy)),
        )
        .args(options.live_restore.then_some("--live-restore"))
        // Its containerd (started by dockerd, with its environment) writes stack dumps to
        // the temporary directory: the workdir's, so they go with it.
        .env("TMPDIR", private_tmp(workdir)?)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("dup dockerd.log")?)
        .stderr(log)
        .spawn()
        .context("start dockerd with nsenter and unshare")
}

/// `workdir/tmp`, made if missing: the temporary directory (`TMPDIR`) of a daemon run
/// under `workdir`. Go's daemons write there (containerd its stack dumps, as
/// `containerd.PID.stacks.log`), so what they leave goes with the workdir.
pub fn private_tmp(workdir: &Path) -> Result<PathBuf> {
    let tmp = workdir.join("tmp");
    fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    Ok(tmp)
}

/// A root filesystem of busybox-static: /bin/busybox and a symlink per applet (what every
/// engine's test image is made of, offline).
pub fn write_busybox_rootfs(rootfs: &Path) -> Result<()> {
    let bin = rootfs.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("create {}", bin.display()))?;
    fs::copy(BUSYBOX, bin.join("busybox")).with_context(|| format!("copy {BUSYBOX}"))?;
    for applet in busybox_applets()? {
        if applet != "busybox" {
            symlink("busybox", bin.join(&applet))
                .with_context(|| format!("link busybox applet {applet}"))?;
        }
    }
    Ok(())
}

fn busybox_applets() -> Result<Vec<String>> {
    let out = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .context("run busybox --list")?;
    if !out.status.success() {
        bail!("busybox --list failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

fn proto_name(proto: Protocol) -> &'static str {
    match proto {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// "timed out" for `timeout`'s exit code 124, otherwise the first line of stderr.
fn failure(status: ExitStatus, stderr: &str) -> String {
    if status.code() == Some(124) {
        return format!("timed out after {CLI_TIMEOUT}s");
    }
    stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .map_or_else(|| format!("failed ({status})"), |l| l.trim().to_string())
}

/// A process's mount namespace, held open. A namespace is known by its inode number, which the
/// kernel gives to a new namespace as soon as the old one is gone: held, it can't go, so the
/// processes found in it are its own and never those of a namespace made since (another test's
/// dockerd was killed that way).
pub struct MountNs {
    _held: fs::File,
    ino: u64,
}

impl MountNs {
    /// The mount namespace of process `pid`.
    pub fn of(pid: u32) -> std::io::Result<Self> {
        let held = fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
        let ino = held.metadata()?.ino();
        Ok(Self { _held: held, ino })
    }

    /// Every process in this namespace.
    pub fn pids(&self) -> Vec<u32> {
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                fs::metadata(format!("/proc/{pid}/ns/mnt")).is_ok_and(|m| m.ino() == self.ino)
            })
            .collect()
    }
}

/// Mount points of the cgroup (v1) and cgroup2 hierarchies.
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let (_, point, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(point))
        })
        .collect()
}

/// `dir` and every directory below it, parents before children.
pub fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        if let Ok(entries) = fs::read_dir(&dirs[i]) {
            dirs.extend(
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    dirs
}
