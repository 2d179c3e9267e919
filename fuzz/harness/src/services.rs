//! The gateway's DHCP server and DNS forwarder, fed through the core as a
//! guest would reach them (services.rs keeps its parsers private).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use arbitrary::{Arbitrary, Unstructured};
use netstack::policy::EgressPolicy;
use netstack::wire::RxMeta;
use netstack::HostEvent;
use netstack::{HostRequest, Stack, StackConfig};
use smoltcp::wire::{
    DhcpMessageType, DhcpPacket, DhcpRepr, DnsFlags, DnsOpcode, DnsPacket, EthernetFrame,
    IpProtocol, Ipv4Packet, UdpPacket,
};

use super::check;
use super::frames::{self, DhcpFields, DnsQuery, DNS_V4, DNS_V6, GUEST_V4, GUEST_V6};
use super::input::Bytes;

fn drain(stack: &mut Stack, mtu: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(f) = stack.poll_transmit() {
        check::frame_to_guest(&f, mtu, false);
        out.push(f);
    }
    out
}

#[derive(Arbitrary, Debug)]
pub enum DhcpBody {
    Raw(Bytes),
    Fields(DhcpFields),
}

pub fn dhcp(data: &[u8]) {
    let Ok(body) = DhcpBody::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let payload = match &body {
        DhcpBody::Raw(b) => b.0.clone(),
        DhcpBody::Fields(f) => f.payload(),
    };
    let cfg = StackConfig::default();
    let mut stack = Stack::new(
        cfg.clone(),
        EgressPolicy::allow_all(),
        std::time::Instant::now(),
    );
    let src = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 68);
    let dst = SocketAddr::new(Ipv4Addr::BROADCAST.into(), 67);
    let udp = frames::udp_datagram(src, dst, &payload);
    let frame = frames::ip_frame(src.ip(), dst.ip(), IpProtocol::Udp, &udp);
    let now = std::time::Instant::now();
    stack.handle_frame(now, &frame, RxMeta::default());
    stack.handle_timeout(now);
    assert!(
        stack.poll_request().is_none(),
        "a DHCP message asked the host for something"
    );
    let replies = drain(&mut stack, cfg.mtu);
    assert!(
        replies.len() <= 1,
        "{} replies to one DHCP message",
        replies.len()
    );
    let Some(reply) = replies.first() else {
        return;
    };
    let eth = EthernetFrame::new_checked(&reply[..]).expect("checked above");
    let ip = Ipv4Packet::new_checked(eth.payload()).expect("DHCP reply over IPv4");
    assert_eq!(ip.next_header(), IpProtocol::Udp);
    let udp = UdpPacket::new_checked(ip.payload()).expect("checked above");
    assert_eq!(
        (udp.src_port(), udp.dst_port()),
        (67, 68),
        "DHCP reply ports"
    );
    let reply_packet = DhcpPacket::new_checked(udp.payload()).expect("DHCP reply parses");
    let reply = DhcpRepr::parse(&reply_packet).expect("DHCP reply parses");
    let request_packet = DhcpPacket::new_checked(&payload[..]).expect("it was answered");
    let request = DhcpRepr::parse(&request_packet).expect("it was answered");
    assert_eq!(reply.transaction_id, request.transaction_id, "reply xid");
    match reply.message_type {
        DhcpMessageType::Offer | DhcpMessageType::Ack => {
            assert_eq!(reply.your_ip, cfg.plan.guest_v4, "lease of another address")
        }
        DhcpMessageType::Nak => assert_eq!(reply.your_ip, Ipv4Addr::UNSPECIFIED),
        other => panic!("DHCP server answered with {other:?}"),
    }
    assert!(
        matches!(
            request.message_type,
            DhcpMessageType::Discover | DhcpMessageType::Request
        ),
        "answered a {:?}",
        request.message_type
    );
}

#[derive(Arbitrary, Debug)]
pub enum QueryBody {
    Raw(Bytes),
    Fields(DnsQuery),
}

#[derive(Arbitrary, Debug)]
pub struct DnsInput {
    pub v6: bool,
    pub query: QueryBody,
    pub reply: Option<Bytes>,
}

pub fn dns(data: &[u8]) {
    let Ok(input) = DnsInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let payload = match &input.query {
        QueryBody::Raw(b) => b.0.clone(),
        QueryBody::Fields(q) => q.payload(),
    };
    let upstream = SocketAddr::new(Ipv4Addr::new(198, 51, 100, 53).into(), 53);
    let cfg = StackConfig {
        dns_upstream: Some(upstream),
        ..StackConfig::default()
    };
    let now = std::time::Instant::now();
    let mut stack = Stack::new(cfg.clone(), EgressPolicy::allow_all(), now);
    let (guest, server): (IpAddr, IpAddr) = if input.v6 {
        (GUEST_V6.into(), DNS_V6.into())
    } else {
        (GUEST_V4.into(), DNS_V4.into())
    };
    let src = SocketAddr::new(guest, 5353);
    let dst = SocketAddr::new(server, 53);
    let udp = frames::udp_datagram(src, dst, &payload);
    let frame = frames::ip_frame(guest, server, IpProtocol::Udp, &udp);
    stack.handle_frame(now, &frame, RxMeta::default());
    stack.handle_timeout(now);
    let mut flow = None;
    while let Some(req) = stack.poll_request() {
        match req {
            HostRequest::DatagramOpen { flow: f, dst, .. } => {
                assert_eq!(dst, upstream, "DNS forwarded somewhere else");
                flow = Some(f);
            }
            HostRequest::DatagramSend {
                flow: f,
                payload: sent,
            } => {
                assert_eq!(Some(f), flow);
                assert_eq!(sent, payload, "the query was changed on the way");
                let p = DnsPacket::new_checked(&sent[..]).expect("garbage was forwarded");
                assert!(
                    !p.flags().contains(DnsFlags::RESPONSE),
                    "a response was forwarded"
                );
                assert_eq!(p.opcode(), DnsOpcode::Query, "a non-query was forwarded");
                assert!(
                    p.question_count() > 0,
                    "a query without questions was forwarded"
                );
            }
            other => panic!("unexpected request for a DNS query: {other:?}"),
        }
    }
    drain(&mut stack, cfg.mtu);
    let (Some(flow), Some(reply)) = (flow, &input.reply) else {
        return;
    };
    stack.handle_host(now, flow, HostEvent::Datagram(reply));
    let frames = drain(&mut stack, cfg.mtu);
    assert_eq!(
        frames.len(),
        1,
        "one reply from upstream, {} frames",
        frames.len()
    );
}
