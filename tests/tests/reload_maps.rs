//! `netd reload` across netd versions whose pinned maps differ: a map an older netd pinned
//! with fewer entries (PUBLISHED had 65,536, preallocated) is made again with this build's
//! size, its entries copied, before the programs are replaced; a map the older netd had not
//! (BRIDGE6_PROGS, ENDPOINT6_PROGS, SUBNETS6) is made and filled; a map whose value layout changed is
//! refused in one line before anything is touched, and the running programs go on.
//!
//! The older netd's map is made here with bpftool, holding the entries of the pinned one,
//! and put in its place under the pin (the running programs keep the map they were loaded
//! with; the CLI and the reloaded programs use the pin).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use netd_common::datapath::{
    BRIDGE6_PROGS_MAP, ENDPOINT6_PROGS_MAP, HOST_ADDRS_MAP, HOST_ADDRS_MAX, PUBLISHED_FLAGS,
    PUBLISHED_MAP, PUBLISHED_MAX, STATS_MAP, SUBNETS6_MAP, Stat, VETHS_MAP,
};
use serde_json::Value;
use tests::{
    cli::{
        Ctr, assert_spoofed_refused, create, echo_server, map_entries, output_in, stat, tcp_echo,
    },
    frames::with_macs,
    frames6::udp_frame_carrying,
    harness::{HOST_ADDR, HOST_ADDR6, OUTSIDE_ADDR6, OUTSIDE_LINK, TestEnv, UPLINK},
    rawsock::{Tap, mac_of, send_frames},
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

/// A map made with bpftool at `DIR/older-NAME` (bpffs takes no '.' in names), as an older
/// netd would have pinned it.
fn create_map(
    env: &TestEnv,
    name: &str,
    kind: &str,
    sizes: (u32, usize),
    max: u32,
    flags: u32,
) -> PathBuf {
    let older = env.bpffs.join(format!("older-{name}"));
    bpftool(&[
        "map",
        "create",
        older.to_str().unwrap(),
        "type",
        kind,
        "key",
        &sizes.0.to_string(),
        "value",
        &sizes.1.to_string(),
        "entries",
        &max.to_string(),
        "name",
        name,
        "flags",
        &flags.to_string(),
    ]);
    older
}

/// Adds `entries` to the map pinned at `pin`, in one bpftool process.
fn fill(pin: &Path, entries: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) {
    let mut batch = String::new();
    for (key, value) in entries {
        batch += &format!(
            "map update pinned {} key {} value {}\n",
            pin.display(),
            hex(&key).join(" "),
            hex(&value).join(" ")
        );
    }
    // Named after the pin (under the instance's bpffs dir): unique among parallel tests.
    let name = pin.to_string_lossy().replace('/', "_");
    let file = std::env::temp_dir().join(format!("{name}.batch"));
    std::fs::write(&file, batch).unwrap();
    bpftool(&["batch", "file", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
}

/// Puts the map pinned at `older` under map `name`'s pin.
fn put_in_place(env: &TestEnv, name: &str, older: &Path) {
    let pin = map_pin(env, name);
    std::fs::remove_file(&pin).unwrap();
    std::fs::rename(older, &pin).unwrap();
}

/// Puts under map `name`'s pin a map of the same type and key as the pinned one, with
/// `max_entries`, `value_size` and `flags`, holding the pinned one's entries (values cut or
/// padded with zeros): what an older netd would have pinned.
fn pin_older_map(env: &TestEnv, name: &str, max_entries: u32, value_size: usize, flags: u32) {
    let pin = map_pin(env, name);
    let info = map_info(&pin);
    let key_size = info["bytes_key"].as_u64().unwrap() as u32;
    let older = create_map(
        env,
        name,
        info["type"].as_str().unwrap(),
        (key_size, value_size),
        max_entries,
        flags,
    );
    fill(
        &older,
        map_dump(&pin).into_iter().map(|(key, mut value)| {
            value.resize(value_size, 0);
            (key, value)
        }),
    );
    put_in_place(env, name, &older);
}

/// A network (made with the global options `global`) and a container with an echo server
/// published on host port 8080.
fn published_echo(env: &TestEnv, global: &[&str], subnet: &str) -> Ctr {
    env.netd_ok(&[global, &["network", "create", "n", "--subnet", subnet]].concat());
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
    let srv = published_echo(&env, &[], "10.84.0.0/24");
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

/// A datapath an older netd set up has no `BRIDGE6_PROGS` (IPv6 hairpin's program array): a
/// reload makes it and puts `bridge_ingress6` in it before the bridge's program is replaced,
/// so the reloaded program hands IPv6 over to a filled array: a container reaches a port
/// published on the host's IPv6 address through it.
#[test]
fn reload_makes_and_fills_the_ipv6_hairpin_array_an_older_netd_had_not() {
    let env = TestEnv::dual_stack();
    env.netd_ok(&[
        "network",
        "create",
        "n",
        "--ipv6",
        "--subnet",
        "10.88.0.0/24",
        "--subnet",
        "fd00:88::/64",
    ]);
    let srv = create(&env, "srv", &["--network", "n", "-p", "8080:80"]);
    let client = create(&env, "client", &["--network", "n"]);
    reload_without_array(&env, BRIDGE6_PROGS_MAP);
    let server = echo_server(&env, &srv.ns, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 80)));
    let echoed = tcp_echo(&env, &client.ns, SocketAddr::from((HOST_ADDR6, 8080)));
    assert_eq!(echoed.unwrap(), "netd", "no IPv6 hairpin after the reload");
    let peer = server.join().unwrap();
    assert_eq!(peer.ip(), "fd00:88::1".parse::<Ipv6Addr>().unwrap());
}

/// Removes the pinned program array `map`, as a datapath an older netd set up lacks it, and
/// reloads: the reload must make it and put its one program in it.
fn reload_without_array(env: &TestEnv, map: &str) {
    let pin = map_pin(env, map);
    std::fs::remove_file(&pin).unwrap();
    let out = env.netd_ok(&["reload"]);
    assert!(out.contains("programs replaced"), "{out}");
    assert_eq!(
        map_dump(&pin).len(),
        1,
        "{map} has no program after the reload"
    );
}

/// A datapath an older netd set up has no `ENDPOINT6_PROGS` (the endpoint's IPv6 program
/// array): a reload makes it and puts `endpoint_ingress6` in it before the containers'
/// programs are replaced (from an empty slot they would drop all IPv6), so a container reaches
/// the outside over IPv6 after it, by the fast path out.
#[test]
fn reload_makes_and_fills_the_endpoint_ipv6_array_an_older_netd_had_not() {
    let env = TestEnv::dual_stack();
    env.netd_ok(&[
        "network",
        "create",
        "n",
        "--ipv6",
        "--subnet",
        "10.89.0.0/24",
        "--subnet",
        "fd00:89::/64",
    ]);
    let c = create(&env, "c", &["--network", "n"]);
    reload_without_array(&env, ENDPOINT6_PROGS_MAP);
    let fast = stat(&env, "fast_path_out");
    let any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 9000));
    let server = echo_server(&env, &env.outside_ns(), any);
    let echoed = tcp_echo(&env, &c.ns, SocketAddr::from((OUTSIDE_ADDR6, 9000)));
    assert_eq!(echoed.unwrap(), "netd", "no IPv6 out after the reload");
    assert_eq!(server.join().unwrap().ip(), IpAddr::from(HOST_ADDR6));
    assert!(
        stat(&env, "fast_path_out") > fast,
        "not by the fast path out"
    );
}

/// A datapath an older netd set up has no `SUBNETS6` (its IPv6 subnets, a source in which is
/// spoofed from outside): a reload makes it and puts each dual-stack network's subnet in it
/// before the programs are replaced, and a spoofed source of the subnet gets nowhere after.
#[test]
fn reload_makes_and_fills_the_ipv6_subnet_map_an_older_netd_had_not() {
    let env = TestEnv::dual_stack();
    for (name, subnet, subnet6) in [
        ("n", "10.87.0.0/24", "fd00:87::/64"),
        ("m", "10.85.0.0/24", "fd00:85::/64"),
    ] {
        let args = ["network", "create", name, "--ipv6", "--subnet", subnet];
        env.netd_ok(&[&args[..], &["--subnet", subnet6]].concat());
    }
    let pin = map_pin(&env, SUBNETS6_MAP);
    assert_eq!(map_dump(&pin).len(), 2, "the networks' subnets");
    std::fs::remove_file(&pin).unwrap();
    let out = env.netd_ok(&["reload"]);
    assert!(out.contains("programs replaced"), "{out}");
    let prefixes: Vec<_> = map_dump(&pin)
        .into_iter()
        .map(|(key, _)| key[..12].to_vec())
        .collect();
    let expected = |network: u8| [&[64, 0, 0, 0, 0xfd, 0, 0, network][..], &[0; 4]].concat();
    assert_eq!(prefixes.len(), 2, "{prefixes:02x?}");
    for network in [0x87, 0x85] {
        assert!(
            prefixes.contains(&expected(network)),
            "fd00:{network:x}::/64 not in SUBNETS6 after the reload: {prefixes:02x?}"
        );
    }
    // Real packets, from outside to a port published over IPv6: from an address of n's
    // subnet that no container has, dropped (`martian`); from the outside's own, delivered.
    let srv = create(&env, "srv", &["--network", "n", "-p", "5353:53/udp"]);
    let tap = Tap::open(&env, &srv.ns, "eth0");
    let macs = (
        mac_of(&env, &env.host_ns(), UPLINK),
        mac_of(&env, &env.outside_ns(), OUTSIDE_LINK),
    );
    let spoofed: Ipv6Addr = "fd00:87::99".parse().unwrap();
    assert_spoofed_refused(&env, &tap, spoofed, OUTSIDE_ADDR6, |src, mark| {
        let f = udp_frame_carrying(src, 4000, HOST_ADDR6, 5353, mark);
        send_frames(
            &env,
            &env.outside_ns(),
            OUTSIDE_LINK,
            &[with_macs(f, macs.0, macs.1)],
        );
    });
}

/// A pinned map whose value is another size than this build's is refused in one line naming
/// the map and the change; nothing is replaced and traffic goes on through the old programs.
#[test]
fn reload_refuses_a_map_whose_value_changed_and_the_old_programs_keep_working() {
    let env = TestEnv::new();
    let srv = published_echo(&env, &[], "10.86.0.0/24");
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

/// An older netd's STATS with one counter fewer (the reasons grew): `netd stats` fails on it
/// ("index 37 but max_entries is 37"); a reload makes it with this build's number of
/// counters, keeping the counts, and `netd stats` reads them all.
#[test]
fn reload_grows_an_older_netds_stats_array_keeping_its_counts() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.89.0.0/24"]);
    let older = create_map(&env, STATS_MAP, "percpu_array", (4, 8), Stat::COUNT - 1, 0);
    // bpftool sets a per-CPU value on every CPU.
    fill(
        &older,
        [(
            0u32.to_ne_bytes().to_vec(),
            1_000_000u64.to_ne_bytes().to_vec(),
        )],
    );
    put_in_place(&env, STATS_MAP, &older);
    env.netd_err(&["stats", "--json"]);

    env.netd_ok(&["reload"]);
    assert_eq!(
        map_info(&map_pin(&env, STATS_MAP))["max_entries"],
        Stat::COUNT
    );
    let stats = env.netd_json(&["stats", "--json"]);
    let reasons = stats["reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), Stat::COUNT as usize, "{stats}");
    let first = reasons[0]["packets"].as_u64().unwrap();
    assert!(
        first >= 1_000_000,
        "the first counter was not carried over: {stats}"
    );
}

/// A resize whose entries don't fit the new size fails in one line naming the map, and
/// leaves everything as it was: the pinned map, the programs, no staging directory.
#[test]
fn a_reload_whose_entries_dont_fit_changes_nothing() {
    let env = TestEnv::new();
    let srv = published_echo(&env, &[], "10.90.0.0/24");
    let older = create_map(&env, HOST_ADDRS_MAP, "hash", (4, 1), HOST_ADDRS_MAX * 2, 0);
    fill(
        &older,
        (1..=HOST_ADDRS_MAX + 1).map(|addr| (addr.to_ne_bytes().to_vec(), vec![1])),
    );
    put_in_place(&env, HOST_ADDRS_MAP, &older);
    let programs = pinned_program_ids(&env);

    let err = env.netd_err(&["reload"]);
    assert!(
        err.contains("map HOST_ADDRS: 8192 → 4096 entries: the entries in use don't fit in 4096"),
        "{err}"
    );
    let pin = map_pin(&env, HOST_ADDRS_MAP);
    assert_eq!(map_info(&pin)["max_entries"], HOST_ADDRS_MAX * 2);
    assert_eq!(
        map_entries(&env, HOST_ADDRS_MAP),
        HOST_ADDRS_MAX as usize + 1
    );
    assert_eq!(pinned_program_ids(&env), programs, "a program was replaced");
    for leftover in ["maps-next", "maps-old"] {
        assert!(!env.bpffs.join(leftover).exists(), "{leftover} left behind");
    }
    assert!(
        echoes(&env, &srv, 8080),
        "no traffic after the failed reload"
    );
}

/// The program of every attachment and program pin of the instance, by pin name, of the
/// endpoint filters on `veth`, and in each slot of its program arrays.
fn attached_ids(env: &TestEnv, veth: &str) -> BTreeMap<String, u64> {
    let mut ids = program_array_ids(env);
    for dir in ["links", "progs"] {
        for entry in std::fs::read_dir(env.bpffs.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let (kind, field) = if dir == "links" && !name.ends_with("-filter") {
                ("link", "prog_id")
            } else {
                ("prog", "id")
            };
            let shown: Value = serde_json::from_str(&bpftool(&[
                "-j",
                kind,
                "show",
                "pinned",
                path.to_str().unwrap(),
            ]))
            .unwrap();
            ids.insert(format!("{dir}/{name}"), shown[field].as_u64().unwrap());
        }
    }
    for dir in ["ingress", "egress"] {
        let shown = output_in(
            env,
            &env.host_ns(),
            "tc",
            &["-j", "filter", "show", "dev", veth, dir],
        );
        let filters: Value = serde_json::from_str(&shown).unwrap();
        let id = filters
            .as_array()
            .unwrap()
            .iter()
            .find_map(|f| f["options"]["prog"]["id"].as_u64())
            .unwrap();
        ids.insert(format!("{veth}@{dir}"), id);
    }
    ids
}

/// The program in each slot of every program array of the instance, as `maps/NAME[SLOT]`.
fn program_array_ids(env: &TestEnv) -> BTreeMap<String, u64> {
    let mut ids = BTreeMap::new();
    for entry in std::fs::read_dir(env.bpffs.join("maps")).unwrap() {
        let path = entry.unwrap().path();
        if map_info(&path)["type"] != "prog_array" {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let dump: Value = serde_json::from_str(&bpftool(&[
            "-j",
            "map",
            "dump",
            "pinned",
            path.to_str().unwrap(),
        ]))
        .unwrap();
        for slot in dump.as_array().unwrap() {
            let word = |field: &str| {
                let bytes: Vec<u8> = slot[field]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| {
                        u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16)
                            .unwrap()
                    })
                    .collect();
                u32::from_ne_bytes(bytes[..4].try_into().unwrap())
            };
            ids.insert(
                format!("maps/{name}[{}]", word("key")),
                u64::from(word("value")),
            );
        }
    }
    assert!(!ids.is_empty(), "no program array holds a program");
    ids
}

/// A replacement failing midway (an interface in VETHS with no netd filter and no clsact
/// qdisc: a bare bridge) puts every program back, then the older netd's pins: the map being
/// resized keeps its size, and traffic goes on.
#[test]
fn a_reload_failing_midway_puts_the_old_programs_and_pins_back() {
    failing_midway(&[], "10.91.0.0/24");
}

/// The same with the uplink's XDP program attached (an XDP link to put back too).
#[test]
fn a_reload_failing_midway_puts_the_uplink_xdp_program_back_too() {
    failing_midway(&["--uplink-xdp"], "10.92.0.0/24");
}

fn failing_midway(global: &[&str], subnet: &str) {
    let env = TestEnv::new();
    let srv = published_echo(&env, global, subnet);
    let veth = env.netd_json(&["container", "inspect", &srv.name])["host_veth"]
        .as_str()
        .unwrap()
        .to_string();
    pin_older_map(&env, PUBLISHED_MAP, 65_536, 24, 0);
    output_in(
        &env,
        &env.host_ns(),
        "ip",
        &["link", "add", "brrcfail", "type", "bridge"],
    );
    let shown = output_in(
        &env,
        &env.host_ns(),
        "ip",
        &["-j", "link", "show", "brrcfail"],
    );
    let ifindex = serde_json::from_str::<Value>(&shown).unwrap()[0]["ifindex"]
        .as_u64()
        .unwrap() as u32;
    let veths = map_pin(&env, VETHS_MAP);
    let value_size = map_info(&veths)["bytes_value"].as_u64().unwrap() as usize;
    fill(
        &veths,
        [(ifindex.to_ne_bytes().to_vec(), vec![0; value_size])],
    );
    let before = attached_ids(&env, &veth);

    let err = env.netd_err(&["reload"]);
    assert!(err.contains("brrcfail"), "{err}");
    assert_eq!(
        attached_ids(&env, &veth),
        before,
        "a program was left replaced"
    );
    assert_eq!(
        map_info(&map_pin(&env, PUBLISHED_MAP))["max_entries"],
        65_536
    );
    for leftover in ["maps-next", "maps-old"] {
        assert!(!env.bpffs.join(leftover).exists(), "{leftover} left behind");
    }
    assert!(
        echoes(&env, &srv, 8080),
        "no traffic after the failed reload"
    );

    // Without the interface in the way, the reload goes through.
    output_in(&env, &env.host_ns(), "ip", &["link", "del", "brrcfail"]);
    env.netd_ok(&["reload"]);
    assert_eq!(
        map_info(&map_pin(&env, PUBLISHED_MAP))["max_entries"],
        PUBLISHED_MAX
    );
    assert!(echoes(&env, &srv, 8080), "no traffic after the reload");
}
