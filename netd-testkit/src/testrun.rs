//! A TC program run once by the kernel's `BPF_PROG_TEST_RUN` on a crafted frame, as the
//! datapath tests and the benchmark's `programs` part make it.

use std::time::Duration;

use anyhow::Result;
use aya::{TestRun as _, TestRunOptions, programs::SchedClassifier};

/// TC_ACT_UNSPEC (TCX_NEXT) as the kernel reports a program's return value: passed on.
pub const PASS: u32 = u32::MAX;
/// TC_ACT_SHOT.
pub const DROP: u32 = 2;
/// TC_ACT_REDIRECT: sent straight to another interface (into a container, to the uplink).
pub const REDIRECT: u32 = 7;

/// What a test run of a TC program may set of its `struct __sk_buff`: the mark, the interface
/// the packet arrived on, and the one the program runs on (an interface of the namespace the
/// run is made in).
#[derive(Clone, Copy, Debug, Default)]
pub struct Skb {
    pub mark: u32,
    pub ingress_ifindex: u32,
    pub ifindex: u32,
}

impl Skb {
    /// The context's bytes, up to `ifindex` (the rest is zero).
    pub fn bytes(&self) -> [u8; 44] {
        let mut ctx = [0u8; 44];
        ctx[8..12].copy_from_slice(&self.mark.to_ne_bytes());
        ctx[36..40].copy_from_slice(&self.ingress_ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
        ctx
    }
}

/// One run of a TC program: its verdict, the frame it left and how long it ran.
pub struct Run {
    pub verdict: u32,
    pub frame: Vec<u8>,
    pub duration: Duration,
}

/// Runs `p` once on `frame` with the context `skb`, in the calling thread's namespace (where
/// `skb`'s interfaces are).
pub fn run(p: &SchedClassifier, frame: &[u8], skb: &Skb) -> Result<Run> {
    let mut out = vec![0u8; frame.len() + 256];
    let result = p.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&skb.bytes()),
        ..Default::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok(Run {
        verdict: result.return_value,
        frame: out,
        duration: result.duration,
    })
}
