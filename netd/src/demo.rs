//! `netd demo`: netd's main job end to end, in a sandbox it builds and removes again.
//!
//! Every step is a real `netd` command run against the sandbox's host namespace, printed as a
//! user would type it, followed by its output. Nothing is reported that didn't happen: each
//! claim is read back from the kernel (pinned maps, sockets) after the traffic ran.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Result, ensure};

use crate::{
    netns,
    sandbox::{HOST_ADDR, Instance, Sandbox, UPLINK},
};

/// Runs `netd ARGS` in the demo's instance, echoing the command and its output.
fn netd(inst: &Instance, args: &[&str]) -> Result<String> {
    println!("$ netd {}", args.join(" "));
    let stdout = inst.netd(args)?;
    for line in stdout.lines() {
        println!("  {line}");
    }
    Ok(stdout)
}

fn step(what: &str) {
    println!("\n==> {what}");
}

pub async fn run() -> Result<()> {
    let prefix = format!("netd-demo-{}", std::process::id());
    step(&format!(
        "building the sandbox: namespaces {prefix}-host (netd's host) and {prefix}-out (the internet)"
    ));
    let env = Instance::create(&prefix).await?;
    step(&format!(
        "attaching netd's eBPF packet counter to the host uplink {UPLINK} (TCX, pinned)"
    ));
    netd(&env, &["counter", "attach", UPLINK])?;

    step(&format!(
        "serving TCP on {HOST_ADDR}:8080 in the host; the outside sends 5 requests and 10 UDP datagrams"
    ));
    let replies = exchange_from_outside(&env.sandbox, 5, 10)?;
    println!("  the outside got {replies} replies");
    ensure!(replies == 5, "expected 5 replies, got {replies}");

    step("reading the counts back from the pinned map (a new netd process)");
    netd(&env, &["counter", "show"])?;
    let counts: serde_json::Value =
        serde_json::from_str(&env.netd(&["counter", "show", "--json"])?)?;
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
    netd(&env, &["counter", "detach", UPLINK])?;
    step("removing the sandbox, its pins and its state");
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
