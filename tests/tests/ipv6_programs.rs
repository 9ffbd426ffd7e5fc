//! The container programs on crafted IPv6 frames (BPF_PROG_TEST_RUN), with the maps filled by
//! the real driver: the extension-header walk, anti-spoofing of addresses and neighbour
//! discovery, and the isolation rules, for dual-stack networks of each kind; NAT66 on the
//! uplink and hairpin on the bridge, their checksums checked as a receiver would (a test run's
//! packet has no checksum offload to hide a wrong one); the fast path out to NAT66. Every drop
//! is checked against its counter.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
};

use netd::{
    bpf::Pins,
    datapath::{
        Datapath as _, EndpointSpec, LinkSpec, NetworkSpec, PortSpec, Protocol, ebpf::EbpfDatapath,
    },
};
use netd_common::datapath::{
    BRIDGE_INGRESS_PROG, ENDPOINT_EGRESS_PROG, ENDPOINT_INGRESS_PROG, ENDPOINT6_PROGS_MAP,
    UPLINK_EGRESS_PROG, UPLINK_INGRESS_PROG, addr_v6,
};
use tests::{
    frames::{ACK, ETH_LEN, SYN, with_macs},
    frames6::*,
    harness::{HOST_ADDR6, OUTSIDE_ADDR6, UPLINK},
    netdata::{BRIDGE, endpoint, network, port},
    progrun::{Bench, DROP, PASS, REDIRECT, Skb, host_veth},
};

/// A dual-stack network of the bench, with two containers A and B (B linked to A's UDP 53 when
/// the network has no ICC).
struct DualStack {
    net: NetworkSpec,
    a: EndpointSpec,
    b: EndpointSpec,
}

impl DualStack {
    /// Network `id` (10.`id`.0.0/24, fd00:`id`::/64) with `icc`, `internal` and no masquerade.
    fn new(bench: &Bench, id: u8, icc: bool, internal: bool) -> Self {
        Self::made(bench, id, icc, internal, false)
    }

    /// Network `id` as [`DualStack::new`]'s, masquerading (NAT66 for its IPv6).
    fn masquerading(bench: &Bench, id: u8) -> Self {
        Self::made(bench, id, true, false, true)
    }

    fn made(bench: &Bench, id: u8, icc: bool, internal: bool, masquerade: bool) -> Self {
        let net = NetworkSpec {
            id: u32::from(id),
            name: format!("n{id}"),
            bridge: BRIDGE.into(),
            subnet: format!("10.{id}.0.0/24").parse().unwrap(),
            gateway: Ipv4Addr::new(10, id, 0, 1),
            subnet6: Some(format!("fd00:{id}::/64").parse().unwrap()),
            gateway6: Some(addr6(id, 1)),
            icc,
            internal,
            masquerade,
            ..network()
        };
        let ep = |host: u8, links: Vec<LinkSpec>| {
            let veth = format!("v{id}x{host}");
            let ifindex = host_veth(&bench.env, &veth);
            EndpointSpec {
                network_id: net.id,
                ip6: Some(addr6(id, u16::from(host))),
                links,
                ..endpoint(Ipv4Addr::new(10, id, 0, host), &veth, ifindex)
            }
        };
        let a = ep(2, vec![]);
        let link = LinkSpec {
            peer: a.ip,
            peer6: a.ip6,
            proto: Protocol::Udp,
            port: 53,
        };
        let b = ep(3, if icc { vec![] } else { vec![link] });
        let pins = Pins::open(&bench.env.bpffs).unwrap();
        bench.env.in_ns(&bench.env.host_ns(), || {
            let dp = EbpfDatapath::new(pins).with_host_cgroup(None);
            dp.setup_network(&net).unwrap();
            dp.add_endpoint(&net, &a).unwrap();
            dp.add_endpoint(&net, &b).unwrap();
        });
        Self { net, a, b }
    }

    fn gateway6(&self) -> Ipv6Addr {
        self.net.gateway6.unwrap()
    }
}

fn addr6(net: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, u16::from(net), 0, 0, 0, 0, 0, host)
}

fn ip6(ep: &EndpointSpec) -> Ipv6Addr {
    ep.ip6.unwrap()
}

/// Runs `endpoint_ingress` on `frame` as sent by `from` to the MAC `to`.
fn sent(bench: &Bench, from: &EndpointSpec, to: [u8; 6], frame: Vec<u8>) -> u32 {
    let skb = Skb {
        ingress_ifindex: from.host_ifindex,
        ifindex: from.host_ifindex,
        ..Skb::default()
    };
    bench
        .run_skb(ENDPOINT_INGRESS_PROG, &with_macs(frame, to, from.mac), skb)
        .0
}

/// Asserts `frame`, sent by `from` to `to`, is dropped and counted under `reason`.
fn dropped(bench: &Bench, from: &EndpointSpec, to: [u8; 6], frame: Vec<u8>, reason: &str) {
    let before = bench.stat(reason);
    assert_eq!(sent(bench, from, to, frame), DROP, "{reason}");
    assert_eq!(bench.stat(reason), before + 1, "{reason} counted");
}

const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

fn dns(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    udp(src, 5000, dst, 53, b"query")
}

#[test]
fn extension_headers_are_walked_to_the_ports_and_what_cant_be_walked_is_dropped() {
    let bench = Bench::new();
    let n = DualStack::new(&bench, 3, true, false);
    let (a, b) = (ip6(&n.a), ip6(&n.b));
    let to_b = |ext: &[Ext]| frame(a, b, ext, UDP, &dns(a, b));
    let hbh = Ext::HopByHop;
    let opts = Ext::DestOpts;
    let first = Ext::Fragment {
        offset: 0,
        more: true,
    };
    let later = Ext::Fragment {
        offset: 8,
        more: false,
    };
    // Straight into B's namespace, whatever headers lead to the upper layer.
    for ext in [
        &[][..],
        &[hbh],
        &[hbh, opts, first],
        &[later],
        &[Ext::Routing { segments_left: 0 }, opts],
        &[hbh, opts, opts, opts, opts, first],
    ] {
        assert_eq!(sent(&bench, &n.a, n.b.mac, to_b(ext)), REDIRECT, "{ext:?}");
    }
    // More than six, a hop-by-hop header not first, two fragment headers, and a routing
    // header still to be followed (B would pass it on to the next segment).
    for ext in [
        &[opts; 7][..],
        &[opts, hbh],
        &[first, later],
        &[Ext::Routing { segments_left: 1 }],
    ] {
        dropped(&bench, &n.a, n.b.mac, to_b(ext), "ipv6_header");
    }
    // A header cut short by the payload length, and a payload length beyond the frame.
    let mut cut = to_b(&[hbh]);
    cut[18..20].copy_from_slice(&4u16.to_be_bytes());
    dropped(&bench, &n.a, n.b.mac, cut, "truncated_l3");
    let mut long = to_b(&[]);
    long[18..20].copy_from_slice(&1000u16.to_be_bytes());
    dropped(&bench, &n.a, n.b.mac, long, "truncated_l3");
    let mut version = to_b(&[]);
    version[14] = 0x40;
    dropped(&bench, &n.a, n.b.mac, version, "bad_ip_header");
}

#[test]
fn a_container_sends_from_its_own_addresses_only() {
    let bench = Bench::new();
    let n = DualStack::new(&bench, 3, true, false);
    let (a, b) = (ip6(&n.a), ip6(&n.b));
    let link_local_a = link_local(n.a.mac);
    // Its own address, anywhere the policy allows; link-local on the link; the unspecified
    // address for duplicate address detection.
    assert_eq!(
        sent(&bench, &n.a, n.b.mac, frame(a, b, &[], UDP, &dns(a, b))),
        REDIRECT
    );
    let to_all = frame(
        link_local_a,
        ALL_NODES,
        &[],
        UDP,
        &dns(link_local_a, ALL_NODES),
    );
    assert_eq!(sent(&bench, &n.a, multicast_mac(ALL_NODES), to_all), PASS);
    let group = solicited_node(a);
    let dad = neighbour_solicit(Ipv6Addr::UNSPECIFIED, group, a, None);
    let dad = frame(Ipv6Addr::UNSPECIFIED, group, &[], ICMPV6, &dad);
    assert_eq!(sent(&bench, &n.a, multicast_mac(group), dad), PASS);
    // Another container's address, one of no container, a link-local or the unspecified
    // source beyond the link.
    // Another container's or the bridge's link-local address, even on the link.
    let spoofed = [
        (b, b),
        (addr6(3, 99), b),
        (link_local_a, b),
        (link_local_a, OUTSIDE_ADDR6),
        (Ipv6Addr::UNSPECIFIED, b),
        (Ipv6Addr::UNSPECIFIED, ALL_NODES),
        (link_local(n.b.mac), ALL_NODES),
        (link_local(n.b.mac), link_local(n.net.bridge_mac())),
        (link_local(n.net.bridge_mac()), link_local(n.b.mac)),
    ];
    for (src, dst) in spoofed {
        let f = frame(src, dst, &[], UDP, &dns(src, dst));
        dropped(&bench, &n.a, n.b.mac, f, "spoofed_addr");
    }
    // The source MAC is checked before anything else.
    let before = bench.stat("spoofed_mac");
    let f = with_macs(frame(a, b, &[], UDP, &dns(a, b)), n.b.mac, n.b.mac);
    let skb = Skb {
        ingress_ifindex: n.a.host_ifindex,
        ifindex: n.a.host_ifindex,
        ..Skb::default()
    };
    assert_eq!(bench.run_skb(ENDPOINT_INGRESS_PROG, &f, skb).0, DROP);
    assert_eq!(bench.stat("spoofed_mac"), before + 1);
}

#[test]
fn neighbour_discovery_names_only_the_senders_own_mac_and_addresses() {
    let bench = Bench::new();
    let n = DualStack::new(&bench, 3, true, false);
    let (a, b) = (ip6(&n.a), ip6(&n.b));
    let gw = n.gateway6();
    let nd = |src: Ipv6Addr, dst: Ipv6Addr, l4: Vec<u8>| frame(src, dst, &[], ICMPV6, &l4);
    let group = solicited_node(gw);
    let mcast = multicast_mac(group);
    // Resolving the gateway, and answering for itself: on to the bridge.
    let solicit = nd(a, group, neighbour_solicit(a, group, gw, Some(n.a.mac)));
    assert_eq!(sent(&bench, &n.a, mcast, solicit), PASS);
    let advert = nd(a, gw, neighbour_advert(a, gw, a, n.a.mac));
    assert_eq!(sent(&bench, &n.a, n.b.mac, advert), PASS);
    let own_link_local = link_local(n.a.mac);
    let advert = neighbour_advert(own_link_local, ALL_NODES, own_link_local, n.a.mac);
    let advert = nd(own_link_local, ALL_NODES, advert);
    assert_eq!(sent(&bench, &n.a, multicast_mac(ALL_NODES), advert), PASS);
    // Advertising B's address (global or link-local), or its own at B's MAC; soliciting with
    // B's MAC.
    let b_link_local = link_local(n.b.mac);
    let lies = [
        nd(a, ALL_NODES, neighbour_advert(a, ALL_NODES, b, n.a.mac)),
        nd(
            own_link_local,
            ALL_NODES,
            neighbour_advert(own_link_local, ALL_NODES, b_link_local, n.a.mac),
        ),
        nd(a, ALL_NODES, neighbour_advert(a, ALL_NODES, gw, n.a.mac)),
        nd(a, ALL_NODES, neighbour_advert(a, ALL_NODES, a, n.b.mac)),
        nd(a, group, neighbour_solicit(a, group, gw, Some(n.b.mac))),
    ];
    for lie in lies {
        dropped(&bench, &n.a, mcast, lie, "spoofed_nd");
    }
    // A router advertisement or a redirect: a container is no router.
    let advert = router_advert(own_link_local, ALL_NODES, n.a.mac, addr6(66, 0));
    dropped(
        &bench,
        &n.a,
        mcast,
        nd(own_link_local, ALL_NODES, advert),
        "spoofed_nd",
    );
    let redirect = icmpv6(own_link_local, ALL_NODES, ND_REDIRECT, 0, &[0; 36]);
    dropped(
        &bench,
        &n.a,
        mcast,
        nd(own_link_local, ALL_NODES, redirect),
        "spoofed_nd",
    );
    // An option of length zero is invalid; fragmented discovery is refused (RFC 6980).
    let mut zero = neighbour_advert(a, ALL_NODES, a, n.a.mac);
    zero[25] = 0;
    dropped(&bench, &n.a, mcast, nd(a, ALL_NODES, zero), "spoofed_nd");
    let first = Ext::Fragment {
        offset: 0,
        more: true,
    };
    let fragmented = frame(
        a,
        ALL_NODES,
        &[first],
        ICMPV6,
        &neighbour_advert(a, ALL_NODES, a, n.a.mac),
    );
    dropped(&bench, &n.a, mcast, fragmented, "ipv6_header");
}

#[test]
fn isolation_holds_for_ipv6_on_every_kind_of_network() {
    let bench = Bench::new();
    let open = DualStack::new(&bench, 3, true, false);
    let quiet = DualStack::new(&bench, 4, false, false);
    let internal = DualStack::new(&bench, 5, true, true);
    let bridge_mac = quiet.net.bridge_mac();
    let udp_frame = |src, dst, dport| frame(src, dst, &[], UDP, &udp(src, 5000, dst, dport, b"x"));
    // A routed network: the gateway, the subnet, beyond (through the stack), its own members
    // straight into their namespace; another network's container never.
    let (a, b) = (ip6(&open.a), ip6(&open.b));
    assert_eq!(
        sent(&bench, &open.a, open.b.mac, udp_frame(a, b, 53)),
        REDIRECT
    );
    for dst in [open.gateway6(), addr6(3, 99), OUTSIDE_ADDR6] {
        assert_eq!(
            sent(&bench, &open.a, bridge_mac, udp_frame(a, dst, 53)),
            PASS,
            "{dst}"
        );
    }
    dropped(
        &bench,
        &open.a,
        quiet.a.mac,
        udp_frame(a, ip6(&quiet.a), 53),
        "other_network",
    );

    // Without ICC: only along B's link to A's UDP 53 and back, and to the host.
    let (qa, qb) = (ip6(&quiet.a), ip6(&quiet.b));
    assert_eq!(
        sent(&bench, &quiet.b, quiet.a.mac, udp_frame(qb, qa, 53)),
        REDIRECT
    );
    let reply = frame(qa, qb, &[], UDP, &udp(qa, 53, qb, 5000, b"x"));
    assert_eq!(sent(&bench, &quiet.a, quiet.b.mac, reply), REDIRECT);
    // A fragmented datagram along the link: the later fragment by the first one's ports; a
    // later fragment of no datagram the link let through is refused.
    let payload = [7u8; 100];
    let along = fragments(qb, qa, &udp(qb, 5000, qa, 53, &payload), 64);
    for f in along {
        assert_eq!(sent(&bench, &quiet.b, quiet.a.mac, f), REDIRECT);
    }
    let [_, stray] = fragments(qa, qb, &udp(qa, 5000, qb, 80, &payload), 64);
    dropped(&bench, &quiet.a, quiet.b.mac, stray, "icc_denied");
    for (from, to, dst, dport) in [
        (&quiet.b, quiet.a.mac, qa, 80),
        (&quiet.a, quiet.b.mac, qb, 53),
        (&quiet.a, bridge_mac, addr6(4, 99), 53),
        (&quiet.a, multicast_mac(ALL_NODES), ALL_NODES, 53),
    ] {
        let f = udp_frame(ip6(from), dst, dport);
        dropped(&bench, from, to, f, "icc_denied");
    }
    let ll_a = link_local(quiet.a.mac);
    let to_b = frame(
        ll_a,
        link_local(quiet.b.mac),
        &[],
        UDP,
        &dns(ll_a, link_local(quiet.b.mac)),
    );
    dropped(&bench, &quiet.a, quiet.b.mac, to_b.clone(), "icc_denied");
    assert_eq!(
        sent(&bench, &quiet.a, bridge_mac, to_b),
        PASS,
        "link-local to the host"
    );
    assert_eq!(
        sent(
            &bench,
            &quiet.a,
            bridge_mac,
            udp_frame(qa, quiet.gateway6(), 53)
        ),
        PASS
    );
    // Neighbour discovery between them still works, as ARP does.
    let solicit = neighbour_solicit(qa, qb, qb, Some(quiet.a.mac));
    assert_eq!(
        sent(
            &bench,
            &quiet.a,
            quiet.b.mac,
            frame(qa, qb, &[], ICMPV6, &solicit)
        ),
        PASS
    );

    // Internal: nothing beyond the subnet and the gateway.
    let ia = ip6(&internal.a);
    assert_eq!(
        sent(
            &bench,
            &internal.a,
            bridge_mac,
            udp_frame(ia, internal.gateway6(), 53)
        ),
        PASS
    );
    dropped(
        &bench,
        &internal.a,
        bridge_mac,
        udp_frame(ia, OUTSIDE_ADDR6, 53),
        "internal",
    );
    // Neighbour discovery is let through on the link only: addressed beyond it, it is
    // held to the rules like any packet (here: out of an internal network, and to another
    // network's container).
    let solicit = neighbour_solicit(ia, OUTSIDE_ADDR6, OUTSIDE_ADDR6, Some(internal.a.mac));
    let out = frame(ia, OUTSIDE_ADDR6, &[], ICMPV6, &solicit);
    dropped(&bench, &internal.a, bridge_mac, out, "internal");
    let solicit = neighbour_solicit(ia, qa, qa, Some(internal.a.mac));
    let across = frame(ia, qa, &[], ICMPV6, &solicit);
    dropped(&bench, &internal.a, quiet.a.mac, across, "other_network");
}

#[test]
fn ipv6_from_beyond_reaches_only_a_routed_networks_containers() {
    let bench = Bench::new();
    let open = DualStack::new(&bench, 3, true, false);
    let internal = DualStack::new(&bench, 5, true, true);
    // Routed in from an interface that is none of netd's.
    let run = |to: &EndpointSpec| {
        let f = frame(
            OUTSIDE_ADDR6,
            ip6(to),
            &[],
            UDP,
            &udp(OUTSIDE_ADDR6, 53, ip6(to), 5000, b"x"),
        );
        let skb = Skb {
            ingress_ifindex: 4242,
            ifindex: to.host_ifindex,
            ..Skb::default()
        };
        bench.run_skb(ENDPOINT_EGRESS_PROG, &f, skb).0
    };
    assert_eq!(run(&open.a), PASS);
    let before = bench.stat("internal");
    assert_eq!(run(&internal.a), DROP);
    assert_eq!(bench.stat("internal"), before + 1);
}

/// ICMPv6 Destination Unreachable (code: port unreachable) and Packet Too Big.
const DEST_UNREACH: u8 = 1;
const PORT_UNREACH: u8 = 4;
const PACKET_TOO_BIG: u8 = 2;

/// Runs the NAT program `prog` on `frame`; expects it passed on with a valid upper-layer
/// checksum, and returns what it left.
fn nat66(bench: &Bench, prog: &str, frame: &[u8]) -> Vec<u8> {
    let (verdict, out) = bench.run_on(prog, frame, UPLINK);
    assert_eq!(verdict, PASS, "{prog} on {frame:02x?}");
    assert!(
        l4_checksum_ok(&out),
        "{prog} left a bad checksum: {out:02x?}"
    );
    out
}

/// Runs `uplink_ingress` on `frame`, translated to container `to` of `n`: expects it sent
/// straight into the container's namespace as forwarding would (to its MAC from the bridge's,
/// the hop limit down by one) with a valid upper-layer checksum, and returns it.
fn nat66_in(bench: &Bench, n: &DualStack, to: &EndpointSpec, frame: &[u8]) -> Vec<u8> {
    let (verdict, out) = bench.run_on(UPLINK_INGRESS_PROG, frame, UPLINK);
    assert_eq!(
        verdict, REDIRECT,
        "into the container's namespace: {frame:02x?}"
    );
    assert_fast_path_frame(n, to, frame, &out);
    assert!(l4_checksum_ok(&out), "a bad checksum: {out:02x?}");
    out
}

/// Asserts `out`, what the fast path made of `sent`, is addressed to container `to` from
/// `n`'s bridge, one hop further.
fn assert_fast_path_frame(n: &DualStack, to: &EndpointSpec, sent: &[u8], out: &[u8]) {
    assert_eq!(
        (&out[..6], &out[6..12]),
        (&to.mac[..], &n.net.bridge_mac()[..])
    );
    assert_eq!(out[ETH_LEN + 7], sent[ETH_LEN + 7] - 1, "hop limit");
}

/// The IPv6 address at `off` of `bytes`.
fn addr_at(bytes: &[u8], off: usize) -> Ipv6Addr {
    <[u8; 16]>::try_from(&bytes[off..off + 16]).unwrap().into()
}

/// The source and destination of an IPv6 packet starting at `bytes`, and the ports after its
/// fixed header.
fn ends6(bytes: &[u8]) -> (Ipv6Addr, u16, Ipv6Addr, u16) {
    let port = |off: usize| u16::from_be_bytes([bytes[off], bytes[off + 1]]);
    (addr_at(bytes, 8), port(40), addr_at(bytes, 24), port(42))
}

/// Asserts the NAT program `prog` drops `frame` and counts it under `reason`.
fn nat66_drops(bench: &Bench, prog: &str, frame: &[u8], reason: &str) {
    let before = bench.stat(reason);
    assert_eq!(
        bench.run_on(prog, frame, UPLINK).0,
        DROP,
        "{prog}: {reason}"
    );
    assert_eq!(bench.stat(reason), before + 1, "{prog}: {reason} counted");
}

#[test]
fn nat66_translates_with_valid_checksums_and_drops_what_it_cannot() {
    let bench = Bench::dual_stack();
    let n = DualStack::masquerading(&bench, 6);
    let a = ip6(&n.a);
    let (out_addr, outside) = (HOST_ADDR6, OUTSIDE_ADDR6);

    // A datagram out leaves from the host's address, its answer comes back to the container.
    let query = frame(a, outside, &[], UDP, &dns(a, outside));
    let out = nat66(&bench, UPLINK_EGRESS_PROG, &query);
    let (src, nat_port, dst, dport) = ends6(&out[ETH_LEN..]);
    assert_eq!((src, dst, dport), (out_addr, outside, 53));
    let answer = udp(outside, 53, out_addr, nat_port, b"answer");
    let back = nat66_in(
        &bench,
        &n,
        &n.a,
        &frame(outside, out_addr, &[], UDP, &answer),
    );
    assert_eq!(ends6(&back[ETH_LEN..]), (outside, 53, a, 5000));

    // A Packet Too Big about the datagram as it left: to the container, about what it sent
    // (through the stack, as IPv4's errors).
    let body = [&1280u32.to_be_bytes()[..], &out[ETH_LEN..]].concat();
    let ptb = icmpv6(outside, out_addr, PACKET_TOO_BIG, 0, &body);
    let back = nat66(
        &bench,
        UPLINK_INGRESS_PROG,
        &frame(outside, out_addr, &[], ICMPV6, &ptb),
    );
    assert_eq!(addr_at(&back[ETH_LEN..], 24), a);
    assert_eq!(ends6(&back[ETH_LEN + 48..]), (a, 5000, outside, 53));

    // An echo request leaves from the host's address too.
    let echo = icmpv6(
        a,
        outside,
        128,
        0,
        &[0x12, 0x34, 0, 1, b'p', b'i', b'n', b'g'],
    );
    let out = nat66(
        &bench,
        UPLINK_EGRESS_PROG,
        &frame(a, outside, &[], ICMPV6, &echo),
    );
    assert_eq!(addr_at(&out[ETH_LEN..], 8), out_addr);

    // What NAT66 can't translate never leaves with the container's address.
    let routed = Ext::Routing { segments_left: 1 };
    for (ext, proto, l4, reason) in [
        (&[routed][..], UDP, dns(a, outside), "ipv6_header"),
        (&[][..], TCP, vec![0u8; 12], "truncated_l4"),
    ] {
        let f = frame(a, outside, ext, proto, &l4);
        nat66_drops(&bench, UPLINK_EGRESS_PROG, &f, reason);
    }
    // Nothing reaches it unasked: a new flow, an error about no flow of it.
    let knock = frame(outside, a, &[], UDP, &udp(outside, 53, a, 5000, b"knock"));
    nat66_drops(&bench, UPLINK_INGRESS_PROG, &knock, "unsolicited");
    let never_sent = frame(a, outside, &[], UDP, &udp(a, 6000, outside, 53, b"?"));
    let body = [&1280u32.to_be_bytes()[..], &never_sent[ETH_LEN..]].concat();
    let ptb = icmpv6(outside, a, PACKET_TOO_BIG, 0, &body);
    let stray = frame(outside, a, &[], ICMPV6, &ptb);
    nat66_drops(&bench, UPLINK_INGRESS_PROG, &stray, "icmp_no_flow");

    // The host's own IPv6 is none of NAT66's business.
    let own = frame(out_addr, outside, &[], UDP, &dns(out_addr, outside));
    assert_eq!(bench.run_on(UPLINK_EGRESS_PROG, &own, UPLINK), (PASS, own));
}

/// As IPv4's: a container's new IPv6 flow out is masqueraded only when it came into the host
/// through the container's veth or its network's bridge (or no interface: the host's own);
/// through any other, its source is spoofed (`martian`).
#[test]
fn a_containers_new_ipv6_flow_out_starts_only_where_its_packets_come_in() {
    let bench = Bench::dual_stack();
    let n = DualStack::masquerading(&bench, 8);
    let a = ip6(&n.a);
    let query = |sport| {
        let datagram = udp(a, sport, OUTSIDE_ADDR6, 53, b"query");
        frame(a, OUTSIDE_ADDR6, &[], UDP, &datagram)
    };
    let run = |sport, way_in| bench.run_from(UPLINK_EGRESS_PROG, &query(sport), UPLINK, way_in);
    for (sport, way_in) in [
        (5001, n.a.host_ifindex),
        (5002, bench.bridge_ifindex()),
        (5003, 0),
    ] {
        let (verdict, out) = run(sport, way_in);
        assert_eq!(verdict, PASS, "in through {way_in}");
        assert_eq!(ends6(&out[ETH_LEN..]).0, HOST_ADDR6, "in through {way_in}");
        assert!(l4_checksum_ok(&out), "a bad checksum: {out:02x?}");
    }
    for (sport, way_in) in [(5004, bench.ifindex(UPLINK)), (5005, n.b.host_ifindex)] {
        let before = bench.stat("martian");
        assert_eq!(run(sport, way_in).0, DROP, "in through {way_in}");
        assert_eq!(bench.stat("martian"), before + 1, "in through {way_in}");
    }
}

/// An address of a container subnet (a container's, one not given out yet) as the source of
/// IPv6 from outside is spoofed (a new flow's, an ICMPv6 error's), and a container's ICMPv6
/// error about a packet another container got doesn't leave: as IPv4's.
#[test]
fn nat66_drops_spoofed_container_sources_and_errors_about_anothers_flow() {
    let bench = Bench::dual_stack();
    let n = DualStack::masquerading(&bench, 7);
    let (a, b, outside) = (ip6(&n.a), ip6(&n.b), OUTSIDE_ADDR6);
    let query = frame(a, outside, &[], UDP, &dns(a, outside));
    let out = nat66(&bench, UPLINK_EGRESS_PROG, &query);
    let ptb_about = |sent: &[u8]| [&1280u32.to_be_bytes()[..], sent].concat();
    // From outside with b's address: to anywhere (routed back out, it would start a flow in
    // b's name), or as an error about a's flow.
    let elsewhere: Ipv6Addr = "2001:db8:2::5".parse().unwrap();
    for src in [b, addr6(7, 0x99)] {
        let spoofed_flow = frame(
            src,
            elsewhere,
            &[],
            UDP,
            &udp(src, 53, elsewhere, 7777, b"x"),
        );
        nat66_drops(&bench, UPLINK_INGRESS_PROG, &spoofed_flow, "martian");
    }
    let ptb = icmpv6(
        b,
        HOST_ADDR6,
        PACKET_TOO_BIG,
        0,
        &ptb_about(&out[ETH_LEN..]),
    );
    let spoofed_error = frame(b, HOST_ADDR6, &[], ICMPV6, &ptb);
    nat66_drops(&bench, UPLINK_INGRESS_PROG, &spoofed_error, "martian");
    // b reports on the answer a got: dropped; a's own report leaves from the host.
    let answer = frame(outside, a, &[], UDP, &udp(outside, 53, a, 5000, b"answer"));
    let unreachable = |from: Ipv6Addr| {
        let body = [&[0u8; 4][..], &answer[ETH_LEN..]].concat();
        frame(
            from,
            outside,
            &[],
            ICMPV6,
            &icmpv6(from, outside, 1, 4, &body),
        )
    };
    nat66_drops(&bench, UPLINK_EGRESS_PROG, &unreachable(b), "icmp_no_flow");
    let own = nat66(&bench, UPLINK_EGRESS_PROG, &unreachable(a));
    assert_eq!(addr_at(&own[ETH_LEN..], 8), HOST_ADDR6);
}

/// `frame` with an 802.1Q tag for VLAN `vid` in front of its EtherType.
fn tagged(vid: u16, mut frame: Vec<u8>) -> Vec<u8> {
    frame.splice(12..12, [0x81, 0x00, (vid >> 8) as u8, vid as u8]);
    frame
}

#[test]
fn tagged_ipv6_of_a_masquerading_networks_container_is_dropped_on_the_uplink() {
    let bench = Bench::dual_stack();
    let n = DualStack::masquerading(&bench, 6);
    let a = ip6(&n.a);
    let outside = OUTSIDE_ADDR6;
    // A priority tag (VLAN 0), which the stack strips before routing what it carries, and a
    // VLAN's tag.
    for vid in [0, 5] {
        let out = frame(a, outside, &[], UDP, &dns(a, outside));
        nat66_drops(&bench, UPLINK_EGRESS_PROG, &tagged(vid, out), "vlan");
        let knock = frame(outside, a, &[], UDP, &udp(outside, 53, a, 5000, b"knock"));
        nat66_drops(&bench, UPLINK_INGRESS_PROG, &tagged(vid, knock), "vlan");
        // The host's own (a VLAN interface on the uplink) is the stack's.
        let own = tagged(
            vid,
            frame(HOST_ADDR6, outside, &[], UDP, &dns(HOST_ADDR6, outside)),
        );
        assert_eq!(bench.run_on(UPLINK_EGRESS_PROG, &own, UPLINK), (PASS, own));
    }
}

/// Where a fragment's data starts in its frame (one fragment header).
const FRAGMENT_DATA: usize = ETH_LEN + 48;
/// A fragment header at `offset` bytes of the datagram (a multiple of 8).
fn fragment_at(offset: usize, more: bool) -> Ext {
    Ext::Fragment {
        offset: (offset / 8) as u16,
        more,
    }
}

/// The first and the later fragment of the UDP datagram `datagram` from `src` to `dst`,
/// split after `split` bytes.
fn fragments(src: Ipv6Addr, dst: Ipv6Addr, datagram: &[u8], split: usize) -> [Vec<u8>; 2] {
    [
        frame(src, dst, &[fragment_at(0, true)], UDP, &datagram[..split]),
        frame(
            src,
            dst,
            &[fragment_at(split, false)],
            UDP,
            &datagram[split..],
        ),
    ]
}

/// Runs `prog` on each of `frames`, which it must pass on (with `verdict`); returns the
/// datagram they carry, reassembled, as an unfragmented frame between the addresses the first
/// one left with (whose checksum then says whether the translation kept it right).
fn reassembled(bench: &Bench, prog: &str, verdict: u32, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut data = Vec::new();
    let mut ends = None;
    for f in frames {
        let (got, out) = bench.run_on(prog, f, UPLINK);
        assert_eq!(got, verdict, "{prog} on {f:02x?}");
        let ip = &out[ETH_LEN..];
        let these = (addr_at(ip, 8), addr_at(ip, 24));
        assert_eq!(*ends.get_or_insert(these), these, "fragments left apart");
        data.extend_from_slice(&out[FRAGMENT_DATA..]);
    }
    let (src, dst) = ends.unwrap();
    frame(src, dst, &[], UDP, &data)
}

#[test]
fn nat66_translates_a_fragmented_datagram_by_its_first_fragment() {
    let bench = Bench::dual_stack();
    let n = DualStack::masquerading(&bench, 8);
    let a = ip6(&n.a);
    let (out_addr, outside) = (HOST_ADDR6, OUTSIDE_ADDR6);
    let payload: Vec<u8> = (0..200u8).collect();

    // Out: the first fragment gets the host's address and a NAT port, the later one the same
    // address; the datagram's checksum stays right.
    let query = udp(a, 5000, outside, 53, &payload);
    let out = reassembled(
        &bench,
        UPLINK_EGRESS_PROG,
        PASS,
        &fragments(a, outside, &query, 64),
    );
    let (src, nat_port, dst, dport) = ends6(&out[ETH_LEN..]);
    assert_eq!((src, dst, dport), (out_addr, outside, 53));
    assert!(l4_checksum_ok(&out), "{out:02x?}");
    assert_eq!(&out[ETH_LEN + 48..], &payload[..], "data changed");

    // Back: the answer's fragments reach the container, straight into its namespace.
    let answer = udp(outside, 53, out_addr, nat_port, &payload);
    let back = reassembled(
        &bench,
        UPLINK_INGRESS_PROG,
        REDIRECT,
        &fragments(outside, out_addr, &answer, 128),
    );
    assert_eq!(ends6(&back[ETH_LEN..]), (outside, 53, a, 5000));
    assert!(l4_checksum_ok(&back), "{back:02x?}");

    // A later fragment of no datagram NAT66 translated leaves neither way.
    let other = udp(a, 5001, outside, 53, &payload);
    let [_, stray] = fragments(a, outside, &other, 64);
    // Its datagram differs by address (what the key holds besides the identification).
    let elsewhere: Ipv6Addr = "2001:2::99".parse().unwrap();
    let stray_out = frame(a, elsewhere, &[fragment_at(64, false)], UDP, &other[64..]);
    nat66_drops(&bench, UPLINK_EGRESS_PROG, &stray_out, "fragment");
    let stray_in = frame(
        elsewhere,
        a,
        &[fragment_at(64, false)],
        UDP,
        &stray[FRAGMENT_DATA..],
    );
    nat66_drops(&bench, UPLINK_INGRESS_PROG, &stray_in, "fragment");

    // An ICMPv6 error is never fragmented: a fragmented one about the flow is not
    // translated, only the host's stack gets it.
    let about = frame(
        out_addr,
        outside,
        &[],
        UDP,
        &udp(out_addr, nat_port, outside, 53, b"q"),
    );
    let body = [&1280u32.to_be_bytes()[..], &about[ETH_LEN..]].concat();
    let ptb = icmpv6(outside, out_addr, PACKET_TOO_BIG, 0, &body);
    let error = frame(outside, out_addr, &[fragment_at(0, true)], ICMPV6, &ptb);
    assert_eq!(
        bench.run_on(UPLINK_INGRESS_PROG, &error, UPLINK),
        (PASS, error)
    );
}

/// A masquerading network's IPv6 that the FIB routes out of the uplink (where NAT66 runs) goes
/// straight there, one hop further; with its hop limit about to expire, to the stack (which
/// answers Time Exceeded). With `endpoint_ingress6` missing from its program array, IPv6 from
/// a container is dropped, never passed on unchecked.
#[test]
fn a_masquerading_networks_ipv6_takes_the_fast_path_out_and_nothing_unchecked() {
    let bench = Bench::dual_stack();
    forward_ipv6(&bench);
    let n = DualStack::masquerading(&bench, 6);
    let a = ip6(&n.a);
    let bridge_mac = n.net.bridge_mac();
    let query = frame(a, OUTSIDE_ADDR6, &[], UDP, &dns(a, OUTSIDE_ADDR6));
    let skb = Skb {
        ingress_ifindex: n.a.host_ifindex,
        ifindex: n.a.host_ifindex,
        ..Skb::default()
    };
    let fast = bench.stat("fast_path_out");
    let (verdict, out) = bench.run_skb(
        ENDPOINT_INGRESS_PROG,
        &with_macs(query.clone(), bridge_mac, n.a.mac),
        skb,
    );
    assert_eq!(verdict, REDIRECT, "straight to the uplink");
    assert_eq!(out[ETH_LEN + 7], query[ETH_LEN + 7] - 1, "hop limit");
    assert_eq!(bench.stat("fast_path_out"), fast + 1);
    let mut last_hop = query.clone();
    last_hop[ETH_LEN + 7] = 1;
    assert_eq!(sent(&bench, &n.a, bridge_mac, last_hop), PASS);

    let array = bench.env.bpffs.join("maps").join(ENDPOINT6_PROGS_MAP);
    let emptied = Command::new("bpftool")
        .args(["map", "delete", "pinned"])
        .arg(&array)
        .args(["key", "0", "0", "0", "0"])
        .status()
        .unwrap();
    assert!(emptied.success(), "bpftool map delete {}", array.display());
    dropped(&bench, &n.a, bridge_mac, query, "ipv6");
}

/// Turns IPv6 forwarding on in the bench's host, as netd's bridge driver does for a
/// dual-stack network: the FIB, which tells the programs whether a destination is one of the
/// host's, answers on forwarding interfaces only.
fn forward_ipv6(bench: &Bench) {
    let host_ns = bench.env.host_ns();
    netd::netlink::set_sysctl(Some(&host_ns), "net.ipv6.conf.all.forwarding", "1").unwrap();
}

#[test]
fn a_port_published_over_ipv6_takes_new_flows_from_allowed_sources_only() {
    let bench = Bench::dual_stack();
    let n = DualStack::masquerading(&bench, 7);
    let (a, b) = (ip6(&n.a), ip6(&n.b));
    let (host, outside) = (HOST_ADDR6, OUTSIDE_ADDR6);
    let published = |host_port: u16, allow: &[&str]| PortSpec {
        network_id: n.net.id,
        container_ip6: n.a.ip6,
        allow: allow.iter().map(|range| range.parse().unwrap()).collect(),
        ..port(Protocol::Udp, None, host_port, n.a.ip, 53)
    };
    forward_ipv6(&bench);
    let pins = Pins::open(&bench.env.bpffs).unwrap();
    bench.env.in_ns(&bench.env.host_ns(), || {
        let dp = EbpfDatapath::new(pins).with_host_cgroup(None);
        let ports = [
            published(5353, &["10.0.0.0/8", "2001:2::1/128"]),
            published(5354, &[]),
        ];
        dp.publish(&n.net, &ports).unwrap();
    });

    // A query to the host's address reaches the container, its answer leaves from the host.
    let query = udp(outside, 4000, host, 5353, b"query");
    let dnat = bench.stat("dnat_new");
    let back = nat66_in(&bench, &n, &n.a, &frame(outside, host, &[], UDP, &query));
    assert_eq!(ends6(&back[ETH_LEN..]), (outside, 4000, a, 53));
    assert_eq!(bench.stat("dnat_new"), dnat + 1);
    let answer = udp(a, 53, outside, 4000, b"answer");
    let out = nat66(
        &bench,
        UPLINK_EGRESS_PROG,
        &frame(a, outside, &[], UDP, &answer),
    );
    assert_eq!(ends6(&out[ETH_LEN..]), (host, 5353, outside, 4000));

    // Not from a source outside the port's ranges, nor one that can't be from outside (the
    // network's other container, an address of its subnet not given out yet, the host itself,
    // one embedding an IPv4 address), nor to an address that isn't the host's.
    let stranger: Ipv6Addr = "2001:db8::9".parse().unwrap();
    let to = |src: Ipv6Addr, dst: Ipv6Addr, port: u16| {
        frame(src, dst, &[], UDP, &udp(src, 4000, dst, port, b"?"))
    };
    nat66_drops(
        &bench,
        UPLINK_INGRESS_PROG,
        &to(stranger, host, 5353),
        "publish_denied",
    );
    let embedding_ipv4 = [
        "::ffff:127.0.0.1",
        "::ffff:198.18.10.3",
        "::198.18.10.3",
        "::1",
    ];
    for src in [b, addr6(7, 0x99), host]
        .into_iter()
        .chain(embedding_ipv4.iter().map(|a| a.parse().unwrap()))
    {
        nat66_drops(&bench, UPLINK_INGRESS_PROG, &to(src, host, 5354), "martian");
    }
    let elsewhere = to(outside, stranger, 5354);
    assert_eq!(
        bench.run_on(UPLINK_INGRESS_PROG, &elsewhere, UPLINK),
        (PASS, elsewhere)
    );

    // The first query's destination was found in netd's mirror of the host's addresses
    // (`HOST_ADDRS6`); an address the host gained since is the host's all the same: the FIB
    // says so where the mirror can't.
    let gained: Ipv6Addr = "2001:2::77".parse().unwrap();
    let ns = bench.env.host_ns();
    tests::topology::ip_in(
        &bench.env,
        &ns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{gained}/64"),
            "dev",
            UPLINK,
            "nodad",
        ],
    );
    // The kernel adds the address's local route from a work queue, a moment later.
    let local = || {
        let out = bench.env.run_in(
            &ns,
            "ip",
            &["-6", "route", "show", "table", "local", &gained.to_string()],
        );
        !out.stdout.is_empty()
    };
    assert!(
        tests::cli::eventually(std::time::Duration::from_secs(5), local),
        "no local route for {gained}"
    );
    let pins = Pins::open(&bench.env.bpffs).unwrap();
    let mirror = netd::datapath::ebpf::maps::host_addrs6(&pins).unwrap();
    let mirrored = |addr: Ipv6Addr| mirror.get(&addr_v6(addr.octets()), 0).is_ok();
    assert!(mirrored(host) && !mirrored(gained));
    // From a port of its own: the reply tuple of the first query's flow is taken.
    let query = udp(outside, 4001, gained, 5354, b"query");
    let back = nat66_in(&bench, &n, &n.a, &frame(outside, gained, &[], UDP, &query));
    assert_eq!(ends6(&back[ETH_LEN..]), (outside, 4001, a, 53));
}

/// The MAC a container sends to the host with (the bridge's): the hairpin program sends the
/// translated frame from it.
const BRIDGE_MAC: [u8; 6] = [0x02, 0x42, 0xbb, 0, 0, 1];

/// Publishes container A of `n` over both families: UDP or TCP `host_port` → A's
/// `container_port` on every address, from the sources in `allow` (all when empty).
fn publish_a(bench: &Bench, n: &DualStack, ports: &[(Protocol, u16, u16, &[&str])]) {
    let ports: Vec<PortSpec> = ports
        .iter()
        .map(|&(proto, host_port, container_port, allow)| PortSpec {
            network_id: n.net.id,
            container_ip6: n.a.ip6,
            allow: allow.iter().map(|range| range.parse().unwrap()).collect(),
            ..port(proto, None, host_port, n.a.ip, container_port)
        })
        .collect();
    let pins = Pins::open(&bench.env.bpffs).unwrap();
    bench.env.in_ns(&bench.env.host_ns(), || {
        EbpfDatapath::new(pins)
            .with_host_cgroup(None)
            .publish(&n.net, &ports)
            .unwrap();
    });
}

/// Runs the bridge's program (on the bridge) on `frame`, as container `from` sends it to the
/// host.
fn to_bridge(bench: &Bench, from: &EndpointSpec, frame: Vec<u8>) -> (u32, Vec<u8>) {
    let sent = with_macs(frame, BRIDGE_MAC, from.mac);
    bench.run_on(BRIDGE_INGRESS_PROG, &sent, BRIDGE)
}

/// Runs the bridge's program on `frame` from `from`; expects it redirected to container `to`
/// (from the bridge's MAC) with a valid upper-layer checksum, and returns its IPv6 packet.
fn hairpin6(bench: &Bench, from: &EndpointSpec, frame: Vec<u8>, to: &EndpointSpec) -> Vec<u8> {
    let (verdict, out) = to_bridge(bench, from, frame);
    assert_eq!(
        verdict, REDIRECT,
        "hairpin goes straight to {}",
        to.container
    );
    assert_eq!(out[..6], to.mac, "destination MAC: {}'s", to.container);
    assert_eq!(out[6..12], BRIDGE_MAC, "source MAC: the bridge's");
    assert!(l4_checksum_ok(&out), "bad checksum: {out:02x?}");
    out[ETH_LEN..].to_vec()
}

/// Asserts the bridge's program drops `frame` from `from` and counts it under `reason`.
fn hairpin6_refused(bench: &Bench, from: &EndpointSpec, frame: Vec<u8>, reason: &str) {
    let before = bench.stat(reason);
    assert_eq!(to_bridge(bench, from, frame).0, DROP, "{reason}");
    assert_eq!(bench.stat(reason), before + 1, "{reason} counted");
}

#[test]
fn ipv6_hairpin_to_a_published_port_goes_through_the_gateway_and_back() {
    let bench = Bench::dual_stack();
    forward_ipv6(&bench);
    let n = DualStack::masquerading(&bench, 8);
    let (a, b, gateway, host) = (ip6(&n.a), ip6(&n.b), n.gateway6(), HOST_ADDR6);
    publish_a(
        &bench,
        &n,
        &[
            (Protocol::Tcp, 8081, 80, &[]),
            (Protocol::Udp, 5300, 53, &[]),
        ],
    );
    let (new, hit, errors) = (
        bench.stat("hairpin_new"),
        bench.stat("hairpin_hit"),
        bench.stat("icmp_error"),
    );

    // B → the host's address:8081 (published → A:80): to A from the gateway; A's answer back
    // to B from the host's address.
    let syn = tcp(b, 20000, host, 8081, SYN);
    let there = hairpin6(&bench, &n.b, frame(b, host, &[], TCP, &syn), &n.a);
    let (src, gateway_port, dst, dport) = ends6(&there);
    assert_eq!((src, dst, dport), (gateway, a, 80));
    let syn_ack = tcp(a, 80, gateway, gateway_port, SYN | ACK);
    let back = hairpin6(&bench, &n.a, frame(a, gateway, &[], TCP, &syn_ack), &n.b);
    assert_eq!(ends6(&back), (host, 8081, b, 20000));

    // A to its own published port through the gateway's address: from the gateway too.
    let own = tcp(a, 30000, gateway, 8081, SYN);
    let there = hairpin6(&bench, &n.a, frame(a, gateway, &[], TCP, &own), &n.a);
    let (src, _, dst, dport) = ends6(&there);
    assert_eq!((src, dst, dport), (gateway, a, 80));

    // A datagram B → host:5300, and A's port unreachable about it: back to B from the host's
    // address, quoting the datagram as B sent it.
    let query = udp(b, 5000, host, 5300, b"query");
    let there = hairpin6(&bench, &n.b, frame(b, host, &[], UDP, &query), &n.a);
    let (src, _, dst, dport) = ends6(&there);
    assert_eq!((src, dst, dport), (gateway, a, 53));
    let body = [&[0u8; 4][..], &there].concat();
    let unreachable = icmpv6(a, gateway, DEST_UNREACH, PORT_UNREACH, &body);
    let error = hairpin6(
        &bench,
        &n.a,
        frame(a, gateway, &[], ICMPV6, &unreachable),
        &n.b,
    );
    assert_eq!((addr_at(&error, 8), addr_at(&error, 24)), (host, b));
    assert_eq!(ends6(&error[48..]), (b, 5000, host, 5300));
    // The same error from anyone but A, or from A to anyone but the quoted packet's source:
    // dropped.
    for (from, src, dst) in [(&n.b, b, gateway), (&n.a, a, host)] {
        let forged = icmpv6(src, dst, DEST_UNREACH, PORT_UNREACH, &body);
        let forged = frame(src, dst, &[], ICMPV6, &forged);
        hairpin6_refused(&bench, from, forged, "icmp_no_flow");
    }

    // A fragmented datagram B → host:5300: each fragment to A from the gateway (the later one
    // by the first one's ports), the datagram's checksum right.
    let big = udp(b, 5001, host, 5300, &[9u8; 100]);
    let mut data = Vec::new();
    for f in fragments(b, host, &big, 64) {
        let (verdict, out) = to_bridge(&bench, &n.b, f);
        assert_eq!((verdict, &out[..6]), (REDIRECT, &n.a.mac[..]));
        let ip = &out[ETH_LEN..];
        assert_eq!((addr_at(ip, 8), addr_at(ip, 24)), (gateway, a));
        data.extend_from_slice(&out[FRAGMENT_DATA..]);
    }
    assert!(l4_checksum_ok(&frame(gateway, a, &[], UDP, &data)));

    assert_eq!(bench.stat("hairpin_new"), new + 4);
    assert_eq!(bench.stat("hairpin_hit"), hit + 2);
    assert_eq!(bench.stat("icmp_error"), errors + 1);

    // A container's traffic to the outside is none of the bridge's.
    let out = frame(b, OUTSIDE_ADDR6, &[], UDP, &dns(b, OUTSIDE_ADDR6));
    let (verdict, left) = to_bridge(&bench, &n.b, out.clone());
    assert_eq!((verdict, left), (PASS, with_macs(out, BRIDGE_MAC, n.b.mac)));
}

#[test]
fn ipv6_hairpin_applies_the_sources_isolation() {
    let bench = Bench::dual_stack();
    forward_ipv6(&bench);
    let open = DualStack::masquerading(&bench, 8);
    // Without ICC, B is linked to A's UDP 53 only.
    let quiet = DualStack::new(&bench, 9, false, false);
    let inner = DualStack::new(&bench, 10, true, true);
    publish_a(
        &bench,
        &open,
        &[
            (Protocol::Udp, 5300, 53, &[]),
            (Protocol::Udp, 5310, 54, &["2001:db8::/64"]),
        ],
    );
    publish_a(
        &bench,
        &quiet,
        &[
            (Protocol::Udp, 5309, 53, &[]),
            (Protocol::Udp, 5409, 54, &[]),
        ],
    );
    publish_a(&bench, &inner, &[(Protocol::Udp, 5311, 53, &[])]);
    let host = HOST_ADDR6;
    let to = |from: &EndpointSpec, dst: Ipv6Addr, port: u16| {
        let src = ip6(from);
        frame(src, dst, &[], UDP, &udp(src, 40000, dst, port, b"?"))
    };

    // Another network's published port, through the host: the isolation chains drop it; an
    // internal network's container reaches nothing beyond its network, even through its own
    // gateway.
    hairpin6_refused(&bench, &quiet.b, to(&quiet.b, host, 5300), "other_network");
    hairpin6_refused(&bench, &open.b, to(&open.b, host, 5309), "other_network");
    let inner_gateway = inner.gateway6();
    hairpin6_refused(
        &bench,
        &inner.b,
        to(&inner.b, inner_gateway, 5300),
        "internal",
    );
    // Without ICC, a neighbour's published port only along a link.
    hairpin6_refused(&bench, &quiet.b, to(&quiet.b, host, 5409), "icc_denied");
    let linked = hairpin6(&bench, &quiet.b, to(&quiet.b, host, 5309), &quiet.a);
    assert_eq!(addr_at(&linked, 8), quiet.gateway6());
    // A source outside the port's --publish-allow ranges, a container as any other.
    hairpin6_refused(&bench, &open.b, to(&open.b, host, 5310), "publish_denied");
    // Within the network: with ICC, and an internal network's own port.
    let (_, _, dst, dport) = ends6(&hairpin6(&bench, &open.b, to(&open.b, host, 5300), &open.a));
    assert_eq!((dst, dport), (ip6(&open.a), 53));
    let within = hairpin6(
        &bench,
        &inner.b,
        to(&inner.b, inner_gateway, 5311),
        &inner.a,
    );
    assert_eq!(ends6(&within).0, inner_gateway);
    // Through the host's address, the internal network's container gets past its veth's
    // program only to its own network's port.
    let sent_to = |port| sent(&bench, &inner.b, BRIDGE_MAC, to(&inner.b, host, port));
    assert_eq!(sent_to(5311), PASS);
    let within = hairpin6(&bench, &inner.b, to(&inner.b, host, 5311), &inner.a);
    assert_eq!(ends6(&within).2, ip6(&inner.a));
    let before = bench.stat("internal");
    assert_eq!(sent_to(5300), DROP);
    assert_eq!(bench.stat("internal"), before + 1);
}

/// The bridge forwards by MAC alone: without ICC, a packet the policy lets through (to the
/// gateway, beyond, along a link) goes on to the bridge only addressed to its IP destination's
/// own MAC, else it would reach whichever container owns the MAC it names, or all of them.
#[test]
fn without_icc_nothing_reaches_another_container_by_its_mac() {
    let bench = Bench::new();
    let quiet = DualStack::new(&bench, 4, false, false);
    let bridge_mac = quiet.net.bridge_mac();
    let (a4, b4) = (quiet.a.ip, quiet.b.ip);
    let (a6, b6) = (ip6(&quiet.a), ip6(&quiet.b));
    let udp4 = |src, dst, dport| tests::frames::udp_frame(src, 5000, dst, dport, true);
    let udp6 = |src, dst, dport| frame(src, dst, &[], UDP, &udp(src, 5000, dst, dport, b"x"));
    let other = [quiet.b.mac, [0xff; 6]];
    // From A to the gateway and beyond, IPv4 and IPv6: only to the bridge's MAC.
    for f in [
        udp4(a4, quiet.net.gateway, 9999),
        udp4(a4, tests::harness::OUTSIDE_ADDR, 9999),
        udp6(a6, quiet.gateway6(), 9999),
        udp6(a6, OUTSIDE_ADDR6, 9999),
    ] {
        assert_ne!(sent(&bench, &quiet.a, bridge_mac, f.clone()), DROP);
        for mac in other {
            dropped(&bench, &quiet.a, mac, f.clone(), "icc_denied");
        }
    }
    // From B along its link to A's UDP 53: straight into A, addressed to A; to anyone else's
    // MAC (or to all) it is dropped.
    for f in [udp4(b4, a4, 53), udp6(b6, a6, 53)] {
        assert_eq!(sent(&bench, &quiet.b, quiet.a.mac, f.clone()), REDIRECT);
        for mac in [bridge_mac, [0xff; 6]] {
            dropped(&bench, &quiet.b, mac, f.clone(), "icc_denied");
        }
    }
}

/// Multicast listening goes to groups; without ICC a listener query or report sent to another
/// container (its global or link-local address) is traffic between the two, refused.
#[test]
fn without_icc_listener_messages_reach_no_other_container() {
    let bench = Bench::new();
    let quiet = DualStack::new(&bench, 4, false, false);
    let (lla, llb) = (link_local(quiet.a.mac), link_local(quiet.b.mac));
    let (a6, b6) = (ip6(&quiet.a), ip6(&quiet.b));
    // Query, report, done, report v2.
    for kind in [130, 131, 132, 143] {
        for (src, dst) in [(lla, llb), (a6, b6)] {
            let f = frame(src, dst, &[], ICMPV6, &icmpv6(src, dst, kind, 0, &[0; 20]));
            dropped(&bench, &quiet.a, quiet.b.mac, f, "icc_denied");
        }
    }
    // A report to the group all routers listen on still goes to the bridge.
    let mld_routers = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16);
    let report = frame(
        lla,
        mld_routers,
        &[],
        ICMPV6,
        &icmpv6(lla, mld_routers, 143, 0, &[0; 20]),
    );
    assert_eq!(
        sent(&bench, &quiet.a, multicast_mac(mld_routers), report),
        PASS
    );
}
