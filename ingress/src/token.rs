//! Traffic access tokens for sandboxes with `allow_public_traffic = false`.
//!
//! Only the SHA-256 digest of a token is kept; a presented token is hashed
//! and the two fixed-length digests are compared in constant time, so neither
//! the token's length nor the position of the first differing byte leaks.

use std::{fmt, io};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The header a client presents the token in. It never reaches the guest.
pub const TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// Random bytes in a token: 160 bits.
const TOKEN_BYTES: usize = 20;

/// A freshly made token, shown once to whoever creates or rotates it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(String);

#[derive(Debug, thiserror::Error)]
#[error("cannot draw random bytes: {0}")]
pub struct NoRandomness(io::Error);

/// Fill `buf` from the kernel's random pool: getrandom(2), which waits
/// only until the pool is first seeded. It is called through libc itself,
/// not the getrandom crate: in slipway's statically linked binary that
/// crate finds no `getrandom` by `dlsym` and reads /dev/urandom instead,
/// which confinement does not let slipway open.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), NoRandomness> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes at `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(NoRandomness(e));
            }
            continue;
        }
        done += n as usize;
    }
    Ok(())
}

impl AccessToken {
    pub fn generate() -> Result<Self, NoRandomness> {
        let mut raw = [0u8; TOKEN_BYTES];
        random_bytes(&mut raw)?;
        Ok(Self(raw.iter().map(|b| format!("{b:02x}")).collect()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn digest(&self) -> TokenDigest {
        TokenDigest::of(self.0.as_bytes())
    }
}

/// Tokens stay out of logs and panics.
impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(…)")
    }
}

/// SHA-256 of a token.
#[derive(Clone, Copy)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    pub fn of(token: &[u8]) -> Self {
        Self(Sha256::digest(token).into())
    }

    /// Whether `presented` is the token this digest was made from.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.same_as(&Self::of(presented))
    }

    /// Whether two digests are equal, in constant time: a gateway in front
    /// of this one (`slipway edge`) forwards the digest of the token its
    /// client presented, never the token.
    pub fn same_as(&self, other: &TokenDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// The digest of the one token header a request carries, if it carries
    /// exactly one (none, or several, is no presented token).
    pub fn presented(headers: &http::HeaderMap) -> Option<Self> {
        let mut all = headers.get_all(TOKEN_HEADER).iter();
        let first = all.next()?;
        all.next().is_none().then(|| Self::of(first.as_bytes()))
    }

    /// 64 lower-case hex digits, as the cluster store keeps it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Exactly 64 hex digits (either case); anything else is `None`.
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return None;
        }
        let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 32];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(Self(out))
    }

    /// The raw bytes, for keying kept connections by the token that opened them.
    pub(crate) fn bytes(&self) -> [u8; 32] {
        self.0
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenDigest(…)")
    }
}

/// What a request's token header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCheck {
    Granted,
    Missing,
    Invalid,
}

/// Check the request's token headers against the sandbox's digest. More than
/// one token header is invalid, whatever they hold.
pub fn check(expected: &TokenDigest, headers: &http::HeaderMap) -> TokenCheck {
    let mut all = headers.get_all(TOKEN_HEADER).iter();
    let Some(first) = all.next() else {
        return TokenCheck::Missing;
    };
    let matches = expected.matches(first.as_bytes());
    if all.next().is_some() || !matches {
        TokenCheck::Invalid
    } else {
        TokenCheck::Granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn with(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(TOKEN_HEADER, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn tokens_are_random_and_at_least_128_bits() {
        let a = AccessToken::generate().unwrap();
        let b = AccessToken::generate().unwrap();
        assert_ne!(a, b);
        assert!(a.as_str().len() * 4 >= 128);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(!format!("{a:?}").contains(a.as_str()));
    }

    #[test]
    fn missing_wrong_and_right_tokens() {
        let t = AccessToken::generate().unwrap();
        let d = t.digest();
        assert_eq!(check(&d, &HeaderMap::new()), TokenCheck::Missing);
        assert_eq!(check(&d, &with(&["nope"])), TokenCheck::Invalid);
        assert_eq!(check(&d, &with(&[""])), TokenCheck::Invalid);
        let almost = format!("{}x", t.as_str());
        assert_eq!(check(&d, &with(&[&almost])), TokenCheck::Invalid);
        assert_eq!(check(&d, &with(&[t.as_str()])), TokenCheck::Granted);
    }

    #[test]
    fn digests_go_to_hex_and_back_and_nothing_else_parses() {
        let d = AccessToken::generate().unwrap().digest();
        let hex = d.to_hex();
        assert_eq!(hex.len(), 64);
        assert!(TokenDigest::from_hex(&hex).unwrap().same_as(&d));
        assert!(TokenDigest::from_hex(&hex.to_ascii_uppercase())
            .unwrap()
            .same_as(&d));
        let other = AccessToken::generate().unwrap().digest();
        assert!(!other.same_as(&d));
        for bad in [
            "",
            "00",
            &hex[..63],
            &format!("{hex}0"),
            &"g".repeat(64),
            "é".repeat(32).as_str(),
            &format!("+{}", &hex[1..]),
        ] {
            assert!(TokenDigest::from_hex(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn only_a_single_token_header_is_a_presented_token() {
        let t = AccessToken::generate().unwrap();
        assert!(TokenDigest::presented(&HeaderMap::new()).is_none());
        assert!(TokenDigest::presented(&with(&[t.as_str(), t.as_str()])).is_none());
        let p = TokenDigest::presented(&with(&[t.as_str()])).unwrap();
        assert!(p.same_as(&t.digest()));
    }

    #[test]
    fn a_second_token_header_makes_it_invalid() {
        let t = AccessToken::generate().unwrap();
        let d = t.digest();
        assert_eq!(
            check(&d, &with(&[t.as_str(), "other"])),
            TokenCheck::Invalid
        );
        assert_eq!(
            check(&d, &with(&["other", t.as_str()])),
            TokenCheck::Invalid
        );
    }
}
