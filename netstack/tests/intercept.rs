//! Header rules in the core (issue 15): which flows the host is told to
//! intercept, and that none of an intercepted flow's bytes can be taken
//! before the host was told. The interception itself is the binary's.

mod common;

use std::net::Ipv4Addr;

use common::*;
use netstack::names::NamePattern;
use netstack::{DatagramKind, EgressPolicy, FlowId, HostEvent, HostRequest, StackConfig};
use smoltcp::socket::tcp::State;

const UPSTREAM: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
const APP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);

fn ruled(allow: &[&str], rules: &[&str]) -> EgressPolicy {
    policy(allow, &["ALL_TRAFFIC"]).with_intercepts(
        rules
            .iter()
            .map(|r| NamePattern::parse(r).expect("a rule key")),
    )
}

fn pair(policy: EgressPolicy) -> Pair {
    let cfg = StackConfig {
        dns_upstream: Some(sock(UPSTREAM, 53)),
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, policy);
    p.inject(&arp_request(GUEST_V4, GATEWAY_V4));
    p
}

/// An answer to `query` with these A records.
fn answer(query: &[u8], addrs: &[Ipv4Addr]) -> Vec<u8> {
    let mut r = query.to_vec();
    r[2] |= 0x80;
    r[3] = 0x80;
    r[6..8].copy_from_slice(&(addrs.len() as u16).to_be_bytes());
    for a in addrs {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4]);
        r.extend_from_slice(&a.octets());
    }
    r
}

/// The guest connects to an unpinned address and sends `first`; the stack
/// resolves the name (answered with APP): the requests that follow.
fn dial(p: &mut Pair, first: &[u8]) -> smoltcp::iface::SocketHandle {
    let h = p.guest_connect(sock(OTHER, 443), 64 << 10);
    p.run_until("the stack to accept", |p| {
        p.guest_state(h) == State::Established
    });
    p.guest(h).send_slice(first).unwrap();
    p.settle();
    let (lookup, _, _) = take_datagram_open(p).expect("the stack resolves the name");
    let query = p
        .take_request(|r| match r {
            HostRequest::DatagramSend { flow, payload } if *flow == lookup => Some(payload.clone()),
            _ => None,
        })
        .expect("an A query");
    p.stack
        .handle_host(p.at(), lookup, HostEvent::Datagram(&answer(&query, &[APP])));
    p.settle();
    h
}

/// The `Intercept` requests, in order.
fn intercepts(p: &Pair) -> Vec<(FlowId, String, String, u16)> {
    p.requests
        .iter()
        .filter_map(|r| match r {
            HostRequest::Intercept {
                flow,
                name,
                rule,
                port,
            } => Some((*flow, name.clone(), rule.clone(), *port)),
            _ => None,
        })
        .collect()
}

#[test]
fn rule_keys_match_exact_before_wildcard_and_the_longest_suffix_first() {
    let policy = ruled(
        &["*"],
        &[
            "*.example.test",
            "*.api.example.test",
            "api.example.test",
            "*",
        ],
    );
    let rows = [
        ("api.example.test", Some("api.example.test")),
        ("v1.api.example.test", Some("*.api.example.test")),
        ("www.example.test", Some("*.example.test")),
        ("example.test", None),
        ("other.test", None),
    ];
    for (name, want) in rows {
        let got = policy.intercept_for(name).map(|k| k.to_string());
        assert_eq!(got.as_deref(), want, "{name}");
    }
    assert_eq!(policy.intercepts().iter().count(), 3, "a bare * is no rule");
}

#[test]
fn a_rule_never_allows_a_name_the_policy_does_not() {
    let policy = ruled(&["app.example.test"], &["*.example.test", "evil.test"]);
    assert_eq!(policy.intercept_for("evil.test"), None);
    assert_eq!(policy.intercept_for("other.example.test"), None);
    assert_eq!(
        policy
            .intercept_for("app.example.test")
            .map(|k| k.to_string()),
        Some("*.example.test".into())
    );
}

#[test]
fn a_ruled_sni_on_the_name_dial_path_is_intercepted_before_its_connect() {
    let mut p = pair(ruled(&["*.example.test"], &["api.example.test"]));
    let hello = client_hello("API.example.test", 1 << 14);
    let h = dial(&mut p, &hello);
    let at = p
        .requests
        .iter()
        .position(|r| matches!(r, HostRequest::Intercept { .. }))
        .expect("an Intercept request");
    let connect = p
        .requests
        .iter()
        .position(|r| matches!(r, HostRequest::TcpConnect { .. }))
        .expect("a host connect");
    assert!(at < connect, "Intercept comes first: {:?}", p.requests);
    let got = intercepts(&p);
    let flow = got[0].0;
    assert_eq!(
        got,
        [(
            flow,
            "api.example.test".into(),
            "api.example.test".into(),
            443
        )]
    );
    // Once connected, the host (the interceptor's pair) gets the hello.
    p.requests.clear();
    p.stack.handle_host(p.at(), flow, HostEvent::Connected);
    let mut bytes = Vec::new();
    host_read(&mut p, flow, &mut bytes);
    assert_eq!(bytes, hello);
    assert_eq!(p.stack.stats().intercepted_flows, 1);
    assert_eq!(p.guest_state(h), State::Established);
}

#[test]
fn an_sni_no_rule_matches_and_a_plain_http_host_stay_spliced() {
    let mut p = pair(ruled(&["*.example.test"], &["api.example.test"]));
    dial(&mut p, &client_hello("www.example.test", 1 << 14));
    assert!(intercepts(&p).is_empty(), "{:?}", p.requests);
    assert!(has_connect(&p));
    // A rule's own name over plain HTTP: no secret goes out in clear text.
    let mut p = pair(ruled(&["*.example.test"], &["api.example.test"]));
    dial(&mut p, b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n");
    assert!(intercepts(&p).is_empty(), "{:?}", p.requests);
    assert!(has_connect(&p));
    assert_eq!(p.stack.stats().intercepted_flows, 0);
}

/// Pin APP for app.example.test through the stack's resolver.
fn pin_app(p: &mut Pair) {
    let query = dns_query(0x4242, "app.example.test");
    p.inject(&udp_frame(sock(GUEST_V4, 40_000), sock(DNS_V4, 53), &query));
    let (flow, kind, _) = take_datagram_open(p).expect("the query is forwarded");
    assert_eq!(kind, DatagramKind::Udp);
    p.requests.clear();
    p.stack
        .handle_host(p.at(), flow, HostEvent::Datagram(&answer(&query, &[APP])));
    p.flush();
    assert_eq!(p.stack.pinned_addresses(), 1);
}

#[test]
fn a_pinned_flow_is_intercepted_and_no_byte_is_taken_before_the_host_was_told() {
    let mut p = pair(ruled(&["app.example.test"], &["app.example.test"]));
    pin_app(&mut p);
    let (h, flow) = p.open_tcp(sock(APP, 443), 64 << 10);
    p.requests.clear();
    let hello = client_hello("app.example.test", 1 << 14);
    p.guest(h).send_slice(&hello).unwrap();
    // Drive the link by hand so that no request is taken yet.
    p.iface.poll(p.now, &mut p.link, &mut p.sockets);
    while let Some(frame) = p.link.from_guest.pop_front() {
        p.stack
            .handle_frame(p.at(), &frame, netstack::wire::RxMeta::default());
    }
    assert_eq!(p.stack.tcp_recv_pending(flow), 0, "not before Intercept");
    assert!(p.stack.tcp_recv_with(flow, |b| (b.len(), ())).is_none());
    let mut told = None;
    while let Some(r) = p.stack.poll_request() {
        if let HostRequest::Intercept { flow: f, rule, .. } = r {
            told = Some((f, rule));
        }
    }
    assert_eq!(told, Some((flow, "app.example.test".to_string())));
    assert_eq!(p.stack.tcp_recv_pending(flow), hello.len());
    let mut bytes = Vec::new();
    host_read(&mut p, flow, &mut bytes);
    assert_eq!(bytes, hello);
}

#[test]
fn a_pinned_flow_to_a_name_without_a_rule_is_released_unintercepted() {
    let mut p = pair(ruled(&["app.example.test"], &["api.example.test"]));
    pin_app(&mut p);
    let (h, flow) = p.open_tcp(sock(APP, 443), 64 << 10);
    p.requests.clear();
    p.guest(h)
        .send_slice(&client_hello("app.example.test", 1 << 14))
        .unwrap();
    p.settle();
    assert!(intercepts(&p).is_empty());
    let mut bytes = Vec::new();
    host_read(&mut p, flow, &mut bytes);
    assert!(!bytes.is_empty());
}

#[test]
fn rules_are_replaced_with_the_policy_for_new_flows_only() {
    let mut p = pair(ruled(&["*.example.test"], &["api.example.test"]));
    dial(&mut p, &client_hello("api.example.test", 1 << 14));
    assert_eq!(intercepts(&p).len(), 1);
    let at = p.at();
    p.stack.set_policy(at, ruled(&["*.example.test"], &[]));
    p.requests.clear();
    dial(&mut p, &client_hello("api.example.test", 1 << 14));
    assert!(intercepts(&p).is_empty(), "{:?}", p.requests);
}
