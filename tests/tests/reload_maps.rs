//! `netd reload` across netd versions whose pinned maps differ: a map an older netd pinned
//! with fewer entries (PUBLISHED had 65,536, preallocated) is made again with this build's
//! size, its entries copied, before the programs are replaced; a map whose value layout
//! changed is refused in one line before anything is touched, and the running programs go on.
//!
//! The older netd's map is made here with bpftool, holding the entries of the pinned one,
//! and put in its place under the pin (the running programs keep the map they were loaded
//! with; the CLI and the reloaded programs use the pin).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use netd_common::datapath::{PUBLISHED_FLAGS, PUBLISHED_MAP, PUBLISHED_MAX};
use serde_json::Value;
use tests::{
    cli::{Ctr, create, echo_server, map_entries, tcp_echo},
    harness::{HOST_ADDR, TestEnv},
};

fn bpftool(args: &[&str]) -> String {
    let out = Command::new("bpftool").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn map_pin(env: &TestEnv, name: &str) -> PathBuf {
    env.bpffs.join("maps").join(name)
}

/// `bpftool map show` of the map pinned at `pin`.
fn map_info(pin: &Path) -> Value {
    serde_json::from_str(&bpftool(&[
        "-j",
        "map",
        "show",
        "pinned",
        pin.to_str().unwrap(),
    ]))
    .unwrap()
}

/// Every entry of the map pinned at `pin`, as bytes.
fn map_dump(pin: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let dump: Value = serde_json::from_str(&bpftool(&[
        "-j",
        "map",
        "dump",
        "pinned",
        pin.to_str().unwrap(),
    ]))
    .unwrap();
    let bytes = |v: &Value| -> Vec<u8> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
            .collect()
    };
    dump.as_array()
        .unwrap()
        .iter()
        .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
        .collect()
}

fn hex(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("0x{b:02x}")).collect()
}

/// Puts under map `name`'s pin a map of the same type and key as the pinned one, with
/// `max_entries`, `value_size` and `flags`, holding the pinned one's entries (values cut or
/// padded with zeros): what an older netd would have pinned.
fn pin_older_map(env: &TestEnv, name: &str, max_entries: u32, value_size: usize, flags: u32) {
    let pin = map_pin(env, name);
    let info = map_info(&pin);
    let older = env.bpffs.join(format!("older-{name}"));
    let older_path = older.to_str().unwrap();
    bpftool(&[
        "map",
        "create",
        older_path,
        "type",
        info["type"].as_str().unwrap(),
        "key",
        &info["bytes_key"].to_string(),
        "value",
        &value_size.to_string(),
        "entries",
        &max_entries.to_string(),
        "name",
        name,
        "flags",
        &flags.to_string(),
    ]);
    for (key, mut value) in map_dump(&pin) {
        value.resize(value_size, 0);
        let mut args = vec!["map", "update", "pinned", older_path, "key"];
        let (key, value) = (hex(&key), hex(&value));
        args.extend(key.iter().map(String::as_str));
        args.push("value");
        args.extend(value.iter().map(String::as_str));
        bpftool(&args);
    }
    std::fs::remove_file(&pin).unwrap();
    std::fs::rename(&older, &pin).unwrap();
}

/// A network and a container with an echo server published on host port 8080.
fn published_echo(env: &TestEnv, subnet: &str) -> Ctr {
    env.netd_ok(&["network", "create", "n", "--subnet", subnet]);
    create(env, "srv", &["--network", "n", "-p", "8080:80"])
}

/// Whether a connection from the outside to `port` on the host reaches `srv`'s echo server.
fn echoes(env: &TestEnv, srv: &Ctr, port: u16) -> bool {
    let server = echo_server(env, &srv.ns, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 80)));
    let echoed = tcp_echo(env, &env.outside_ns(), SocketAddr::from((HOST_ADDR, port)));
    if echoed.is_err() {
        // Unblock the server's accept.
        let _ = tcp_echo(env, &srv.ns, SocketAddr::from((srv.ip, 80)));
    }
    let _ = server.join();
    echoed.is_ok_and(|e| e == "netd")
}

/// The IDs of the programs pinned under `progs/` (the build attached last).
fn pinned_program_ids(env: &TestEnv) -> Vec<u64> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(env.bpffs.join("progs")).unwrap() {
        let path = entry.unwrap().path();
        let shown: Value = serde_json::from_str(&bpftool(&[
            "-j",
            "prog",
            "show",
            "pinned",
            path.to_str().unwrap(),
        ]))
        .unwrap();
        ids.push(shown["id"].as_u64().unwrap());
    }
    ids.sort_unstable();
    ids
}

/// An older netd's PUBLISHED (65,536 entries, preallocated) is made again with this build's
/// 131,072 entries allocated per entry: its entries are kept, the published port carries
/// traffic through the reloaded programs, and a port published after the reload too.
#[test]
fn reload_moves_an_older_netds_published_map_to_the_new_size_keeping_its_ports() {
    let env = TestEnv::new();
    let srv = published_echo(&env, "10.84.0.0/24");
    assert!(echoes(&env, &srv, 8080), "no traffic before the swap");
    let pin = map_pin(&env, PUBLISHED_MAP);
    pin_older_map(&env, PUBLISHED_MAP, 65_536, 24, 0);
    assert_eq!(map_info(&pin)["max_entries"], 65_536);
    // Any other load refuses the older map: only a reload moves it.
    let err = env.netd_err(&["network", "create", "m", "--subnet", "10.85.0.0/24"]);
    assert!(
        err.contains("map PUBLISHED: 65536 → 131072 entries") && err.contains("netd reload"),
        "{err}"
    );

    let programs = pinned_program_ids(&env);
    let out = env.netd_ok(&["reload"]);
    assert!(out.contains("programs replaced"), "{out}");
    let info = map_info(&pin);
    assert_eq!(info["max_entries"], PUBLISHED_MAX);
    assert_eq!(info["flags"], PUBLISHED_FLAGS);
    assert_eq!(
        map_entries(&env, PUBLISHED_MAP),
        1,
        "the published port was lost"
    );
    assert_ne!(
        pinned_program_ids(&env),
        programs,
        "the programs were not replaced"
    );
    assert!(echoes(&env, &srv, 8080), "no traffic after the reload");
    // What the CLI publishes now goes into the map the programs read.
    env.netd_ok(&["publish", &srv.name, "-p", "8081:80"]);
    assert!(
        echoes(&env, &srv, 8081),
        "a port published after the reload"
    );
    for leftover in ["maps-next", "maps-old"] {
        assert!(!env.bpffs.join(leftover).exists(), "{leftover} left behind");
    }
    // A second reload has nothing to move.
    env.netd_ok(&["reload"]);
    assert_eq!(map_entries(&env, PUBLISHED_MAP), 2);
}

/// A pinned map whose value is another size than this build's is refused in one line naming
/// the map and the change; nothing is replaced and traffic goes on through the old programs.
#[test]
fn reload_refuses_a_map_whose_value_changed_and_the_old_programs_keep_working() {
    let env = TestEnv::new();
    let srv = published_echo(&env, "10.86.0.0/24");
    let pin = map_pin(&env, PUBLISHED_MAP);
    pin_older_map(&env, PUBLISHED_MAP, PUBLISHED_MAX, 28, PUBLISHED_FLAGS);
    let programs = pinned_program_ids(&env);

    let err = env.netd_err(&["reload"]);
    assert!(
        err.contains("map PUBLISHED: value 28 → 24 bytes") && err.contains("netd network rm"),
        "{err}"
    );
    assert_eq!(pinned_program_ids(&env), programs, "a program was replaced");
    assert_eq!(
        map_info(&pin)["bytes_value"],
        28,
        "the pinned map was touched"
    );
    assert!(
        echoes(&env, &srv, 8080),
        "no traffic after the refused reload"
    );
    // Setting up more of the datapath is refused the same way.
    let err = env.netd_err(&["network", "create", "m", "--subnet", "10.87.0.0/24"]);
    assert!(err.contains("map PUBLISHED: value 28 → 24 bytes"), "{err}");
}
