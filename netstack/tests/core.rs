//! The sans-IO core driven from both ends: a smoltcp guest (or hand-built
//! frames) on the link, the test as the host driver, and a fake clock that
//! only moves when a test moves it.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::*;
use netstack::wire::RxMeta;
use netstack::{
    Caps, ConnectError, DatagramKind, EgressPolicy, FlowId, HostEvent, HostRequest, StackConfig,
};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress,
    EthernetFrame, EthernetProtocol, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress,
    IpProtocol, Ipv4Packet, Ipv6Packet, NdiscPrefixInfoFlags, NdiscRepr, TcpControl, TcpPacket,
    TcpSeqNumber, UdpPacket,
};

const PEER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const BUF: usize = 64 << 10;

fn peer() -> SocketAddr {
    sock(PEER_V4, 80)
}

fn deny(list: &[&str]) -> EgressPolicy {
    policy(&[], list)
}

/// Take every contiguous run the host side can read from `flow` into `into`.
fn host_read(p: &mut Pair, flow: FlowId, into: &mut Vec<u8>) {
    while let Some(n) = p.stack.tcp_recv_with(flow, |b| {
        into.extend_from_slice(b);
        (b.len(), b.len())
    }) {
        if n == 0 {
            break;
        }
    }
}

/// Write as much of `data` as the flow takes; how much it took.
fn host_write(p: &mut Pair, flow: FlowId, data: &[u8]) -> usize {
    let mut sent = 0;
    while sent < data.len() {
        let rest = &data[sent..];
        let took = p.stack.tcp_send_with(flow, |buf| {
            let n = buf.len().min(rest.len());
            buf[..n].copy_from_slice(&rest[..n]);
            (n, n)
        });
        match took {
            Some(n) if n > 0 => sent += n,
            _ => break,
        }
    }
    sent
}

fn guest_read(p: &mut Pair, h: smoltcp::iface::SocketHandle, into: &mut Vec<u8>) {
    while p.guest(h).can_recv() {
        p.guest(h)
            .recv(|b| {
                into.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
    }
}

fn tcp_closes(p: &Pair) -> Vec<(FlowId, bool)> {
    p.requests
        .iter()
        .filter_map(|r| match r {
            HostRequest::TcpClose { flow, reset } => Some((*flow, *reset)),
            _ => None,
        })
        .collect()
}

fn has_connect(p: &Pair) -> bool {
    p.requests
        .iter()
        .any(|r| matches!(r, HostRequest::TcpConnect { .. }))
}

/// Whether a guest frame is an IPv4 TCP SYN.
fn is_syn_v4(frame: &[u8]) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return false;
    };
    ip.next_header() == IpProtocol::Tcp
        && TcpPacket::new_checked(ip.payload()).is_ok_and(|t| t.syn() && !t.ack())
}

/// The one RST the stack answered `syn` (sequence `seq`) with: from `dst`, acking the SYN.
#[track_caller]
fn assert_rst_for_syn(out: &[Vec<u8>], src: SocketAddr, dst: SocketAddr, seq: i32) {
    let rst = rsts(out);
    assert_eq!(rst.len(), 1, "one RST for the SYN, got {rst:?}");
    assert_eq!((rst[0].src, rst[0].dst), (dst, src));
    assert_eq!(rst[0].ack, Some(TcpSeqNumber(seq) + 1));
}

// ----- TCP ------------------------------------------------------------------

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

// ----- UDP and ICMP relays ------------------------------------------------

fn take_datagram_open(p: &mut Pair) -> Option<(FlowId, DatagramKind, SocketAddr)> {
    p.take_request(|r| match r {
        HostRequest::DatagramOpen { flow, kind, dst } => Some((*flow, *kind, *dst)),
        _ => None,
    })
}

#[test]
fn udp_relay_and_idle_expiry() {
    let mut p = Pair::allow_all();
    let idle = p.stack.config().udp_idle_timeout;
    let (guest, dst) = (sock(GUEST_V4, 40_000), sock(PEER_V4, 7));
    assert!(p.inject(&udp_frame(guest, dst, b"ping")).is_empty());
    let flow = match p.requests.pop_front() {
        Some(HostRequest::DatagramOpen { flow, kind, dst: d }) => {
            assert_eq!((kind, d), (DatagramKind::Udp, dst));
            flow
        }
        other => panic!("expected DatagramOpen, got {other:?}"),
    };
    let send = |payload: &[u8]| HostRequest::DatagramSend {
        flow,
        payload: payload.to_vec(),
    };
    assert_eq!(p.requests.pop_front(), Some(send(b"ping")));

    p.stack
        .handle_host(p.at(), flow, HostEvent::Datagram(b"pong"));
    let out = p.flush();
    assert_eq!(out.len(), 1);
    let want = UdpSeen {
        dst_mac: GUEST_MAC,
        src: dst,
        dst: guest,
        payload: b"pong".to_vec(),
    };
    assert_eq!(udp_of(&out[0]), Some(want));

    // The same 4-tuple stays one flow.
    p.inject(&udp_frame(guest, dst, b"again"));
    assert_eq!(p.requests.pop_front(), Some(send(b"again")));
    assert!(p.requests.is_empty());

    p.advance(idle - Duration::from_secs(1));
    p.poll_stack();
    assert!(p.requests.is_empty(), "closed before its idle timeout");
    p.advance(Duration::from_secs(2));
    p.poll_stack();
    assert_eq!(
        p.requests.pop_front(),
        Some(HostRequest::DatagramClose { flow })
    );
    assert_eq!(p.stack.datagram_flow_count(), 0);
    p.stack
        .handle_host(p.at(), flow, HostEvent::Datagram(b"late"));
    assert!(p.flush().is_empty(), "a closed flow still delivers");
}

#[test]
fn denied_udp_gets_admin_prohibited() {
    let mut p = Pair::new(StackConfig::default(), deny(&["ALL_TRAFFIC"]));
    let cases = [
        (
            sock(GUEST_V4, 40_000),
            sock(PEER_V4, 7),
            GATEWAY_V4.into(),
            (3, 13),
        ),
        (
            sock(GUEST_V6, 40_000),
            sock(PEER_V6, 7),
            GATEWAY_V6.into(),
            (1, 1),
        ),
    ];
    for (src, dst, gateway, want) in cases {
        let frame = udp_frame(src, dst, b"let me out");
        let out = p.inject(&frame);
        let icmp = icmps(&out);
        assert_eq!(icmp.len(), 1, "{dst}: {icmp:?}");
        assert_eq!((icmp[0].ty, icmp[0].code), want, "{dst}");
        assert_eq!((icmp[0].src, icmp[0].dst), (gateway, src.ip()));
        let ip_header = if src.is_ipv4() { 20 } else { 40 };
        let quote = &frame[14..14 + ip_header + 8];
        assert_eq!(&icmp[0].rest[4..4 + quote.len()], quote, "{dst}: quote");
        assert!(udp_of(&out[0]).is_none());
    }
    assert!(p.requests.is_empty(), "{:?}", p.requests);
    assert_eq!(p.stack.datagram_flow_count(), 0);
    assert_eq!(p.stack.stats().datagram_denied, 2);
}

/// RFC 1122 3.2.2: no ICMP error about a datagram sent to a broadcast address.
#[test]
fn subnet_broadcast_udp_is_dropped_quietly() {
    let mut p = Pair::allow_all();
    let bcast = Ipv4Addr::new(10, 0, 2, 255);
    for dst in [Ipv4Addr::BROADCAST, bcast] {
        let frame = udp_frame_to(
            EthernetAddress::BROADCAST,
            sock(GUEST_V4, 137),
            sock(dst, 137),
            b"who is there",
        );
        let out = p.inject(&frame);
        assert!(out.is_empty(), "{dst} answered: {:?}", icmps(&out));
    }
    assert!(p.requests.is_empty());
}

#[test]
fn host_datagrams_stop_at_the_queued_frames_cap() {
    let cfg = StackConfig {
        caps: Caps {
            max_queued_frames: 4,
            ..Caps::default()
        },
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, EgressPolicy::allow_all());
    p.inject(&udp_frame(sock(GUEST_V4, 40_000), sock(PEER_V4, 7), b"go"));
    let (flow, _, _) = take_datagram_open(&mut p).expect("DatagramOpen");
    for i in 0..10u8 {
        p.stack.handle_host(p.at(), flow, HostEvent::Datagram(&[i]));
    }
    assert!(!p.stack.wants_host_datagrams());
    assert_eq!(p.stack.queued_frames(), 4);
    assert_eq!(p.stack.stats().frames_dropped, 6);
    let firsts: Vec<_> = p
        .flush()
        .iter()
        .map(|f| udp_of(f).unwrap().payload)
        .collect();
    assert_eq!(firsts, [[0], [1], [2], [3]]);
    assert!(p.stack.wants_host_datagrams());
}

#[test]
fn host_loopback_alias_reaches_host_loopback() {
    let alias = Ipv4Addr::new(10, 0, 2, 254);
    let cfg = StackConfig {
        host_loopback_aliases: vec![alias.into()],
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, EgressPolicy::allow_all());
    let h = p.guest_connect(sock(alias, 8080), BUF);
    let (flow, dst) = p.expect_connect();
    assert_eq!(dst, sock(Ipv4Addr::LOCALHOST, 8080));
    p.stack.handle_host(p.at(), flow, HostEvent::Connected);
    p.run_until("the guest to establish", |p| {
        p.guest_state(h) == tcp::State::Established
    });

    let guest = sock(GUEST_V4, 40_000);
    p.inject(&udp_frame(guest, sock(alias, 9000), b"hi"));
    let (flow, _, dst) = take_datagram_open(&mut p).expect("DatagramOpen");
    assert_eq!(dst, sock(Ipv4Addr::LOCALHOST, 9000));
    p.stack
        .handle_host(p.at(), flow, HostEvent::Datagram(b"back"));
    let udp = udp_of(&p.flush()[0]).unwrap();
    assert_eq!((udp.src, udp.dst), (sock(alias, 9000), guest));

    // Other internal addresses stay shut.
    let out = p.inject(&tcp_syn(guest, sock(Ipv4Addr::new(10, 0, 2, 253), 8080), 3));
    assert_eq!(rsts(&out).len(), 1);
}

#[test]
fn ping_to_gateway_answered_locally() {
    let mut p = Pair::allow_all();
    let own: [(IpAddr, IpAddr); 3] = [
        (GUEST_V4.into(), GATEWAY_V4.into()),
        (GUEST_V4.into(), DNS_V4.into()),
        (GUEST_V6.into(), GATEWAY_V6.into()),
    ];
    for (src, dst) in own {
        let out = p.inject(&echo_request(src, dst, 0x1234, 7, b"abcdefgh"));
        assert_eq!(out.len(), 1, "{dst}");
        let ip = ip_of(&out[0]).unwrap();
        assert_eq!((ip.src, ip.dst, ip.dst_mac), (dst, src, GUEST_MAC));
        let (ident, seq_no, data) = match (src, dst) {
            (IpAddr::V4(_), _) => {
                let pkt = Icmpv4Packet::new_checked(&ip.payload[..]).unwrap();
                match Icmpv4Repr::parse(&pkt, &Default::default()).unwrap() {
                    Icmpv4Repr::EchoReply {
                        ident,
                        seq_no,
                        data,
                    } => (ident, seq_no, data.to_vec()),
                    other => panic!("not an echo reply: {other:?}"),
                }
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let pkt = Icmpv6Packet::new_checked(&ip.payload[..]).unwrap();
                match Icmpv6Repr::parse(&d, &s, &pkt, &Default::default()).unwrap() {
                    Icmpv6Repr::EchoReply {
                        ident,
                        seq_no,
                        data,
                    } => (ident, seq_no, data.to_vec()),
                    other => panic!("not an echo reply: {other:?}"),
                }
            }
            _ => unreachable!(),
        };
        assert_eq!((ident, seq_no, &data[..]), (0x1234, 7, &b"abcdefgh"[..]));
    }
    assert!(p.requests.is_empty(), "{:?}", p.requests);
}

#[test]
fn ping_to_denied_destination_gets_admin_prohibited_not_a_reply() {
    let mut p = Pair::new(StackConfig::default(), deny(&["192.0.2.0/24"]));
    let out = p.inject(&echo_request(GUEST_V4.into(), PEER_V4.into(), 1, 1, b"x"));
    let icmp = icmps(&out);
    assert_eq!(icmp.len(), 1, "{icmp:?}");
    assert_eq!((icmp[0].ty, icmp[0].code), (3, 13));
    assert_eq!(icmp[0].src, IpAddr::V4(GATEWAY_V4));
    assert!(p.requests.is_empty(), "{:?}", p.requests);
}

#[test]
fn ping_to_public_is_relayed_and_reply_gets_the_guest_ident() {
    let mut p = Pair::allow_all();
    let out = p.inject(&echo_request(
        GUEST_V4.into(),
        PEER_V4.into(),
        0x77,
        3,
        b"data",
    ));
    assert!(out.is_empty());
    let (flow, kind, dst) = take_datagram_open(&mut p).expect("DatagramOpen");
    assert_eq!((kind, dst), (DatagramKind::IcmpEcho, sock(PEER_V4, 0)));
    let Some(HostRequest::DatagramSend { payload, .. }) = p.requests.pop_front() else {
        panic!("no DatagramSend");
    };
    assert_eq!(payload, [8, 0, 0, 0, 0, 0x77, 0, 3, b'd', b'a', b't', b'a']);

    // The kernel replies with an identifier of its own choosing.
    let reply = [0, 0, 0, 0, 0x99, 0x99, 0, 3, b'd', b'a', b't', b'a'];
    p.stack
        .handle_host(p.at(), flow, HostEvent::Datagram(&reply));
    let out = p.flush();
    let ip = ip_of(&out[0]).expect("an echo reply");
    assert_eq!(ip.src, IpAddr::V4(PEER_V4));
    let pkt = Icmpv4Packet::new_checked(&ip.payload[..]).unwrap();
    let repr = Icmpv4Repr::parse(&pkt, &Default::default()).unwrap();
    let want = Icmpv4Repr::EchoReply {
        ident: 0x77,
        seq_no: 3,
        data: b"data",
    };
    assert_eq!(repr, want);
}

#[test]
fn dns_to_stack_is_forwarded_to_upstream() {
    let upstream = sock(Ipv4Addr::new(192, 0, 2, 53), 53);
    let cfg = StackConfig {
        dns_upstream: Some(upstream),
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, EgressPolicy::allow_all());
    let guest = sock(GUEST_V4, 41_000);
    let dns = sock(DNS_V4, 53);
    let query = dns_query(0xbeef, "example.com");
    assert!(p.inject(&udp_frame(guest, dns, &query)).is_empty());
    let (flow, kind, dst) = take_datagram_open(&mut p).expect("DatagramOpen");
    assert_eq!((kind, dst), (DatagramKind::Udp, upstream));
    let send = HostRequest::DatagramSend {
        flow,
        payload: query.clone(),
    };
    assert_eq!(p.requests.pop_front(), Some(send));

    let mut answer = query.clone();
    answer[2] |= 0x80;
    p.stack
        .handle_host(p.at(), flow, HostEvent::Datagram(&answer));
    let out = p.flush();
    let udp = udp_of(&out[0]).expect("a UDP answer");
    assert_eq!((udp.src, udp.dst), (dns, guest));
    assert_eq!(udp.payload, answer);

    // Garbage to the resolver opens nothing and earns nothing.
    let other = sock(GUEST_V4, 41_001);
    for junk in [&b"\x00\x01garbage"[..], &[0u8; 12][..], &answer[..]] {
        assert!(p.inject(&udp_frame(other, dns, junk)).is_empty());
    }
    assert!(p.requests.is_empty(), "{:?}", p.requests);
    assert_eq!(p.stack.datagram_flow_count(), 1);
}

#[test]
fn dns_without_upstream_gets_port_unreachable() {
    let mut p = Pair::allow_all();
    let query = dns_query(1, "example.com");
    let out = p.inject(&udp_frame(sock(GUEST_V4, 41_000), sock(DNS_V4, 53), &query));
    let icmp = icmps(&out);
    assert_eq!(icmp.len(), 1, "{icmp:?}");
    assert_eq!((icmp[0].ty, icmp[0].code), (3, 3));
    assert_eq!(icmp[0].src, IpAddr::V4(DNS_V4));
    assert!(p.requests.is_empty());
}

// ----- gateway services ---------------------------------------------------

fn dhcp_message(message_type: DhcpMessageType) -> DhcpRepr<'static> {
    DhcpRepr {
        message_type,
        transaction_id: 0x1234_5678,
        secs: 0,
        client_hardware_address: GUEST_MAC,
        client_ip: Ipv4Addr::UNSPECIFIED,
        your_ip: Ipv4Addr::UNSPECIFIED,
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: false,
        requested_ip: None,
        client_identifier: Some(GUEST_MAC),
        server_identifier: None,
        parameter_request_list: Some(&[1, 3, 6, 26]),
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    }
}

/// The stack's one answer to a DHCP message, checked for its addressing.
#[track_caller]
fn dhcp_answer(p: &mut Pair, repr: &DhcpRepr) -> (DhcpMessageType, Ipv4Addr, Vec<u8>) {
    let out = p.inject(&dhcp_frame(repr));
    assert_eq!(out.len(), 1, "one DHCP answer");
    let udp = udp_of(&out[0]).expect("DHCP answer is UDP");
    assert_eq!(udp.dst_mac, GUEST_MAC);
    assert_eq!(udp.src, sock(GATEWAY_V4, 67));
    // A client with an address (a renewal) is answered there; others by broadcast.
    let to = if repr.client_ip.is_unspecified() {
        Ipv4Addr::BROADCAST
    } else {
        repr.client_ip
    };
    assert_eq!(udp.dst, sock(to, 68));
    let pkt = DhcpPacket::new_checked(&udp.payload[..]).unwrap();
    let reply = DhcpRepr::parse(&pkt).unwrap();
    assert_eq!(reply.transaction_id, repr.transaction_id);
    assert_eq!(reply.client_hardware_address, GUEST_MAC);
    assert_eq!(reply.server_identifier, Some(GATEWAY_V4));
    if reply.message_type != DhcpMessageType::Nak {
        assert_eq!(reply.router, Some(GATEWAY_V4));
        assert_eq!(reply.subnet_mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        let dns = reply.dns_servers.as_deref().unwrap_or_default();
        assert_eq!(dns, [DNS_V4]);
        assert!(reply.lease_duration.is_some_and(|s| s > 0));
    }
    (reply.message_type, reply.your_ip, udp.payload)
}

#[test]
fn dhcp_discover_gets_offer_and_request_gets_ack() {
    let mut p = Pair::allow_all();
    let discover = dhcp_message(DhcpMessageType::Discover);
    let (kind, yiaddr, _) = dhcp_answer(&mut p, &discover);
    assert_eq!((kind, yiaddr), (DhcpMessageType::Offer, GUEST_V4));

    let request = DhcpRepr {
        requested_ip: Some(GUEST_V4),
        server_identifier: Some(GATEWAY_V4),
        ..dhcp_message(DhcpMessageType::Request)
    };
    let (kind, yiaddr, _) = dhcp_answer(&mut p, &request);
    assert_eq!((kind, yiaddr), (DhcpMessageType::Ack, GUEST_V4));

    // A renewal names the address as ciaddr instead.
    let renew = DhcpRepr {
        client_ip: GUEST_V4,
        ..dhcp_message(DhcpMessageType::Request)
    };
    let (kind, _, _) = dhcp_answer(&mut p, &renew);
    assert_eq!(kind, DhcpMessageType::Ack);

    let other = DhcpRepr {
        requested_ip: Some(Ipv4Addr::new(10, 0, 2, 99)),
        ..request.clone()
    };
    let (kind, yiaddr, _) = dhcp_answer(&mut p, &other);
    assert_eq!(
        (kind, yiaddr),
        (DhcpMessageType::Nak, Ipv4Addr::UNSPECIFIED)
    );

    // A request that chose another server is not ours to answer.
    let elsewhere = DhcpRepr {
        server_identifier: Some(Ipv4Addr::new(10, 0, 2, 1)),
        ..request
    };
    assert!(p.inject(&dhcp_frame(&elsewhere)).is_empty());
    assert!(
        p.requests.is_empty(),
        "DHCP reached the host: {:?}",
        p.requests
    );
}

/// RFC 2131 4.1: with ciaddr set (a renewal), the ACK is unicast to ciaddr;
/// a client renewing over a UDP socket bound to its address never sees a broadcast.
#[test]
fn dhcp_renewal_ack_is_unicast_to_ciaddr() {
    let mut p = Pair::allow_all();
    let renew = DhcpRepr {
        client_ip: GUEST_V4,
        ..dhcp_message(DhcpMessageType::Request)
    };
    let renew_frame = udp_frame(sock(GUEST_V4, 68), sock(GATEWAY_V4, 67), &{
        let mut body = vec![0; renew.buffer_len()];
        renew
            .emit(&mut DhcpPacket::new_checked(&mut body[..]).unwrap())
            .unwrap();
        body
    });
    let out = p.inject(&renew_frame);
    let udp = udp_of(&out[0]).expect("a DHCP answer");
    assert_eq!(udp.dst, sock(GUEST_V4, 68));
}

fn arp_of(frame: &[u8]) -> Option<(EthernetAddress, ArpRepr)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Arp {
        return None;
    }
    let repr = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()?;
    Some((eth.dst_addr(), repr))
}

#[test]
fn arp_for_gateway_is_answered() {
    let mut p = Pair::allow_all();
    for target in [GATEWAY_V4, DNS_V4] {
        let out = p.inject(&arp_request(GUEST_V4, target));
        assert_eq!(out.len(), 1, "ARP for {target}");
        let (dst_mac, repr) = arp_of(&out[0]).expect("an ARP reply");
        assert_eq!(dst_mac, GUEST_MAC);
        let want = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: GATEWAY_MAC,
            source_protocol_addr: target,
            target_hardware_addr: GUEST_MAC,
            target_protocol_addr: GUEST_V4,
        };
        assert_eq!(repr, want);
    }
}

/// RFC 5227: a host that hears another MAC claim its address treats it as a conflict.
#[test]
fn arp_announcement_of_the_guest_address_is_not_claimed() {
    let mut p = Pair::allow_all();
    let out = p.inject(&arp_request(GUEST_V4, GUEST_V4));
    let claims: Vec<_> = out.iter().filter_map(|f| arp_of(f)).collect();
    assert!(
        claims.is_empty(),
        "the gateway claimed {GUEST_V4}: {claims:?}"
    );
}

fn neighbor_solicit(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let o = target.octets();
    let tail = u16::from_be_bytes([o[14], o[15]]);
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(o[13]), tail);
    let lladdr = (!src.is_unspecified()).then(|| GUEST_MAC.into());
    let repr = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: target,
        lladdr,
    });
    let mac = EthernetAddress([0x33, 0x33, 0xff, o[13], o[14], o[15]]);
    let len = repr.buffer_len();
    ip_frame(
        mac,
        src.into(),
        dst.into(),
        IpProtocol::Icmpv6,
        255,
        len,
        |b| {
            let pkt = &mut Icmpv6Packet::new_unchecked(b);
            repr.emit(&src, &dst, pkt, &Default::default())
        },
    )
}

#[test]
fn neighbor_solicit_for_gateway_answered_but_guest_dad_is_not() {
    let mut p = Pair::allow_all();
    for (src, target) in [(GUEST_V6, GATEWAY_V6), (GUEST_V6_LL, GATEWAY_V6_LL)] {
        let out = p.inject(&neighbor_solicit(src, target));
        assert_eq!(out.len(), 1, "NS for {target}");
        let ip = ip_of(&out[0]).unwrap();
        assert_eq!(
            (ip.src, ip.dst, ip.dst_mac),
            (target.into(), src.into(), GUEST_MAC)
        );
        let pkt = Icmpv6Packet::new_checked(&ip.payload[..]).unwrap();
        let repr = Icmpv6Repr::parse(&target, &src, &pkt, &Default::default()).unwrap();
        let Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            target_addr,
            lladdr,
            ..
        }) = repr
        else {
            panic!("not a neighbour advert: {repr:?}");
        };
        assert_eq!((target_addr, lladdr), (target, Some(GATEWAY_MAC.into())));
    }
    // Duplicate address detection for the guest's own addresses must pass.
    for own in [GUEST_V6, GUEST_V6_LL] {
        let out = p.inject(&neighbor_solicit(Ipv6Addr::UNSPECIFIED, own));
        assert!(out.is_empty(), "the gateway defended {own}");
    }
}

#[test]
fn router_solicit_gets_advert_with_prefix() {
    let mut p = Pair::allow_all();
    let out = p.inject(&router_solicit());
    assert_eq!(out.len(), 1);
    let ip = ip_of(&out[0]).expect("an IPv6 frame");
    assert_eq!(ip.dst_mac, EthernetAddress([0x33, 0x33, 0, 0, 0, 1]));
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    assert_eq!((ip.src, ip.dst), (GATEWAY_V6_LL.into(), all_nodes.into()));
    assert_eq!(
        ip.hop_limit, 255,
        "RFC 4861 drops adverts with another hop limit"
    );
    let pkt = Icmpv6Packet::new_checked(&ip.payload[..]).unwrap();
    let repr = Icmpv6Repr::parse(&GATEWAY_V6_LL, &all_nodes, &pkt, &Default::default());
    let Ok(Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
        router_lifetime,
        lladdr,
        mtu,
        prefix_info,
        ..
    })) = repr
    else {
        panic!("not a router advert: {repr:?}");
    };
    assert!(router_lifetime.secs() > 0, "not a default router");
    assert_eq!(lladdr, Some(GATEWAY_MAC.into()));
    assert_eq!(mtu, Some(StackConfig::default().mtu as u32));
    let prefix = prefix_info.expect("a prefix option");
    assert_eq!(prefix.prefix, Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0));
    assert_eq!(prefix.prefix_len, 64);
    let flags = NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF;
    assert_eq!(prefix.flags, flags);
    assert!(prefix.valid_lifetime >= prefix.preferred_lifetime);
    assert!(prefix.preferred_lifetime.secs() > 0);
}

// ----- caps and policy ----------------------------------------------------

#[test]
fn caps_refuse_new_flows() {
    let with_caps = |caps: Caps| {
        let cfg = StackConfig {
            caps,
            ..StackConfig::default()
        };
        Pair::new(cfg, EgressPolicy::allow_all())
    };

    // Two open flows at most.
    let mut p = with_caps(Caps {
        max_tcp_flows: 2,
        ..Caps::default()
    });
    for port in [40_000, 40_001] {
        assert!(p
            .inject(&tcp_syn(sock(GUEST_V4, port), peer(), 1))
            .is_empty());
        p.expect_connect();
    }
    let third = sock(GUEST_V4, 40_002);
    let out = p.inject(&tcp_syn(third, peer(), 500));
    assert_rst_for_syn(&out, third, peer(), 500);
    assert!(!has_connect(&p));
    assert_eq!(p.stack.tcp_flow_count(), 2);
    assert_eq!(p.stack.stats().caps_hit, 1);
    assert_eq!(
        p.stack.stats().caps_hit_by_cap.get("max_tcp_flows"),
        Some(&1)
    );

    // One connect in progress at most; a finished connect frees the slot.
    let mut p = with_caps(Caps {
        max_half_open: 1,
        ..Caps::default()
    });
    assert!(p
        .inject(&tcp_syn(sock(GUEST_V4, 40_000), peer(), 1))
        .is_empty());
    let (first, _) = p.expect_connect();
    let second = sock(GUEST_V4, 40_001);
    let out = p.inject(&tcp_syn(second, peer(), 900));
    assert_rst_for_syn(&out, second, peer(), 900);
    assert!(!has_connect(&p));
    p.stack.handle_host(p.at(), first, HostEvent::Connected);
    p.poll_stack();
    assert!(p
        .inject(&tcp_syn(sock(GUEST_V4, 40_002), peer(), 1))
        .is_empty());
    p.expect_connect();

    // Buffers: two flows' worth, so the third is refused.
    let buffer = StackConfig::default().tcp_buffer;
    let mut p = with_caps(Caps {
        max_buffer_bytes: 2 * 2 * buffer,
        ..Caps::default()
    });
    for port in [40_000, 40_001] {
        assert!(p
            .inject(&tcp_syn(sock(GUEST_V4, port), peer(), 1))
            .is_empty());
        p.expect_connect();
    }
    let out = p.inject(&tcp_syn(sock(GUEST_V4, 40_002), peer(), 1));
    assert_eq!(rsts(&out).len(), 1);

    // One datagram flow at most.
    let mut p = with_caps(Caps {
        max_datagram_flows: 1,
        ..Caps::default()
    });
    let guest = sock(GUEST_V4, 40_000);
    assert!(p
        .inject(&udp_frame(guest, sock(PEER_V4, 7), b"a"))
        .is_empty());
    assert!(take_datagram_open(&mut p).is_some());
    let out = p.inject(&udp_frame(guest, sock(PEER_V4, 9), b"b"));
    let icmp = icmps(&out);
    assert_eq!(icmp.len(), 1, "{icmp:?}");
    assert_eq!((icmp[0].ty, icmp[0].code), (3, 13));
    assert!(take_datagram_open(&mut p).is_none());
    assert_eq!(p.stack.datagram_flow_count(), 1);
    // Pings count against the same cap.
    let out = p.inject(&echo_request(GUEST_V4.into(), PEER_V4.into(), 1, 1, b""));
    assert_eq!(icmps(&out).len(), 1);
    assert_eq!(p.stack.datagram_flow_count(), 1);
}

#[test]
fn policy_swap_resets_denied_live_flows() {
    let mut p = Pair::allow_all();
    let (doomed, doomed_flow) = p.open_tcp(peer(), BUF);
    let (kept, kept_flow) = p.open_tcp(sock(Ipv4Addr::new(198, 51, 100, 1), 80), BUF);
    p.inject(&udp_frame(sock(GUEST_V4, 40_500), sock(PEER_V4, 53), b"q"));
    let (udp_flow, _, _) = take_datagram_open(&mut p).expect("DatagramOpen");
    p.requests.clear();
    p.sent.clear();

    p.stack.set_policy(p.at(), deny(&["192.0.2.0/24"]));
    p.run_until("the denied flow to end", |p| !tcp_closes(p).is_empty());
    p.settle();
    assert_eq!(tcp_closes(&p), [(doomed_flow, true)]);
    assert!(p
        .requests
        .contains(&HostRequest::DatagramClose { flow: udp_flow }));
    assert_eq!(p.guest_state(doomed), tcp::State::Closed);
    let rst = rsts(&p.sent);
    assert_eq!(rst.len(), 1, "{rst:?}");
    assert_eq!(rst[0].src, peer());

    assert_eq!(p.guest_state(kept), tcp::State::Established);
    assert_eq!(p.stack.tcp_flow_count(), 1);
    assert_eq!(host_write(&mut p, kept_flow, b"still here"), 10);
    let mut got = Vec::new();
    p.run_until("the kept flow to carry data", |p| {
        guest_read(p, kept, &mut got);
        got.len() >= 10
    });

    // New flows obey the new policy too.
    let out = p.inject(&tcp_syn(sock(GUEST_V4, 45_000), peer(), 5));
    assert_rst_for_syn(&out, sock(GUEST_V4, 45_000), peer(), 5);
}

// ----- robustness ---------------------------------------------------------

/// Valid frames of every kind the stack parses, for mutation.
fn seed_frames() -> Vec<Vec<u8>> {
    let g4 = |port| sock(GUEST_V4, port);
    let g6 = |port| sock(GUEST_V6, port);
    let dns = sock(DNS_V4, 53);
    let mut seeds = vec![
        tcp_syn(g4(40_000), peer(), 1),
        tcp_syn(g4(40_001), sock(Ipv4Addr::new(198, 51, 100, 1), 443), 1),
        tcp_syn(g4(40_002), sock(GATEWAY_V4, 22), 1),
        tcp_syn(g6(40_003), sock(PEER_V6, 443), 1),
        tcp_syn(g4(40_004), sock(Ipv4Addr::new(10, 9, 9, 9), 80), 1),
        tcp_frame(g4(40_000), peer(), TcpControl::None, 2, Some(1), b"data"),
        tcp_frame(g4(40_000), peer(), TcpControl::Fin, 2, Some(1), &[]),
        tcp_frame(g4(40_000), peer(), TcpControl::Rst, 2, Some(1), &[]),
        tcp_frame(
            g6(40_003),
            sock(PEER_V6, 443),
            TcpControl::Psh,
            2,
            Some(1),
            b"x",
        ),
        udp_frame(g4(40_100), sock(PEER_V4, 7), b"udp payload"),
        udp_frame(g6(40_101), sock(PEER_V6, 7), b"udp payload"),
        udp_frame(g4(40_102), dns, &dns_query(7, "example.com")),
        udp_frame(
            g4(40_103),
            sock(Ipv4Addr::new(198, 51, 100, 9), 123),
            &[0; 48],
        ),
        udp_frame(
            g4(40_104),
            sock(Ipv4Addr::new(224, 0, 0, 251), 5353),
            b"mdns",
        ),
        echo_request(GUEST_V4.into(), PEER_V4.into(), 9, 1, b"ping"),
        echo_request(GUEST_V4.into(), GATEWAY_V4.into(), 9, 1, b"ping"),
        echo_request(GUEST_V6.into(), PEER_V6.into(), 9, 1, b"ping"),
        arp_request(GUEST_V4, GATEWAY_V4),
        router_solicit(),
        dhcp_frame(&dhcp_message(DhcpMessageType::Discover)),
        dhcp_frame(&DhcpRepr {
            requested_ip: Some(GUEST_V4),
            ..dhcp_message(DhcpMessageType::Request)
        }),
    ];
    seeds.push(udp_frame(g4(40_105), sock(PEER_V4, 9), &[0xab; 1400]));
    seeds
}

/// Recompute IP and L4 checksums after a mutation, so it gets past them.
fn fix_checksums(frame: &mut [u8]) {
    let Ok(eth) = EthernetFrame::new_checked(&*frame) else {
        return;
    };
    let ethertype = eth.ethertype();
    let ip = &mut frame[14..];
    let (src, dst, proto, l4): (IpAddress, IpAddress, _, &mut [u8]) = match ethertype {
        EthernetProtocol::Ipv4 => {
            let Ok(mut pkt) = Ipv4Packet::new_checked(&mut *ip) else {
                return;
            };
            pkt.fill_checksum();
            let (s, d, proto) = (pkt.src_addr(), pkt.dst_addr(), pkt.next_header());
            let (hl, tl) = (pkt.header_len() as usize, pkt.total_len() as usize);
            (s.into(), d.into(), proto, &mut ip[hl..tl])
        }
        EthernetProtocol::Ipv6 => {
            let Ok(pkt) = Ipv6Packet::new_checked(&*ip) else {
                return;
            };
            let (s, d, proto) = (pkt.src_addr(), pkt.dst_addr(), pkt.next_header());
            let len = pkt.payload_len() as usize;
            (s.into(), d.into(), proto, &mut ip[40..40 + len])
        }
        _ => return,
    };
    match (proto, src, dst) {
        (IpProtocol::Tcp, _, _) => {
            if let Ok(mut t) = TcpPacket::new_checked(l4) {
                t.fill_checksum(&src, &dst);
            }
        }
        (IpProtocol::Udp, _, _) => {
            if let Ok(mut u) = UdpPacket::new_checked(l4) {
                u.fill_checksum(&src, &dst);
            }
        }
        (IpProtocol::Icmp, _, _) => {
            if let Ok(mut i) = Icmpv4Packet::new_checked(l4) {
                i.fill_checksum();
            }
        }
        (IpProtocol::Icmpv6, IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
            if let Ok(mut i) = Icmpv6Packet::new_checked(l4) {
                i.fill_checksum(&s, &d);
            }
        }
        _ => {}
    }
}

/// Every frame the stack sends parses, with correct checksums.
#[track_caller]
fn assert_well_formed(frame: &[u8]) {
    let eth = EthernetFrame::new_checked(frame).expect("a whole Ethernet frame");
    assert_eq!(eth.src_addr(), GATEWAY_MAC);
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            assert!(arp_of(frame).is_some(), "malformed ARP");
        }
        EthernetProtocol::Ipv4 | EthernetProtocol::Ipv6 => {
            let ip = ip_of(frame).expect("a whole IP packet");
            let ok = match ip.proto {
                IpProtocol::Tcp => tcp_of(frame).is_some(),
                IpProtocol::Udp => udp_of(frame).is_some(),
                IpProtocol::Icmp | IpProtocol::Icmpv6 => icmp_of(frame).is_some(),
                other => panic!("the stack sent {other}"),
            };
            assert!(ok, "malformed {} from the stack", ip.proto);
        }
        other => panic!("the stack sent ethertype {other}"),
    }
}

#[test]
fn garbage_frames_never_panic() {
    let caps = Caps {
        max_tcp_flows: 8,
        max_half_open: 4,
        max_buffer_bytes: 6 * 2 * 4096,
        max_datagram_flows: 8,
        max_queued_frames: 64,
        max_queued_bytes: 1 << 20,
        max_inbound: 4,
    };
    let cfg = StackConfig {
        tcp_buffer: 4096,
        dns_upstream: Some(sock(Ipv4Addr::new(192, 0, 2, 53), 53)),
        caps: caps.clone(),
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, deny(&["198.51.100.0/24"]));
    let seeds = seed_frames();
    let mut rng = XorShift::new(0x5a5a_1234);
    let mut tcp_flows: Vec<FlowId> = Vec::new();
    let mut dgram_flows: Vec<FlowId> = Vec::new();
    let (mut opened_tcp, mut opened_dgram) = (0, 0);

    for round in 0..5_000 {
        let seed = &seeds[rng.below(seeds.len())];
        let frame = match rng.below(6) {
            0 => {
                let len = rng.below(200);
                rng.bytes(len)
            }
            1 => seed[..rng.below(seed.len() + 1)].to_vec(),
            2 | 3 => {
                let mut f = seed.clone();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(f.len());
                    f[at] ^= 1 << rng.below(8);
                }
                if rng.below(4) != 0 {
                    fix_checksums(&mut f);
                }
                f
            }
            _ => seed.clone(),
        };
        p.stack.handle_frame(p.at(), &frame, RxMeta::default());

        // Play a driver that answers at random.
        while let Some(r) = p.stack.poll_request() {
            match r {
                HostRequest::TcpConnect { flow, .. } => {
                    opened_tcp += 1;
                    match rng.below(4) {
                        0 => p.stack.handle_host(
                            p.at(),
                            flow,
                            HostEvent::ConnectFailed(ConnectError::Refused),
                        ),
                        1 => p.stack.handle_host(
                            p.at(),
                            flow,
                            HostEvent::ConnectFailed(ConnectError::TimedOut),
                        ),
                        _ => tcp_flows.push(flow),
                    }
                }
                HostRequest::DatagramOpen { flow, .. } => {
                    opened_dgram += 1;
                    dgram_flows.push(flow);
                }
                _ => {}
            }
        }
        if let Some(&flow) = tcp_flows.get(rng.below(tcp_flows.len() + 1)) {
            match rng.below(8) {
                0 => p.stack.handle_host(p.at(), flow, HostEvent::Eof),
                1 => p.stack.handle_host(p.at(), flow, HostEvent::Reset),
                2 => drop(host_write(&mut p, flow, b"from the host")),
                3 => host_read(&mut p, flow, &mut Vec::new()),
                _ => p.stack.handle_host(p.at(), flow, HostEvent::Connected),
            }
        }
        if let Some(&flow) = dgram_flows.get(rng.below(dgram_flows.len() + 1)) {
            let len = rng.below(64);
            let payload = rng.bytes(len);
            p.stack
                .handle_host(p.at(), flow, HostEvent::Datagram(&payload));
        }
        if rng.chance(500) {
            let list = if rng.chance(2) {
                "192.0.2.0/24"
            } else {
                "203.0.113.0/24"
            };
            p.stack.set_policy(p.at(), deny(&[list]));
        }
        if rng.chance(20) {
            p.advance(Duration::from_millis(rng.below(3_000) as u64));
        }
        p.stack.handle_timeout(p.at());
        p.requests.clear();
        for out in p.flush() {
            assert_well_formed(&out);
        }

        let s = &p.stack;
        assert!(s.tcp_flow_count() <= caps.max_tcp_flows, "round {round}");
        assert!(s.half_open_count() <= caps.max_half_open, "round {round}");
        assert!(s.half_open_count() <= s.tcp_flow_count(), "round {round}");
        assert!(
            s.datagram_flow_count() <= caps.max_datagram_flows,
            "round {round}"
        );
        assert!(s.buffer_bytes() <= caps.max_buffer_bytes, "round {round}");
        assert_eq!(
            s.buffer_bytes(),
            2 * 4096 * s.tcp_flow_count(),
            "round {round}"
        );
    }
    // Not vacuous: flows were opened, refused and dropped along the way.
    let stats = p.stack.stats();
    assert!(
        opened_tcp > 10 && opened_dgram > 10,
        "{opened_tcp} {opened_dgram}"
    );
    assert!(stats.tcp_denied > 0 && stats.datagram_denied > 0);
    assert!(stats.caps_hit > 0 && stats.frames_dropped > 0);
    // The breakdowns add up to the totals.
    assert_eq!(stats.caps_hit_by_cap.values().sum::<u64>(), stats.caps_hit);
    assert_eq!(
        stats.dropped_by_reason.values().sum::<u64>(),
        stats.frames_dropped
    );
}

#[test]
fn gateway_connects_into_the_guest_and_bytes_flow() {
    let mut p = Pair::allow_all();
    let mut listener = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; BUF]),
        tcp::SocketBuffer::new(vec![0; BUF]),
    );
    listener.listen(8080).unwrap();
    let h = p.sockets.add(listener);
    let now = p.at();
    let flow = p.stack.connect_to_guest(now, 8080, false).unwrap();
    p.run_until("the inbound connection to open", |p| {
        p.take_request(|r| match r {
            HostRequest::InboundReady { flow: f } => Some(*f),
            _ => None,
        })
        .is_some()
    });
    assert_eq!(p.guest_state(h), tcp::State::Established);
    assert_eq!(
        p.guest(h).remote_endpoint().map(|e| e.addr),
        Some(GATEWAY_V4.into()),
        "the guest sees the gateway as the peer"
    );
    let n = p.stack.tcp_send_with(flow, |buf| {
        buf[..5].copy_from_slice(b"GET /");
        (5, 5)
    });
    assert_eq!(n, Some(5));
    p.run_until("the guest to receive", |p| p.guest(h).recv_queue() == 5);
    p.guest(h).send_slice(b"200 OK").unwrap();
    p.run_until("the reply to arrive", |p| {
        p.stack.tcp_recv_pending(flow) == 6
    });
    let got = p
        .stack
        .tcp_recv_with(flow, |b| (b.len(), b.to_vec()))
        .unwrap();
    assert_eq!(got, b"200 OK");
}

#[test]
fn gateway_connect_to_a_closed_guest_port_is_refused() {
    let mut p = Pair::allow_all();
    let now = p.at();
    let flow = p.stack.connect_to_guest(now, 9, false).unwrap();
    p.run_until("the refusal", |p| {
        p.take_request(|r| match r {
            HostRequest::InboundFailed { flow: f, error } if *f == flow => Some(*error),
            _ => None,
        })
        .is_some_and(|e| e == ConnectError::Refused)
    });
    assert_eq!(p.stack.tcp_flow_count(), 0);
}

#[test]
fn gateway_connections_stop_at_the_inbound_cap() {
    let cfg = StackConfig {
        caps: Caps {
            max_inbound: 2,
            ..Caps::default()
        },
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, EgressPolicy::allow_all());
    let now = p.at();
    assert!(p.stack.connect_to_guest(now, 80, false).is_ok());
    assert!(p.stack.connect_to_guest(now, 80, false).is_ok());
    assert_eq!(
        p.stack.connect_to_guest(now, 80, false),
        Err(netstack::InboundError::OverCap)
    );
}

#[test]
fn reset_flows_resets_tcp_and_forgets_datagrams() {
    let mut p = Pair::allow_all();
    let (h, _flow) = p.open_tcp(peer(), BUF);
    p.inject(&udp_frame(sock(GUEST_V4, 5000), sock(PEER_V4, 7), b"x"));
    assert_eq!(p.stack.tcp_flow_count(), 1);
    assert_eq!(p.stack.datagram_flow_count(), 1);
    p.stack.reset_flows(p.at());
    assert_eq!(p.stack.tcp_flow_count(), 0);
    assert_eq!(p.stack.datagram_flow_count(), 0);
    assert!(
        p.stack.poll_request().is_none(),
        "requests for the old link's sockets"
    );
    p.run_until("the guest to see the reset", |p| {
        p.guest_state(h) == tcp::State::Closed
    });
}
