//! netd's eBPF programs timed one packet at a time (`cargo xtask bench programs`): each program
//! of a path run by the kernel's `BPF_PROG_TEST_RUN` on the frames of a flow it tracks, in a
//! world the arm's netd built (so a `--baseline` build's programs and maps are its own).
//!
//! Where the paths' figures move by tens of percent between rounds on a shared VM, these move
//! by a few: each figure is the median of many single runs (a run of `repeat` > 1 would give
//! the program the frame it rewrote the time before). What they leave out is what the
//! kernel does around the program on a real path (the veth, the stack, cache misses caused by
//! other traffic), so they tell where a change moves the programs' cost, not a path's rate.

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use etherparse::{
    ArpEthIpv4Packet, ArpOperation, NetSlice, PacketBuilder, SlicedPacket, TcpHeader,
    TransportSlice,
};
use netd_common::datapath::{ENDPOINT_INGRESS_PROG, UPLINK_EGRESS_PROG, UPLINK_INGRESS_PROG};
use netd_testkit::{
    HOST_ADDR, HOST_ADDR6, OUTSIDE_ADDR, OUTSIDE_ADDR6,
    sandbox::UPLINK,
    testrun::{self, PASS, REDIRECT, Skb},
    traffic::try_output_in,
};

use super::{
    Family, Samples,
    arms::{CLIENT, Control, SERVER, World, mac_of},
    prefix, progress, record,
    tools::{CRR_PORT, PUBLISH_SHIFT},
};
use netd::{netlink::Netlink, netns};

/// The metric every record of this part has: a program's run time on one frame.
pub const RUN_NS: &str = "prog_run_ns";

/// The outside namespace's MAC, as frames from there carry it (no program checks it).
const OUTSIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0e];
/// The first sequence numbers of the flows the frames belong to.
const CLIENT_ISN: u32 = 1_000;
const SERVER_ISN: u32 = 9_000;
const WINDOW: u16 = 64_240;
/// The masqueraded flow's ports: the container's, and the outside server's.
const MASQ_SPORT: u16 = 40_000;
const MASQ_DPORT: u16 = 7_002;
/// The published flow's client port.
const CLIENT_PORT: u16 = 50_000;
/// New flows (SYNs) come from 100.64.0.0/10 (shared address space: no host or container
/// address; room for 4 million) and fd00:64::/64, one address each.
const FRESH_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 0);
const FRESH_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 0);

/// How many single runs each figure is the median of, and how many new flows.
pub struct Sizes {
    pub runs: usize,
    pub fresh: usize,
}

impl Sizes {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                runs: 2_000,
                fresh: 2_000,
            }
        } else {
            Self {
                runs: 100_000,
                fresh: 20_000,
            }
        }
    }
}

/// One arm's world and the programs it attached.
pub struct Subject {
    arm: String,
    host_ns: PathBuf,
    uplink: Attached,
    uplink_egress: SchedClassifier,
    uplink_ingress: SchedClassifier,
    endpoint_ingress: SchedClassifier,
    cases: Vec<Case>,
    /// Last: it goes after the programs it attached.
    _world: World,
}

/// A frame a program is timed on, the verdict it must give, and what the record is called.
struct Case {
    name: String,
    program: &'static str,
    ifindex: u32,
    frames: Frames,
    verdict: u32,
}

enum Frames {
    /// The same frame every run: a packet of a tracked flow.
    Same(Vec<u8>),
    /// A new flow's SYN each run (the table grows by `Sizes::fresh` flows a round).
    Fresh(Family),
}

/// An interface of the host namespace: its index and MAC.
#[derive(Clone, Copy)]
struct Attached {
    ifindex: u32,
    mac: [u8; 6],
}

/// A container as its frames need it: its addresses, its MAC, its host-side veth (netd's
/// record of it).
struct Container {
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    mac: [u8; 6],
    veth: u32,
}

impl Subject {
    /// Builds `arm`'s world (dual-stack), finds its programs and starts the flows the frames
    /// belong to.
    pub async fn build(arm: &str) -> Result<Self> {
        progress(&format!("programs: {arm}: building a world"))?;
        let world = World::build(arm, &prefix(arm), Family::V6).await?;
        let World::Managed { ctl, .. } = &world else {
            bail!("{arm}: not a netd arm; only netd's programs are timed");
        };
        let inst = ctl.instance();
        let host_ns = inst.sandbox.host_path();
        let host = Netlink::in_ns(Some(&host_ns))?;
        let uplink = Attached {
            ifindex: host.require_link(UPLINK).await?,
            mac: mac_of(&host, UPLINK).await?,
        };
        let [uplink_egress, uplink_ingress] =
            [TcAttachType::Egress, TcAttachType::Ingress].map(|dir| tcx_program(&host_ns, dir));
        let endpoint_ingress = pinned(&inst.bpffs, ENDPOINT_INGRESS_PROG)?;
        let server = container(ctl, SERVER)?;
        let client = container(ctl, CLIENT)?;
        // The neighbour the fast path out needs, as traffic would have made it.
        for addr in [IpAddr::from(OUTSIDE_ADDR), OUTSIDE_ADDR6.into()] {
            try_output_in(&host_ns, "ping", &["-c", "1", "-W", "1", &addr.to_string()])
                .with_context(|| format!("ping {addr} from the host"))?;
        }
        let mut subject = Self {
            arm: arm.to_string(),
            host_ns,
            uplink,
            uplink_egress: uplink_egress?,
            uplink_ingress: uplink_ingress?,
            endpoint_ingress,
            cases: Vec::new(),
            _world: world,
        };
        for family in Family::ALL {
            subject.add_cases(family, &server, &client)?;
        }
        Ok(subject)
    }

    /// Starts a published flow and a masqueraded one over `family` (their handshakes run
    /// through the programs, which checks that they translate them) and adds the cases of
    /// their packets.
    fn add_cases(&mut self, family: Family, server: &Container, client: &Container) -> Result<()> {
        let (host, outside, srv, cli) = match family {
            Family::V4 => (
                IpAddr::from(HOST_ADDR),
                IpAddr::from(OUTSIDE_ADDR),
                IpAddr::from(server.v4),
                IpAddr::from(client.v4),
            ),
            Family::V6 => (
                HOST_ADDR6.into(),
                OUTSIDE_ADDR6.into(),
                server.v6.into(),
                client.v6.into(),
            ),
        };
        let up = self.uplink.ifindex;
        let from_outside = |(src, sport), (dst, dport), flags| {
            tcp_frame(
                (OUTSIDE_MAC, self.uplink.mac),
                (src, sport),
                (dst, dport),
                flags,
            )
        };
        // To the gateway (no program reads the destination MAC of a packet it routes).
        let from_container = |c: &Container, (src, sport), (dst, dport), flags| {
            tcp_frame((c.mac, self.uplink.mac), (src, sport), (dst, dport), flags)
        };

        // Published: a client outside → host:published, DNATed to the server container.
        let published = (host, CRR_PORT + PUBLISH_SHIFT);
        let request = |flags| from_outside((outside, CLIENT_PORT), published, flags);
        let reply = |flags| from_container(server, (srv, CRR_PORT), (outside, CLIENT_PORT), flags);
        self.expect(UPLINK_INGRESS_PROG, up, &request(Flags::Syn), REDIRECT)?;
        self.expect_from(host, up, &reply(Flags::SynAck))?;
        self.expect(UPLINK_INGRESS_PROG, up, &request(Flags::Ack), REDIRECT)?;
        let mut cases = vec![
            (
                "published, request",
                UPLINK_INGRESS_PROG,
                up,
                request(Flags::Ack),
                REDIRECT,
            ),
            (
                "published, reply",
                ENDPOINT_INGRESS_PROG,
                server.veth,
                reply(Flags::Ack),
                REDIRECT,
            ),
            (
                "published, reply",
                UPLINK_EGRESS_PROG,
                up,
                reply(Flags::Ack),
                PASS,
            ),
        ];

        // Masqueraded: the client container → the outside, its source the host's.
        let request =
            |flags| from_container(client, (cli, MASQ_SPORT), (outside, MASQ_DPORT), flags);
        let port = self.expect_from(host, up, &request(Flags::Syn))?;
        let reply = |flags| from_outside((outside, MASQ_DPORT), (host, port), flags);
        self.expect(UPLINK_INGRESS_PROG, up, &reply(Flags::SynAck), REDIRECT)?;
        self.expect_from(host, up, &request(Flags::Ack))?;
        cases.extend([
            (
                "masqueraded, request",
                ENDPOINT_INGRESS_PROG,
                client.veth,
                request(Flags::Ack),
                REDIRECT,
            ),
            (
                "masqueraded, request",
                UPLINK_EGRESS_PROG,
                up,
                request(Flags::Ack),
                PASS,
            ),
            (
                "masqueraded, reply",
                UPLINK_INGRESS_PROG,
                up,
                reply(Flags::Ack),
                REDIRECT,
            ),
        ]);

        // Container to container: straight into the other's namespace.
        let to_server = tcp_frame(
            (client.mac, server.mac),
            (cli, MASQ_SPORT),
            (srv, CRR_PORT),
            Flags::Ack,
        );
        cases.push((
            "container->container",
            ENDPOINT_INGRESS_PROG,
            client.veth,
            to_server,
            REDIRECT,
        ));
        if family == Family::V4 {
            cases.push((
                "ARP (the floor)",
                UPLINK_INGRESS_PROG,
                up,
                arp_frame(),
                PASS,
            ));
        }
        for (name, program, ifindex, frame, verdict) in cases {
            self.cases.push(Case {
                name: family.label(name),
                program,
                ifindex,
                frames: Frames::Same(frame),
                verdict,
            });
        }
        self.cases.push(Case {
            name: family.label("published, a new flow's SYN"),
            program: UPLINK_INGRESS_PROG,
            ifindex: up,
            frames: Frames::Fresh(family),
            verdict: REDIRECT,
        });
        Ok(())
    }

    fn program(&self, name: &str) -> &SchedClassifier {
        match name {
            UPLINK_INGRESS_PROG => &self.uplink_ingress,
            UPLINK_EGRESS_PROG => &self.uplink_egress,
            _ => &self.endpoint_ingress,
        }
    }

    /// Runs `program` once on `frame`; fails unless it gives `verdict`. Returns the frame it
    /// left.
    fn expect(&self, program: &str, ifindex: u32, frame: &[u8], verdict: u32) -> Result<Vec<u8>> {
        let run = self.run(program, ifindex, frame)?;
        ensure!(
            run.verdict == verdict,
            "{}: {program} gave verdict {} on a frame it should give {verdict} (is the world \
             what the benchmark expects?)",
            self.arm,
            run.verdict as i32,
        );
        Ok(run.frame)
    }

    /// Runs `uplink_egress` once on `frame`, leaving on `ifindex`; fails unless it passes it
    /// on translated to the source `host`. Returns the translated source port.
    fn expect_from(&self, host: IpAddr, ifindex: u32, frame: &[u8]) -> Result<u16> {
        let out = self.expect(UPLINK_EGRESS_PROG, ifindex, frame, PASS)?;
        let (source, port) = source_of(&out)?;
        ensure!(
            source == host,
            "{}: {UPLINK_EGRESS_PROG} left the source {source}, not the host's {host}",
            self.arm
        );
        Ok(port)
    }

    /// One test run of `program` on `frame`, as if it arrived on (left through) `ifindex`.
    fn run(&self, program: &str, ifindex: u32, frame: &[u8]) -> Result<testrun::Run> {
        let p = self.program(program);
        netns::run_in(Some(&self.host_ns), || test_run(p, ifindex, frame))
            .with_context(|| format!("{}: test run of {program}", self.arm))
    }

    /// One round: every case, its median run time recorded under this arm.
    pub fn measure(&self, sizes: &Sizes, round: usize, samples: &mut Samples) -> Result<()> {
        progress(&format!("programs: {}: round {round}", self.arm))?;
        for case in &self.cases {
            let frames = match &case.frames {
                Frames::Same(frame) => vec![frame.clone()],
                Frames::Fresh(family) => (0..sizes.fresh)
                    .map(|i| self.fresh_syn(*family, round * sizes.fresh + i))
                    .collect(),
            };
            let runs = match case.frames {
                Frames::Same(_) => sizes.runs,
                Frames::Fresh(_) => frames.len(),
            };
            let p = self.program(case.program);
            let mut times = netns::run_in(Some(&self.host_ns), || {
                let mut times = Vec::with_capacity(runs);
                for frame in frames.iter().cycle().take(runs) {
                    let run = test_run(p, case.ifindex, frame)?;
                    if run.verdict != case.verdict {
                        bail!(
                            "{}: {} on {}: verdict {}, expected {}",
                            self.arm,
                            case.program,
                            case.name,
                            run.verdict as i32,
                            case.verdict as i32
                        );
                    }
                    times.push(run.duration.as_nanos() as u64);
                }
                Ok(times)
            })?;
            times.sort_unstable();
            let median = times[times.len() / 2] as f64;
            let path = format!("{}: {}", case.program, case.name);
            record(samples, &self.arm, &path, RUN_NS, 1, median);
        }
        Ok(())
    }

    /// The `n`th new flow's SYN to the published port over `family`, from the `n`th address
    /// of the fresh sources' block.
    fn fresh_syn(&self, family: Family, n: usize) -> Vec<u8> {
        let (src, dst) = match family {
            Family::V4 => {
                let src = Ipv4Addr::from(u32::from(FRESH_V4) + n as u32);
                (IpAddr::from(src), IpAddr::from(HOST_ADDR))
            }
            Family::V6 => {
                let src = Ipv6Addr::from(u128::from(FRESH_V6) + n as u128);
                (src.into(), HOST_ADDR6.into())
            }
        };
        tcp_frame(
            (OUTSIDE_MAC, self.uplink.mac),
            (src, CLIENT_PORT),
            (dst, CRR_PORT + PUBLISH_SHIFT),
            Flags::Syn,
        )
    }
}

/// Runs `p` once on `frame` as if it arrived on (left through) `ifindex`, an interface of the
/// calling thread's namespace.
fn test_run(p: &SchedClassifier, ifindex: u32, frame: &[u8]) -> Result<testrun::Run> {
    let skb = Skb {
        ifindex,
        ..Skb::default()
    };
    testrun::run(p, frame, &skb)
}

/// The TCX program attached to the uplink of `host_ns` in `dir` (netd's NAT program).
fn tcx_program(host_ns: &Path, dir: TcAttachType) -> Result<SchedClassifier> {
    netns::run_in(Some(host_ns), || {
        let (_, programs) = SchedClassifier::query_tcx(UPLINK, dir)
            .with_context(|| format!("list the programs on {UPLINK}"))?;
        let info = programs
            .into_iter()
            .next()
            .with_context(|| format!("no TCX program on {UPLINK} ({dir:?})"))?;
        let name = info.name_as_str().unwrap_or("?").to_string();
        Ok(SchedClassifier::from_program_info(info, Cow::Owned(name))?)
    })
}

/// netd's pinned program `name` under the pin root `bpffs`.
fn pinned(bpffs: &Path, name: &str) -> Result<SchedClassifier> {
    let path = netd::bpf::Pins::open(bpffs)?.program(name);
    SchedClassifier::from_pin(&path).with_context(|| format!("open {}", path.display()))
}

/// Container `base` of `ctl`'s world as netd recorded it.
fn container(ctl: &Control, base: &str) -> Result<Container> {
    let c = ctl.inspect(base)?;
    let missing = |what| anyhow!("netd's record of {} has no {what}", c.name);
    let mac: Vec<u8> = c
        .mac
        .as_deref()
        .ok_or_else(|| missing("MAC"))?
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}'s MAC", c.name))?;
    Ok(Container {
        v4: c.ip.ok_or_else(|| missing("IPv4 address"))?,
        v6: c.ip6.ok_or_else(|| missing("IPv6 address"))?,
        mac: mac.try_into().map_err(|_| missing("6-byte MAC"))?,
        veth: c.host_ifindex.ok_or_else(|| missing("host-side veth"))?,
    })
}

/// The TCP flags of the frames: a handshake, then its ACKs.
#[derive(Clone, Copy)]
enum Flags {
    Syn,
    SynAck,
    Ack,
}

/// An Ethernet frame from `macs.0` to `macs.1` carrying a TCP segment with no payload from
/// `src` to `dst`, its sequence numbers those of a handshake between the two.
fn tcp_frame(
    macs: ([u8; 6], [u8; 6]),
    (src, sport): (IpAddr, u16),
    (dst, dport): (IpAddr, u16),
    flags: Flags,
) -> Vec<u8> {
    let mut tcp = TcpHeader::new(sport, dport, 0, WINDOW);
    (
        tcp.syn,
        tcp.ack,
        tcp.sequence_number,
        tcp.acknowledgment_number,
    ) = match flags {
        Flags::Syn => (true, false, CLIENT_ISN, 0),
        Flags::SynAck => (true, true, SERVER_ISN, CLIENT_ISN + 1),
        Flags::Ack => (false, true, CLIENT_ISN + 1, SERVER_ISN + 1),
    };
    let eth = PacketBuilder::ethernet2(macs.0, macs.1);
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("a flow's ends are of one family"),
    };
    let builder = ip.tcp_header(tcp);
    let mut frame = Vec::with_capacity(builder.size(0));
    builder
        .write(&mut frame, &[])
        .expect("a TCP frame fits a Vec");
    frame
}

/// An ARP request on the uplink (from the outside, for the host's address).
fn arp_frame() -> Vec<u8> {
    let arp = ArpEthIpv4Packet {
        operation: ArpOperation::REQUEST,
        sender_mac: OUTSIDE_MAC,
        sender_ipv4: OUTSIDE_ADDR.octets(),
        target_mac: [0; 6],
        target_ipv4: HOST_ADDR.octets(),
    };
    let builder = PacketBuilder::ethernet2(OUTSIDE_MAC, [0xff; 6]).arp(arp.into());
    let mut frame = Vec::with_capacity(builder.size());
    builder.write(&mut frame).expect("an ARP frame fits a Vec");
    frame
}

/// The source address and TCP port of `frame`.
fn source_of(frame: &[u8]) -> Result<(IpAddr, u16)> {
    let packet = SlicedPacket::from_ethernet(frame).context("parse a frame a program left")?;
    let addr = match packet.net {
        Some(NetSlice::Ipv4(ip)) => ip.header().source_addr().into(),
        Some(NetSlice::Ipv6(ip)) => ip.header().source_addr().into(),
        _ => bail!("a program left a frame that is not IP: {frame:02x?}"),
    };
    let Some(TransportSlice::Tcp(tcp)) = packet.transport else {
        bail!("a program left a frame that is not TCP: {frame:02x?}");
    };
    Ok((addr, tcp.source_port()))
}
