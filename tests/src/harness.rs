//! The integration-test harness: every test gets its own netd in a sandbox
//! ([`netd_testkit::Instance`], here named `TestEnv`), which removes everything it made, and
//! every process it started, on success, failure and panic, and fails the test when it can't.

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
};

pub use netd_testkit::{
    HOST_ADDR, HOST_ADDR6, Instance as TestEnv, OUTSIDE_ADDR, OUTSIDE_ADDR6, OUTSIDE_LINK, UPLINK,
};

/// The netd binary under test (`NETD_BIN`); panics, naming the fix, when it isn't set.
pub fn netd_bin() -> PathBuf {
    netd_testkit::netd_bin().unwrap_or_else(|e| panic!("{e:#}"))
}

/// The named namespaces `env` made that exist, sorted.
pub fn namespaces(env: &TestEnv) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(netd::netns::NETNS_RUN_DIR)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&env.prefix))
        .collect();
    names.sort();
    names
}

/// The interfaces of `env`'s sandbox host namespace, sorted.
pub fn host_links(env: &TestEnv) -> Vec<String> {
    let out = env.run_in(&env.host_ns(), "ip", &["-o", "link"]);
    let mut links: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .collect();
    links.sort();
    links
}

/// `env`'s networks and containers as `ls --json` lists them.
pub fn netd_state(env: &TestEnv) -> String {
    format!(
        "{}{}",
        env.netd_ok(&["network", "ls", "--json"]),
        env.netd_ok(&["container", "ls", "--json"])
    )
}

/// A TCP connection from the fixed local address `local` (SO_REUSEADDR so tests can repeat).
pub fn bound_connect(local: SocketAddr, server: SocketAddr) -> TcpStream {
    try_bound_connect(local, server)
        .unwrap_or_else(|e| panic!("connect from {local} to {server}: {e}"))
}

/// [`bound_connect`], or why it failed: a connection nothing answers gives up after 5 s
/// (`SO_SNDTIMEO`, which `connect` keeps to).
pub fn try_bound_connect(local: SocketAddr, server: SocketAddr) -> nix::Result<TcpStream> {
    use nix::sys::{
        socket::{
            AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
            sockopt,
        },
        time::TimeVal,
    };
    let family = if local.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(5, 0)).unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    bind(raw, &SockaddrStorage::from(local)).unwrap();
    connect(raw, &SockaddrStorage::from(server))?;
    Ok(TcpStream::from(fd))
}

/// Closes `conn` with a RST (`SO_LINGER` 0), as a client that resets its connections does:
/// no TIME_WAIT holds its port.
pub fn reset(conn: TcpStream) {
    let now = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&conn, nix::sys::socket::sockopt::Linger, &now).unwrap();
}

/// The userland proxies running in `env`'s sandbox host namespace, as their arguments
/// (`--proto P --listen A --to B`), sorted.
pub fn proxies(env: &TestEnv) -> Vec<String> {
    proxy_pids(env).into_iter().map(|(_, args)| args).collect()
}

/// [`proxies`] with their PIDs.
pub fn proxy_pids(env: &TestEnv) -> Vec<(i32, String)> {
    use std::os::unix::fs::MetadataExt as _;
    let ns_link = format!("net:[{}]", std::fs::metadata(env.host_ns()).unwrap().ino());
    let mut found: Vec<(i32, String)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|l| l.as_os_str() == ns_link.as_str())
        })
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let shown = args.get(2..8)?.join(" ");
            (args[1] == "proxy").then_some((pid, shown))
        })
        .collect();
    found.sort_by(|a, b| a.1.cmp(&b.1));
    found
}
