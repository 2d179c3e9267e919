//! Cookies a guest sets must stay on its own URL. A `Set-Cookie` whose
//! `Domain` names anything but the exact host the client asked for (the
//! parent domain, `sandbox.<domain>`, another sandbox's host) would let one
//! sandbox set cookies that browsers send to the others; such `Domain`
//! attributes are dropped, which leaves a host-only cookie. Everything else
//! in the header passes byte for byte.
//!
//! The header's bytes are the guest's: they are read as bytes (obs-text and
//! all, never assumed UTF-8), in one linear pass; nothing here panics.

use http::header::{HeaderMap, HeaderValue, SET_COOKIE};

/// Drop from every `Set-Cookie` in `headers` the `Domain` attributes that
/// do not name `host` (the request's host: lower case, no port, no final dot).
pub fn confine(headers: &mut HeaderMap, host: &str) {
    if !headers.contains_key(SET_COOKIE) {
        return;
    }
    let values: Vec<HeaderValue> = headers.get_all(SET_COOKIE).iter().cloned().collect();
    headers.remove(SET_COOKIE);
    for v in values {
        if let Some(v) = confine_one(&v, host) {
            headers.append(SET_COOKIE, v);
        }
    }
}

/// One `Set-Cookie` value without its foreign `Domain` attributes; `None`
/// (the cookie is dropped) if what is left were not a valid header value,
/// which leaving out whole attributes cannot make happen.
pub fn confine_one(value: &HeaderValue, host: &str) -> Option<HeaderValue> {
    let bytes = value.as_bytes();
    // The first piece is the cookie's name=value pair, whatever it says;
    // attributes follow, each after a ';' (RFC 6265 §5.2).
    let mut pieces = bytes.split(|&b| b == b';');
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(pieces.next().unwrap_or_default());
    let mut changed = false;
    for attr in pieces {
        if is_foreign_domain(attr, host) {
            changed = true;
            continue;
        }
        out.push(b';');
        out.extend_from_slice(attr);
    }
    if !changed {
        return Some(value.clone());
    }
    HeaderValue::from_bytes(&out).ok()
}

/// A `Domain` attribute (any case, spaces around name and value) whose value,
/// less one leading dot as browsers read it, is not exactly `host`. An empty
/// or malformed Domain counts as foreign: dropping it only narrows the cookie.
fn is_foreign_domain(attr: &[u8], host: &str) -> bool {
    let (name, value) = match attr.iter().position(|&b| b == b'=') {
        Some(i) => (&attr[..i], &attr[i + 1..]),
        None => (attr, &b""[..]),
    };
    if !name.trim_ascii().eq_ignore_ascii_case(b"domain") {
        return false;
    }
    let value = value.trim_ascii();
    let value = value.strip_prefix(b".").unwrap_or(value);
    !value.eq_ignore_ascii_case(host.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "3000-abc.sandbox.test";

    /// One row: what the guest sent, what the client gets (`None`: dropped).
    fn check(rows: &[(&[u8], Option<&[u8]>)]) {
        for (sent, want) in rows {
            let v = HeaderValue::from_bytes(sent).unwrap();
            let got = confine_one(&v, HOST);
            assert_eq!(
                got.as_ref().map(|g| g.as_bytes()),
                *want,
                "{}",
                String::from_utf8_lossy(sent)
            );
        }
    }

    #[test]
    fn domains_other_than_the_exact_host_are_dropped() {
        check(&[
            // The parent domain, with or without its dot, in any case.
            (
                b"sid=1; Domain=sandbox.test; Path=/",
                Some(b"sid=1; Path=/"),
            ),
            (b"sid=1; Domain=.sandbox.test", Some(b"sid=1")),
            (
                b"sid=1; domain=SANDBOX.TEST; Secure",
                Some(b"sid=1; Secure"),
            ),
            (b"sid=1;Domain=test", Some(b"sid=1")),
            // Another sandbox, another port of this one, the header-form host.
            (b"sid=1; Domain=3000-xyz.sandbox.test", Some(b"sid=1")),
            (b"sid=1; Domain=3001-abc.sandbox.test", Some(b"sid=1")),
            (b"sid=1; Domain=sandbox.sandbox.test", Some(b"sid=1")),
            // Not quite the host: a suffix, a prefix, a final dot, two dots.
            (b"sid=1; Domain=abc.sandbox.test", Some(b"sid=1")),
            (b"sid=1; Domain=x.3000-abc.sandbox.test", Some(b"sid=1")),
            (b"sid=1; Domain=3000-abc.sandbox.test.", Some(b"sid=1")),
            (b"sid=1; Domain=..3000-abc.sandbox.test", Some(b"sid=1")),
            // Empty and odd forms narrow to host-only too.
            (b"sid=1; Domain=", Some(b"sid=1")),
            (b"sid=1; Domain", Some(b"sid=1")),
            (
                b"sid=1;  DOMAIN  =  sandbox.test  ; HttpOnly",
                Some(b"sid=1; HttpOnly"),
            ),
            (b"sid=1; Domain=\"sandbox.test\"", Some(b"sid=1")),
            // Every Domain is looked at, not just the first or the last.
            (
                b"sid=1; Domain=3000-abc.sandbox.test; Domain=sandbox.test",
                Some(b"sid=1; Domain=3000-abc.sandbox.test"),
            ),
        ]);
    }

    #[test]
    fn the_exact_host_and_cookies_without_domain_stay_as_sent() {
        check(&[
            (
                b"sid=1; Domain=3000-abc.sandbox.test; Path=/",
                Some(b"sid=1; Domain=3000-abc.sandbox.test; Path=/"),
            ),
            (
                b"sid=1; domain=.3000-ABC.Sandbox.Test",
                Some(b"sid=1; domain=.3000-ABC.Sandbox.Test"),
            ),
            (
                b"sid=1; Path=/; Secure; HttpOnly; SameSite=Lax",
                Some(b"sid=1; Path=/; Secure; HttpOnly; SameSite=Lax"),
            ),
            // A cookie named Domain, or a value mentioning one, is the pair.
            (b"Domain=sandbox.test", Some(b"Domain=sandbox.test")),
            (
                b"pref=Domain=sandbox.test; Path=/",
                Some(b"pref=Domain=sandbox.test; Path=/"),
            ),
            (b"x-domain=1; Max-Age=5", Some(b"x-domain=1; Max-Age=5")),
            (b"", Some(b"")),
            (b";;;", Some(b";;;")),
        ]);
    }

    #[test]
    fn hostile_bytes_pass_or_go_without_a_panic() {
        let mut huge = b"big=".to_vec();
        huge.extend(vec![b'a'; 60 << 10]);
        let huge_out = huge.clone();
        huge.extend_from_slice(b"; Domain=sandbox.test");
        let many: Vec<u8> = b"m=1"
            .iter()
            .copied()
            .chain(b"; Domain=x".repeat(5000))
            .collect();
        check(&[
            // Not UTF-8: obs-text in the value and in the Domain itself.
            (
                b"v=\xff\xfe; Domain=sandbox.test; Path=/\xe9",
                Some(b"v=\xff\xfe; Path=/\xe9"),
            ),
            (b"v=1; Domain=\xff3000-abc.sandbox.test", Some(b"v=1")),
            (b"v=1; Domain=3000-abc.sandbox.test\xff", Some(b"v=1")),
            (&huge, Some(&huge_out)),
            (&many, Some(b"m=1")),
        ]);
    }

    #[test]
    fn every_set_cookie_of_a_response_is_confined_and_others_untouched() {
        let mut h = HeaderMap::new();
        h.append(
            SET_COOKIE,
            HeaderValue::from_static("a=1; Domain=sandbox.test"),
        );
        h.append(SET_COOKIE, HeaderValue::from_static("b=2"));
        h.append(
            SET_COOKIE,
            HeaderValue::from_static("c=3; Domain=3000-abc.sandbox.test"),
        );
        h.append("x-domain", HeaderValue::from_static("Domain=sandbox.test"));
        confine(&mut h, HOST);
        let got: Vec<_> = h.get_all(SET_COOKIE).iter().collect();
        assert_eq!(got, ["a=1", "b=2", "c=3; Domain=3000-abc.sandbox.test"]);
        assert_eq!(h["x-domain"], "Domain=sandbox.test");
    }
}
