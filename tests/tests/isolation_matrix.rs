//! The isolation matrix (issue #12): every case of "what must hold", on both datapaths, with
//! real packets crafted and sent from the outside, a second NIC's neighbour and containers, and
//! counted where they would arrive (a tap on the receiver's interface, or its kernel counters).
//!
//! Every refusal is paired with a positive control (the same packet, minus what makes it an
//! attack, reaches its receiver through the same path) and names the specific reason: a
//! `netd stats` counter on the eBPF datapath, the packet counter of the Docker rule that drops
//! it on the iptables one. Where Docker 20.10's rules don't drop a case (anti-spoofing, ARP,
//! IPv6: Docker has no such rules), the iptables datapath does what Docker does, and its test
//! says so; where it adds a rule of its own (tagged frames, a masquerading network's source
//! from elsewhere than its bridge), the test names that rule.
//!
//! Beside the refusals, what must be translated is: options and fragments to published ports
//! and out of masquerading networks, ICMP errors of masqueraded and hairpin flows.
//!
//! One test per case per datapath: `matrix!` makes a `mod ebpf` and a `mod iptables` test of
//! each case function.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use netd_testkit::sandbox::OUTSIDE_LINK;
use nix::errno::Errno;
use tests::{
    counters,
    harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv, UPLINK, reset, try_bound_connect},
    rawsock::{
        self, ESP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, GRE, ICMP, Ipv4, SCTP, TCP, Tap, UDP, marked,
        marker,
    },
    topology::{self, LAN_ADDR, NIC1_ADDR},
    traffic::{self, retry_interrupted, snmp_counter},
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dp {
    Ebpf,
    Iptables,
}

impl Dp {
    fn name(self) -> &'static str {
        match self {
            Dp::Ebpf => "ebpf",
            Dp::Iptables => "iptables",
        }
    }
}

/// A network made with `netd network create`.
struct Net {
    bridge: String,
    gateway: Ipv4Addr,
}

/// Where a packet may arrive: a container's `eth0`, or the outside's end of the uplink.
struct Receiver {
    ns: PathBuf,
    ifname: &'static str,
    ip: Ipv4Addr,
    mac: [u8; 6],
}

/// Why a packet must not arrive, as the datapath reports it.
#[derive(Clone, Debug)]
enum Reason {
    /// eBPF: the `netd stats` counter of this reason.
    Stat(&'static str),
    /// iptables: the DROP rule of `chain` with exactly these in/out interfaces (`*`: any).
    Rule {
        chain: &'static str,
        input: String,
        output: String,
    },
    /// iptables: the ebtables DROP rules of FORWARD (tagged frames from a container's veth).
    Ebtables,
    /// iptables: held by conntrack's defragmentation for a first fragment that never comes
    /// (the host's `Ip: ReasmReqds`), so never forwarded.
    HeldForReassembly,
    /// Neither datapath: the host's stack drops it before any rule (`why`), uncounted.
    Stack(&'static str),
}

/// What a case must do on one datapath.
enum Expect {
    Refused(Reason),
    /// Delivered, as Docker 20.10's rules deliver it (they have no rule for this case).
    DeliveredAsDocker,
}

/// One test's sandbox, datapath and helpers.
struct World {
    env: TestEnv,
    dp: Dp,
}

impl World {
    fn new(dp: Dp) -> Self {
        Self {
            env: TestEnv::new(),
            dp,
        }
    }

    fn network(&self, name: &str, subnet: &str, flags: &[&str]) -> Net {
        let mut args = vec![
            "--datapath",
            self.dp.name(),
            "network",
            "create",
            name,
            "--subnet",
            subnet,
        ];
        args.extend_from_slice(flags);
        self.env.netd_ok(&args);
        let info = self.env.netd_json(&["network", "inspect", name]);
        let field = |f: &str| info["network"][f].as_str().unwrap().to_string();
        Net {
            bridge: field("bridge"),
            gateway: field("gateway").parse().unwrap(),
        }
    }

    /// A container on network `net` (by name), created with `args` too.
    fn container(&self, base: &str, net: &str, args: &[&str]) -> Receiver {
        let name = self.env.name(base);
        let mut all = vec!["container", "create", name.as_str(), "--network", net];
        all.extend_from_slice(args);
        self.env.netd_ok(&all);
        let ip: Ipv4Addr = self.env.netd_json(&["container", "inspect", &name])["ip"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        Receiver {
            ns: netd::netns::path_of(&name),
            ifname: "eth0",
            ip,
            mac: netd::core::ipam::mac_for(ip),
        }
    }

    fn outside(&self) -> Receiver {
        let ns = self.env.outside_ns();
        Receiver {
            mac: rawsock::mac_of(&self.env, &ns, OUTSIDE_LINK),
            ns,
            ifname: OUTSIDE_LINK,
            ip: OUTSIDE_ADDR,
        }
    }

    /// The outside routes `subnet` through the host (a neighbour that knows the container
    /// networks are behind it).
    fn route_from_outside(&self, subnet: &str) {
        self.ip(
            &self.env.outside_ns(),
            &["route", "add", subnet, "via", &HOST_ADDR.to_string()],
        );
    }

    fn ip(&self, ns: &Path, args: &[&str]) {
        let out = self.env.run_in(ns, "ip", args);
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The MAC of `ifname` in the host namespace (a bridge, the uplink).
    fn host_mac(&self, ifname: &str) -> [u8; 6] {
        rawsock::mac_of(&self.env, &self.env.host_ns(), ifname)
    }

    /// What a refusal's reason has counted so far.
    fn counted(&self, reason: &Reason) -> u64 {
        match reason {
            Reason::Stat(name) => self.stat(name),
            Reason::Rule {
                chain,
                input,
                output,
            } => counters::iptables_drops(&self.env, chain, input, output),
            Reason::HeldForReassembly => snmp(&self.env.host_ns(), "Ip", "ReasmReqds"),
            Reason::Ebtables => counters::ebtables_drops(&self.env),
            Reason::Stack(_) => 0,
        }
    }

    /// `netd stats`' counter of `reason` on the eBPF datapath (0 on the iptables one).
    fn stat_if(&self, dp: Dp, reason: &str) -> u64 {
        if dp == Dp::Ebpf { self.stat(reason) } else { 0 }
    }

    fn stat(&self, reason: &str) -> u64 {
        traffic::stat(&self.env, reason)
    }

    /// Sends with `send(to, marker, attack)` to `victim` (`attack` true) and then to
    /// `control` (`attack` false): the control must arrive, and by then the victim must have
    /// got what `expect` says (what was sent first, had it been let through, would be there).
    fn check(
        &self,
        victim: &Receiver,
        control: &Receiver,
        expect: Expect,
        send: impl Fn(&Receiver, &[u8], bool),
    ) {
        let dp = self.dp;
        let (at_victim, at_control) = (
            Tap::open(&self.env, &victim.ns, victim.ifname),
            Tap::open(&self.env, &control.ns, control.ifname),
        );
        let (attack, honest) = (marker(), marker());
        let refused = match &expect {
            Expect::Refused(reason) => Some((reason, self.counted(reason))),
            Expect::DeliveredAsDocker => None,
        };
        send(victim, &attack, true);
        send(control, &honest, false);
        assert!(
            at_control.arrived(&honest),
            "{dp:?}: the control didn't reach {}",
            control.ip
        );
        let received = at_victim.count(&attack);
        match refused {
            Some((reason, before)) => {
                assert_eq!(received, 0, "{dp:?}: reached {}", victim.ip);
                match reason {
                    // Nothing counts what the stack drops for `why`: that it didn't arrive is
                    // all there is to see.
                    Reason::Stack(why) => eprintln!("{dp:?}: dropped by the stack: {why}"),
                    _ => assert!(
                        self.counted(reason) > before,
                        "{dp:?}: not counted as {reason:?}"
                    ),
                }
            }
            None => assert!(
                received > 0,
                "{dp:?}: Docker's rules deliver this to {}",
                victim.ip
            ),
        }
    }
}

/// The DROP rule in `chain` from `input` to `output` (`*`: any interface).
fn rule(chain: &'static str, input: &str, output: &str) -> Reason {
    Reason::Rule {
        chain,
        input: input.to_string(),
        output: output.to_string(),
    }
}

/// Counter `name` of `group` in /proc/net/snmp of `ns`.
fn snmp(ns: &Path, group: &str, name: &str) -> u64 {
    snmp_counter(ns, group, name).unwrap_or_else(|e| panic!("{e:#}"))
}

// ---------------------------------------------------------------------------------------------
// Inbound: from a neighbour that routes the container subnets through the host.

/// A victim container (on a masquerading or an `--internal` network) and a control one on a
/// routed network (`--masquerade=false`: new flows from outside allowed, on both datapaths),
/// both routed through the host from the outside.
struct Inbound {
    w: World,
    /// The victim's network's bridge.
    bridge: String,
    victim: Receiver,
    control: Receiver,
    reason: Reason,
}

const VICTIM_SUBNET: &str = "10.71.0.0/24";
const ROUTED_SUBNET: &str = "10.72.0.0/24";

fn inbound(dp: Dp, internal: bool) -> Inbound {
    let w = World::new(dp);
    let flags: &[&str] = if internal { &["--internal"] } else { &[] };
    let net = w.network("victim", VICTIM_SUBNET, flags);
    w.network("routed", ROUTED_SUBNET, &["--masquerade=false"]);
    let victim = w.container("v", "victim", &[]);
    let control = w.container("r", "routed", &[]);
    w.route_from_outside(VICTIM_SUBNET);
    w.route_from_outside(ROUTED_SUBNET);
    let reason = match (dp, internal) {
        (Dp::Ebpf, false) => Reason::Stat("unsolicited"),
        (Dp::Ebpf, true) => Reason::Stat("internal"),
        // Docker's FORWARD policy DROP (netd's rule at the end of FORWARD).
        (Dp::Iptables, false) => rule("FORWARD", "*", &net.bridge),
        (Dp::Iptables, true) => rule("NETD-ISOLATION-STAGE-1", "*", &net.bridge),
    };
    Inbound {
        w,
        bridge: net.bridge,
        victim,
        control,
        reason,
    }
}

impl Inbound {
    /// On the eBPF datapath, the packet is refused before any policy, for what the uplink
    /// can't translate: `reason`.
    fn untranslatable(mut self, reason: &'static str) -> Self {
        if self.w.dp == Dp::Ebpf {
            self.reason = Reason::Stat(reason);
        }
        self
    }

    /// IPv4 packets from the outside, made by `craft(header, marker)` for each destination.
    fn refuses_ipv4(self, proto: u8, craft: impl Fn(&Ipv4, &[u8], bool) -> Vec<Vec<u8>>) {
        self.refuses_ipv4_with(proto, vec![], craft);
    }

    fn refuses_ipv4_with(
        self,
        proto: u8,
        options: Vec<u8>,
        craft: impl Fn(&Ipv4, &[u8], bool) -> Vec<Vec<u8>>,
    ) {
        let reason = self.reason.clone();
        self.refuses(reason, |w, to, mark, attack| {
            let header = Ipv4::new(OUTSIDE_ADDR, to.ip, proto).with_options(options.clone());
            rawsock::send_ipv4(&w.env, &w.env.outside_ns(), &craft(&header, mark, attack));
        });
    }

    fn refuses(&self, reason: Reason, send: impl Fn(&World, &Receiver, &[u8], bool)) {
        self.w.check(
            &self.victim,
            &self.control,
            Expect::Refused(reason),
            |to, mark, attack| send(&self.w, to, mark, attack),
        );
    }

    /// Frames from the outside to the host's uplink, tagged with `vlan`.
    fn refuses_tagged(self, vlan: u16, reason: Reason) {
        let (up, out) = (self.w.host_mac(UPLINK), self.w.outside().mac);
        self.refuses(reason, |w, to, mark, attack| {
            let header = Ipv4::new(OUTSIDE_ADDR, to.ip, UDP);
            let packet = header.packet(&rawsock::udp(&header, 4000, 5000, mark));
            let tag = (attack || vlan == 0).then_some(vlan);
            let frame = rawsock::ether(up, out, tag, ETHERTYPE_IPV4, &packet);
            rawsock::send_frames(&w.env, &w.env.outside_ns(), OUTSIDE_LINK, &[frame]);
        });
    }
}

fn one(packet: Vec<u8>) -> Vec<Vec<u8>> {
    vec![packet]
}

/// An echo request with record-route, as `ping -R` sends it.
fn record_route(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4_with(ICMP, rawsock::record_route(), |h, m, _| {
        one(h.packet(&rawsock::echo_request(m)))
    });
}

/// An echo request with a timestamp option, as `ping -T tsonly` sends it.
fn timestamp_option(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4_with(ICMP, rawsock::timestamp(), |h, m, _| {
        one(h.packet(&rawsock::echo_request(m)))
    });
}

/// A TCP connect (SYN) with IP options.
fn tcp_syn_with_options(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4_with(TCP, rawsock::record_route(), |h, m, _| {
        one(h.packet(&rawsock::syn(h, 40000, 80, m)))
    });
}

/// `ping -s 3000`: an echo request in three fragments.
fn fragmented_echo(dp: Dp, internal: bool) {
    inbound(dp, internal)
        .untranslatable("fragment")
        .refuses_ipv4(ICMP, |h, m, _| {
            h.fragments(&rawsock::echo_request(&marked(m, 3000)), 1480)
        });
}

/// The fragments of a 2000-byte UDP datagram, 1000 bytes each.
fn udp_fragments(h: &Ipv4, m: &[u8]) -> Vec<Vec<u8>> {
    h.fragments(&rawsock::udp(h, 4000, 5000, &marked(m, 2000)), 1000)
}

/// Only fragment `n` of a UDP datagram, the others never sent. The control gets the whole
/// datagram: a lone fragment reaches no one where the host reassembles (netfilter's
/// conntrack does, on the iptables datapath).
fn lone_fragment(mut world: Inbound, n: usize) {
    if world.w.dp == Dp::Iptables {
        world.reason = Reason::HeldForReassembly;
    }
    world.refuses_ipv4(UDP, |h, m, attack| {
        let frags = udp_fragments(h, m);
        if attack { one(frags[n].clone()) } else { frags }
    });
}

/// Only the first fragment (its header, its ports: refused as a whole packet would be).
fn first_fragment(dp: Dp, internal: bool) {
    lone_fragment(inbound(dp, internal), 0);
}

/// Only a later fragment (no ports to check, no first fragment to take them from).
fn later_fragment(dp: Dp, internal: bool) {
    lone_fragment(inbound(dp, internal).untranslatable("fragment"), 1);
}

/// An ICMP timestamp request (type 13): ICMP other than echo.
fn icmp_timestamp_request(dp: Dp, internal: bool) {
    inbound(dp, internal)
        .untranslatable("unsupported_proto")
        .refuses_ipv4(ICMP, |h, m, _| {
            let mut body = vec![0; 12];
            body.extend_from_slice(m);
            one(h.packet(&rawsock::icmp(13, 0, [0x12, 0x34, 0, 1], &body)))
        });
}

/// A port unreachable quoting a UDP datagram the container never sent (no flow matches).
fn icmp_error_matching_no_flow(dp: Dp, internal: bool) {
    inbound(dp, internal)
        .untranslatable("icmp_no_flow")
        .refuses_ipv4(ICMP, |h, m, _| {
            let quoted_header = Ipv4::new(h.dst, OUTSIDE_ADDR, UDP);
            let quoted = quoted_header.packet(&rawsock::udp(&quoted_header, 5353, 53, m));
            one(h.packet(&rawsock::icmp(3, 3, [0; 4], &quoted)))
        });
}

/// SCTP (132): a common header (ports, tag, checksum unchecked on the way) and a marked chunk.
fn sctp(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4(SCTP, |h, m, _| {
        let mut msg = vec![0x0f, 0xa0, 0x13, 0x88, 0, 0, 0, 0, 0, 0, 0, 0];
        msg.extend_from_slice(m);
        one(h.packet(&msg))
    });
}

/// GRE (47) carrying a marked payload.
fn gre(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4(GRE, |h, m, _| {
        let mut msg = vec![0, 0, 0x08, 0x00];
        msg.extend_from_slice(m);
        one(h.packet(&msg))
    });
}

/// ESP (50): an SPI, a sequence number and marked "ciphertext".
fn esp(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4(ESP, |h, m, _| {
        let mut msg = vec![0, 0, 0x10, 0x01, 0, 0, 0, 1];
        msg.extend_from_slice(m);
        one(h.packet(&msg))
    });
}

/// A frame tagged with VLAN 5: the host has no such VLAN, nothing may forward it. The
/// control is the same frame untagged to the routed container.
fn vlan_tagged(dp: Dp, internal: bool) {
    let world = inbound(dp, internal);
    let reason = match dp {
        Dp::Ebpf => Reason::Stat("vlan"),
        Dp::Iptables => Reason::Stack("no device for VLAN 5"),
    };
    world.refuses_tagged(5, reason);
}

/// A priority-tagged frame (VLAN 0): the stack takes it as untagged and routes it.
fn priority_tagged(dp: Dp, internal: bool) {
    let world = inbound(dp, internal).untranslatable("vlan");
    let reason = world.reason.clone();
    world.refuses_tagged(0, reason);
}

/// IPv6 from the outside to a container, on a host that routes IPv6 to the container's
/// bridge (an address on it, forwarding on): Docker 20.10 without `--ip6tables` writes no rule
/// for it; netd's eBPF datapath lets no IPv6 from beyond in but to a routed network's
/// containers. The control: the host forwarded it (`Ip6OutForwDatagrams`), to a neighbour it
/// knows (a permanent entry: no NDP to lose on the way).
fn ipv6(dp: Dp, internal: bool) {
    ipv6_from_outside(dp, internal, None);
}

/// [`ipv6`] priority-tagged (VLAN 0): the stack routes what the tag carries, so the tag must
/// not hide it from the rules.
fn ipv6_priority_tagged(dp: Dp, internal: bool) {
    ipv6_from_outside(dp, internal, Some(0));
}

fn ipv6_from_outside(dp: Dp, internal: bool, vlan: Option<u16>) {
    let world = inbound(dp, internal);
    let (w, victim) = (&world.w, &world.victim);
    let host = w.env.host_ns();
    for conf in ["all", "default", UPLINK, &world.bridge] {
        let key = format!("net.ipv6.conf.{conf}.disable_ipv6");
        netd::netlink::set_sysctl(Some(&host), &key, "0").unwrap();
    }
    netd::netlink::set_sysctl(Some(&host), "net.ipv6.conf.all.forwarding", "1").unwrap();
    w.ip(
        &host,
        &[
            "-6",
            "addr",
            "add",
            "fd00:71::1/64",
            "dev",
            &world.bridge,
            "nodad",
        ],
    );
    w.ip(
        &victim.ns,
        &["-6", "addr", "add", "fd00:71::2/64", "dev", "eth0", "nodad"],
    );
    let mac = netd::core::ipam::format_mac(victim.mac);
    w.ip(
        &host,
        &[
            "-6",
            "neigh",
            "replace",
            "fd00:71::2",
            "lladdr",
            &mac,
            "dev",
            &world.bridge,
            "nud",
            "permanent",
        ],
    );
    let forwarded = || counters::snmp6(&w.env, &host, "Ip6OutForwDatagrams");
    // An internal network takes nothing from beyond; a masquerading one no IPv6 that NAT66
    // didn't translate (this one has no IPv6 side at all).
    let reason = if internal { "internal" } else { "unsolicited" };
    let (before, dropped) = (forwarded(), w.stat_if(dp, reason));
    let tap = Tap::open(&w.env, &victim.ns, "eth0");
    let mark = marker();
    let packet = rawsock::ipv6(
        "fd00:99::1".parse().unwrap(),
        "fd00:71::2".parse().unwrap(),
        &mark,
    );
    let frame = rawsock::ether(
        w.host_mac(UPLINK),
        w.outside().mac,
        vlan,
        ETHERTYPE_IPV6,
        &packet,
    );
    rawsock::send_frames(&w.env, &w.env.outside_ns(), OUTSIDE_LINK, &[frame]);
    let received = tap.count(&mark);
    assert!(forwarded() > before, "{dp:?}: the host didn't forward it");
    match dp {
        Dp::Ebpf => {
            assert_eq!(received, 0, "{dp:?}: reached {}", victim.ip);
            assert!(w.stat(reason) > dropped, "{dp:?}: not counted as {reason}");
        }
        Dp::Iptables => assert!(received > 0, "{dp:?}: Docker's rules deliver it"),
    }
}

/// Traffic routed in through a second NIC of the host (not the uplink), from a neighbour on
/// that NIC's link that routes the container subnets through the host.
fn via_second_nic(dp: Dp, internal: bool) {
    let world = inbound(dp, internal);
    let lan = world.w.second_nic();
    for subnet in [VICTIM_SUBNET, ROUTED_SUBNET] {
        world.w.ip(
            &lan,
            &["route", "add", subnet, "via", &NIC1_ADDR.to_string()],
        );
    }
    let reason = world.reason.clone();
    world.refuses(reason, |w, to, mark, _| {
        let header = Ipv4::new(LAN_ADDR, to.ip, UDP);
        let packet = header.packet(&rawsock::udp(&header, 4000, 5000, mark));
        rawsock::send_ipv4(&w.env, &lan, &[packet]);
    });
}

impl World {
    /// [`topology::second_nic`]. Made after the networks: on the eBPF datapath, `netd reload`
    /// follows it (the NAT programs go on it), as the daemon would.
    fn second_nic(&self) -> PathBuf {
        let lan = topology::second_nic(&self.env);
        if self.dp == Dp::Ebpf {
            self.env.netd_ok(&["reload"]);
        }
        lan
    }
}

// ---------------------------------------------------------------------------------------------
// From a container.

/// Network `a` (10.73.0.0/24: `a1`, `a2`), another network `b` (`b1`), an `--internal` one
/// `i` (`i1`), each masquerading but `i`, and a routed one `r` (`r1`: what it sends out
/// needs no translation, the control for what `i1` may not send).
struct Outbound {
    w: World,
    a: Net,
    b: Net,
    i: Net,
    a1: Receiver,
    a2: Receiver,
    b1: Receiver,
    i1: Receiver,
    r1: Receiver,
}

fn outbound(dp: Dp) -> Outbound {
    let w = World::new(dp);
    let a = w.network("a", "10.73.0.0/24", &[]);
    let b = w.network("b", "10.74.0.0/24", &[]);
    let i = w.network("i", "10.75.0.0/24", &["--internal"]);
    w.network("r", ROUTED_SUBNET, &["--masquerade=false"]);
    let a1 = w.container("a1", "a", &[]);
    let a2 = w.container("a2", "a", &[]);
    let b1 = w.container("b1", "b", &[]);
    let i1 = w.container("i1", "i", &[]);
    let r1 = w.container("r1", "r", &[]);
    // i1 reaches nothing outside its network: it may still route a packet at its gateway.
    w.ip(
        &i1.ns,
        &["route", "replace", "default", "via", &i.gateway.to_string()],
    );
    Outbound {
        w,
        a,
        b,
        i,
        a1,
        a2,
        b1,
        i1,
        r1,
    }
}

/// A UDP frame as a container may forge it: from `from`'s eth0, IPv4 source `src` and
/// source MAC `mac`, to `to`'s address at L2 destination `l2_dst`, tagged with `vlan`.
struct Forged<'a> {
    from: &'a Receiver,
    src: Ipv4Addr,
    mac: [u8; 6],
    l2_dst: [u8; 6],
    vlan: Option<u16>,
}

impl<'a> Forged<'a> {
    /// What `from` sends honestly to `l2_dst`.
    fn honest(from: &'a Receiver, l2_dst: [u8; 6]) -> Self {
        Self {
            from,
            src: from.ip,
            mac: from.mac,
            l2_dst,
            vlan: None,
        }
    }

    fn send(&self, w: &World, to: &Receiver, mark: &[u8]) {
        let header = Ipv4::new(self.src, to.ip, UDP);
        let packet = header.packet(&rawsock::udp(&header, 4000, 5000, mark));
        let frame = rawsock::ether(self.l2_dst, self.mac, self.vlan, ETHERTYPE_IPV4, &packet);
        rawsock::send_frames(&w.env, &self.from.ns, "eth0", &[frame]);
    }
}

impl Outbound {
    fn gateway_mac(&self, net: &Net) -> [u8; 6] {
        self.w.host_mac(&net.bridge)
    }

    /// `a1` to `a2` (same network, ICC on): the control is the honest frame, the attack the
    /// one `forge` makes of it; on the iptables datapath the attack is delivered, as Docker's
    /// rules (which have no anti-spoofing) deliver it.
    fn forged_to_neighbour(&self, ebpf_reason: &'static str, forge: impl Fn(&mut Forged)) {
        let expect = match self.w.dp {
            Dp::Ebpf => Expect::Refused(Reason::Stat(ebpf_reason)),
            Dp::Iptables => Expect::DeliveredAsDocker,
        };
        self.w
            .check(&self.a2, &self.a2, expect, |to, mark, attack| {
                let mut frame = Forged::honest(&self.a1, to.mac);
                if attack {
                    forge(&mut frame);
                }
                frame.send(&self.w, to, mark);
            });
    }

    fn to_other_network(&self) -> Expect {
        Expect::Refused(match self.w.dp {
            Dp::Ebpf => Reason::Stat("other_network"),
            Dp::Iptables => rule("NETD-ISOLATION-STAGE-2", "*", &self.b.bridge),
        })
    }

    fn leaving_internal(&self) -> Expect {
        Expect::Refused(match self.w.dp {
            Dp::Ebpf => Reason::Stat("internal"),
            Dp::Iptables => rule("NETD-ISOLATION-STAGE-1", &self.i.bridge, "*"),
        })
    }

    /// IPv4 packets made by `craft(header, marker, attack)`, sent (routed by the sender's own
    /// stack) from `attacker` to `victim` and from `sender` to `control`.
    #[allow(clippy::too_many_arguments)]
    fn routed(
        &self,
        (sender, control): (&Receiver, &Receiver),
        (attacker, victim): (&Receiver, &Receiver),
        expect: Expect,
        proto: u8,
        options: Vec<u8>,
        craft: impl Fn(&Ipv4, &[u8], bool) -> Vec<Vec<u8>>,
    ) {
        self.w.check(victim, control, expect, |to, mark, attack| {
            let from = if attack { attacker } else { sender };
            let header = Ipv4::new(from.ip, to.ip, proto).with_options(options.clone());
            rawsock::send_ipv4(&self.w.env, &from.ns, &craft(&header, mark, attack));
        });
    }
}

/// A spoofed IPv4 source (an unused address of the network) to a container of the same
/// network.
fn spoofed_source(dp: Dp) {
    outbound(dp).forged_to_neighbour("spoofed_addr", |f| f.src = Ipv4Addr::new(10, 73, 0, 200));
}

/// A forged source MAC to a container of the same network.
fn spoofed_mac(dp: Dp) {
    outbound(dp).forged_to_neighbour("spoofed_mac", |f| f.mac = [0x02, 0x42, 10, 73, 0, 0x99]);
}

/// A VLAN-tagged (5) frame with a spoofed source to a container of the same network: the tag
/// must not hide the spoofing (the eBPF datapath drops every tagged frame a container sends).
fn vlan_tagged_spoofed_source(dp: Dp) {
    outbound(dp).forged_to_neighbour("vlan", |f| {
        f.src = Ipv4Addr::new(10, 73, 0, 200);
        f.vlan = Some(5);
    });
}

/// IPv6 with global (not link-local) addresses to a container of the same network; the
/// control is the same packet between link-local addresses.
fn ipv6_not_link_local(dp: Dp) {
    let o = outbound(dp);
    let expect = match dp {
        // The network has no IPv6: no global address is the container's.
        Dp::Ebpf => Expect::Refused(Reason::Stat("spoofed_addr")),
        // Docker 20.10 without --ip6tables writes no IPv6 rule.
        Dp::Iptables => Expect::DeliveredAsDocker,
    };
    o.w.check(&o.a2, &o.a2, expect, |to, mark, attack| {
        // The control: from a1's own link-local address (its MAC's).
        let (src, dst) = if attack {
            (
                Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2),
                Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3),
            )
        } else {
            (
                tests::frames6::link_local(o.a1.mac),
                tests::frames6::link_local(to.mac),
            )
        };
        let packet = rawsock::ipv6(src, dst, mark);
        let frame = rawsock::ether(to.mac, o.a1.mac, None, ETHERTYPE_IPV6, &packet);
        rawsock::send_frames(&o.w.env, &o.a1.ns, "eth0", &[frame]);
    });
}

/// From `q2` to `q1`, two containers of an `--icc=false` network (without IPv6), the frame
/// `frame(from, to, mark, tagged)` makes, `tagged` for the attack; the control is the same
/// frame untagged from `a1` to `a2`, on a network with ICC. Dropped for `ebpf_reason` on the
/// eBPF datapath, by netd's ebtables rules on the iptables one.
fn without_icc(
    dp: Dp,
    ebpf_reason: &'static str,
    frame: impl Fn(&Receiver, &Receiver, &[u8], bool) -> Vec<u8>,
) {
    let o = outbound(dp);
    o.w.network("q", "10.76.0.0/24", &["--icc=false"]);
    let (q1, q2) = (o.w.container("q1", "q", &[]), o.w.container("q2", "q", &[]));
    let expect = Expect::Refused(match dp {
        Dp::Ebpf => Reason::Stat(ebpf_reason),
        Dp::Iptables => Reason::Ebtables,
    });
    o.w.check(&q1, &o.a2, expect, |to, mark, attack| {
        let from = if attack { &q2 } else { &o.a1 };
        rawsock::send_frames(&o.w.env, &from.ns, "eth0", &[frame(from, to, mark, attack)]);
    });
}

/// A UDP datagram from `from` to `to` carrying `mark`, as IPv4.
fn udp_packet(from: &Receiver, to: &Receiver, mark: &[u8]) -> Vec<u8> {
    let header = Ipv4::new(from.ip, to.ip, UDP);
    header.packet(&rawsock::udp(&header, 4000, 5000, mark))
}

/// A frame with two priority tags: br_netfilter looks behind one tag only, and the receiving
/// stack strips both.
fn two_tags_without_icc(dp: Dp) {
    without_icc(dp, "vlan", |from, to, mark, tagged| {
        let packet = udp_packet(from, to, mark);
        if tagged {
            // The inner tag (PCP 3, VLAN 0) and the IPv4 behind it, under the outer one.
            let inner = [&[0x60, 0x00][..], &ETHERTYPE_IPV4.to_be_bytes(), &packet].concat();
            rawsock::ether(to.mac, from.mac, Some(0), 0x8100, &inner)
        } else {
            rawsock::ether(to.mac, from.mac, None, ETHERTYPE_IPV4, &packet)
        }
    });
}

/// IPv6 on a network without IPv6 (link-local, which a container's root can make): no
/// ip6tables rule looks at such a network. (The control's network has no IPv6 either.)
fn ipv6_without_icc(dp: Dp) {
    without_icc(dp, "icc_denied", |from, to, mark, _| {
        let (src, dst) = (
            tests::frames6::link_local(from.mac),
            tests::frames6::link_local(to.mac),
        );
        let packet = rawsock::ipv6(src, dst, mark);
        rawsock::ether(to.mac, from.mac, None, ETHERTYPE_IPV6, &packet)
    });
}

/// A priority-tagged frame (VLAN 0: the receiving stack takes it as untagged): dropped as
/// every tagged frame a container sends there (on the iptables datapath by netd's ebtables
/// rules, before the `-i BRIDGE -o BRIDGE -j DROP` that `bridge-nf-filter-vlan-tagged` would
/// apply).
fn priority_tagged_without_icc(dp: Dp) {
    without_icc(dp, "vlan", |from, to, mark, tagged| {
        let packet = udp_packet(from, to, mark);
        rawsock::ether(
            to.mac,
            from.mac,
            tagged.then_some(0),
            ETHERTYPE_IPV4,
            &packet,
        )
    });
}

/// A priority-tagged frame (VLAN 0: the host's stack untags and routes it) to another
/// network's container, through the gateway; the control is the frame untagged to the
/// outside.
fn priority_tagged_to_other_network(dp: Dp) {
    let o = outbound(dp);
    let expect = match dp {
        Dp::Ebpf => Expect::Refused(Reason::Stat("vlan")),
        Dp::Iptables => o.to_other_network(),
    };
    let gateway = o.gateway_mac(&o.a);
    o.w.check(&o.b1, &o.w.outside(), expect, |to, mark, attack| {
        let mut frame = Forged::honest(&o.a1, gateway);
        frame.vlan = attack.then_some(0);
        frame.send(&o.w, to, mark);
    });
}

/// A priority-tagged frame from an `--internal` container to the outside; the control is the
/// frame untagged from a routed network's container.
fn priority_tagged_from_internal(dp: Dp) {
    let o = outbound(dp);
    let expect = match dp {
        Dp::Ebpf => Expect::Refused(Reason::Stat("vlan")),
        Dp::Iptables => o.leaving_internal(),
    };
    let outside = o.w.outside();
    let (gw_r, gw_i) = (o.w.host_mac(&bridge_of(&o.w, "r")), o.gateway_mac(&o.i));
    o.w.check(&outside, &outside, expect, |to, mark, attack| {
        let mut frame = if attack {
            Forged::honest(&o.i1, gw_i)
        } else {
            Forged::honest(&o.r1, gw_r)
        };
        frame.vlan = attack.then_some(0);
        frame.send(&o.w, to, mark);
    });
}

fn bridge_of(w: &World, network: &str) -> String {
    w.env.netd_json(&["network", "inspect", network])["network"]["bridge"]
        .as_str()
        .unwrap()
        .to_string()
}

fn all_fragments(h: &Ipv4, m: &[u8], _attack: bool) -> Vec<Vec<u8>> {
    udp_fragments(h, m)
}

fn echo_request(h: &Ipv4, m: &[u8], _attack: bool) -> Vec<Vec<u8>> {
    one(h.packet(&rawsock::echo_request(m)))
}

/// A fragmented datagram to another network's container; the control goes to the sender's
/// own network.
fn fragments_to_other_network(dp: Dp) {
    let o = outbound(dp);
    let (a1, a2, b1) = (&o.a1, &o.a2, &o.b1);
    o.routed(
        (a1, a2),
        (a1, b1),
        o.to_other_network(),
        UDP,
        vec![],
        all_fragments,
    );
}

/// Only a later fragment (no ports) to another network's container; the control is the
/// whole datagram to the sender's own network (a lone fragment reaches no one where the host
/// reassembles: netfilter's conntrack, on the iptables datapath, holds it).
fn later_fragment_to_other_network(dp: Dp) {
    let o = outbound(dp);
    let expect = match dp {
        Dp::Ebpf => o.to_other_network(),
        Dp::Iptables => Expect::Refused(Reason::HeldForReassembly),
    };
    let (a1, a2, b1) = (&o.a1, &o.a2, &o.b1);
    o.routed((a1, a2), (a1, b1), expect, UDP, vec![], |h, m, attack| {
        let frags = udp_fragments(h, m);
        if attack { one(frags[1].clone()) } else { frags }
    });
}

/// An echo request with record-route to another network's container; the control goes to the
/// sender's own network.
fn options_to_other_network(dp: Dp) {
    let o = outbound(dp);
    let (a1, a2, b1) = (&o.a1, &o.a2, &o.b1);
    let options = rawsock::record_route();
    o.routed(
        (a1, a2),
        (a1, b1),
        o.to_other_network(),
        ICMP,
        options,
        echo_request,
    );
}

/// A fragmented datagram from an `--internal` container to the outside; the control is the
/// same from a routed network's container.
fn fragments_from_internal(dp: Dp) {
    let o = outbound(dp);
    let outside = o.w.outside();
    let (r1, i1) = (&o.r1, &o.i1);
    o.routed(
        (r1, &outside),
        (i1, &outside),
        o.leaving_internal(),
        UDP,
        vec![],
        all_fragments,
    );
}

/// An echo request with record-route from an `--internal` container to the outside; the
/// control is the same from a routed network's container.
fn options_from_internal(dp: Dp) {
    let o = outbound(dp);
    let outside = o.w.outside();
    let (r1, i1) = (&o.r1, &o.i1);
    let options = rawsock::record_route();
    o.routed(
        (r1, &outside),
        (i1, &outside),
        o.leaving_internal(),
        ICMP,
        options,
        echo_request,
    );
}

/// A gratuitous ARP from `a1` claiming `a2`'s address must not take over the host's entry for
/// `a2` nor divert the host's traffic to it; the control, `a1` announcing its own address,
/// corrects a wrong entry the host has for `a1`.
fn arp_spoofing(dp: Dp) {
    let o = outbound(dp);
    let (env, host, br) = (&o.w.env, o.w.env.host_ns(), &o.a.bridge);
    let neighbour = |ip: Ipv4Addr| {
        let out = env.run_in(&host, "ip", &["neigh", "show", &ip.to_string(), "dev", br]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut words = text.split_whitespace();
        words.find(|w| *w == "lladdr");
        words.next().map(str::to_string)
    };
    let mac = netd::core::ipam::format_mac;
    // The host learns a2 from a2's own ARP.
    let ping = env.run_in(&o.a2.ns, "ping", &["-c1", "-W1", &o.a.gateway.to_string()]);
    assert!(ping.status.success(), "{ping:?}");
    assert_eq!(neighbour(o.a2.ip), Some(mac(o.a2.mac)));
    o.w.ip(
        &host,
        &[
            "neigh",
            "replace",
            &o.a1.ip.to_string(),
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            br,
            "nud",
            "stale",
        ],
    );
    let announce = |ip: Ipv4Addr| {
        let frame = rawsock::gratuitous_arp(o.a1.mac, ip);
        rawsock::send_frames(env, &o.a1.ns, "eth0", &[frame]);
        thread::sleep(Duration::from_millis(300));
    };
    announce(o.a1.ip);
    assert_eq!(
        neighbour(o.a1.ip),
        Some(mac(o.a1.mac)),
        "{dp:?}: the control"
    );

    let before = o.w.stat_if(dp, "spoofed_addr");
    announce(o.a2.ip);
    // Whose is a2's address now, for the host's traffic: an echo to it, counted at a2.
    let tap = Tap::open(env, &o.a2.ns, "eth0");
    let mark = marker();
    let header = Ipv4::new(o.a.gateway, o.a2.ip, ICMP);
    rawsock::send_ipv4(env, &host, &[header.packet(&rawsock::echo_request(&mark))]);
    let reached = tap.count(&mark);
    match dp {
        Dp::Ebpf => {
            assert_eq!(neighbour(o.a2.ip), Some(mac(o.a2.mac)), "taken over");
            assert!(reached > 0, "the host's traffic to a2 diverted");
            assert!(o.w.stat("spoofed_addr") > before, "not counted");
        }
        // Docker has no ARP rule: the host believes a1.
        Dp::Iptables => {
            assert_eq!(neighbour(o.a2.ip), Some(mac(o.a1.mac)), "as Docker");
            assert_eq!(reached, 0, "as Docker, diverted to a1");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hairpin and published ports.

/// Network `a` with `p1` publishing 8080 (TCP, listening) and 8081/udp, and its neighbour
/// `a2`; an `--internal` network `i` (`i1`) and an `--icc=false` network `q` with `q1`
/// publishing 8082 and its neighbour `q2`.
struct Published {
    w: World,
    a: Net,
    i: Net,
    q: Net,
    p1: Receiver,
    a2: Receiver,
    i1: Receiver,
    q1: Receiver,
    q2: Receiver,
}

fn published(dp: Dp) -> Published {
    let w = World::new(dp);
    let a = w.network("a", "10.73.0.0/24", &[]);
    let i = w.network("i", "10.75.0.0/24", &["--internal"]);
    let q = w.network("q", "10.76.0.0/24", &["--icc=false"]);
    let p1 = w.container("p1", "a", &["-p", "8080:80", "-p", "8081:81/udp"]);
    let a2 = w.container("a2", "a", &[]);
    let i1 = w.container("i1", "i", &[]);
    let q1 = w.container("q1", "q", &["-p", "8082:80"]);
    let q2 = w.container("q2", "q", &[]);
    for c in [&p1, &q1] {
        w.env.spawn_in(&c.ns, "nc", &["-lk", "80"]);
        traffic::wait_listening(&c.ns, 80);
    }
    Published {
        w,
        a,
        i,
        q,
        p1,
        a2,
        i1,
        q1,
        q2,
    }
}

/// Whether a TCP connection from `ns` to `dst:port` is accepted.
fn connects(env: &TestEnv, ns: &Path, dst: Ipv4Addr, port: u16) -> bool {
    let (dst, port) = (dst.to_string(), port.to_string());
    env.run_in(ns, "nc", &["-z", "-w", "1", &dst, &port])
        .status
        .success()
}

impl Published {
    /// The iptables datapath's DROP of network `a`'s source from anywhere but its bridge.
    fn a_source_from_elsewhere(&self) -> Reason {
        rule(
            "NETD-ISOLATION-STAGE-1",
            &format!("!{}", self.a.bridge),
            "*",
        )
    }

    /// From `client`, `port` through each of `addresses` must not reach `server` (counted at
    /// the server: no TCP segment arrives), for `reason`; then the control, `a2` to `p1`'s
    /// 8080 through the host's address, connects.
    fn hairpin_refused(
        &self,
        client: &Receiver,
        server: &Receiver,
        port: u16,
        addresses: &[Ipv4Addr],
        reason: Reason,
    ) {
        let (env, dp) = (&self.w.env, self.w.dp);
        for dst in addresses {
            let (segments, counted) = (snmp(&server.ns, "Tcp", "InSegs"), self.w.counted(&reason));
            assert!(
                !connects(env, &client.ns, *dst, port),
                "{dp:?}: through {dst}"
            );
            assert_eq!(
                snmp(&server.ns, "Tcp", "InSegs"),
                segments,
                "{dp:?}: through {dst}, reached the server"
            );
            assert!(
                self.w.counted(&reason) > counted,
                "{dp:?}: not counted as {reason:?}"
            );
        }
        assert!(
            connects(env, &self.a2.ns, HOST_ADDR, 8080),
            "{dp:?}: the control"
        );
    }
}

/// An `--internal` container gets nothing through another network's published port, through
/// the host's address or its own gateway, as on the iptables datapath (where, DNATed, it is
/// a packet leaving the internal network for another subnet: its isolation rule drops it).
fn hairpin_from_internal(dp: Dp) {
    let p = published(dp);
    let reason = match dp {
        Dp::Ebpf => Reason::Stat("internal"),
        Dp::Iptables => rule("NETD-ISOLATION-STAGE-1", &p.i.bridge, "*"),
    };
    p.w.ip(
        &p.i1.ns,
        &[
            "route",
            "replace",
            "default",
            "via",
            &p.i.gateway.to_string(),
        ],
    );
    p.hairpin_refused(&p.i1, &p.p1, 8080, &[HOST_ADDR, p.i.gateway], reason);
}

/// An `--icc=false` container gets nothing through its network neighbour's published port
/// (through the host's address or the gateway), as on the iptables datapath.
fn hairpin_without_icc(dp: Dp) {
    let p = published(dp);
    let reason = match dp {
        Dp::Ebpf => Reason::Stat("icc_denied"),
        Dp::Iptables => rule("FORWARD", &p.q.bridge, &p.q.bridge),
    };
    p.hairpin_refused(&p.q2, &p.q1, 8082, &[HOST_ADDR, p.q.gateway], reason);
}

/// A TCP SYN with IP options to a published port is translated to the container (which gets
/// it, addressed to it) and its SYN-ACK back to the outside (from the host's address).
fn syn_with_options_to_published_port(dp: Dp) {
    let p = published(dp);
    let env = &p.w.env;
    let outside = p.w.outside();
    let (at_container, at_outside) = (
        Tap::open(env, &p.p1.ns, "eth0"),
        Tap::open(env, &outside.ns, OUTSIDE_LINK),
    );
    let mark = marker();
    let header = Ipv4::new(OUTSIDE_ADDR, HOST_ADDR, TCP).with_options(rawsock::record_route());
    rawsock::send_ipv4(
        env,
        &outside.ns,
        &[header.packet(&rawsock::syn(&header, 40001, 8080, &mark))],
    );
    let to_container =
        at_container.received(&mark, |f| rawsock::ipv4_destination(f) == Some(p.p1.ip));
    assert!(
        !to_container.is_empty(),
        "{dp:?}: the SYN didn't reach the container"
    );
    let syn_ack = at_outside.received(&[], |f| {
        rawsock::ipv4_source(f) == Some(HOST_ADDR) && tcp_ports(f) == Some((8080, 40001))
    });
    assert!(
        !syn_ack.is_empty(),
        "{dp:?}: no SYN-ACK from the published port"
    );
}

/// The TCP ports of an IPv4 frame (header length from its IHL).
fn tcp_ports(frame: &[u8]) -> Option<(u16, u16)> {
    let l4 = 14 + usize::from(frame.get(14)? & 0x0f) * 4;
    (frame.get(23) == Some(&TCP) && frame.len() >= l4 + 4).then(|| {
        (
            u16::from_be_bytes([frame[l4], frame[l4 + 1]]),
            u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]),
        )
    })
}

/// A fragmented UDP datagram to a published port reaches the container whole, with a right
/// checksum (its UDP layer takes it: `InDatagrams`, or `NoPorts` with nothing listening).
fn fragments_to_published_port(dp: Dp) {
    let p = published(dp);
    let env = &p.w.env;
    let udp_in = || snmp(&p.p1.ns, "Udp", "InDatagrams") + snmp(&p.p1.ns, "Udp", "NoPorts");
    let (before, csum_errors) = (udp_in(), snmp(&p.p1.ns, "Udp", "InCsumErrors"));
    let header = Ipv4::new(OUTSIDE_ADDR, HOST_ADDR, UDP);
    let datagram = rawsock::udp(&header, 4000, 8081, &marked(&marker(), 2000));
    rawsock::send_ipv4(env, &env.outside_ns(), &header.fragments(&datagram, 1000));
    thread::sleep(Duration::from_millis(400));
    assert_eq!(
        udp_in(),
        before + 1,
        "{dp:?}: the datagram didn't arrive whole"
    );
    assert_eq!(
        snmp(&p.p1.ns, "Udp", "InCsumErrors"),
        csum_errors,
        "{dp:?}: bad checksum after translation"
    );
}

/// A SYN to a published port from `src`, a source that can't be outside, reaches nothing
/// (the eBPF datapath counts it `martian`); the control, the same SYN from the outside's own
/// address, reaches the container.
fn martian_to_published_port(p: &Published, src: Ipv4Addr, iptables: Expect) {
    let dp = p.w.dp;
    let expect = match dp {
        Dp::Ebpf => Expect::Refused(Reason::Stat("martian")),
        Dp::Iptables => iptables,
    };
    p.w.check(&p.p1, &p.p1, expect, |_, mark, attack| {
        let from = if attack { src } else { OUTSIDE_ADDR };
        let header = Ipv4::new(from, HOST_ADDR, TCP);
        let syn = header.packet(&rawsock::syn(&header, 40002, 8080, mark));
        rawsock::send_ipv4(&p.w.env, &p.w.env.outside_ns(), &[syn]);
    });
}

/// From the host's own address: the stack drops it on the iptables datapath too.
fn host_source_to_published_port(dp: Dp) {
    let p = published(dp);
    let iptables = Expect::Refused(Reason::Stack("martian source"));
    martian_to_published_port(&p, HOST_ADDR, iptables);
}

/// From a container's address: the reply would go to that container. Docker's rules don't
/// drop it (only a strict rp_filter would, and the sandbox's is off, as on most hosts); the
/// iptables datapath drops the subnet's source from anywhere but its bridge.
fn container_source_to_published_port(dp: Dp) {
    let p = published(dp);
    let a2 = p.a2.ip;
    martian_to_published_port(&p, a2, Expect::Refused(p.a_source_from_elsewhere()));
}

/// To 127.0.0.1 at the uplink's MAC, on a port published on every address: the stack drops
/// a loopback destination from outside as a martian, and no DNAT may take it first (the
/// iptables datapath's PREROUTING jump leaves loopback to the userland proxy).
fn loopback_destination_to_published_port(dp: Dp) {
    let p = published(dp);
    p.martian_destination(Ipv4Addr::LOCALHOST, 8080, false);
}

/// To 127.0.0.1 on a port published on 127.0.0.1 itself, for the host's own clients alone:
/// as above (Docker 20.10's DNAT took it: moby#45610, CVE-2020-8558's kind).
fn loopback_destination_to_port_published_on_loopback(dp: Dp) {
    let p = published(dp);
    p.publish_p1_on_loopback(8083);
    p.martian_destination(Ipv4Addr::LOCALHOST, 8083, false);
}

/// To 0.0.0.0, the address a port published on every address is kept under: as above.
fn unspecified_destination_to_published_port(dp: Dp) {
    let p = published(dp);
    p.martian_destination(Ipv4Addr::UNSPECIFIED, 8080, false);
}

/// From `a2` through its gateway to 127.0.0.1 on a port published on 127.0.0.1 for `p1`: the
/// stack drops a loopback destination from the bridge as a martian, and no hairpin DNAT may
/// take it first.
fn container_to_port_published_on_loopback(dp: Dp) {
    let p = published(dp);
    p.publish_p1_on_loopback(8083);
    p.martian_destination(Ipv4Addr::LOCALHOST, 8083, true);
}

impl Published {
    /// Publishes `p1`'s port 80 on 127.0.0.1:`port` too.
    fn publish_p1_on_loopback(&self, port: u16) {
        let name = self.p1.ns.file_name().unwrap().to_str().unwrap();
        let spec = format!("127.0.0.1:{port}:80");
        self.w.env.netd_ok(&["publish", name, "-p", &spec]);
    }

    /// A SYN to `dst:port`, from outside at the uplink's MAC or (`from_a2`) from `a2` at its
    /// gateway's, must not reach `p1`: the stack drops the destination as a martian. The
    /// control goes the same way to the host's address on 8080 (`--icc` is on: hairpin).
    fn martian_destination(&self, dst: Ipv4Addr, port: u16, from_a2: bool) {
        let expect = Expect::Refused(Reason::Stack("martian destination"));
        let outside = self.w.outside();
        let (from, link, macs) = if from_a2 {
            let gateway = self.w.host_mac(&self.a.bridge);
            (&self.a2, "eth0", (gateway, self.a2.mac))
        } else {
            (
                &outside,
                OUTSIDE_LINK,
                (self.w.host_mac(UPLINK), outside.mac),
            )
        };
        self.w.check(&self.p1, &self.p1, expect, |_, mark, attack| {
            // Client ports of their own: a reply tuple the attack took must not be what
            // refuses the control.
            let (dst, sport, port) = if attack {
                (dst, 40003, port)
            } else {
                (HOST_ADDR, 40004, 8080)
            };
            let header = Ipv4::new(from.ip, dst, TCP);
            let syn = header.packet(&rawsock::syn(&header, sport, port, mark));
            let frame = rawsock::ether(macs.0, macs.1, None, ETHERTYPE_IPV4, &syn);
            rawsock::send_frames(&self.w.env, &from.ns, link, &[frame]);
        });
    }
}

/// A client reconnecting from the port of a connection it reset reaches a published port only
/// while the port is published (netfilter kills a closed entry a SYN reopens, so Docker's rules
/// see a new connection; the eBPF datapath used to take it where the closed flow went).
/// Refused: the host answers (nothing listens on its 8080) and `p1` accepts nothing. The
/// control: published again, the same reconnection gets through.
fn reconnect_after_unpublish(dp: Dp) {
    let p = published(dp);
    let env = &p.w.env;
    let name = p.p1.ns.file_name().unwrap().to_str().unwrap();
    let (client, server) = ((OUTSIDE_ADDR, 40123).into(), (HOST_ADDR, 8080).into());
    let reconnect = || {
        env.in_ns(&env.outside_ns(), || {
            try_bound_connect(client, server).map(reset)
        })
    };
    reconnect().unwrap_or_else(|e| panic!("{dp:?}: published, the first connection: {e}"));
    env.netd_ok(&["unpublish", name, "8080:80"]);
    let accepted = snmp(&p.p1.ns, "Tcp", "PassiveOpens");
    assert_eq!(
        reconnect(),
        Err(Errno::ECONNREFUSED),
        "{dp:?}: unpublished, the reconnection got through"
    );
    assert_eq!(
        snmp(&p.p1.ns, "Tcp", "PassiveOpens"),
        accepted,
        "{dp:?}: p1 accepted the reconnection"
    );
    env.netd_ok(&["publish", name, "-p", "8080:80"]);
    reconnect().unwrap_or_else(|e| panic!("{dp:?}: published again, the reconnection: {e}"));
}

/// A UDP datagram carrying `mark` from `from`'s namespace to `dst:port`.
fn send_udp(env: &TestEnv, from: &Receiver, dst: Ipv4Addr, port: u16, mark: &[u8]) {
    env.in_ns(&from.ns, || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.send_to(mark, (dst, port)).unwrap();
    });
}

/// The ICMP errors among `frames` (a tap's, on `to`'s eth0) addressed to `to` and quoting a
/// packet from `to` to `quoted_dst`: what `to` sent, translated back.
fn icmp_errors_back(frames: &[Vec<u8>], to: Ipv4Addr, quoted_dst: Ipv4Addr) -> usize {
    frames
        .iter()
        .filter(|f| {
            let inner = 14 + 20 + 8;
            f.len() >= inner + 20
                && f[23] == ICMP
                && f[34] == 3
                && rawsock::ipv4_destination(f) == Some(to)
                && f[inner + 12..inner + 16] == to.octets()
                && f[inner + 16..inner + 20] == quoted_dst.octets()
        })
        .count()
}

/// A port unreachable about a masqueraded flow (the outside has nothing on the port) comes
/// back to the container translated: to its address, quoting what it sent.
fn icmp_error_of_a_masqueraded_flow(dp: Dp) {
    let p = published(dp);
    let tap = Tap::open(&p.w.env, &p.a2.ns, "eth0");
    let mark = marker();
    send_udp(&p.w.env, &p.a2, OUTSIDE_ADDR, 9, &mark);
    let frames = tap.received(&mark, |_| true);
    assert_eq!(
        icmp_errors_back(&frames, p.a2.ip, OUTSIDE_ADDR),
        1,
        "{dp:?}: {frames:02x?}"
    );
}

/// A port unreachable from a published port's container (nothing listens on 81/udp) to a
/// neighbour that reached it through the host's address comes back translated (hairpin): to
/// the neighbour, quoting what it sent to the host's address.
fn icmp_error_of_a_hairpin_flow(dp: Dp) {
    let p = published(dp);
    let env = &p.w.env;
    let no_port = || snmp(&p.p1.ns, "Udp", "NoPorts");
    let (tap, refused) = (Tap::open(env, &p.a2.ns, "eth0"), no_port());
    let mark = marker();
    send_udp(env, &p.a2, HOST_ADDR, 8081, &mark);
    let frames = tap.received(&mark, |_| true);
    assert_eq!(
        no_port(),
        refused + 1,
        "{dp:?}: the datagram didn't reach p1"
    );
    assert_eq!(
        icmp_errors_back(&frames, p.a2.ip, HOST_ADDR),
        1,
        "{dp:?}: {frames:02x?}"
    );
}

/// What a masquerading network's container sends out of another interface than the uplink
/// (here to the neighbour on the host's second NIC) is masqueraded to that interface's address,
/// as Docker's `! -o BRIDGE` MASQUERADE does, and the neighbour's reply comes back into the
/// container; nothing arrives with the container's private source. The control: the same
/// datagram to the outside through the uplink arrives masqueraded to the uplink's address.
fn out_through_second_nic_never_leaves_private(dp: Dp) {
    let p = published(dp);
    let env = &p.w.env;
    let lan = p.w.second_nic();
    let sources_at = |ns: &Path, link: &str, dst: Ipv4Addr| {
        let tap = Tap::open(env, ns, link);
        let mark = marker();
        send_udp(env, &p.a2, dst, 5000, &mark);
        let frames = tap.received(&[], |_| true);
        let sources = |f: &Vec<u8>| rawsock::ipv4_source(f);
        let private = frames.iter().filter(|f| sources(f) == Some(p.a2.ip));
        assert_eq!(private.count(), 0, "{dp:?}: left with {}", p.a2.ip);
        frames
            .iter()
            .filter(|f| f.windows(mark.len()).any(|w| w == mark))
            .map(sources)
            .collect::<Vec<_>>()
    };
    let outside = sources_at(&env.outside_ns(), OUTSIDE_LINK, OUTSIDE_ADDR);
    assert_eq!(outside, [Some(HOST_ADDR)], "{dp:?}: the control");
    let unmasqueraded = p.w.stat_if(dp, "unmasqueraded");
    let lan_sources = sources_at(&lan, "lan0", LAN_ADDR);
    assert_eq!(lan_sources, [Some(NIC1_ADDR)], "{dp:?}");
    assert_eq!(p.w.stat_if(dp, "unmasqueraded"), unmasqueraded, "{dp:?}");
    // The neighbour answers the address and port it saw; the answer reaches the container.
    let neighbour = env.in_ns(&lan, || UdpSocket::bind((LAN_ADDR, 5001)).unwrap());
    let container = env.in_ns(&p.a2.ns, || UdpSocket::bind(("0.0.0.0", 0)).unwrap());
    for socket in [&neighbour, &container] {
        socket.set_read_timeout(Some(SOCKET_TIMEOUT)).unwrap();
    }
    container.send_to(b"question", (LAN_ADDR, 5001)).unwrap();
    let mut buf = [0u8; 64];
    let (len, seen) =
        retry_interrupted(|| neighbour.recv_from(&mut buf)).expect("the neighbour got nothing");
    assert_eq!(
        (&buf[..len], seen.ip()),
        (&b"question"[..], NIC1_ADDR.into())
    );
    neighbour.send_to(b"answer", seen).unwrap();
    let (len, from) =
        retry_interrupted(|| container.recv_from(&mut buf)).expect("no answer came back");
    assert_eq!(
        (&buf[..len], from),
        (&b"answer"[..], (LAN_ADDR, 5001).into())
    );
}

/// TCP through the second NIC: a container's connection to the neighbour there is masqueraded
/// to the NIC's address and carries data both ways; the neighbour reaches a published port on
/// the NIC's address; but a connection the neighbour opens straight to a container (it routes
/// the container subnet through the host) is dropped, as through the uplink.
fn tcp_through_second_nic(dp: Dp) {
    let p = published(dp);
    let env = &p.w.env;
    let lan = p.w.second_nic();
    p.w.ip(
        &lan,
        &[
            "route",
            "add",
            "10.73.0.0/24",
            "via",
            &NIC1_ADDR.to_string(),
        ],
    );
    let listener = env.in_ns(&lan, || TcpListener::bind((LAN_ADDR, 5002)).unwrap());
    let mut client = env.in_ns(&p.a2.ns, || {
        TcpStream::connect_timeout(&(LAN_ADDR, 5002).into(), SOCKET_TIMEOUT)
            .expect("connect to the neighbour")
    });
    let (mut server, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), NIC1_ADDR, "{dp:?}: the neighbour saw");
    for conn in [&client, &server] {
        conn.set_read_timeout(Some(SOCKET_TIMEOUT)).unwrap();
    }
    let mut buf = [0u8; 5];
    client.write_all(b"hello").unwrap();
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    server.write_all(b"world").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");
    // The positive control of the refusal below: p1 through its published port.
    let connect_from_lan = |to: Ipv4Addr, port: u16| {
        env.in_ns(&lan, || {
            TcpStream::connect_timeout(&(to, port).into(), Duration::from_secs(2))
        })
    };
    assert!(
        connect_from_lan(NIC1_ADDR, 8080).is_ok(),
        "{dp:?}: the published port through the second NIC"
    );
    // Dropped, not refused by a2 (a reset): it never got there.
    let _listening = env.in_ns(&p.a2.ns, || TcpListener::bind(("0.0.0.0", 7000)).unwrap());
    let unsolicited = p.w.stat_if(dp, "unsolicited");
    let straight = connect_from_lan(p.a2.ip, 7000).map(drop);
    assert_eq!(
        straight.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::TimedOut),
        "{dp:?}: the neighbour reached a2 straight"
    );
    if dp == Dp::Ebpf {
        assert!(p.w.stat("unsolicited") > unsolicited, "{dp:?}: not counted");
    }
}

/// From the neighbour on a second NIC that netd has no programs on (made after the networks,
/// with no `netd reload`), a datagram to the outside with `a2`'s source: masqueraded, it would
/// start a flow in `a2`'s name whose answers reach `a2`. The eBPF datapath drops it on the
/// uplink (`martian`: it came into the host elsewhere than through `a2`'s veth or bridge), the
/// iptables one by its subnet's source from elsewhere than its bridge (Docker's MASQUERADE,
/// `-s SUBNET ! -o BRIDGE`, takes it from any way in). The control: the neighbour's datagram
/// from its own address goes out.
fn container_source_through_an_unprogrammed_nic(dp: Dp) {
    let p = published(dp);
    let lan = topology::second_nic(&p.w.env);
    p.w.ip(
        &lan,
        &["route", "add", "default", "via", &NIC1_ADDR.to_string()],
    );
    let reason = match dp {
        Dp::Ebpf => Reason::Stat("martian"),
        Dp::Iptables => p.a_source_from_elsewhere(),
    };
    let outside = p.w.outside();
    p.w.check(
        &outside,
        &outside,
        Expect::Refused(reason),
        |_, mark, attack| {
            let src = if attack { p.a2.ip } else { LAN_ADDR };
            let header = Ipv4::new(src, OUTSIDE_ADDR, UDP);
            let packet = header.packet(&rawsock::udp(&header, 4000, 5000, mark));
            rawsock::send_ipv4(&p.w.env, &lan, &[packet]);
        },
    );
}

/// How long a socket of these tests waits for its peer.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

/// `ping ARGS` from a container to the outside works, and nothing reaches the outside with the
/// container's private source (every packet, fragments and options included, masqueraded).
fn masqueraded_ping(dp: Dp, args: &[&str]) {
    let p = published(dp);
    let env = &p.w.env;
    let tap = Tap::open(env, &env.outside_ns(), OUTSIDE_LINK);
    let mut all = vec!["-c", "1", "-W", "2"];
    all.extend_from_slice(args);
    let outside = OUTSIDE_ADDR.to_string();
    all.push(&outside);
    let ping = env.run_in(&p.a2.ns, "ping", &all);
    assert!(ping.status.success(), "{dp:?}: ping {all:?}: {ping:?}");
    let private = tap.received(&[], |f| rawsock::ipv4_source(f) == Some(p.a2.ip));
    assert!(
        private.is_empty(),
        "{dp:?}: {} packets left with {}",
        private.len(),
        p.a2.ip
    );
}

/// `ping -s 3000`: fragments out and back.
fn fragmented_ping_out_is_masqueraded(dp: Dp) {
    masqueraded_ping(dp, &["-s", "3000"]);
}

/// `ping -R`: record-route out and back.
fn record_route_ping_out_is_masqueraded(dp: Dp) {
    masqueraded_ping(dp, &["-R"]);
}

// ---------------------------------------------------------------------------------------------
// Matrix.

macro_rules! matrix {
    (inbound: $($in:ident),* ; outbound: $($out:ident),* ; published: $($pub:ident),* $(,)?) => {
        matrix!(@mod ebpf, Dp::Ebpf; $($in),*; $($out),*; $($pub),*);
        matrix!(@mod iptables, Dp::Iptables; $($in),*; $($out),*; $($pub),*);
    };
    (@mod $m:ident, $dp:expr; $($in:ident),*; $($out:ident),*; $($pub:ident),*) => {
        mod $m {
            use super::*;
            mod to_masqueraded {
                use super::*;
                $( #[test] fn $in() { super::super::$in($dp, false) } )*
            }
            mod to_internal {
                use super::*;
                $( #[test] fn $in() { super::super::$in($dp, true) } )*
            }
            mod from_container {
                use super::*;
                $( #[test] fn $out() { super::super::$out($dp) } )*
            }
            mod published {
                use super::*;
                $( #[test] fn $pub() { super::super::$pub($dp) } )*
            }
        }
    };
}

matrix! {
    inbound:
        record_route,
        timestamp_option,
        tcp_syn_with_options,
        fragmented_echo,
        first_fragment,
        later_fragment,
        icmp_timestamp_request,
        icmp_error_matching_no_flow,
        sctp,
        gre,
        esp,
        vlan_tagged,
        priority_tagged,
        ipv6,
        ipv6_priority_tagged,
        via_second_nic;
    outbound:
        spoofed_source,
        spoofed_mac,
        arp_spoofing,
        vlan_tagged_spoofed_source,
        ipv6_not_link_local,
        priority_tagged_without_icc,
        two_tags_without_icc,
        ipv6_without_icc,
        priority_tagged_to_other_network,
        priority_tagged_from_internal,
        fragments_to_other_network,
        later_fragment_to_other_network,
        options_to_other_network,
        fragments_from_internal,
        options_from_internal,
        fragmented_ping_out_is_masqueraded,
        record_route_ping_out_is_masqueraded;
    published:
        hairpin_from_internal,
        hairpin_without_icc,
        syn_with_options_to_published_port,
        fragments_to_published_port,
        host_source_to_published_port,
        container_source_to_published_port,
        loopback_destination_to_published_port,
        loopback_destination_to_port_published_on_loopback,
        unspecified_destination_to_published_port,
        container_to_port_published_on_loopback,
        icmp_error_of_a_masqueraded_flow,
        icmp_error_of_a_hairpin_flow,
        out_through_second_nic_never_leaves_private,
        tcp_through_second_nic,
        container_source_through_an_unprogrammed_nic,
        reconnect_after_unpublish,
}
