//! The virtio-net header (`struct virtio_net_hdr`, virtio 1.x §5.1.6) that
//! rides in front of each frame on a tap opened with IFF_VNET_HDR: what it
//! says about a frame from the guest's kernel, and the one to put in front of
//! a frame for it so that the kernel fills in TCP checksums and cuts 64 KiB
//! segments to the MTU (TSO).
//!
//! Fields are little-endian; the tap is told so (TUNSETVNETLE).

use netstack::wire::RxMeta;

/// Bytes of `struct virtio_net_hdr` without `num_buffers`.
pub const HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const F_DATA_VALID: u8 = 2;

const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

const ETH_HEADER: usize = 14;
const TCP_CHECKSUM_AT: usize = 16;

/// What the header in front of a frame from the guest's kernel says, or why
/// the frame cannot be taken.
pub fn rx_meta(hdr: &[u8]) -> Result<RxMeta, &'static str> {
    let Some(&[flags, gso_type]) = hdr.get(..2) else {
        return Ok(RxMeta::default());
    };
    match gso_type & !GSO_ECN {
        // A TCP super-frame is one segment to the stack.
        GSO_NONE | GSO_TCPV4 | GSO_TCPV6 => {}
        // UDP segmentation was never offered (TUNSETOFFLOAD): such a frame
        // would be taken for one huge datagram.
        _ => return Err("virtio-net header with a segmentation type other than TCP"),
    }
    Ok(RxMeta {
        checksum_trusted: flags & (F_NEEDS_CSUM | F_DATA_VALID) != 0,
    })
}

/// The header for a frame to the guest, and the two bytes to write over the
/// frame's TCP checksum field at `patch_at` (the pseudo-header sum that
/// NEEDS_CSUM asks for), when the frame is a TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxHeader {
    pub hdr: [u8; HDR_LEN],
    pub patch: Option<(usize, [u8; 2])>,
}

impl TxHeader {
    const PLAIN: TxHeader = TxHeader {
        hdr: [0; HDR_LEN],
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
    let ip = frame.get(ETH_HEADER..)?;
    let (l3, ip_len, gso_type, mut sum) = match be16(frame, 12)? {
        0x0800 => {
            let ihl = usize::from(*ip.first()? & 0x0f) * 4;
            if ip[0] >> 4 != 4 || ihl < 20 || *ip.get(9)? != 6 {
                return None;
            }
            // More fragments, or an offset: not a whole segment.
            if be16(ip, 6)? & 0x3fff != 0 {
                return None;
            }
            let total = usize::from(be16(ip, 2)?);
            (ihl, total, GSO_TCPV4, ones_sum(ip.get(12..20)?))
        }
        0x86dd => {
            if *ip.first()? >> 4 != 6 || *ip.get(6)? != 6 {
                return None;
            }
            let total = 40 + usize::from(be16(ip, 4)?);
            (40, total, GSO_TCPV6, ones_sum(ip.get(8..40)?))
        }
        _ => return None,
    };
    if ip_len > ip.len() || ip_len < l3 + 20 {
        return None;
    }
    let tcp_len = ip_len - l3;
    let l4 = ETH_HEADER + l3;
    let doff = usize::from(*frame.get(l4 + 12)? >> 4) * 4;
    if doff < 20 || doff > tcp_len {
        return None;
    }
    sum += 6 + tcp_len as u64;
    let partial = fold(sum);

    let mut hdr = [0u8; HDR_LEN];
    hdr[0] = F_NEEDS_CSUM;
    let (gso_type, gso_size) = match mtu.checked_sub(l3 + doff) {
        Some(size) if ip_len > mtu && size > 0 => (gso_type, size),
        _ => (GSO_NONE, 0),
    };
    hdr[1] = gso_type;
    hdr[2..4].copy_from_slice(&((l4 + doff) as u16).to_le_bytes());
    hdr[4..6].copy_from_slice(&(gso_size.min(usize::from(u16::MAX)) as u16).to_le_bytes());
    hdr[6..8].copy_from_slice(&(l4 as u16).to_le_bytes());
    hdr[8..10].copy_from_slice(&(TCP_CHECKSUM_AT as u16).to_le_bytes());
    Some(TxHeader {
        hdr,
        patch: Some((l4 + TCP_CHECKSUM_AT, partial.to_be_bytes())),
    })
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
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
    fn complete_like_the_kernel(frame: &mut [u8], hdr: &[u8; HDR_LEN]) {
        let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
        let offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
        let sum = !fold(ones_sum(&frame[start..]));
        frame[start + offset..start + offset + 2].copy_from_slice(&sum.to_be_bytes());
    }

    fn header_field(hdr: &[u8; HDR_LEN], at: usize) -> u16 {
        u16::from_le_bytes([hdr[at], hdr[at + 1]])
    }

    #[test]
    fn a_tcp_segment_gets_the_pseudo_header_sum_the_kernel_completes() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..999u32).map(|i| (i * 7) as u8).collect();
            let original = tcp_frame(v6, &payload);
            let tx = tx_header(&original, 1500);
            assert_eq!(tx.hdr[0], F_NEEDS_CSUM);
            assert_eq!(tx.hdr[1], GSO_NONE, "fits the MTU: no TSO");
            let l4 = ETH_HEADER + if v6 { 40 } else { 20 };
            assert_eq!(header_field(&tx.hdr, 6), l4 as u16);
            assert_eq!(header_field(&tx.hdr, 8), 16);
            assert_eq!(header_field(&tx.hdr, 2), (l4 + 20) as u16);
            let (at, bytes) = tx.patch.expect("a TCP segment is patched");
            assert_eq!(at, l4 + 16);
            let mut sent = original.clone();
            sent[at..at + 2].copy_from_slice(&bytes);
            complete_like_the_kernel(&mut sent, &tx.hdr);
            assert_eq!(sent, original, "v6={v6}: the completed checksum differs");
        }
    }

    #[test]
    fn a_segment_over_the_mtu_is_marked_for_tso() {
        for (v6, gso) in [(false, GSO_TCPV4), (true, GSO_TCPV6)] {
            let payload = vec![0xab; 60000];
            let frame = tcp_frame(v6, &payload);
            let tx = tx_header(&frame, 1500);
            assert_eq!(tx.hdr[1], gso);
            let ip_header = if v6 { 40 } else { 20 };
            assert_eq!(header_field(&tx.hdr, 4), (1500 - ip_header - 20) as u16);
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
