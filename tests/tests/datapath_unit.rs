//! The NAT programs run with BPF_PROG_TEST_RUN on crafted frames, with the maps filled by the
//! real driver (`EbpfDatapath`) in a sandbox: every rewrite is checked byte for byte and by
//! recomputing the checksums (IP options and fragments included); frames the datapath can't
//! translate are dropped with their reason when they go to or come from a container, and left
//! to the host untouched otherwise.

use std::net::Ipv4Addr;

use netd::{
    bpf::Pins,
    datapath::{
        Datapath as _, Protocol,
        ebpf::{EbpfDatapath, stats},
    },
};
use netd_common::datapath::{
    BRIDGE_INGRESS_PROG, ENDPOINT_EGRESS_PROG, ENDPOINT_INGRESS_PROG, MARK_ADMITTED, Timeouts,
    UPLINK_EGRESS_PROG, UPLINK_INGRESS_PROG, UPLINK_XDP_PROG,
};
use tests::{
    frames::*,
    harness::{HOST_ADDR, OUTSIDE_ADDR, UPLINK},
    netdata::{BRIDGE, C1, C2, GATEWAY, endpoint, network},
    progrun::{Bench, DROP, PASS, REDIRECT, Skb, XDP_DROP, XDP_PASS, host_veth},
};

const SERVER: Ipv4Addr = OUTSIDE_ADDR;
const OTHER_HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);

fn at(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Ends {
    Ends {
        src,
        dst,
        sport,
        dport,
    }
}

#[test]
fn masquerade_tcp_rewrites_source_and_reverses_replies() {
    let b = Bench::new();
    let syn = tcp_frame(C1, 20000, SERVER, 80, SYN);
    // The source port is free towards this server: it is kept.
    assert_eq!(b.egress(&syn), at(HOST_ADDR, 20000, SERVER, 80));
    let syn_ack = tcp_frame(SERVER, 80, HOST_ADDR, 20000, SYN | ACK);
    assert_eq!(b.ingress(&syn_ack), at(SERVER, 80, C1, 20000));
    let ack = tcp_frame(C1, 20000, SERVER, 80, ACK);
    assert_eq!(b.egress(&ack), at(HOST_ADDR, 20000, SERVER, 80));
    assert_eq!(b.stat("snat_new"), 1);
    assert_eq!(b.stat("snat_hit"), 2);
}

#[test]
fn masquerade_gives_a_clashing_source_port_another_port() {
    let b = Bench::new();
    assert_eq!(
        b.egress(&tcp_frame(C1, 20000, SERVER, 80, SYN)).sport,
        20000
    );
    let second = b.egress(&tcp_frame(C2, 20000, SERVER, 80, SYN));
    assert_eq!(second.src, HOST_ADDR);
    assert_ne!(
        second.sport, 20000,
        "a port in use towards the same destination was reused"
    );
    // Replies to each translated port reach their own container.
    assert_eq!(
        b.ingress(&tcp_frame(SERVER, 80, HOST_ADDR, 20000, SYN | ACK))
            .dst,
        C1
    );
    let back = b.ingress(&tcp_frame(SERVER, 80, HOST_ADDR, second.sport, SYN | ACK));
    assert_eq!(back, at(SERVER, 80, C2, 20000));
    // Towards another destination the original port is free again.
    assert_eq!(
        b.egress(&tcp_frame(C2, 20000, SERVER, 443, SYN)).sport,
        20000
    );
}

#[test]
fn masquerade_udp_keeps_a_zero_checksum_zero_and_fixes_a_real_one() {
    let b = Bench::new();
    let with_csum = udp_frame(C1, 5000, SERVER, 53, true);
    assert_eq!(b.egress(&with_csum), at(HOST_ADDR, 5000, SERVER, 53));
    assert_eq!(
        b.ingress(&udp_frame(SERVER, 53, HOST_ADDR, 5000, true)),
        at(SERVER, 53, C1, 5000)
    );

    let no_csum = udp_frame(C1, 5001, SERVER, 53, false);
    let (verdict, out) = b.run(UPLINK_EGRESS_PROG, &no_csum);
    assert_eq!(verdict, PASS);
    assert_eq!(ends(&out), at(HOST_ADDR, 5001, SERVER, 53));
    assert_eq!(
        out[L4 + 6..L4 + 8],
        [0, 0],
        "a zero UDP checksum must stay zero"
    );
    assert_checksums(&out, true);
    assert_only_nat_fields_changed(&no_csum, &out);
}

#[test]
fn masquerade_icmp_echo_translates_identifiers() {
    let b = Bench::new();
    let first = b.egress(&icmp_frame(C1, SERVER, true, 77));
    assert_eq!((first.src, first.sport), (HOST_ADDR, 77));
    // The same identifier from another container towards the same server gets another one.
    let second = b.egress(&icmp_frame(C2, SERVER, true, 77));
    assert_eq!(second.src, HOST_ADDR);
    assert_ne!(second.sport, 77);
    let reply = b.ingress(&icmp_frame(SERVER, HOST_ADDR, false, second.sport));
    assert_eq!(reply, at(SERVER, 77, C2, 77));
    assert_eq!(b.ingress(&icmp_frame(SERVER, HOST_ADDR, false, 77)).dst, C1);
}

#[test]
fn published_tcp_port_on_any_address_is_dnated_and_replies_leave_from_it() {
    let b = Bench::new();
    let client = Ipv4Addr::new(198, 18, 0, 1);
    assert_eq!(
        b.ingress(&tcp_frame(client, 5555, HOST_ADDR, 8080, SYN)),
        at(client, 5555, C1, 80)
    );
    assert_eq!(
        b.egress(&tcp_frame(C1, 80, client, 5555, SYN | ACK)),
        at(HOST_ADDR, 8080, client, 5555)
    );
    assert_eq!(
        b.ingress(&tcp_frame(client, 5555, HOST_ADDR, 8080, ACK)),
        at(client, 5555, C1, 80)
    );
    assert_eq!(b.stat("dnat_new"), 1);
    assert_eq!(b.stat("dnat_hit"), 2);
    // "Any" means the host's addresses, not every address routed through the uplink.
    b.assert_untouched(&tcp_frame(client, 5556, OTHER_HOST_ADDR, 8080, SYN));
    // An unpublished port is left to the host.
    b.assert_untouched(&tcp_frame(client, 5557, HOST_ADDR, 8081, SYN));
}

#[test]
fn a_host_address_added_later_reaches_wildcard_ports_once_the_daemon_follows_it() {
    let b = Bench::new();
    let pins = Pins::open(&b.env.bpffs).unwrap();
    // What the daemon does on each round.
    let follow = || {
        let pins = pins.clone();
        b.env.in_ns(&b.env.host_ns(), move || {
            EbpfDatapath::new(pins).follow_host().unwrap().uplink
        })
    };
    let addr = |op: &str| {
        let cidr = format!("{OTHER_HOST_ADDR}/24");
        tests::topology::ip_in(
            &b.env,
            &b.env.host_ns(),
            &["addr", op, &cidr, "dev", UPLINK],
        );
    };
    let client = Ipv4Addr::new(198, 18, 0, 1);
    let syn = |sport| tcp_frame(client, sport, OTHER_HOST_ADDR, 8080, SYN);
    addr("add");
    b.assert_untouched(&syn(5556));
    assert_eq!(follow(), None, "the uplink is the same");
    assert_eq!(b.ingress(&syn(5557)), at(client, 5557, C1, 80));
    // Masquerade stays on the uplink's own address.
    assert_eq!(
        b.egress(&tcp_frame(C1, 40000, client, 80, SYN)).src,
        HOST_ADDR
    );
    addr("del");
    follow();
    b.assert_untouched(&syn(5558));
}

/// Offset of the IPv4 TTL in a frame.
const TTL_OFF: usize = 14 + 8;

#[test]
fn published_flows_go_straight_into_the_container_as_the_bridge_would_send_them() {
    let b = Bench::new();
    let client = Ipv4Addr::new(198, 18, 0, 1);
    // Run where the containers' veths are: the MTU check looks the veth up there.
    let in_host = |frame: &[u8]| {
        b.env
            .in_ns(&b.env.host_ns(), || b.run(UPLINK_INGRESS_PROG, frame))
    };
    let syn = tcp_frame(client, 5555, HOST_ADDR, 8080, SYN);
    let (verdict, out) = in_host(&syn);
    assert_eq!(verdict, REDIRECT, "into the container's namespace");
    assert_eq!(ends(&out), at(client, 5555, C1, 80));
    assert_eq!(out[0..6], endpoint(C1, "", 0).mac, "destination MAC");
    assert_eq!(
        out[6..12],
        netd::core::ipam::mac_for(GATEWAY),
        "source MAC: the bridge's"
    );
    assert_eq!(
        out[TTL_OFF],
        syn[TTL_OFF] - 1,
        "TTL, as routing decrements it"
    );
    assert_checksums(&out, false);

    // Bigger than the container's MTU: translated, then left to the stack, which fragments
    // it or answers "fragmentation needed".
    let big = tcp_frame_carrying(client, 5555, HOST_ADDR, 8080, ACK, &[0; 1500]);
    let (verdict, out) = in_host(&big);
    assert_eq!(verdict, PASS);
    assert_eq!(ends(&out), at(client, 5555, C1, 80));
    assert_eq!(out[TTL_OFF], big[TTL_OFF], "the stack decrements it");
}

#[test]
fn published_udp_port_bound_to_a_host_address() {
    let b = Bench::new();
    let client = Ipv4Addr::new(198, 18, 0, 1);
    assert_eq!(
        b.ingress(&udp_frame(client, 6000, HOST_ADDR, 5353, true)),
        at(client, 6000, C2, 53)
    );
    assert_eq!(
        b.egress(&udp_frame(C2, 53, client, 6000, true)),
        at(HOST_ADDR, 5353, client, 6000)
    );
    // TCP on the same port number is not published.
    b.assert_untouched(&tcp_frame(client, 6000, HOST_ADDR, 5353, SYN));
}

#[test]
fn traffic_from_outside_netd_networks_is_not_translated() {
    let b = Bench::new();
    b.assert_untouched(&tcp_frame(HOST_ADDR, 20000, SERVER, 80, SYN));
    b.assert_untouched(&tcp_frame(
        Ipv4Addr::new(10, 0, 0, 5),
        20000,
        SERVER,
        80,
        SYN,
    ));
    // A reply for which no flow exists.
    b.assert_untouched(&udp_frame(SERVER, 53, HOST_ADDR, 5999, true));
    // A container of a network with masquerading off (`--masquerade=false`) keeps its address.
    let plain = netd::datapath::NetworkSpec {
        id: 2,
        name: "plain".into(),
        bridge: BRIDGE.into(),
        subnet: "10.1.0.0/24".parse().unwrap(),
        gateway: Ipv4Addr::new(10, 1, 0, 1),
        masquerade: false,
        ..network()
    };
    let routed = Ipv4Addr::new(10, 1, 0, 2);
    let veth3 = host_veth(&b.env, "veth3");
    let pins = Pins::open(&b.env.bpffs).unwrap();
    b.env.in_ns(&b.env.host_ns(), || {
        let dp = EbpfDatapath::new(pins).with_host_cgroup(None);
        dp.setup_network(&plain).unwrap();
        dp.add_endpoint(
            &plain,
            &netd::datapath::EndpointSpec {
                network_id: 2,
                ..endpoint(routed, "veth3", veth3)
            },
        )
        .unwrap();
    });
    let from_routed = tcp_frame(routed, 20000, SERVER, 80, SYN);
    assert_eq!(
        b.run(UPLINK_EGRESS_PROG, &from_routed),
        (PASS, from_routed.clone())
    );
    assert!(b.stat("no_nat") >= 6);
}

#[test]
fn new_flows_straight_to_a_container_are_refused_by_tc_and_xdp_alike() {
    let b = Bench::new();
    let client = Ipv4Addr::new(198, 18, 0, 50);
    let unsolicited = [
        tcp_frame(client, 20000, C1, 22, SYN),
        // Even to the port C1 has published: from outside, only through the host's address.
        tcp_frame(client, 20000, C1, 80, SYN),
        udp_frame(client, 20000, C2, 53, true),
        icmp_frame(client, C1, true, 7),
    ];
    for frame in &unsolicited {
        let before = b.stat("unsolicited");
        assert_eq!(b.run(UPLINK_XDP_PROG, frame).0, XDP_DROP);
        assert_eq!(b.run(UPLINK_INGRESS_PROG, frame).0, DROP);
        assert_eq!(b.stat("unsolicited"), before + 2, "each program counts it");
    }

    // What TC translates, XDP passes on untouched: a new flow to a published port, and a reply
    // of a masqueraded flow.
    let published = tcp_frame(client, 20000, HOST_ADDR, 8080, SYN);
    assert_eq!(
        b.run(UPLINK_XDP_PROG, &published),
        (XDP_PASS, published.clone())
    );
    assert_eq!(b.ingress(&published).dst, C1);
    let out = b.egress(&tcp_frame(C1, 41000, SERVER, 80, SYN));
    let reply = tcp_frame(SERVER, 80, HOST_ADDR, out.sport, SYN | ACK);
    assert_eq!(b.run(UPLINK_XDP_PROG, &reply), (XDP_PASS, reply.clone()));
    assert_eq!(b.ingress(&reply).dst, C1);
}

/// Runs `prog` on the ICMP error `frame`: it must pass with the outer addresses, the quoted
/// packet's ends and every checksum right, and no other byte changed. Returns the outer and
/// quoted ends.
fn translate_icmp_error(b: &Bench, prog: &str, frame: &[u8]) -> (Ends, Ends) {
    let (verdict, out) = b.run(prog, frame);
    assert_eq!(verdict, PASS);
    assert_checksums(&out, false);
    assert_quoted_ip_checksum(&out);
    let mutable: Vec<usize> = (IP_CSUM..IP_DST + 4)
        .chain(L4 + 2..L4 + 4)
        .chain(QUOTED + 10..QUOTED + 20)
        .chain(QUOTED_L4..QUOTED_L4 + 6)
        .collect();
    for (i, (x, y)) in frame.iter().zip(&out).enumerate() {
        assert!(
            x == y || mutable.contains(&i),
            "byte {i} changed: {x:#04x} -> {y:#04x}"
        );
    }
    (ends(&out), quoted_ends(&out))
}

const DEST_UNREACH: u8 = 3;
const PORT_UNREACH: u8 = 3;
const FRAG_NEEDED: u8 = 4;
const TIME_EXCEEDED: u8 = 11;

#[test]
fn icmp_errors_about_masqueraded_flows_are_translated_back_with_the_quoted_packet() {
    let b = Bench::new();
    let router = Ipv4Addr::new(198, 18, 0, 254);
    // UDP from C1 masqueraded; the server says "port unreachable" about the translated packet.
    assert_eq!(b.egress(&udp_frame(C1, 5000, SERVER, 53, true)).sport, 5000);
    let sent = &udp_frame(HOST_ADDR, 5000, SERVER, 53, true)[ETH_LEN..];
    let (outer, quoted) = translate_icmp_error(
        &b,
        UPLINK_INGRESS_PROG,
        &icmp_error_frame(SERVER, HOST_ADDR, DEST_UNREACH, PORT_UNREACH, sent),
    );
    assert_eq!((outer.src, outer.dst), (SERVER, C1));
    assert_eq!(quoted, at(C1, 5000, SERVER, 53));

    // TCP from C2 on a port C1 holds towards the server: translated to another port; a router
    // on the way says "fragmentation needed" about it.
    b.egress(&tcp_frame(C1, 20000, SERVER, 80, SYN));
    let port = b.egress(&tcp_frame(C2, 20000, SERVER, 80, SYN)).sport;
    assert_ne!(port, 20000);
    let sent = &tcp_frame(HOST_ADDR, port, SERVER, 80, SYN)[ETH_LEN..];
    let (outer, quoted) = translate_icmp_error(
        &b,
        UPLINK_INGRESS_PROG,
        &icmp_error_frame(router, HOST_ADDR, DEST_UNREACH, FRAG_NEEDED, sent),
    );
    assert_eq!((outer.src, outer.dst), (router, C2));
    assert_eq!(quoted, at(C2, 20000, SERVER, 80));

    // A ping from C2 whose identifier was translated; "TTL exceeded" on the way.
    b.egress(&icmp_frame(C1, SERVER, true, 99));
    let id = b.egress(&icmp_frame(C2, SERVER, true, 99)).sport;
    let sent = &icmp_frame(HOST_ADDR, SERVER, true, id)[ETH_LEN..];
    let (outer, quoted) = translate_icmp_error(
        &b,
        UPLINK_INGRESS_PROG,
        &icmp_error_frame(router, HOST_ADDR, TIME_EXCEEDED, 0, sent),
    );
    assert_eq!((outer.src, outer.dst), (router, C2));
    assert_eq!(quoted, at(C2, 99, SERVER, 99));
    assert_eq!(b.stat("icmp_error"), 3);

    // An error about a flow that doesn't exist passes untouched.
    let unknown = &udp_frame(HOST_ADDR, 5999, SERVER, 53, true)[ETH_LEN..];
    b.assert_untouched(&icmp_error_frame(
        SERVER,
        HOST_ADDR,
        DEST_UNREACH,
        PORT_UNREACH,
        unknown,
    ));
}

#[test]
fn icmp_errors_from_a_container_about_a_published_port_flow_leave_from_the_host() {
    let b = Bench::new();
    let client = Ipv4Addr::new(198, 18, 0, 1);
    assert_eq!(
        b.ingress(&udp_frame(client, 6000, HOST_ADDR, 5353, true))
            .dst,
        C2
    );
    // C2 has nothing on port 53: it answers with "port unreachable" about the DNATed packet.
    let received = &udp_frame(client, 6000, C2, 53, true)[ETH_LEN..];
    let (outer, quoted) = translate_icmp_error(
        &b,
        UPLINK_EGRESS_PROG,
        &icmp_error_frame(C2, client, DEST_UNREACH, PORT_UNREACH, received),
    );
    assert_eq!((outer.src, outer.dst), (HOST_ADDR, client));
    assert_eq!(quoted, at(client, 6000, HOST_ADDR, 5353));
}

/// Runs the bridge program on `frame`: it must redirect it with its ends and checksums right
/// and its MACs set from the bridge's (the frame's destination) to `to_mac`.
fn hairpin(b: &Bench, frame: &[u8], to_mac: [u8; 6]) -> Ends {
    let (verdict, out) = b.run(BRIDGE_INGRESS_PROG, frame);
    assert_eq!(
        verdict, REDIRECT,
        "hairpin traffic goes straight to the container's veth"
    );
    assert_eq!(out[0..6], to_mac, "destination MAC");
    assert_eq!(out[6..12], frame[0..6], "source MAC: the bridge's");
    let mut macs_rewritten = frame.to_vec();
    macs_rewritten[..12].copy_from_slice(&out[..12]);
    assert_only_nat_fields_changed(&macs_rewritten, &out);
    assert_checksums(&out, false);
    ends(&out)
}

#[test]
fn hairpin_to_a_published_port_goes_through_the_gateway_and_back() {
    let b = Bench::new();
    let c1_mac = endpoint(C1, "", 0).mac;
    let c2_mac = endpoint(C2, "", 0).mac;
    // C2 → host:8080 (published → C1:80): to C1 from the gateway.
    let there = hairpin(&b, &tcp_frame(C2, 20000, HOST_ADDR, 8080, SYN), c1_mac);
    assert_eq!(there, at(GATEWAY, 20000, C1, 80));
    let back = hairpin(&b, &tcp_frame(C1, 80, GATEWAY, 20000, SYN | ACK), c2_mac);
    assert_eq!(back, at(HOST_ADDR, 8080, C2, 20000));
    // C1 to its own published port, through the gateway address, from the same port: another
    // gateway port, since 20000 is taken towards C1:80.
    let own = hairpin(&b, &tcp_frame(C1, 20000, GATEWAY, 8080, SYN), c1_mac);
    assert_eq!((own.src, own.dst, own.dport), (GATEWAY, C1, 80));
    assert_ne!(own.sport, 20000);
    assert_eq!(
        hairpin(
            &b,
            &tcp_frame(C1, 80, GATEWAY, own.sport, SYN | ACK),
            c1_mac
        ),
        at(GATEWAY, 8080, C1, 20000)
    );
    assert_eq!((b.stat("hairpin_new"), b.stat("hairpin_hit")), (2, 2));

    // Traffic to the outside is the uplink's: the bridge leaves it alone, even once it is a
    // tracked masqueraded flow.
    let out = tcp_frame(C1, 41000, SERVER, 80, SYN);
    let (verdict, same) = b.run(BRIDGE_INGRESS_PROG, &out);
    assert_eq!((verdict, same), (PASS, out.clone()));
    assert_eq!(b.egress(&out).src, HOST_ADDR);
    let (verdict, same) = b.run(BRIDGE_INGRESS_PROG, &out);
    assert_eq!((verdict, same), (PASS, out));
}

/// The flows `netd conntrack ls` lists.
fn live_flows(pins: &Pins) -> Vec<netd::datapath::ebpf::conntrack::Flow> {
    let mut flows = Vec::new();
    netd::datapath::ebpf::conntrack::for_each_flow(pins, |flow| {
        flows.push(flow);
        Ok(())
    })
    .unwrap();
    flows
}

#[test]
fn timed_out_flows_are_ignored_their_ports_reused_and_swept() {
    let b = Bench::with_timeouts(Timeouts {
        udp: 1,
        ..Timeouts::default()
    });
    let pins = Pins::open(&b.env.bpffs).unwrap();
    assert_eq!(b.egress(&udp_frame(C1, 5000, SERVER, 53, true)).sport, 5000);
    assert_eq!(live_flows(&pins).len(), 1);
    // Idle for twice its timeout: a sweep may remove it.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    // The flow timed out: a late reply is not translated, and the flow is not listed.
    b.assert_untouched(&udp_frame(SERVER, 53, HOST_ADDR, 5000, true));
    assert!(live_flows(&pins).is_empty());
    // Its port is free again towards that server.
    assert_eq!(
        b.egress(&udp_frame(C2, 5000, SERVER, 53, true)),
        at(HOST_ADDR, 5000, SERVER, 53)
    );
    assert_eq!(
        b.ingress(&udp_frame(SERVER, 53, HOST_ADDR, 5000, true)).dst,
        C2
    );
    // Sweeping removes the dead flow's original entry (its reply entry now belongs to C2's
    // flow) and nothing of the live one.
    assert_eq!(netd::datapath::ebpf::conntrack::sweep(&pins).unwrap(), 1);
    let live = live_flows(&pins);
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].original.src, C2);
}

/// The datapath's publishing of tcp *:8080 changed as the controller changes it: published
/// to `target`:80 (`publish`), or that taken back.
fn change_8080(b: &Bench, target: Ipv4Addr, publish: bool) {
    let pins = Pins::open(&b.env.bpffs).unwrap();
    b.env.in_ns(&b.env.host_ns(), || {
        let dp = EbpfDatapath::new(pins).with_host_cgroup(None);
        let ports = [tests::netdata::port(Protocol::Tcp, None, 8080, target, 80)];
        let changed = if publish {
            dp.publish(&network(), &ports)
        } else {
            dp.unpublish(&network(), &ports)
        };
        changed.unwrap();
    });
}

/// A connection from `client:sport` to the published *:8080 (C1:80), opened and closed by
/// FINs both ways.
fn closed_published_connection(b: &Bench, client: Ipv4Addr, sport: u16) {
    let inbound = |flags| b.ingress(&tcp_frame(client, sport, HOST_ADDR, 8080, flags));
    let outbound = |flags| b.egress(&tcp_frame(C1, 80, client, sport, flags));
    inbound(SYN);
    outbound(SYN | ACK);
    inbound(ACK);
    inbound(FIN | ACK);
    outbound(FIN | ACK);
}

/// How many entries each conntrack table has: assured, then unassured.
fn table_sizes(b: &Bench) -> [usize; 2] {
    let pins = Pins::open(&b.env.bpffs).unwrap();
    netd::datapath::ebpf::maps::conntrack(&pins)
        .unwrap()
        .map(|table| table.keys().count())
}

/// A SYN reopening a closed flow's tuple is a new flow, checked as any other (as netfilter
/// kills a closed entry a SYN reopens): with its port unpublished since, it reaches no
/// container; published to another container since, it goes there. The closed flow's
/// entries used to take it where they pointed.
#[test]
fn a_syn_reopening_a_closed_published_flow_is_checked_as_a_new_flow() {
    let b = Bench::new();
    let client = Ipv4Addr::new(198, 18, 0, 1);
    closed_published_connection(&b, client, 5555);
    assert_eq!(
        live_flows(&Pins::open(&b.env.bpffs).unwrap())[0].state,
        "TIME_WAIT"
    );
    let reopen = tcp_frame(client, 5555, HOST_ADDR, 8080, SYN);
    change_8080(&b, C1, false);
    b.assert_untouched(&reopen);
    // Published again, the same SYN reopens the tuple: to where the port goes now.
    change_8080(&b, C2, true);
    assert_eq!(b.ingress(&reopen), at(client, 5555, C2, 80));
}

/// The same for a masqueraded flow: a SYN reopening a closed flow of C1's that comes in
/// anywhere but where C1's packets do is spoofed (`martian`), as a new flow's would be.
#[test]
fn a_syn_reopening_a_closed_masqueraded_flow_must_come_in_where_the_containers_packets_do() {
    let b = Bench::new();
    let outbound = |flags| tcp_frame(C1, 41000, SERVER, 80, flags);
    let port = b.egress(&outbound(SYN)).sport;
    let inbound = |flags| b.ingress(&tcp_frame(SERVER, 80, HOST_ADDR, port, flags));
    inbound(SYN | ACK);
    b.egress(&outbound(ACK));
    b.egress(&outbound(FIN | ACK));
    inbound(FIN | ACK);
    let before = b.stat("martian");
    let spoofed = b.run_from(
        UPLINK_EGRESS_PROG,
        &outbound(SYN),
        UPLINK,
        b.ifindex(UPLINK),
    );
    assert_eq!(spoofed.0, DROP, "reopened from the uplink's side");
    assert_eq!(b.stat("martian"), before + 1);
    // The control: from C1's veth, the same SYN reopens the flow on its port.
    let honest = b.run_from(UPLINK_EGRESS_PROG, &outbound(SYN), UPLINK, b.veths[0]);
    assert_eq!(honest.0, PASS);
    assert_eq!(ends(&honest.1), at(HOST_ADDR, port, SERVER, 80));
}

/// A new flow with a finished flow's tuple and translation takes its entries over where they
/// are, closed or timed out: no inserts, and the flow stays in the assured table (a client
/// reconnecting from its port, as the benchmark's do between rounds, costs lookups only).
/// Idle for more than twice its timeout, a flow is a sweep's: a new one gets entries of its own.
#[test]
fn a_finished_flows_entries_are_taken_over_in_place_by_the_same_flow_again() {
    let b = Bench::with_timeouts(Timeouts {
        tcp_time_wait: 1,
        ..Timeouts::default()
    });
    let pins = Pins::open(&b.env.bpffs).unwrap();
    let client = Ipv4Addr::new(198, 18, 0, 1);
    let syn = tcp_frame(client, 5555, HOST_ADDR, 8080, SYN);
    for wait_ms in [0, 1500] {
        closed_published_connection(&b, client, 5555);
        assert_eq!(table_sizes(&b), [2, 0], "promoted once established");
        // Closed (TIME_WAIT), then timed out too.
        std::thread::sleep(std::time::Duration::from_millis(wait_ms));
        let news = b.stat("dnat_new");
        assert_eq!(b.ingress(&syn), at(client, 5555, C1, 80));
        assert_eq!(
            b.stat("dnat_new"),
            news + 1,
            "a new flow, after {wait_ms} ms"
        );
        assert_eq!(table_sizes(&b), [2, 0], "taken over, after {wait_ms} ms");
        let flows = live_flows(&pins);
        assert_eq!((flows[0].state, flows[0].original.packets), ("SYN_SENT", 1));
    }
    closed_published_connection(&b, client, 5555);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(b.ingress(&syn), at(client, 5555, C1, 80));
    assert_eq!(table_sizes(&b), [0, 2], "new entries, unassured");
}

/// A masqueradable TCP SYN from C1, mangled by `edit`.
fn mangled(edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut frame = tcp_frame(C1, 41000, SERVER, 80, SYN);
    edit(&mut frame);
    frame
}

/// The same mangling of a frame from the outside to C1, and of one to the host.
fn mangled_in(to: Ipv4Addr, edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut frame = tcp_frame(SERVER, 80, to, 41000, SYN | ACK);
    edit(&mut frame);
    frame
}

/// What a firewall does with a frame NAT can't translate: `from_c1` (from C1 to the outside)
/// is dropped on the uplink's egress, `to_c1` (from outside to C1) on its ingress, each
/// counted under `reason` (and the egress one under `out_reason` where that differs); the
/// bridge and the XDP program leave them to the rest, untouched. `to_host`, the same defect
/// between the outside and the host, is the host's business: it passes untouched.
fn check_dropped(b: &Bench, from_c1: &[u8], to_c1: &[u8], to_host: &[u8], reason: &str) {
    let before = b.stat(reason);
    assert_eq!(
        b.run(UPLINK_EGRESS_PROG, from_c1).0,
        DROP,
        "egress: {reason}"
    );
    assert_eq!(
        b.run(UPLINK_INGRESS_PROG, to_c1).0,
        DROP,
        "ingress: {reason}"
    );
    assert_eq!(b.stat(reason), before + 2, "both drops counted as {reason}");
    let (verdict, out) = b.run(BRIDGE_INGRESS_PROG, from_c1);
    assert_eq!(
        (verdict, out.as_slice()),
        (PASS, from_c1),
        "bridge: {reason}"
    );
    let (verdict, out) = b.run(UPLINK_XDP_PROG, to_c1);
    assert_eq!(
        (verdict, out.as_slice()),
        (XDP_PASS, to_c1),
        "xdp: {reason}"
    );
    let (verdict, out) = b.run(UPLINK_INGRESS_PROG, to_host);
    assert_eq!(
        (verdict, out.as_slice()),
        (PASS, to_host),
        "to the host: {reason}"
    );
}

/// An 802.1Q tag with VLAN id `vid` in front of the frame's EtherType.
fn tagged(vid: u16) -> impl Fn(&mut Vec<u8>) {
    move |f| drop(f.splice(12..12, [0x81, 0x00, (vid >> 8) as u8, vid as u8]))
}

#[test]
fn frames_nat_cannot_translate_are_dropped_to_and_from_containers_with_their_reason() {
    let b = Bench::new();
    // Sanity: unmangled, the frames are translated.
    assert_eq!(b.egress(&mangled(|_| {})).src, HOST_ADDR);

    let check = |edit: &dyn Fn(&mut Vec<u8>), reason: &str| {
        check_dropped(
            &b,
            &mangled(edit),
            &mangled_in(C1, edit),
            &mangled_in(HOST_ADDR, edit),
            reason,
        );
    };
    // Frames shorter than an Ethernet header, or than an IPv4 header when the EtherType says
    // IPv4, never reach a program: BPF_PROG_TEST_RUN refuses them (EINVAL), as the stack never
    // builds such skbs. Truncation is tested from there on.
    // Truncated L3: the IPv4 header is whole, the datagram is 4 bytes shorter than it says.
    check(&|f| f.truncate(f.len() - 4), "truncated_l3");
    // Truncated L4: the datagram ends 4 bytes into the TCP header.
    check(
        &|f| {
            f.truncate(L4 + 4);
            f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&((IP_LEN + 4) as u16).to_be_bytes());
            fix_ip_csum(f);
        },
        "truncated_l4",
    );
    // Bad IHL (4 words, shorter than a header) and a bad version.
    check(&|f| f[ETH_LEN] = 0x44, "bad_ip_header");
    check(&|f| f[ETH_LEN] = 0x65, "bad_ip_header");
    // A later fragment whose first fragment was never seen: nothing says what its ports are.
    check(
        &|f| {
            f[ETH_LEN + 6] = 0x00;
            f[ETH_LEN + 7] = 1;
            fix_ip_csum(f)
        },
        "fragment",
    );
    // VLAN: an 802.1Q tag, and a priority tag (VLAN 0, which the stack strips and routes).
    check(&tagged(5), "vlan");
    check(&tagged(0), "vlan");
    // Two tags: QinQ, or priority tags, which the stack strips one after the other.
    check(
        &|f| {
            tagged(5)(f);
            tagged(0)(f)
        },
        "vlan",
    );
    // Tags nested deeper than the programs read: whatever they carry, to whomever, dropped.
    let deep = |f: &mut Vec<u8>| (0..4).for_each(|_| tagged(0)(f));
    for frame in [
        mangled(deep),
        mangled_in(C1, deep),
        mangled_in(HOST_ADDR, deep),
    ] {
        for prog in [UPLINK_EGRESS_PROG, UPLINK_INGRESS_PROG] {
            let before = b.stat("vlan");
            assert_eq!(b.run(prog, &frame).0, DROP, "{prog}: four tags");
            assert_eq!(b.stat("vlan"), before + 1, "{prog}: four tags counted");
        }
    }
    // ICMP other than echo and errors (here: a timestamp request).
    let timestamp = |src, dst| {
        eth(
            0x0800,
            &ipv4(src, dst, ICMP, &[13, 0, 0xf2, 0xff, 0, 0, 0, 0]),
        )
    };
    check_dropped(
        &b,
        &timestamp(C1, SERVER),
        &timestamp(SERVER, C1),
        &timestamp(SERVER, HOST_ADDR),
        "unsupported_proto",
    );
    // An ICMP error about no flow: to a container it is dropped; from one it would leave with
    // its private address.
    let quoted = udp_frame(HOST_ADDR, 5555, SERVER, 53, true);
    let about_nothing = icmp_error_frame(
        SERVER,
        C1,
        DEST_UNREACH,
        PORT_UNREACH,
        &quoted[L4 - IP_LEN..],
    );
    let before = b.stat("icmp_no_flow");
    assert_eq!(b.run(UPLINK_INGRESS_PROG, &about_nothing).0, DROP);
    assert_eq!(b.stat("icmp_no_flow"), before + 1);
    let quoted = udp_frame(SERVER, 53, C1, 5555, true);
    let from_c1 = icmp_error_frame(
        C1,
        SERVER,
        DEST_UNREACH,
        PORT_UNREACH,
        &quoted[L4 - IP_LEN..],
    );
    let before = b.stat("unmasqueraded");
    assert_eq!(b.run(UPLINK_EGRESS_PROG, &from_c1).0, DROP);
    assert_eq!(b.stat("unmasqueraded"), before + 1);
    // A TCP RST from C1 that belongs to no flow: nothing to masquerade it for, and it must
    // not leave as it is.
    let before = b.stat("unmasqueraded");
    assert_eq!(
        b.run(UPLINK_EGRESS_PROG, &tcp_frame(C1, 41001, SERVER, 80, 0x04))
            .0,
        DROP
    );
    assert_eq!(b.stat("unmasqueraded"), before + 1);
    // Non-IP (ARP) is the host's: it passes untouched.
    check_untouched(&b, &eth(0x0806, &[0u8; 28]), "not_ipv4");
    // Nothing above created a flow.
    let pins = Pins::open(&b.env.bpffs).unwrap();
    assert_eq!(live_flows(&pins).len(), 1);
}

/// `frame` passes every program untouched, the uplink's counting it under `reason`.
fn check_untouched(b: &Bench, frame: &[u8], reason: &str) {
    let before = b.stat(reason);
    b.assert_untouched(frame);
    assert_eq!(
        b.stat(reason),
        before + 2,
        "both uplink programs count {reason}"
    );
}

#[test]
fn ip_options_are_translated_with_the_header_checksum_covering_them() {
    let b = Bench::new();
    // Masquerade with a record-route option (ping -R), both ways.
    let out = with_ip_options(tcp_frame(C1, 41000, SERVER, 80, SYN), &record_route(9));
    let there = b.egress(&out);
    assert_eq!((there.src, there.dst, there.dport), (HOST_ADDR, SERVER, 80));
    let reply = with_ip_options(
        tcp_frame(SERVER, 80, HOST_ADDR, there.sport, SYN | ACK),
        &record_route(2),
    );
    assert_eq!(b.ingress(&reply), at(SERVER, 80, C1, 41000));
    // A published port, with NOP options; the reply leaves from the published port.
    let syn = with_ip_options(
        tcp_frame(SERVER, 40000, HOST_ADDR, 8080, SYN),
        &[1, 1, 1, 1],
    );
    assert_eq!(b.ingress(&syn), at(SERVER, 40000, C1, 80));
    let back = with_ip_options(tcp_frame(C1, 80, SERVER, 40000, SYN | ACK), &[1, 1, 1, 1]);
    assert_eq!(b.egress(&back), at(HOST_ADDR, 8080, SERVER, 40000));
    // An echo request with options, and a UDP datagram.
    let ping = with_ip_options(icmp_frame(C1, SERVER, true, 77), &record_route(9));
    assert_eq!(b.egress(&ping).src, HOST_ADDR);
    let dns = with_ip_options(udp_frame(C1, 5353, SERVER, 53, true), &[1, 1, 1, 0]);
    assert_eq!(b.egress(&dns).src, HOST_ADDR);
}

#[test]
fn fragments_are_translated_by_their_first_fragments_ports() {
    let b = Bench::new();
    // A 200-byte UDP datagram from C1, in two fragments: the first carries the UDP header.
    let datagram = udp_frame_carrying(C1, 6000, SERVER, 53, &[0x5a; 192]);
    let (first, later) = fragments(&datagram, 96, 0x4242);
    let (verdict, first_out) = b.run(UPLINK_EGRESS_PROG, &first);
    assert_eq!(verdict, PASS);
    let (verdict, later_out) = b.run(UPLINK_EGRESS_PROG, &later);
    assert_eq!(verdict, PASS, "the later fragment follows its first");
    assert_ip_checksum(&first_out);
    assert_ip_checksum(&later_out);
    assert_eq!(
        &later_out[L4..],
        &later[L4..],
        "a later fragment's payload is not touched"
    );
    let whole = reassemble(&first_out, &later_out);
    assert_checksums(&whole, false);
    let there = ends(&whole);
    assert_eq!((there.src, there.dst, there.dport), (HOST_ADDR, SERVER, 53));
    // The reply, fragmented too, goes back to C1.
    let reply = udp_frame_carrying(SERVER, 53, HOST_ADDR, there.sport, &[0xa5; 192]);
    let (first, later) = fragments(&reply, 64, 0x1717);
    let (v1, first_in) = b.run(UPLINK_INGRESS_PROG, &first);
    let (v2, later_in) = b.run(UPLINK_INGRESS_PROG, &later);
    assert_eq!((v1, v2), (PASS, PASS));
    let whole = reassemble(&first_in, &later_in);
    assert_checksums(&whole, false);
    assert_eq!(ends(&whole), at(SERVER, 53, C1, 6000));
    // A later fragment of another datagram (its first never seen) is dropped on its way to
    // a container, and left to the host on its way to the host (the stack reassembles it).
    let stray_to = |dst| {
        fragments(
            &udp_frame_carrying(SERVER, 53, dst, 6000, &[0; 192]),
            64,
            0x1718,
        )
        .1
    };
    let before = b.stat("fragment");
    assert_eq!(b.run(UPLINK_INGRESS_PROG, &stray_to(C1)).0, DROP);
    assert_eq!(b.stat("fragment"), before + 1);
    let to_host = stray_to(HOST_ADDR);
    assert_eq!(
        b.run(UPLINK_INGRESS_PROG, &to_host),
        (PASS, to_host.clone())
    );
}

const GRE: u8 = 47;

#[test]
fn other_ip_protocols_are_masqueraded_by_address() {
    let b = Bench::new();
    let gre = |src, dst| eth(0x0800, &ipv4(src, dst, GRE, &[0, 0, 0x08, 0, 1, 2, 3, 4]));
    let out = gre(C1, SERVER);
    let there = b.egress(&out);
    assert_eq!((there.src, there.dst), (HOST_ADDR, SERVER));
    let back = b.ingress(&gre(SERVER, HOST_ADDR));
    assert_eq!((back.src, back.dst), (SERVER, C1));
    // One tuple per destination: a second container's GRE to the same server can't have it.
    assert_eq!(b.run(UPLINK_EGRESS_PROG, &gre(C2, SERVER)).0, DROP);
    // Unsolicited, straight to a container: refused as any new flow.
    let before = b.stat("unsolicited");
    assert_eq!(
        b.run(UPLINK_INGRESS_PROG, &gre(OTHER_HOST_ADDR, C2)).0,
        DROP
    );
    assert_eq!(b.stat("unsolicited"), before + 1);
}

/// A RST is checked against the receiver's window scaled by the shift its SYN announced, when
/// both SYNs announced one (RFC 7323): a RST half a MiB past the server's data closes a flow
/// whose client advertised a 1 MiB window (1000 << 10), and not one whose client didn't
/// scale (64 KiB at least), nor one where only the client announced a scale.
#[test]
fn a_rst_is_checked_against_the_scaled_window() {
    let b = Bench::new();
    // MSS, then NOP, window scale 10.
    let client_scale = vec![2, 4, 5, 0xb4, 1, 3, 3, 10];
    // NOP, window scale 2 (after a SACK-permitted: the walk goes past other options).
    let server_scale = vec![4, 2, 1, 1, 1, 3, 3, 2];
    let frame = |src, dst, header: TcpHeader| {
        eth(
            0x0800,
            &ipv4(src, dst, TCP, &tcp_segment(src, dst, &header, b"")),
        )
    };
    let closed_by_far_rst = |sport: u16, client_options: Vec<u8>, server_options: Vec<u8>| {
        let from_client = |flags, seq, options| {
            frame(
                C1,
                SERVER,
                TcpHeader {
                    sport,
                    dport: 80,
                    flags,
                    seq,
                    window: 1000,
                    options,
                },
            )
        };
        let nat_port = b.egress(&from_client(SYN, 1000, client_options)).sport;
        let from_server = |flags, seq, options| {
            frame(
                SERVER,
                HOST_ADDR,
                TcpHeader {
                    sport: 80,
                    dport: nat_port,
                    flags,
                    seq,
                    window: 1000,
                    options,
                },
            )
        };
        assert_eq!(
            b.ingress(&from_server(SYN | ACK, 5000, server_options)).dst,
            C1
        );
        assert_eq!(b.egress(&from_client(ACK, 1001, vec![])).sport, nat_port);
        let refused = b.stat("rst_out_of_window");
        b.ingress(&from_server(RST, 5001 + 500_000, vec![]));
        b.stat("rst_out_of_window") == refused
    };
    assert!(
        closed_by_far_rst(43000, client_scale.clone(), server_scale.clone()),
        "both scale"
    );
    assert!(!closed_by_far_rst(43001, vec![], vec![]), "neither scales");
    assert!(
        !closed_by_far_rst(43002, client_scale, vec![]),
        "only the client announced one"
    );
}

/// Other IP protocols time out on the generic timeout (`nf_conntrack_generic_timeout`: 600 s),
/// not ICMP's: an idle GRE tunnel outlives the ICMP timeout, and dies after its own.
#[test]
fn other_ip_protocols_time_out_on_the_generic_timeout() {
    let b = Bench::with_timeouts(Timeouts {
        icmp: 1,
        generic: 3,
        ..Timeouts::default()
    });
    let gre = |src, dst| eth(0x0800, &ipv4(src, dst, GRE, &[0, 0, 0x08, 0, 1, 2, 3, 4]));
    assert_eq!(b.egress(&gre(C1, SERVER)).src, HOST_ADDR);
    std::thread::sleep(std::time::Duration::from_millis(2200));
    // Past ICMP's timeout: still the flow's.
    assert_eq!(b.ingress(&gre(SERVER, HOST_ADDR)).dst, C1);
    std::thread::sleep(std::time::Duration::from_millis(4200));
    // Past its own, idle since the reply: gone, a late packet is no longer translated.
    b.assert_untouched(&gre(SERVER, HOST_ADDR));
    assert_eq!(Timeouts::default().generic, 600);
}

#[test]
fn dnat_refuses_martian_sources() {
    let b = Bench::new();
    for src in [
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(0, 1, 2, 3),
        Ipv4Addr::new(224, 0, 0, 5),
        HOST_ADDR,
        C2,
        GATEWAY,
        Ipv4Addr::new(172, 17, 200, 9),
    ] {
        let before = b.stat("martian");
        let syn = tcp_frame(src, 40000, HOST_ADDR, 8080, SYN);
        assert_eq!(b.run(UPLINK_INGRESS_PROG, &syn).0, DROP, "from {src}");
        assert_eq!(b.stat("martian"), before + 1, "from {src}");
    }
    // Control: from the outside, the same SYN is DNATed.
    assert_eq!(
        b.ingress(&tcp_frame(SERVER, 40000, HOST_ADDR, 8080, SYN))
            .dst,
        C1
    );
}

/// A container subnet's address as the source of a packet from outside is spoofed: routed
/// back out, it would start a masqueraded flow in the container's name whose replies reach
/// the container; as an ICMP error's source, it would speak for a container to another.
#[test]
fn a_container_subnets_source_from_outside_is_dropped_as_martian() {
    let b = Bench::new();
    assert_eq!(b.egress(&udp_frame(C1, 5000, SERVER, 53, true)).sport, 5000);
    let sent = &udp_frame(HOST_ADDR, 5000, SERVER, 53, true)[ETH_LEN..];
    for src in [C1, C2, GATEWAY, Ipv4Addr::new(172, 17, 200, 9)] {
        for frame in [
            udp_frame(src, 53, SERVER, 7777, true),
            tcp_frame(src, 22, OTHER_HOST_ADDR, 7777, SYN),
            icmp_error_frame(src, HOST_ADDR, DEST_UNREACH, PORT_UNREACH, sent),
        ] {
            let before = b.stat("martian");
            assert_eq!(b.run(UPLINK_INGRESS_PROG, &frame).0, DROP, "from {src}");
            assert_eq!(b.stat("martian"), before + 1, "from {src}");
        }
    }
    // Control: from the outside's own address the error is the flow's.
    let error = icmp_error_frame(SERVER, HOST_ADDR, DEST_UNREACH, PORT_UNREACH, sent);
    let (outer, _) = translate_icmp_error(&b, UPLINK_INGRESS_PROG, &error);
    assert_eq!(outer.dst, C1);
}

/// Drops are counted per container against a container's address only: spoofed sources
/// spread over a container subnet from outside make no entries of their own (a sender picking
/// the keys would fill `ENDPOINT_DROPS`, and the containers' drops would go uncounted), while
/// one spoofing C1's address counts against C1.
#[test]
fn spoofed_subnet_sources_make_no_per_container_drop_entries() {
    let b = Bench::new();
    let pins = Pins::open(&b.env.bpffs).unwrap();
    let before = b.stat("martian");
    for host in 1..=200 {
        let src = Ipv4Addr::new(172, 17, 200, host);
        let frame = udp_frame(src, 53, SERVER, 7777, true);
        assert_eq!(b.run(UPLINK_INGRESS_PROG, &frame).0, DROP, "from {src}");
    }
    assert_eq!(b.stat("martian"), before + 200);
    assert!(stats::read_endpoint_drops(&pins).unwrap().is_empty());
    let spoofed = udp_frame(C1, 53, SERVER, 7777, true);
    assert_eq!(b.run(UPLINK_INGRESS_PROG, &spoofed).0, DROP);
    let drops = stats::read_endpoint_drops(&pins).unwrap();
    assert_eq!(drops.len(), 1, "one entry, C1's");
    assert_eq!((drops[0].endpoint, drops[0].dropped), (C1, 1));
}

/// A new flow with a container's source starts (is masqueraded) only when it came into the
/// host through that container's veth or its network's bridge, or through no interface (the
/// host's own, a fragment the host cut). Through any other (an interface without netd's
/// programs; here the uplink itself and C2's veth) its source is spoofed, and the answers to
/// a flow in the container's name would reach the container.
#[test]
fn a_containers_new_flow_out_starts_only_where_its_packets_come_in() {
    let b = Bench::new();
    let way_in = |sport: u16, ifindex: u32| {
        let frame = udp_frame(C1, sport, SERVER, 53, true);
        (
            frame.clone(),
            b.run_from(UPLINK_EGRESS_PROG, &frame, UPLINK, ifindex),
        )
    };
    for (sport, ifindex) in [(5001, b.veths[0]), (5002, b.bridge_ifindex()), (5003, 0)] {
        let (frame, run) = way_in(sport, ifindex);
        assert_eq!(run.0, PASS, "in through {ifindex}");
        assert_only_nat_fields_changed(&frame, &run.1);
        assert_eq!(ends(&run.1).src, HOST_ADDR, "in through {ifindex}");
    }
    for (sport, ifindex) in [(5004, b.ifindex(UPLINK)), (5005, b.veths[1])] {
        let before = b.stat("martian");
        assert_eq!(way_in(sport, ifindex).1.0, DROP, "in through {ifindex}");
        assert_eq!(b.stat("martian"), before + 1, "in through {ifindex}");
        // Nothing was tracked: an answer is no flow's, the host's.
        let answer = udp_frame(SERVER, 53, HOST_ADDR, sport, true);
        assert_eq!(b.run(UPLINK_INGRESS_PROG, &answer), (PASS, answer));
    }
}

/// A container's ICMP error about a packet another container got is dropped on its way out:
/// it would end or clamp that container's flow.
#[test]
fn a_container_sends_icmp_errors_only_about_its_own_flows() {
    let b = Bench::new();
    let client = Ipv4Addr::new(198, 18, 0, 1);
    // C2's published flow, and C1's masqueraded one.
    assert_eq!(
        b.ingress(&udp_frame(client, 6000, HOST_ADDR, 5353, true))
            .dst,
        C2
    );
    assert_eq!(b.egress(&udp_frame(C1, 5000, SERVER, 53, true)).sport, 5000);
    let got_by_c2 = &udp_frame(client, 6000, C2, 53, true)[ETH_LEN..];
    let got_by_c1 = &udp_frame(SERVER, 53, C1, 5000, true)[ETH_LEN..];
    for (from, to, quoted) in [(C1, client, got_by_c2), (C2, SERVER, got_by_c1)] {
        let before = b.stat("icmp_no_flow");
        let error = icmp_error_frame(from, to, DEST_UNREACH, PORT_UNREACH, quoted);
        assert_eq!(b.run(UPLINK_EGRESS_PROG, &error).0, DROP, "from {from}");
        assert_eq!(b.stat("icmp_no_flow"), before + 1, "from {from}");
    }
    // Control: each container's own error leaves from the host.
    for (from, to, quoted) in [(C2, client, got_by_c2), (C1, SERVER, got_by_c1)] {
        let error = icmp_error_frame(from, to, DEST_UNREACH, PORT_UNREACH, quoted);
        let (outer, _) = translate_icmp_error(&b, UPLINK_EGRESS_PROG, &error);
        assert_eq!(outer.src, HOST_ADDR, "from {from}");
    }
}

/// A UDP flow is assured by whichever of its packets comes first after it has been answered
/// and has lasted: a reply too. Both directions go on being translated.
#[test]
fn a_flow_assured_by_a_reply_keeps_both_directions() {
    let b = Bench::new();
    let pins = Pins::open(&b.env.bpffs).unwrap();
    assert_eq!(b.egress(&udp_frame(C1, 5000, SERVER, 53, true)).sport, 5000);
    let reply = udp_frame(SERVER, 53, HOST_ADDR, 5000, true);
    assert_eq!(b.ingress(&reply).dst, C1);
    // Past CT_ASSURE_AFTER_NS (2 s), a reply comes first.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(b.ingress(&reply).dst, C1);
    let flows = live_flows(&pins);
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert!(flows[0].assured, "{flows:?}");
    assert_eq!(flows[0].reply.src, SERVER, "{flows:?}");
    // Both directions still translate, in the same flow.
    let new_before = b.stat("snat_new");
    assert_eq!(b.ingress(&reply).dst, C1);
    assert_eq!(b.egress(&udp_frame(C1, 5000, SERVER, 53, true)).sport, 5000);
    assert_eq!(b.ingress(&reply).dst, C1);
    assert_eq!(b.stat("snat_new"), new_before);
    assert_eq!(live_flows(&pins).len(), 1);
}

#[test]
fn masquerade_drops_a_new_flow_when_every_port_towards_its_destination_is_taken() {
    use netd_common::datapath::{
        AF_INET, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_ESTABLISHED, CT_NAT_SNAT, CtEntry, CtKey,
        addr_v4,
    };
    let b = Bench::new();
    let pins = Pins::open(&b.env.bpffs).unwrap();
    // Live masqueraded flows from a third container hold every port of HOST_ADDR towards
    // SERVER:80 (as 64,512 connections would).
    let other = Ipv4Addr::new(172, 17, 0, 9);
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let now_ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    let [mut table, _] = netd::datapath::ebpf::maps::conntrack(&pins).unwrap();
    let tuple = |src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16| CtKey {
        saddr: addr_v4(src.octets()),
        daddr: addr_v4(dst.octets()),
        sport,
        dport,
        proto: TCP,
        family: AF_INET,
        _pad: [0; 2],
    };
    for port in 0..=u16::MAX {
        let original = tuple(other, port, SERVER, 80);
        let reply = tuple(SERVER, 80, HOST_ADDR, port);
        let entry = CtEntry {
            original,
            reply,
            nat: CT_NAT_SNAT,
            state: CT_ESTABLISHED,
            created_ns: now_ns,
            last_seen_ns: now_ns,
            ..Default::default()
        };
        table
            .insert(
                reply,
                CtEntry {
                    dir: CT_DIR_REPLY,
                    ..entry
                },
                0,
            )
            .unwrap();
        table
            .insert(
                original,
                CtEntry {
                    dir: CT_DIR_ORIGINAL,
                    ..entry
                },
                0,
            )
            .unwrap();
    }
    let (verdict, _) = b.run(UPLINK_EGRESS_PROG, &tcp_frame(C1, 20000, SERVER, 80, SYN));
    assert_eq!(verdict, 2, "TC_ACT_SHOT: no port to translate to");
    assert_eq!(b.stat("port_exhausted"), 1);
    let drops = stats::read_endpoint_drops(&pins).unwrap();
    assert_eq!(drops.len(), 1);
    assert_eq!((drops[0].endpoint, drops[0].dropped), (C1, 1));
    // Towards another destination port, the host's ports are free.
    assert_eq!(
        b.egress(&tcp_frame(C1, 20000, SERVER, 443, SYN)).sport,
        20000
    );
}

#[test]
fn a_full_conntrack_table_evicts_idle_flows_and_keeps_active_ones() {
    const ENTRIES: u32 = 4096;
    let b = Bench::with(Timeouts::default(), ENTRIES);
    let pins = Pins::open(&b.env.bpffs).unwrap();
    assert_eq!(
        b.egress(&tcp_frame(C1, 20000, SERVER, 80, SYN)).sport,
        20000
    );
    // Three times as many new flows as the table holds, the first flow active throughout.
    for i in 0..3 * ENTRIES / 2 {
        let port = 10_000 + i as u16;
        assert_eq!(
            b.egress(&udp_frame(C2, port, SERVER, 53, true)).src,
            HOST_ADDR
        );
        if i % 64 == 0 {
            assert_eq!(
                b.ingress(&tcp_frame(SERVER, 80, HOST_ADDR, 20000, ACK)).dst,
                C1,
                "after {i} new flows"
            );
        }
    }
    for table in netd::datapath::ebpf::maps::conntrack(&pins).unwrap() {
        let count = table.keys().count();
        assert!(count <= ENTRIES as usize, "{count} entries");
    }
    assert_eq!(b.stat("conntrack_full"), 0, "new flows are admitted");
    // The latest flow is tracked; the active one too.
    assert_eq!(
        b.ingress(&udp_frame(
            SERVER,
            53,
            HOST_ADDR,
            10_000 + (3 * ENTRIES / 2 - 1) as u16,
            true
        ))
        .dst,
        C2
    );
    assert_eq!(
        b.ingress(&tcp_frame(SERVER, 80, HOST_ADDR, 20000, ACK)).dst,
        C1
    );
}

/// The monotonic clock the datapath stamps flows with, in ns.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[test]
fn an_entry_whose_partner_was_evicted_or_taken_never_delivers_to_another_container() {
    use netd_common::datapath::{AF_INET, CtKey, addr_v4};
    let b = Bench::new();
    let pins = Pins::open(&b.env.bpffs).unwrap();
    // C1's flow holds HOST_ADDR:20000 towards SERVER:80.
    assert_eq!(
        b.egress(&tcp_frame(C1, 20000, SERVER, 80, SYN)).sport,
        20000
    );
    let reply = CtKey {
        saddr: addr_v4(SERVER.octets()),
        daddr: addr_v4(HOST_ADDR.octets()),
        sport: 80,
        dport: 20000,
        proto: TCP,
        family: AF_INET,
        _pad: [0; 2],
    };
    // The LRU evicts its reply entry; C2 then gets the tuple for a flow of its own.
    let [_, mut unassured] = netd::datapath::ebpf::maps::conntrack(&pins).unwrap();
    unassured.remove(&reply).unwrap();
    assert_eq!(
        b.egress(&tcp_frame(C2, 20000, SERVER, 80, SYN)).sport,
        20000
    );
    // C1's original entry no longer has its reply entry pointing back: it is not trusted.
    // C1's next packet starts a flow on another port, and replies on 20000 reach C2 only.
    let moved = b.egress(&tcp_frame(C1, 20000, SERVER, 80, ACK)).sport;
    assert_ne!(moved, 20000);
    assert_eq!(
        b.ingress(&tcp_frame(SERVER, 80, HOST_ADDR, 20000, SYN | ACK))
            .dst,
        C2
    );
    assert_eq!(
        b.ingress(&tcp_frame(SERVER, 80, HOST_ADDR, moved, SYN | ACK))
            .dst,
        C1
    );
}

#[test]
fn a_tuple_another_cpu_is_claiming_is_not_taken_a_stale_one_is() {
    use netd_common::datapath::{
        AF_INET, CT_DIR_REPLY, CT_NAT_SNAT, CT_REWRITE_DST, CT_SYN_SENT, CtEntry, CtKey, addr_v4,
    };
    let b = Bench::new();
    let pins = Pins::open(&b.env.bpffs).unwrap();
    let key = |src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16| CtKey {
        saddr: addr_v4(src.octets()),
        daddr: addr_v4(dst.octets()),
        sport,
        dport,
        proto: TCP,
        family: AF_INET,
        _pad: [0; 2],
    };
    // A reply entry of C2's flow to SERVER:80 from HOST_ADDR:`port`, its original entry not
    // inserted yet (another CPU between the two inserts), made `age_ns` ago.
    let claimed = |port: u16, age_ns: u64| {
        let original = key(C2, port, SERVER, 80);
        let reply = key(SERVER, 80, HOST_ADDR, port);
        let at = monotonic_ns() - age_ns;
        let entry = CtEntry {
            original,
            reply,
            nat_addr: addr_v4(C2.octets()),
            nat_port: port,
            dir: CT_DIR_REPLY,
            rewrite: CT_REWRITE_DST,
            nat: CT_NAT_SNAT,
            state: CT_SYN_SENT,
            created_ns: at,
            last_seen_ns: at,
            ..Default::default()
        };
        let [_, mut unassured] = netd::datapath::ebpf::maps::conntrack(&pins).unwrap();
        unassured.insert(reply, entry, 0).unwrap();
    };
    claimed(20000, 0);
    let port = b.egress(&tcp_frame(C1, 20000, SERVER, 80, SYN)).sport;
    assert_ne!(port, 20000, "took a tuple being claimed");
    // Left half-made for longer than any creation takes: the tuple is free again.
    claimed(20001, 5_000_000_000);
    assert_eq!(
        b.egress(&tcp_frame(C1, 20001, SERVER, 80, SYN)).sport,
        20001
    );
    assert_eq!(
        b.ingress(&tcp_frame(SERVER, 80, HOST_ADDR, 20001, SYN | ACK))
            .dst,
        C1
    );
}

/// An IPv6 frame from `src` to `dst` carrying 8 bytes of UDP.
fn ipv6_frame(src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0, 0, 8, UDP, 64];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(&[0x22, 0x22, 0x22, 0x22, 0, 8, 0, 0]);
    eth(0x86dd, &ip)
}

const LINK_LOCAL: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const ALL_NODES: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const GLOBAL: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const LLDP: u16 = 0x88cc;

/// A frame on the veth of a container netd no longer has (the programs go with the veth,
/// after the endpoint is forgotten) is dropped and counted, both ways, IPv4 or IPv6: nothing
/// checks it any more.
#[test]
fn frames_on_the_veth_of_a_container_gone_are_dropped() {
    let b = Bench::new();
    let gone = host_veth(&b.env, "veth9");
    let on_gone = Skb {
        ingress_ifindex: gone,
        ifindex: gone,
        ..Skb::default()
    };
    let (c1_mac, c2_mac) = (endpoint(C1, "", 0).mac, endpoint(C2, "", 0).mac);
    let frames = [
        tcp_frame(C1, 40000, C2, 80, SYN),
        ipv6_frame(GLOBAL, GLOBAL),
    ];
    for prog in [ENDPOINT_INGRESS_PROG, ENDPOINT_EGRESS_PROG] {
        for frame in &frames {
            let before = b.stat("no_endpoint");
            let frame = with_macs(frame.clone(), c2_mac, c1_mac);
            assert_eq!(b.run_skb(prog, &frame, on_gone).0, DROP, "{prog}");
            assert_eq!(b.stat("no_endpoint"), before + 1, "{prog}");
        }
    }
}

#[test]
fn every_frame_a_container_sends_is_policed_whatever_it_carries() {
    let b = Bench::new();
    let c1_mac = endpoint(C1, "", 0).mac;
    let c2_mac = endpoint(C2, "", 0).mac;
    let from_c1 = Skb {
        ingress_ifindex: b.veths[0],
        ifindex: b.veths[0],
        ..Skb::default()
    };
    let run = |frame: Vec<u8>| {
        b.run_skb(
            ENDPOINT_INGRESS_PROG,
            &with_macs(frame, c2_mac, c1_mac),
            from_c1,
        )
        .0
    };
    let dropped = |frame: Vec<u8>, reason: &str| {
        let before = b.stat(reason);
        assert_eq!(run(frame), DROP, "{reason}");
        assert_eq!(b.stat(reason), before + 1, "{reason} counted");
    };
    // Controls: to C2, with and without IP options, straight into its namespace.
    assert_eq!(run(tcp_frame(C1, 40000, C2, 80, SYN)), REDIRECT);
    let options = with_ip_options(tcp_frame(C1, 40000, C2, 80, SYN), &record_route(9));
    assert_eq!(run(options.clone()), REDIRECT);
    // IPv6 from its own link-local address (its MAC's) goes on to the bridge (icc=true)...
    let own_link_local = tests::frames6::link_local(c1_mac).octets();
    assert_eq!(run(ipv6_frame(own_link_local, ALL_NODES)), PASS);
    dropped(ipv6_frame(LINK_LOCAL, ALL_NODES), "spoofed_addr");
    // ...nothing else of IPv6 from a container without an IPv6 address (ipv6_programs.rs
    // has dual-stack networks), no tags, no other protocols.
    dropped(ipv6_frame(GLOBAL, GLOBAL), "spoofed_addr");
    dropped(ipv6_frame(LINK_LOCAL, GLOBAL), "spoofed_addr");
    dropped(ipv6_frame(GLOBAL, ALL_NODES), "spoofed_addr");
    dropped(ipv6_frame([0; 16], ALL_NODES), "spoofed_addr");
    let tag = |vid: u16| {
        let mut f = tcp_frame(C1, 40000, C2, 80, SYN);
        f.splice(12..12, [0x81, 0x00, (vid >> 8) as u8, vid as u8]);
        f
    };
    dropped(tag(0), "vlan");
    dropped(tag(7), "vlan");
    dropped(eth(LLDP, &[0u8; 46]), "not_ip");
    // Options don't hide a spoofed source; a bad header is dropped as such.
    dropped(
        with_ip_options(tcp_frame(GATEWAY, 40000, C2, 80, SYN), &[1, 1, 1, 1]),
        "spoofed_addr",
    );
    let mut bad = tcp_frame(C1, 40000, C2, 80, SYN);
    bad[ETH_LEN] = 0x44;
    dropped(bad, "bad_ip_header");
}

#[test]
fn only_the_host_its_network_and_translated_packets_reach_a_container() {
    let b = Bench::new();
    let bridge = b.bridge_ifindex();
    // An interface that is none of netd's: a second NIC, a VPN.
    let elsewhere = 4242;
    let to_c1 = |ingress_ifindex, mark| Skb {
        mark,
        ingress_ifindex,
        ifindex: b.veths[0],
    };
    let run = |frame: &[u8], skb: Skb| b.run_skb(ENDPOINT_EGRESS_PROG, frame, skb).0;
    let unsolicited = tcp_frame(SERVER, 40000, C1, 22, SYN);
    // From the host itself, from C2 (its veth), routed through the gateway (the bridge), and
    // translated by netd and marked: in.
    for (from, mark) in [
        (0, 0),
        (b.veths[1], 0),
        (bridge, 0),
        (elsewhere, MARK_ADMITTED),
    ] {
        assert_eq!(
            run(&unsolicited, to_c1(from, mark)),
            PASS,
            "from {from} mark {mark:#x}"
        );
    }
    // From anywhere else: out, with the reason, whatever the frame carries.
    let quoted = udp_frame(C1, 5000, SERVER, 53, true);
    let stray_fragment = fragments(&udp_frame_carrying(SERVER, 53, C1, 6000, &[0; 64]), 32, 9).1;
    let mut tagged = unsolicited.clone();
    tagged.splice(12..12, [0x81, 0x00, 0, 0]);
    for (frame, reason) in [
        (unsolicited.clone(), "unsolicited"),
        (
            with_ip_options(unsolicited.clone(), &record_route(9)),
            "unsolicited",
        ),
        (icmp_frame(SERVER, C1, true, 5), "unsolicited"),
        (
            eth(0x0800, &ipv4(SERVER, C1, GRE, &[0, 0, 0x08, 0, 1, 2, 3, 4])),
            "unsolicited",
        ),
        (
            icmp_error_frame(SERVER, C1, DEST_UNREACH, PORT_UNREACH, &quoted[ETH_LEN..]),
            "icmp_no_flow",
        ),
        (
            eth(
                0x0800,
                &ipv4(SERVER, C1, ICMP, &[13, 0, 0xf2, 0xff, 0, 0, 0, 0]),
            ),
            "unsupported_proto",
        ),
        (stray_fragment, "fragment"),
        (tagged, "vlan"),
        // IPv6 from beyond, NAT66 didn't translate it: as unsolicited as IPv4.
        (ipv6_frame(GLOBAL, GLOBAL), "unsolicited"),
        (eth(LLDP, &[0u8; 46]), "not_ip"),
    ] {
        let before = b.stat(reason);
        assert_eq!(run(&frame, to_c1(elsewhere, 0)), DROP, "{reason}");
        assert_eq!(b.stat(reason), before + 1, "{reason} counted");
    }
    // Address resolution from a bridge port netd doesn't own is harmless.
    assert_eq!(run(&eth(0x0806, &[0u8; 28]), to_c1(elsewhere, 0)), PASS);
}

#[test]
fn icmp_errors_about_hairpin_flows_are_translated_both_ways_with_the_quoted_packet() {
    let b = Bench::new();
    let c2_mac = endpoint(C2, "", 0).mac;
    // C2 → host:8080, which reaches C1:80 from the gateway; C1 answers with a port
    // unreachable about the packet it got.
    let syn = hairpin(
        &b,
        &tcp_frame(C2, 40001, HOST_ADDR, 8080, SYN),
        endpoint(C1, "", 0).mac,
    );
    let got = tcp_frame(syn.src, syn.sport, C1, 80, SYN);
    let error = icmp_error_frame(C1, GATEWAY, DEST_UNREACH, PORT_UNREACH, &got[ETH_LEN..]);
    let (verdict, out) = b.run(BRIDGE_INGRESS_PROG, &error);
    assert_eq!(verdict, REDIRECT, "to C2's veth");
    assert_eq!(out[0..6], c2_mac);
    assert_checksums(&out, false);
    assert_quoted_ip_checksum(&out);
    // C2 sees an error from the host's address about what it sent: C2:40001 → host:8080.
    let outer = ends(&out);
    assert_eq!((outer.src, outer.dst), (HOST_ADDR, C2));
    assert_eq!(quoted_ends(&out), at(C2, 40001, HOST_ADDR, 8080));
    // About no flow, an error is the host's.
    let stray = icmp_error_frame(
        C1,
        GATEWAY,
        DEST_UNREACH,
        PORT_UNREACH,
        &tcp_frame(GATEWAY, 9, C1, 80, SYN)[ETH_LEN..],
    );
    assert_eq!(b.run(BRIDGE_INGRESS_PROG, &stray), (PASS, stray.clone()));
    // About the flow, but from anyone but C1 (a container of another network, to its own
    // gateway or to this one), or from C1 to anyone but the quoted packet's source: dropped.
    let q = quiet_network(&b, (netd::datapath::Protocol::Udp, 53));
    let about_the_flow =
        |from, to| icmp_error_frame(from, to, DEST_UNREACH, PORT_UNREACH, &got[ETH_LEN..]);
    for (from, to) in [(q.c3, q.net.gateway), (q.c3, GATEWAY), (C1, HOST_ADDR)] {
        let before = b.stat("icmp_no_flow");
        assert_eq!(
            b.run(BRIDGE_INGRESS_PROG, &about_the_flow(from, to)).0,
            DROP,
            "{from} → {to}"
        );
        assert_eq!(b.stat("icmp_no_flow"), before + 1, "{from} → {to}");
    }
}

/// A second network, without ICC ("quiet", 10.2.0.0/24), with C3 and C4 on veth3 and veth4;
/// C4 links to C3's `link` port.
struct Quiet {
    net: netd::datapath::NetworkSpec,
    c3: Ipv4Addr,
    c4: Ipv4Addr,
    veth4: u32,
}

fn quiet_network(b: &Bench, link: (netd::datapath::Protocol, u16)) -> Quiet {
    let quiet = netd::datapath::NetworkSpec {
        id: 2,
        name: "quiet".into(),
        bridge: BRIDGE.into(),
        subnet: "10.2.0.0/24".parse().unwrap(),
        gateway: Ipv4Addr::new(10, 2, 0, 1),
        icc: false,
        ..network()
    };
    let (c3, c4) = (Ipv4Addr::new(10, 2, 0, 3), Ipv4Addr::new(10, 2, 0, 4));
    let veth3 = host_veth(&b.env, "veth3");
    let veth4 = host_veth(&b.env, "veth4");
    let pins = Pins::open(&b.env.bpffs).unwrap();
    b.env.in_ns(&b.env.host_ns(), || {
        let dp = EbpfDatapath::new(pins).with_host_cgroup(None);
        dp.setup_network(&quiet).unwrap();
        for (ip, veth, ifindex, links) in [
            (c3, "veth3", veth3, vec![]),
            (
                c4,
                "veth4",
                veth4,
                vec![netd::datapath::LinkSpec {
                    peer: c3,
                    peer6: None,
                    proto: link.0,
                    port: link.1,
                }],
            ),
        ] {
            let ep = netd::datapath::EndpointSpec {
                network_id: 2,
                links,
                ..endpoint(ip, veth, ifindex)
            };
            dp.add_endpoint(&quiet, &ep).unwrap();
        }
    });
    Quiet {
        net: quiet,
        c3,
        c4,
        veth4,
    }
}

#[test]
fn hairpin_applies_the_sources_isolation() {
    let b = Bench::new();
    let Quiet {
        net: quiet, c3, c4, ..
    } = quiet_network(&b, (netd::datapath::Protocol::Tcp, 80));
    let pins = Pins::open(&b.env.bpffs).unwrap();
    b.env.in_ns(&b.env.host_ns(), || {
        let dp = EbpfDatapath::new(pins).with_host_cgroup(None);
        dp.publish(
            &quiet,
            &[netd::datapath::PortSpec {
                network_id: 2,
                ..tests::netdata::port(netd::datapath::Protocol::Tcp, None, 9090, c3, 80)
            }],
        )
        .unwrap();
    });
    let refused = |frame: Vec<u8>, reason: &str| {
        let before = b.stat(reason);
        assert_eq!(b.run(BRIDGE_INGRESS_PROG, &frame).0, DROP, "{reason}");
        assert_eq!(b.stat(reason), before + 1, "{reason}");
    };
    // Another network's published port, through the host: the isolation chains drop it.
    refused(tcp_frame(C2, 40000, HOST_ADDR, 9090, SYN), "other_network");
    refused(tcp_frame(c3, 40000, HOST_ADDR, 8080, SYN), "other_network");
    // Without ICC, a neighbour's published port only along a link.
    refused(tcp_frame(c3, 40000, HOST_ADDR, 9090, SYN), "icc_denied");
    let linked = hairpin(
        &b,
        &tcp_frame(c4, 40000, HOST_ADDR, 9090, SYN),
        endpoint(c3, "", 0).mac,
    );
    assert_eq!((linked.dst, linked.dport), (c3, 80));
    // With ICC, C2 reaches C1's.
    assert_eq!(
        hairpin(
            &b,
            &tcp_frame(C2, 40000, HOST_ADDR, 8080, SYN),
            endpoint(C1, "", 0).mac
        )
        .dst,
        C1
    );
}

#[test]
fn later_fragments_along_a_link_follow_their_first_fragments_verdict() {
    let b = Bench::new();
    let q = quiet_network(&b, (netd::datapath::Protocol::Udp, 53));
    let (c3_mac, c4_mac) = (endpoint(q.c3, "", 0).mac, endpoint(q.c4, "", 0).mac);
    let from_c4 = Skb {
        ingress_ifindex: q.veth4,
        ifindex: q.veth4,
        ..Skb::default()
    };
    let run = |frame: &[u8]| {
        b.run_skb(
            ENDPOINT_INGRESS_PROG,
            &with_macs(frame.to_vec(), c3_mac, c4_mac),
            from_c4,
        )
        .0
    };
    let datagram_to = |dport, id| {
        fragments(
            &udp_frame_carrying(q.c4, 6000, q.c3, dport, &[0x5a; 192]),
            96,
            id,
        )
    };
    let dropped = |frame: &[u8], what: &str| {
        let before = b.stat("icc_denied");
        assert_eq!(run(frame), DROP, "{what}");
        assert_eq!(b.stat("icc_denied"), before + 1, "{what}: icc_denied");
    };
    // Along the link: both fragments go straight into C3.
    let (first, later) = datagram_to(53, 0x4343);
    assert_eq!(run(&first), REDIRECT, "the first fragment, along the link");
    assert_eq!(
        run(&later),
        REDIRECT,
        "the later fragment follows its first"
    );
    // Off the link: both are dropped.
    let (first, later) = datagram_to(54, 0x4344);
    dropped(&first, "the first fragment, off the link");
    dropped(&later, "the later fragment of a datagram off the link");
    // A later fragment whose first fragment was never seen: nothing says it is linked.
    dropped(&datagram_to(53, 0x4345).1, "a stray later fragment");
}

#[test]
fn the_datapath_follows_a_new_default_route_and_uplink_address() {
    let b = Bench::new();
    let pins = Pins::open(&b.env.bpffs).unwrap();
    let follow = || {
        let pins = pins.clone();
        b.env.in_ns(&b.env.host_ns(), move || {
            EbpfDatapath::new(pins).follow_host().unwrap().uplink
        })
    };
    assert_eq!(follow(), None, "nothing changed yet");
    // A second uplink (a VPN, a new NIC) takes the default route.
    let new_addr = Ipv4Addr::new(198, 18, 7, 2);
    for args in [
        &["link", "add", "up9", "type", "veth", "peer", "name", "up9p"][..],
        &["addr", "add", "198.18.7.2/24", "dev", "up9"],
        &["link", "set", "up9p", "up"],
        &["link", "set", "up9", "up"],
        &[
            "route",
            "replace",
            "default",
            "via",
            "198.18.7.1",
            "dev",
            "up9",
        ],
    ] {
        tests::topology::ip_in(&b.env, &b.env.host_ns(), args);
    }
    assert_eq!(follow().as_deref(), Some("up9"));
    for (prog, dir) in [
        (UPLINK_INGRESS_PROG, aya::programs::TcAttachType::Ingress),
        (UPLINK_EGRESS_PROG, aya::programs::TcAttachType::Egress),
    ] {
        let mut attached = b
            .env
            .in_ns(&b.env.host_ns(), || pins.tc_attachments(prog, dir).unwrap());
        attached.sort();
        // The old uplink still has its address: masquerade goes on through it too.
        assert_eq!(attached, [UPLINK, "up9"], "{prog}");
    }
    // Masquerade and published ports go on from the new address.
    assert_eq!(
        b.egress_on(&tcp_frame(C1, 41000, SERVER, 80, SYN), "up9")
            .src,
        new_addr
    );
    assert_eq!(
        b.egress_on(&tcp_frame(C1, 41001, SERVER, 80, SYN), UPLINK)
            .src,
        HOST_ADDR
    );
    assert_eq!(
        b.ingress(&tcp_frame(SERVER, 40000, new_addr, 8080, SYN))
            .dst,
        C1
    );
    assert_eq!(follow(), None, "followed once");
}

#[test]
fn masquerade_goes_through_every_interface_that_routes_out_each_to_its_own_address() {
    let b = Bench::new();
    let pins = Pins::open(&b.env.bpffs).unwrap();
    let follow = || {
        let pins = pins.clone();
        b.env.in_ns(&b.env.host_ns(), move || {
            EbpfDatapath::new(pins).follow_host().unwrap()
        })
    };
    let ip = |args: &[&str]| tests::topology::ip_in(&b.env, &b.env.host_ns(), args);
    // A second NIC, and an interface without an address.
    ip(&[
        "link", "add", "nic1", "type", "veth", "peer", "name", "nic1p",
    ]);
    ip(&[
        "link", "add", "bare1", "type", "veth", "peer", "name", "bare1p",
    ]);
    ip(&["addr", "add", "198.19.1.2/24", "dev", "nic1"]);
    // A bridge of another netd network (the iptables datapath's, not in this one's maps):
    // netd's by its MAC, derived from its address. Never masqueraded through.
    ip(&["link", "add", "brother", "type", "bridge"]);
    ip(&["link", "set", "brother", "address", "02:42:0a:63:00:01"]);
    ip(&["addr", "add", "10.99.0.1/24", "dev", "brother"]);
    let nic_addr = Ipv4Addr::new(198, 19, 1, 2);
    let syn = |sport| tcp_frame(C1, sport, SERVER, 80, SYN);
    let unmasqueraded = |sport, iface| {
        let before = b.stat("unmasqueraded");
        let (verdict, _) = b.run_on(UPLINK_EGRESS_PROG, &syn(sport), iface);
        verdict == DROP && b.stat("unmasqueraded") == before + 1
    };
    // Until netd follows it, nothing is masqueraded through it: dropped, never private.
    assert!(unmasqueraded(42000, "nic1"), "before following");
    let followed = follow();
    assert_eq!(followed.added, ["nic1"], "{followed:?}");
    assert_eq!(b.egress_on(&syn(42001), "nic1").src, nic_addr);
    // The uplink keeps its own address; the interface without one masquerades nothing.
    assert_eq!(b.egress(&syn(42002)).src, HOST_ADDR);
    assert!(
        unmasqueraded(42003, "bare1"),
        "an interface without an address"
    );
    assert!(unmasqueraded(42007, "brother"), "another network's bridge");
    // Replies through the second NIC come back to the container.
    assert_eq!(
        b.ingress(&tcp_frame(
            SERVER,
            80,
            nic_addr,
            b.egress_on(&syn(42004), "nic1").sport,
            SYN | ACK
        ))
        .dst,
        C1
    );
    // Its address changes: masquerade follows; it loses it: the programs go.
    ip(&["addr", "flush", "dev", "nic1"]);
    ip(&["addr", "add", "198.19.2.2/24", "dev", "nic1"]);
    assert_eq!(follow(), Default::default(), "the same interface");
    assert_eq!(
        b.egress_on(&syn(42005), "nic1").src,
        Ipv4Addr::new(198, 19, 2, 2)
    );
    ip(&["addr", "flush", "dev", "nic1"]);
    assert_eq!(follow().removed, ["nic1"]);
    assert!(unmasqueraded(42006, "nic1"), "after its address went");
    let attached = b.env.in_ns(&b.env.host_ns(), || {
        pins.tc_attachments(UPLINK_EGRESS_PROG, aya::programs::TcAttachType::Egress)
            .unwrap()
    });
    assert_eq!(attached, [UPLINK]);
    assert_eq!(tc_programs_on(&b, "nic1"), 0, "left on nic1");
    // An interface deleted while nothing follows (its programs went with it, their pins
    // stayed): `reload` drops it and replaces the live ones.
    ip(&[
        "link", "add", "nic2", "type", "veth", "peer", "name", "nic2p",
    ]);
    ip(&["addr", "add", "198.19.4.2/24", "dev", "nic2"]);
    assert_eq!(follow().added, ["nic2"]);
    ip(&["link", "del", "nic2"]);
    let replaced = b.env.in_ns(&b.env.host_ns(), || {
        EbpfDatapath::new(pins.clone())
            .with_host_cgroup(None)
            .reload_programs()
            .unwrap()
    });
    // The uplink's two, the bridge's, and both programs of each container.
    assert_eq!(replaced, 3 + 2 * 2);
    // Teardown takes the programs off every interface they are on.
    ip(&["addr", "add", "198.19.3.2/24", "dev", "nic1"]);
    assert_eq!(follow().added, ["nic1"]);
    assert_eq!(tc_programs_on(&b, "nic1"), 2);
    b.env.in_ns(&b.env.host_ns(), || {
        EbpfDatapath::new(pins.clone())
            .with_host_cgroup(None)
            .teardown_network(&network())
            .unwrap()
    });
    for iface in ["nic1", UPLINK] {
        assert_eq!(tc_programs_on(&b, iface), 0, "left on {iface}");
    }
}

/// How many TC programs the kernel runs on `iface` of the sandbox host: TCX links (none on a
/// kernel without TCX) and classic filters.
fn tc_programs_on(b: &Bench, iface: &str) -> usize {
    use aya::programs::{SchedClassifier, TcAttachType};
    let tcx = b.env.in_ns(&b.env.host_ns(), || {
        [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .filter_map(|dir| SchedClassifier::query_tcx(iface, dir).ok())
            .map(|(_, programs)| programs.len())
            .sum::<usize>()
    });
    let shown = tests::cli::output_in(
        &b.env,
        &b.env.host_ns(),
        "bpftool",
        &["-j", "net", "show", "dev", iface],
    );
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    tcx + shown[0]["tc"].as_array().map_or(0, Vec::len)
}

#[test]
fn an_internal_containers_hairpin_stays_within_its_network() {
    let b = Bench::new();
    let internal = netd::datapath::NetworkSpec {
        id: 2,
        name: "inside".into(),
        bridge: BRIDGE.into(),
        subnet: "10.3.0.0/24".parse().unwrap(),
        gateway: Ipv4Addr::new(10, 3, 0, 1),
        internal: true,
        ..network()
    };
    let (c5, c6) = (Ipv4Addr::new(10, 3, 0, 5), Ipv4Addr::new(10, 3, 0, 6));
    let veth5 = host_veth(&b.env, "veth5");
    let veth6 = host_veth(&b.env, "veth6");
    let pins = Pins::open(&b.env.bpffs).unwrap();
    b.env.in_ns(&b.env.host_ns(), || {
        let dp = EbpfDatapath::new(pins).with_host_cgroup(None);
        dp.setup_network(&internal).unwrap();
        for (ip, veth, ifindex) in [(c5, "veth5", veth5), (c6, "veth6", veth6)] {
            let ep = netd::datapath::EndpointSpec {
                network_id: 2,
                ..endpoint(ip, veth, ifindex)
            };
            dp.add_endpoint(&internal, &ep).unwrap();
        }
        dp.publish(
            &internal,
            &[netd::datapath::PortSpec {
                network_id: 2,
                ..tests::netdata::port(netd::datapath::Protocol::Tcp, None, 7070, c6, 80)
            }],
        )
        .unwrap();
    });
    let from_c5 = Skb {
        ingress_ifindex: veth5,
        ifindex: veth5,
        ..Skb::default()
    };
    let sent = |frame: Vec<u8>| {
        let frame = with_macs(frame, [2, 0, 0, 0, 0, 1], endpoint(c5, "", 0).mac);
        b.run_skb(ENDPOINT_INGRESS_PROG, &frame, from_c5).0
    };
    // To its neighbour's port published on the host's address: on to the bridge (hairpin).
    assert_eq!(sent(tcp_frame(c5, 40000, HOST_ADDR, 7070, SYN)), PASS);
    let there = hairpin(
        &b,
        &tcp_frame(c5, 40000, HOST_ADDR, 7070, SYN),
        endpoint(c6, "", 0).mac,
    );
    assert_eq!((there.dst, there.dport), (c6, 80));
    // Anything else beyond the network stays out: another network's port, the outside.
    let before = b.stat("internal");
    assert_eq!(sent(tcp_frame(c5, 40000, HOST_ADDR, 8080, SYN)), DROP);
    assert_eq!(sent(tcp_frame(c5, 40000, SERVER, 80, SYN)), DROP);
    assert_eq!(b.stat("internal"), before + 2);
}

/// While a network is removed its containers' entries go first, but whatever the order, a
/// container whose network's entry is gone gets nothing through: what the network was
/// (internal, masquerading) is unknown, so neither its packets out nor new flows in pass.
#[test]
fn a_container_whose_network_is_gone_gets_nothing_through() {
    let b = Bench::new();
    let pins = Pins::open(&b.env.bpffs).unwrap();
    b.env.in_ns(&b.env.host_ns(), || {
        netd::datapath::ebpf::maps::networks(&pins)
            .unwrap()
            .remove(&network().id)
            .unwrap();
    });
    let c1_mac = endpoint(C1, "", 0).mac;
    let out = with_macs(
        tcp_frame(C1, 40000, SERVER, 80, SYN),
        network().bridge_mac(),
        c1_mac,
    );
    let from_c1 = Skb {
        ingress_ifindex: b.veths[0],
        ifindex: b.veths[0],
        ..Skb::default()
    };
    let before = b.stat("no_endpoint");
    assert_eq!(b.run_skb(ENDPOINT_INGRESS_PROG, &out, from_c1).0, DROP);
    assert_eq!(b.run(UPLINK_EGRESS_PROG, &out).0, DROP, "left untranslated");
    // Unsolicited from outside, straight to the container.
    let syn_ack = tcp_frame(SERVER, 80, C1, 40000, SYN | ACK);
    assert_eq!(b.run(UPLINK_INGRESS_PROG, &syn_ack).0, DROP);
    assert_eq!(b.stat("no_endpoint"), before + 3);
}
