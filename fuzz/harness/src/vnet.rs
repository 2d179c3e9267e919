//! The virtio-net header a tap with offloads puts in front of each frame:
//! whatever the frame, `tx_header` never panics and points only inside it;
//! for a well-formed TCP segment, completing the checksum the way the guest's
//! kernel does (NEEDS_CSUM) gives back the segment's true checksum; and
//! `rx_meta` takes any header bytes.

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, Ipv6Address, Ipv6Packet, Ipv6Repr,
    TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};
use vmm_glue::vnet::{fold, ones_sum, rx_meta, tx_header, Gso, HeaderRepr, HDR_LEN};

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mtu = 576 + usize::from(mode) * 256;
    let _ = rx_meta(&rest[..rest.len().min(HDR_LEN)]);
    check_in_bounds(rest, mtu);
    let frame = segment(mode & 1 == 1, rest);
    check_in_bounds(&frame, mtu);
    let tx = tx_header(&frame, mtu);
    let (at, partial) = tx.patch.expect("a well-formed TCP segment is offloaded");
    let csum = tx.repr.partial_csum.expect("NEEDS_CSUM with a patch");
    let (start, offset) = (usize::from(csum.start), usize::from(csum.offset));
    assert_eq!(start + offset, at);
    let mut sent = frame.clone();
    sent[at..at + 2].copy_from_slice(&partial);
    let sum = !fold(ones_sum(&sent[start..]));
    sent[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    assert_eq!(
        sent, frame,
        "the kernel would complete a different checksum"
    );
    let ip_len = frame.len() - 14;
    assert_eq!(
        tx.repr.gso != Gso::None,
        ip_len > mtu,
        "TSO marked on the wrong side of the MTU"
    );
}

fn check_in_bounds(frame: &[u8], mtu: usize) {
    let tx = tx_header(frame, mtu);
    if let Some((at, _)) = tx.patch {
        assert!(at + 2 <= frame.len(), "patch past the frame's end");
        let hdr_len = usize::from(tx.repr.hdr_len);
        assert!(hdr_len <= frame.len(), "header length past the frame's end");
        assert_eq!(
            tx.repr.gso != Gso::None,
            tx.repr.gso_size != 0,
            "GSO type and size disagree"
        );
    } else {
        assert_eq!(
            tx.repr,
            HeaderRepr::PLAIN,
            "a header without a patch must be empty"
        );
    }
}

/// An Ethernet frame around a TCP segment whose options and payload come
/// from `bytes`, its checksum complete.
pub(crate) fn segment(v6: bool, bytes: &[u8]) -> Vec<u8> {
    let (opts, payload) = bytes.split_at(bytes.len().min(1));
    let repr = TcpRepr {
        src_port: 443,
        dst_port: 40000,
        control: if opts.first().is_some_and(|o| o & 1 == 1) {
            TcpControl::Fin
        } else {
            TcpControl::Psh
        },
        seq_number: TcpSeqNumber(7),
        ack_number: Some(TcpSeqNumber(9)),
        window_len: 1000,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &payload[..payload.len().min(65000)],
    };
    let caps = ChecksumCapabilities::default();
    let ip_header = if v6 { 40 } else { 20 };
    let mut frame = vec![0u8; 14 + ip_header + repr.buffer_len()];
    frame[12..14].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let (src, dst): (IpAddress, IpAddress) = if v6 {
        let (s, d) = (
            Ipv6Address::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
            Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15),
        );
        Ipv6Repr {
            src_addr: s,
            dst_addr: d,
            next_header: IpProtocol::Tcp,
            payload_len: repr.buffer_len(),
            hop_limit: 64,
        }
        .emit(&mut Ipv6Packet::new_unchecked(&mut frame[14..]));
        (s.into(), d.into())
    } else {
        let (s, d) = (
            Ipv4Address::new(192, 0, 2, 1),
            Ipv4Address::new(10, 0, 2, 15),
        );
        Ipv4Repr {
            src_addr: s,
            dst_addr: d,
            next_header: IpProtocol::Tcp,
            payload_len: repr.buffer_len(),
            hop_limit: 64,
        }
        .emit(&mut Ipv4Packet::new_unchecked(&mut frame[14..]), &caps);
        (s.into(), d.into())
    };
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut frame[14 + ip_header..]),
        &src,
        &dst,
        &caps,
    );
    frame
}
