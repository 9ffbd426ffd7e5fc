//! TCP sequence tracking for conntrack, reduced to what RFC 5961 needs of a middlebox: each
//! direction's sender is followed (where what it sent ends, the largest window it
//! advertised), so that a RST moves a flow to CLOSE only when its sequence number lies
//! within a window of where its sender's data ends. A genuine RST carries exactly that
//! number (the sender's next); a blind attacker has to hit a window among 2^32 numbers.
//!
//! Windows are scaled by the shift each side's SYN announced (the window-scale option, found
//! by a bounded walk of the SYN's options) when both sides announced one, as RFC 7323 has
//! it, and never taken below 64 KiB: a blind RST has one chance in 32,768 per guess at
//! most, as against an endpoint that doesn't scale. A SYN's window is never scaled, and
//! never more than those 64 KiB: only the other segments' windows count.

use aya_ebpf::programs::TcContext;
use netd_common::datapath::{CT_DIR_ORIGINAL, TCP_WINDOW_SCALED, TCP_WINDOW_SEEN, TcpWindow};

use super::parse::{FRAG_NONE, Flow, Frame, L3_OFF};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
/// The least window a RST is checked against.
const MIN_WINDOW: u32 = 65_535;
/// TCP options: end of the list, no-operation (one byte each), window scale.
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_WSCALE: u8 = 3;
const TCPOLEN_WSCALE: u8 = 3;
/// The largest shift RFC 7323 allows (a larger one is taken as this).
const MAX_WSCALE: u8 = 14;
/// The most bytes of options a TCP header has (and so the most options: one byte each at
/// least).
const MAX_OPTIONS_LEN: usize = 40;
const TCP_HEADER_LEN: usize = 20;

/// The sequence-space facts of one TCP segment.
pub struct Segment {
    pub seq: u32,
    /// Sequence numbers it takes: payload bytes, plus one each for SYN and FIN.
    pub len: u32,
    /// The window field as sent (unscaled).
    pub window: u16,
    pub syn: bool,
    /// A SYN's window scale option (the shift), if it has one.
    pub wscale: Option<u8>,
}

/// Reads the segment of a parsed TCP packet; `None` for a fragment (a later one has no TCP
/// header, a first one not all of its payload).
#[inline(always)]
pub fn segment(ctx: &TcContext, flow: &Flow) -> Option<Segment> {
    if flow.frag != FRAG_NONE {
        return None;
    }
    let tot_len: [u8; 2] = ctx.read(L3_OFF + 2)?;
    let end = L3_OFF + usize::from(u16::from_be_bytes(tot_len));
    segment_at(ctx, flow.l4_off, end, flow.tcp_flags)
}

/// Reads the segment whose TCP header (with `flags`) is at `l4_off` of a packet ending at
/// `end`, in either family.
#[inline(always)]
pub fn segment_at(ctx: &TcContext, l4_off: usize, end: usize, flags: u8) -> Option<Segment> {
    let header: [u8; 16] = ctx.read(l4_off)?;
    let doff = usize::from(header[12] >> 4) * 4;
    let payload = end.checked_sub(l4_off + doff)? as u32;
    let flag_seqs = u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
    let options = l4_off + TCP_HEADER_LEN;
    let syn = flags & TCP_SYN != 0;
    Some(Segment {
        seq: u32::from_be_bytes([header[4], header[5], header[6], header[7]]),
        len: payload + flag_seqs,
        window: u16::from_be_bytes([header[14], header[15]]),
        syn,
        // Only a SYN's counts (RFC 7323).
        wscale: if syn {
            window_scale(ctx, options, l4_off + doff)
        } else {
            None
        },
    })
}

/// The window scale option among the TCP options from byte `off` to `end` of the frame: a
/// walk of at most as many steps as options fit (each takes one byte at least), each step one
/// option. Malformed options (a length below 2, running past `end` or the frame) end it.
/// Bytes are copied out with `bpf_skb_load_bytes`: the verifier rejects the packet pointer
/// arithmetic direct reads at an offset grown in a loop compile to.
#[inline(always)]
fn window_scale(ctx: &TcContext, mut off: usize, end: usize) -> Option<u8> {
    for _ in 0..MAX_OPTIONS_LEN {
        if off >= end {
            return None;
        }
        match ctx.load::<u8>(off).ok()? {
            TCPOPT_EOL => return None,
            TCPOPT_NOP => off += 1,
            kind => {
                // Kind, length, and the first byte of the value (a window scale's shift).
                let [len, shift]: [u8; 2] = ctx.load(off + 1).ok()?;
                if kind == TCPOPT_WSCALE && len == TCPOLEN_WSCALE && off + 3 <= end {
                    return Some(shift.min(MAX_WSCALE));
                }
                if len < 2 {
                    return None;
                }
                off += usize::from(len);
            }
        }
    }
    None
}

/// Follows what the sender of `seg`, in direction `dir`, has sent and advertised.
#[inline(always)]
pub fn update(windows: &mut [TcpWindow; 2], dir: u8, seg: &Segment) {
    let (sender, _) = sides(windows, dir);
    let end = seg.seq.wrapping_add(seg.len);
    if sender.flags & TCP_WINDOW_SEEN == 0 || after(end, sender.end) {
        sender.end = end;
    }
    if !seg.syn {
        sender.max_win = sender.max_win.max(seg.window);
    }
    sender.flags |= TCP_WINDOW_SEEN;
    if let Some(shift) = seg.wscale {
        sender.wscale = shift;
        sender.flags |= TCP_WINDOW_SCALED;
    }
}

/// Whether a RST from the side of direction `dir` with sequence number `seq` lies within
/// the receiver's window (scaled, at least `MIN_WINDOW`) of where the sender's data ends. Before
/// the sender sent anything there is nothing to check against: it is accepted, as the
/// endpoint accepts one answering its SYN.
#[inline(always)]
pub fn rst_in_window(windows: &mut [TcpWindow; 2], dir: u8, seq: u32) -> bool {
    let (sender, receiver) = sides(windows, dir);
    if sender.flags & TCP_WINDOW_SEEN == 0 {
        return true;
    }
    let scaled = sender.flags & receiver.flags & TCP_WINDOW_SCALED != 0;
    let shift = if scaled {
        receiver.wscale.min(MAX_WSCALE)
    } else {
        0
    };
    // At most 65,535 << 14: twice it still fits the sequence space's half.
    let window = (u32::from(receiver.max_win) << shift).max(MIN_WINDOW);
    seq.wrapping_sub(sender.end.wrapping_sub(window)) <= 2 * window
}
/// The sender's and the receiver's state for a segment in direction `dir`.
#[inline(always)]
fn sides(windows: &mut [TcpWindow; 2], dir: u8) -> (&mut TcpWindow, &mut TcpWindow) {
    let [original, reply] = windows;
    if dir == CT_DIR_ORIGINAL {
        (original, reply)
    } else {
        (reply, original)
    }
}

/// Whether sequence number `a` comes after `b` (modulo 2^32).
#[inline(always)]
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}
