//! The virtio-net header (`struct virtio_net_hdr`, virtio 1.x §5.1.6) that
//! rides in front of each frame on a tap opened with IFF_VNET_HDR: what it
//! says about a frame from the guest's kernel, and the one to put in front of
//! a frame for it so that the kernel fills in TCP checksums and cuts 64 KiB
//! segments to the MTU (TSO).
//!
//! Fields are little-endian; the tap is told so (TUNSETVNETLE). The header's
//! bytes are read and written only through [`header`], by tap and
//! vhost-user alike.

use netstack::wire::{RxMeta, ETH_HEADER};
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
};

pub mod header;

pub use header::{
    Gso, Packet as HeaderPacket, PartialCsum, Repr as HeaderRepr, HDR_LEN, HDR_LEN_MRG,
};

/// Where the checksum sits in a TCP header (RFC 9293 §3.1); smoltcp keeps
/// its field offsets private, and the virtio-net header needs the number.
const TCP_CHECKSUM_AT: u16 = 16;

/// What the header in front of a frame from the guest's kernel says, or why
/// the frame cannot be taken. An empty `hdr` is a tap without IFF_VNET_HDR:
/// nothing is vouched for.
pub fn rx_meta(hdr: &[u8]) -> Result<RxMeta, header::Error> {
    if hdr.is_empty() {
        return Ok(RxMeta::default());
    }
    // A TCP super-frame (GSO) is one segment to the stack; `parse` refuses
    // the UDP kinds, which were never offered.
    let repr = HeaderRepr::parse(&HeaderPacket::new_checked(hdr)?)?;
    Ok(RxMeta {
        checksum_trusted: repr.partial_csum.is_some() || repr.data_valid,
    })
}

/// The header for a frame to the guest, and the two bytes to write over the
/// frame's TCP checksum field at `patch_at` (the pseudo-header sum that
/// NEEDS_CSUM asks for), when the frame is a TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxHeader {
    pub repr: HeaderRepr,
    pub patch: Option<(usize, [u8; 2])>,
}

impl TxHeader {
    pub const PLAIN: TxHeader = TxHeader {
        repr: HeaderRepr::PLAIN,
        patch: None,
    };
}

/// The header for `frame`: a TCP segment over IPv4 (no options needed, no
/// fragment) or IPv6 (TCP right after the fixed header) is marked
/// NEEDS_CSUM, and also for TSO when its IP packet is longer than `mtu`;
/// anything else goes as it is, its checksums already complete.
pub fn tx_header(frame: &[u8], mtu: usize) -> TxHeader {
    tcp_header(frame, mtu).unwrap_or(TxHeader::PLAIN)
}

fn tcp_header(frame: &[u8], mtu: usize) -> Option<TxHeader> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    // Each arm: the IP header's length, the IP packet's, the GSO kind, the
    // addresses' sum for the pseudo-header, and the TCP segment. The
    // `new_checked`s hold the lengths to the frame.
    let (l3, ip_len, gso, mut sum, segment) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            // More fragments, or an offset: not a whole segment.
            if ip.version() != 4
                || ip.next_header() != IpProtocol::Tcp
                || ip.more_frags()
                || ip.frag_offset() != 0
            {
                return None;
            }
            let sum = ones_sum(&ip.src_addr().octets()) + ones_sum(&ip.dst_addr().octets());
            let l3 = usize::from(ip.header_len());
            (
                l3,
                usize::from(ip.total_len()),
                Gso::TcpV4,
                sum,
                ip.payload(),
            )
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
            if ip.version() != 6 || ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            let sum = ones_sum(&ip.src_addr().octets()) + ones_sum(&ip.dst_addr().octets());
            let l3 = ip.header_len();
            let total = l3 + usize::from(ip.payload_len());
            (l3, total, Gso::TcpV6, sum, ip.payload())
        }
        _ => return None,
    };
    // At least a TCP header, its data offset inside the segment.
    let tcp = TcpPacket::new_checked(segment).ok()?;
    let doff = usize::from(tcp.header_len());
    let tcp_len = segment.len();
    sum += u64::from(u8::from(IpProtocol::Tcp)) + tcp_len as u64;
    let partial = fold(sum);

    let l4 = ETH_HEADER + l3;
    let (gso, gso_size) = match mtu.checked_sub(l3 + doff) {
        Some(size) if ip_len > mtu && size > 0 => (gso, size),
        _ => (Gso::None, 0),
    };
    // l4 + doff is at most 14 + 60 + 60: the casts cannot truncate.
    let repr = HeaderRepr {
        partial_csum: Some(PartialCsum {
            start: l4 as u16,
            offset: TCP_CHECKSUM_AT,
        }),
        data_valid: false,
        gso,
        ecn: false,
        hdr_len: (l4 + doff) as u16,
        gso_size: gso_size.min(usize::from(u16::MAX)) as u16,
        num_buffers: None,
    };
    Some(TxHeader {
        repr,
        patch: Some((l4 + usize::from(TCP_CHECKSUM_AT), partial.to_be_bytes())),
    })
}

/// The one's-complement sum of big-endian 16-bit words (an odd last byte
/// padded with zero), not yet folded.
pub fn ones_sum(data: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        sum += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        sum += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// A one's-complement sum folded to 16 bits (not complemented).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::header::{F_DATA_VALID, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6};
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
        Ipv4Address, Ipv4Packet, Ipv4Repr, Ipv6Address, Ipv6Packet, Ipv6Repr, TcpPacket, TcpRepr,
        TcpSeqNumber, UdpPacket, UdpRepr,
    };

    const MAC_A: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
    const MAC_B: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

    fn tcp_repr(payload: &[u8]) -> TcpRepr<'_> {
        TcpRepr {
            src_port: 80,
            dst_port: 40000,
            control: smoltcp::wire::TcpControl::Psh,
            seq_number: TcpSeqNumber(1000),
            ack_number: Some(TcpSeqNumber(2000)),
            window_len: 512,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        }
    }

    /// An Ethernet frame around a TCP segment with a full, correct checksum.
    fn tcp_frame(v6: bool, payload: &[u8]) -> Vec<u8> {
        let tcp = tcp_repr(payload);
        let (src, dst): (IpAddress, IpAddress) = if v6 {
            (
                Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).into(),
                Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15).into(),
            )
        } else {
            (
                Ipv4Address::new(192, 0, 2, 7).into(),
                Ipv4Address::new(10, 0, 2, 15).into(),
            )
        };
        let ip_header = if v6 { 40 } else { 20 };
        let mut frame = vec![0; ETH_HEADER + ip_header + tcp.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        EthernetRepr {
            src_addr: MAC_A,
            dst_addr: MAC_B,
            ethertype: if v6 {
                EthernetProtocol::Ipv6
            } else {
                EthernetProtocol::Ipv4
            },
        }
        .emit(&mut eth);
        let caps = ChecksumCapabilities::default();
        let ip = &mut frame[ETH_HEADER..];
        match (src, dst) {
            (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) => {
                let repr = Ipv4Repr {
                    src_addr: s,
                    dst_addr: d,
                    next_header: IpProtocol::Tcp,
                    payload_len: tcp.buffer_len(),
                    hop_limit: 64,
                };
                let mut pkt = Ipv4Packet::new_unchecked(&mut *ip);
                repr.emit(&mut pkt, &caps);
            }
            (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
                let repr = Ipv6Repr {
                    src_addr: s,
                    dst_addr: d,
                    next_header: IpProtocol::Tcp,
                    payload_len: tcp.buffer_len(),
                    hop_limit: 64,
                };
                let mut pkt = Ipv6Packet::new_unchecked(&mut *ip);
                repr.emit(&mut pkt);
            }
            _ => unreachable!(),
        }
        let mut seg = TcpPacket::new_unchecked(&mut ip[ip_header..]);
        tcp.emit(&mut seg, &src, &dst, &caps);
        frame
    }

    /// What the kernel does with a NEEDS_CSUM frame: sum from `csum_start`
    /// to the end, the field (holding the pseudo-header sum) included, and
    /// store the complement at `csum_start + csum_offset`.
    fn complete_like_the_kernel(frame: &mut [u8], hdr: &[u8]) {
        let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
        let offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
        let sum = !fold(ones_sum(&frame[start..]));
        frame[start + offset..start + offset + 2].copy_from_slice(&sum.to_be_bytes());
    }

    fn header_field(hdr: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([hdr[at], hdr[at + 1]])
    }

    #[test]
    fn a_tcp_segment_gets_the_pseudo_header_sum_the_kernel_completes() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..999u32).map(|i| (i * 7) as u8).collect();
            let original = tcp_frame(v6, &payload);
            let tx = tx_header(&original, 1500);
            // The bytes on the wire, read here by offset to pin the layout.
            let hdr = tx.repr.to_bytes();
            assert_eq!(hdr[0], F_NEEDS_CSUM);
            assert_eq!(hdr[1], GSO_NONE, "fits the MTU: no TSO");
            let l4 = ETH_HEADER + if v6 { 40 } else { 20 };
            assert_eq!(header_field(&hdr, 6), l4 as u16);
            assert_eq!(header_field(&hdr, 8), 16);
            assert_eq!(header_field(&hdr, 2), (l4 + 20) as u16);
            let (at, bytes) = tx.patch.expect("a TCP segment is patched");
            assert_eq!(at, l4 + 16);
            let mut sent = original.clone();
            sent[at..at + 2].copy_from_slice(&bytes);
            complete_like_the_kernel(&mut sent, &hdr);
            assert_eq!(sent, original, "v6={v6}: the completed checksum differs");
        }
    }

    #[test]
    fn a_segment_over_the_mtu_is_marked_for_tso() {
        for (v6, gso) in [(false, GSO_TCPV4), (true, GSO_TCPV6)] {
            let payload = vec![0xab; 60000];
            let frame = tcp_frame(v6, &payload);
            let tx = tx_header(&frame, 1500);
            let hdr = tx.repr.to_bytes();
            assert_eq!(hdr[1], gso);
            let ip_header = if v6 { 40 } else { 20 };
            assert_eq!(header_field(&hdr, 4), (1500 - ip_header - 20) as u16);
            assert!(tx.patch.is_some());
        }
    }

    #[test]
    fn anything_but_tcp_goes_plain() {
        // A UDP datagram with its checksum already complete.
        let udp = UdpRepr {
            src_port: 53,
            dst_port: 5353,
        };
        let src = Ipv4Address::new(10, 0, 2, 3);
        let dst = Ipv4Address::new(10, 0, 2, 15);
        let mut frame = vec![0; ETH_HEADER + 20 + 8 + 4];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip_repr = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Udp,
            payload_len: 12,
            hop_limit: 64,
        };
        let caps = ChecksumCapabilities::default();
        ip_repr.emit(
            &mut Ipv4Packet::new_unchecked(&mut frame[ETH_HEADER..]),
            &caps,
        );
        udp.emit(
            &mut UdpPacket::new_unchecked(&mut frame[ETH_HEADER + 20..]),
            &src.into(),
            &dst.into(),
            4,
            |p| p.copy_from_slice(b"ping"),
            &caps,
        );
        assert_eq!(tx_header(&frame, 1500), TxHeader::PLAIN);
        // An ARP frame, a runt, garbage.
        assert_eq!(tx_header(&[0u8; 42], 1500), TxHeader::PLAIN);
        assert_eq!(tx_header(&[0x45; 13], 1500), TxHeader::PLAIN);
    }

    #[test]
    fn lengths_that_lie_are_not_offloaded() {
        let frame = tcp_frame(false, b"hello");
        // An IPv4 total length past the frame's end.
        let mut long = frame.clone();
        long[ETH_HEADER + 2..ETH_HEADER + 4].copy_from_slice(&9000u16.to_be_bytes());
        assert_eq!(tx_header(&long, 1500), TxHeader::PLAIN);
        // A TCP data offset past the segment.
        let mut doff = frame.clone();
        doff[ETH_HEADER + 20 + 12] = 0xf0;
        assert_eq!(tx_header(&doff, 1500), TxHeader::PLAIN);
        // A fragment.
        let mut frag = frame.clone();
        frag[ETH_HEADER + 6] = 0x20;
        assert_eq!(tx_header(&frag, 1500), TxHeader::PLAIN);
        // Every truncation of a good frame: never a panic.
        for len in 0..frame.len() {
            let _ = tx_header(&frame[..len], 1500);
        }
    }

    #[test]
    fn rx_headers_say_whether_the_checksum_is_vouched_for() {
        assert_eq!(rx_meta(&[0; 10]), Ok(RxMeta::default()));
        let trusted = RxMeta {
            checksum_trusted: true,
        };
        assert_eq!(
            rx_meta(&[F_NEEDS_CSUM, GSO_TCPV4, 0, 0, 0, 0, 0, 0, 0, 0]),
            Ok(trusted)
        );
        assert_eq!(
            rx_meta(&[F_DATA_VALID, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Ok(trusted)
        );
        assert_eq!(
            rx_meta(&[F_NEEDS_CSUM, GSO_TCPV6 | GSO_ECN, 0, 0, 0, 0, 0, 0, 0, 0]),
            Ok(trusted)
        );
        // UDP fragmentation offload (3) and UDP_L4 (5) were never offered.
        assert!(rx_meta(&[F_NEEDS_CSUM, 3, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(rx_meta(&[F_NEEDS_CSUM, 5, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        // No header at all (a plain tap): nothing vouched for.
        assert_eq!(rx_meta(&[]), Ok(RxMeta::default()));
    }
}
