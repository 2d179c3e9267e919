//! A hostile guest against the sans-IO core: aborted handshakes, a guest that
//! stops reading, connects that hang, floods of refused flows. Each test
//! pins a hole a red-team pass found (issue 11); none may panic the stack,
//! spin it, or grow it without bound.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use netstack::wire::RxMeta;
use netstack::{Caps, ConnectError, EgressPolicy, FlowId, HostEvent, HostRequest, StackConfig};
use smoltcp::wire::{TcpControl, TcpSeqNumber};

const PEER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

fn peer() -> SocketAddr {
    sock(PEER_V4, 7)
}

fn with_caps(caps: Caps) -> Pair {
    let cfg = StackConfig {
        caps,
        ..StackConfig::default()
    };
    Pair::new(cfg, EgressPolicy::allow_all())
}

/// The flow of the (only) connect the stack asked for since the last look.
#[track_caller]
fn connect_request(p: &mut Pair) -> FlowId {
    p.take_request(|r| match r {
        HostRequest::TcpConnect { flow, .. } => Some(*flow),
        _ => None,
    })
    .expect("a TcpConnect request")
}

#[track_caller]
fn reset_close(p: &mut Pair, flow: FlowId) {
    let closed = p.take_request(|r| match r {
        HostRequest::TcpClose { flow: f, reset } if *f == flow => Some(*reset),
        _ => None,
    });
    assert_eq!(
        closed,
        Some(true),
        "no reset close of {flow}: {:?}",
        p.requests
    );
}

fn seq(n: u32) -> i32 {
    n as i32
}

/// The guest's ARP request for the gateway: the stack learns its MAC, so
/// its SYN-ACKs go out at once.
fn introduce_guest(p: &mut Pair) {
    p.inject(&arp_request(GUEST_V4, GATEWAY_V4));
}

/// The red-team crash: SYN (seq 2^31), the host connect succeeds, the
/// guest's kernel answers the SYN-ACK with an RST (no socket wants it).
/// smoltcp took that socket back to LISTEN with the old handshake's state;
/// a SYN from another port, then an RST in the same batch, underflowed a
/// sequence subtraction and panicked the process.
#[test]
fn guest_rst_of_a_synack_then_syn_and_rst_in_one_batch_do_not_panic() {
    let mut p = Pair::allow_all();
    introduce_guest(&mut p);
    let first = sock(GUEST_V4, 40_000);
    p.inject(&tcp_syn(first, peer(), seq(0x8000_0000)));
    let flow = connect_request(&mut p);
    p.stack.handle_host(p.at(), flow, HostEvent::Connected);
    let out = p.poll_stack();
    let synack = out
        .iter()
        .filter_map(|f| tcp_of(f))
        .find(|t| t.syn && t.ack.is_some())
        .expect("a SYN-ACK to the guest");
    assert_eq!(synack.ack, Some(TcpSeqNumber(seq(0x8000_0001))));
    p.inject(&tcp_frame(
        first,
        peer(),
        TcpControl::Rst,
        seq(0x8000_0001),
        None,
        &[],
    ));
    // The aborted handshake frees its flow and its host socket.
    reset_close(&mut p, flow);
    assert_eq!(p.stack.tcp_flow_count(), 0);

    let second = sock(GUEST_V4, 40_001);
    let now = p.at();
    p.stack
        .handle_frame(now, &tcp_syn(second, peer(), 0), RxMeta::default());
    p.stack.handle_frame(
        now,
        &tcp_frame(second, peer(), TcpControl::Rst, seq(0x8000_0001), None, &[]),
        RxMeta::default(),
    );
    p.stack.handle_timeout(now);
    p.flush();
    // The second SYN was a flow of its own, and its RST (acceptable or not)
    // ended it before the host connect could.
    let second_flow = connect_request(&mut p);
    assert_ne!(second_flow, flow);
    reset_close(&mut p, second_flow);
    p.stack
        .handle_host(p.at(), second_flow, HostEvent::Connected);
    p.poll_stack();
    assert_eq!(p.stack.tcp_flow_count(), 0);

    // The stack still serves: a real handshake through it works.
    let (_h, _flow) = p.open_tcp(sock(PEER_V4, 80), 4096);
}

/// Happy Eyeballs races and cancelled connects: handshakes the guest
/// aborts, before or after the host connect finished, free their flows at
/// once. Six of them with room for six flows leave room for the seventh.
#[test]
fn aborted_handshakes_free_their_flows_and_cap_slots() {
    let mut p = with_caps(Caps {
        max_tcp_flows: 6,
        max_half_open: 6,
        ..Caps::default()
    });
    introduce_guest(&mut p);
    for i in 0..6u16 {
        let guest = sock(GUEST_V4, 41_000 + i);
        p.inject(&tcp_syn(guest, peer(), 1000));
        let flow = connect_request(&mut p);
        if i % 2 == 0 {
            // The guest gives up while the host connect still runs.
            p.inject(&tcp_frame(guest, peer(), TcpControl::Rst, 1001, None, &[]));
        } else {
            // The host connect finished; the guest resets the SYN-ACK.
            p.stack.handle_host(p.at(), flow, HostEvent::Connected);
            p.poll_stack();
            p.inject(&tcp_frame(guest, peer(), TcpControl::Rst, 1001, None, &[]));
        }
        reset_close(&mut p, flow);
        // A late answer to the host connect changes nothing.
        p.stack.handle_host(p.at(), flow, HostEvent::Connected);
        p.stack.handle_host(
            p.at(),
            flow,
            HostEvent::ConnectFailed(ConnectError::Refused),
        );
        p.poll_stack();
    }
    assert_eq!(p.stack.tcp_flow_count(), 0);
    assert_eq!(p.stack.half_open_count(), 0);
    assert_eq!(p.stack.buffer_bytes(), 0);
    assert_eq!(p.stack.stats().caps_hit, 0);
    let (_h, _flow) = p.open_tcp(sock(PEER_V4, 80), 4096);
}

/// A guest SYN waits for the host connect; meanwhile the core wants no
/// polling (a paused SYN-ACK made smoltcp ask for "now", forever, and the
/// driver spun a core), and the guest's retransmitted SYNs are not answered
/// with anything.
#[test]
fn a_pending_host_connect_wants_no_polling() {
    let mut p = Pair::allow_all();
    introduce_guest(&mut p);
    let guest = sock(GUEST_V4, 40_000);
    p.inject(&tcp_syn(guest, peer(), 1));
    let flow = connect_request(&mut p);
    let now = p.at();
    let at = p.stack.poll_timeout();
    assert!(
        at.is_none_or(|at| at > now),
        "the stack asks to be polled at {at:?}, now is {now:?}"
    );
    // The guest retransmits its SYN: held, not answered.
    p.advance(Duration::from_secs(1));
    assert!(p.inject(&tcp_syn(guest, peer(), 1)).is_empty());
    let now = p.at();
    assert!(p.stack.poll_timeout().is_none_or(|at| at > now));
    // The connect ends: the SYN-ACK goes out.
    p.stack.handle_host(p.at(), flow, HostEvent::Connected);
    let out = p.poll_stack();
    assert!(out
        .iter()
        .filter_map(|f| tcp_of(f))
        .any(|t| t.syn && t.ack == Some(TcpSeqNumber(2))));
}

/// A guest whose link stops draining (no receive buffers posted, a VMM
/// that stopped reading) while it sends 60 KB pings to the gateway: the
/// queue to it stays within its caps and the rest is dropped and counted.
#[test]
fn the_queue_to_a_guest_that_stops_reading_is_bounded() {
    let caps = Caps::default();
    let mut p = with_caps(caps.clone());
    introduce_guest(&mut p);
    p.flush();
    let data = vec![0x5a; 60_000];
    let now = p.at();
    for i in 0..3000u16 {
        let ping = echo_request(GUEST_V4.into(), GATEWAY_V4.into(), 7, i, &data);
        p.stack.handle_frame(now, &ping, RxMeta::default());
        p.stack.handle_timeout(now);
    }
    let queued = p.stack.queued_frames();
    assert!(queued <= caps.max_queued_frames, "{queued} frames queued");
    let stats = p.stack.stats();
    assert!(stats.tx_dropped > 2000, "{stats:?}");
    assert_eq!(
        stats.dropped_by_reason.get("guest link not draining"),
        Some(&stats.tx_dropped)
    );
    let mut bytes = 0;
    while let Some(f) = p.stack.poll_transmit() {
        bytes += f.len();
    }
    assert!(
        bytes <= caps.max_queued_bytes + 65_600,
        "{bytes} bytes queued"
    );
    assert!(bytes >= 60_000, "nothing was queued at all");
}

/// A new link must not get frames meant for the old guest.
#[test]
fn discarding_the_queue_forgets_the_old_guests_frames() {
    let mut p = Pair::allow_all();
    introduce_guest(&mut p);
    let now = p.at();
    for i in 0..10u16 {
        let ping = echo_request(GUEST_V4.into(), GATEWAY_V4.into(), 7, i, b"x");
        p.stack.handle_frame(now, &ping, RxMeta::default());
    }
    assert!(p.stack.queued_frames() >= 10);
    p.stack.discard_transmit();
    assert_eq!(p.stack.queued_frames(), 0);
    assert!(p.stack.poll_transmit().is_none());
}

/// 20,000 denied SYNs: each is refused, but the flow log says so at most
/// 50 times a second; the rest are counted.
#[test]
fn refusal_log_lines_are_rate_limited() {
    let mut p = Pair::new(StackConfig::default(), policy(&[], &["192.0.2.0/24"]));
    introduce_guest(&mut p);
    let now = p.at();
    for i in 0..20_000u32 {
        let guest = sock(GUEST_V4, 10_000 + (i % 50_000) as u16);
        p.stack
            .handle_frame(now, &tcp_syn(guest, peer(), i as i32), RxMeta::default());
        while p.stack.poll_transmit().is_some() {}
    }
    let stats = p.stack.stats();
    assert_eq!(stats.tcp_denied, 20_000);
    assert_eq!(stats.log_lines_suppressed, 20_000 - 50);
    // A second later the log speaks again.
    p.advance(Duration::from_secs(1));
    let now = p.at();
    p.stack.handle_frame(
        now,
        &tcp_syn(sock(GUEST_V4, 9_999), peer(), 1),
        RxMeta::default(),
    );
    assert_eq!(p.stack.stats().log_lines_suppressed, 20_000 - 50);
}
