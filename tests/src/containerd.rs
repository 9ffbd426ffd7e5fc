//! A containerd (Debian's 1.6) of a test's own, run inside the sandbox host namespace with its
//! root, state dir and socket under the instance's state dir, and `ctr run --cni` with netd-cni
//! as the network.
//!
//! ctr reads CNI configurations from /etc/cni/net.d and plugins from /opt/cni/bin, with no flag
//! to point elsewhere (containerd 1.6's `ctr run` calls go-cni with its defaults). So every ctr
//! runs in a private mount namespace with the test's directories bound over those two (and an
//! empty /var/lib, where libcni caches results): nothing on the machine changes. containerd
//! gets a private mount namespace too, with a /run of its own (its shims' sockets and runc's
//! state are at fixed paths there), so its mounts and files stay off the machine.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use netd_bench::bench::docker::{MountNs, cgroup_mounts, private_tmp, subtree};
use netd_testkit::cleanup::{Cleanup, remove_cgroup, remove_tree};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::{Value, json};

use crate::{
    engines::{busybox_tar, cni_bin},
    harness::TestEnv,
};

/// The image the containerd tests run, imported from busybox-static.
pub const CTR_IMAGE: &str = "localhost/busybox:latest";

/// Where ctr looks for CNI configurations (a directory that must exist to be bound over).
const CNI_CONF_DIR: &str = "/etc/cni/net.d";

/// containerd's binary (the `containerd` package).
const CONTAINERD: &str = "/usr/bin/containerd";

pub struct Containerd {
    daemon: Child,
    host_ns: PathBuf,
    workdir: PathBuf,
    /// containerd's namespace for this test's containers (also their cgroups' parent).
    namespace: String,
    /// The foreground `ctr run --cni` of each container: it DELs the network when its task
    /// exits.
    runs: Vec<(String, Child)>,
}

impl Containerd {
    /// Starts containerd with `conflists` as the CNI configurations ctr sees, and imports the
    /// busybox image; the reason when containerd isn't installed.
    pub fn start(env: &TestEnv, conflists: &[&Value]) -> Result<Self, String> {
        for needed in [CONTAINERD, "/usr/bin/ctr", CNI_CONF_DIR] {
            if !Path::new(needed).exists() {
                return Err(format!(
                    "no {needed}: `cargo xtask setup` installs containerd and the CNI plugins"
                ));
            }
        }
        let workdir = env.state_dir.join("containerd");
        let bin_dir = workdir.join("opt/cni/bin");
        let conf_dir = workdir.join("net.d");
        fs::create_dir_all(&bin_dir).unwrap();
        fs::create_dir_all(&conf_dir).unwrap();
        std::os::unix::fs::symlink(cni_bin(), bin_dir.join("netd-cni")).unwrap();
        for list in conflists {
            let name = list["name"].as_str().unwrap();
            fs::write(conf_dir.join(format!("{name}.conflist")), list.to_string()).unwrap();
        }
        let dir = |d: &str| workdir.join(d).display().to_string();
        fs::write(
            workdir.join("config.toml"),
            format!(
                "version = 2\nroot = {:?}\nstate = {:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\naddress = {:?}\n[ttrpc]\naddress = {:?}\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\npath = {:?}\n",
                dir("root"),
                dir("state"),
                dir("c.sock"),
                dir("c.sock.ttrpc"),
                dir("containerd-opt"),
            ),
        )
        .unwrap();
        let log = fs::File::create(workdir.join("containerd.log")).unwrap();
        // A /run of its own: the shims' sockets (/run/containerd/s) and runc's state are at
        // fixed paths there.
        let daemon = netd_testkit::command_in(&env.host_ns(), "unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount -t tmpfs -o mode=0755 netd-test-run /run && exec \"$0\" \"$@\"")
            .arg(CONTAINERD)
            .arg("--config")
            .arg(workdir.join("config.toml"))
            .env("TMPDIR", private_tmp(&workdir).unwrap())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        // From here on, Drop cleans up whatever fails.
        let containerd = Self {
            daemon,
            host_ns: env.host_ns(),
            workdir,
            namespace: env.prefix.clone(),
            runs: Vec::new(),
        };
        containerd.wait_until_ready();
        containerd.import_busybox();
        Ok(containerd)
    }

    /// A ctr command of this instance, in a private mount namespace where /opt and
    /// /etc/cni/net.d are the test's, and /var/lib (libcni's result cache) is empty.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = netd_testkit::command_in(&self.host_ns, "unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!(
                "mount --bind \"$0\" /opt && mount --bind \"$1\" {CNI_CONF_DIR} && \
                 mount -t tmpfs netd-test-lib /var/lib && shift && exec \"$@\""
            ))
            .arg(self.workdir.join("opt"))
            .arg(self.workdir.join("net.d"))
            .arg("ctr")
            .arg("--address")
            .arg(self.workdir.join("c.sock"))
            .args(["--namespace", &self.namespace, "--connect-timeout", "10s"])
            .args(args);
        cmd
    }

    /// Runs ctr, asserts success, returns its trimmed stdout.
    pub fn ctr(&self, args: &[&str]) -> String {
        let bounded = [&["--timeout", "60s"][..], args].concat();
        let out = self.cmd(&bounded).output().expect("run ctr");
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `ctr run --cni IMAGE ID COMMAND...` in the foreground (as a shell runs it: ctr DELs the
    /// network when the task exits), once its task runs; its task's PID.
    pub fn run_cni(&mut self, id: &str, command: &[&str]) -> u32 {
        let child = self
            .cmd(&run_args(&[], id, command))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ctr run");
        self.runs.push((id.to_string(), child));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(pid) = self.task_pid(id, "RUNNING") {
                return pid;
            }
            let (_, child) = self.runs.last_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                let mut stderr = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).ok();
                panic!("ctr run {id} exited ({status}): {stderr}");
            }
            assert!(Instant::now() < deadline, "task {id} never ran");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ctr run --cni --rm IMAGE ID COMMAND...` to its end (the README's example): how the
    /// command exited.
    pub fn run_cni_to_end(&self, id: &str, command: &[&str]) -> ExitStatus {
        self.cmd(&run_args(&["--rm"], id, command))
            .status()
            .expect("run ctr run")
    }

    /// `ctr run --cni -d IMAGE ID COMMAND...` (ctr returns once the task runs, and never DELs
    /// its network); its task's PID.
    pub fn run_cni_detached(&self, id: &str, command: &[&str]) -> u32 {
        let status = self.cmd(&run_args(&["-d"], id, command)).status().unwrap();
        assert!(status.success(), "ctr run -d {id} failed ({status})");
        self.wait_task(id, "RUNNING")
    }

    /// Waits until task `id` has `status` (RUNNING, STOPPED); its PID.
    pub fn wait_task(&self, id: &str, status: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(pid) = self.task_pid(id, status) {
                return pid;
            }
            assert!(Instant::now() < deadline, "task {id} never got {status}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The PID of task `id` if it has `status`.
    fn task_pid(&self, id: &str, status: &str) -> Option<u32> {
        self.ctr(&["task", "ls"]).lines().find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            match fields[..] {
                [task, pid, now] if task == id && now == status => pid.parse().ok(),
                _ => None,
            }
        })
    }

    /// Waits until the foreground `ctr run` of `id` has returned (its task killed): how it
    /// exited.
    pub fn wait_run(&mut self, id: &str) -> ExitStatus {
        let at = self.runs.iter().position(|(r, _)| r == id).unwrap();
        let (_, child) = self.runs.remove(at);
        wait_or_kill(child)
            .unwrap_or_else(|| panic!("ctr run {id} did not return after its task was killed"))
    }

    /// `ctr task exec` of `command` in task `id`: its stdout.
    pub fn exec(&self, id: &str, exec_id: &str, command: &[&str]) -> String {
        let fifo_dir = self.workdir.join("fifo");
        let exec = [
            &["task", "exec", "--fifo-dir", fifo_dir.to_str().unwrap()][..],
            &["--exec-id", exec_id, id],
            command,
        ]
        .concat();
        // `ctr task exec` can lose a short-lived process's output: its copy of the fifo races
        // the exit (an empty `ip route` once in CI). The commands asked change nothing, so
        // asking again is harmless.
        for _ in 0..4 {
            let out = self.ctr(&exec);
            if !out.trim().is_empty() {
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.ctr(&exec)
    }

    fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self
            .cmd(&["version"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            let log = fs::read_to_string(self.workdir.join("containerd.log")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "containerd did not answer: {}",
                log.lines().last().unwrap_or("")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ctr image import` of an OCI layout whose one layer is the busybox-static rootfs.
    fn import_busybox(&self) {
        let layout = self.workdir.join("image");
        fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        let layer = add_blob(&layout, &fs::read(busybox_tar(&self.workdir)).unwrap());
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": [layer["digest"]] },
        });
        let config = add_blob(&layout, config.to_string().as_bytes());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": typed(config, "application/vnd.oci.image.config.v1+json"),
            "layers": [typed(layer, "application/vnd.oci.image.layer.v1.tar")],
        });
        let mut manifest = typed(add_blob(&layout, manifest.to_string().as_bytes()), MANIFEST);
        manifest["annotations"] = json!({ "io.containerd.image.name": CTR_IMAGE });
        let index = json!({ "schemaVersion": 2, "manifests": [manifest] });
        fs::write(layout.join("index.json"), index.to_string()).unwrap();
        fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let tarball = self.workdir.join("image.tar");
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&tarball)
            .arg(".")
            .status()
            .unwrap();
        assert!(tar.success(), "tar of the OCI layout failed");
        self.ctr(&[
            "image",
            "import",
            "--snapshotter",
            "native",
            tarball.to_str().unwrap(),
        ]);
    }

    /// Kills every task (their `ctr run`s DEL the network and return), removes every
    /// container.
    fn remove_all(&mut self, cleanup: &mut Cleanup) {
        for (id, child) in std::mem::take(&mut self.runs) {
            let _ = self.cmd(&["task", "kill", "-s", "SIGKILL", &id]).output();
            if wait_or_kill(child).is_none() {
                cleanup.check(Err(anyhow::anyhow!("ctr run {id} hung: killed")));
            }
        }
        let containers = self.cmd(&["container", "ls", "-q"]).output();
        for id in containers
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
            .split_whitespace()
        {
            let _ = self.cmd(&["task", "rm", "-f", id]).output();
            let rm = self.cmd(&["container", "rm", id]).output();
            cleanup.check(match rm {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(anyhow::anyhow!(
                    "ctr container rm {id}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => Err(e.into()),
            });
        }
    }

    /// SIGTERM containerd, then SIGKILL what is left in its mount namespace (its shims).
    fn stop_daemon(&mut self) {
        let ns = MountNs::of(self.daemon.id());
        let _ = kill(Pid::from_raw(self.daemon.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.daemon.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.daemon.try_wait().ok().flatten().is_none() {
            eprintln!("warning: containerd ignored SIGTERM, killing it");
            let _ = self.daemon.kill();
            let _ = self.daemon.wait();
        }
        if let Ok(ns) = ns {
            for pid in ns.pids() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }

    /// The containers' cgroups (containerd's namespace is their parent in every hierarchy),
    /// deepest first.
    fn remove_cgroups(&self, cleanup: &mut Cleanup) {
        for mount in cgroup_mounts() {
            let dir = mount.join(&self.namespace);
            if dir.is_dir() {
                for d in subtree(&dir).into_iter().rev() {
                    cleanup.check(remove_cgroup(&d));
                }
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let mut cleanup = Cleanup::of(format!("containerd {}", self.daemon.id()));
        self.remove_all(&mut cleanup);
        self.stop_daemon();
        self.remove_cgroups(&mut cleanup);
        cleanup.check(remove_tree(&self.workdir));
        cleanup.finish();
    }
}

/// `ctr run --cni [FLAGS] IMAGE ID COMMAND...` on the native snapshotter, output discarded.
fn run_args<'a>(flags: &[&'a str], id: &'a str, command: &[&'a str]) -> Vec<&'a str> {
    let run = ["run", "--cni", "--snapshotter", "native", "--null-io"];
    [&run[..], flags, &[CTR_IMAGE, id], command].concat()
}

/// Waits up to 30 s for `child` to exit; kills it (and `None`) when it doesn't.
fn wait_or_kill(mut child: Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().ok()? {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A blob's descriptor with its media type.
fn typed(mut descriptor: Value, media_type: &str) -> Value {
    descriptor["mediaType"] = json!(media_type);
    descriptor
}

/// Writes `bytes` as a blob of the OCI layout at `layout`: its descriptor's digest and size.
fn add_blob(layout: &Path, bytes: &[u8]) -> Value {
    let mut sha = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    std::io::Write::write_all(&mut sha.stdin.take().unwrap(), bytes).unwrap();
    let out = sha.wait_with_output().unwrap();
    let hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    json!({ "digest": format!("sha256:{hex}"), "size": bytes.len() })
}
