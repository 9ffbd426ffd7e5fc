//! The state store and the core's guarantees seen through the CLI: a long `netd exec` blocks
//! no other command, the iptables datapath and the listings need no bpf filesystem, and a
//! teardown that fails names what it couldn't remove and leaves it recorded for `gc`.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    process::Stdio,
    time::{Duration, Instant},
};

use netd::netns;
use netd_common::datapath::ENDPOINTS_MAP;
use netd_testkit::netd_bin;
use nix::{sys::signal::Signal, unistd::Pid};
use tests::harness::TestEnv;

/// Runs netd `args` and waits at most `limit` for it; panics naming it if it takes longer.
fn finishes_within(env: &TestEnv, args: &[&str], limit: Duration) -> String {
    let mut child = env
        .netd_cmd(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("netd {args:?} was still waiting after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "netd {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_long_exec_blocks_no_other_command() {
    let env = TestEnv::new();
    let (web, other) = (env.name("web"), env.name("other"));
    env.netd_ok(&["network", "create", "n", "--subnet", "10.78.0.0/24"]);
    env.netd_ok(&["container", "create", &web, "--network", "n"]);
    // `netd exec web -- sleep 600`, in a process group of its own so the test can end both.
    let mut exec = env
        .netd_cmd(&[
            "exec",
            &web,
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 600",
        ])
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(exec.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "started");
    // Every kind of command, reading and changing state, goes ahead meanwhile.
    let limit = Duration::from_secs(30);
    let created = finishes_within(
        &env,
        &["container", "create", &other, "--network", "n"],
        limit,
    );
    assert!(created.starts_with(&other), "{created}");
    let listed = finishes_within(&env, &["container", "ls"], limit);
    assert!(listed.contains(&web) && listed.contains(&other), "{listed}");
    finishes_within(&env, &["publish", &other, "-p", "18090:90"], limit);
    finishes_within(&env, &["container", "rm", &other], limit);
    finishes_within(&env, &["gc"], limit);
    // The exec itself is still running (positive control: it was holding whatever it holds).
    assert!(exec.try_wait().unwrap().is_none(), "the exec ended early");
    nix::sys::signal::killpg(Pid::from_raw(exec.id() as i32), Signal::SIGKILL).unwrap();
    exec.wait().unwrap();
    env.netd_ok(&["container", "rm", &web]);
}

#[test]
fn the_iptables_datapath_and_listings_need_no_bpf_filesystem() {
    let env = TestEnv::new();
    let c = env.name("c");
    // A directory on the state dir's filesystem, which is not a bpffs.
    let not_bpffs = env.state_dir.join("not-bpffs");
    let netd = |args: &[&str]| {
        std::process::Command::new(netd_bin().expect("the netd binary"))
            .arg("--host-netns")
            .arg(env.host_ns())
            .arg("--state-dir")
            .arg(&env.state_dir)
            .arg("--bpffs")
            .arg(&not_bpffs)
            .args(args)
            .output()
            .unwrap()
    };
    let ok = |args: &[&str]| {
        let out = netd(args);
        assert!(out.status.success(), "netd {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(ok(&["network", "ls"]).starts_with("NAME"));
    ok(&[
        "--datapath",
        "iptables",
        "network",
        "create",
        "n",
        "--subnet",
        "10.79.0.0/24",
    ]);
    ok(&[
        "container",
        "create",
        &c,
        "--network",
        "n",
        "-p",
        "18091:91",
    ]);
    assert!(ok(&["container", "ls"]).contains(&c));
    assert!(ok(&["network", "ls"]).contains("iptables"));
    ok(&["container", "rm", &c]);
    ok(&["network", "rm", "n"]);
    // Positive control: the eBPF datapath does need one, and says so in one line.
    let out = netd(&["network", "create", "e", "--subnet", "10.79.1.0/24"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bpf"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!ok(&["network", "ls"]).contains("10.79.1.0"));
}

/// Deletes the ENDPOINTS entry whose key holds `ip`'s bytes, behind netd's back.
fn delete_endpoint_entry(env: &TestEnv, ip: std::net::Ipv4Addr) {
    let pin = env.bpffs.join("maps").join(ENDPOINTS_MAP);
    let dump = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&pin)
        .output()
        .unwrap();
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&dump.stdout).unwrap();
    let octets: Vec<String> = ip.octets().iter().map(|b| format!("0x{b:02x}")).collect();
    let key = entries
        .iter()
        .map(|e| {
            e["key"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .find(|k| k.windows(4).any(|w| w == octets.as_slice()))
        .unwrap_or_else(|| panic!("no endpoint entry for {ip}: {entries:?}"));
    let hex: Vec<String> = key
        .iter()
        .map(|b| b.trim_start_matches("0x").to_string())
        .collect();
    let status = std::process::Command::new("bpftool")
        .args(["map", "delete", "pinned"])
        .arg(&pin)
        .arg("key")
        .arg("hex")
        .args(&hex)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_failed_teardown_names_what_failed_and_gc_retries_it() {
    let env = TestEnv::new();
    let c = env.name("c");
    env.netd_ok(&["network", "create", "n", "--subnet", "10.80.0.0/24"]);
    env.netd_ok(&[
        "container",
        "create",
        &c,
        "--network",
        "n",
        "--ip",
        "10.80.0.5",
    ]);
    delete_endpoint_entry(&env, "10.80.0.5".parse().unwrap());
    let err = env.netd_err(&["container", "rm", &c]);
    assert!(
        err.contains(&format!("remove container \"{c}\"")) && err.contains("the datapath endpoint"),
        "{err}"
    );
    // Everything else went; the record stays, marked for gc.
    assert!(!netns::exists(&c));
    let rec = env.netd_json(&["container", "inspect", &c]);
    assert_eq!(rec["status"], "removing", "{rec}");
    let out = env.netd_ok(&["gc"]);
    assert!(out.contains(&c), "{out}");
    assert!(
        env.netd_err(&["container", "inspect", &c])
            .contains("no container")
    );
    // The address is free again.
    env.netd_ok(&[
        "container",
        "create",
        &c,
        "--network",
        "n",
        "--ip",
        "10.80.0.5",
    ]);
    env.netd_ok(&["container", "rm", &c]);
}
