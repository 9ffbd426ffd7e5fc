//! The isolation matrix (issue #12): every case of "what must hold", on both datapaths, with
//! real packets crafted and sent from the outside, a second NIC's neighbour and containers, and
//! counted where they would arrive (a tap on the receiver's interface, or its kernel counters).
//!
//! Every refusal is paired with a positive control (the same packet, minus what makes it an
//! attack, reaches its receiver through the same path) and names the specific reason: a
//! `netd stats` counter on the eBPF datapath, the packet counter of the Docker rule that drops
//! it on the iptables one. Where Docker 20.10's rules don't drop a case (anti-spoofing, ARP,
//! IPv6: Docker has no such rules), the iptables datapath must do exactly what Docker does,
//! and its test says so.
//!
//! One test per case per datapath: `matrix!` makes a `mod ebpf` and a `mod iptables` test of
//! each case function.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use tests::{
    counters,
    harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv, UPLINK},
    rawsock::{
        self, ESP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, GRE, ICMP, Ipv4, SCTP, TCP, Tap, UDP, marked,
        marker,
    },
};

const OUTSIDE_LINK: &str = "out0";

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
    /// iptables: held by conntrack's defragmentation for a first fragment that never comes
    /// (the host's `Ip: ReasmReqds`), so never forwarded.
    HeldForReassembly,
    /// Neither datapath: the host has no VLAN device for the tag, its stack drops the frame.
    NoVlanDevice,
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
            mac: netd::ipam::mac_for(ip),
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
            Reason::HeldForReassembly => {
                counters::snmp(&self.env, &self.env.host_ns(), "Ip", "ReasmReqds")
            }
            Reason::NoVlanDevice => 0,
        }
    }

    /// `netd stats`' counter of `reason` on the eBPF datapath (0 on the iptables one).
    fn stat_if(&self, dp: Dp, reason: &str) -> u64 {
        if dp == Dp::Ebpf { self.stat(reason) } else { 0 }
    }

    fn stat(&self, reason: &str) -> u64 {
        counters::netd_stat(&self.env, reason)
    }

    /// Sends with `send(to, marker)` to `control` and then to `victim`: the control must
    /// receive it, and then the victim must get what `expect` says.
    fn check(
        &self,
        victim: &Receiver,
        control: &Receiver,
        expect: Expect,
        send: impl Fn(&Receiver, &[u8]),
    ) {
        let dp = self.dp;
        let received = |to: &Receiver| {
            let tap = Tap::open(&self.env, &to.ns, to.ifname);
            let mark = marker();
            send(to, &mark);
            tap.count(&mark)
        };
        assert!(
            received(control) > 0,
            "{dp:?}: the control didn't reach {}",
            control.ip
        );
        match expect {
            Expect::Refused(reason) => {
                let before = self.counted(&reason);
                assert_eq!(received(victim), 0, "{dp:?}: reached {}", victim.ip);
                if !matches!(reason, Reason::NoVlanDevice) {
                    assert!(
                        self.counted(&reason) > before,
                        "{dp:?}: not counted as {reason:?}"
                    );
                }
            }
            Expect::DeliveredAsDocker => assert!(
                received(victim) > 0,
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

// ---------------------------------------------------------------------------------------------
// Inbound: from a neighbour that routes the container subnets through the host.

/// A victim container (on a masquerading or an `--internal` network) and a control one on a
/// routed network (`--masquerade=false`: new flows from outside allowed, on both datapaths),
/// both routed through the host from the outside.
struct Inbound {
    w: World,
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
        victim,
        control,
        reason,
    }
}

impl Inbound {
    /// IPv4 packets from the outside, made by `craft(header, marker)` for each destination.
    fn refuses_ipv4(self, proto: u8, craft: impl Fn(&Ipv4, &[u8]) -> Vec<Vec<u8>>) {
        self.refuses_ipv4_with(proto, vec![], craft);
    }

    fn refuses_ipv4_with(
        self,
        proto: u8,
        options: Vec<u8>,
        craft: impl Fn(&Ipv4, &[u8]) -> Vec<Vec<u8>>,
    ) {
        let reason = self.reason.clone();
        self.refuses(reason, |w, to, mark| {
            let header = Ipv4::new(OUTSIDE_ADDR, to.ip, proto).with_options(options.clone());
            rawsock::send_ipv4(&w.env, &w.env.outside_ns(), &craft(&header, mark));
        });
    }

    fn refuses(&self, reason: Reason, send: impl Fn(&World, &Receiver, &[u8])) {
        self.w.check(
            &self.victim,
            &self.control,
            Expect::Refused(reason),
            |to, mark| send(&self.w, to, mark),
        );
    }

    /// Frames from the outside to the host's uplink, tagged with `vlan`.
    fn refuses_tagged(self, vlan: u16, reason: Reason) {
        let (up, out) = (self.w.host_mac(UPLINK), self.w.outside().mac);
        self.refuses(reason, |w, to, mark| {
            let header = Ipv4::new(OUTSIDE_ADDR, to.ip, UDP);
            let packet = header.packet(&rawsock::udp(&header, 4000, 5000, mark));
            let tag = (to.ip != self.control.ip || vlan == 0).then_some(vlan);
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
    inbound(dp, internal).refuses_ipv4_with(ICMP, rawsock::record_route(), |h, m| {
        one(h.packet(&rawsock::echo_request(m)))
    });
}

/// An echo request with a timestamp option, as `ping -T tsonly` sends it.
fn timestamp_option(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4_with(ICMP, rawsock::timestamp(), |h, m| {
        one(h.packet(&rawsock::echo_request(m)))
    });
}

/// A TCP connect (SYN) with IP options.
fn tcp_syn_with_options(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4_with(TCP, rawsock::record_route(), |h, m| {
        one(h.packet(&rawsock::syn(h, 40000, 80, m)))
    });
}

/// `ping -s 3000`: an echo request in three fragments.
fn fragmented_echo(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4(ICMP, |h, m| {
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
fn lone_fragment(dp: Dp, internal: bool, n: usize) {
    let mut world = inbound(dp, internal);
    if dp == Dp::Iptables {
        world.reason = Reason::HeldForReassembly;
    }
    let control = world.control.ip;
    world.refuses_ipv4(UDP, |h, m| {
        let frags = udp_fragments(h, m);
        if h.dst == control {
            frags
        } else {
            one(frags[n].clone())
        }
    });
}

/// Only the first fragment (its header, its ports).
fn first_fragment(dp: Dp, internal: bool) {
    lone_fragment(dp, internal, 0);
}

/// Only a later fragment (no ports to check).
fn later_fragment(dp: Dp, internal: bool) {
    lone_fragment(dp, internal, 1);
}

/// An ICMP timestamp request (type 13): ICMP other than echo.
fn icmp_timestamp_request(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4(ICMP, |h, m| {
        let mut body = vec![0; 12];
        body.extend_from_slice(m);
        one(h.packet(&rawsock::icmp(13, 0, [0x12, 0x34, 0, 1], &body)))
    });
}

/// A port unreachable quoting a UDP datagram the container never sent (no flow matches).
fn icmp_error_matching_no_flow(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4(ICMP, |h, m| {
        let quoted_header = Ipv4::new(h.dst, OUTSIDE_ADDR, UDP);
        let quoted = quoted_header.packet(&rawsock::udp(&quoted_header, 5353, 53, m));
        one(h.packet(&rawsock::icmp(3, 3, [0; 4], &quoted)))
    });
}

/// SCTP (132): a common header (ports, tag, checksum unchecked on the way) and a marked chunk.
fn sctp(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4(SCTP, |h, m| {
        let mut msg = vec![0x0f, 0xa0, 0x13, 0x88, 0, 0, 0, 0, 0, 0, 0, 0];
        msg.extend_from_slice(m);
        one(h.packet(&msg))
    });
}

/// GRE (47) carrying a marked payload.
fn gre(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4(GRE, |h, m| {
        let mut msg = vec![0, 0, 0x08, 0x00];
        msg.extend_from_slice(m);
        one(h.packet(&msg))
    });
}

/// ESP (50): an SPI, a sequence number and marked "ciphertext".
fn esp(dp: Dp, internal: bool) {
    inbound(dp, internal).refuses_ipv4(ESP, |h, m| {
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
        Dp::Iptables => Reason::NoVlanDevice,
    };
    world.refuses_tagged(5, reason);
}

/// A priority-tagged frame (VLAN 0): the stack takes it as untagged and routes it.
fn priority_tagged(dp: Dp, internal: bool) {
    let world = inbound(dp, internal);
    let reason = world.reason.clone();
    world.refuses_tagged(0, reason);
}

/// Traffic routed in through a second NIC of the host (not the uplink), from a neighbour on
/// that NIC's link that routes the container subnets through the host.
fn via_second_nic(dp: Dp, internal: bool) {
    let world = inbound(dp, internal);
    let env = &world.w.env;
    let lan = netd::netns::create(&env.name("lan")).unwrap();
    let host = env.host_ns();
    world.w.ip(
        &host,
        &[
            "link", "add", "nic1", "type", "veth", "peer", "name", "lan0",
        ],
    );
    world.w.ip(
        &host,
        &["link", "set", "lan0", "netns", lan.to_str().unwrap()],
    );
    world
        .w
        .ip(&host, &["addr", "add", "198.19.1.2/24", "dev", "nic1"]);
    world.w.ip(&host, &["link", "set", "nic1", "up"]);
    world
        .w
        .ip(&lan, &["addr", "add", "198.19.1.1/24", "dev", "lan0"]);
    world.w.ip(&lan, &["link", "set", "lan0", "up"]);
    for subnet in [VICTIM_SUBNET, ROUTED_SUBNET] {
        world
            .w
            .ip(&lan, &["route", "add", subnet, "via", "198.19.1.2"]);
    }
    let reason = world.reason.clone();
    world.refuses(reason, |w, to, mark| {
        let header = Ipv4::new(Ipv4Addr::new(198, 19, 1, 1), to.ip, UDP);
        let packet = header.packet(&rawsock::udp(&header, 4000, 5000, mark));
        rawsock::send_ipv4(&w.env, &lan, &[packet]);
    });
}

// ---------------------------------------------------------------------------------------------
// From a container.

/// Network `a` (10.73.0.0/24: `a1`, `a2`), another network `b` (`b1`) and an `--internal`
/// one `i` (`i1`), each masquerading but `i`.
struct Outbound {
    w: World,
    a: Net,
    b: Net,
    i: Net,
    a1: Receiver,
    a2: Receiver,
    b1: Receiver,
    i1: Receiver,
}

fn outbound(dp: Dp) -> Outbound {
    let w = World::new(dp);
    let a = w.network("a", "10.73.0.0/24", &[]);
    let b = w.network("b", "10.74.0.0/24", &[]);
    let i = w.network("i", "10.75.0.0/24", &["--internal"]);
    let a1 = w.container("a1", "a", &[]);
    let a2 = w.container("a2", "a", &[]);
    let b1 = w.container("b1", "b", &[]);
    let i1 = w.container("i1", "i", &[]);
    Outbound {
        w,
        a,
        b,
        i,
        a1,
        a2,
        b1,
        i1,
    }
}

impl Outbound {
    /// A UDP frame from `from` (IPv4 source `src`, source MAC `mac`) to `to`'s address,
    /// addressed at L2 to `l2_dst`, tagged with `vlan`, sent out of `from`'s eth0.
    #[allow(clippy::too_many_arguments)]
    fn udp_frame(
        &self,
        from: &Receiver,
        src: Ipv4Addr,
        mac: [u8; 6],
        l2_dst: [u8; 6],
        vlan: Option<u16>,
        to: &Receiver,
        mark: &[u8],
    ) {
        let header = Ipv4::new(src, to.ip, UDP);
        let packet = header.packet(&rawsock::udp(&header, 4000, 5000, mark));
        let frame = rawsock::ether(l2_dst, mac, vlan, ETHERTYPE_IPV4, &packet);
        rawsock::send_frames(&self.w.env, &from.ns, "eth0", &[frame]);
    }

    fn gateway_mac(&self, net: &Net) -> [u8; 6] {
        self.w.host_mac(&net.bridge)
    }

    /// `i1` reaches nothing outside its network: it may still route a packet at its gateway.
    fn internal_default_route(&self) {
        self.w.ip(
            &self.i1.ns,
            &[
                "route",
                "replace",
                "default",
                "via",
                &self.i.gateway.to_string(),
            ],
        );
    }
}

/// A spoofed IPv4 source (an unused address of the network) to a container of the same
/// network (ICC on): the control is the same frame with the sender's own address.
fn spoofed_source(dp: Dp) {
    let o = outbound(dp);
    let spoofed = Ipv4Addr::new(10, 73, 0, 200);
    let expect = match dp {
        Dp::Ebpf => Expect::Refused(Reason::Stat("spoofed_addr")),
        Dp::Iptables => Expect::DeliveredAsDocker,
    };
    // The victim and the control are the same container: only the source differs.
    let sent_to_control = std::cell::Cell::new(false);
    o.w.check(&o.a2, &o.a2, expect, |to, mark| {
        let src = if sent_to_control.replace(true) {
            spoofed
        } else {
            o.a1.ip
        };
        o.udp_frame(&o.a1, src, o.a1.mac, to.mac, None, to, mark);
    });
}

/// A forged source MAC to a container of the same network; the control uses the sender's own.
fn spoofed_mac(dp: Dp) {
    let o = outbound(dp);
    let expect = match dp {
        Dp::Ebpf => Expect::Refused(Reason::Stat("spoofed_mac")),
        Dp::Iptables => Expect::DeliveredAsDocker,
    };
    let sent_to_control = std::cell::Cell::new(false);
    o.w.check(&o.a2, &o.a2, expect, |to, mark| {
        let mac = if sent_to_control.replace(true) {
            [0x02, 0x42, 10, 73, 0, 0x99]
        } else {
            o.a1.mac
        };
        o.udp_frame(&o.a1, o.a1.ip, mac, to.mac, None, to, mark);
    });
}

/// A VLAN-tagged (5) frame with a spoofed source to a container of the same network; the
/// control is the same frame untagged with the sender's own source.
fn vlan_tagged_spoofed_source(dp: Dp) {
    let o = outbound(dp);
    let spoofed = Ipv4Addr::new(10, 73, 0, 200);
    let expect = match dp {
        Dp::Ebpf => Expect::Refused(Reason::Stat("spoofed_addr")),
        Dp::Iptables => Expect::DeliveredAsDocker,
    };
    let sent_to_control = std::cell::Cell::new(false);
    o.w.check(&o.a2, &o.a2, expect, |to, mark| {
        let (src, vlan) = if sent_to_control.replace(true) {
            (spoofed, Some(5))
        } else {
            (o.a1.ip, None)
        };
        o.udp_frame(&o.a1, src, o.a1.mac, to.mac, vlan, to, mark);
    });
}

/// A priority-tagged frame to another network's container, through the gateway; the control
/// is the same frame to the outside.
fn priority_tagged_to_other_network(dp: Dp) {
    let o = outbound(dp);
    let expect = Expect::Refused(match dp {
        Dp::Ebpf => Reason::Stat("other_network"),
        Dp::Iptables => rule("NETD-ISOLATION-STAGE-2", "*", &o.b.bridge),
    });
    let gw = o.gateway_mac(&o.a);
    o.w.check(&o.b1, &o.w.outside(), expect, |to, mark| {
        o.udp_frame(&o.a1, o.a1.ip, o.a1.mac, gw, Some(0), to, mark);
    });
}

/// A priority-tagged frame from an `--internal` container to the outside; the control is the
/// same frame from a container of a network that isn't internal.
fn priority_tagged_from_internal(dp: Dp) {
    let o = outbound(dp);
    let expect = Expect::Refused(match dp {
        Dp::Ebpf => Reason::Stat("internal"),
        Dp::Iptables => rule("NETD-ISOLATION-STAGE-1", &o.i.bridge, "*"),
    });
    let outside = o.w.outside();
    let (gw_a, gw_i) = (o.gateway_mac(&o.a), o.gateway_mac(&o.i));
    let sent_to_control = std::cell::Cell::new(false);
    o.w.check(&outside, &outside, expect, |to, mark| {
        if sent_to_control.replace(true) {
            o.udp_frame(&o.i1, o.i1.ip, o.i1.mac, gw_i, Some(0), to, mark);
        } else {
            o.udp_frame(&o.a1, o.a1.ip, o.a1.mac, gw_a, Some(0), to, mark);
        }
    });
}

/// IPv6 with global (not link-local) addresses to a container of the same network; the
/// control is the same packet between link-local addresses.
fn ipv6_not_link_local(dp: Dp) {
    let o = outbound(dp);
    let expect = match dp {
        Dp::Ebpf => Expect::Refused(Reason::Stat("not_ipv4")),
        Dp::Iptables => Expect::DeliveredAsDocker,
    };
    let sent_to_control = std::cell::Cell::new(false);
    o.w.check(&o.a2, &o.a2, expect, |to, mark| {
        let prefix: u16 = if sent_to_control.replace(true) {
            0xfd00
        } else {
            0xfe80
        };
        let packet = rawsock::ipv6(
            Ipv6Addr::new(prefix, 0, 0, 0, 0, 0, 0, 2),
            Ipv6Addr::new(prefix, 0, 0, 0, 0, 0, 0, 3),
            mark,
        );
        let frame = rawsock::ether(to.mac, o.a1.mac, None, ETHERTYPE_IPV6, &packet);
        rawsock::send_frames(&o.w.env, &o.a1.ns, "eth0", &[frame]);
    });
}

/// IPv4 packets crafted by `craft` from `from` (routed by its own stack), to `victim` and
/// `control`.
fn from_container(
    o: &Outbound,
    from: &Receiver,
    victim: &Receiver,
    control: &Receiver,
    expect: Expect,
    proto: u8,
    craft: impl Fn(&Ipv4, &[u8]) -> Vec<Vec<u8>>,
) {
    o.w.check(victim, control, expect, |to, mark| {
        let header = Ipv4::new(from.ip, to.ip, proto);
        rawsock::send_ipv4(&o.w.env, &from.ns, &craft(&header, mark));
    });
}

fn to_other_network(o: &Outbound, dp: Dp) -> Expect {
    Expect::Refused(match dp {
        Dp::Ebpf => Reason::Stat("other_network"),
        Dp::Iptables => rule("NETD-ISOLATION-STAGE-2", "*", &o.b.bridge),
    })
}

fn from_internal(o: &Outbound, dp: Dp) -> Expect {
    Expect::Refused(match dp {
        Dp::Ebpf => Reason::Stat("internal"),
        Dp::Iptables => rule("NETD-ISOLATION-STAGE-1", &o.i.bridge, "*"),
    })
}

/// A fragmented datagram to another network's container; the control goes to the sender's
/// own network.
fn fragments_to_other_network(dp: Dp) {
    let o = outbound(dp);
    let expect = to_other_network(&o, dp);
    from_container(&o, &o.a1, &o.b1, &o.a2, expect, UDP, udp_fragments);
}

/// Only a later fragment (no ports) to another network's container; the control is the
/// whole datagram to the sender's own network (a lone fragment reaches no one where the host
/// reassembles).
fn later_fragment_to_other_network(dp: Dp) {
    let o = outbound(dp);
    let expect = match dp {
        Dp::Ebpf => Expect::Refused(Reason::Stat("other_network")),
        Dp::Iptables => Expect::Refused(Reason::HeldForReassembly),
    };
    let control = o.a2.ip;
    from_container(&o, &o.a1, &o.b1, &o.a2, expect, UDP, |h, m| {
        let frags = udp_fragments(h, m);
        if h.dst == control {
            frags
        } else {
            one(frags[1].clone())
        }
    });
}

/// An echo request with record-route to another network's container.
fn options_to_other_network(dp: Dp) {
    let o = outbound(dp);
    let expect = to_other_network(&o, dp);
    o.w.check(&o.b1, &o.a2, expect, |to, mark| {
        let header = Ipv4::new(o.a1.ip, to.ip, ICMP).with_options(rawsock::record_route());
        let packet = header.packet(&rawsock::echo_request(mark));
        rawsock::send_ipv4(&o.w.env, &o.a1.ns, &[packet]);
    });
}

/// A fragmented datagram from an `--internal` container to the outside; the control is the
/// same from a container of a network that isn't internal.
fn fragments_from_internal(dp: Dp) {
    let o = outbound(dp);
    o.internal_default_route();
    let expect = from_internal(&o, dp);
    let outside = o.w.outside();
    let sent_to_control = std::cell::Cell::new(false);
    o.w.check(&outside, &outside, expect, |to, mark| {
        let from = if sent_to_control.replace(true) {
            &o.i1
        } else {
            &o.a1
        };
        let header = Ipv4::new(from.ip, to.ip, UDP);
        rawsock::send_ipv4(&o.w.env, &from.ns, &udp_fragments(&header, mark));
    });
}

/// An echo request with record-route from an `--internal` container to the outside.
fn options_from_internal(dp: Dp) {
    let o = outbound(dp);
    o.internal_default_route();
    let expect = from_internal(&o, dp);
    let outside = o.w.outside();
    let sent_to_control = std::cell::Cell::new(false);
    o.w.check(&outside, &outside, expect, |to, mark| {
        let from = if sent_to_control.replace(true) {
            &o.i1
        } else {
            &o.a1
        };
        let header = Ipv4::new(from.ip, to.ip, ICMP).with_options(rawsock::record_route());
        let packet = header.packet(&rawsock::echo_request(mark));
        rawsock::send_ipv4(&o.w.env, &from.ns, &[packet]);
    });
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
    let mac = netd::ipam::format_mac;
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
        listen_wait(&w.env, &c.ns, 80);
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

/// Waits until something listens on TCP `port` in `ns`.
fn listen_wait(env: &TestEnv, ns: &Path, port: u16) {
    let listening = (0..100).any(|_| {
        let ss = env.run_in(ns, "ss", &["-Hltn", &format!("sport = :{port}")]);
        let up = !ss.stdout.is_empty();
        if !up {
            thread::sleep(Duration::from_millis(20));
        }
        up
    });
    assert!(listening, "nothing listens on port {port}");
}

/// Whether a TCP connection from `ns` to `dst:port` is accepted.
fn connects(env: &TestEnv, ns: &Path, dst: Ipv4Addr, port: u16) -> bool {
    let (dst, port) = (dst.to_string(), port.to_string());
    env.run_in(ns, "nc", &["-z", "-w", "1", &dst, &port])
        .status
        .success()
}

impl Published {
    /// From `client`, `port` through each of `addresses` must not reach `server` (counted at
    /// the server: no TCP segment arrives), for `reason`; the control, `a2` to `p1`'s 8080
    /// through the host's address, connects.
    fn hairpin_refused(
        &self,
        client: &Receiver,
        server: &Receiver,
        port: u16,
        addresses: &[Ipv4Addr],
        reason: Reason,
    ) {
        let env = &self.w.env;
        assert!(
            connects(env, &self.a2.ns, HOST_ADDR, 8080),
            "{:?}: the control",
            self.w.dp
        );
        for dst in addresses {
            let (segments, counted) = (
                counters::snmp(env, &server.ns, "Tcp", "InSegs"),
                self.w.counted(&reason),
            );
            assert!(
                !connects(env, &client.ns, *dst, port),
                "{:?}: through {dst}",
                self.w.dp
            );
            assert_eq!(
                counters::snmp(env, &server.ns, "Tcp", "InSegs"),
                segments,
                "{:?}: through {dst}, reached the server",
                self.w.dp
            );
            assert!(
                self.w.counted(&reason) > counted,
                "{:?}: not counted as {reason:?}",
                self.w.dp
            );
        }
    }
}

/// An `--internal` container gets nothing through another network's published port, through
/// the host's address or its own gateway, as on the iptables datapath (where, DNATed, it is
/// a packet from one network to another: the isolation rules drop it).
fn hairpin_from_internal(dp: Dp) {
    let p = published(dp);
    let reason = match dp {
        Dp::Ebpf => Reason::Stat("internal"),
        Dp::Iptables => rule("NETD-ISOLATION-STAGE-2", "*", &p.a.bridge),
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
    let udp_in = || {
        counters::snmp(env, &p.p1.ns, "Udp", "InDatagrams")
            + counters::snmp(env, &p.p1.ns, "Udp", "NoPorts")
    };
    let (before, csum_errors) = (
        udp_in(),
        counters::snmp(env, &p.p1.ns, "Udp", "InCsumErrors"),
    );
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
        counters::snmp(env, &p.p1.ns, "Udp", "InCsumErrors"),
        csum_errors,
        "{dp:?}: bad checksum after translation"
    );
}

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
    (inbound: $($in:ident),* ; outbound: $($out:ident),* $(,)?) => {
        matrix!(@mod ebpf, Dp::Ebpf; $($in),*; $($out),*);
        matrix!(@mod iptables, Dp::Iptables; $($in),*; $($out),*);
    };
    (@mod $m:ident, $dp:expr; $($in:ident),*; $($out:ident),*) => {
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
        via_second_nic;
    outbound:
        spoofed_source,
        spoofed_mac,
        vlan_tagged_spoofed_source,
        priority_tagged_to_other_network,
        priority_tagged_from_internal,
        ipv6_not_link_local,
        fragments_to_other_network,
        later_fragment_to_other_network,
        options_to_other_network,
        fragments_from_internal,
        options_from_internal,
        arp_spoofing,
        hairpin_from_internal,
        hairpin_without_icc,
        syn_with_options_to_published_port,
        fragments_to_published_port,
        fragmented_ping_out_is_masqueraded,
        record_route_ping_out_is_masqueraded,
}
