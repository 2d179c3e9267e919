//! E2B's network `rules`: per-domain transforms of outbound HTTPS requests,
//! `{"api.example.com": [{"transform": {"headers": {"Authorization":
//! "Bearer ${e2b.secrets.KEY}"}}}]}`. Hostile JSON and flag text become a
//! `HeaderRules` here and nowhere else; every refusal names the domain, the
//! header and the offending input (short and printable), never a secret.

use std::collections::BTreeMap;
use std::fmt;

use http::HeaderName;
use netstack::names::NamePattern;
use netstack::EgressPolicy;
use serde_json::Value;

/// E2B's limits.
pub const MAX_DOMAINS: usize = 10;
pub const MAX_TRANSFORMS: usize = 1;
pub const MAX_HEADERS: usize = 20;
pub const MAX_VALUE_BYTES: usize = 2048;
/// The longest secret name a placeholder may hold.
pub const MAX_SECRET_NAME: usize = 128;

const PLACEHOLDER: &str = "${e2b.secrets.";

/// Headers a rule may not set: they frame the message or route it, and a
/// rule that set `Host` would send its secret wherever it pointed.
const FORBIDDEN: [&str; 10] = [
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "expect",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("invalid rules: {0}")]
    Shape(String),
    #[error("too many rule domains ({0}): at most {MAX_DOMAINS}")]
    TooManyDomains(usize),
    #[error("invalid rule domain {0}: give a name (api.example.com) or a wildcard (*.example.com); a bare * is not allowed")]
    InvalidDomain(String),
    #[error("rule domain {0} is given twice")]
    DuplicateDomain(String),
    #[error("rules for {domain}: {why}")]
    Rule { domain: String, why: String },
    #[error(
        "rules for {domain}: too many transforms ({count}): at most {MAX_TRANSFORMS} per domain"
    )]
    TooManyTransforms { domain: String, count: usize },
    #[error("rules for {domain}: too many headers ({count}): at most {MAX_HEADERS}")]
    TooManyHeaders { domain: String, count: usize },
    #[error("rules for {domain}: invalid header name {header}")]
    InvalidHeader { domain: String, header: String },
    #[error("rules for {domain}: header {header} cannot be set by a rule (it frames or routes the request)")]
    ForbiddenHeader { domain: String, header: String },
    #[error("rules for {domain}: header {header} is given twice")]
    DuplicateHeader { domain: String, header: String },
    #[error(
        "rules for {domain}: header {header}: the value is {len} bytes, at most {MAX_VALUE_BYTES}"
    )]
    ValueTooLong {
        domain: String,
        header: String,
        len: usize,
    },
    #[error("rules for {domain}: header {header}: the value holds a byte a header cannot carry (a control character)")]
    BadValue { domain: String, header: String },
    #[error("rules for {domain}: header {header}: malformed placeholder {placeholder}: write ${{e2b.secrets.NAME}} with NAME of letters, digits, '_', '-' or '.'")]
    BadPlaceholder {
        domain: String,
        header: String,
        placeholder: String,
    },
    #[error("rules for {domain}: header {header} uses secret {secret}, which is not set")]
    UnknownSecret {
        domain: String,
        header: String,
        secret: String,
    },
    #[error("rules for {0}: it covers no name allowOut allows by name (a rule applies only to names the policy allows by name, with all other traffic denied; it does not allow egress itself)")]
    NotAllowedByName(String),
}

pub type Result<T> = std::result::Result<T, RuleError>;

/// Hostile input shown in an error: short and printable.
pub fn echo(s: &str) -> String {
    let shown: String = s.chars().filter(|c| !c.is_control()).take(64).collect();
    if shown.is_empty() {
        "\"\"".into()
    } else {
        shown
    }
}

/// One piece of a header value as written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Secret(String),
}

/// A header value as a rule writes it: text and `${e2b.secrets.NAME}`
/// placeholders, resolved only when a request is sent.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    raw: String,
    parts: Vec<Part>,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The template holds no secret, only names of them.
        write!(f, "Template({:?})", self.raw)
    }
}

impl Template {
    /// `Err(placeholder)`: a `${e2b.secrets.` that is not a placeholder.
    fn parse(raw: &str) -> std::result::Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = raw;
        while let Some(at) = rest.find(PLACEHOLDER) {
            if at > 0 {
                parts.push(Part::Text(rest[..at].to_string()));
            }
            let after = &rest[at + PLACEHOLDER.len()..];
            let Some(end) = after.find('}') else {
                return Err(rest[at..].to_string());
            };
            let name = &after[..end];
            if !valid_secret_name(name) {
                return Err(rest[at..at + PLACEHOLDER.len() + end + 1].to_string());
            }
            parts.push(Part::Secret(name.to_string()));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template {
            raw: raw.to_string(),
            parts,
        })
    }

    /// As written, placeholders and all (never a secret's value).
    pub fn as_written(&self) -> &str {
        &self.raw
    }

    /// The secrets it names.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Secret(s) => Some(s.as_str()),
            Part::Text(_) => None,
        })
    }

    /// The value with every placeholder replaced by `lookup(name)`'s bytes,
    /// into `out`; `Err(name)` for a secret `lookup` does not have.
    pub fn expand_into<'a>(
        &'a self,
        out: &mut Vec<u8>,
        mut lookup: impl FnMut(&str) -> Option<&'a [u8]>,
    ) -> std::result::Result<(), &'a str> {
        for p in &self.parts {
            match p {
                Part::Text(t) => out.extend_from_slice(t.as_bytes()),
                Part::Secret(name) => out.extend_from_slice(lookup(name).ok_or(name.as_str())?),
            }
        }
        Ok(())
    }
}

/// A secret's name: 1 to 128 of letters, digits, `_`, `-` and `.`.
pub fn valid_secret_name(name: &str) -> bool {
    (1..=MAX_SECRET_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Whether `v` may stand in a header value: visible ASCII, space, tab and
/// bytes from 0x80 up (UTF-8); no CR, LF, NUL or other control byte.
pub fn valid_header_bytes(v: &[u8]) -> bool {
    v.iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80)
}

/// One header a rule sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRule {
    pub name: HeaderName,
    pub value: Template,
}

/// The transform of one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub key: NamePattern,
    pub headers: Vec<HeaderRule>,
}

/// A sandbox's validated rules, by key (`api.example.com`, `*.example.com`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRules {
    rules: BTreeMap<String, Rule>,
}

/// Rules as given, before validation: domain → transforms → headers.
type Raw = Vec<(String, Vec<Vec<(String, String)>>)>;

impl HeaderRules {
    /// E2B's JSON shape.
    pub fn from_json(v: &Value) -> Result<HeaderRules> {
        let Value::Object(domains) = v else {
            return Err(RuleError::Shape(
                "rules must be an object of domain → list of rules".into(),
            ));
        };
        if domains.len() > MAX_DOMAINS {
            return Err(RuleError::TooManyDomains(domains.len()));
        }
        let mut raw: Raw = Vec::new();
        for (domain, list) in domains {
            let shown = echo(domain);
            let bad = |why: &str| RuleError::Rule {
                domain: shown.clone(),
                why: why.to_string(),
            };
            let Value::Array(list) = list else {
                return Err(bad("expected a list of rules"));
            };
            if list.len() > MAX_TRANSFORMS {
                return Err(RuleError::TooManyTransforms {
                    domain: shown,
                    count: list.len(),
                });
            }
            let mut transforms = Vec::new();
            for rule in list {
                let Value::Object(rule) = rule else {
                    return Err(bad("a rule must be an object {\"transform\": …}"));
                };
                if let Some(k) = rule.keys().find(|k| *k != "transform") {
                    return Err(bad(&format!("unknown field {} in a rule", echo(k))));
                }
                let Some(Value::Object(transform)) = rule.get("transform") else {
                    return Err(bad("a rule needs a transform object"));
                };
                if let Some(k) = transform.keys().find(|k| *k != "headers") {
                    return Err(bad(&format!("unknown field {} in a transform", echo(k))));
                }
                let Some(Value::Object(headers)) = transform.get("headers") else {
                    return Err(bad("a transform needs a headers object"));
                };
                let mut pairs = Vec::new();
                for (name, value) in headers {
                    let Value::String(value) = value else {
                        return Err(bad(&format!(
                            "header {}: the value must be a string",
                            echo(name)
                        )));
                    };
                    pairs.push((name.clone(), value.clone()));
                }
                transforms.push(pairs);
            }
            // A domain with no transform (E2B's `[]`) has nothing to apply.
            if !transforms.is_empty() {
                raw.push((domain.clone(), transforms));
            }
        }
        Self::validate(raw)
    }

    /// `--header-rule 'NAME=Header: value'` flags: one header each; flags
    /// with the same NAME add headers to that name's transform.
    pub fn from_flags(flags: &[String]) -> Result<HeaderRules> {
        let mut raw: Raw = Vec::new();
        for flag in flags {
            let bad = || {
                RuleError::Shape(format!(
                    "--header-rule {}: write NAME=Header: value",
                    echo(flag)
                ))
            };
            let (domain, header) = flag.split_once('=').ok_or_else(bad)?;
            let (name, value) = header.split_once(':').ok_or_else(bad)?;
            let pair = (name.trim().to_string(), value.trim_start().to_string());
            let domain = domain.trim().to_string();
            match raw.iter_mut().find(|(d, _)| *d == domain) {
                Some((_, transforms)) => transforms[0].push(pair),
                None => raw.push((domain, vec![vec![pair]])),
            }
        }
        if raw.len() > MAX_DOMAINS {
            return Err(RuleError::TooManyDomains(raw.len()));
        }
        Self::validate(raw)
    }

    fn validate(raw: Raw) -> Result<HeaderRules> {
        let mut rules = BTreeMap::new();
        for (domain, transforms) in raw {
            let key = rule_key(&domain)?;
            let shown = key.to_string();
            if rules.contains_key(&shown) {
                return Err(RuleError::DuplicateDomain(shown));
            }
            let Some(pairs) = transforms.into_iter().next() else {
                return Err(RuleError::Rule {
                    domain: shown,
                    why: "the list of rules is empty".into(),
                });
            };
            let headers = headers(&shown, pairs)?;
            rules.insert(shown, Rule { key, headers });
        }
        Ok(HeaderRules { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The keys, for the stack's policy (`EgressPolicy::with_intercepts`).
    pub fn keys(&self) -> Vec<NamePattern> {
        self.rules.values().map(|r| r.key.clone()).collect()
    }

    /// The rule with this key, as the stack names it.
    pub fn rule(&self, key: &str) -> Option<&Rule> {
        self.rules.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.values()
    }

    /// Every secret the rules name.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        self.rules
            .values()
            .flat_map(|r| r.headers.iter().flat_map(|h| h.value.secrets()))
    }

    /// Each placeholder must name a secret `known` has: a placeholder that
    /// names none is refused now, never sent as text.
    pub fn check_secrets(&self, known: impl Fn(&str) -> bool) -> Result<()> {
        for rule in self.rules.values() {
            for h in &rule.headers {
                if let Some(s) = h.value.secrets().find(|s| !known(s)) {
                    return Err(RuleError::UnknownSecret {
                        domain: rule.key.to_string(),
                        header: h.name.to_string(),
                        secret: s.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Each key must overlap a name the policy allows by name: only such
    /// flows are ever read for a name (CIDR-allowed ones are spliced
    /// unread), so any other rule would silently never apply.
    pub fn check_allowed(&self, policy: &EgressPolicy) -> Result<()> {
        for rule in self.rules.values() {
            let allowed = policy.names().iter().any(|p| overlaps(&rule.key, p));
            if !allowed {
                return Err(RuleError::NotAllowedByName(rule.key.to_string()));
            }
        }
        Ok(())
    }

    /// E2B's JSON shape, values as written (placeholders, never secrets).
    pub fn to_json(&self) -> Value {
        let mut domains = serde_json::Map::new();
        for (key, rule) in &self.rules {
            let mut headers = serde_json::Map::new();
            for h in &rule.headers {
                headers.insert(
                    h.name.to_string(),
                    Value::String(h.value.as_written().to_string()),
                );
            }
            let transform = serde_json::json!([{ "transform": { "headers": headers } }]);
            domains.insert(key.clone(), transform);
        }
        Value::Object(domains)
    }
}

/// A rule's domain: an exact name or a `*.` wildcard, lower-cased.
fn rule_key(domain: &str) -> Result<NamePattern> {
    match NamePattern::parse(domain) {
        Some(p @ (NamePattern::Exact(_) | NamePattern::Subdomains(_))) => Ok(p),
        _ => Err(RuleError::InvalidDomain(echo(domain))),
    }
}

fn headers(domain: &str, pairs: Vec<(String, String)>) -> Result<Vec<HeaderRule>> {
    if pairs.is_empty() {
        return Err(RuleError::Rule {
            domain: domain.to_string(),
            why: "a transform sets no header".into(),
        });
    }
    if pairs.len() > MAX_HEADERS {
        return Err(RuleError::TooManyHeaders {
            domain: domain.to_string(),
            count: pairs.len(),
        });
    }
    let mut out: Vec<HeaderRule> = Vec::new();
    for (name, value) in pairs {
        let shown = echo(&name);
        let err_header = || (domain.to_string(), shown.clone());
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            let (domain, header) = err_header();
            RuleError::InvalidHeader { domain, header }
        })?;
        if FORBIDDEN.contains(&header.as_str()) {
            let (domain, header) = err_header();
            return Err(RuleError::ForbiddenHeader { domain, header });
        }
        if out.iter().any(|h| h.name == header) {
            let (domain, header) = err_header();
            return Err(RuleError::DuplicateHeader { domain, header });
        }
        if value.len() > MAX_VALUE_BYTES {
            let (domain, header) = err_header();
            return Err(RuleError::ValueTooLong {
                domain,
                header,
                len: value.len(),
            });
        }
        if !valid_header_bytes(value.as_bytes()) {
            let (domain, header) = err_header();
            return Err(RuleError::BadValue { domain, header });
        }
        let template = Template::parse(&value).map_err(|placeholder| {
            let (domain, header) = err_header();
            RuleError::BadPlaceholder {
                domain,
                header,
                placeholder: echo(&placeholder),
            }
        })?;
        out.push(HeaderRule {
            name: header,
            value: template,
        });
    }
    // One order whatever the source (a JSON object's keys come sorted), so
    // that equal rules compare equal.
    out.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
    Ok(out)
}

/// Whether some name matches both patterns.
fn overlaps(a: &NamePattern, b: &NamePattern) -> bool {
    use NamePattern::*;
    let under = |name: &str, apex: &str| {
        name.strip_suffix(apex)
            .is_some_and(|head| head.ends_with('.') && head.len() > 1)
    };
    match (a, b) {
        (Any, _) | (_, Any) => true,
        (Exact(x), Exact(y)) => x == y,
        (Exact(n), Subdomains(s)) | (Subdomains(s), Exact(n)) => under(n, s),
        (Subdomains(x), Subdomains(y)) => x == y || under(x, y) || under(y, x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> std::result::Result<HeaderRules, String> {
        HeaderRules::from_json(&v).map_err(|e| e.to_string())
    }

    #[test]
    fn e2b_shape_parses_and_keys_are_lower_cased() {
        let rules = parse(json!({
            "API.Example.com": [{"transform": {"headers": {
                "Authorization": "Bearer ${e2b.secrets.OPENAI_KEY}",
                "X-Team": "t-1"
            }}}],
            "*.example.org": [{"transform": {"headers": {"X-A": "b"}}}]
        }))
        .unwrap();
        let keys: Vec<String> = rules.keys().iter().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["*.example.org", "api.example.com"]);
        let rule = rules.rule("api.example.com").unwrap();
        assert_eq!(rule.headers[0].name, "authorization");
        let secrets: Vec<&str> = rules.secrets().collect();
        assert_eq!(secrets, ["OPENAI_KEY"]);
        // GET answers with the rules as written.
        let back = rules.to_json();
        assert_eq!(
            back["api.example.com"][0]["transform"]["headers"]["authorization"],
            "Bearer ${e2b.secrets.OPENAI_KEY}"
        );
        assert_eq!(HeaderRules::from_json(&back).unwrap(), rules);
    }

    #[test]
    fn refusals_name_the_domain_the_header_and_the_input() {
        let h = |k: &str, v: &str| json!([{"transform": {"headers": {k: v}}}]);
        let many_headers: serde_json::Map<String, Value> = (0..21)
            .map(|i| (format!("X-{i}"), Value::String("v".into())))
            .collect();
        let many_domains: serde_json::Map<String, Value> = (0..11)
            .map(|i| (format!("d{i}.example.com"), h("X-A", "b")))
            .collect();
        let rows: Vec<(Value, &str)> = vec![
            (json!({"*": h("X-A", "b")}), "invalid rule domain *: "),
            (json!({"*.": h("X-A", "b")}), "invalid rule domain *.: "),
            (
                json!({"192.0.2.1": h("X-A", "b")}),
                "invalid rule domain 192.0.2.1",
            ),
            (json!({"a..b": h("X-A", "b")}), "invalid rule domain a..b"),
            (json!({"": h("X-A", "b")}), "invalid rule domain \"\""),
            (
                json!({"a.test": h("X-A", "b"), "A.test.": h("X-B", "c")}),
                "rule domain a.test is given twice",
            ),
            (
                Value::Object(many_domains),
                "too many rule domains (11): at most 10",
            ),
            (
                json!({"a.test": [{"transform": {"headers": many_headers}}]}),
                "rules for a.test: too many headers (21): at most 20",
            ),
            (
                json!({"a.test": [{"transform": {"headers": {"X": "1"}}}, {"transform": {"headers": {"Y": "2"}}}]}),
                "too many transforms (2): at most 1",
            ),
            (
                json!({"a.test": h("Bad Header", "b")}),
                "rules for a.test: invalid header name Bad Header",
            ),
            (
                json!({"a.test": h("Host", "evil.test")}),
                "rules for a.test: header Host cannot be set",
            ),
            (
                json!({"a.test": h("X-A", &"v".repeat(2049))}),
                "header X-A: the value is 2049 bytes, at most 2048",
            ),
            (
                json!({"a.test": h("X-A", "a\r\nEvil: 1")}),
                "header X-A: the value holds a byte a header cannot carry",
            ),
            (
                json!({"a.test": h("X-A", "${e2b.secrets.KEY")}),
                "malformed placeholder ${e2b.secrets.KEY",
            ),
            (
                json!({"a.test": h("X-A", "${e2b.secrets.}")}),
                "malformed placeholder ${e2b.secrets.}",
            ),
            (
                json!({"a.test": h("X-A", "${e2b.secrets.a b}")}),
                "malformed placeholder ${e2b.secrets.a b}",
            ),
            (
                json!({"a.test": [{"transform": {"headers": {}}}]}),
                "rules for a.test: a transform sets no header",
            ),
            (
                json!({"a.test": [{"transform": {"body": {}}}]}),
                "unknown field body in a transform",
            ),
            (
                json!({"a.test": [{"match": 1, "transform": {}}]}),
                "unknown field match in a rule",
            ),
            (
                json!({"a.test": [{"transform": {"headers": {"X": 1}}}]}),
                "header X: the value must be a string",
            ),
            (
                json!({"a.test": "x"}),
                "rules for a.test: expected a list of rules",
            ),
            (json!(["a.test"]), "rules must be an object"),
        ];
        for (v, want) in rows {
            let got = parse(v.clone()).expect_err(&v.to_string());
            assert!(got.contains(want), "{v}: got {got:?}, want {want:?}");
        }
        // E2B's empty list for a domain: no rule, nothing to intercept.
        assert!(parse(json!({"a.test": []})).unwrap().is_empty());
        let dup = HeaderRules::from_flags(&["a.test=X-A: 1".into(), "a.test=x-a: 2".into()]);
        assert_eq!(
            dup.unwrap_err().to_string(),
            "rules for a.test: header x-a is given twice"
        );
    }

    #[test]
    fn limits_are_inclusive() {
        let headers: serde_json::Map<String, Value> = (0..20)
            .map(|i| (format!("X-{i}"), Value::String("v".repeat(2048))))
            .collect();
        let mut domains = serde_json::Map::new();
        for i in 0..10 {
            domains.insert(
                format!("d{i}.example.com"),
                json!([{"transform": {"headers": headers.clone()}}]),
            );
        }
        let rules = HeaderRules::from_json(&Value::Object(domains)).unwrap();
        assert_eq!(rules.keys().len(), 10);
    }

    #[test]
    fn flags_add_headers_to_their_names_transform() {
        let rules = HeaderRules::from_flags(&[
            "api.example.com=Authorization: Bearer ${e2b.secrets.K}".into(),
            "api.example.com=X-Org:org-1".into(),
            "*.example.org=X-A: a: b".into(),
        ])
        .unwrap();
        let api = rules.rule("api.example.com").unwrap();
        let got: Vec<(String, &str)> = api
            .headers
            .iter()
            .map(|h| (h.name.to_string(), h.value.as_written()))
            .collect();
        assert_eq!(
            got,
            [
                ("authorization".into(), "Bearer ${e2b.secrets.K}"),
                ("x-org".into(), "org-1")
            ]
        );
        let org = rules.rule("*.example.org").unwrap();
        assert_eq!(org.headers[0].value.as_written(), "a: b");
        for bad in ["api.example.com", "api.example.com=NoColon", "*=X: 1"] {
            assert!(HeaderRules::from_flags(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn placeholders_expand_only_from_the_lookup_and_unknown_ones_are_refused() {
        let rules = HeaderRules::from_flags(&[
            "a.test=X-A: k=${e2b.secrets.ONE}&${e2b.secrets.TWO}${x}".into(),
        ])
        .unwrap();
        let t = &rules.rule("a.test").unwrap().headers[0].value;
        let mut out = Vec::new();
        t.expand_into(&mut out, |n| match n {
            "ONE" => Some(b"1".as_slice()),
            "TWO" => Some(b"2".as_slice()),
            _ => None,
        })
        .unwrap();
        assert_eq!(out, b"k=1&2${x}");
        let mut out = Vec::new();
        assert_eq!(t.expand_into(&mut out, |_| None), Err("ONE"));
        let err = rules.check_secrets(|n| n == "ONE").unwrap_err();
        assert_eq!(
            err.to_string(),
            "rules for a.test: header x-a uses secret TWO, which is not set"
        );
        assert!(rules.check_secrets(|_| true).is_ok());
        assert!(!format!("{t:?}").contains("1&2"));
    }

    #[test]
    fn a_rule_must_fall_under_a_name_the_policy_allows() {
        let policy = |allow: &[&str]| {
            let spec = netstack::PolicySpec {
                allow_out: allow.iter().map(|s| s.to_string()).collect(),
                deny_out: vec!["ALL_TRAFFIC".into()],
                ..netstack::PolicySpec::new()
            };
            EgressPolicy::from_spec(&spec).unwrap()
        };
        let rows = [
            ("api.example.com", &["api.example.com"][..], true),
            ("api.example.com", &["*.example.com"], true),
            ("api.example.com", &["*"], true),
            ("*.example.com", &["api.example.com"], true),
            ("*.api.example.com", &["*.example.com"], true),
            ("*.example.com", &["*.api.example.com"], true),
            ("api.example.com", &["example.com"], false),
            ("*.example.com", &["example.com"], false),
            ("api.example.com", &["198.51.100.7"], false),
        ];
        for (key, allow, ok) in rows {
            let rules = HeaderRules::from_flags(&[format!("{key}=X-A: 1")]).unwrap();
            assert_eq!(
                rules.check_allowed(&policy(allow)).is_ok(),
                ok,
                "{key} under {allow:?}"
            );
        }
    }

    #[test]
    fn hostile_json_never_panics() {
        // A small deterministic generator over JSON-ish text.
        let alphabet = br#"{}[]":,${e2b.secrets}*. aA-_\u0000x01"#;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 80) as usize;
            let text: Vec<u8> = (0..len)
                .map(|i| alphabet[((seed >> (i % 50)) as usize + i * 7) % alphabet.len()])
                .collect();
            if let Ok(v) = serde_json::from_slice::<Value>(&text) {
                let _ = HeaderRules::from_json(&v);
            }
            let _ = HeaderRules::from_flags(&[String::from_utf8_lossy(&text).into_owned()]);
        }
    }
}
