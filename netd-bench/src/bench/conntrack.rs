//! Conntrack under pressure: new connections per second with netd's conntrack table 90% full,
//! and an established flow's throughput while a SYN flood from random sources hits a
//! published port (and, for comparison, while as many SYNs go into a sink). The table is
//! filled, and the flood made, by SYNs from random addresses of 198.19.128.0/17 (the
//! sandbox's benchmarking range, routed nowhere else) sent from the outside namespace with a
//! raw socket.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use netd::netns;
use netd_common::datapath::{CONNTRACK_MAP, CONNTRACK_MAPS};
use netd_testkit::{sandbox::HOST_ADDR, traffic::try_output_in};

use super::{
    Family, Plan, Samples,
    arms::{Control, Publish},
    daemon::Daemon,
    memory, prefix, record,
    tools::{self, CRR_PORT, Endpoint, Failures, IPERF_PORT, PUBLISH_SHIFT},
};

/// The path name of these measurements.
pub const CONNTRACK: &str = "outside->published-conntrack";

/// SYNs per second of the flood beside the established flow: a fixed rate, the same for every
/// arm, so the flow's loss compares the datapaths and not how fast one core can send.
const FLOOD_RATE: u64 = 20_000;

/// Measures, on the ebpf arm with a conntrack table of `plan.conntrack_max` entries: new
/// connections per second with the table empty and 90% full, the daemon's RSS and the table's
/// memory per 100,000 entries; then throughput with and without a SYN flood.
pub async fn measure(arm: &str, plan: &Plan, samples: &mut Samples) -> Result<()> {
    let max = plan.conntrack_max.to_string();
    let ctl =
        Control::build_with(arm, &prefix(arm), Family::V4, &["--conntrack-max", &max]).await?;
    let published = [IPERF_PORT, CRR_PORT, FILL_PORT].map(|p| (p + PUBLISH_SHIFT, p));
    let server = ctl.create("srv", None, Publish::Pairs(published.to_vec()))?;
    let ep = Endpoint {
        client_ns: ctl.instance().sandbox.outside_path(),
        server_ns: server.netns,
        target: HOST_ADDR.into(),
        port_shift: PUBLISH_SHIFT,
    };
    let n = plan.conntrack_max;
    crr_counting_failures(&ep, plan, (arm, n, "crr", "crr_failed"), samples)
        .context("crr, table empty")?;
    let daemon = Daemon::start(&ctl, 1.0)?;

    let maps = ctl.instance().bpffs.join("maps");
    let target = SocketAddrV4::new(HOST_ADDR, FILL_PORT + PUBLISH_SHIFT);
    let entries = fill(&ep.server_ns, &ep.client_ns, target, &maps, n * 9 / 10)?;
    record(samples, arm, CONNTRACK, "ct_entries", n, entries as f64);
    crr_counting_failures(&ep, plan, (arm, n, "crr_ct90", "crr_ct90_failed"), samples)
        .context("crr, table 90% full")?;
    record(
        samples,
        arm,
        CONNTRACK,
        "daemon_rss_mib",
        n,
        daemon.rss_bytes()? as f64 / (1 << 20) as f64,
    );
    // Its sweeps walked the nearly full table meanwhile: what they held shows here.
    record(
        samples,
        arm,
        CONNTRACK,
        "daemon_peak_rss_mib",
        n,
        daemon.peak_rss_bytes()? as f64 / (1 << 20) as f64,
    );
    daemon.stop()?;
    // `--conntrack-max N` sizes both tables (assured and unassured flows) at N entries each:
    // what N entries of conntrack cost is both.
    let tables = memory::pinned_maps(&ctl.instance().bpffs)?
        .into_iter()
        .filter(|m| CONNTRACK_MAPS.contains(&m.name.as_str()))
        .collect::<Vec<_>>();
    anyhow::ensure!(tables.len() == 2, "the conntrack maps are not pinned");
    let bytes: u64 = tables.iter().map(|m| m.bytes_memlock).sum();
    let max = tables
        .iter()
        .find(|m| m.name == CONNTRACK_MAP)
        .context("no conntrack map pinned")?
        .max_entries;
    let per_entry = bytes as f64 / max as f64;
    record(
        samples,
        arm,
        memory::MEMORY,
        "maps_kib_per_100k_ct",
        1,
        per_entry * 100_000.0 / 1024.0,
    );
    measure_flooded_throughput(&ep, arm, plan, samples)
}

/// Connections per second and connections that failed (a table at capacity evicts live
/// entries), recorded as the two `metrics` under N = `n`.
fn crr_counting_failures(
    ep: &Endpoint,
    plan: &Plan,
    (arm, n, rate, failed): (&str, u32, &'static str, &'static str),
    samples: &mut Samples,
) -> Result<()> {
    let (cps, failures) = tools::crr_with(ep, plan.secs, plan.crr_threads, Failures::Count)?;
    record(samples, arm, CONNTRACK, rate, n, cps);
    record(samples, arm, CONNTRACK, failed, n, failures as f64);
    Ok(())
}

/// For an arm whose conntrack is the kernel's (iptables): throughput under the SYN flood,
/// and the kernel conntrack's memory per 100,000 entries.
pub async fn measure_flood_only(arm: &str, plan: &Plan, samples: &mut Samples) -> Result<()> {
    let ctl = Control::build(arm, &prefix(arm)).await?;
    let published = [IPERF_PORT, CRR_PORT].map(|p| (p + PUBLISH_SHIFT, p));
    let server = ctl.create("srv", None, Publish::Pairs(published.to_vec()))?;
    let ep = Endpoint {
        client_ns: ctl.instance().sandbox.outside_path(),
        server_ns: server.netns,
        target: HOST_ADDR.into(),
        port_shift: PUBLISH_SHIFT,
    };
    measure_flooded_throughput(&ep, arm, plan, samples)?;
    record_kernel_conntrack_memory(arm, samples)
}

/// The kernel's conntrack (the iptables arm's) per 100,000 entries: the slab object size of
/// `nf_conntrack` times 100,000 (the kernel's table is machine-wide, shared with every other
/// process here, so it is not filled to measure it).
fn record_kernel_conntrack_memory(arm: &str, samples: &mut Samples) -> Result<()> {
    let object = memory::slab_object_bytes("nf_conntrack")?;
    record(
        samples,
        arm,
        memory::MEMORY,
        "slab_kib_per_100k_ct",
        1,
        object as f64 * 100_000.0 / 1024.0,
    );
    Ok(())
}

/// Triples of the flow's throughput per round: alone, then under the flood into the sink and
/// under the flood at the published port (which comes first alternates), back to back. A
/// 3-s transfer's throughput moves by up to a tenth from one measurement to the next and
/// the VM's load over minutes, as much as a flood takes: so each loss is a ratio within a
/// triple, and its median over triples and rounds.
const FLOOD_TRIPLES: usize = 4;

/// One established flow's throughput to the published port, alone and under two SYN floods
/// from random sources at `FLOOD_RATE`, in `FLOOD_TRIPLES` triples:
/// - at the same published port: each SYN makes a flow through the datapath to the
///   container, which answers it;
/// - into a sink in the outside namespace (see [`sink`]): the SYNs are made and sent as
///   before but never reach the host, so what the flow loses to it is what the flood's sender
///   takes from the machine, which no datapath can win back.
///
/// Then what each flood alone costs the machine per SYN (see [`flood_cpu_per_syn`]), and
/// that the sink dropped every SYN sent to it.
pub fn measure_flooded_throughput(
    ep: &Endpoint,
    arm: &str,
    plan: &Plan,
    samples: &mut Samples,
) -> Result<()> {
    let IpAddr::V4(host) = ep.target else {
        bail!("the SYN flood is IPv4 only, not to {}", ep.target);
    };
    let published = SocketAddrV4::new(host, CRR_PORT + ep.port_shift);
    let sunk = sink(&ep.client_ns)?;
    let under = |target| flooding(&ep.client_ns, target, || tools::throughput(ep, plan.secs));
    let mut sent_to_sink = 0;
    for triple in 0..FLOOD_TRIPLES {
        let alone = tools::throughput(ep, plan.secs)?;
        let ((flooded, sent), (sender_only, sunk_sent)) = if triple % 2 == 0 {
            let sender_only = under(sunk)?;
            (under(published)?, sender_only)
        } else {
            (under(published)?, under(sunk)?)
        };
        record(samples, arm, CONNTRACK, "throughput", 1, alone);
        record(samples, arm, CONNTRACK, "throughput_synflood", 1, flooded);
        record(samples, arm, CONNTRACK, "synflood_held", 1, flooded / alone);
        record(samples, arm, CONNTRACK, "synflood_sent", 1, sent as f64);
        let held = sender_only / alone;
        record(samples, arm, CONNTRACK, "sender_synflood_held", 1, held);
        // What the datapath's handling of the SYNs takes, the sender's share taken out.
        let beyond = flooded / sender_only;
        record(samples, arm, CONNTRACK, "synflood_vs_sender", 1, beyond);
        sent_to_sink += sunk_sent;
    }
    let (per_syn, _) = flood_cpu_per_syn(&ep.client_ns, published, plan.secs)?;
    record(samples, arm, CONNTRACK, "synflood_cpu_us", 1, per_syn);
    let (sender, sunk_sent) = flood_cpu_per_syn(&ep.client_ns, sunk, plan.secs)?;
    record(samples, arm, CONNTRACK, "sender_synflood_cpu_us", 1, sender);
    ensure_all_sunk(&ep.client_ns, sent_to_sink + sunk_sent)
}

/// Fails unless the sink dropped at least the `sent` SYNs sent to it: one that went
/// elsewhere (a wrong route, towards the host) would make the sender-alone figures a flood's.
fn ensure_all_sunk(client_ns: &Path, sent: u64) -> Result<()> {
    let json = try_output_in(client_ns, "ip", &["-s", "-j", "link", "show", SINK_DEV])?;
    let links: serde_json::Value =
        serde_json::from_str(&json).with_context(|| format!("ip -s -j link show {SINK_DEV}"))?;
    let dropped = links[0]["stats64"]["rx"]["dropped"]
        .as_u64()
        .with_context(|| format!("no rx drop count for {SINK_DEV} in {json}"))?;
    anyhow::ensure!(
        dropped >= sent,
        "the sink {SINK_DEV} dropped {dropped} packets of the {sent} SYNs sent to it"
    );
    Ok(())
}

/// The [`sink`]'s device, which counts each packet it drops as received and dropped.
const SINK_DEV: &str = "sink0";

/// A target for a flood that stays in the outside namespace `client_ns`: an address routed
/// to an ifb device made there, which drops what is sent to it directly (it forwards only
/// what tc redirects to it; this kernel has no dummy device). Returns it; the device goes
/// with the namespace.
fn sink(client_ns: &Path) -> Result<SocketAddrV4> {
    const SINK: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);
    for args in [
        &["link", "add", SINK_DEV, "type", "ifb"][..],
        &["link", "set", SINK_DEV, "up"],
        &["route", "add", &format!("{SINK}/32"), "dev", SINK_DEV],
    ] {
        try_output_in(client_ns, "ip", args)?;
    }
    Ok(SocketAddrV4::new(SINK, CRR_PORT))
}

/// Runs `during` while SYNs from random sources hit `target` at `FLOOD_RATE` (sent from
/// `client_ns`); returns what it returned and the SYNs sent.
fn flooding<T>(
    client_ns: &Path,
    target: SocketAddrV4,
    during: impl FnOnce() -> Result<T>,
) -> Result<(T, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let (ns, stop) = (client_ns.to_path_buf(), stop.clone());
        std::thread::spawn(move || syn_flood(&ns, target, FLOOD_RATE, &stop))
    };
    let result = during();
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().expect("SYN flood panicked")?;
    Ok((result?, sent))
}

/// What one SYN of the flood costs the whole machine, in CPU microseconds: the busy time of
/// every CPU (/proc/stat) during `secs` (at least 3) of the flood alone, less that of as long a
/// quiet span just before, over the SYNs sent. It counts all of a SYN's way (the sender, the
/// datapath both ways, the container's answer), of which the flow's held throughput shows
/// only what lands on the flow's own path. Returns it with the SYNs sent.
fn flood_cpu_per_syn(client_ns: &Path, target: SocketAddrV4, secs: u32) -> Result<(f64, u64)> {
    // At least the 60,000 SYNs of 3 s: /proc/stat counts in ticks of 10 ms.
    let span = Duration::from_secs(u64::from(secs.max(3)));
    let quiet = busy_cpu_secs_over(span)?;
    let (flooded, sent) = flooding(client_ns, target, || busy_cpu_secs_over(span))?;
    anyhow::ensure!(sent > 0, "the flood sent no SYN");
    Ok(((flooded - quiet) * 1e6 / sent as f64, sent))
}

/// The busy CPU seconds of all CPUs (everything but idle and iowait) over the next `span`.
fn busy_cpu_secs_over(span: Duration) -> Result<f64> {
    let before = busy_cpu_ticks()?;
    std::thread::sleep(span);
    let after = busy_cpu_ticks()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    anyhow::ensure!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(after.saturating_sub(before) as f64 / hz as f64)
}

/// The machine's busy time so far, in clock ticks: /proc/stat's first line (user, nice,
/// system, idle, iowait, irq, softirq, steal), less idle and iowait; steal excluded too (the
/// hypervisor's other guests).
fn busy_cpu_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .context("/proc/stat has no cpu line")?
        .split_whitespace()
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("parse /proc/stat's cpu line")?;
    let [user, nice, system, _idle, _iowait, irq, softirq, _steal] = fields[..] else {
        anyhow::bail!("/proc/stat's cpu line has fewer than 8 fields");
    };
    Ok(user + nice + system + irq + softirq)
}

/// The container port the table is filled through: published, nothing listens on it.
const FILL_PORT: u16 = 7002;
/// Where the filling SYNs come from.
const RANDOM_SOURCES: &str = "198.19.128.0/17";

/// Fills netd's conntrack tables, pinned under `maps`, to about `goal` entries with SYNs from random
/// sources to `target` (a published port of the container at `server_ns` where nothing
/// listens); returns the entries they hold then. A flow answered by nobody is never assured,
/// so they all land in the unassured flows' table (`CONNTRACK_NEW`), as a flood's would; the
/// assured table can't be filled this way, by design. While it fills, the container's routes
/// blackhole the random sources, so its resets never reach the datapath to close the flows:
/// each stays in the table as a flood's would (the sources of a flood don't answer).
fn fill(
    server_ns: &Path,
    client_ns: &Path,
    target: SocketAddrV4,
    maps: &Path,
    goal: u32,
) -> Result<u64> {
    let route = ["route", "add", "blackhole", RANDOM_SOURCES];
    try_output_in(server_ns, "ip", &route)?;
    let filled = send_until_full(client_ns, target, maps, u64::from(goal));
    try_output_in(
        server_ns,
        "ip",
        &["route", "del", "blackhole", RANDOM_SOURCES],
    )?;
    filled
}

fn send_until_full(client_ns: &Path, target: SocketAddrV4, maps: &Path, goal: u64) -> Result<u64> {
    let mut entries = memory::conntrack_entries(maps)?;
    let sock = netns::run_in(Some(client_ns), raw_socket)?;
    let mut rng = Rng::seeded();
    for _ in 0..64 {
        if entries >= goal {
            break;
        }
        // Each SYN makes at most two entries (the flow, and its reply's).
        for _ in 0..(goal - entries).div_ceil(2) {
            send_syn(&sock, &mut rng, target)?;
        }
        // The datapath runs in the sender's softirq: the entries are there when send returns.
        entries = memory::conntrack_entries(maps)?;
    }
    Ok(entries)
}

/// Sends SYNs from random sources to `target` at about `rate` per second until `stop`;
/// returns how many it sent.
fn syn_flood(client_ns: &Path, target: SocketAddrV4, rate: u64, stop: &AtomicBool) -> Result<u64> {
    let sock = netns::run_in(Some(client_ns), raw_socket)?;
    let mut rng = Rng::seeded();
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        if sent >= due {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        for _ in sent..due {
            send_syn(&sock, &mut rng, target)?;
        }
        sent = due;
    }
    Ok(sent)
}

/// A raw IPv4 socket that sends whole packets (`IPPROTO_RAW` implies `IP_HDRINCL`), in the
/// calling thread's namespace.
fn raw_socket() -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: a plain socket(2) call; the descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("open a raw socket");
    }
    // SAFETY: `fd` was just returned by socket(2) and is not owned elsewhere.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Sends one TCP SYN to `target` from a random address of 198.19.128.0/17 and a random port.
fn send_syn(sock: &std::os::fd::OwnedFd, rng: &mut Rng, target: SocketAddrV4) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let r = rng.next();
    let src = Ipv4Addr::new(198, 19, 128 | (r >> 8) as u8 & 0x7f, r as u8);
    let sport = (r >> 16) as u16 | 1024;
    let packet = syn_packet(src, sport, *target.ip(), target.port(), r as u32);
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*target.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `packet` and `addr` are valid for the call's duration.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error()).context("send a SYN");
    }
    Ok(())
}

/// An IPv4 + TCP SYN packet, its checksums filled in.
fn syn_packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, seq: u32) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, seq, 64240)
        .syn();
    let mut packet = Vec::with_capacity(builder.size(0));
    builder.write(&mut packet, &[]).expect("a SYN fits a Vec");
    packet
}

/// xorshift64: random enough for source addresses and ports, no dependency.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self(nanos | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syn_packet_is_a_syn_with_a_valid_checksum() {
        let (src, dst) = (Ipv4Addr::new(198, 19, 200, 7), HOST_ADDR);
        let p = syn_packet(src, 40000, dst, 17001, 12345);
        let sliced = etherparse::SlicedPacket::from_ip(&p).unwrap();
        let Some(etherparse::TransportSlice::Tcp(tcp)) = sliced.transport else {
            panic!("no TCP in {p:02x?}");
        };
        assert!(tcp.syn() && !tcp.ack());
        assert_eq!((tcp.source_port(), tcp.destination_port()), (40000, 17001));
        let header = tcp.to_header();
        assert_eq!(
            header.calc_checksum_ipv4_raw(src.octets(), dst.octets(), tcp.payload()),
            Ok(header.checksum)
        );
    }
}
