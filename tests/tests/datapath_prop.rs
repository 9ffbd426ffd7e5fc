//! A property test of the datapath's fail-closed rules: random valid and broken frames
//! (Ethernet with and without VLAN tags, IPv4 with bad versions and lengths, options,
//! fragments, TCP/UDP/ICMP/other protocols, IPv6, ARP, other EtherTypes, cut short anywhere)
//! go through the programs with BPF_PROG_TEST_RUN, and each verdict is held against a small
//! model of the rules:
//!
//! - arriving on the uplink, nothing reaches a container but a published port's traffic, and
//!   a frame translated to a container is the right container's, with valid checksums;
//! - leaving the uplink, nothing keeps a container's private source, and a masqueraded frame
//!   leaves from the host's address with valid checksums;
//! - on a container's veth, from an interface that is not netd's, nothing but ARP gets in
//!   untranslated;
//! - from a container, no tagged frame, no spoofed source, no IPv6 beyond link-local and no
//!   other EtherType gets out.
//!
//! `NETD_PROPTEST_CASES` sets the number of frames (default 2000).

use std::{cell::RefCell, net::Ipv4Addr};

use netd_common::datapath::{
    ENDPOINT_EGRESS_PROG, ENDPOINT_INGRESS_PROG, UPLINK_EGRESS_PROG, UPLINK_INGRESS_PROG,
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};
use tests::{
    frames::*,
    harness::{HOST_ADDR, OUTSIDE_ADDR},
    netdata::{C1, C2, GATEWAY, endpoint},
    progrun::{Bench, DROP, REDIRECT, Skb},
};

const DEFAULT_CASES: u32 = 2000;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
/// The ports published in the bench: tcp *:8080 → C1:80, udp HOST_ADDR:5353 → C2:53.
const PUBLISHED_TCP: u16 = 8080;
const PUBLISHED_UDP: u16 = 5353;

/// What a random frame is made of.
#[derive(Clone, Debug)]
struct Spec {
    /// An 802.1Q tag with this VLAN id (0: a priority tag).
    tag: Option<u16>,
    ether_type: u16,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    /// TCP flags, or the ICMP type.
    flags: u8,
    icmp_code: u8,
    payload: usize,
    /// IPv4 options, in 4-byte words.
    option_words: usize,
    /// 0: a whole datagram; 1: a first fragment; more: a later one at this offset (in 8s).
    fragment: u16,
    /// The version/IHL byte replaced by this (a broken header).
    vihl: Option<u8>,
    /// Bytes cut off the end of the frame.
    cut: usize,
    /// For IPv6: whether the source and the destination are link-local (else global).
    link_local: (bool, bool),
}

fn addr() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        Just(OUTSIDE_ADDR),
        Just(HOST_ADDR),
        Just(C1),
        Just(C2),
        Just(GATEWAY),
        Just(Ipv4Addr::new(127, 0, 0, 1)),
        any::<[u8; 4]>().prop_map(Ipv4Addr::from),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![
        Just(PUBLISHED_TCP),
        Just(PUBLISHED_UDP),
        Just(80),
        Just(53),
        any::<u16>(),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    let l2 = (
        prop::option::weighted(0.15, prop_oneof![Just(0u16), 1u16..4095]),
        prop_oneof![
            8 => Just(ETHERTYPE_IPV4),
            1 => Just(ETHERTYPE_IPV6),
            1 => Just(ETHERTYPE_ARP),
            1 => any::<u16>(),
        ],
    );
    let l3 = (
        addr(),
        addr(),
        prop_oneof![
            Just(TCP),
            Just(UDP),
            Just(ICMP),
            Just(47u8),
            Just(50u8),
            Just(132u8),
            any::<u8>()
        ],
        prop_oneof![6 => Just(0usize), 1 => 1usize..=10],
        prop_oneof![6 => Just(0u16), 1 => Just(1u16), 1 => 2u16..200],
        prop::option::weighted(0.05, any::<u8>()),
    );
    let l4 = (
        port(),
        port(),
        prop_oneof![
            Just(0x02u8),
            Just(0x12),
            Just(0x10),
            Just(0x04),
            Just(0),
            Just(3),
            Just(8),
            Just(11),
            Just(13),
            any::<u8>()
        ],
        any::<u8>(),
        0usize..96,
        prop_oneof![8 => Just(0usize), 1 => 1usize..80],
    );
    (l2, l3, l4, any::<(bool, bool)>()).prop_map(
        |(
            (tag, ether_type),
            (src, dst, proto, option_words, fragment, vihl),
            (sport, dport, flags, icmp_code, payload, cut),
            link_local,
        )| Spec {
            tag,
            ether_type,
            src,
            dst,
            proto,
            sport,
            dport,
            flags,
            icmp_code,
            payload,
            option_words,
            fragment,
            vihl,
            cut,
            link_local,
        },
    )
}

/// The L4 part of the frame: a real TCP/UDP/ICMP header with its checksum where the protocol
/// has one, random bytes otherwise.
fn l4(s: &Spec) -> Vec<u8> {
    let payload = vec![0x6e; s.payload];
    match s.proto {
        TCP => tcp(s.src, s.dst, s.sport, s.dport, s.flags, &payload),
        UDP => udp(s.src, s.dst, s.sport, s.dport, &payload, true),
        ICMP => {
            let mut msg = vec![s.flags, s.icmp_code, 0, 0];
            msg.extend_from_slice(&s.sport.to_be_bytes());
            msg.extend_from_slice(&[0, 1]);
            if s.flags == 3 || s.flags == 11 {
                // An error quotes a packet: one of a flow the other way, or anything.
                msg.extend_from_slice(&ipv4(
                    s.dst,
                    s.src,
                    UDP,
                    &udp(s.dst, s.src, s.dport, s.sport, b"", true),
                ));
            } else {
                msg.extend_from_slice(&payload);
            }
            let csum = !sum16(&msg, 0);
            msg[2..4].copy_from_slice(&csum.to_be_bytes());
            msg
        }
        _ => {
            let mut bytes = vec![0u8; 8];
            bytes[..2].copy_from_slice(&s.sport.to_be_bytes());
            bytes[2..4].copy_from_slice(&s.dport.to_be_bytes());
            bytes.extend_from_slice(&payload);
            bytes
        }
    }
}

fn build(s: &Spec) -> Vec<u8> {
    let mut frame = match s.ether_type {
        ETHERTYPE_IPV4 => {
            let mut f = eth(ETHERTYPE_IPV4, &ipv4(s.src, s.dst, s.proto, &l4(s)));
            if s.option_words > 0 {
                let mut options = vec![1u8; 4 * s.option_words];
                options[0] = 7; // record route...
                options[1] = (4 * s.option_words).min(39) as u8; // ...as long as it may be
                options[2] = 4;
                f = with_ip_options(f, &options);
            }
            if s.fragment > 0 {
                let frags: u16 = if s.fragment == 1 { 0x2000 } else { s.fragment };
                f[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&frags.to_be_bytes());
            }
            if let Some(vihl) = s.vihl {
                f[ETH_LEN] = vihl;
            }
            fix_ip_csum(&mut f);
            f
        }
        ETHERTYPE_IPV6 => {
            let mut ip = vec![0x60, 0, 0, 0, 0, 8, UDP, 64];
            let link_local = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
            let global = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
            ip.extend_from_slice(if s.link_local.0 { &link_local } else { &global });
            ip.extend_from_slice(if s.link_local.1 { &link_local } else { &global });
            ip.extend_from_slice(&[0; 8]);
            eth(ETHERTYPE_IPV6, &ip)
        }
        other => eth(other, &vec![0u8; 28 + s.payload]),
    };
    if let Some(vid) = s.tag {
        frame.splice(12..12, [0x81, 0x00, (vid >> 8) as u8, vid as u8]);
    }
    // Never shorter than what a test run insists on: the network header the EtherType names.
    let l3_min = if s.tag.is_none() && s.ether_type == ETHERTYPE_IPV6 {
        40
    } else {
        20
    };
    let keep = frame.len().saturating_sub(s.cut).max(ETH_LEN + l3_min);
    frame.truncate(keep);
    frame
}

/// The IPv4 addresses of a frame as the stack would route it: untagged or behind one tag,
/// with the 20-byte header in the frame. `None` for anything else.
fn routed_ends(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    let l3 = if ether_type == ETHERTYPE_IPV4 {
        ETH_LEN
    } else if ether_type == ETHERTYPE_VLAN
        && frame.len() >= 18
        && u16::from_be_bytes([frame[16], frame[17]]) == ETHERTYPE_IPV4
    {
        ETH_LEN + 4
    } else {
        return None;
    };
    let ip = frame.get(l3..l3 + 20)?;
    let a = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
    Some((a(12), a(16)))
}

fn is_container(a: Ipv4Addr) -> bool {
    a == C1 || a == C2
}

/// Whether the frame is a whole, untagged, well-formed IPv4 datagram whose checksums the
/// builder made right (what a translation must keep right).
fn checksummed(s: &Spec) -> bool {
    s.tag.is_none()
        && s.ether_type == ETHERTYPE_IPV4
        && s.vihl.is_none()
        && s.fragment == 0
        && s.cut == 0
}

/// What the model knows of the flows earlier frames started: masqueraded flows, by the tuple
/// their replies arrive with (remote, remote port, protocol, host port), to their container.
/// And the datagrams whose first fragment went to a container (every frame here has the same
/// IP identification): their later fragments follow it.
#[derive(Default)]
struct Model {
    masqueraded: Vec<((Ipv4Addr, u16, u8, u16), Ipv4Addr)>,
    first_fragments: Vec<((Ipv4Addr, Ipv4Addr, u8), Ipv4Addr)>,
}

impl Model {
    /// Whether a frame from outside may be translated to `container`: to its published port,
    /// as the reply of one of its masqueraded flows, or as an ICMP error (about one of them).
    fn admits(&self, s: &Spec, container: Ipv4Addr) -> bool {
        if s.fragment > 1 {
            return self
                .first_fragments
                .contains(&((s.src, s.dst, s.proto), container));
        }
        let published = match container {
            c if c == C1 => s.proto == TCP && s.dport == PUBLISHED_TCP,
            _ => s.proto == UDP && s.dport == PUBLISHED_UDP,
        };
        // As the frame's tuple is read: echo identifier, ports, or none (other protocols).
        let reply_id = match s.proto {
            ICMP => (0, s.sport),
            TCP | UDP => (s.sport, s.dport),
            _ => (0, 0),
        };
        let reply = self
            .masqueraded
            .contains(&((s.src, reply_id.0, s.proto, reply_id.1), container));
        let error = s.proto == ICMP
            && (s.flags == 3 || s.flags == 11)
            && self.masqueraded.iter().any(|(_, c)| *c == container);
        published || reply || error
    }
}

fn check(b: &Bench, model: &RefCell<Model>, s: &Spec) -> Result<(), TestCaseError> {
    let frame = build(s);
    let full = checksummed(s);
    let ends = routed_ends(&frame);

    // Arriving from outside on the uplink: nothing straight to a container; what is
    // translated to one is that container's traffic, with valid checksums.
    let (verdict, out) = b.run(UPLINK_INGRESS_PROG, &frame);
    if verdict != DROP {
        if let Some((_, dst)) = ends {
            prop_assert!(!is_container(dst), "uplink ingress let in {s:?}");
        }
        if let Some((_, to)) = routed_ends(&out).filter(|_| out != frame) {
            prop_assert!(
                !is_container(to) || model.borrow().admits(s, to),
                "{to} got {s:?}"
            );
            if s.fragment == 1 {
                model
                    .borrow_mut()
                    .first_fragments
                    .push(((s.src, s.dst, s.proto), to));
            }
            if full {
                assert_checksums(&out, true);
            }
        }
    }

    // Leaving on the uplink: never with a container's source; masqueraded with valid
    // checksums (and remembered, for the replies).
    let (verdict, out) = b.run(UPLINK_EGRESS_PROG, &frame);
    if verdict != DROP
        && let Some((src, dst)) = routed_ends(&out)
    {
        prop_assert!(!is_container(src), "left with a private source: {s:?}");
        if out != frame {
            if full {
                assert_checksums(&out, true);
            }
            let after = tests::frames::ends(&out);
            if is_container(s.src) && src == HOST_ADDR {
                let (remote_port, host_port) = if s.proto == ICMP {
                    (0, after.sport)
                } else {
                    (after.dport, after.sport)
                };
                model
                    .borrow_mut()
                    .masqueraded
                    .push(((dst, remote_port, s.proto, host_port), s.src));
            }
        }
    }

    // Towards C1 on its veth, from an interface that isn't netd's, untranslated: only ARP.
    let from_elsewhere = Skb {
        mark: 0,
        ingress_ifindex: 4242,
        ifindex: b.veths[0],
    };
    let (verdict, _) = b.run_skb(ENDPOINT_EGRESS_PROG, &frame, from_elsewhere);
    let arp = s.tag.is_none() && s.ether_type == ETHERTYPE_ARP;
    prop_assert!(verdict == DROP || arp, "endpoint egress let in {s:?}");

    // From C1 (its MAC), to C2's: no tag, no other protocol, no IPv6 beyond link-local, no
    // spoofed source; delivered straight only to the container the frame is for.
    let sent = with_macs(
        frame.clone(),
        endpoint(C2, "", 0).mac,
        endpoint(C1, "", 0).mac,
    );
    let from_c1 = Skb {
        mark: 0,
        ingress_ifindex: b.veths[0],
        ifindex: b.veths[0],
    };
    let (verdict, _) = b.run_skb(ENDPOINT_INGRESS_PROG, &sent, from_c1);
    if verdict != DROP {
        prop_assert!(s.tag.is_none(), "a tagged frame left C1: {s:?}");
        prop_assert!(
            matches!(
                s.ether_type,
                ETHERTYPE_IPV4 | ETHERTYPE_ARP | ETHERTYPE_IPV6
            ),
            "{s:?}"
        );
        if s.ether_type == ETHERTYPE_IPV6 {
            prop_assert!(
                s.link_local == (true, true),
                "IPv6 beyond link-local: {s:?}"
            );
        }
        if let Some((src, dst)) = ends {
            prop_assert!(src == C1, "spoofed source left C1: {s:?}");
            prop_assert!(
                verdict != REDIRECT || !is_container(dst) || dst == C2,
                "delivered to the wrong container: {s:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn no_random_frame_gets_past_the_rules() {
    let cases = std::env::var("NETD_PROPTEST_CASES")
        .ok()
        .map(|n| n.parse().expect("NETD_PROPTEST_CASES: a number"))
        .unwrap_or(DEFAULT_CASES);
    let b = Bench::new();
    let model = RefCell::new(Model::default());
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&spec(), |s| check(&b, &model, &s))
        .unwrap_or_else(|e| panic!("{e}"));
    // Positive controls: the rules let real traffic through.
    assert_eq!(
        ends(
            &b.run(
                UPLINK_INGRESS_PROG,
                &tcp_frame(OUTSIDE_ADDR, 40000, HOST_ADDR, PUBLISHED_TCP, SYN)
            )
            .1
        )
        .dst,
        C1
    );
}
