//! Header injection's request rewrite (`inject::rewrite`), with rules
//! parsed from arbitrary flags and a request head with arbitrary hosts,
//! target and headers. The promise: a secret's value leaves in a head only
//! when the stack matched a rule for the flow's SNI and every authority the
//! request named is that SNI; it leaves only in a header its rule sets,
//! once; the head that leaves names no other host. Rules parse without
//! panicking whatever the text.

use arbitrary::{Arbitrary, Unstructured};
use inject::rewrite::{rewrite, Flow, Protocol, Refusal};
use inject::{HeaderRules, SecretStore};
use netstack::names::{canonical_name, NamePattern};
use netstack::policy::{EgressPolicy, PolicySpec};

use super::input::{List, Text};

/// Names from a small pool, so that rules, SNIs and hosts meet; or any text.
#[derive(Arbitrary, Debug)]
enum Name {
    Pool(u8),
    Raw(Text),
}

const POOL: &[&str] = &[
    "api.example.test",
    "API.Example.Test",
    "v1.api.example.test",
    "example.test",
    "evil.test",
    "api.example.test.evil.test",
    "*.example.test",
    "*.api.example.test",
    "*",
    "api.example.test:443",
    "api.example.test:8443",
    "user@api.example.test",
];

impl Name {
    fn text(&self) -> String {
        match self {
            Name::Pool(i) => POOL[usize::from(*i) % POOL.len()].to_string(),
            Name::Raw(t) => t.0.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Value {
    Secret(bool),
    Text(Text),
    /// A placeholder of a secret no one set.
    Unknown,
}

#[derive(Arbitrary, Debug)]
struct RuleFlag {
    domain: Name,
    header: Text,
    value: List<Value>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    rules: List<RuleFlag>,
    sni: Name,
    hosts: List<Name>,
    /// The request target: a path, or an absolute URI naming `Name`.
    absolute: Option<Name>,
    path: Text,
    headers: List<(Text, Value)>,
    port: u16,
    h2: bool,
}

/// Values nobody writes by accident; the fuzzer may still find them, and
/// then the guest sent them itself.
const SECRETS: [(&str, &str); 2] = [("K1", "s3cr3t-0ne-q7z"), ("K2", "s3cr3t-tw0-x9w")];

fn value_text(v: &[Value]) -> String {
    v.iter()
        .map(|p| match p {
            Value::Secret(first) => format!("${{e2b.secrets.{}}}", SECRETS[usize::from(!*first)].0),
            Value::Text(t) => t.0.clone(),
            Value::Unknown => "${e2b.secrets.NOPE}".into(),
        })
        .collect()
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let flags: Vec<String> = input
        .rules
        .iter()
        .map(|r| {
            format!(
                "{}={}: {}",
                r.domain.text(),
                r.header.0,
                value_text(&r.value)
            )
        })
        .collect();
    // Never a panic, whatever the flags; and the JSON form says the same.
    let Ok(rules) = HeaderRules::from_flags(&flags) else {
        return;
    };
    assert_eq!(
        HeaderRules::from_json(&rules.to_json()).as_ref(),
        Ok(&rules)
    );
    let secrets = SecretStore::new();
    for (name, value) in SECRETS {
        secrets.put(name, value.as_bytes().to_vec()).unwrap();
    }
    // The stack's part: every name allowed, the rules' keys in the policy.
    let spec = PolicySpec {
        allow_out: vec!["*".into()],
        deny_out: vec!["ALL_TRAFFIC".into()],
        ..PolicySpec::new()
    };
    let policy = EgressPolicy::from_spec(&spec)
        .unwrap()
        .with_intercepts(rules.keys());
    let Some(sni) = canonical_name(&input.sni.text()) else {
        return;
    };
    let Some(key) = policy.intercept_for(&sni).map(|k| k.to_string()) else {
        return;
    };
    let key_pattern = NamePattern::parse(&key).expect("a key the policy holds");
    assert!(key_pattern.matches(&sni), "key {key} for {sni}");

    let target = match &input.absolute {
        Some(n) => format!("https://{}/{}", n.text(), input.path.0),
        None => format!("/{}", input.path.0),
    };
    let mut b = http::Request::builder().uri(target);
    for h in input.hosts.iter() {
        b = b.header("host", h.text());
    }
    let mut guest_wrote = Vec::new();
    for (name, value) in input.headers.iter() {
        let v = match value {
            Value::Text(t) => t.0.clone(),
            other => value_text(std::slice::from_ref(other)),
        };
        guest_wrote.push(v.clone());
        b = b.header(name.0.as_str(), v);
    }
    let Ok(req) = b.body(()) else {
        return;
    };
    let (mut parts, ()) = req.into_parts();
    let before = format!("{:?} {:?}", parts.uri, parts.headers);
    let guest_sent_secret =
        |s: &str| before.contains(s) || guest_wrote.iter().any(|v| v.contains(s));
    let flow = Flow {
        name: &sni,
        rule: &key,
        port: input.port,
    };
    let proto = if input.h2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let rule = rules.rule(&key).expect("the key's rule");
    match rewrite(&mut parts, &flow, &rules, &secrets, proto) {
        Err(Refusal::Misdirected(_) | Refusal::Upgrade) => return,
        Err(Refusal::MissingSecret(s)) => {
            assert!(rule
                .headers
                .iter()
                .any(|h| h.value.secrets().any(|n| n == s)));
            return;
        }
        Ok(_) => {}
    }
    // What leaves names the SNI and nothing else.
    let named: Vec<String> = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .into_iter()
        .chain(
            parts
                .headers
                .get_all("host")
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        )
        .collect();
    assert!(!named.is_empty(), "the head names no host");
    for a in &named {
        let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
        let host = host.strip_suffix('.').unwrap_or(host);
        assert!(
            host.eq_ignore_ascii_case(&sni),
            "{a} leaves on a flow for {sni}"
        );
        assert!(!a.contains('@'), "{a}");
    }
    // A secret only in a header its rule sets, once.
    for (secret_name, value) in SECRETS {
        // The fuzzer learns the values (from comparisons) and may write
        // them itself: in the request, or as the text of a rule.
        let rule_wrote = rules
            .iter()
            .flat_map(|r| r.headers.iter())
            .any(|h| h.value.as_written().contains(value));
        if guest_sent_secret(value) || rule_wrote {
            continue;
        }
        for (name, v) in parts.headers.iter() {
            let holds = String::from_utf8_lossy(v.as_bytes()).contains(value);
            if !holds {
                continue;
            }
            let set_by_rule = rule
                .headers
                .iter()
                .any(|h| h.name == *name && h.value.secrets().any(|s| s == secret_name));
            assert!(
                set_by_rule,
                "{secret_name} in {name}, which its rule does not set"
            );
            assert!(v.is_sensitive());
            assert_eq!(parts.headers.get_all(name).iter().count(), 1);
        }
        assert!(!parts.uri.to_string().contains(value));
    }
    for h in &rule.headers {
        assert_eq!(
            parts.headers.get_all(&h.name).iter().count(),
            1,
            "{}",
            h.name
        );
    }
}

/// The committed seeds (`fuzz/seeds/header_rewrite/`, written by
/// `write_seeds`): a matching request over HTTP/1.1, one naming another
/// host, an absolute-form target over HTTP/2, a guest's own placeholder.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Field by field, as `Input` decodes: see `crate::input`.
    fn pool(e: &mut Enc, i: u8) {
        e.variant(0, 2).u8(i);
    }
    fn input(hosts: &[u8], absolute: Option<u8>, guest: (&str, Option<&str>), h2: bool) -> Vec<u8> {
        let mut e = Enc::default();
        e.u8(1); // one rule flag
        pool(&mut e, 6); // *.example.test
        e.text("Authorization");
        e.u8(2)
            .variant(1, 3)
            .text("Bearer ")
            .variant(0, 3)
            .bool(true);
        pool(&mut e, 0); // sni api.example.test
        e.u8(hosts.len() as u8);
        for h in hosts {
            pool(&mut e, *h);
        }
        match absolute {
            Some(n) => {
                e.bool(true);
                pool(&mut e, n);
            }
            None => {
                e.bool(false);
            }
        }
        e.text("v1/chat");
        e.u8(1).text(guest.0);
        match guest.1 {
            Some(t) => e.variant(1, 3).text(t),
            None => e.variant(0, 3).bool(false),
        };
        e.u16(443).bool(h2);
        e.0
    }
    vec![
        (
            "match-h1",
            input(&[0], None, ("Authorization", Some("mine")), false),
        ),
        (
            "foreign-host",
            input(&[4], None, ("Authorization", Some("mine")), false),
        ),
        ("absolute-h2", input(&[], Some(1), ("X-A", Some("b")), true)),
        (
            "guest-placeholder",
            input(&[0], None, ("X-Mine", None), false),
        ),
    ]
}

use crate::input::Enc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_decode_and_hold() {
        for (name, data) in seeds() {
            let input = Input::arbitrary(&mut Unstructured::new(&data)).expect(name);
            assert_eq!(input.rules.len(), 1, "{name}: {input:?}");
            assert_eq!(input.port, 443, "{name}: {input:?}");
            run(&data);
        }
    }

    #[test]
    fn mutated_seeds_keep_the_promise() {
        // A stand-in for the fuzzer in `cargo test`: each seed with bytes
        // flipped, cut and grown, deterministically.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for (_, seed) in seeds() {
            for _ in 0..3000 {
                let mut data = seed.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % data.len();
                    match next() % 3 {
                        0 => data[at] = next() as u8,
                        1 => data.truncate(at.max(1)),
                        _ => data.insert(at, next() as u8),
                    }
                }
                run(&data);
            }
        }
    }

    #[test]
    fn a_matching_request_gets_the_secret_and_a_foreign_one_does_not() {
        let rules =
            HeaderRules::from_flags(&["*.example.test=X-K: ${e2b.secrets.K1}".into()]).unwrap();
        let secrets = SecretStore::new();
        secrets.put("K1", b"v".to_vec()).unwrap();
        let flow = Flow {
            name: "api.example.test",
            rule: "*.example.test",
            port: 443,
        };
        let head = |host: &str| {
            http::Request::builder()
                .uri("/")
                .header("host", host)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let mut ok = head("api.example.test");
        assert_eq!(
            rewrite(&mut ok, &flow, &rules, &secrets, Protocol::Http1),
            Ok(true)
        );
        assert_eq!(ok.headers["x-k"], "v");
        let mut foreign = head("evil.test");
        assert!(matches!(
            rewrite(&mut foreign, &flow, &rules, &secrets, Protocol::Http1),
            Err(Refusal::Misdirected(_))
        ));
        assert!(foreign.headers.get("x-k").is_none());
    }
}
