//! The datapath's programs under BPF_PROG_TEST_RUN: a sandbox whose maps the real driver
//! (`EbpfDatapath`) filled, and crafted frames run through the programs.

use aya::{
    Ebpf, TestRun, TestRunOptions,
    programs::{SchedClassifier, Xdp},
};
use netd::{
    bpf::Pins,
    datapath::{
        Datapath as _, Protocol,
        ebpf::{EbpfDatapath, stats},
    },
};
use netd_common::datapath::{
    BRIDGE_INGRESS_PROG, Timeouts, UPLINK_EGRESS_PROG, UPLINK_INGRESS_PROG, UPLINK_XDP_PROG,
};
pub use netd_testkit::testrun::{DROP, PASS, REDIRECT, Skb};

use crate::{
    frames::*,
    harness::{HOST_ADDR, TestEnv, UPLINK},
    netdata::{BRIDGE, C1, C2, endpoint, network, port},
    topology::ip_in,
};

/// The XDP verdicts.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

pub struct Bench {
    pub env: TestEnv,
    ebpf: Ebpf,
    /// The host-side veths of C1 and C2.
    pub veths: [u32; 2],
}

impl Bench {
    /// A sandbox whose datapath has C1 and C2 on a masquerading network, tcp *:8080 → C1:80
    /// and udp HOST_ADDR:5353 → C2:53 published, and the programs loaded for test runs.
    pub fn new() -> Self {
        Self::with_timeouts(Timeouts::default())
    }

    pub fn with_timeouts(timeouts: Timeouts) -> Self {
        Self::with(timeouts, netd_common::datapath::CONNTRACK_DEFAULT_MAX)
    }

    pub fn with(timeouts: Timeouts, conntrack_max: u32) -> Self {
        Self::in_env(TestEnv::new(), timeouts, conntrack_max)
    }

    /// [`Bench::new`] in a sandbox whose uplink has IPv6 too ([`TestEnv::dual_stack`]).
    pub fn dual_stack() -> Self {
        Self::in_env(
            TestEnv::dual_stack(),
            Timeouts::default(),
            netd_common::datapath::CONNTRACK_DEFAULT_MAX,
        )
    }

    fn in_env(env: TestEnv, timeouts: Timeouts, conntrack_max: u32) -> Self {
        let pins = Pins::open(&env.bpffs).unwrap();
        ip_in(
            &env,
            &env.host_ns(),
            &["link", "add", BRIDGE, "type", "bridge"],
        );
        let veth1 = host_veth(&env, "veth1");
        let veth2 = host_veth(&env, "veth2");
        env.in_ns(&env.host_ns(), || {
            let dp = EbpfDatapath::new(pins.clone())
                .with_host_cgroup(None)
                .with_timeouts(timeouts)
                .with_conntrack_max(conntrack_max);
            let net = network();
            dp.setup_network(&net).unwrap();
            dp.add_endpoint(&net, &endpoint(C1, "veth1", veth1))
                .unwrap();
            dp.add_endpoint(&net, &endpoint(C2, "veth2", veth2))
                .unwrap();
            dp.publish(
                &net,
                &[
                    port(Protocol::Tcp, None, 8080, C1, 80),
                    port(Protocol::Udp, Some(HOST_ADDR), 5353, C2, 53),
                ],
            )
            .unwrap();
        });
        let mut ebpf = pins.load().unwrap();
        netd::bpf::load_programs(&mut ebpf).unwrap();
        Self {
            env,
            ebpf,
            veths: [veth1, veth2],
        }
    }

    /// Runs `prog` on `frame`; returns its verdict and the frame it left. The egress NAT
    /// program runs on the uplink (it masquerades to the address of the interface it runs on).
    pub fn run(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let program = self.ebpf.program(prog).unwrap();
        match prog {
            UPLINK_XDP_PROG => test_run(<&Xdp>::try_from(program).unwrap(), prog, frame),
            UPLINK_EGRESS_PROG => self.run_on(prog, frame, UPLINK),
            _ => test_run(<&SchedClassifier>::try_from(program).unwrap(), prog, frame),
        }
    }

    /// Runs TC program `prog` on `frame` as if on interface `iface` of the sandbox host.
    pub fn run_on(&self, prog: &str, frame: &[u8], iface: &str) -> (u32, Vec<u8>) {
        self.run_from(prog, frame, iface, 0)
    }

    /// [`Bench::run_on`] for a packet that came into the host through the interface with
    /// index `way_in` (0: none, the host's own).
    pub fn run_from(&self, prog: &str, frame: &[u8], iface: &str, way_in: u32) -> (u32, Vec<u8>) {
        let program = <&SchedClassifier>::try_from(self.ebpf.program(prog).unwrap()).unwrap();
        self.env.in_ns(&self.env.host_ns(), || {
            let skb = Skb {
                ifindex: nix::net::if_::if_nametoindex(iface).unwrap(),
                ingress_ifindex: way_in,
                ..Skb::default()
            };
            test_run_ctx(program, prog, frame, &skb)
        })
    }

    /// The ifindex of interface `iface` of the sandbox host.
    pub fn ifindex(&self, iface: &str) -> u32 {
        self.env.in_ns(&self.env.host_ns(), || {
            nix::net::if_::if_nametoindex(iface).unwrap()
        })
    }

    /// Runs `prog` on `frame`, expects it passed and rewritten with valid checksums and only NAT
    /// fields changed; returns the new ends.
    pub fn translate(&self, prog: &str, frame: &[u8]) -> Ends {
        translated(prog, frame, self.run(prog, frame))
    }

    pub fn egress(&self, frame: &[u8]) -> Ends {
        self.translate(UPLINK_EGRESS_PROG, frame)
    }

    /// [`Bench::egress`] on interface `iface` of the sandbox host.
    pub fn egress_on(&self, frame: &[u8], iface: &str) -> Ends {
        let prog = UPLINK_EGRESS_PROG;
        translated(prog, frame, self.run_on(prog, frame, iface))
    }

    pub fn ingress(&self, frame: &[u8]) -> Ends {
        self.translate(UPLINK_INGRESS_PROG, frame)
    }

    /// Runs the programs on `frame`: each must pass it on byte for byte (the XDP program
    /// leaves it to TC, counting nothing).
    pub fn assert_untouched(&self, frame: &[u8]) {
        for prog in [UPLINK_EGRESS_PROG, UPLINK_INGRESS_PROG, BRIDGE_INGRESS_PROG] {
            let (verdict, out) = self.run(prog, frame);
            assert_eq!(verdict, PASS, "{prog} verdict");
            assert_eq!(out, frame, "{prog} changed a frame it must not translate");
        }
        let (verdict, out) = self.run(UPLINK_XDP_PROG, frame);
        assert_eq!(verdict, XDP_PASS, "{UPLINK_XDP_PROG} verdict");
        assert_eq!(out, frame, "{UPLINK_XDP_PROG} changed a frame");
    }

    pub fn stat(&self, reason: &str) -> u64 {
        let pins = Pins::open(&self.env.bpffs).unwrap();
        stats::read(&pins)
            .unwrap()
            .into_iter()
            .find(|c| c.reason == reason)
            .unwrap()
            .packets
    }
}

/// Expects `prog`'s run on `frame` passed it on rewritten with valid checksums and only NAT
/// fields changed; returns the new ends.
fn translated(prog: &str, frame: &[u8], (verdict, out): (u32, Vec<u8>)) -> Ends {
    assert_eq!(verdict, PASS, "{prog} should pass the packet on");
    assert_only_nat_fields_changed(frame, &out);
    assert_checksums(&out, false);
    ends(&out)
}

/// Runs program `p` (called `prog`) on `frame`; returns its verdict and the frame it left.
pub fn test_run<P>(p: &P, prog: &str, frame: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let result = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test run of {prog} on {frame:02x?}: {e:?}"));
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// Runs TC program `p` (called `prog`) on `frame` with the context `skb`; returns its verdict
/// and the frame it left.
fn test_run_ctx(p: &SchedClassifier, prog: &str, frame: &[u8], skb: &Skb) -> (u32, Vec<u8>) {
    let run = netd_testkit::testrun::run(p, frame, skb)
        .unwrap_or_else(|e| panic!("test run of {prog} on {frame:02x?}: {e:?}"));
    (run.verdict, run.frame)
}

impl Default for Bench {
    fn default() -> Self {
        Self::new()
    }
}

impl Bench {
    /// Runs the pinned TC program `prog` (the endpoint programs are pinned when the first
    /// container is added) on `frame` with the context `skb`, in the sandbox host namespace
    /// (where `skb`'s interfaces are); returns its verdict and the frame it left.
    pub fn run_skb(&self, prog: &str, frame: &[u8], skb: Skb) -> (u32, Vec<u8>) {
        let path = Pins::open(&self.env.bpffs).unwrap().program(prog);
        self.env.in_ns(&self.env.host_ns(), || {
            let program = SchedClassifier::from_pin(&path).unwrap();
            test_run_ctx(&program, prog, frame, &skb)
        })
    }

    /// The ifindex of the sandbox's bridge.
    pub fn bridge_ifindex(&self) -> u32 {
        self.ifindex(BRIDGE)
    }
}

/// A veth pair `name`/`name`p in the sandbox host namespace, for an endpoint's program to sit
/// on; returns the ifindex of `name`.
pub fn host_veth(env: &TestEnv, name: &str) -> u32 {
    let peer = format!("{name}p");
    ip_in(
        env,
        &env.host_ns(),
        &["link", "add", name, "type", "veth", "peer", "name", &peer],
    );
    env.in_ns(&env.host_ns(), || {
        nix::net::if_::if_nametoindex(name).unwrap()
    })
}
