//! `netd demo`: netd's main job end to end, in a sandbox it builds and removes again.
//!
//! Every step is a real `netd` command run against the sandbox's host namespace, printed as a
//! user would type it, followed by its output. Nothing is reported that didn't happen: each
//! claim is read back from the kernel (pinned maps, sockets) after the traffic ran.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    netns,
    sandbox::{HOST_ADDR, Sandbox, UPLINK},
};

/// The sandbox, state dir and pin dir of one demo run; dropping it removes them all.
struct DemoEnv {
    sandbox: Sandbox,
    state_dir: PathBuf,
    bpffs: PathBuf,
}

impl DemoEnv {
    async fn create() -> Result<Self> {
        let prefix = format!("netd-demo-{}", std::process::id());
        step(&format!(
            "building the sandbox: namespaces {prefix}-host (netd's host) and {prefix}-out (the internet)"
        ));
        let sandbox = Sandbox::create(&prefix).await?;
        Ok(Self {
            state_dir: std::env::temp_dir().join(&prefix),
            bpffs: PathBuf::from("/sys/fs/bpf").join(&prefix),
            sandbox,
        })
    }

    /// Runs `netd ARGS` against the sandbox, echoing the command and its output.
    fn netd(&self, args: &[&str]) -> Result<String> {
        println!("$ netd {}", args.join(" "));
        let stdout = self.netd_quiet(args)?;
        for line in stdout.lines() {
            println!("  {line}");
        }
        Ok(stdout)
    }

    /// Runs `netd ARGS` against the sandbox and returns its output without echoing it.
    fn netd_quiet(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(std::env::current_exe()?)
            .arg("--host-netns")
            .arg(self.sandbox.host_path())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(args)
            .output()
            .context("run netd")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        for line in stdout.lines() {
            println!("  {line}");
        }
        if !out.status.success() {
            bail!(
                "netd {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }
}

impl Drop for DemoEnv {
    fn drop(&mut self) {
        step("removing the sandbox, its pins and its state");
        self.sandbox.remove();
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

fn step(what: &str) {
    println!("\n==> {what}");
}

pub async fn run() -> Result<()> {
    let env = DemoEnv::create().await?;
    step(&format!(
        "attaching netd's eBPF packet counter to the host uplink {UPLINK} (TCX, pinned)"
    ));
    env.netd(&["counter", "attach", UPLINK])?;

    step(&format!(
        "serving TCP on {HOST_ADDR}:8080 in the host; the outside sends 5 requests and 10 UDP datagrams"
    ));
    let replies = exchange_from_outside(&env.sandbox, 5, 10)?;
    println!("  the outside got {replies} replies");
    ensure!(replies == 5, "expected 5 replies, got {replies}");

    step("reading the counts back from the pinned map (a new netd process)");
    env.netd(&["counter", "show"])?;
    let counts: serde_json::Value =
        serde_json::from_str(&env.netd_quiet(&["counter", "show", "--json"])?)?;
    let packets = |proto: &str| {
        counts
            .as_array()
            .and_then(|a| a.iter().find(|c| c["proto"] == proto))
            .and_then(|c| c["packets"].as_u64())
            .unwrap_or(0)
    };
    ensure!(
        packets("udp") == 10,
        "the counter saw {} UDP packets, expected 10",
        packets("udp")
    );
    ensure!(
        packets("tcp") >= 15,
        "the counter saw only {} TCP packets",
        packets("tcp")
    );
    println!(
        "\nThe eBPF program saw every packet: {} TCP segments and {} UDP datagrams came in on {UPLINK}.",
        packets("tcp"),
        packets("udp")
    );
    env.netd(&["counter", "detach", UPLINK])?;
    drop(env);
    println!("\ndemo finished: everything it made is gone");
    Ok(())
}

/// Runs a TCP echo server in the sandbox host and, from the outside namespace, `requests` TCP
/// request/replies and `datagrams` UDP datagrams to the host. Returns the replies received.
fn exchange_from_outside(sandbox: &Sandbox, requests: usize, datagrams: usize) -> Result<usize> {
    let addr = SocketAddr::from((HOST_ADDR, 8080));
    let listener = netns::run_in(Some(&sandbox.host_path()), || Ok(TcpListener::bind(addr)?))?;
    let server = std::thread::spawn(move || -> Result<()> {
        for _ in 0..requests {
            let (mut conn, _) = listener.accept()?;
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf)?;
            conn.write_all(&buf[..n])?;
        }
        Ok(())
    });
    let replies = netns::run_in(Some(&sandbox.outside_path()), || {
        let mut replies = 0;
        for _ in 0..requests {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            conn.set_read_timeout(Some(Duration::from_secs(2)))?;
            conn.write_all(b"hello netd")?;
            let mut buf = [0u8; 64];
            if conn.read(&mut buf)? > 0 {
                replies += 1;
            }
        }
        let udp = UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..datagrams {
            udp.send_to(b"netd", (HOST_ADDR, 9))?;
        }
        Ok(replies)
    })?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok(replies)
}
