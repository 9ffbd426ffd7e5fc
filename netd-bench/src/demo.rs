//! The demo (`cargo xtask demo`): netd's main job end to end, in a sandbox it builds and removes again.
//!
//! Every step is a real `netd` command run against the sandbox's host namespace, printed as a
//! user would type it, followed by its output. Nothing is reported that didn't happen: each
//! claim is checked against what the kernel shows (sockets, the datapath's pinned counters,
//! the netfilter tables) before it is printed.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use netd::{netlink::Netlink, netns};
use netd_testkit::{
    HOST_ADDR, Instance, OUTSIDE_ADDR,
    traffic::{echo_peers, serve_echo, tcp_request, try_output_in},
};

/// Runs `netd ARGS` in the demo's instance, echoing the command and its output.
fn netd(inst: &Instance, args: &[&str]) -> Result<String> {
    println!("$ netd {}", args.join(" "));
    let stdout = inst.try_netd(args)?;
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
        "building the sandbox: namespaces {prefix}-host (netd's host, uplink {HOST_ADDR}) and {prefix}-out (the internet, {OUTSIDE_ADDR})"
    ));
    let env = Instance::create(&prefix).await?;
    let (web, client) = (env.name("web"), env.name("client"));

    step("a network and two containers; web publishes port 80 on the host's port 8080");
    netd(
        &env,
        &["network", "create", "demo", "--subnet", "10.88.0.0/24"],
    )?;
    netd(
        &env,
        &[
            "container",
            "create",
            &web,
            "--network",
            "demo",
            "-p",
            "8080:80",
        ],
    )?;
    netd(&env, &["container", "create", &client, "--network", "demo"])?;
    netd(&env, &["container", "ls"])?;

    step(&format!(
        "a server in {web} on port 80; the outside connects to {HOST_ADDR}:8080 three times"
    ));
    let server = serve_echo(&netns::path_of(&web), 80, 3)?;
    for i in 1..=3 {
        echo_through(
            &env.sandbox.outside_path(),
            "the outside",
            SocketAddr::from((HOST_ADDR, 8080)),
            &format!("hello {i}"),
        )?;
    }
    let peers = echo_peers(server)?;
    ensure!(
        peers.iter().all(|p| p.ip() == IpAddr::V4(OUTSIDE_ADDR)),
        "the server saw {peers:?}, expected the outside's address"
    );
    println!(
        "  {web} saw every connection come from {OUTSIDE_ADDR} (DNAT keeps the client's address)"
    );

    step(&format!(
        "{client} connects to a server on the outside; the outside sees the host's address"
    ));
    let server = serve_echo(&env.sandbox.outside_path(), 7000, 1)?;
    echo_through(
        &netns::path_of(&client),
        &client,
        SocketAddr::from((OUTSIDE_ADDR, 7000)),
        "hello from a container",
    )?;
    let peers = echo_peers(server)?;
    ensure!(
        peers.len() == 1 && peers[0].ip() == IpAddr::V4(HOST_ADDR),
        "the outside saw {peers:?}, expected {HOST_ADDR}"
    );
    println!("  the outside saw the connection come from {HOST_ADDR} (masquerade)");

    step(&format!(
        "the outside routes to {web}'s own address, past the published port: refused"
    ));
    let outside = env.sandbox.outside_path();
    Netlink::in_ns(Some(&outside))?
        .add_route("10.88.0.0/24".parse()?, Some(HOST_ADDR.into()), None)
        .await?;
    let inspect: serde_json::Value =
        serde_json::from_str(&env.try_netd(&["container", "inspect", &web])?)?;
    let web_ip: IpAddr = inspect["ip"].as_str().context("no ip")?.parse()?;
    let direct = SocketAddr::from((web_ip, 80));
    let tried = netns::run_in(Some(&outside), || {
        Ok(TcpStream::connect_timeout(&direct, Duration::from_secs(1)))
    })?;
    match tried {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => println!(
            "  connect to {direct}: no answer (dropped on the uplink, as Docker's FORWARD policy DROP does)"
        ),
        other => bail!("a connection straight to {direct} was not dropped: {other:?}"),
    }

    step("the eBPF datapath's connection table and counters (read from its pinned maps)");
    netd(&env, &["conntrack", "ls"])?;
    let stats: serde_json::Value = serde_json::from_str(&env.try_netd(&["stats", "--json"])?)?;
    let count = |reason: &str| {
        stats["reasons"]
            .as_array()
            .and_then(|r| r.iter().find(|c| c["reason"] == reason))
            .and_then(|c| c["packets"].as_u64())
            .unwrap_or(0)
    };
    let (dnat, snat, refused) = (count("dnat_new"), count("snat_new"), count("unsolicited"));
    ensure!(
        dnat >= 3 && snat >= 1 && refused >= 1,
        "the datapath counted {dnat} new DNAT, {snat} new SNAT and {refused} refused flows"
    );
    println!(
        "  new flows translated by eBPF: {dnat} DNAT (published port), {snat} SNAT (masquerade); refused: {refused} (unsolicited)"
    );
    let rules = netfilter_rules(&env.sandbox.host_path())?;
    ensure!(
        rules == 0,
        "the host namespace holds {rules} netfilter rules"
    );
    println!("  netfilter rules in the host namespace: {rules} (iptables-save)");

    step("removing the containers and the network");
    netd(&env, &["container", "rm", &web])?;
    netd(&env, &["container", "rm", &client])?;
    netd(&env, &["network", "rm", "demo"])?;
    step("removing the sandbox, its pins and its state");
    drop(env);
    println!("\ndemo finished: everything it made is gone");
    Ok(())
}

/// Sends `text` from `from` to the echo server at `to`; the reply must be `text` again.
fn echo_through(from: &Path, who: &str, to: SocketAddr, text: &str) -> Result<()> {
    let reply = tcp_request(from, to, text)?;
    ensure!(
        reply == text,
        "{who} sent {text:?} to {to}, got back {reply:?}"
    );
    println!("  {who} sent {text:?} to {to} and got it echoed back");
    Ok(())
}

fn netfilter_rules(ns: &Path) -> Result<usize> {
    Ok(try_output_in(ns, "iptables-save", &[])?
        .lines()
        .filter(|l| l.starts_with("-A "))
        .count())
}
