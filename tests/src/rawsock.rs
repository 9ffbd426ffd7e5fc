//! Real packets for the isolation matrix: crafted IPv4/IPv6 packets and Ethernet frames sent
//! from inside a namespace (raw IP sockets, so the sender's kernel routes them and resolves
//! the next hop; AF_PACKET for frames the stack would never build, such as VLAN tags or a
//! forged source MAC), and what a namespace received, counted at the receiver: a tap on its
//! interface that counts the frames carrying a test's marker.

use std::{
    cell::RefCell,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{frames, harness::TestEnv};

pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const GRE: u8 = 47;
pub const ESP: u8 = 50;
pub const SCTP: u8 = 132;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;

/// The "more fragments" flag of an IPv4 header's flags/offset word.
pub const MORE_FRAGMENTS: u16 = 0x2000;
const DONT_FRAGMENT: u16 = 0x4000;

/// How long a tap waits for frames in flight before it counts.
const SETTLE: Duration = Duration::from_millis(400);
/// How long a tap waits for a frame that must come.
const ARRIVAL: Duration = Duration::from_secs(3);

static NEXT_MARKER: AtomicU32 = AtomicU32::new(0);

/// Bytes unique to one send of one test: a tap counts the frames that carry them.
pub fn marker() -> Vec<u8> {
    format!(
        "netd-mx-{}-{}!",
        std::process::id(),
        NEXT_MARKER.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes()
}

/// An IPv4 header's fields a test varies; the rest are fixed (TTL 64, checksum computed).
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// Options, padded to a multiple of 4 bytes by [`Ipv4::packet`].
    pub options: Vec<u8>,
    /// Flags and fragment offset (in 8-byte units); DF when not a fragment.
    pub frag: u16,
    pub id: u16,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self {
            src,
            dst,
            proto,
            options: vec![],
            frag: DONT_FRAGMENT,
            id: 0x4d58,
        }
    }

    pub fn with_options(mut self, options: Vec<u8>) -> Self {
        self.options = options;
        self
    }

    /// The header (options included) followed by `payload`, with a correct header checksum.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let mut options = self.options.clone();
        options.resize(options.len().div_ceil(4) * 4, 0);
        let header_len = 20 + options.len();
        let mut ip = vec![0x40 | (header_len / 4) as u8, 0];
        ip.extend_from_slice(&((header_len + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.extend_from_slice(&[64, self.proto, 0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&options);
        let csum = !frames::sum16(&ip, 0);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        ip.extend_from_slice(payload);
        ip
    }

    /// `payload` (a whole L4 message) cut into fragments of `size` bytes (a multiple of 8):
    /// the first carries the L4 header, the others only data.
    pub fn fragments(&self, payload: &[u8], size: usize) -> Vec<Vec<u8>> {
        assert_eq!(size % 8, 0, "fragment size must be a multiple of 8");
        let chunks: Vec<&[u8]> = payload.chunks(size).collect();
        let last = chunks.len() - 1;
        chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                let more = if i < last { MORE_FRAGMENTS } else { 0 };
                let header = Self {
                    frag: more | (i * size / 8) as u16,
                    ..self.clone()
                };
                header.packet(chunk)
            })
            .collect()
    }
}

/// The record-route option `ping -R` sends (room for nine addresses, none recorded yet).
pub fn record_route() -> Vec<u8> {
    let mut opt = vec![7, 39, 4];
    opt.resize(39, 0);
    opt.push(0); // end of options
    opt
}

/// A timestamp option (`ping -T tsonly`): room for nine timestamps, none taken yet.
pub fn timestamp() -> Vec<u8> {
    let mut opt = vec![68, 40, 5, 0];
    opt.resize(40, 0);
    opt
}

/// An ICMP message (`kind`, `code`, the 4 bytes after the checksum) with a correct checksum.
pub fn icmp(kind: u8, code: u8, rest: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut msg = vec![kind, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(payload);
    let csum = !frames::sum16(&msg, 0);
    msg[2..4].copy_from_slice(&csum.to_be_bytes());
    msg
}

/// An ICMP echo request carrying `payload`.
pub fn echo_request(payload: &[u8]) -> Vec<u8> {
    icmp(8, 0, [0x12, 0x34, 0, 1], payload)
}

/// A TCP SYN from `ip.src:sport` to `ip.dst:dport` carrying `payload` (SYN with data is legal,
/// and lets a tap find it).
pub fn syn(ip: &Ipv4, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    frames::tcp(ip.src, ip.dst, sport, dport, frames::SYN, payload)
}

/// A UDP datagram from `ip.src:sport` to `ip.dst:dport` with a correct checksum.
pub fn udp(ip: &Ipv4, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    frames::udp(ip.src, ip.dst, sport, dport, payload, true)
}

/// A payload of `len` bytes made of `marker` repeated, so every fragment of it carries one.
pub fn marked(marker: &[u8], len: usize) -> Vec<u8> {
    marker.iter().copied().cycle().take(len).collect()
}

/// An IPv6 packet with no next header (59) carrying `payload`: nothing to parse past it.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[59, 64]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(payload);
    ip
}

/// An Ethernet frame, with an 802.1Q tag of `vlan` (0: priority-tagged) when given.
pub fn ether(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + l3.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(vid) = vlan {
        f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        // PCP 3 (a priority tag's reason to exist) and the VLAN id.
        f.extend_from_slice(&((3 << 13) | vid).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

/// A gratuitous ARP request: `mac` announces that it has `ip`.
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&ip.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&ip.octets());
    ether([0xff; 6], mac, None, ETHERTYPE_ARP, &arp)
}

/// Sends each IPv4 packet (header included) from the namespace at `ns` through a raw socket:
/// the kernel routes it and resolves the next hop, and sends the header as it is (options and
/// fragment fields included; it fills in only the checksum and total length).
pub fn send_ipv4(env: &TestEnv, ns: &Path, packets: &[Vec<u8>]) {
    env.in_ns(ns, || {
        // SAFETY: plain socket calls on a fresh fd with a fully initialised sockaddr_in.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            for packet in packets {
                let mut addr: libc::sockaddr_in = std::mem::zeroed();
                addr.sin_family = libc::AF_INET as u16;
                addr.sin_addr.s_addr = u32::from_ne_bytes(packet[16..20].try_into().unwrap());
                let sent = libc::sendto(
                    fd.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                );
                assert_eq!(
                    sent,
                    packet.len() as isize,
                    "raw send: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

/// Sends each frame as it is out of `ifname` in the namespace at `ns`.
pub fn send_frames(env: &TestEnv, ns: &Path, ifname: &str, frames: &[Vec<u8>]) {
    env.in_ns(ns, || {
        for frame in frames {
            frames::send_raw(ifname, frame);
        }
    });
}

/// The MAC address of `ifname` in the namespace at `ns` (/sys is the machine's: ask the
/// namespace's netlink).
pub fn mac_of(env: &TestEnv, ns: &Path, ifname: &str) -> [u8; 6] {
    let out = env.run_in(ns, "ip", &["-br", "link", "show", "dev", ifname]);
    assert!(
        out.status.success(),
        "ip link show {ifname}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mac = text
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no address for {ifname}: {text}"));
    parse_mac(mac)
}

fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("MAC {text}: {e}")))
        .collect();
    bytes.try_into().unwrap_or_else(|_| panic!("MAC {text}"))
}

/// A tap on one interface of one namespace: every frame the interface receives (not those it
/// sends), as the receiver's own stack gets it, before any of its rules. It keeps what it read,
/// so each question is about every frame since it opened, whatever was asked before.
pub struct Tap {
    fd: OwnedFd,
    seen: RefCell<Vec<Vec<u8>>>,
}

impl Tap {
    pub fn open(env: &TestEnv, ns: &Path, ifname: &str) -> Self {
        let fd = env.in_ns(ns, || {
            let index =
                nix::net::if_::if_nametoindex(ifname).unwrap_or_else(|e| panic!("{ifname}: {e}"));
            // SAFETY: plain socket calls on a fresh fd with a fully initialised sockaddr_ll.
            unsafe {
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                    i32::from(proto),
                );
                assert!(fd >= 0, "tap socket: {}", std::io::Error::last_os_error());
                let fd = OwnedFd::from_raw_fd(fd);
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = proto;
                addr.sll_ifindex = index as i32;
                let rc = libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind tap: {}", std::io::Error::last_os_error());
                fd
            }
        });
        Self {
            fd,
            seen: RefCell::default(),
        }
    }

    /// The frames received since the tap opened (after letting those in flight arrive) that
    /// carry `marker` (any, when empty) and that `accept` takes.
    pub fn received(&self, marker: &[u8], accept: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        thread::sleep(SETTLE);
        self.matching(marker, &accept)
    }

    /// How many received frames carry `marker`.
    pub fn count(&self, marker: &[u8]) -> usize {
        self.received(marker, |_| true).len()
    }

    /// Whether a frame carrying `marker` arrives within [`ARRIVAL`] (on a loaded machine the
    /// first packet of a path waits for ARP on every hop).
    pub fn arrived(&self, marker: &[u8]) -> bool {
        let deadline = Instant::now() + ARRIVAL;
        loop {
            if !self.matching(marker, &|_| true).is_empty() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The frames received since the tap opened that carry `marker` and `accept` takes.
    fn matching(&self, marker: &[u8], accept: &dyn Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let mut seen = self.seen.borrow_mut();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: recvfrom into a buffer and sockaddr_ll we own, with their real sizes.
            let (len, addr) = unsafe {
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                let mut addr_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                let len = libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut addr).cast(),
                    &mut addr_len,
                );
                (len, addr)
            };
            if len < 0 {
                break;
            }
            if addr.sll_pkttype != libc::PACKET_OUTGOING {
                seen.push(buf[..len as usize].to_vec());
            }
        }
        seen.iter()
            .filter(|frame| contains(frame, marker) && accept(frame))
            .cloned()
            .collect()
    }
}

/// Whether `needle` occurs in `haystack` (an empty needle: always).
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// The IPv4 source of a frame as a tap returns it (tags are in the skb, not the frame).
pub fn ipv4_source(frame: &[u8]) -> Option<Ipv4Addr> {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    (ethertype == ETHERTYPE_IPV4 && frame.len() >= 34)
        .then(|| Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]))
}

/// The IPv4 destination of a frame as a tap returns it.
pub fn ipv4_destination(frame: &[u8]) -> Option<Ipv4Addr> {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    (ethertype == ETHERTYPE_IPV4 && frame.len() >= 34)
        .then(|| Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]))
}
