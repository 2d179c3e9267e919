//! `struct virtio_net_hdr` (virtio 1.x §5.1.6) on the wire: a zero-copy
//! view, [`Packet`], and its validated meaning, [`Repr`]. The header is
//! guest-controlled (a tap's guest kernel, a vhost-user driver), so this is
//! the one place its bytes are read or written; everything else sees a
//! `Repr`. Fields are little-endian (VERSION_1, and the tap is told so).
//!
//! Which calls may panic: `Packet::new_unchecked` followed by an accessor on
//! a buffer shorter than [`HDR_LEN`]; `set_num_buffers` on a header without
//! that field (shorter than [`HDR_LEN_MRG`]); `Repr::emit` into a packet
//! shorter than `Repr::buffer_len`. Which never do: `Packet::new_checked`,
//! and every getter on a packet it returned (`num_buffers` says `None` when
//! the field is absent), and `Repr::parse`, whatever the bytes.

use std::fmt;

/// Bytes of `struct virtio_net_hdr` without `num_buffers` (a legacy device,
/// or a tap opened with IFF_VNET_HDR).
pub const HDR_LEN: usize = 10;
/// Bytes with `num_buffers` (`virtio_net_hdr_mrg_rxbuf`: VERSION_1 or
/// MRG_RXBUF negotiated).
pub const HDR_LEN_MRG: usize = 12;

mod field {
    pub type Field = core::ops::Range<usize>;

    pub const FLAGS: usize = 0;
    pub const GSO_TYPE: usize = 1;
    pub const HDR_LEN: Field = 2..4;
    pub const GSO_SIZE: Field = 4..6;
    pub const CSUM_START: Field = 6..8;
    pub const CSUM_OFFSET: Field = 8..10;
    pub const NUM_BUFFERS: Field = 10..12;
}

/// `flags`: the checksum from `csum_start` on is left to the receiver.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the frame's checksums were verified (or are the sender's own).
pub const F_DATA_VALID: u8 = 2;

/// `gso_type` values (the ECN bit aside).
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: the TCP segments carry ECN (CWR is set on the first).
pub const GSO_ECN: u8 = 0x80;

/// Why header bytes are not a header we take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("a {len}-byte virtio-net header, short of the {HDR_LEN} bytes it always has")]
    Truncated { len: usize },
    /// UDP segmentation was never offered (TUNSETOFFLOAD, the device's
    /// features): such a frame would be taken for one huge datagram.
    #[error("virtio-net header with segmentation type {0:#04x}: only TCP segmentation is offered")]
    Gso(u8),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A read/write view of a virtio-net header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

fn le16(bytes: &[u8], at: field::Field) -> u16 {
    u16::from_le_bytes([bytes[at.start], bytes[at.start + 1]])
}

fn set_le16(bytes: &mut [u8], at: field::Field, value: u16) {
    bytes[at].copy_from_slice(&value.to_le_bytes());
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// A view without any check: accessors panic on a buffer shorter than
    /// [`HDR_LEN`].
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// A view whose accessors never panic: `buffer` holds at least
    /// [`HDR_LEN`] bytes. With [`HDR_LEN_MRG`] or more it has `num_buffers`.
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Whether the buffer holds the fixed part of a header.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HDR_LEN {
            Err(Error::Truncated { len })
        } else {
            Ok(())
        }
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The raw `flags` byte, unknown bits included.
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// The raw `gso_type` byte, the ECN bit included.
    pub fn gso_type(&self) -> u8 {
        self.buffer.as_ref()[field::GSO_TYPE]
    }

    /// Bytes of Ethernet, IP and TCP headers in front of a GSO payload.
    pub fn hdr_len(&self) -> u16 {
        le16(self.buffer.as_ref(), field::HDR_LEN)
    }

    /// The payload bytes of each segment a GSO frame is cut into.
    pub fn gso_size(&self) -> u16 {
        le16(self.buffer.as_ref(), field::GSO_SIZE)
    }

    pub fn csum_start(&self) -> u16 {
        le16(self.buffer.as_ref(), field::CSUM_START)
    }

    pub fn csum_offset(&self) -> u16 {
        le16(self.buffer.as_ref(), field::CSUM_OFFSET)
    }

    /// How many receive buffers the frame spans, if the header has the field.
    pub fn num_buffers(&self) -> Option<u16> {
        let bytes = self.buffer.as_ref();
        (bytes.len() >= field::NUM_BUFFERS.end).then(|| le16(bytes, field::NUM_BUFFERS))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_flags(&mut self, value: u8) {
        self.buffer.as_mut()[field::FLAGS] = value;
    }

    pub fn set_gso_type(&mut self, value: u8) {
        self.buffer.as_mut()[field::GSO_TYPE] = value;
    }

    pub fn set_hdr_len(&mut self, value: u16) {
        set_le16(self.buffer.as_mut(), field::HDR_LEN, value);
    }

    pub fn set_gso_size(&mut self, value: u16) {
        set_le16(self.buffer.as_mut(), field::GSO_SIZE, value);
    }

    pub fn set_csum_start(&mut self, value: u16) {
        set_le16(self.buffer.as_mut(), field::CSUM_START, value);
    }

    pub fn set_csum_offset(&mut self, value: u16) {
        set_le16(self.buffer.as_mut(), field::CSUM_OFFSET, value);
    }

    /// # Panics
    /// On a header without the field (shorter than [`HDR_LEN_MRG`]).
    pub fn set_num_buffers(&mut self, value: u16) {
        set_le16(self.buffer.as_mut(), field::NUM_BUFFERS, value);
    }
}

/// The segmentation a frame asks for (GSO) or carries (TSO).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Gso {
    /// One frame, one packet.
    #[default]
    None,
    /// A TCP/IPv4 segment to be cut into `gso_size`-byte segments.
    TcpV4,
    /// A TCP/IPv6 segment to be cut into `gso_size`-byte segments.
    TcpV6,
}

/// NEEDS_CSUM: the Internet checksum of everything from `start` on goes at
/// `start + offset`, where the pseudo-header sum waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialCsum {
    pub start: u16,
    pub offset: u16,
}

/// What a virtio-net header says. Unknown flag bits are ignored; the
/// checksum fields are read only with NEEDS_CSUM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// NEEDS_CSUM and where.
    pub partial_csum: Option<PartialCsum>,
    /// DATA_VALID.
    pub data_valid: bool,
    pub gso: Gso,
    /// The ECN bit of `gso_type`.
    pub ecn: bool,
    pub hdr_len: u16,
    pub gso_size: u16,
    /// Present in a [`HDR_LEN_MRG`]-byte header.
    pub num_buffers: Option<u16>,
}

impl Repr {
    /// All zero: a whole frame, its checksums complete, nothing to cut.
    pub const PLAIN: Repr = Repr {
        partial_csum: None,
        data_valid: false,
        gso: Gso::None,
        ecn: false,
        hdr_len: 0,
        gso_size: 0,
        num_buffers: None,
    };

    /// The header a checked view holds. Segmentation other than TCP is
    /// refused: it was never offered.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr> {
        packet.check_len()?;
        let raw = packet.gso_type();
        let gso = match raw & !GSO_ECN {
            GSO_NONE => Gso::None,
            GSO_TCPV4 => Gso::TcpV4,
            GSO_TCPV6 => Gso::TcpV6,
            _ => return Err(Error::Gso(raw)),
        };
        let flags = packet.flags();
        Ok(Repr {
            partial_csum: (flags & F_NEEDS_CSUM != 0).then(|| PartialCsum {
                start: packet.csum_start(),
                offset: packet.csum_offset(),
            }),
            data_valid: flags & F_DATA_VALID != 0,
            gso,
            ecn: raw & GSO_ECN != 0,
            hdr_len: packet.hdr_len(),
            gso_size: packet.gso_size(),
            num_buffers: packet.num_buffers(),
        })
    }

    /// Bytes the header takes: with `num_buffers` or without.
    pub const fn buffer_len(&self) -> usize {
        if self.num_buffers.is_some() {
            HDR_LEN_MRG
        } else {
            HDR_LEN
        }
    }

    /// Write the header into `packet`; the checksum fields are zero without
    /// NEEDS_CSUM. Bytes past `buffer_len` are left alone.
    ///
    /// # Panics
    /// When `packet` is shorter than `buffer_len()`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        let mut flags = 0;
        if self.partial_csum.is_some() {
            flags |= F_NEEDS_CSUM;
        }
        if self.data_valid {
            flags |= F_DATA_VALID;
        }
        packet.set_flags(flags);
        let gso = match self.gso {
            Gso::None => GSO_NONE,
            Gso::TcpV4 => GSO_TCPV4,
            Gso::TcpV6 => GSO_TCPV6,
        };
        packet.set_gso_type(if self.ecn { gso | GSO_ECN } else { gso });
        packet.set_hdr_len(self.hdr_len);
        packet.set_gso_size(self.gso_size);
        let csum = self.partial_csum.unwrap_or(PartialCsum {
            start: 0,
            offset: 0,
        });
        packet.set_csum_start(csum.start);
        packet.set_csum_offset(csum.offset);
        if let Some(n) = self.num_buffers {
            packet.set_num_buffers(n);
        }
    }

    /// The header as the bytes of a [`HDR_LEN_MRG`]-byte buffer, of which
    /// the first `buffer_len()` count.
    pub fn to_bytes(self) -> [u8; HDR_LEN_MRG] {
        let mut bytes = [0u8; HDR_LEN_MRG];
        self.emit(&mut Packet::new_unchecked(&mut bytes[..]));
        bytes
    }
}

impl Default for Repr {
    fn default() -> Repr {
        Repr::PLAIN
    }
}

impl fmt::Display for Repr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "virtio-net gso={:?}", self.gso)?;
        if self.ecn {
            write!(f, "+ecn")?;
        }
        if self.gso != Gso::None {
            write!(f, " hdr_len={} gso_size={}", self.hdr_len, self.gso_size)?;
        }
        if let Some(c) = self.partial_csum {
            write!(f, " needs_csum={}+{}", c.start, c.offset)?;
        }
        if self.data_valid {
            write!(f, " data_valid")?;
        }
        if let Some(n) = self.num_buffers {
            write!(f, " num_buffers={n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NEEDS_CSUM, TCPV6 with ECN, hdr_len 74, gso_size 1440, csum at
    /// 54+16, three buffers: each field in its place, little-endian.
    const BYTES: [u8; 12] = [1, 0x84, 74, 0, 0xa0, 0x05, 54, 0, 16, 0, 3, 0];

    fn repr() -> Repr {
        Repr {
            partial_csum: Some(PartialCsum {
                start: 54,
                offset: 16,
            }),
            data_valid: false,
            gso: Gso::TcpV6,
            ecn: true,
            hdr_len: 74,
            gso_size: 1440,
            num_buffers: Some(3),
        }
    }

    #[test]
    fn every_truncation_fails_new_checked() {
        for len in 0..HDR_LEN {
            assert_eq!(
                Packet::new_checked(&BYTES[..len]),
                Err(Error::Truncated { len }),
                "{len} bytes"
            );
        }
        for len in HDR_LEN..=BYTES.len() {
            let p = Packet::new_checked(&BYTES[..len]).expect("long enough");
            // Every getter on a checked view answers.
            let _ = (p.flags(), p.gso_type(), p.hdr_len(), p.gso_size());
            let _ = (p.csum_start(), p.csum_offset());
            assert_eq!(p.num_buffers(), (len >= HDR_LEN_MRG).then_some(3));
        }
    }

    #[test]
    fn fields_sit_where_virtio_puts_them() {
        let p = Packet::new_checked(&BYTES[..]).unwrap();
        assert_eq!(Repr::parse(&p), Ok(repr()));
        assert_eq!(repr().to_bytes(), BYTES);
    }

    #[test]
    fn repr_round_trips_with_and_without_num_buffers() {
        let plain = Repr::default();
        let data_valid = Repr {
            data_valid: true,
            ..plain
        };
        let tso4 = Repr {
            gso: Gso::TcpV4,
            num_buffers: None,
            ..repr()
        };
        for r in [plain, data_valid, tso4, repr()] {
            let mut bytes = vec![0u8; r.buffer_len()];
            r.emit(&mut Packet::new_unchecked(&mut bytes[..]));
            let back = Repr::parse(&Packet::new_checked(&bytes[..]).unwrap());
            assert_eq!(back, Ok(r), "{r}");
        }
        assert_eq!(plain.to_bytes(), [0; 12]);
    }

    #[test]
    fn segmentation_other_than_tcp_is_refused_with_its_byte() {
        for raw in [GSO_UDP, GSO_UDP_L4, GSO_UDP | GSO_ECN, 2, 6, 0x7f, 0xff] {
            let mut b = BYTES;
            b[1] = raw;
            assert_eq!(
                Repr::parse(&Packet::new_checked(&b[..]).unwrap()),
                Err(Error::Gso(raw)),
                "gso_type {raw:#x}"
            );
        }
    }

    #[test]
    fn checksum_fields_count_only_with_needs_csum() {
        let mut b = BYTES;
        b[0] = F_DATA_VALID | 0x04; // an unknown bit (RSC_INFO) is ignored
        let r = Repr::parse(&Packet::new_checked(&b[..]).unwrap()).unwrap();
        assert_eq!(r.partial_csum, None);
        assert!(r.data_valid);
        // And they are written as zero without it.
        assert_eq!(&r.to_bytes()[6..10], &[0; 4]);
    }
}
