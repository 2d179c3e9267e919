//! Egress by name in the core (issue 12): the filtering resolver at the
//! stack's DNS address, the pins its answers leave, the rebinding guard,
//! pin expiry and a live policy update.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use netstack::{DatagramKind, EgressPolicy, FlowId, HostEvent, HostRequest, StackConfig};

const UPSTREAM: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
const APP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);

fn names_pair(allow: &[&str]) -> Pair {
    let cfg = StackConfig {
        dns_upstream: Some(sock(UPSTREAM, 53)),
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, policy(allow, &["ALL_TRAFFIC"]));
    p.inject(&arp_request(GUEST_V4, GATEWAY_V4));
    p
}

/// An answer to `query` with these A records and TTLs.
fn answer(query: &[u8], addrs: &[(Ipv4Addr, u32)]) -> Vec<u8> {
    let mut r = query.to_vec();
    r[2] |= 0x80;
    r[3] = 0x80;
    r[6..8].copy_from_slice(&(addrs.len() as u16).to_be_bytes());
    for (a, ttl) in addrs {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&[0, 4]);
        r.extend_from_slice(&a.octets());
    }
    r
}

/// The A records of an answer the guest got.
fn a_records(msg: &[u8]) -> Vec<Ipv4Addr> {
    let mut at = 12;
    while msg[at] != 0 {
        at += 1 + usize::from(msg[at]);
    }
    at += 5;
    let count = u16::from_be_bytes([msg[6], msg[7]]);
    let mut out = Vec::new();
    for _ in 0..count {
        // Names here are a pointer or written out.
        while msg[at] != 0 && msg[at] & 0xc0 == 0 {
            at += 1 + usize::from(msg[at]);
        }
        at += if msg[at] & 0xc0 == 0xc0 { 2 } else { 1 };
        let rtype = u16::from_be_bytes([msg[at], msg[at + 1]]);
        let len = usize::from(u16::from_be_bytes([msg[at + 8], msg[at + 9]]));
        if rtype == 1 {
            let d = &msg[at + 10..at + 14];
            out.push(Ipv4Addr::new(d[0], d[1], d[2], d[3]));
        }
        at += 10 + len;
    }
    out
}

/// The guest asks the stack's resolver for `name`; what the stack did.
fn ask(p: &mut Pair, port: u16, name: &str) -> (Vec<u8>, Vec<Vec<u8>>) {
    let query = dns_query(0x4242, name);
    let out = p.inject(&udp_frame(sock(GUEST_V4, port), sock(DNS_V4, 53), &query));
    (query, out)
}

/// Answer the resolver's forwarded query; the UDP payload the guest got.
fn upstream_answers(p: &mut Pair, query: &[u8], addrs: &[(Ipv4Addr, u32)]) -> Vec<u8> {
    let (flow, kind, dst) = take_datagram_open(p).expect("the query is forwarded");
    assert_eq!((kind, dst), (DatagramKind::Udp, sock(UPSTREAM, 53)));
    let sent = p.take_request(|r| match r {
        HostRequest::DatagramSend { flow: f, payload } if *f == flow => Some(payload.clone()),
        _ => None,
    });
    assert_eq!(sent.as_deref(), Some(query));
    p.stack
        .handle_host(p.at(), flow, HostEvent::Datagram(&answer(query, addrs)));
    let out = p.flush();
    udp_of(&out[0]).expect("an answer to the guest").payload
}

fn syn_gets_connect(p: &mut Pair, port: u16, dst: Ipv4Addr) -> Option<FlowId> {
    let out = p.inject(&tcp_syn(sock(GUEST_V4, port), sock(dst, 443), 1));
    let connect = p.take_request(|r| match r {
        HostRequest::TcpConnect { flow, dst: d, .. } if *d == sock(dst, 443) => Some(*flow),
        _ => None,
    });
    if connect.is_none() {
        assert_eq!(rsts(&out).len(), 1, "a refused SYN gets an RST");
    }
    connect
}

#[test]
fn a_denied_name_gets_nxdomain_blocked_and_never_leaves_the_host() {
    let mut p = names_pair(&["*.example.test"]);
    for name in ["evil.test", "example.test", "example.test.evil.test"] {
        let (_, out) = ask(&mut p, 40_000, name);
        let reply = udp_of(&out[0]).expect("the resolver answers itself");
        assert_eq!(
            (reply.src, reply.dst),
            (sock(DNS_V4, 53), sock(GUEST_V4, 40_000))
        );
        assert_eq!(reply.payload[3] & 0x0f, 3, "NXDOMAIN for {name}");
        // EDNS OPT with EDE (option 15), info-code 15 "Blocked".
        let ede = reply.payload.windows(6).any(|w| w == [0, 15, 0, 40, 0, 15]);
        assert!(ede, "no EDE Blocked in {:?}", reply.payload);
    }
    assert!(p.requests.is_empty(), "{:?}", p.requests);
    assert_eq!(p.stack.stats().dns_blocked, 3);
}

#[test]
fn an_allowed_names_answer_pins_its_addresses_on_every_port_and_protocol() {
    let mut p = names_pair(&["app.example.test"]);
    // Nothing is pinned yet: the address is denied like any other.
    assert_eq!(syn_gets_connect(&mut p, 41_000, APP), None);
    let (query, out) = ask(&mut p, 40_000, "APP.Example.TEST");
    assert!(out.is_empty());
    let got = upstream_answers(&mut p, &query, &[(APP, 300)]);
    assert_eq!(a_records(&got), [APP]);
    assert_eq!(p.stack.pinned_addresses(), 1);
    assert!(syn_gets_connect(&mut p, 41_001, APP).is_some());
    // Another address stays refused.
    assert_eq!(syn_gets_connect(&mut p, 41_002, OTHER), None);
    // UDP to the pinned address is relayed too.
    p.inject(&udp_frame(sock(GUEST_V4, 41_003), sock(APP, 3478), b"x"));
    let (_, kind, dst) = take_datagram_open(&mut p).expect("UDP to a pin");
    assert_eq!((kind, dst), (DatagramKind::Udp, sock(APP, 3478)));
    assert!(p.stack.stats().pinned_flows >= 2);
}

#[test]
fn internal_answers_are_removed_and_never_pinned() {
    let mut p = names_pair(&["*.example.test"]);
    let (query, _) = ask(&mut p, 40_000, "rebind.example.test");
    let internal = Ipv4Addr::new(10, 1, 2, 3);
    let metadata = Ipv4Addr::new(169, 254, 169, 254);
    let got = upstream_answers(&mut p, &query, &[(internal, 60), (APP, 60), (metadata, 60)]);
    assert_eq!(a_records(&got), [APP]);
    assert_eq!(p.stack.stats().dns_answers_rewritten, 1);
    assert_eq!(p.stack.pinned_addresses(), 1);
}

#[test]
fn a_pin_lasts_its_ttl_but_at_least_a_minute() {
    let mut p = names_pair(&["app.example.test"]);
    let (query, _) = ask(&mut p, 40_000, "app.example.test");
    upstream_answers(&mut p, &query, &[(APP, 5)]);
    p.advance(Duration::from_secs(59));
    assert!(syn_gets_connect(&mut p, 41_000, APP).is_some());
    p.advance(Duration::from_secs(2));
    assert_eq!(syn_gets_connect(&mut p, 41_001, APP), None);
}

#[test]
fn a_live_update_drops_pins_and_resets_the_flows_it_no_longer_allows() {
    let mut p = names_pair(&["app.example.test", "keep.example.test"]);
    let (q1, _) = ask(&mut p, 40_000, "app.example.test");
    upstream_answers(&mut p, &q1, &[(APP, 300)]);
    let (q2, _) = ask(&mut p, 40_001, "keep.example.test");
    upstream_answers(&mut p, &q2, &[(OTHER, 300)]);
    let (_h1, gone) = p.open_tcp(sock(APP, 443), 4096);
    let (_h2, kept) = p.open_tcp(sock(OTHER, 443), 4096);
    p.requests.clear();
    let at = p.at();
    p.stack
        .set_policy(at, policy(&["keep.example.test"], &["ALL_TRAFFIC"]));
    p.settle();
    let closes: Vec<(FlowId, bool)> = tcp_closes(&p);
    assert!(closes.contains(&(gone, true)), "{closes:?}");
    assert!(!closes.iter().any(|(f, _)| *f == kept), "{closes:?}");
    assert_eq!(p.stack.pinned_addresses(), 1);
    assert_eq!(syn_gets_connect(&mut p, 41_000, APP), None);
    // A policy without names: no resolver filtering, no pins.
    let at = p.at();
    p.stack.set_policy(at, EgressPolicy::allow_all());
    assert_eq!(p.stack.pinned_addresses(), 0);
}

#[test]
fn dns_over_tcp_is_refused_while_names_are_filtered() {
    let mut p = names_pair(&["app.example.test"]);
    let out = p.inject(&tcp_syn(sock(GUEST_V4, 40_000), sock(DNS_V4, 53), 1));
    assert_eq!(rsts(&out).len(), 1);
    assert!(p.requests.is_empty());
}

/// E2B's dnsServers: while names are filtered, DNS to 8.8.8.8 (the default)
/// or to the configured servers is the filtering resolver, answering from
/// the address the guest asked; it is never opened as a destination.
#[test]
fn queries_to_dns_servers_are_answered_by_the_filtering_resolver() {
    let quad8 = Ipv4Addr::new(8, 8, 8, 8);
    let mut p = names_pair(&["app.example.test"]);
    let query = dns_query(0x0808, "evil.test");
    let out = p.inject(&udp_frame(sock(GUEST_V4, 40_000), sock(quad8, 53), &query));
    let reply = udp_of(&out[0]).expect("the resolver answers itself");
    assert_eq!(reply.src, sock(quad8, 53));
    assert_eq!(reply.payload[3] & 0x0f, 3, "NXDOMAIN");
    assert!(p.requests.is_empty(), "{:?}", p.requests);
    let query = dns_query(0x0809, "app.example.test");
    p.inject(&udp_frame(sock(GUEST_V4, 40_001), sock(quad8, 53), &query));
    let (flow, _, dst) = take_datagram_open(&mut p).expect("forwarded");
    assert_eq!(dst, sock(UPSTREAM, 53), "to the upstream, not to 8.8.8.8");
    p.requests.clear();
    p.stack.handle_host(
        p.at(),
        flow,
        HostEvent::Datagram(&answer(&query, &[(APP, 60)])),
    );
    let out = p.flush();
    assert_eq!(udp_of(&out[0]).unwrap().src, sock(quad8, 53));
    assert_eq!(p.stack.pinned_addresses(), 1);
    // TCP to it is refused like the resolver's own address.
    let out = p.inject(&tcp_syn(sock(GUEST_V4, 40_002), sock(quad8, 53), 1));
    assert_eq!(rsts(&out).len(), 1);

    // No names: 8.8.8.8 is an ordinary destination again.
    let at = p.at();
    p.stack.set_policy(at, policy(&[], &["ALL_TRAFFIC"]));
    p.requests.clear();
    let out = p.inject(&udp_frame(sock(GUEST_V4, 40_003), sock(quad8, 53), &query));
    assert_eq!(icmps(&out).len(), 1, "denied as any address is");
    assert!(take_datagram_open(&mut p).is_none());

    // An empty dnsServers intercepts nothing.
    let cfg = StackConfig {
        dns_upstream: Some(sock(UPSTREAM, 53)),
        dns_servers: Vec::new(),
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, policy(&["app.example.test"], &["ALL_TRAFFIC"]));
    let out = p.inject(&udp_frame(sock(GUEST_V4, 40_000), sock(quad8, 53), &query));
    assert_eq!(icmps(&out).len(), 1);
    assert!(take_datagram_open(&mut p).is_none());
}
