//! The vhost-user message header on the wire: `request`, `flags` and the
//! body's `size`, each a little-endian u32. A zero-copy view, [`Packet`],
//! and what the relay may act on, [`Repr`]; the VMM's bytes are read only
//! here.
//!
//! Which calls may panic: `Packet::new_unchecked` followed by an accessor on
//! a buffer shorter than [`HEADER_LEN`], and `Repr::emit` into such a
//! buffer. Which never do: `Packet::new_checked`, every accessor on a packet
//! it returned, and `Repr::parse`, whatever the bytes.

/// Bytes of the header in front of every message.
pub const HEADER_LEN: usize = 12;
/// The relay's limit on a body (the vhost crate refuses more than 4 KiB
/// anyway): a larger `size` is a broken or hostile VMM.
pub const MAX_BODY: usize = 64 << 10;

mod field {
    pub type Field = core::ops::Range<usize>;

    pub const REQUEST: Field = 0..4;
    pub const FLAGS: Field = 4..8;
    pub const SIZE: Field = 8..12;
}

/// `request` of the front-end's VHOST_USER_SET_FEATURES.
pub const SET_FEATURES: u32 = 2;
/// `request` of VHOST_USER_SET_VRING_ENABLE.
pub const SET_VRING_ENABLE: u32 = 18;

/// `flags`: protocol version 1, the only one (bits 0-1).
pub const FLAG_VERSION: u32 = 0x1;
/// `flags`: this message answers one.
pub const FLAG_REPLY: u32 = 0x4;
/// `flags`: the sender wants a REPLY_ACK.
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// Why header bytes are not a message the relay passes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("a {len}-byte vhost-user message header (it has {HEADER_LEN})")]
    Truncated { len: usize },
    #[error("a {size}-byte vhost-user message body (the limit is {MAX_BODY})")]
    BodyTooLong { size: u32 },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A read/write view of a vhost-user message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

fn le32(bytes: &[u8], at: field::Field) -> u32 {
    let b = &bytes[at];
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// A view without any check: accessors panic on a buffer shorter than
    /// [`HEADER_LEN`].
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// A view whose accessors never panic.
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            Err(Error::Truncated { len })
        } else {
            Ok(())
        }
    }

    pub fn request(&self) -> u32 {
        le32(self.buffer.as_ref(), field::REQUEST)
    }

    pub fn flags(&self) -> u32 {
        le32(self.buffer.as_ref(), field::FLAGS)
    }

    /// Bytes of body after the header.
    pub fn size(&self) -> u32 {
        le32(self.buffer.as_ref(), field::SIZE)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_request(&mut self, value: u32) {
        self.buffer.as_mut()[field::REQUEST].copy_from_slice(&value.to_le_bytes());
    }

    pub fn set_flags(&mut self, value: u32) {
        self.buffer.as_mut()[field::FLAGS].copy_from_slice(&value.to_le_bytes());
    }

    pub fn set_size(&mut self, value: u32) {
        self.buffer.as_mut()[field::SIZE].copy_from_slice(&value.to_le_bytes());
    }
}

/// A message header whose body the relay can take. Requests and flags are
/// kept as they came (the relay passes them on; the vhost crate judges
/// them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub request: u32,
    pub flags: u32,
    /// Bytes of body, at most [`MAX_BODY`].
    pub size: u32,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr> {
        packet.check_len()?;
        let size = packet.size();
        if usize::try_from(size).map_or(true, |s| s > MAX_BODY) {
            return Err(Error::BodyTooLong { size });
        }
        Ok(Repr {
            request: packet.request(),
            flags: packet.flags(),
            size,
        })
    }

    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// The body's length, as parsed (at most [`MAX_BODY`]).
    pub fn body_len(&self) -> usize {
        self.size as usize
    }

    /// # Panics
    /// When `packet` is shorter than [`HEADER_LEN`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_request(self.request);
        packet.set_flags(self.flags);
        packet.set_size(self.size);
    }

    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        self.emit(&mut Packet::new_unchecked(&mut bytes[..]));
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SET_VRING_ENABLE, version 1 wanting a reply, an 8-byte body.
    const BYTES: [u8; HEADER_LEN] = [18, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0];

    #[test]
    fn every_truncation_fails_new_checked() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                Packet::new_checked(&BYTES[..len]),
                Err(Error::Truncated { len })
            );
        }
        let p = Packet::new_checked(&BYTES[..]).unwrap();
        assert_eq!((p.request(), p.flags(), p.size()), (18, 9, 8));
    }

    #[test]
    fn repr_round_trips_and_sits_where_the_spec_puts_it() {
        let r = Repr {
            request: SET_VRING_ENABLE,
            flags: FLAG_VERSION | FLAG_NEED_REPLY,
            size: 8,
        };
        assert_eq!(r.to_bytes(), BYTES);
        assert_eq!(
            Repr::parse(&Packet::new_checked(&BYTES[..]).unwrap()),
            Ok(r)
        );
        let big = Repr {
            request: u32::MAX,
            flags: u32::MAX,
            size: MAX_BODY as u32,
        };
        let bytes = big.to_bytes();
        assert_eq!(
            Repr::parse(&Packet::new_checked(&bytes[..]).unwrap()),
            Ok(big)
        );
    }

    #[test]
    fn a_body_over_the_limit_is_refused_with_its_size() {
        for size in [MAX_BODY as u32 + 1, u32::MAX] {
            let mut b = BYTES;
            b[8..12].copy_from_slice(&size.to_le_bytes());
            let e = Repr::parse(&Packet::new_checked(&b[..]).unwrap()).unwrap_err();
            assert_eq!(e, Error::BodyTooLong { size });
            assert!(e.to_string().contains(&format!("a {size}-byte")), "{e}");
        }
    }
}
