//! The container side of the sandbox, built the way the controller will: a bridge `netd0`
//! (172.17.0.1/16) in the host namespace and containers in their own namespaces, each with a
//! veth to the bridge and a default route via the gateway; then the eBPF datapath is told
//! about the network and its endpoints through the driver, as the controller will tell it.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use netd::{
    bpf::Pins,
    datapath::{Datapath as _, PortSpec, ebpf::EbpfDatapath},
    netlink::set_sysctl,
    netns,
};

use crate::{
    harness::TestEnv,
    netdata::{BRIDGE, GATEWAY, endpoint, network},
};

pub struct Container {
    pub ns: PathBuf,
    pub ip: Ipv4Addr,
    /// The host end of its veth, on the bridge.
    pub host_if: String,
}

/// Runs `ip args` in `ns` and panics with its output when it fails.
pub fn ip_in(env: &TestEnv, ns: &Path, args: &[&str]) {
    let out = env.run_in(ns, "ip", args);
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the bridge and `count` containers (172.17.0.2, .3, ...), enables forwarding on the
/// host, and sets the datapath up with them as endpoints of a masquerading network.
pub fn containers(env: &TestEnv, count: u8) -> Vec<Container> {
    containers_with(env, count, None)
}

/// [`containers`], with host processes of `host_cgroup` redirected to published ports.
pub fn containers_with(env: &TestEnv, count: u8, host_cgroup: Option<&Path>) -> Vec<Container> {
    let host = env.host_ns();
    ip_in(env, &host, &["link", "add", BRIDGE, "type", "bridge"]);
    ip_in(
        env,
        &host,
        &["addr", "add", &format!("{GATEWAY}/16"), "dev", BRIDGE],
    );
    ip_in(env, &host, &["link", "set", BRIDGE, "up"]);
    set_sysctl(Some(&host), "net.ipv4.ip_forward", "1").unwrap();
    let containers: Vec<Container> = (0..count).map(|i| container(env, i)).collect();
    datapath_with(env, host_cgroup, |dp| {
        let net = network();
        dp.setup_network(&net).unwrap();
        for c in &containers {
            let index = nix::net::if_::if_nametoindex(c.host_if.as_str()).unwrap();
            dp.add_endpoint(&net, &endpoint(c.ip, &c.host_if, index))
                .unwrap();
        }
    });
    containers
}

fn container(env: &TestEnv, i: u8) -> Container {
    let name = env.name(&format!("c{i}"));
    let ns = netns::create(&name).unwrap();
    let ip = Ipv4Addr::new(172, 17, 0, 2 + i);
    let host_if = format!("vc{i}");
    let host = env.host_ns();
    ip_in(
        env,
        &host,
        &[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ],
    );
    ip_in(
        env,
        &host,
        &["link", "set", &host_if, "master", BRIDGE, "up"],
    );
    // The MAC the endpoint spec gives the datapath.
    let mac = endpoint(ip, &host_if, 0)
        .mac
        .map(|b| format!("{b:02x}"))
        .join(":");
    ip_in(env, &ns, &["link", "set", "eth0", "address", &mac]);
    ip_in(
        env,
        &ns,
        &["addr", "add", &format!("{ip}/16"), "dev", "eth0"],
    );
    ip_in(env, &ns, &["link", "set", "eth0", "up"]);
    ip_in(env, &ns, &["link", "set", "lo", "up"]);
    ip_in(
        env,
        &ns,
        &["route", "add", "default", "via", &GATEWAY.to_string()],
    );
    Container { ns, ip, host_if }
}

/// Runs `f` with this test's datapath driver on a thread in the host namespace. Tests never
/// attach to the machine's root cgroup: host redirection only for a test's own cgroup.
pub fn datapath_in<T: Send>(env: &TestEnv, f: impl FnOnce(&EbpfDatapath) -> T + Send) -> T {
    datapath_with(env, None, f)
}

fn datapath_with<T: Send>(
    env: &TestEnv,
    host_cgroup: Option<&Path>,
    f: impl FnOnce(&EbpfDatapath) -> T + Send,
) -> T {
    let pins = Pins::open(&env.bpffs).unwrap();
    let dp = EbpfDatapath::new(pins).with_host_cgroup(host_cgroup.map(Path::to_path_buf));
    env.in_ns(&env.host_ns(), || f(&dp))
}

/// The cgroup v2 of one test (its instance's, which removes it). Processes run in it through
/// [`TestCgroup::run`].
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(env: &TestEnv) -> Self {
        Self {
            path: env.cgroup.clone(),
        }
    }

    /// Runs `program args` in this cgroup, in the namespace at `ns` (the machine's when `None`).
    pub fn run(&self, ns: Option<&Path>, program: &str, args: &[&str]) -> Output {
        let procs = self.path.join("cgroup.procs");
        let script = format!("echo $$ > {} && exec \"$0\" \"$@\"", procs.display());
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg(program)
            .args(args)
            .stdin(Stdio::null());
        if let Some(ns) = ns {
            let mut inner = Command::new("nsenter");
            inner
                .arg(format!("--net={}", ns.display()))
                .arg("--")
                .arg("sh")
                .args(cmd.get_args())
                .stdin(Stdio::null());
            cmd = inner;
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }
}

/// Runs the Python `script` in `cgroup`, in `ns`; returns what it prints.
fn python_in_cgroup(cgroup: &TestCgroup, ns: Option<&Path>, script: &str) -> String {
    let out = cgroup.run(ns, "python3", &["-c", script]);
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// What a TCP connection to `addr` from a process in `cgroup`, in `ns`, receives, and the
/// peer getpeername() shows it: `"<reply> <ip>:<port>"`.
pub fn connect_from_cgroup(cgroup: &TestCgroup, ns: Option<&Path>, addr: SocketAddr) -> String {
    let script = format!(
        "import socket; s = socket.create_connection(('{}', {}), timeout=5); p = s.getpeername(); \
         s.sendall(b'hello'); s.shutdown(socket.SHUT_WR); print(s.recv(100).decode(), '%s:%d' % p[:2])",
        addr.ip(),
        addr.port()
    );
    python_in_cgroup(cgroup, ns, &script)
}

/// What an unconnected UDP socket (of `addr`'s family) in `cgroup`, in `ns`, gets back for a
/// datagram to `addr`, and from where: `"<reply> <ip>:<port>"`.
pub fn udp_from_cgroup(cgroup: &TestCgroup, ns: Option<&Path>, addr: SocketAddr) -> String {
    let family = if addr.is_ipv6() {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    let script = format!(
        "import socket; s = socket.socket(socket.{family}, socket.SOCK_DGRAM); s.settimeout(5); \
         s.sendto(b'query', ('{}', {})); data, src = s.recvfrom(100); print(data.decode(), '%s:%d' % src[:2])",
        addr.ip(),
        addr.port()
    );
    python_in_cgroup(cgroup, ns, &script)
}

pub fn publish(env: &TestEnv, ports: &[PortSpec]) {
    datapath_in(env, |dp| dp.publish(&network(), ports).unwrap());
}

/// Turns transmit checksum offload of `ifname` in `ns` off: packets leaving it with a
/// checksum still to compute (CHECKSUM_PARTIAL) get it computed in software from the
/// pseudo-header seed in the packet, so the receiver checks the seed the datapath left.
/// (The ETHTOOL_STXCSUM ioctl: what `ethtool -K IF tx off` does, without ethtool.)
pub fn disable_tx_checksum_offload(env: &TestEnv, ns: &Path, ifname: &str) {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    env.in_ns(ns, || {
        let mut value = EthtoolValue {
            cmd: ETHTOOL_STXCSUM,
            data: 0,
        };
        // SAFETY: an ifreq naming the interface, pointing at a live ethtool_value.
        unsafe {
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (dst, src) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
                *dst = src as libc::c_char;
            }
            ifr.ifr_ifru.ifru_data = (&raw mut value).cast();
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            let rc = libc::ioctl(fd, SIOCETHTOOL, &mut ifr);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(rc, 0, "turn tx checksum offload off on {ifname}: {err}");
        }
    });
}

/// The host's address on its second NIC ([`second_nic`]), and its neighbour's there.
pub const NIC1_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
pub const LAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);

/// A second NIC of the sandbox host (`nic1`, `NIC1_ADDR`/24, not the uplink) on a link to a
/// neighbour's namespace (`lan0`, `LAN_ADDR`), which this returns.
pub fn second_nic(env: &TestEnv) -> PathBuf {
    let lan = netd::netns::create(&env.name("lan")).unwrap();
    let host = env.host_ns();
    let lan_path = lan.to_str().unwrap();
    let nic1 = format!("{NIC1_ADDR}/24");
    let lan0 = format!("{LAN_ADDR}/24");
    for args in [
        &[
            "link", "add", "nic1", "type", "veth", "peer", "name", "lan0",
        ][..],
        &["link", "set", "lan0", "netns", lan_path],
        &["addr", "add", &nic1, "dev", "nic1"],
        &["link", "set", "nic1", "up"],
    ] {
        ip_in(env, &host, args);
    }
    ip_in(env, &lan, &["addr", "add", &lan0, "dev", "lan0"]);
    ip_in(env, &lan, &["link", "set", "lan0", "up"]);
    lan
}
