//! Connections the public gateway opens into the guest, and resetting every
//! flow when the link is replaced.
//! (The core driven from both ends: a smoltcp guest or hand-built frames on
//! the link, the test as the host driver, a fake clock.)

mod common;

use common::*;
use netstack::{Caps, ConnectError, EgressPolicy, HostRequest, StackConfig};
use smoltcp::socket::tcp;

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
