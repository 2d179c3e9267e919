//! Helpers the core's test files share: the peers they talk to and how the
//! test, as the host driver, moves bytes and reads requests.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use netstack::{DatagramKind, EgressPolicy, FlowId, HostRequest};
use smoltcp::wire::{EthernetFrame, IpProtocol, Ipv4Packet, TcpPacket, TcpSeqNumber};

use super::{policy, rsts, sock, Pair};

pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const BUF: usize = 64 << 10;

pub fn peer() -> SocketAddr {
    sock(PEER_V4, 80)
}

pub fn deny(list: &[&str]) -> EgressPolicy {
    policy(&[], list)
}

/// Take every contiguous run the host side can read from `flow` into `into`.
pub fn host_read(p: &mut Pair, flow: FlowId, into: &mut Vec<u8>) {
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
pub fn host_write(p: &mut Pair, flow: FlowId, data: &[u8]) -> usize {
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

pub fn guest_read(p: &mut Pair, h: smoltcp::iface::SocketHandle, into: &mut Vec<u8>) {
    while p.guest(h).can_recv() {
        p.guest(h)
            .recv(|b| {
                into.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
    }
}

pub fn tcp_closes(p: &Pair) -> Vec<(FlowId, bool)> {
    p.requests
        .iter()
        .filter_map(|r| match r {
            HostRequest::TcpClose { flow, reset } => Some((*flow, *reset)),
            _ => None,
        })
        .collect()
}

pub fn has_connect(p: &Pair) -> bool {
    p.requests
        .iter()
        .any(|r| matches!(r, HostRequest::TcpConnect { .. }))
}

/// Whether a guest frame is an IPv4 TCP SYN.
pub fn is_syn_v4(frame: &[u8]) -> bool {
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
pub fn assert_rst_for_syn(out: &[Vec<u8>], src: SocketAddr, dst: SocketAddr, seq: i32) {
    let rst = rsts(out);
    assert_eq!(rst.len(), 1, "one RST for the SYN, got {rst:?}");
    assert_eq!((rst[0].src, rst[0].dst), (dst, src));
    assert_eq!(rst[0].ack, Some(TcpSeqNumber(seq) + 1));
}

pub fn take_datagram_open(p: &mut Pair) -> Option<(FlowId, DatagramKind, SocketAddr)> {
    p.take_request(|r| match r {
        HostRequest::DatagramOpen { flow, kind, dst } => Some((*flow, *kind, *dst)),
        _ => None,
    })
}
