//! Per-sandbox caps refuse new flows; a policy swap resets the live flows it
//! now denies.
//! (The core driven from both ends: a smoltcp guest or hand-built frames on
//! the link, the test as the host driver, a fake clock.)

mod common;

use std::net::Ipv4Addr;

use common::*;
use netstack::{Caps, EgressPolicy, HostEvent, HostRequest, StackConfig};
use smoltcp::socket::tcp;

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
