//! Crafted Ethernet/IPv4 frames for BPF_PROG_TEST_RUN, and independent checksum checks: the
//! builders compute every checksum from scratch, so a rewritten frame can be verified by
//! recomputation rather than by trusting the datapath's incremental updates.

use std::net::Ipv4Addr;

pub const ETH_LEN: usize = 14;
pub const IP_LEN: usize = 20;
pub const L4: usize = ETH_LEN + IP_LEN;
pub const IP_SRC: usize = ETH_LEN + 12;
pub const IP_DST: usize = ETH_LEN + 16;
pub const IP_CSUM: usize = ETH_LEN + 10;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const RST: u8 = 0x04;
pub const FIN: u8 = 0x01;

const ETHERTYPE_IPV4: u16 = 0x0800;

/// The one's complement sum of `data` folded to 16 bits (not complemented).
pub fn sum16(data: &[u8], mut acc: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        acc += u32::from(word);
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    u32::from(sum16(&pseudo, 0))
}

/// An Ethernet frame carrying `ethertype` and `payload`.
pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 header (IHL 5, no fragmentation) with a correct checksum, followed by `l4`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((IP_LEN + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let csum = !sum16(&ip, 0);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    ip.extend_from_slice(l4);
    ip
}

/// A TCP segment from `src:sport` to `dst:dport` with a correct checksum.
pub fn tcp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    tcp_at(src, dst, sport, dport, flags, 0x0102_0304, payload)
}

/// [`tcp`] with sequence number `seq`.
pub fn tcp_at(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    seq: u32,
    payload: &[u8],
) -> Vec<u8> {
    let header = TcpHeader {
        sport,
        dport,
        flags,
        seq,
        window: 0xffff,
        options: Vec::new(),
    };
    tcp_segment(src, dst, &header, payload)
}

/// The fields of a TCP header a test chooses.
pub struct TcpHeader {
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub seq: u32,
    pub window: u16,
    /// A multiple of 4 bytes.
    pub options: Vec<u8>,
}

/// A TCP segment from `src` to `dst` with `header` and a correct checksum.
pub fn tcp_segment(src: Ipv4Addr, dst: Ipv4Addr, header: &TcpHeader, payload: &[u8]) -> Vec<u8> {
    assert!(header.options.len().is_multiple_of(4) && header.options.len() <= 40);
    let doff = (20 + header.options.len() as u8) / 4;
    let mut seg = Vec::new();
    seg.extend_from_slice(&header.sport.to_be_bytes());
    seg.extend_from_slice(&header.dport.to_be_bytes());
    seg.extend_from_slice(&header.seq.to_be_bytes());
    seg.extend_from_slice(&0u32.to_be_bytes());
    seg.extend_from_slice(&[doff << 4, header.flags]);
    seg.extend_from_slice(&header.window.to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 0]);
    seg.extend_from_slice(&header.options);
    seg.extend_from_slice(payload);
    let csum = !sum16(
        &seg,
        pseudo_header_sum(src.octets(), dst.octets(), TCP, seg.len()),
    );
    seg[16..18].copy_from_slice(&csum.to_be_bytes());
    seg
}

/// A UDP datagram with a correct checksum, or checksum 0 ("none") when `with_csum` is false.
pub fn udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
    with_csum: bool,
) -> Vec<u8> {
    let mut dgram = Vec::new();
    dgram.extend_from_slice(&sport.to_be_bytes());
    dgram.extend_from_slice(&dport.to_be_bytes());
    dgram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    dgram.extend_from_slice(&[0, 0]);
    dgram.extend_from_slice(payload);
    if with_csum {
        let mut csum = !sum16(
            &dgram,
            pseudo_header_sum(src.octets(), dst.octets(), UDP, dgram.len()),
        );
        if csum == 0 {
            csum = 0xffff;
        }
        dgram[6..8].copy_from_slice(&csum.to_be_bytes());
    }
    dgram
}

/// An ICMP echo request (type 8) or reply (type 0) with a correct checksum.
pub fn icmp_echo(request: bool, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut msg = vec![if request { 8 } else { 0 }, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(payload);
    let csum = !sum16(&msg, 0);
    msg[2..4].copy_from_slice(&csum.to_be_bytes());
    msg
}

pub fn tcp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    tcp_frame_carrying(src, sport, dst, dport, flags, b"netd tcp")
}

pub fn tcp_frame_carrying(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    eth(
        ETHERTYPE_IPV4,
        &ipv4(src, dst, TCP, &tcp(src, dst, sport, dport, flags, payload)),
    )
}

pub fn udp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, with_csum: bool) -> Vec<u8> {
    eth(
        ETHERTYPE_IPV4,
        &ipv4(
            src,
            dst,
            UDP,
            &udp(src, dst, sport, dport, b"netd udp!", with_csum),
        ),
    )
}

/// A UDP datagram with a checksum, carrying `payload`.
pub fn udp_frame_carrying(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    eth(
        ETHERTYPE_IPV4,
        &ipv4(src, dst, UDP, &udp(src, dst, sport, dport, payload, true)),
    )
}

pub fn icmp_frame(src: Ipv4Addr, dst: Ipv4Addr, request: bool, id: u16) -> Vec<u8> {
    eth(
        ETHERTYPE_IPV4,
        &ipv4(src, dst, ICMP, &icmp_echo(request, id, 7, b"netd ping")),
    )
}

/// The fields a NAT may change, read back from a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ends {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// TCP/UDP ports; for ICMP echo both are the identifier.
    pub sport: u16,
    pub dport: u16,
}

pub fn ends(frame: &[u8]) -> Ends {
    let addr =
        |off: usize| Ipv4Addr::new(frame[off], frame[off + 1], frame[off + 2], frame[off + 3]);
    let word = |off: usize| u16::from_be_bytes([frame[off], frame[off + 1]]);
    let l4 = l4_off(frame);
    let (sport, dport) = match frame[ETH_LEN + 9] {
        ICMP => (word(l4 + 4), word(l4 + 4)),
        TCP | UDP => (word(l4), word(l4 + 2)),
        _ => (0, 0),
    };
    Ends {
        src: addr(IP_SRC),
        dst: addr(IP_DST),
        sport,
        dport,
    }
}

/// Panics unless the IPv4 header checksum and the L4 checksum of `frame` are right, computed
/// from scratch. A UDP checksum of 0 means "none" and passes only when `udp_zero_ok`.
pub fn assert_checksums(frame: &[u8], udp_zero_ok: bool) {
    assert_ip_checksum(frame);
    let ip = &frame[ETH_LEN..l4_off(frame)];
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = &frame[l4_off(frame)..ETH_LEN + total];
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    match ip[9] {
        TCP => assert_eq!(
            sum16(l4, pseudo_header_sum(src, dst, TCP, l4.len())),
            0xffff,
            "TCP checksum wrong"
        ),
        UDP if l4[6..8] == [0, 0] => assert!(udp_zero_ok, "UDP checksum became 0"),
        UDP => assert_eq!(
            sum16(l4, pseudo_header_sum(src, dst, UDP, l4.len())),
            0xffff,
            "UDP checksum wrong"
        ),
        ICMP => assert_eq!(sum16(l4, 0), 0xffff, "ICMP checksum wrong"),
        // Other protocols' checksums (if any) don't cover the IP header: NAT leaves them be.
        _ => {}
    }
}

/// Panics unless the IPv4 header checksum of `frame` (options included) is right.
pub fn assert_ip_checksum(frame: &[u8]) {
    let ip = &frame[ETH_LEN..l4_off(frame)];
    assert_eq!(
        sum16(ip, 0),
        0xffff,
        "IPv4 header checksum wrong: {ip:02x?}"
    );
}

/// Where the L4 header of an IPv4 frame starts (after its options).
pub fn l4_off(frame: &[u8]) -> usize {
    ETH_LEN + usize::from(frame[ETH_LEN] & 0x0f) * 4
}

/// Recomputes the IPv4 header checksum of `frame` after an edit.
pub fn fix_ip_csum(frame: &mut [u8]) {
    let ihl = (usize::from(frame[ETH_LEN] & 0x0f) * 4)
        .max(IP_LEN)
        .min(frame.len() - ETH_LEN);
    frame[IP_CSUM..IP_CSUM + 2].copy_from_slice(&[0, 0]);
    let csum = !sum16(&frame[ETH_LEN..ETH_LEN + ihl], 0);
    frame[IP_CSUM..IP_CSUM + 2].copy_from_slice(&csum.to_be_bytes());
}

/// `frame` (IPv4, no options) with the IPv4 options `options` (a multiple of 4 bytes long),
/// its lengths and header checksum fixed.
pub fn with_ip_options(mut frame: Vec<u8>, options: &[u8]) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40);
    frame.splice(L4..L4, options.iter().copied());
    frame[ETH_LEN] = 0x45 + (options.len() / 4) as u8;
    let total = u16::from_be_bytes([frame[ETH_LEN + 2], frame[ETH_LEN + 3]]) + options.len() as u16;
    frame[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&total.to_be_bytes());
    fix_ip_csum(&mut frame);
    frame
}

/// Record route (RFC 791) with room for `slots` addresses, then end-of-options padding.
pub fn record_route(slots: usize) -> Vec<u8> {
    let len = 3 + 4 * slots;
    let mut opt = vec![7, len as u8, 4];
    opt.resize(len, 0);
    opt.resize(len.next_multiple_of(4), 0);
    opt
}

/// Splits the IPv4 datagram of `frame` (no options) into two fragments at `at` bytes of its
/// payload (a multiple of 8), both with identification `id`.
pub fn fragments(frame: &[u8], at: usize, id: u16) -> (Vec<u8>, Vec<u8>) {
    assert!(at.is_multiple_of(8));
    let payload = &frame[L4..];
    let part = |bytes: &[u8], frags: u16| {
        let mut f = frame[..L4].to_vec();
        f.extend_from_slice(bytes);
        f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&((IP_LEN + bytes.len()) as u16).to_be_bytes());
        f[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&id.to_be_bytes());
        f[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&frags.to_be_bytes());
        fix_ip_csum(&mut f);
        f
    };
    const MORE_FRAGMENTS: u16 = 0x2000;
    (
        part(&payload[..at], MORE_FRAGMENTS),
        part(&payload[at..], (at / 8) as u16),
    )
}

/// The datagram two fragments (as [`fragments`] makes them) carry, as one frame.
pub fn reassemble(first: &[u8], later: &[u8]) -> Vec<u8> {
    let mut f = first.to_vec();
    f.extend_from_slice(&later[L4..]);
    let total = (f.len() - ETH_LEN) as u16;
    f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&total.to_be_bytes());
    f[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&[0, 0]);
    fix_ip_csum(&mut f);
    f
}

/// Panics unless `after` equals `before` outside the bytes a NAT of the IPv4 addresses, the
/// L4 ports or ICMP id, and the checksums may change.
pub fn assert_only_nat_fields_changed(before: &[u8], after: &[u8]) {
    assert_eq!(before.len(), after.len(), "frame length changed");
    let proto = before[ETH_LEN + 9];
    let l4 = l4_off(before);
    let mut mutable: Vec<usize> = (IP_CSUM..IP_CSUM + 2).chain(IP_SRC..IP_DST + 4).collect();
    match proto {
        TCP => mutable.extend((l4..l4 + 4).chain(l4 + 16..l4 + 18)),
        UDP => mutable.extend((l4..l4 + 4).chain(l4 + 6..l4 + 8)),
        ICMP => mutable.extend(l4 + 2..l4 + 6),
        _ => {}
    }
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        if !mutable.contains(&i) {
            assert_eq!(b, a, "byte {i} changed: {b:#04x} -> {a:#04x}");
        }
    }
}

/// Where the packet quoted by an ICMP error starts, and its L4 header.
pub const QUOTED: usize = L4 + 8;
pub const QUOTED_L4: usize = QUOTED + IP_LEN;

/// An ICMP error (`kind`, `code`) from `src` to `dst` quoting the first 28 bytes of `packet`
/// (an IPv4 packet), with a correct ICMP checksum.
pub fn icmp_error_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: u8,
    code: u8,
    packet: &[u8],
) -> Vec<u8> {
    // Bytes 4..8: unused, or the next-hop MTU for "fragmentation needed".
    let mut msg = vec![kind, code, 0, 0, 0, 0, 0x05, 0x78];
    msg.extend_from_slice(&packet[..IP_LEN + 8]);
    let csum = !sum16(&msg, 0);
    msg[2..4].copy_from_slice(&csum.to_be_bytes());
    eth(ETHERTYPE_IPV4, &ipv4(src, dst, ICMP, &msg))
}

/// The ends of the packet an ICMP error frame quotes (ICMP echo: the identifier twice).
pub fn quoted_ends(frame: &[u8]) -> Ends {
    let inner = &frame[QUOTED..];
    let addr =
        |off: usize| Ipv4Addr::new(inner[off], inner[off + 1], inner[off + 2], inner[off + 3]);
    let word = |off: usize| u16::from_be_bytes([inner[off], inner[off + 1]]);
    let (sport, dport) = if inner[9] == ICMP {
        (word(IP_LEN + 4), word(IP_LEN + 4))
    } else {
        (word(IP_LEN), word(IP_LEN + 2))
    };
    Ends {
        src: addr(12),
        dst: addr(16),
        sport,
        dport,
    }
}

/// Panics unless the quoted IPv4 header of an ICMP error frame has a right checksum.
pub fn assert_quoted_ip_checksum(frame: &[u8]) {
    let header = &frame[QUOTED..QUOTED + IP_LEN];
    assert_eq!(
        sum16(header, 0),
        0xffff,
        "quoted IPv4 header checksum wrong: {header:02x?}"
    );
}

/// Sends `frame` as is out of interface `ifname` of the calling thread's namespace (an
/// AF_PACKET socket: the stack sees a packet with no checksum offload state, so every
/// checksum in it is checked in full by whoever receives it).
pub fn send_raw(ifname: &str, frame: &[u8]) {
    let index = nix::net::if_::if_nametoindex(ifname).unwrap_or_else(|e| panic!("{ifname}: {e}"));
    // SAFETY: plain socket calls on a fresh fd with a fully initialised sockaddr_ll.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(sent, frame.len() as isize, "send on {ifname}: {err}");
    }
}

/// `frame` with its Ethernet addresses set.
pub fn with_macs(mut frame: Vec<u8>, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    frame[..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame
}

/// Sends each IPv4 packet of `packets` (header included, any source address) from the calling
/// thread's namespace, routed as the stack routes its destination (a raw IPPROTO_RAW socket).
/// Returns how many were sent.
pub fn send_ipv4(packets: impl IntoIterator<Item = Vec<u8>>) -> usize {
    // SAFETY: plain socket calls on a fresh fd with fully initialised addresses.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let mut sent = 0;
        for packet in packets {
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as u16;
            addr.sin_addr.s_addr = u32::from_ne_bytes(packet[16..20].try_into().unwrap());
            let n = libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            let err = std::io::Error::last_os_error();
            assert_eq!(n, packet.len() as isize, "raw send: {err}");
            sent += 1;
        }
        libc::close(fd);
        sent
    }
}
