//! `netd daemon` as a server: the core's API as JSON over HTTP on a unix socket, next to the
//! CLI (which keeps working on the same state). At 30,000 published mappings, one more port
//! published through the daemon carries traffic from the outside, and unpublished, refuses it;
//! the 100,000th published port carries traffic too.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use netd_common::datapath::{PUBLISHED_MAP, PUBLISHED_MAX};
use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::{Value, json};
use tests::harness::{HOST_ADDR, TestEnv, UPLINK};

/// One request to the daemon; returns the status code and the JSON answer.
fn call(socket: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut stream = UnixStream::connect(socket).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: netd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn start_daemon(env: &TestEnv, socket: &Path) -> Child {
    let mut child = env
        .netd_cmd(&["daemon", "--sweep-interval", "60", "--socket"])
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tests::cli::wait_until_serving(&mut child, socket);
    child
}

fn publish(proto: &str, host: (u16, u16), container: (u16, u16)) -> Value {
    publish_on(None, proto, host, container)
}

/// Host ports `host` (on `ip`, or any host address) to container ports `container`.
fn publish_on(ip: Option<Ipv4Addr>, proto: &str, host: (u16, u16), container: (u16, u16)) -> Value {
    json!({"host_ip": ip, "host_ports": [host.0, host.1], "container_ports": [container.0, container.1], "proto": proto})
}

#[test]
fn the_daemon_serves_the_core_and_publishes_one_more_port_at_30000_mappings() {
    let env = TestEnv::new();
    let c = env.name("c");
    let socket = env.state_dir.join("api.sock");
    let mut daemon = start_daemon(&env, &socket);

    let (status, net) = call(
        &socket,
        "POST",
        "/v1/networks",
        Some(json!({"name": "n", "subnet": "10.81.0.0/24"})),
    );
    assert_eq!(status, 200, "{net}");
    assert_eq!(net["gateway"], "10.81.0.1");
    // 30,000 mappings, published with the container.
    let spec = json!({
        "name": c,
        "mode": {"bridge": {"network": "n", "publish": [publish("udp", (20000, 49999), (20000, 49999))]}},
    });
    let (status, created) = call(&socket, "POST", "/v1/containers", Some(spec));
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["ports"].as_array().unwrap().len(), 30_000);
    let ip = created["ip"].as_str().unwrap().to_string();

    // One more, through the daemon: it carries a connection from the outside.
    let listener = env.in_ns(&netd::netns::path_of(&c), || {
        TcpListener::bind("0.0.0.0:80").unwrap()
    });
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(&buf).unwrap();
    });
    let path = format!("/v1/containers/{c}/ports");
    let start = Instant::now();
    let (status, added) = call(
        &socket,
        "POST",
        &path,
        Some(json!([publish("tcp", (18080, 18080), (80, 80))])),
    );
    // Reported, not asserted: this machine is shared; the benchmark measures it.
    eprintln!(
        "one more port through the daemon at 30,000 mappings: {:?}",
        start.elapsed()
    );
    assert_eq!(status, 200, "{added}");
    assert_eq!(added[0]["host_port"], 18080);
    let echoed = env.in_ns(&env.outside_ns(), || {
        let to: SocketAddr = (HOST_ADDR, 18080).into();
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(3)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        conn.write_all(b"netd").unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).unwrap();
        buf
    });
    assert_eq!(&echoed, b"netd");
    server.join().unwrap();

    // The same port again is refused, in one line, naming it.
    let (status, err) = call(
        &socket,
        "POST",
        &path,
        Some(json!([publish("tcp", (18080, 18080), (81, 81))])),
    );
    assert_eq!(status, 400);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("18080/tcp is already published"),
        "{err}"
    );
    // The CLI works alongside, on the same state.
    let ports = env.netd_ok(&["port", &c]);
    assert_eq!(ports.lines().count(), 30_001);
    assert!(ports.contains("80/tcp -> 0.0.0.0:18080"), "{ports}");
    assert_eq!(env.netd_json(&["container", "inspect", &c])["ip"], ip);

    // Unpublished through the daemon: new connections are refused, the other ports stay.
    let unpublish = json!([publish("tcp", (18080, 18080), (80, 80))]);
    let (status, removed) = call(&socket, "DELETE", &path, Some(unpublish.clone()));
    assert_eq!(status, 200, "{removed}");
    assert_eq!(removed[0]["host_port"], 18080);
    let refused = env.in_ns(&env.outside_ns(), || {
        let to: SocketAddr = (HOST_ADDR, 18080).into();
        TcpStream::connect_timeout(&to, Duration::from_secs(3)).map(drop)
    });
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    assert_eq!(env.netd_ok(&["port", &c]).lines().count(), 30_000);
    let (status, err) = call(&socket, "DELETE", &path, Some(unpublish));
    assert_eq!(status, 400);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("does not publish 18080:80/tcp"),
        "{err}"
    );

    let (status, _) = call(&socket, "GET", "/v1/nosuch", None);
    assert_eq!(status, 404);
    assert_eq!(
        call(&socket, "DELETE", &format!("/v1/containers/{c}"), None).0,
        200
    );
    assert_eq!(call(&socket, "DELETE", "/v1/networks/n", None).0, 200);
    assert_eq!(call(&socket, "GET", "/v1/networks", None).1, json!([]));
    nix::sys::signal::kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM).unwrap();
    assert!(daemon.wait().unwrap().success());
    assert!(!socket.exists());
}

/// `bytes_memlock` of this instance's pinned PUBLISHED map: the kernel memory it takes.
fn published_memlock(env: &TestEnv) -> u64 {
    let pin = env.bpffs.join("maps").join(PUBLISHED_MAP);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&pin)
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool map show {}", pin.display());
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["bytes_memlock"]
        .as_u64()
        .unwrap()
}

/// Past the 65,536 entries PUBLISHED used to hold: through the daemon, 100,000 published
/// ports on the host's address (the 100,000th carries a connection from the outside), then
/// up to the map's 131,072 on a second address, where one more is refused in one line naming
/// the limit.
#[test]
fn the_daemon_publishes_100000_ports_and_refuses_one_past_the_map_in_one_line() {
    let env = TestEnv::new();
    let c = env.name("c");
    let socket = env.state_dir.join("api.sock");
    let mut daemon = start_daemon(&env, &socket);
    let (status, net) = call(
        &socket,
        "POST",
        "/v1/networks",
        Some(json!({"name": "n", "subnet": "10.88.0.0/24"})),
    );
    assert_eq!(status, 200, "{net}");
    let empty = published_memlock(&env);

    let spec = json!({
        "name": c,
        "mode": {"bridge": {"network": "n", "publish": [
            publish_on(Some(HOST_ADDR), "udp", (1, 50_000), (1, 50_000)),
            publish_on(Some(HOST_ADDR), "tcp", (1, 49_999), (1, 49_999)),
        ]}},
    });
    let (status, created) = call(&socket, "POST", "/v1/containers", Some(spec));
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["ports"].as_array().unwrap().len(), 99_999);

    let listener = env.in_ns(&netd::netns::path_of(&c), || {
        TcpListener::bind("0.0.0.0:80").unwrap()
    });
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(&buf).unwrap();
    });
    let path = format!("/v1/containers/{c}/ports");
    let (status, added) = call(
        &socket,
        "POST",
        &path,
        Some(json!([publish_on(
            Some(HOST_ADDR),
            "tcp",
            (50_000, 50_000),
            (80, 80)
        )])),
    );
    assert_eq!(status, 200, "{added}");
    assert_eq!(tests::cli::map_entries(&env, PUBLISHED_MAP), 100_000);
    let echoed = env.in_ns(&env.outside_ns(), || {
        let to: SocketAddr = (HOST_ADDR, 50_000).into();
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(3)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        conn.write_all(b"netd").unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).unwrap();
        buf
    });
    assert_eq!(&echoed, b"netd");
    server.join().unwrap();
    // Reported for the record (the map allocates per entry: its memory follows the ports).
    eprintln!(
        "PUBLISHED bytes_memlock: {empty} empty, {} at 100,000 ports",
        published_memlock(&env)
    );

    // The map's last 31,072 entries, on another address of the host; then it is full.
    let other = Ipv4Addr::new(198, 18, 0, 3);
    let out = env.run_in(
        &env.host_ns(),
        "ip",
        &["addr", "add", &format!("{other}/24"), "dev", UPLINK],
    );
    assert!(out.status.success(), "{out:?}");
    let (status, added) = call(
        &socket,
        "POST",
        &path,
        Some(json!([publish_on(
            Some(other),
            "udp",
            (1, 31_072),
            (1, 31_072)
        )])),
    );
    assert_eq!(status, 200, "{added}");
    let (status, err) = call(
        &socket,
        "POST",
        &path,
        Some(json!([publish_on(Some(other), "tcp", (1, 1), (1, 1))])),
    );
    assert_eq!(status, 400);
    let err = err["error"].as_str().unwrap();
    assert!(
        err.contains("PUBLISHED map is full (131072 published ports)") && !err.contains('\n'),
        "{err}"
    );
    assert_eq!(
        tests::cli::map_entries(&env, PUBLISHED_MAP),
        PUBLISHED_MAX as usize,
        "the refused port was left in the map or a published one taken out"
    );

    assert_eq!(
        call(&socket, "DELETE", &format!("/v1/containers/{c}"), None).0,
        200
    );
    assert_eq!(tests::cli::map_entries(&env, PUBLISHED_MAP), 0);
    assert_eq!(call(&socket, "DELETE", "/v1/networks/n", None).0, 200);
    nix::sys::signal::kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM).unwrap();
    assert!(daemon.wait().unwrap().success());
}

/// A `netd daemon` with the Docker plugin `p` in `dir`, started with umask 000.
fn start_with_plugin(env: &TestEnv, socket: &Path, dir: &Path) -> Child {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = env.netd_cmd(&["daemon", "--sweep-interval", "60", "--socket"]);
    cmd.arg(socket)
        .args(["--docker-plugin", "p", "--docker-plugin-dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: umask is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::empty());
            Ok(())
        })
    };
    let mut child = cmd.spawn().unwrap();
    tests::cli::wait_until_serving(&mut child, &dir.join("p.sock"));
    tests::cli::wait_until_serving(&mut child, socket);
    child
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_sockets_are_roots_alone_and_a_second_daemon_takes_neither() {
    let env = TestEnv::new();
    let (socket, dir) = (
        env.state_dir.join("api.sock"),
        env.state_dir.join("plugins"),
    );
    let daemon = start_with_plugin(&env, &socket, &dir);
    let plugin = dir.join("p.sock");
    // Root's alone, whatever the umask.
    assert_eq!(mode_of(&socket), 0o600);
    assert_eq!(mode_of(&plugin), 0o600);
    assert_eq!(mode_of(&dir), 0o700);
    // A second daemon with the same plugin (on another API socket) is refused, and the first
    // keeps both of its sockets.
    let other = env.state_dir.join("other.sock");
    let out = env
        .netd_cmd(&["daemon", "--socket"])
        .arg(&other)
        .args(["--docker-plugin", "p", "--docker-plugin-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("a daemon already serves"),
        "{err}"
    );
    UnixStream::connect(&plugin).expect("the first daemon lost its plugin socket");
    UnixStream::connect(&socket).expect("the first daemon lost its API socket");
    // A body past 4 MiB is refused in one line rather than read into memory.
    let mut stream = UnixStream::connect(&socket).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sent = std::thread::spawn(move || {
        let huge = vec![b'x'; 5 << 20];
        let head = format!(
            "POST /v1/networks HTTP/1.1\r\nHost: netd\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            huge.len()
        );
        // The daemon may answer and close before it has all of it.
        let _ = writer.write_all(head.as_bytes());
        let _ = writer.write_all(&huge);
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    sent.join().unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(
        raw.starts_with("HTTP/1.1 400") && raw.contains("request body over 4 MiB"),
        "{raw}"
    );
    nix::sys::signal::kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM).unwrap();
    assert!(daemon.wait_with_output().unwrap().status.success());
}
