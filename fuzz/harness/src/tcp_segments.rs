//! TCP segments of every shape into a few flows in every state. Four pairs
//! of ends; segments with any flags, sequence and acknowledgement numbers
//! (relative to what the stack last said, absolute, or near 2^31 away),
//! windows, options and payloads; host answers at any moment; the clock;
//! segments in one batch with no poll between them; the link replaced
//! (every flow reset, ends reused at once) and policies swapped. The whole
//! core's promises are checked after every step by the `stack_frames`
//! harness. Three such segments panicked smoltcp 0.14 (issue 11).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::{Arbitrary, Unstructured};

use super::frames::{self, SeqNo, TcpEnds, TcpFields, GUEST_V4, GUEST_V6};
use super::input::Bytes;
use super::stack_frames::{self, Harness, HostEvent, PolicyChoice, Setup, Upstream};

const MAX_OPS: usize = 384;
/// Payloads stay small: the buffers are 4 KiB, and windows matter more than bytes.
const MAX_PAYLOAD: usize = 1400;

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Seq {
    /// What the stack last acknowledged, plus this.
    Next(i16),
    Raw(u32),
    /// Half the sequence space away from what the stack expects.
    Opposite(i8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Ack {
    /// What the stack last sent, plus this.
    Sent(i16),
    Raw(u32),
    Opposite(i8),
}

#[derive(Arbitrary, Debug, Clone)]
pub struct Segment {
    /// Which of the four pairs of ends.
    pub ends: u8,
    /// FIN SYN RST PSH ACK URG ECE CWR, bit 0 first.
    pub flags: u8,
    pub seq: Seq,
    pub ack: Ack,
    pub window: u16,
    /// MSS, window scale, SACK-permitted, timestamps, or garbage.
    pub options: Bytes,
    pub payload: u16,
}

#[derive(Arbitrary, Debug)]
pub enum Op {
    Segment {
        segment: Segment,
        /// Leave the stack unpolled after it, as inside one read batch.
        batch: bool,
    },
    Host {
        pick: u8,
        event: HostEvent,
    },
    AdvanceMillis(u16),
    AdvanceSecs(u8),
    NextTimer,
    /// The VMM reconnected: every flow reset, the same ends free again.
    ResetFlows,
    /// Deny everything, or allow everything again.
    Policy(bool),
    Hold(bool),
}

#[derive(Arbitrary, Debug)]
pub struct Input {
    pub small_mtu: bool,
    pub tight_buffers: bool,
    pub seed: u64,
    pub ops: Vec<Op>,
}

fn ends(i: u8) -> (SocketAddr, SocketAddr) {
    let peer_v4 = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
    let peer_v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1));
    match i % 4 {
        0 => (
            SocketAddr::new(GUEST_V4.into(), 40000),
            SocketAddr::new(peer_v4, 80),
        ),
        1 => (
            SocketAddr::new(GUEST_V4.into(), 40001),
            SocketAddr::new(peer_v4, 80),
        ),
        2 => (
            SocketAddr::new(GUEST_V4.into(), 40000),
            SocketAddr::new(peer_v4, 443),
        ),
        _ => (
            SocketAddr::new(GUEST_V6.into(), 40000),
            SocketAddr::new(peer_v6, 80),
        ),
    }
}

impl Segment {
    fn frame(&self, h: &Harness) -> Vec<u8> {
        let (guest, peer) = ends(self.ends);
        let track = h.track(guest, peer);
        let expect = track.map_or(0x8000_0000, |t| t.expect);
        let sent = track.map_or(0, |t| t.sent_end);
        let seq = match self.seq {
            Seq::Next(o) => expect.wrapping_add(o as u32),
            Seq::Raw(s) => s,
            Seq::Opposite(o) => expect.wrapping_add(0x8000_0000).wrapping_add(o as u32),
        };
        let ack = match self.ack {
            Ack::Sent(o) => sent.wrapping_add(o as u32),
            Ack::Raw(a) => a,
            Ack::Opposite(o) => sent.wrapping_add(0x8000_0000).wrapping_add(o as u32),
        };
        let bit = |n: u8| self.flags & (1 << n) != 0;
        let fields = TcpFields {
            // Only the fields below matter to `tcp_frame`.
            ends: TcpEnds::Tracked(0),
            seq: SeqNo::Expected,
            ack: frames::AckNo::All,
            fin: bit(0),
            syn: bit(1),
            rst: bit(2),
            psh: bit(3),
            ack_flag: bit(4),
            urg: bit(5),
            ece_cwr: self.flags & 0xc0,
            window: self.window,
            urgent: 0,
            options: Bytes(self.options.0.iter().copied().take(40).collect()),
            data_offset_override: None,
            payload: Bytes(vec![0x5a; usize::from(self.payload) % (MAX_PAYLOAD + 1)]),
        };
        frames::tcp_frame(guest, peer, seq, ack, &fields)
    }
}

/// Decode `data` and run it: the fuzz target and the regression replay.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    run_input(&input);
}

pub fn run_input(input: &Input) {
    let setup = Setup {
        small_mtu: input.small_mtu,
        tight_buffers: input.tight_buffers,
        upstream: Upstream::None,
        loopback_alias: false,
        policy: PolicyChoice::AllowAll,
        seed: input.seed,
    };
    let mut h = Harness::new(&setup);
    for frame in frames::guest_hello() {
        h.guest_frame(&frame, false);
    }
    for op in input.ops.iter().take(MAX_OPS) {
        let step = match op {
            Op::Segment { segment, batch } => {
                let frame = segment.frame(&h);
                h.guest_frame(&frame, *batch);
                continue;
            }
            Op::Host { pick, event } => stack_frames::Op::Host {
                pick: *pick,
                event: event.clone(),
            },
            Op::AdvanceMillis(ms) => stack_frames::Op::AdvanceMillis(*ms),
            Op::AdvanceSecs(s) => stack_frames::Op::AdvanceSecs(*s),
            Op::NextTimer => stack_frames::Op::NextTimer,
            Op::ResetFlows => {
                h.reset_flows();
                continue;
            }
            Op::Policy(allow) => stack_frames::Op::SetPolicy(if *allow {
                PolicyChoice::AllowAll
            } else {
                PolicyChoice::DenyAllTraffic
            }),
            Op::Hold(hold) => stack_frames::Op::Hold(*hold),
        };
        h.step(&step);
    }
    h.finish();
}
