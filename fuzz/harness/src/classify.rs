//! `wire::classify` on raw bytes, then the frames the stack builds about a
//! guest packet (ICMP errors, RSTs) with those same bytes as the offender.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netstack::wire::{self, FrameBuilder, GuestPacket, Unreachable};

use super::check;
use super::frames::{GATEWAY_MAC, GATEWAY_V4, GATEWAY_V6, GUEST_MAC};

/// RFC 1812 / RFC 4443 size of an ICMP error, which `FrameBuilder` promises.
const ICMP_ERROR_MAX: usize = 576;

pub fn run(data: &[u8]) {
    let parsed = wire::classify(data, wire::RxMeta::default());
    let within = |s: &[u8]| {
        s.is_empty() || {
            let (a, b) = (data.as_ptr() as usize, s.as_ptr() as usize);
            b >= a && b + s.len() <= a + data.len()
        }
    };
    assert!(
        within(parsed.ip),
        "classify's IP packet is not inside the frame"
    );
    let (mut src, mut dst) = (
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 15)), 40000),
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 80),
    );
    match &parsed.packet {
        GuestPacket::Udp { payload, .. } => {
            assert!(within(payload), "UDP payload outside the frame");
        }
        GuestPacket::IcmpEcho { data: d, .. } => assert!(within(d), "echo data outside the frame"),
        GuestPacket::TcpSyn { src: s, dst: d } | GuestPacket::Tcp { src: s, dst: d, .. } => {
            assert_eq!(s.is_ipv4(), d.is_ipv4(), "TCP endpoints of two families");
            (src, dst) = (*s, *d);
        }
        _ => {}
    }
    let b = FrameBuilder {
        gateway_mac: GATEWAY_MAC,
        guest_mac: GUEST_MAC,
    };
    let offenders = [parsed.ip, data, data.get(wire::ETH_HEADER..).unwrap_or(&[])];
    let froms = [IpAddr::V4(GATEWAY_V4), IpAddr::V6(GATEWAY_V6)];
    for offending in offenders {
        for from in froms {
            for why in [
                Unreachable::Port,
                Unreachable::Host,
                Unreachable::Prohibited,
            ] {
                if let Some(f) = b.unreachable(from, offending, why) {
                    let ip_len = f.len() - wire::ETH_HEADER;
                    assert!(ip_len <= ICMP_ERROR_MAX, "{ip_len}-byte ICMP error");
                    check::frame_to_guest(&f, ICMP_ERROR_MAX, false);
                }
            }
        }
        if let Some(f) = b.rst_for_syn(offending, src, dst) {
            let seg = check::frame_to_guest(&f, 65535, false).expect("an RST is a TCP segment");
            assert!(
                seg.rst && seg.peer == dst && seg.guest == src,
                "RST for the wrong flow"
            );
        }
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 1);
        let _ = b.rst_for_syn(offending, v6, dst);
    }
}
