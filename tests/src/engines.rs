//! What the container-engine tests share: calling netd-cni as a runtime does, and traffic
//! that says which container answered.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{harness::TestEnv, traffic::retry_interrupted};

/// The netd-cni binary built next to netd.
pub fn cni_bin() -> PathBuf {
    netd_testkit::netd_bin()
        .expect("the netd binary")
        .with_file_name("netd-cni")
}

/// What a host process (in the instance's cgroup, where netd's socket programs are) gets from
/// a TCP connection to `addr`: loopback and host addresses reach published ports that way.
pub fn host_tcp_ask(env: &TestEnv, addr: SocketAddr) -> String {
    let out = env.run_in(
        &env.host_ns(),
        "nc",
        &[
            "-N",
            "-w",
            "2",
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One plugin invocation's outcome: exit success and the JSON it printed (if any).
pub struct CniOutcome {
    pub ok: bool,
    /// Killed by this signal.
    pub signal: Option<i32>,
    pub out: Value,
    pub stderr: String,
}

impl CniOutcome {
    /// The spec's error code, asserting the call failed.
    pub fn code(&self) -> u64 {
        assert!(!self.ok, "expected an error, got {}", self.out);
        self.out["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("error without a code: {}", self.out))
    }

    pub fn ok(self) -> Value {
        assert!(self.ok, "netd-cni failed: {}", self.out);
        self.out
    }
}

/// Runs netd-cni like libcni: `CNI_*` variables set (those given), the config on stdin.
pub fn cni(
    command: Option<&str>,
    container: Option<(&str, &str)>,
    netns: Option<&Path>,
    stdin: &str,
) -> CniOutcome {
    cni_with_env(command, container, netns, stdin, &[])
}

/// [`cni`] with more environment variables (`CNI_ARGS`, netd's fault injection).
pub fn cni_with_env(
    command: Option<&str>,
    container: Option<(&str, &str)>,
    netns: Option<&Path>,
    stdin: &str,
    env: &[(&str, &str)],
) -> CniOutcome {
    let mut cmd = Command::new(cni_bin());
    cmd.envs(env.iter().copied());
    cmd.env_remove("CNI_COMMAND")
        .env("CNI_PATH", cni_bin().parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(c) = command {
        cmd.env("CNI_COMMAND", c);
    }
    if let Some((id, ifname)) = container {
        cmd.env("CNI_CONTAINERID", id).env("CNI_IFNAME", ifname);
    }
    if let Some(ns) = netns {
        cmd.env("CNI_NETNS", ns);
    }
    let mut child = cmd.spawn().expect("run netd-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let json = if text.trim().is_empty() || !text.trim_start().starts_with('{') {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "netd-cni printed no JSON ({e}): {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    CniOutcome {
        ok: out.status.success(),
        signal: std::os::unix::process::ExitStatusExt::signal(&out.status),
        out: json,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A TCP server in `ns` on `port` that answers every connection with `name` (until the
/// test ends).
pub fn tcp_name_server(env: &TestEnv, ns: &Path, port: u16, name: &str) {
    let listener = env.in_ns(ns, || TcpListener::bind(("0.0.0.0", port)).unwrap());
    let name = name.to_string();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(name.as_bytes());
        }
    });
}

/// Connects from `ns` to `addr` and returns what the server said.
pub fn tcp_ask(env: &TestEnv, ns: &Path, addr: SocketAddr) -> std::io::Result<String> {
    env.in_ns(ns, || {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = String::new();
        conn.read_to_string(&mut buf)?;
        Ok(buf)
    })
}

/// A UDP server in `ns` on `port` that answers every datagram with `name` (until the test
/// ends).
pub fn udp_name_server(env: &TestEnv, ns: &Path, port: u16, name: &str) {
    let socket = env.in_ns(ns, || UdpSocket::bind(("0.0.0.0", port)).unwrap());
    let name = name.to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(name.as_bytes(), peer);
        }
    });
}

/// Sends one datagram from `ns`, source port `sport`, to `addr`; the answer, if one comes
/// within a second.
pub fn udp_ask(env: &TestEnv, ns: &Path, sport: u16, addr: SocketAddr) -> Option<String> {
    env.in_ns(ns, || {
        let socket = UdpSocket::bind(("0.0.0.0", sport)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        socket.send_to(b"who", addr).unwrap();
        let mut buf = [0u8; 64];
        let n = retry_interrupted(|| socket.recv(&mut buf)).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// A `netd daemon` of the test's instance; SIGTERM and wait on drop.
pub struct NetdDaemon {
    child: std::process::Child,
}

impl NetdDaemon {
    /// Starts `netd daemon ARGS...` and waits until its plugin socket `ready` answers.
    pub fn start(env: &TestEnv, args: &[&str], ready: &Path) -> Self {
        let child = env
            .netd_cmd(&[&["daemon"], args].concat())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start netd daemon");
        let mut daemon = Self { child };
        crate::cli::wait_until_serving(&mut daemon.child, ready);
        daemon
    }

    /// SIGKILL, as a crash.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for NetdDaemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// A tarball of a busybox-static root filesystem, made under `workdir` (what `podman import`
/// takes, and the layer of the containerd tests' image).
pub fn busybox_tar(workdir: &Path) -> PathBuf {
    let rootfs = workdir.join("rootfs");
    netd_bench::bench::docker::write_busybox_rootfs(&rootfs).unwrap();
    let tarball = workdir.join("busybox.tar");
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(tar.success(), "tar of the busybox rootfs failed");
    tarball
}

/// A podman (Debian's 4.3, CNI backend) of the test's own: storage, run dir and config under
/// `workdir`, run in the sandbox host namespace, its networks the conflists written here.
pub struct Podman {
    host_ns: PathBuf,
    workdir: PathBuf,
    /// The cgroup parent of this instance's containers (`--cgroup-parent`): podman's default,
    /// `libpod_parent`, is one for the whole machine and outlives every container.
    cgroup_parent: String,
}

/// Podman raises a container's open-files and process limits by default, above what a
/// sandboxed test machine may allow its processes.
const ULIMITS: &str = "default_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]";

/// The image the podman tests run, imported from busybox-static.
pub const PODMAN_IMAGE: &str = "localhost/busybox";

impl Podman {
    /// Sets podman up with `conflists` (CNI network configurations) and the busybox image.
    pub fn start(env: &TestEnv, conflists: &[&Value]) -> Self {
        let workdir = env.state_dir.join("podman");
        let cni_dir = workdir.join("cni");
        std::fs::create_dir_all(&cni_dir).unwrap();
        for list in conflists {
            let name = list["name"].as_str().unwrap();
            std::fs::write(cni_dir.join(format!("{name}.conflist")), list.to_string()).unwrap();
        }
        // Locks as files under the instance's own tmpdir (`lock_type`): the default, shared
        // memory, is one /dev/shm/libpod_lock for every podman on the machine, which two
        // tests' first commands raced to create ("file exists", in CI), and which outlived them.
        std::fs::write(
            workdir.join("containers.conf"),
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [{:?}]\nnetwork_config_dir = {:?}\n[engine]\nruntime = \"runc\"\nlock_type = \"file\"\n[containers]\n{ULIMITS}\n",
                cni_bin().parent().unwrap(),
                cni_dir
            ),
        )
        .unwrap();
        let podman = Self {
            host_ns: env.host_ns(),
            workdir,
            cgroup_parent: format!("netd-{}", env.name("podman")),
        };
        podman.import_busybox();
        podman
    }

    fn import_busybox(&self) {
        let tarball = busybox_tar(&self.workdir);
        self.podman(&["import", tarball.to_str().unwrap(), PODMAN_IMAGE]);
    }

    /// A podman command of this instance; `run` and `create` put the container under the
    /// instance's cgroup parent.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let dir = |d: &str| self.workdir.join(d).display().to_string();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.host_ns.display()))
            .args(["--", "timeout", "60", "podman"])
            .args(["--root", &dir("root"), "--runroot", &dir("run")])
            .args(["--tmpdir", &dir("tmp"), "--storage-driver", "vfs"])
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .env("CONTAINERS_CONF", self.workdir.join("containers.conf"))
            .stdin(Stdio::null());
        match args.split_first() {
            Some((sub @ (&"run" | &"create"), rest)) => cmd
                .arg(sub)
                .args(["--cgroup-parent", &format!("/{}", self.cgroup_parent)])
                .args(rest),
            _ => cmd.args(args),
        };
        cmd
    }

    /// Runs podman, asserts success, returns its trimmed stdout.
    pub fn podman(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().expect("run podman");
        assert!(
            out.status.success(),
            "podman {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The network namespace of a running container (through its init's PID).
    pub fn netns_of(&self, container: &str) -> PathBuf {
        let pid = self.podman(&["inspect", "-f", "{{.State.Pid}}", container]);
        PathBuf::from(format!("/proc/{pid}/ns/net"))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        match self.cmd(&["rm", "-af", "-t", "0"]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: podman rm -af: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("warning: podman rm -af: {e}"),
        }
        if let Err(e) = netd_testkit::cleanup::remove_cgroup_everywhere(&self.cgroup_parent) {
            eprintln!("warning: {e:#}");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.workdir) {
            eprintln!("warning: remove {}: {e}", self.workdir.display());
        }
    }
}
