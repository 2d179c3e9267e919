//! Names in an egress policy (E2B's domains in `allowOut`): `example.com`
//! (that name only), `*.example.com` (its subdomains at any depth, not the
//! apex) and `*` (every name). Hostile text becomes a `NamePattern` here and
//! nowhere else; everything after sees only validated, lower-cased names.

use std::fmt;

/// The longest name DNS carries, without the trailing dot (RFC 1035).
pub const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// One allowed-name entry, validated and lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamePattern {
    /// `*`: every name.
    Any,
    /// `example.com`: that name only.
    Exact(String),
    /// `*.example.com`: names under `example.com` (stored without `*.`).
    Subdomains(String),
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Any => f.write_str("*"),
            NamePattern::Exact(n) => f.write_str(n),
            NamePattern::Subdomains(n) => write!(f, "*.{n}"),
        }
    }
}

impl NamePattern {
    /// A pattern from an `allowOut` entry: `None` when it is not one (an
    /// address, a CIDR, or neither).
    pub fn parse(raw: &str) -> Option<NamePattern> {
        let s = raw.trim();
        if s == "*" {
            return Some(NamePattern::Any);
        }
        if let Some(rest) = s.strip_prefix("*.") {
            return canonical_name(rest).map(NamePattern::Subdomains);
        }
        // An address is never a name (`1.2.3.4` is all LDH labels).
        if s.parse::<std::net::IpAddr>().is_ok() || s.contains('/') {
            return None;
        }
        canonical_name(s).map(NamePattern::Exact)
    }

    /// Whether `name` (already canonical: see `canonical_name`) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Any => true,
            NamePattern::Exact(n) => n == name,
            NamePattern::Subdomains(apex) => name
                .strip_suffix(apex.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

/// A name as DNS and the policy compare it: lower-cased, no trailing dot,
/// letters, digits and inner hyphens in labels of 1 to 63 bytes, at most
/// 253 bytes in all, and not all digits in its last label (that is an
/// address). `None` for anything else.
pub fn canonical_name(raw: &str) -> Option<String> {
    let s = raw.strip_suffix('.').unwrap_or(raw);
    if s.is_empty() || s.len() > MAX_NAME || !s.is_ascii() {
        return None;
    }
    let name = s.to_ascii_lowercase();
    let mut labels = name.split('.').peekable();
    while let Some(label) = labels.next() {
        let ok = (1..=MAX_LABEL).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return None;
        }
        if labels.peek().is_none() && label.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    Some(name)
}

/// The allowed names of one policy.
#[derive(Debug, Clone, Default)]
pub struct NameSet {
    patterns: Vec<NamePattern>,
}

impl NameSet {
    pub fn push(&mut self, p: NamePattern) {
        if !self.patterns.contains(&p) {
            self.patterns.push(p);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The pattern that allows `name` (canonical), the most specific first:
    /// an exact name, then the longest `*.` suffix, then `*`.
    pub fn allows(&self, name: &str) -> Option<&NamePattern> {
        let rank = |p: &NamePattern| match p {
            NamePattern::Exact(n) => (2, n.len()),
            NamePattern::Subdomains(n) => (1, n.len()),
            NamePattern::Any => (0, 0),
        };
        self.patterns
            .iter()
            .filter(|p| p.matches(name))
            .max_by_key(|p| rank(p))
    }

    pub fn iter(&self) -> impl Iterator<Item = &NamePattern> {
        self.patterns.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_become_patterns_or_are_not_names() {
        let rows = [
            ("example.com", Some("example.com")),
            ("Example.COM.", Some("example.com")),
            ("  api.example.com ", Some("api.example.com")),
            ("*.example.com", Some("*.example.com")),
            ("*.Example.com.", Some("*.example.com")),
            ("*", Some("*")),
            ("x-1.y2.test", Some("x-1.y2.test")),
            ("localhost", Some("localhost")),
            ("192.0.2.1", None),
            ("2001:db8::1", None),
            ("192.0.2.0/24", None),
            ("1.2.3.4.5", None),
            ("", None),
            (".", None),
            ("a..b", None),
            ("-a.test", None),
            ("a-.test", None),
            ("a_b.test", None),
            ("*example.com", None),
            ("**.example.com", None),
            ("*.*.example.com", None),
            ("a.*.example.com", None),
            ("exämple.com", None),
            ("a b.test", None),
            ("ALL_TRAFFIC", None),
        ];
        for (raw, want) in rows {
            let got = NamePattern::parse(raw).map(|p| p.to_string());
            assert_eq!(got.as_deref(), want, "entry {raw:?}");
        }
        let long_label = format!("{}.test", "a".repeat(64));
        assert_eq!(NamePattern::parse(&long_label), None);
        let ok_label = format!("{}.test", "a".repeat(63));
        assert!(NamePattern::parse(&ok_label).is_some());
        let long_name = vec!["a".repeat(63); 4].join(".") + ".x"; // 257 bytes
        assert_eq!(NamePattern::parse(&long_name), None);
        let max_name = vec!["a".repeat(63); 3].join(".") + "." + &"b".repeat(61); // 253
        assert!(NamePattern::parse(&max_name).is_some());
    }

    #[test]
    fn subdomain_patterns_match_at_any_depth_but_not_the_apex() {
        let sub = NamePattern::parse("*.example.com").unwrap();
        for (name, want) in [
            ("api.example.com", true),
            ("a.b.example.com", true),
            ("example.com", false),
            ("badexample.com", false),
            ("example.com.evil.test", false),
            (".example.com", false),
        ] {
            assert_eq!(sub.matches(name), want, "{name}");
        }
    }

    #[test]
    fn the_most_specific_pattern_is_named() {
        let mut set = NameSet::default();
        for p in ["*", "*.example.com", "*.api.example.com", "api.example.com"] {
            set.push(NamePattern::parse(p).unwrap());
        }
        let named = |n: &str| set.allows(n).map(|p| p.to_string());
        assert_eq!(named("api.example.com").as_deref(), Some("api.example.com"));
        assert_eq!(
            named("v1.api.example.com").as_deref(),
            Some("*.api.example.com")
        );
        assert_eq!(named("www.example.com").as_deref(), Some("*.example.com"));
        assert_eq!(named("other.test").as_deref(), Some("*"));
        let mut none = NameSet::default();
        none.push(NamePattern::parse("example.com").unwrap());
        assert_eq!(none.allows("www.example.com"), None);
    }
}
