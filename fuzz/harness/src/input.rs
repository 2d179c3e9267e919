//! Input building blocks whose byte encoding is simple enough to write by
//! hand: lengths are little-endian prefixes read from the front (arbitrary's
//! own `Vec` takes its length from the end of the input), so the seed writer
//! can spell out whole inputs and a mutated length stays local.

use std::fmt;
use std::ops::Deref;

use arbitrary::{Arbitrary, Result, Unstructured};

/// Bytes with a `u16` little-endian length in front (cut to what is left).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl<'a> Arbitrary<'a> for Bytes {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let n = usize::from(u16::arbitrary(u)?).min(u.len());
        Ok(Bytes(u.bytes(n)?.to_vec()))
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x?}", self.0)
    }
}

/// A string with a `u8` length in front; invalid UTF-8 is replaced, not refused.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Text(pub String);

impl<'a> Arbitrary<'a> for Text {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let n = usize::from(u8::arbitrary(u)?).min(u.len());
        Ok(Text(String::from_utf8_lossy(u.bytes(n)?).into_owned()))
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Up to 255 items with a `u8` count in front.
#[derive(Clone, Debug, Default)]
pub struct List<T>(pub Vec<T>);

impl<'a, T: Arbitrary<'a>> Arbitrary<'a> for List<T> {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let n = u8::arbitrary(u)?;
        let mut items = Vec::new();
        for _ in 0..n {
            if u.is_empty() {
                break;
            }
            items.push(T::arbitrary(u)?);
        }
        Ok(List(items))
    }
}

impl<T> Deref for List<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

/// Writes inputs in the encoding `arbitrary` (1.x, derive) and the types above read.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    /// Variant `i` of an enum with `n` variants (derive maps a `u32` by `(x * n) >> 32`).
    pub fn variant(&mut self, i: u32, n: u32) -> &mut Self {
        let x = ((u64::from(i) << 32).div_ceil(u64::from(n))) as u32;
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub fn bool(&mut self, b: bool) -> &mut Self {
        self.0.push(u8::from(b));
        self
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A `Bytes` value.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
        self
    }
    /// A `Text` value.
    pub fn text(&mut self, s: &str) -> &mut Self {
        self.u8(s.len() as u8);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// Before each element of a `Vec` that is the last field: arbitrary's
    /// take-rest decoding reads a "keep going" `bool` first.
    pub fn more(&mut self) -> &mut Self {
        self.bool(true)
    }
    /// Bytes as they are (fixed-size arrays).
    pub fn rest(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}
