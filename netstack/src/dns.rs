//! DNS messages for the filtering resolver: the one place a guest's query
//! or an upstream's answer becomes values (a canonical name, the addresses
//! an answer holds), and where the resolver's own messages are built: an
//! NXDOMAIN with an Extended DNS Error "Blocked" (RFC 8914), and an answer
//! rewritten without the records it must not pass on.
//!
//! Nothing here panics on any input: every read is bounds-checked, name
//! decoding follows at most `MAX_JUMPS` compression pointers and stops at
//! 255 bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::names::canonical_name;

const HEADER: usize = 12;
const MAX_JUMPS: usize = 32;
const MAX_WIRE_NAME: usize = 255;
pub const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const RCODE_NXDOMAIN: u8 = 3;
/// RFC 8914: EDNS option 15, info-code 15 "Blocked".
const EDE_OPTION: u16 = 15;
const EDE_BLOCKED: u16 = 15;
const EDE_TEXT: &[u8] = b"blocked by the sandbox's egress policy";

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// The labels of the name at `at` (following compression pointers), and
/// where the name ends in the message (after its first pointer, if any).
fn read_name(msg: &[u8], at: usize) -> Option<(Vec<Vec<u8>>, usize)> {
    let mut labels = Vec::new();
    let mut pos = at;
    let mut end = None;
    let mut jumps = 0;
    let mut total = 1;
    loop {
        let len = *msg.get(pos)?;
        match len & 0xc0 {
            0x00 if len == 0 => {
                return Some((labels, end.unwrap_or(pos + 1)));
            }
            0x00 => {
                let label = msg.get(pos + 1..pos + 1 + usize::from(len))?;
                total += label.len() + 1;
                if total > MAX_WIRE_NAME {
                    return None;
                }
                labels.push(label.to_vec());
                pos += 1 + usize::from(len);
            }
            0xc0 => {
                let target = usize::from(u16_at(msg, pos)? & 0x3fff);
                end.get_or_insert(pos + 2);
                jumps += 1;
                if jumps > MAX_JUMPS || target >= msg.len() {
                    return None;
                }
                pos = target;
            }
            _ => return None,
        }
    }
}

/// The labels as one canonical name (see `names::canonical_name`).
fn name_of(labels: &[Vec<u8>]) -> Option<String> {
    let joined: Vec<&str> = labels
        .iter()
        .map(|l| std::str::from_utf8(l).ok())
        .collect::<Option<_>>()?;
    canonical_name(&joined.join("."))
}

fn write_name(out: &mut Vec<u8>, labels: &[Vec<u8>]) {
    for l in labels {
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
}

/// A standard query for `name` (canonical: labels of at most 63 bytes)
/// of type `qtype`, class IN, recursion desired: how the stack asks its
/// upstream itself when it dials a name.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + name.len() + 6);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    let labels: Vec<Vec<u8>> = name
        .split('.')
        .filter(|l| !l.is_empty())
        .map(|l| l.as_bytes()[..l.len().min(63)].to_vec())
        .collect();
    write_name(&mut out, &labels);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out
}

/// A guest's query: one question, a standard query, not a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// The question's name, canonical; `None` when it is not a valid host
    /// name (which no name pattern can allow).
    pub name: Option<String>,
    pub qtype: u16,
    /// Where the question section ends.
    question_end: usize,
}

impl Query {
    pub fn parse(msg: &[u8]) -> Option<Query> {
        if msg.len() < HEADER {
            return None;
        }
        let flags = u16_at(msg, 2)?;
        let response = flags & 0x8000 != 0;
        let opcode = (flags >> 11) & 0xf;
        if response || opcode != 0 || u16_at(msg, 4)? != 1 {
            return None;
        }
        let (labels, end) = read_name(msg, HEADER)?;
        let qtype = u16_at(msg, end)?;
        u16_at(msg, end + 2)?;
        Some(Query {
            id: u16_at(msg, 0)?,
            name: name_of(&labels),
            qtype,
            question_end: end + 4,
        })
    }

    /// The resolver's answer to a query it will not forward: NXDOMAIN, the
    /// question echoed, and an EDNS OPT record carrying Extended DNS Error
    /// 15 "Blocked".
    pub fn blocked_reply(&self, msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.question_end + 64);
        out.extend_from_slice(&self.id.to_be_bytes());
        // QR, the query's opcode (0) and RD; RA; rcode NXDOMAIN.
        let rd = msg.get(2).map_or(0, |b| b & 0x01);
        out.push(0x80 | rd);
        out.push(0x80 | RCODE_NXDOMAIN);
        out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
        out.extend_from_slice(&msg[HEADER..self.question_end]);
        // OPT: root name, type 41, UDP size 1232, extended rcode/version/flags 0.
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&1232u16.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        let opt_len = 4 + 2 + EDE_TEXT.len();
        out.extend_from_slice(&(opt_len as u16).to_be_bytes());
        out.extend_from_slice(&EDE_OPTION.to_be_bytes());
        out.extend_from_slice(&((2 + EDE_TEXT.len()) as u16).to_be_bytes());
        out.extend_from_slice(&EDE_BLOCKED.to_be_bytes());
        out.extend_from_slice(EDE_TEXT);
        out
    }
}

/// What an upstream's answer says, as far as the resolver cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub id: u16,
    /// The question's name, canonical.
    pub name: Option<String>,
    /// Every A and AAAA record of the answer section, with its TTL.
    pub addresses: Vec<(IpAddr, u32)>,
}

struct Record {
    labels: Vec<Vec<u8>>,
    rtype: u16,
    class: u16,
    ttl: u32,
    rdata: std::ops::Range<usize>,
}

fn records(msg: &[u8], mut at: usize, count: u16) -> Option<(Vec<Record>, usize)> {
    let mut out = Vec::new();
    for _ in 0..count {
        let (labels, end) = read_name(msg, at)?;
        let rtype = u16_at(msg, end)?;
        let class = u16_at(msg, end + 2)?;
        let ttl = u32_at(msg, end + 4)?;
        let len = usize::from(u16_at(msg, end + 8)?);
        let start = end + 10;
        msg.get(start..start + len)?;
        out.push(Record {
            labels,
            rtype,
            class,
            ttl,
            rdata: start..start + len,
        });
        at = start + len;
    }
    Some((out, at))
}

fn address_of(msg: &[u8], r: &Record) -> Option<IpAddr> {
    let d = &msg[r.rdata.clone()];
    match (r.rtype, d.len()) {
        (TYPE_A, 4) => Some(IpAddr::V4(Ipv4Addr::new(d[0], d[1], d[2], d[3]))),
        (TYPE_AAAA, 16) => {
            let mut b = [0u8; 16];
            b.copy_from_slice(d);
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// A parsed response, kept for a rewrite.
struct Response {
    header: [u8; HEADER],
    question: Vec<Vec<u8>>,
    qtype_class: [u8; 4],
    answers: Vec<Record>,
}

fn parse_response(msg: &[u8]) -> Option<Response> {
    let header: [u8; HEADER] = msg.get(..HEADER)?.try_into().ok()?;
    if u16_at(msg, 2)? & 0x8000 == 0 || u16_at(msg, 4)? != 1 {
        return None;
    }
    let (question, end) = read_name(msg, HEADER)?;
    let qtype_class: [u8; 4] = msg.get(end..end + 4)?.try_into().ok()?;
    let (answers, _) = records(msg, end + 4, u16_at(msg, 6)?)?;
    Some(Response {
        header,
        question,
        qtype_class,
        answers,
    })
}

impl Answer {
    pub fn parse(msg: &[u8]) -> Option<Answer> {
        let r = parse_response(msg)?;
        Some(Answer {
            id: u16_at(&r.header, 0)?,
            name: name_of(&r.question),
            addresses: r
                .answers
                .iter()
                .filter_map(|rec| Some((address_of(msg, rec)?, rec.ttl)))
                .collect(),
        })
    }
}

/// The answer rewritten without the A and AAAA records `keep` refuses:
/// the question, the answer section's CNAME, A and AAAA records that stay
/// (names written out whole), no authority or additional records. `None`
/// when the message does not parse.
pub fn without_addresses(msg: &[u8], keep: impl Fn(IpAddr) -> bool) -> Option<Vec<u8>> {
    let r = parse_response(msg)?;
    let mut body = Vec::with_capacity(msg.len());
    write_name(&mut body, &r.question);
    body.extend_from_slice(&r.qtype_class);
    let mut kept = 0u16;
    for rec in &r.answers {
        let rdata: Vec<u8> = match rec.rtype {
            TYPE_A | TYPE_AAAA => match address_of(msg, rec) {
                Some(ip) if keep(ip) => msg[rec.rdata.clone()].to_vec(),
                _ => continue,
            },
            TYPE_CNAME => {
                let (target, _) = read_name(msg, rec.rdata.start)?;
                let mut d = Vec::new();
                write_name(&mut d, &target);
                d
            }
            // Other records may hold compressed names this rewrite would break.
            _ => continue,
        };
        write_name(&mut body, &rec.labels);
        body.extend_from_slice(&rec.rtype.to_be_bytes());
        body.extend_from_slice(&rec.class.to_be_bytes());
        body.extend_from_slice(&rec.ttl.to_be_bytes());
        body.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        body.extend_from_slice(&rdata);
        kept += 1;
    }
    let mut out = r.header.to_vec();
    out[4..6].copy_from_slice(&1u16.to_be_bytes());
    out[6..8].copy_from_slice(&kept.to_be_bytes());
    out[8..12].copy_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    /// A response to `query` with a CNAME (compressed) and the given addresses.
    fn response(query: &[u8], cname: Option<&str>, addrs: &[(IpAddr, u32)]) -> Vec<u8> {
        let mut r = query.to_vec();
        r[2] |= 0x80;
        r[3] = 0x80;
        let mut count = 0u16;
        let mut owner = vec![0xc0, 0x0c];
        if let Some(c) = cname {
            let at = r.len();
            r.extend_from_slice(&[0xc0, 0x0c, 0, 5, 0, 1, 0, 0, 0, 30]);
            let mut d = Vec::new();
            for l in c.split('.') {
                d.push(l.len() as u8);
                d.extend_from_slice(l.as_bytes());
            }
            d.push(0);
            r.extend_from_slice(&(d.len() as u16).to_be_bytes());
            let target_at = r.len();
            r.extend_from_slice(&d);
            owner = vec![0xc0 | (target_at >> 8) as u8, target_at as u8];
            let _ = at;
            count += 1;
        }
        for (ip, ttl) in addrs {
            r.extend_from_slice(&owner);
            let (t, data) = match ip {
                IpAddr::V4(a) => (TYPE_A, a.octets().to_vec()),
                IpAddr::V6(a) => (TYPE_AAAA, a.octets().to_vec()),
            };
            r.extend_from_slice(&t.to_be_bytes());
            r.extend_from_slice(&[0, 1]);
            r.extend_from_slice(&ttl.to_be_bytes());
            r.extend_from_slice(&(data.len() as u16).to_be_bytes());
            r.extend_from_slice(&data);
            count += 1;
        }
        r[6..8].copy_from_slice(&count.to_be_bytes());
        r
    }

    #[test]
    fn a_query_gives_its_canonical_name() {
        let q = Query::parse(&query(7, "WWW.Example.Test", 1)).unwrap();
        assert_eq!(
            (q.id, q.name.as_deref(), q.qtype),
            (7, Some("www.example.test"), 1)
        );
        let odd = Query::parse(&query(8, "under_score.test", 28)).unwrap();
        assert_eq!(odd.name, None);
        let mut resp = query(9, "a.test", 1);
        resp[2] |= 0x80;
        assert_eq!(Query::parse(&resp), None);
        assert_eq!(Query::parse(&[0; 11]), None);
    }

    #[test]
    fn a_blocked_reply_is_nxdomain_with_ede_15() {
        let raw = query(0x1234, "evil.test", 1);
        let q = Query::parse(&raw).unwrap();
        let r = q.blocked_reply(&raw);
        assert_eq!(&r[0..2], &[0x12, 0x34]);
        assert_eq!(r[2] & 0x80, 0x80, "a response");
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN);
        assert_eq!(u16_at(&r, 4), Some(1));
        assert_eq!(u16_at(&r, 10), Some(1), "one additional record: OPT");
        let (labels, end) = read_name(&r, HEADER).unwrap();
        assert_eq!(name_of(&labels).as_deref(), Some("evil.test"));
        let opt = end + 4;
        assert_eq!(u16_at(&r, opt + 1), Some(TYPE_OPT));
        assert_eq!(u16_at(&r, opt + 11), Some(EDE_OPTION));
        assert_eq!(u16_at(&r, opt + 15), Some(EDE_BLOCKED));
    }

    #[test]
    fn answers_give_their_addresses_and_lose_the_refused_ones() {
        let q = query(1, "app.example.test", 1);
        let public: IpAddr = "198.51.100.7".parse().unwrap();
        let internal: IpAddr = "10.1.2.3".parse().unwrap();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        let r = response(
            &q,
            Some("edge.example.test"),
            &[(internal, 300), (public, 5), (v6, 60)],
        );
        let a = Answer::parse(&r).unwrap();
        assert_eq!(a.name.as_deref(), Some("app.example.test"));
        assert_eq!(a.addresses, [(internal, 300), (public, 5), (v6, 60)]);
        let clean = without_addresses(&r, |ip| ip != internal).unwrap();
        let b = Answer::parse(&clean).unwrap();
        assert_eq!(b.addresses, [(public, 5), (v6, 60)]);
        assert_eq!(b.id, 1);
        // The CNAME survives, written out whole.
        assert_eq!(u16_at(&clean, 6), Some(3));
    }

    #[test]
    fn hostile_messages_never_panic() {
        let q = query(1, "a.test", 1);
        let r = response(&q, Some("b.test"), &[("192.0.2.1".parse().unwrap(), 1)]);
        for cut in 0..r.len() {
            let _ = Answer::parse(&r[..cut]);
            let _ = without_addresses(&r[..cut], |_| false);
            let _ = Query::parse(&r[..cut]);
        }
        // A pointer loop.
        let mut looped = q.clone();
        looped[HEADER] = 0xc0;
        looped[HEADER + 1] = HEADER as u8;
        assert_eq!(Query::parse(&looped), None);
        for i in 0..r.len() {
            let mut m = r.clone();
            m[i] ^= 0xff;
            let _ = Answer::parse(&m);
            let _ = without_addresses(&m, |_| true);
        }
    }
}
