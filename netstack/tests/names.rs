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

/// A hand-made SYN to `dst`:443: the host connect it asks for, if any. An
/// address neither allowed nor pinned gets no connect: under a policy with
/// names the stack answers the SYN itself and waits for a name.
fn syn_gets_connect(p: &mut Pair, port: u16, dst: Ipv4Addr) -> Option<FlowId> {
    let out = p.inject(&tcp_syn(sock(GUEST_V4, port), sock(dst, 443), 1));
    let connect = p.take_request(|r| match r {
        HostRequest::TcpConnect { flow, dst: d, .. } if *d == sock(dst, 443) => Some(*flow),
        _ => None,
    });
    if connect.is_none() {
        assert!(
            rsts(&out).is_empty() && !out.is_empty(),
            "the stack answers the SYN itself"
        );
        assert!(!has_connect(p), "{:?}", p.requests);
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
    // TCP to it is the resolver too: accepted by the stack, nothing opened.
    let out = p.inject(&tcp_syn(sock(GUEST_V4, 40_002), sock(quad8, 53), 1));
    assert!(rsts(&out).is_empty() && !out.is_empty());
    assert!(p.requests.is_empty(), "{:?}", p.requests);

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

// ----- SNI and Host on every TCP port (the name-dial path) --------------------

/// The guest sends `chunks` on `h`, each in its own segment.
fn guest_sends(p: &mut Pair, h: smoltcp::iface::SocketHandle, chunks: &[&[u8]]) {
    for c in chunks {
        assert_eq!(p.guest(h).send_slice(c).unwrap(), c.len());
        p.settle();
    }
}

/// The stack's own lookup of `name`: its flow and the A and AAAA queries.
fn expect_lookup(p: &mut Pair, name: &str) -> (FlowId, Vec<Vec<u8>>) {
    let (flow, kind, dst) = take_datagram_open(p).expect("the stack resolves the name");
    assert_eq!((kind, dst), (DatagramKind::Udp, sock(UPSTREAM, 53)));
    let mut queries = Vec::new();
    while let Some(q) = p.take_request(|r| match r {
        HostRequest::DatagramSend { flow: f, payload } if *f == flow => Some(payload.clone()),
        _ => None,
    }) {
        let parsed = netstack::dns::Query::parse(&q).expect("a query");
        assert_eq!(parsed.name.as_deref(), Some(name));
        queries.push(q);
    }
    let types: Vec<u16> = queries
        .iter()
        .map(|q| netstack::dns::Query::parse(q).unwrap().qtype)
        .collect();
    assert_eq!(types, [1, 28], "A and AAAA");
    (flow, queries)
}

/// The host connect a dial ends in: its flow, where, and the name.
fn expect_name_connect(p: &mut Pair) -> (FlowId, std::net::SocketAddr, Option<String>) {
    p.take_request(|r| match r {
        HostRequest::TcpConnect { flow, dst, name } => Some((*flow, *dst, name.clone())),
        _ => None,
    })
    .expect("a host connect")
}

fn reset_by_stack(p: &mut Pair, h: smoltcp::iface::SocketHandle) -> bool {
    p.run_until("the guest socket to close", |p| {
        p.guest_state(h) == smoltcp::socket::tcp::State::Closed
    });
    true
}

#[test]
fn an_allowed_sni_split_across_three_segments_is_dialed_by_name_and_replayed() {
    let mut p = names_pair(&["*.example.test"]);
    // The guest aims at an address nobody resolved for it.
    let h = p.guest_connect(sock(OTHER, 8443), 64 << 10);
    p.run_until("the stack to accept", |p| {
        p.guest_state(h) == smoltcp::socket::tcp::State::Established
    });
    assert!(!has_connect(&p), "no host connect before a name");
    let hello = client_hello("API.example.test", 1 << 14);
    let (a, rest) = hello.split_at(3);
    let (b, c) = rest.split_at(40);
    guest_sends(&mut p, h, &[a, b]);
    assert!(
        take_datagram_open(&mut p).is_none(),
        "not a whole ClientHello yet"
    );
    guest_sends(&mut p, h, &[c]);
    let (lookup, queries) = expect_lookup(&mut p, "api.example.test");
    // The AAAA answer is empty; the A answer names the real server.
    p.stack.handle_host(
        p.at(),
        lookup,
        HostEvent::Datagram(&answer(&queries[1], &[])),
    );
    p.stack.handle_host(
        p.at(),
        lookup,
        HostEvent::Datagram(&answer(&queries[0], &[(APP, 60)])),
    );
    p.settle();
    let (flow, dst, name) = expect_name_connect(&mut p);
    assert_eq!(
        dst,
        sock(APP, 8443),
        "the name's address, on the guest's port"
    );
    assert_eq!(name.as_deref(), Some("api.example.test"));
    assert!(p
        .requests
        .iter()
        .any(|r| matches!(r, HostRequest::DatagramClose { flow } if *flow == lookup)));
    // Nothing reaches the host before its connect is up.
    let mut got = Vec::new();
    host_read(&mut p, flow, &mut got);
    assert!(got.is_empty());
    p.stack.handle_host(p.at(), flow, HostEvent::Connected);
    host_read(&mut p, flow, &mut got);
    assert_eq!(got, hello, "the first bytes are replayed whole");
    host_write(&mut p, flow, b"server hello");
    p.settle();
    let mut back = Vec::new();
    guest_read(&mut p, h, &mut back);
    assert_eq!(back, b"server hello");
    assert_eq!(p.stack.stats().sni_flows, 1);
    assert_eq!(p.stack.half_open_count(), 0);
}

#[test]
fn an_http_host_split_across_segments_is_dialed_by_name() {
    let mut p = names_pair(&["web.example.test"]);
    let h = p.guest_connect(sock(OTHER, 8080), 64 << 10);
    let req: &[u8] =
        b"GET /index.html HTTP/1.1\r\nUser-Agent: t\r\nHost: web.example.test:8080\r\n\r\n";
    p.run_until("the stack to accept", |p| {
        p.guest_state(h) == smoltcp::socket::tcp::State::Established
    });
    guest_sends(&mut p, h, &[&req[..30], &req[30..50], &req[50..]]);
    let (lookup, queries) = expect_lookup(&mut p, "web.example.test");
    p.stack.handle_host(
        p.at(),
        lookup,
        HostEvent::Datagram(&answer(&queries[0], &[(APP, 60)])),
    );
    p.settle();
    let (flow, dst, _) = expect_name_connect(&mut p);
    assert_eq!(dst, sock(APP, 8080));
    p.stack.handle_host(p.at(), flow, HostEvent::Connected);
    let mut got = Vec::new();
    host_read(&mut p, flow, &mut got);
    assert_eq!(got, req);
    assert_eq!(p.stack.stats().host_flows, 1);
}

#[test]
fn a_denied_or_missing_name_is_reset_and_nothing_is_asked() {
    for first in [
        client_hello("evil.test", 1 << 14),
        client_hello("", 1 << 14),
        b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n".to_vec(),
        b"GET http://evil.test/ HTTP/1.1\r\nHost: app.example.test\r\n\r\n".to_vec(),
        b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(),
    ] {
        let mut p = names_pair(&["app.example.test"]);
        let h = p.guest_connect(sock(OTHER, 443), 64 << 10);
        p.run_until("the stack to accept", |p| {
            p.guest_state(h) == smoltcp::socket::tcp::State::Established
        });
        guest_sends(&mut p, h, &[&first]);
        assert!(reset_by_stack(&mut p, h));
        assert!(p.requests.is_empty(), "{:?}", p.requests);
        assert_eq!(p.stack.stats().name_refused, 1);
        assert_eq!(p.stack.tcp_flow_count(), 0);
        assert_eq!(p.stack.half_open_count(), 0);
    }
}

#[test]
fn first_bytes_are_bounded_in_time_and_size() {
    let mut p = names_pair(&["app.example.test"]);
    // Silence: reset after five seconds.
    let h = p.guest_connect(sock(OTHER, 443), 64 << 10);
    p.run_until("the stack to accept", |p| {
        p.guest_state(h) == smoltcp::socket::tcp::State::Established
    });
    assert_eq!(p.stack.half_open_count(), 1, "it counts as half-open");
    p.pass_time(Duration::from_millis(4900));
    assert_eq!(p.guest_state(h), smoltcp::socket::tcp::State::Established);
    p.pass_time(Duration::from_millis(200));
    assert_eq!(p.guest_state(h), smoltcp::socket::tcp::State::Closed);
    // A request head that never ends: reset at 16 KiB.
    let h = p.guest_connect(sock(OTHER, 80), 64 << 10);
    p.run_until("the stack to accept", |p| {
        p.guest_state(h) == smoltcp::socket::tcp::State::Established
    });
    let mut head = b"GET / HTTP/1.1\r\n".to_vec();
    while head.len() < 17 << 10 {
        head.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    p.guest(h).send_slice(&head).unwrap();
    assert!(reset_by_stack(&mut p, h));
    assert!(p.requests.is_empty(), "{:?}", p.requests);
    assert_eq!(p.stack.half_open_count(), 0);
}

#[test]
fn a_name_that_resolves_only_into_internal_ranges_is_not_dialed() {
    let mut p = names_pair(&["app.example.test"]);
    let h = p.guest_connect(sock(OTHER, 443), 64 << 10);
    p.run_until("the stack to accept", |p| {
        p.guest_state(h) == smoltcp::socket::tcp::State::Established
    });
    guest_sends(&mut p, h, &[&client_hello("app.example.test", 1 << 14)]);
    let (lookup, queries) = expect_lookup(&mut p, "app.example.test");
    let internal = Ipv4Addr::new(169, 254, 169, 254);
    p.stack.handle_host(
        p.at(),
        lookup,
        HostEvent::Datagram(&answer(&queries[0], &[(internal, 60)])),
    );
    p.settle();
    assert!(!has_connect(&p));
    p.stack.handle_host(
        p.at(),
        lookup,
        HostEvent::Datagram(&answer(&queries[1], &[])),
    );
    assert!(reset_by_stack(&mut p, h));
    assert!(!has_connect(&p), "{:?}", p.requests);
}

#[test]
fn a_live_update_resets_a_name_allowed_flow() {
    let mut p = names_pair(&["app.example.test", "keep.example.test"]);
    let mut flows = Vec::new();
    for name in ["app.example.test", "keep.example.test"] {
        let h = p.guest_connect(sock(OTHER, 443), 64 << 10);
        p.run_until("the stack to accept", |p| {
            p.guest_state(h) == smoltcp::socket::tcp::State::Established
        });
        guest_sends(&mut p, h, &[&client_hello(name, 1 << 14)]);
        let (lookup, queries) = expect_lookup(&mut p, name);
        p.stack.handle_host(
            p.at(),
            lookup,
            HostEvent::Datagram(&answer(&queries[0], &[(APP, 60)])),
        );
        p.settle();
        let (flow, _, _) = expect_name_connect(&mut p);
        p.stack.handle_host(p.at(), flow, HostEvent::Connected);
        p.settle();
        flows.push((h, flow));
    }
    p.requests.clear();
    let at = p.at();
    p.stack
        .set_policy(at, policy(&["keep.example.test"], &["ALL_TRAFFIC"]));
    p.settle();
    let closes = tcp_closes(&p);
    assert!(closes.contains(&(flows[0].1, true)), "{closes:?}");
    assert!(!closes.iter().any(|(f, _)| *f == flows[1].1), "{closes:?}");
    assert_eq!(
        p.guest_state(flows[0].0),
        smoltcp::socket::tcp::State::Closed
    );
    assert_eq!(
        p.guest_state(flows[1].0),
        smoltcp::socket::tcp::State::Established
    );
}

// ----- fronting on pinned addresses -----------------------------------------

/// Pin APP for app.example.test and open a flow to it on `port`.
fn pinned_flow(p: &mut Pair, port: u16) -> (smoltcp::iface::SocketHandle, FlowId) {
    if p.stack.pinned_addresses() == 0 {
        let (query, _) = ask(p, 40_000, "app.example.test");
        upstream_answers(p, &query, &[(APP, 300)]);
    }
    p.open_tcp(sock(APP, port), 64 << 10)
}

#[test]
fn a_pinned_flow_naming_a_denied_host_is_reset_before_the_host_sees_a_byte() {
    let mut p = names_pair(&["app.example.test", "other.example.test"]);
    let (h, flow) = pinned_flow(&mut p, 443);
    guest_sends(&mut p, h, &[&client_hello("evil.test", 1 << 14)]);
    let mut got = Vec::new();
    host_read(&mut p, flow, &mut got);
    assert!(got.is_empty(), "the host got {} bytes", got.len());
    assert!(reset_by_stack(&mut p, h));
    assert!(tcp_closes(&p).contains(&(flow, true)));
    assert_eq!(p.stack.stats().fronting_refused, 1);

    // Another allowed name on the same address is fine (shared hosting).
    let (h, flow) = pinned_flow(&mut p, 443);
    let req: &[u8] = b"GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n";
    guest_sends(&mut p, h, &[&req[..10], &req[10..]]);
    let mut got = Vec::new();
    host_read(&mut p, flow, &mut got);
    assert_eq!(got, req);
}

#[test]
fn server_first_protocols_on_a_pinned_address_work() {
    let mut p = names_pair(&["app.example.test"]);
    let (h, flow) = pinned_flow(&mut p, 22);
    host_write(&mut p, flow, b"SSH-2.0-server\r\n");
    p.settle();
    let mut back = Vec::new();
    guest_read(&mut p, h, &mut back);
    assert_eq!(back, b"SSH-2.0-server\r\n");
    guest_sends(&mut p, h, &[b"SSH-2.0-client\r\n"]);
    let mut got = Vec::new();
    host_read(&mut p, flow, &mut got);
    assert_eq!(got, b"SSH-2.0-client\r\n");
    // Once released, later bytes are never inspected again.
    guest_sends(&mut p, h, &[b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n"]);
    host_read(&mut p, flow, &mut got);
    assert!(got.ends_with(b"evil.test\r\n\r\n"));
    assert_eq!(p.stack.stats().fronting_refused, 0);
}

#[test]
fn a_partial_client_hello_on_a_pinned_address_times_out() {
    let mut p = names_pair(&["app.example.test"]);
    let (h, flow) = pinned_flow(&mut p, 443);
    let hello = client_hello("evil.test", 1 << 14);
    guest_sends(&mut p, h, &[&hello[..20]]);
    p.pass_time(Duration::from_millis(5200));
    let mut got = Vec::new();
    host_read(&mut p, flow, &mut got);
    assert!(got.is_empty());
    assert_eq!(p.guest_state(h), smoltcp::socket::tcp::State::Closed);
}

// ----- DNS over TCP ------------------------------------------------------------

/// One length-prefixed DNS message.
fn framed(msg: &[u8]) -> Vec<u8> {
    let mut out = (msg.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    out
}

#[test]
fn dns_over_tcp_is_filtered_like_udp() {
    let mut p = names_pair(&["app.example.test"]);
    let h = p.guest_connect(sock(DNS_V4, 53), 4096);
    p.run_until("the resolver to accept", |p| {
        p.guest_state(h) == smoltcp::socket::tcp::State::Established
    });
    // A denied name (split across segments): NXDOMAIN over TCP, nothing out.
    let denied = framed(&dns_query(0x1111, "evil.test"));
    guest_sends(&mut p, h, &[&denied[..5], &denied[5..]]);
    let mut back = Vec::new();
    guest_read(&mut p, h, &mut back);
    let len = usize::from(u16::from_be_bytes([back[0], back[1]]));
    assert_eq!(back.len(), 2 + len);
    assert_eq!(&back[2..4], &[0x11, 0x11]);
    assert_eq!(back[5] & 0x0f, 3, "NXDOMAIN");
    assert!(p.requests.is_empty(), "{:?}", p.requests);
    // An allowed one goes to the upstream (over UDP) and comes back framed.
    let query = dns_query(0x2222, "app.example.test");
    guest_sends(&mut p, h, &[&framed(&query)]);
    let (flow, kind, dst) = take_datagram_open(&mut p).expect("forwarded");
    assert_eq!((kind, dst), (DatagramKind::Udp, sock(UPSTREAM, 53)));
    p.requests.clear();
    p.stack.handle_host(
        p.at(),
        flow,
        HostEvent::Datagram(&answer(
            &query,
            &[(APP, 60), (Ipv4Addr::new(10, 9, 9, 9), 60)],
        )),
    );
    p.settle();
    let mut back = Vec::new();
    guest_read(&mut p, h, &mut back);
    assert_eq!(&back[2..4], &[0x22, 0x22]);
    assert_eq!(a_records(&back[2..]), [APP], "the rebinding guard applies");
    assert_eq!(p.stack.pinned_addresses(), 1);
    assert_eq!(p.stack.stats().dns_blocked, 1);
    assert_eq!(p.stack.stats().dns_forwarded, 1);
    // The guest closes: the resolver's query flow goes with it.
    p.guest(h).close();
    p.pass_time(Duration::from_secs(1));
    assert!(p
        .requests
        .iter()
        .any(|r| matches!(r, HostRequest::DatagramClose { flow: f } if *f == flow)));
    assert_eq!(p.stack.tcp_flow_count(), 0);
}
