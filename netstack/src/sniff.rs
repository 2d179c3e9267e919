//! The name in a TCP flow's first guest bytes: a TLS ClientHello's SNI
//! (across TCP segments and TLS records) or an HTTP/1.x request's Host
//! (an absolute-form URI must name the same host).
//!
//! The caller bounds how much it hands in (`MAX_FIRST_BYTES`) and how long
//! it waits; `sniff` only says what the bytes so far settle. It never
//! panics, never allocates more than its input, and looks at each byte a
//! bounded number of times per call.

use crate::names::canonical_name;

/// The most a flow's first bytes may take before a name must be in them.
pub const MAX_FIRST_BYTES: usize = 16 * 1024;

/// Where a name came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    Sni,
    Host,
}

impl How {
    pub fn as_str(self) -> &'static str {
        match self {
            How::Sni => "sni",
            How::Host => "host",
        }
    }
}

/// What a flow's first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// They may still become a ClientHello or a request head: wait for more.
    NeedMore,
    /// A ClientHello with a host-name SNI, or a request head with a Host.
    Name { name: String, how: How },
    /// A ClientHello or a request head that names no host (no SNI, an
    /// address as the host, a URI and a Host that disagree, a malformed
    /// one): why.
    NoName(&'static str),
    /// Neither TLS nor HTTP/1.x (SSH, a database protocol, …).
    Other,
}

/// What the first bytes say so far.
pub fn sniff(bytes: &[u8]) -> Sniff {
    match bytes.first() {
        None => Sniff::NeedMore,
        Some(0x16) => tls(bytes),
        Some(b) if b.is_ascii_uppercase() => http(bytes),
        Some(_) => Sniff::Other,
    }
}

// ----- TLS -------------------------------------------------------------------

const RECORD_HEADER: usize = 5;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

fn tls(bytes: &[u8]) -> Sniff {
    // The handshake bytes of the leading handshake records, until the
    // ClientHello they carry is whole.
    let mut handshake = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = bytes.get(at..at + RECORD_HEADER) else {
            return Sniff::NeedMore;
        };
        if header[0] != 0x16 {
            return Sniff::NoName("a TLS record other than a handshake before the ClientHello");
        }
        if header[1] != 3 {
            return if at == 0 {
                Sniff::Other
            } else {
                Sniff::NoName("a TLS record of an unknown version")
            };
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > (1 << 14) {
            return Sniff::NoName("a TLS record of a bad length");
        }
        let body_at = at + RECORD_HEADER;
        let Some(body) = bytes.get(body_at..body_at + len) else {
            // A partial record: what it has may already finish the message.
            handshake.extend_from_slice(&bytes[body_at.min(bytes.len())..]);
            return match client_hello(&handshake) {
                Some(done) => done,
                None => Sniff::NeedMore,
            };
        };
        handshake.extend_from_slice(body);
        if let Some(done) = client_hello(&handshake) {
            return done;
        }
        at = body_at + len;
    }
}

/// The ClientHello at the start of `hs`, once it is whole (`None`: not yet).
fn client_hello(hs: &[u8]) -> Option<Sniff> {
    let head = hs.get(..4)?;
    if head[0] != HANDSHAKE_CLIENT_HELLO {
        return Some(Sniff::NoName("a TLS handshake that is not a ClientHello"));
    }
    let len = usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]);
    let body = hs.get(4..4 + len)?;
    Some(match server_name(body) {
        Ok(Some(raw)) => match std::str::from_utf8(raw).ok().and_then(canonical_name) {
            Some(name) => Sniff::Name {
                name,
                how: How::Sni,
            },
            None => Sniff::NoName("an SNI that is not a host name"),
        },
        Ok(None) => Sniff::NoName("a ClientHello without SNI"),
        Err(why) => Sniff::NoName(why),
    })
}

/// A bounds-checked reader over one message.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let s = self.take(2)?;
        Some(u16::from_be_bytes([s[0], s[1]]))
    }

    /// A vector with a one- or two-byte length.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

const MALFORMED: &str = "a malformed ClientHello";

/// The host name in a whole ClientHello body, if it has one.
fn server_name(body: &[u8]) -> Result<Option<&[u8]>, &'static str> {
    fn parse<'a>(r: &mut Reader<'a>) -> Option<Option<&'a [u8]>> {
        r.take(2 + 32)?; // legacy_version, random
        let session = r.vec8()?;
        if session.len() > 32 {
            return None;
        }
        r.vec16()?; // cipher_suites
        r.vec8()?; // legacy_compression_methods
        if r.done() {
            // No extensions at all (TLS 1.2 allows it).
            return Some(None);
        }
        let exts = r.vec16()?;
        if !r.done() {
            return None;
        }
        let mut e = Reader { b: exts, at: 0 };
        let mut found = None;
        while !e.done() {
            let kind = e.u16()?;
            let data = e.vec16()?;
            if kind != EXT_SERVER_NAME {
                continue;
            }
            if found.is_some() {
                // Two server_name extensions (RFC 8446 forbids it): no
                // guessing which one the server reads.
                return None;
            }
            let mut s = Reader { b: data, at: 0 };
            let list = s.vec16()?;
            if !s.done() {
                return None;
            }
            let mut l = Reader { b: list, at: 0 };
            while !l.done() {
                let kind = l.u8()?;
                let name = l.vec16()?;
                if kind == NAME_TYPE_HOST {
                    if found.is_some() {
                        return None;
                    }
                    found = Some(name);
                }
            }
        }
        Some(found)
    }
    parse(&mut Reader { b: body, at: 0 }).ok_or(MALFORMED)
}

// ----- HTTP/1.x ----------------------------------------------------------------

/// The longest method token taken as one (WebDAV's are the longest in use).
const MAX_METHOD: usize = 24;

fn http(bytes: &[u8]) -> Sniff {
    // The method: upper-case letters, then a space.
    let method_end = bytes.iter().take(MAX_METHOD + 1).position(|&b| b == b' ');
    let Some(method_end) = method_end else {
        let token = &bytes[..bytes.len().min(MAX_METHOD + 1)];
        let could_be =
            token.len() <= MAX_METHOD && token.iter().all(|b| b.is_ascii_uppercase() || *b == b'-');
        return if could_be {
            Sniff::NeedMore
        } else {
            Sniff::Other
        };
    };
    if !bytes[..method_end]
        .iter()
        .all(|b| b.is_ascii_uppercase() || *b == b'-')
    {
        return Sniff::Other;
    }
    // The request line, then the header block up to the empty line.
    let Some(line_end) = find(bytes, b"\n") else {
        return if looks_like_request_line_start(&bytes[method_end + 1..]) {
            Sniff::NeedMore
        } else {
            Sniff::Other
        };
    };
    let line = trim_cr(&bytes[..line_end]);
    if !looks_like_request_line_start(&line[method_end + 1..]) || line.contains(&b'\r') {
        // What a shorter read would already have called "not HTTP".
        return Sniff::Other;
    }
    let mut parts = line[method_end + 1..].split(|&b| b == b' ');
    let (Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next()) else {
        return Sniff::Other;
    };
    if !(version == b"HTTP/1.1" || version == b"HTTP/1.0") {
        return Sniff::Other;
    }
    let head_start = line_end + 1;
    let Some(head_len) = header_block_len(&bytes[head_start..]) else {
        return Sniff::NeedMore;
    };
    let head = &bytes[head_start..head_start + head_len];
    let mut host = None;
    for raw in head.split(|&b| b == b'\n') {
        let raw = trim_cr(raw);
        if raw.is_empty() {
            break;
        }
        let Some(colon) = raw.iter().position(|&b| b == b':') else {
            return Sniff::NoName("a malformed request header");
        };
        if !raw[..colon].eq_ignore_ascii_case(b"host") {
            continue;
        }
        if host.is_some() {
            return Sniff::NoName("a request with two Host headers");
        }
        host = Some(trim_space(&raw[colon + 1..]));
    }
    let Some(host) = host else {
        return Sniff::NoName("a request without Host");
    };
    let Some(name) = host_name(host) else {
        return Sniff::NoName("a Host that is not a host name");
    };
    // Absolute form (`GET http://example.test/ HTTP/1.1`): the URI's host
    // must be the Host's, or a proxy and a server would disagree on it.
    let lower: Vec<u8> = target.iter().take(8).map(u8::to_ascii_lowercase).collect();
    let rest = if lower.starts_with(b"http://") {
        Some(&target[7..])
    } else if lower.starts_with(b"https://") {
        Some(&target[8..])
    } else {
        None
    };
    if let Some(rest) = rest {
        let end = rest
            .iter()
            .position(|&b| matches!(b, b'/' | b'?' | b'#'))
            .unwrap_or(rest.len());
        let authority = &rest[..end];
        if authority.contains(&b'@') || host_name(authority).as_deref() != Some(name.as_str()) {
            return Sniff::NoName("a request URI and Host that disagree");
        }
    }
    Sniff::Name {
        name,
        how: How::Host,
    }
}

/// After `METHOD `: a request target (no space, no control byte) so far.
fn looks_like_request_line_start(rest: &[u8]) -> bool {
    rest.iter()
        .all(|&b| b.is_ascii_graphic() || b == b' ' || b == b'\r')
}

/// The length of the header block up to and including its empty line;
/// `None` while the empty line has not come.
fn header_block_len(b: &[u8]) -> Option<usize> {
    if b.starts_with(b"\r\n") {
        return Some(2);
    }
    if b.starts_with(b"\n") {
        return Some(1);
    }
    let crlf = find(b, b"\r\n\r\n").map(|i| i + 4);
    let lf = find(b, b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// `host[:port]` as a canonical name; `None` for an address literal or junk.
fn host_name(authority: &[u8]) -> Option<String> {
    if authority.starts_with(b"[") {
        return None;
    }
    let host = match authority.iter().rposition(|&b| b == b':') {
        Some(i) if authority[i + 1..].iter().all(u8::is_ascii_digit) => &authority[..i],
        Some(_) => return None,
        None => authority,
    };
    canonical_name(std::str::from_utf8(host).ok()?)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn trim_cr(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\r").unwrap_or(b)
}

fn trim_space(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello carrying `sni` (none when empty), as one record.
    pub(crate) fn hello(sni: &str) -> Vec<u8> {
        let mut ext = Vec::new();
        if !sni.is_empty() {
            let mut list = vec![NAME_TYPE_HOST];
            list.extend_from_slice(&(sni.len() as u16).to_be_bytes());
            list.extend_from_slice(sni.as_bytes());
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend_from_slice(&list);
            ext.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(&data);
        }
        // An extension before and after, as real clients send.
        let mut exts = vec![0x00, 0x0b, 0x00, 0x02, 0x01, 0x00];
        exts.extend_from_slice(&ext);
        exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(32);
        body.extend_from_slice(&[9; 32]);
        body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        records(&hs, hs.len())
    }

    /// Handshake bytes cut into records of at most `size` bytes.
    fn records(hs: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in hs.chunks(size) {
            out.extend_from_slice(&[0x16, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn name(n: &str, how: How) -> Sniff {
        Sniff::Name {
            name: n.into(),
            how,
        }
    }

    #[test]
    fn an_sni_is_found_in_one_record_and_across_records_and_segments() {
        let one = hello("API.Example.test");
        assert_eq!(sniff(&one), name("api.example.test", How::Sni));
        // Every prefix is "need more", never a wrong answer.
        for cut in 0..one.len() {
            assert_eq!(sniff(&one[..cut]), Sniff::NeedMore, "cut at {cut}");
        }
        // The same handshake in 7-byte records.
        let hs = &one[RECORD_HEADER..];
        let split = records(hs, 7);
        assert_eq!(sniff(&split), name("api.example.test", How::Sni));
        for cut in 0..split.len() {
            assert_eq!(sniff(&split[..cut]), Sniff::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn hellos_that_name_no_host_say_why() {
        assert_eq!(
            sniff(&hello("")),
            Sniff::NoName("a ClientHello without SNI")
        );
        assert_eq!(
            sniff(&hello("192.0.2.1")),
            Sniff::NoName("an SNI that is not a host name")
        );
        let mut bad = hello("a.test");
        let n = bad.len();
        bad[n - 20] ^= 0xff; // breaks a length inside the extensions
        assert!(matches!(sniff(&bad), Sniff::NoName(_)));
        // An alert, then anything: no ClientHello first.
        assert!(matches!(
            sniff(&[0x15, 3, 3, 0, 2, 2, 40]),
            Sniff::Other | Sniff::NoName(_)
        ));
        assert_eq!(
            sniff(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]),
            Sniff::NoName("a TLS handshake that is not a ClientHello")
        );
    }

    #[test]
    fn a_host_header_is_found_whole_and_split() {
        let req = b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nhOsT:  Www.Example.test:8080 \r\n\r\nbody";
        assert_eq!(sniff(req), name("www.example.test", How::Host));
        for cut in 0..req.len() - 4 {
            assert_eq!(sniff(&req[..cut]), Sniff::NeedMore, "cut at {cut}");
        }
        let lf = b"POST / HTTP/1.0\nHost: a.test\n\n";
        assert_eq!(sniff(lf), name("a.test", How::Host));
    }

    #[test]
    fn absolute_uris_must_agree_with_host() {
        let ok = b"GET http://a.test:80/p HTTP/1.1\r\nHost: a.test\r\n\r\n";
        assert_eq!(sniff(ok), name("a.test", How::Host));
        let front = b"GET http://evil.test/p HTTP/1.1\r\nHost: a.test\r\n\r\n";
        assert_eq!(
            sniff(front),
            Sniff::NoName("a request URI and Host that disagree")
        );
        let userinfo = b"GET http://a.test@evil.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n";
        assert!(matches!(sniff(userinfo), Sniff::NoName(_)));
    }

    #[test]
    fn requests_that_name_no_host_say_why() {
        let none = b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n";
        assert_eq!(sniff(none), Sniff::NoName("a request without Host"));
        let two = b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n";
        assert_eq!(sniff(two), Sniff::NoName("a request with two Host headers"));
        let ip = b"GET / HTTP/1.1\r\nHost: 192.0.2.7\r\n\r\n";
        assert_eq!(sniff(ip), Sniff::NoName("a Host that is not a host name"));
        let v6 = b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n";
        assert_eq!(sniff(v6), Sniff::NoName("a Host that is not a host name"));
    }

    #[test]
    fn other_protocols_are_told_apart_early() {
        assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.2\r\n"), Sniff::Other);
        assert_eq!(sniff(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), Sniff::Other);
        assert_eq!(sniff(b"EHLO x\r\n"), Sniff::Other);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Sniff::Other);
        assert_eq!(sniff(b"GE"), Sniff::NeedMore);
        assert_eq!(sniff(b"GET /"), Sniff::NeedMore);
        assert_eq!(sniff(b""), Sniff::NeedMore);
    }
}
