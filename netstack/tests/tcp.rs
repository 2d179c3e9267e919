//! TCP through the core: a guest SYN waits for the host connect, bytes both
//! ways byte-exact, half-closes, resets and backpressure.
//! (The core driven from both ends: a smoltcp guest or hand-built frames on
//! the link, the test as the host driver, a fake clock.)

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use common::*;
use netstack::wire::RxMeta;
use netstack::{ConnectError, EgressPolicy, FlowId, HostEvent, HostRequest, StackConfig};
use smoltcp::socket::tcp;
use smoltcp::wire::{IpProtocol, TcpPacket};

#[test]
fn tcp_handshake_waits_for_host_connect() {
    let mut p = Pair::allow_all();
    let h = p.guest_connect(peer(), BUF);
    let (flow, dst) = p.expect_connect();
    assert_eq!(dst, peer());

    // The host takes its time; the guest retransmits its SYN meanwhile.
    p.pass_time(Duration::from_secs(3));
    let synacks = p.sent.iter().filter_map(|f| tcp_of(f)).filter(|t| t.syn);
    assert_eq!(synacks.count(), 0, "SYN-ACK before the host connected");
    assert_eq!(p.guest_state(h), tcp::State::SynSent);
    let guest_syns = p.guest_sent.iter().filter(|f| is_syn_v4(f));
    assert!(
        guest_syns.count() >= 2,
        "the guest never retransmitted its SYN"
    );
    assert!(!has_connect(&p), "a retransmitted SYN opened a second flow");
    assert_eq!(p.stack.tcp_flow_count(), 1);
    assert_eq!(p.stack.half_open_count(), 1);
    assert_eq!(p.stack.tcp_send_capacity(flow), 0);

    p.stack.handle_host(p.at(), flow, HostEvent::Connected);
    p.run_until("the guest to establish", |p| {
        p.guest_state(h) == tcp::State::Established
    });
    p.settle();
    let synack = p.sent.iter().filter_map(|f| tcp_of(f)).find(|t| t.syn);
    let synack = synack.expect("a SYN-ACK after tcp_connected");
    assert_eq!(synack.src, peer());
    assert!(synack.ack.is_some());
    assert_eq!(p.stack.half_open_count(), 0);
    assert!(p.stack.tcp_send_capacity(flow) > 0);
}

#[test]
fn tcp_over_ipv6_reaches_the_host() {
    let mut p = Pair::allow_all();
    let dst = sock(PEER_V6, 443);
    let (h, flow) = p.open_tcp(dst, BUF);
    p.guest(h).send_slice(b"hello over v6").unwrap();
    let mut got = Vec::new();
    p.run_until("the bytes to reach the host", |p| {
        host_read(p, flow, &mut got);
        got.len() == 13
    });
    assert_eq!(got, b"hello over v6");
}

#[test]
fn denied_tcp_gets_rst_at_once() {
    let mut p = Pair::new(
        StackConfig::default(),
        deny(&["192.0.2.0/24", "2001:db8::/32"]),
    );
    for (src, dst) in [
        (sock(GUEST_V4, 40_000), peer()),
        (sock(GUEST_V6, 40_001), sock(PEER_V6, 443)),
    ] {
        let out = p.inject(&tcp_syn(src, dst, 1000));
        assert_rst_for_syn(&out, src, dst, 1000);
    }
    assert!(p.requests.is_empty(), "{:?}", p.requests);
    assert_eq!(p.stack.tcp_flow_count(), 0);
    assert_eq!(p.stack.stats().tcp_denied, 2);

    // A real guest gives up at once, without retransmitting.
    let h = p.guest_connect(peer(), BUF);
    p.run_until("the guest to see the RST", |p| {
        p.guest_state(h) == tcp::State::Closed
    });
    assert_eq!(p.guest_sent.iter().filter(|f| is_syn_v4(f)).count(), 1);
    assert!(p.requests.is_empty());
}

#[test]
fn internal_destination_denied_by_default() {
    let mut p = Pair::allow_all();
    let v4 = [
        Ipv4Addr::new(10, 1, 2, 3),
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(192, 168, 1, 1),
    ];
    let v6 = [
        "::ffff:169.254.169.254".parse::<Ipv6Addr>().unwrap(),
        "fd00::99".parse().unwrap(),
    ];
    let dsts = v4
        .iter()
        .map(|&a| (sock(GUEST_V4, 40_000), sock(a, 80)))
        .chain(v6.iter().map(|&a| (sock(GUEST_V6, 40_000), sock(a, 80))));
    for (i, (src, dst)) in dsts.enumerate() {
        let seq = 7_000 + i as i32;
        let out = p.inject(&tcp_syn(src, dst, seq));
        assert_rst_for_syn(&out, src, dst, seq);
    }
    assert!(p.requests.is_empty(), "{:?}", p.requests);
    assert_eq!(p.stack.tcp_flow_count(), 0);
}

#[test]
fn host_refused_becomes_rst() {
    let mut p = Pair::allow_all();
    let h = p.guest_connect(peer(), BUF);
    let (flow, _) = p.expect_connect();
    p.stack.handle_host(
        p.at(),
        flow,
        HostEvent::ConnectFailed(ConnectError::Refused),
    );
    p.run_until("the guest to see the RST", |p| {
        p.guest_state(h) == tcp::State::Closed
    });
    let rst = rsts(&p.sent);
    assert_eq!(rst.len(), 1, "{rst:?}");
    assert_eq!(rst[0].src, peer());
    assert_eq!(tcp_closes(&p), [(flow, true)]);
    assert_eq!(p.stack.tcp_flow_count(), 0);
    assert_eq!(p.stack.half_open_count(), 0);
    assert_eq!(p.stack.buffer_bytes(), 0);
}

/// A guest whose MAC smoltcp's neighbour cache lacks (it never ARPed, or its
/// entry aged out) must still learn at once that the host refused.
#[test]
fn host_refused_rst_does_not_wait_for_arp() {
    let mut p = Pair::allow_all();
    let src = sock(GUEST_V4, 40_000);
    assert!(p.inject(&tcp_syn(src, peer(), 10)).is_empty());
    let (flow, _) = p.expect_connect();
    p.stack.handle_host(
        p.at(),
        flow,
        HostEvent::ConnectFailed(ConnectError::Refused),
    );
    let out = p.poll_stack();
    assert_rst_for_syn(&out, src, peer(), 10);
}

#[test]
fn host_unreachable_becomes_icmp_quoting_the_syn() {
    let mut p = Pair::allow_all();
    let src = sock(GUEST_V4, 40_000);
    let syn = tcp_syn(src, peer(), 4242);
    assert!(p.inject(&syn).is_empty());
    let (flow, _) = p.expect_connect();
    p.stack.handle_host(
        p.at(),
        flow,
        HostEvent::ConnectFailed(ConnectError::Unreachable),
    );
    let out = p.poll_stack();
    assert!(rsts(&out).is_empty(), "an RST after the ICMP error");
    let icmp = icmps(&out);
    assert_eq!(icmp.len(), 1, "{icmp:?}");
    assert_eq!((icmp[0].ty, icmp[0].code), (3, 1));
    assert_eq!(icmp[0].src, IpAddr::V4(GATEWAY_V4));
    // The quote is the SYN's IP header and its first 8 bytes: ports and sequence number.
    assert_eq!(icmp[0].rest[4..], syn[14..14 + 28]);
    assert_eq!(p.stack.tcp_flow_count(), 0);
    assert_eq!(p.stack.half_open_count(), 0);
}

/// The guest sends `up` while the host sends `down`, both as fast as the
/// other side takes them; what each side received.
fn exchange(
    p: &mut Pair,
    h: smoltcp::iface::SocketHandle,
    flow: FlowId,
    up: &[u8],
    down: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let (mut up_sent, mut down_sent) = (0, 0);
    let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
    p.run_until("both directions to arrive", |p| {
        up_sent += p.guest(h).send_slice(&up[up_sent..]).unwrap();
        guest_read(p, h, &mut got_down);
        host_read(p, flow, &mut got_up);
        down_sent += host_write(p, flow, &down[down_sent..]);
        got_up.len() >= up.len() && got_down.len() >= down.len()
    });
    (got_up, got_down)
}

#[test]
fn data_flows_both_ways_byte_exact() {
    let mut p = Pair::allow_all();
    let (h, flow) = p.open_tcp(peer(), BUF);
    let up = XorShift::new(1).bytes(300_000);
    let down = XorShift::new(2).bytes(400_000);
    let (got_up, got_down) = exchange(&mut p, h, flow, &up, &down);
    assert!(got_up == up, "guest→host bytes differ");
    assert!(got_down == down, "host→guest bytes differ");
    assert_eq!(p.stack.stats().bytes_to_host, up.len() as u64);
    assert_eq!(p.stack.stats().bytes_to_guest, down.len() as u64);
}

#[test]
fn offloaded_link_carries_64k_segments_both_ways_byte_exact() {
    // The guest's MTU is 1500; over a tap with offloads the segments are not.
    let cfg = StackConfig {
        mtu: 1500,
        ..StackConfig::default()
    };
    for v6 in [false, true] {
        let mut p = Pair::offloaded(cfg.clone(), EgressPolicy::allow_all());
        let dst = if v6 {
            sock(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 443)
        } else {
            peer()
        };
        let (h, flow) = p.open_tcp(dst, BUF);
        let up = XorShift::new(11).bytes(600_000);
        let down = XorShift::new(12).bytes(700_000);
        let (got_up, got_down) = exchange(&mut p, h, flow, &up, &down);
        assert!(got_up == up, "v6={v6}: guest→host bytes differ");
        assert!(got_down == down, "v6={v6}: host→guest bytes differ");
        assert_eq!(p.stack.stats().frames_dropped, 0, "{:?}", p.stack.stats());

        // (frame length, TCP checksum field) of each segment over the MTU.
        let big = |frames: &[Vec<u8>]| {
            frames
                .iter()
                .filter(|f| f.len() > 14 + 1500)
                .filter_map(|f| {
                    let ip = ip_of(f).filter(|ip| ip.proto == IpProtocol::Tcp)?;
                    let tcp = TcpPacket::new_checked(&ip.payload[..]).ok()?;
                    Some((f.len(), tcp.checksum()))
                })
                .collect::<Vec<_>>()
        };
        let to_guest = big(&p.sent);
        assert!(
            to_guest.len() >= 4,
            "v6={v6}: {} segments over the MTU to the guest",
            to_guest.len()
        );
        for (len, checksum) in &to_guest {
            assert!(*len <= 14 + 65535, "a {len}-byte frame");
            assert_eq!(*checksum, 0, "v6={v6}: the checksum is the link's to fill");
        }
        // The guest's super-frames (TCP, checksum unfilled) were taken whole;
        // the test guest (smoltcp) sends them over IPv4 only.
        assert!(
            v6 || p.guest_sent.iter().any(|f| f.len() > 14 + 1500),
            "the guest sent no super-frames"
        );
    }
}

#[test]
fn a_checksum_the_link_vouches_for_is_not_verified() {
    let mut bad_syn = tcp_syn(sock(GUEST_V4, 40000), peer(), 1);
    let at = bad_syn.len() - 20 + 16;
    bad_syn[at] ^= 0xff;
    let mut bad_udp = udp_frame(sock(GUEST_V4, 40001), sock([192, 0, 2, 1], 53), b"q");
    let at = 14 + 20 + 6;
    bad_udp[at] ^= 0xff;

    let mut p = Pair::allow_all();
    p.inject(&bad_syn);
    p.inject(&bad_udp);
    assert!(!has_connect(&p), "a bad checksum was taken");
    assert!(take_datagram_open(&mut p).is_none());
    assert_eq!(p.stack.stats().dropped_by_reason["bad TCP checksum"], 1);
    assert_eq!(p.stack.stats().dropped_by_reason["invalid UDP datagram"], 1);

    // NEEDS_CSUM from the guest's kernel: the field holds a partial sum.
    let trusted = RxMeta {
        checksum_trusted: true,
    };
    let mut p = Pair::allow_all();
    for frame in [&bad_syn, &bad_udp] {
        p.stack.handle_frame(p.at(), frame, trusted);
    }
    p.poll_stack();
    assert!(has_connect(&p), "the vouched-for SYN was dropped");
    assert!(take_datagram_open(&mut p).is_some());
    assert_eq!(p.stack.stats().frames_dropped, 0);
}

#[test]
fn guest_half_close_reaches_host_and_host_can_still_send() {
    let mut p = Pair::allow_all();
    let (h, flow) = p.open_tcp(peer(), BUF);
    p.guest(h).send_slice(b"request").unwrap();
    p.guest(h).close();
    p.run_until("the stack to ack the guest's FIN", |p| {
        p.guest_state(h) == tcp::State::FinWait2
    });
    let shutdown = HostRequest::TcpShutdown { flow };
    assert!(
        !p.requests.contains(&shutdown),
        "shutdown before the host took the guest's bytes"
    );

    let mut got = Vec::new();
    host_read(&mut p, flow, &mut got);
    assert_eq!(got, b"request");
    p.poll_stack();
    assert!(p.requests.contains(&shutdown));

    assert!(
        p.stack.tcp_send_capacity(flow) > 0,
        "host side closed early"
    );
    assert_eq!(host_write(&mut p, flow, b"response"), 8);
    let mut back = Vec::new();
    p.run_until("the response to reach the guest", |p| {
        guest_read(p, h, &mut back);
        back.len() >= 8
    });
    assert_eq!(back, b"response");

    p.stack.handle_host(p.at(), flow, HostEvent::Eof);
    assert_eq!(p.stack.tcp_send_capacity(flow), 0);
    p.run_until("the flow to end", |p| !tcp_closes(p).is_empty());
    assert!(!p.guest(h).may_recv(), "the guest never saw the FIN");
    assert_eq!(tcp_closes(&p), [(flow, false)]);
    assert_eq!(p.stack.tcp_flow_count(), 0);
    assert_eq!(p.stack.buffer_bytes(), 0);
}

#[test]
fn host_eof_first_then_guest_close_ends_clean() {
    let mut p = Pair::allow_all();
    let (h, flow) = p.open_tcp(peer(), BUF);
    assert_eq!(host_write(&mut p, flow, b"bye"), 3);
    p.stack.handle_host(p.at(), flow, HostEvent::Eof);
    let mut got = Vec::new();
    p.run_until("the guest to see data and FIN", |p| {
        guest_read(p, h, &mut got);
        p.guest_state(h) == tcp::State::CloseWait
    });
    assert_eq!(got, b"bye");
    p.guest(h).close();
    p.run_until("the flow to end", |p| !tcp_closes(p).is_empty());
    assert!(p.requests.contains(&HostRequest::TcpShutdown { flow }));
    assert_eq!(tcp_closes(&p), [(flow, false)]);
}

/// After the host's EOF the guest may still send; its bytes must reach the
/// host even when its FIN arrives before the driver read them.
#[test]
fn guest_bytes_after_host_eof_survive_the_guest_fin() {
    let mut p = Pair::allow_all();
    let (h, flow) = p.open_tcp(peer(), BUF);
    p.stack.handle_host(p.at(), flow, HostEvent::Eof);
    p.run_until("the guest to see the host's FIN", |p| {
        p.guest_state(h) == tcp::State::CloseWait
    });
    p.guest(h).send_slice(b"last words").unwrap();
    p.guest(h).close();
    // The driver is slow: the data and the FIN both arrive before it reads.
    p.run_until("the guest to finish closing", |p| {
        p.guest_state(h) == tcp::State::Closed
    });
    assert_eq!(tcp_closes(&p), [], "the flow ended with guest bytes unread");
    let mut got = Vec::new();
    host_read(&mut p, flow, &mut got);
    assert_eq!(got, b"last words", "guest bytes lost");
    p.poll_stack();
    assert!(p.requests.contains(&HostRequest::TcpShutdown { flow }));
    assert_eq!(tcp_closes(&p), [(flow, false)]);
}

/// The same loss the other way round: the guest half-closed with bytes the
/// driver has not taken yet, then the host's EOF completes the close.
#[test]
fn guest_bytes_before_its_fin_survive_the_host_eof() {
    let mut p = Pair::allow_all();
    let (h, flow) = p.open_tcp(peer(), BUF);
    p.guest(h).send_slice(b"upload").unwrap();
    p.guest(h).close();
    p.run_until("the stack to ack the guest's FIN", |p| {
        p.guest_state(h) == tcp::State::FinWait2
    });
    p.stack.handle_host(p.at(), flow, HostEvent::Eof);
    p.run_until("the guest to see the host's FIN", |p| {
        p.guest_state(h) == tcp::State::TimeWait
    });
    p.settle();
    assert_eq!(tcp_closes(&p), [], "the flow ended with guest bytes unread");
    let mut got = Vec::new();
    host_read(&mut p, flow, &mut got);
    assert_eq!(got, b"upload", "guest bytes lost");
    p.poll_stack();
    assert!(p.requests.contains(&HostRequest::TcpShutdown { flow }));
    assert_eq!(tcp_closes(&p), [(flow, false)]);
}

#[test]
fn guest_rst_resets_host_side() {
    let mut p = Pair::allow_all();
    let (h, flow) = p.open_tcp(peer(), BUF);
    p.guest(h).abort();
    p.run_until("the flow to end", |p| !tcp_closes(p).is_empty());
    assert_eq!(tcp_closes(&p), [(flow, true)]);
    assert!(!p.requests.contains(&HostRequest::TcpShutdown { flow }));
    assert_eq!(p.stack.tcp_flow_count(), 0);
    assert_eq!(p.stack.buffer_bytes(), 0);
}

#[test]
fn host_reset_reaches_the_guest() {
    let mut p = Pair::allow_all();
    let (h, flow) = p.open_tcp(peer(), BUF);
    p.stack.handle_host(p.at(), flow, HostEvent::Reset);
    p.run_until("the guest to see the RST", |p| {
        p.guest_state(h) == tcp::State::Closed
    });
    assert_eq!(rsts(&p.sent).len(), 1);
    assert_eq!(tcp_closes(&p), [(flow, true)]);
}

#[test]
fn backpressure_guest_to_host() {
    const TCP_BUFFER: usize = 16 << 10;
    let cfg = StackConfig {
        tcp_buffer: TCP_BUFFER,
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, EgressPolicy::allow_all());
    let (h, flow) = p.open_tcp(peer(), 128 << 10);
    let data = XorShift::new(3).bytes(100_000);
    assert_eq!(p.guest(h).send_slice(&data).unwrap(), data.len());

    // The host reads nothing: the stack's window shuts once its buffer is full.
    p.pass_time(Duration::from_secs(5));
    let pending = p.stack.tcp_recv_pending(flow);
    assert!(pending > 0 && pending <= TCP_BUFFER, "pending {pending}");
    let held = p.guest(h).send_queue();
    assert!(held >= data.len() - TCP_BUFFER, "guest still holds {held}");
    assert_eq!(p.guest_state(h), tcp::State::Established);

    let mut got = Vec::new();
    p.run_until("the host to drain everything", |p| {
        host_read(p, flow, &mut got);
        got.len() >= data.len()
    });
    assert!(got == data, "bytes lost or reordered under backpressure");
}

#[test]
fn backpressure_host_to_guest() {
    const TCP_BUFFER: usize = 16 << 10;
    const GUEST_BUFFER: usize = 8 << 10;
    let cfg = StackConfig {
        tcp_buffer: TCP_BUFFER,
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, EgressPolicy::allow_all());
    let (h, flow) = p.open_tcp(peer(), GUEST_BUFFER);
    let data = XorShift::new(4).bytes(200_000);

    // The guest reads nothing: the driver fills what the stack offers, then waits.
    let mut sent = 0;
    for _ in 0..50 {
        sent += host_write(&mut p, flow, &data[sent..]);
        p.pass_time(Duration::from_millis(200));
    }
    assert_eq!(p.stack.tcp_send_capacity(flow), 0);
    assert!(
        (TCP_BUFFER..=TCP_BUFFER + GUEST_BUFFER).contains(&sent),
        "took {sent} bytes"
    );

    let mut got = Vec::new();
    p.run_until("the guest to read everything", |p| {
        guest_read(p, h, &mut got);
        sent += host_write(p, flow, &data[sent..]);
        got.len() >= data.len()
    });
    assert!(got == data, "bytes lost or reordered under backpressure");
}

/// Open a flow, move `up` and `down`, then close it cleanly from both ends.
fn flow_to_its_end(p: &mut Pair, up: &[u8], down: &[u8]) {
    let (h, flow) = p.open_tcp(peer(), BUF);
    let (got_up, got_down) = exchange(p, h, flow, up, down);
    assert!(got_up == up, "guest→host bytes differ");
    assert!(got_down == down, "host→guest bytes differ");
    p.stack.handle_host(p.at(), flow, HostEvent::Eof);
    p.run_until("the guest to see the FIN", |p| {
        p.guest_state(h) == tcp::State::CloseWait
    });
    p.guest(h).close();
    p.run_until("the flow to end", |p| {
        tcp_closes(p).iter().any(|&(f, _)| f == flow)
    });
    assert!(
        tcp_closes(p).contains(&(flow, false)),
        "the flow ended clean"
    );
}

/// A short flow's buffers serve the next flow, which sees none of the old
/// bytes; a bulk flow's and a reset flow's are not kept.
#[test]
fn a_short_flows_buffers_serve_the_next_flow_blank() {
    let mut p = Pair::allow_all();
    let mut rng = XorShift::new(7);
    flow_to_its_end(&mut p, &rng.bytes(3000), &rng.bytes(5000));
    assert_eq!(p.stack.stats().tcp_buffers_reused, 0);
    // Shorter this time: stale bytes past the new ones would show.
    flow_to_its_end(&mut p, &rng.bytes(100), &rng.bytes(200));
    assert_eq!(p.stack.stats().tcp_buffers_reused, 2);

    // A bulk flow takes the kept pair, and its own go back to the system.
    flow_to_its_end(&mut p, &rng.bytes(100_000), &rng.bytes(50));
    assert_eq!(p.stack.stats().tcp_buffers_reused, 4);
    flow_to_its_end(&mut p, &rng.bytes(10), &rng.bytes(10));
    assert_eq!(
        p.stack.stats().tcp_buffers_reused,
        5,
        "only the bulk flow's send buffer, which moved 50 bytes, was kept"
    );

    // A reset flow's buffers may hold bytes nobody took: not kept.
    let (h, flow) = p.open_tcp(peer(), BUF);
    assert_eq!(p.stack.stats().tcp_buffers_reused, 7);
    p.guest(h).send_slice(b"unread").unwrap();
    p.settle();
    p.guest(h).abort();
    p.run_until("the reset flow to end", |p| {
        tcp_closes(p).iter().any(|&(f, _)| f == flow)
    });
    p.stack.handle_host(p.at(), flow, HostEvent::Reset);
    let (h, flow) = p.open_tcp(peer(), BUF);
    assert_eq!(p.stack.stats().tcp_buffers_reused, 7);
    let (up, down) = exchange(&mut p, h, flow, b"fresh", b"also fresh");
    assert_eq!((&up[..], &down[..]), (&b"fresh"[..], &b"also fresh"[..]));
}

/// Kept buffers no flow took for a while are freed: an idle sandbox holds
/// none.
#[test]
fn kept_buffers_are_freed_when_no_flow_took_them_for_a_while() {
    let mut p = Pair::allow_all();
    flow_to_its_end(&mut p, b"one", b"two");
    p.pass_time(Duration::from_secs(2));
    flow_to_its_end(&mut p, b"three", b"four");
    assert_eq!(p.stack.stats().tcp_buffers_reused, 2, "kept across 2 s");
    // Woken only at the deadlines it asks for, as a driver would, the
    // stack frees them within 5 s.
    let start = p.at();
    for _ in 0..10_000 {
        if p.at() >= start + Duration::from_secs(6) {
            break;
        }
        let Some(at) = p.stack.poll_timeout() else {
            break;
        };
        p.advance(at.saturating_duration_since(p.at()));
        p.poll_stack();
    }
    let (h, flow) = p.open_tcp(peer(), BUF);
    assert_eq!(p.stack.stats().tcp_buffers_reused, 2, "freed after 5 s");
    let (up, down) = exchange(&mut p, h, flow, b"after", b"idle");
    assert_eq!((&up[..], &down[..]), (&b"after"[..], &b"idle"[..]));
}
