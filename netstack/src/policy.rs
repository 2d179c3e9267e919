//! The egress policy of one sandbox: for each new flow, may the guest reach `dst`?
//! E2B semantics (`allow_out` beats `deny_out`, `ALL_TRAFFIC`, `allow_internet_access`) on top of
//! the host's internal ranges, which stay denied unless the operator opens a hole.

use std::cmp::Reverse;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::names::{NamePattern, NameSet};

pub type Result<T> = std::result::Result<T, PolicyError>;

/// The E2B literal meaning every destination, IPv4 and IPv6.
pub const ALL_TRAFFIC: &str = "ALL_TRAFFIC";

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    #[error("invalid denied CIDR {0}")]
    InvalidDenied(String),
    #[error("invalid allowed address {0}")]
    InvalidAllowed(String),
    #[error("invalid internal CIDR {0}")]
    InvalidInternal(String),
    /// E2B's words for a name in `allowOut` while other traffic is allowed.
    #[error("When specifying allowed domains in allow out, you must include 'ALL_TRAFFIC' in deny out to block all other traffic.")]
    NamesNeedAllTrafficDenied,
}

/// What the sandbox asked for (E2B fields) plus the operator's overrides.
#[derive(Debug, Clone)]
pub struct PolicySpec {
    /// Addresses, CIDRs, `ALL_TRAFFIC`, or names (`example.com`,
    /// `*.example.com`, `*`); a match here beats any `deny_out`. Names need
    /// all other traffic denied.
    pub allow_out: Vec<String>,
    /// Addresses, CIDRs or `ALL_TRAFFIC`.
    pub deny_out: Vec<String>,
    /// `false` replaces `deny_out` with all traffic; `allow_out` still applies.
    pub allow_internet_access: bool,
    /// Operator only: addresses or CIDRs taken out of the always-denied internal ranges.
    pub allow_internal: Vec<String>,
}

impl PolicySpec {
    /// E2B's default: internet on, no lists.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Default for PolicySpec {
    fn default() -> Self {
        Self {
            allow_out: Vec::new(),
            deny_out: Vec::new(),
            allow_internet_access: true,
            allow_internal: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The rule that decided, for the flow log.
    pub rule: Rule,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// One of the always-denied internal ranges.
    Internal(IpNet),
    AllowOut(IpNet),
    DenyOut(IpNet),
    /// `deny_out` held `ALL_TRAFFIC` or `0.0.0.0/0`, or `allow_internet_access` was false.
    AllTrafficDenied,
    /// `allow_out` held `ALL_TRAFFIC` or `0.0.0.0/0`.
    AllTrafficAllowed,
    /// No rule matched.
    Default,
    /// An operator-chosen internal destination that no rule matched.
    OperatorExempt,
    /// An address an allowed name resolved to (through the stack's resolver).
    DnsPin,
    /// The stack's filtering resolver forwarding an allowed name's query.
    Resolver,
    /// An allowed name in the flow's TLS SNI: the host dialed the name.
    Sni,
    /// An allowed name in the flow's HTTP Host: the host dialed the name.
    HttpHost,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Internal(net) => write!(f, "internal {net}"),
            Rule::AllowOut(net) => write!(f, "allow_out {net}"),
            Rule::DenyOut(net) => write!(f, "deny_out {net}"),
            Rule::AllTrafficDenied => write!(f, "deny_out {ALL_TRAFFIC}"),
            Rule::AllTrafficAllowed => write!(f, "allow_out {ALL_TRAFFIC}"),
            Rule::Default => f.write_str("default allow"),
            Rule::OperatorExempt => f.write_str("operator exempt"),
            Rule::DnsPin => f.write_str("dns pin"),
            Rule::Resolver => f.write_str("filtering resolver"),
            Rule::Sni => f.write_str("domain (sni)"),
            Rule::HttpHost => f.write_str("domain (host)"),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = if self.allowed { "allow" } else { "deny" };
        write!(f, "{word} ({})", self.rule)
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(first: u16, last: u16, len: u8) -> Ipv6Net {
    Ipv6Net::new_assert(Ipv6Addr::new(first, 0, 0, 0, 0, 0, 0, last), len)
}

/// The host's own networks, cloud metadata, multicast and broadcast: a sandbox never reaches
/// these by asking, because they are where the host and its neighbours live.
const INTERNAL_V4: [Ipv4Net; 9] = [
    v4(127, 0, 0, 0, 8),
    v4(0, 0, 0, 0, 8),
    v4(169, 254, 0, 0, 16),
    v4(10, 0, 0, 0, 8),
    v4(172, 16, 0, 0, 12),
    v4(192, 168, 0, 0, 16),
    v4(100, 64, 0, 0, 10),
    v4(224, 0, 0, 0, 4),
    v4(240, 0, 0, 0, 4),
];

const INTERNAL_V6: [Ipv6Net; 5] = [
    v6(0, 1, 128),
    v6(0, 0, 128),
    v6(0xfe80, 0, 10),
    v6(0xfc00, 0, 7),
    v6(0xff00, 0, 8),
];

/// The IPv4 address a v6 destination really reaches, if any. Without this,
/// `::ffff:10.0.0.1` or `64:ff9b::a9fe:a9fe` would walk around every IPv4 rule.
/// These forms put the IPv4 address in the last 32 bits: IPv4-mapped, NAT64's
/// well-known `64:ff9b::/96` and the local-use `64:ff9b:1::/96` (RFC 8215),
/// SIIT's IPv4-translated `::ffff:0:0:0/96`, and IPv4-compatible `::a.b.c.d`
/// (sit tunnels still route it); `::` and `::1` are left alone, being IPv6's
/// own unspecified and loopback.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = ip.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match ip.segments() {
        [0, 0, 0, 0, 0, 0xffff, _, _]
        | [0x64, 0xff9b, 0, 0, 0, 0, _, _]
        | [0x64, 0xff9b, 1, 0, 0, 0, _, _]
        | [0, 0, 0, 0, 0xffff, 0, _, _] => Some(tail),
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] => Some(tail),
        _ => None,
    }
}

/// `64:ff9b:1::/48` (RFC 8215): a local NAT64 prefix of any length from /48
/// to /96, so where its IPv4 address sits is the operator's choice; outside
/// the /96 form the stack cannot tell, and denies.
const LOCAL_NAT64: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48);
/// 6to4 (RFC 3056): the relay's IPv4 address in bits 16..48.
const SIX_TO_FOUR: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16);
/// Teredo (RFC 4380): the server's IPv4 address in bits 32..64, the client's,
/// inverted, in the last 32.
const TEREDO: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 32);

/// The IPv4 addresses a tunnelled IPv6 destination goes through: the 6to4
/// relay, or Teredo's server and client. Empty for any other address.
pub fn tunnelled_ipv4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let o = ip.octets();
    if SIX_TO_FOUR.contains(&ip) {
        return vec![Ipv4Addr::new(o[2], o[3], o[4], o[5])];
    }
    if TEREDO.contains(&ip) {
        let server = Ipv4Addr::new(o[4], o[5], o[6], o[7]);
        let client = Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]);
        return vec![server, client];
    }
    Vec::new()
}

/// The address a destination is decided as: IPv4 embedded in IPv6 becomes plain IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => embedded_v4(a).map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Rules written in embedded form must meet destinations in the form they are decided in,
/// or `deny_out ::ffff:192.0.2.1` would silently never match.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match embedded_v4(n.network()) {
            Some(a) => IpNet::V4(Ipv4Net::new_assert(a, n.prefix_len() - 96)),
            None => net,
        },
        _ => net,
    }
}

/// An address or CIDR, host bits dropped.
fn parse_net(raw: &str) -> Option<IpNet> {
    let s = raw.trim();
    let net = match s.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => IpNet::from(s.parse::<IpAddr>().ok()?),
    };
    Some(net.trunc())
}

/// A first match is the most specific one: lists are sorted longest prefix first.
fn first_match<N: Copy + Into<IpNet>>(nets: &[N], holds: impl Fn(&N) -> bool) -> Option<IpNet> {
    nets.iter().find(|n| holds(n)).map(|&n| n.into())
}

fn internal_range(dst: IpAddr) -> Option<IpNet> {
    match dst {
        IpAddr::V4(a) => first_match(&INTERNAL_V4, |n| n.contains(&a)),
        IpAddr::V6(a) => first_match(&INTERNAL_V6, |n| n.contains(&a)),
    }
}

/// One list of rules, split by family so a lookup scans only its own.
#[derive(Debug, Clone, Default)]
struct NetSet {
    /// `ALL_TRAFFIC` or `0.0.0.0/0` was listed: every address, both families.
    all: bool,
    v4: Vec<Ipv4Net>,
    v6: Vec<Ipv6Net>,
}

impl NetSet {
    /// `all_traffic` is false for operator holes: opening the whole host should be spelt out.
    fn parse(raw: &[String], all_traffic: bool, bad: fn(String) -> PolicyError) -> Result<Self> {
        let mut set = NetSet::default();
        for entry in raw {
            if all_traffic && entry.trim() == ALL_TRAFFIC {
                set.all = true;
                continue;
            }
            let written = parse_net(entry).ok_or_else(|| bad(entry.clone()))?;
            match (written, canonical_net(written)) {
                // E2B documents `0.0.0.0/0` as all traffic; an IPv6 hole under it would leak.
                (IpNet::V4(n), _) if all_traffic && n.prefix_len() == 0 => set.all = true,
                (_, IpNet::V4(n)) => set.v4.push(n),
                (_, IpNet::V6(n)) => set.v6.push(n),
            }
        }
        set.v4.sort_by_key(|n| (Reverse(n.prefix_len()), *n));
        set.v4.dedup();
        set.v6.sort_by_key(|n| (Reverse(n.prefix_len()), *n));
        set.v6.dedup();
        Ok(set)
    }

    /// The most specific listed network holding `dst`; `all` is the caller's to check.
    fn net_for(&self, dst: IpAddr) -> Option<IpNet> {
        match dst {
            IpAddr::V4(a) => first_match(&self.v4, |n| n.contains(&a)),
            IpAddr::V6(a) => first_match(&self.v6, |n| n.contains(&a)),
        }
    }
}

/// A parsed, ready-to-query policy. Immutable: to change a policy at run time, build a new
/// one and swap it in whole (e.g. behind an `Arc`).
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allow: NetSet,
    deny: NetSet,
    /// Operator holes in the internal ranges.
    holes: NetSet,
    /// Names `allow_out` holds.
    names: NameSet,
    /// The keys of the sandbox's header rules (E2B's `rules`): a TLS flow
    /// whose SNI one of them matches, and which a name allowed, is handed
    /// to the host's interceptor instead of being spliced. Never `*`.
    intercepts: NameSet,
}

impl EgressPolicy {
    /// Parses every list, even a `deny_out` that `allow_internet_access = false` overrides, so
    /// a typo is reported rather than hidden. The first bad entry is the error, named as given.
    pub fn from_spec(spec: &PolicySpec) -> Result<Self> {
        let mut names = NameSet::default();
        let mut addresses = Vec::new();
        for entry in &spec.allow_out {
            let is_address = entry.trim() == ALL_TRAFFIC || parse_net(entry).is_some();
            match NamePattern::parse(entry).filter(|_| !is_address) {
                Some(name) => names.push(name),
                None => addresses.push(entry.clone()),
            }
        }
        let allow = NetSet::parse(&addresses, true, PolicyError::InvalidAllowed)?;
        let mut deny = NetSet::parse(&spec.deny_out, true, PolicyError::InvalidDenied)?;
        let holes = NetSet::parse(&spec.allow_internal, false, PolicyError::InvalidInternal)?;
        if !spec.allow_internet_access {
            deny = NetSet::default();
            deny.all = true;
        }
        if !names.is_empty() && !deny.all {
            return Err(PolicyError::NamesNeedAllTrafficDenied);
        }
        Ok(Self {
            allow,
            deny,
            holes,
            names,
            intercepts: NameSet::default(),
        })
    }

    /// The same policy with these header-rule keys (exact names and
    /// `*.` suffixes; a `*` is ignored: a rule for every name is not a
    /// rule E2B or slipway accepts). Replaced with the policy, atomically.
    pub fn with_intercepts(mut self, keys: impl IntoIterator<Item = NamePattern>) -> Self {
        self.intercepts = NameSet::default();
        for key in keys {
            if key != NamePattern::Any {
                self.intercepts.push(key);
            }
        }
        self
    }

    /// The header-rule keys; empty when nothing is intercepted.
    pub fn intercepts(&self) -> &NameSet {
        &self.intercepts
    }

    /// The rule key whose headers a TLS flow to `name` (canonical) gets:
    /// an exact key beats a wildcard, the longest `*.` suffix a shorter
    /// one. Only for a name the policy allows: a rule never allows egress.
    pub fn intercept_for(&self, name: &str) -> Option<&NamePattern> {
        self.allows_name(name)?;
        self.intercepts.allows(name)
    }

    /// The names `allow_out` holds; empty for an address-only policy.
    pub fn names(&self) -> &NameSet {
        &self.names
    }

    /// The pattern that allows `name` (canonical), if any.
    pub fn allows_name(&self, name: &str) -> Option<&NamePattern> {
        self.names.allows(name)
    }

    /// Whether an internal address was opened by the operator: a DNS answer
    /// pointing there is kept (and pinned); any other internal one is not.
    pub fn internal_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        internal_range(ip).is_none() || self.holes.net_for(ip).is_some()
    }

    /// The default spec: internet on, only the internal ranges denied.
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Decide a new flow to `dst`. `operator_exempt` is true when the operator chose this
    /// destination (the mapped host-loopback address, the DNS upstream): it skips the
    /// always-denied internal ranges but still obeys allow_out/deny_out.
    ///
    /// A tunnelled IPv6 destination (6to4, Teredo) that goes through an
    /// internal IPv4 address is denied as that address; otherwise its IPv6
    /// address is decided. A local-use NAT64 address (`64:ff9b:1::/48`)
    /// outside the /96 form, whose IPv4 part cannot be located, is denied as
    /// internal.
    pub fn decide(&self, dst: IpAddr, operator_exempt: bool) -> Verdict {
        if let (IpAddr::V6(v6), false) = (dst, operator_exempt) {
            let opened = |ip: IpAddr| self.holes.net_for(ip).is_some();
            if LOCAL_NAT64.contains(&v6) && embedded_v4(v6).is_none() && !opened(dst) {
                return verdict(false, Rule::Internal(LOCAL_NAT64.into()));
            }
            for v4 in tunnelled_ipv4(v6) {
                if let Some(range) = internal_range(v4.into()).filter(|_| !opened(v4.into())) {
                    return verdict(false, Rule::Internal(range));
                }
            }
        }
        self.decide_one(dst, operator_exempt)
    }

    fn decide_one(&self, dst: IpAddr, operator_exempt: bool) -> Verdict {
        let dst = canonical_ip(dst);
        let internal = internal_range(dst).filter(|_| self.holes.net_for(dst).is_none());
        if let (Some(range), false) = (internal, operator_exempt) {
            return verdict(false, Rule::Internal(range));
        }
        if let Some(net) = self.allow.net_for(dst) {
            return verdict(true, Rule::AllowOut(net));
        }
        if self.allow.all {
            return verdict(true, Rule::AllTrafficAllowed);
        }
        if let Some(net) = self.deny.net_for(dst) {
            return verdict(false, Rule::DenyOut(net));
        }
        if self.deny.all {
            return verdict(false, Rule::AllTrafficDenied);
        }
        if internal.is_some() {
            return verdict(true, Rule::OperatorExempt);
        }
        verdict(true, Rule::Default)
    }
}

fn verdict(allowed: bool, rule: Rule) -> Verdict {
    Verdict { allowed, rule }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Comma-separated entries, kept untrimmed so the policy's own trimming is exercised.
    fn list(entries: &str) -> Vec<String> {
        entries
            .split(',')
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect()
    }

    fn spec(allow: &str, deny: &str) -> PolicySpec {
        let mut spec = PolicySpec::new();
        (spec.allow_out, spec.deny_out) = (list(allow), list(deny));
        spec
    }

    fn holes(allow_internal: &str) -> PolicySpec {
        let mut spec = PolicySpec::new();
        spec.allow_internal = list(allow_internal);
        spec
    }

    fn policy(allow: &str, deny: &str) -> EgressPolicy {
        build(&spec(allow, deny))
    }

    fn build(spec: &PolicySpec) -> EgressPolicy {
        EgressPolicy::from_spec(spec).unwrap()
    }

    fn offline(mut spec: PolicySpec) -> EgressPolicy {
        spec.allow_internet_access = false;
        build(&spec)
    }

    fn error(spec: &PolicySpec) -> PolicyError {
        EgressPolicy::from_spec(spec).unwrap_err()
    }

    /// Rows are `[exempt] destination verdict`, the verdict as the flow log prints it and
    /// `exempt` marking a destination the operator chose.
    impl EgressPolicy {
        #[track_caller]
        fn check(&self, table: &str) {
            for row in table.lines().map(str::trim).filter(|row| !row.is_empty()) {
                let exempt = row.starts_with("exempt ");
                let row = row.trim_start_matches("exempt ");
                let (dst, want) = row.split_once(' ').unwrap();
                let got = self.decide(dst.parse().unwrap(), exempt);
                assert_eq!(got.to_string(), want.trim(), "destination {dst}");
            }
        }
    }

    #[test]
    fn default_spec_allows_everything_public() {
        assert!(PolicySpec::default().allow_internet_access);
        // Including the neighbours of every internal range, to pin the ranges' edges.
        let public = "8.8.8.8 1.0.0.1 11.0.0.1 100.63.255.255 100.128.0.1 169.253.255.255
            172.15.255.255 172.32.0.1 192.167.255.255 192.169.0.1 223.255.255.255
            2001:4860::8888 ::2:0:0:1 fbff::1 fec0::1 2001:db8::1";
        for p in [EgressPolicy::allow_all(), policy("", "")] {
            for dst in public.split_whitespace() {
                p.check(&format!("{dst} allow (default allow)"));
            }
        }
    }

    #[test]
    fn allow_beats_deny_whatever_prefix_length() {
        policy("192.0.2.7/32", "192.0.2.0/24").check(
            "192.0.2.7  allow (allow_out 192.0.2.7/32)
             192.0.2.8  deny (deny_out 192.0.2.0/24)",
        );
        policy("192.0.2.0/24", "192.0.2.7/32").check(
            "192.0.2.7     allow (allow_out 192.0.2.0/24)
             198.51.100.1  allow (default allow)",
        );
    }

    #[test]
    fn most_specific_rule_is_reported() {
        policy("192.0.2.0/24, 192.0.2.7, 192.0.2.7/32, ALL_TRAFFIC", "").check(
            "192.0.2.7  allow (allow_out 192.0.2.7/32)
             192.0.2.6  allow (allow_out 192.0.2.0/24)
             8.8.8.8    allow (allow_out ALL_TRAFFIC)",
        );
    }

    #[test]
    fn entries_are_addresses_or_cidrs_trimmed_and_truncated() {
        policy(
            "",
            " 192.0.2.1 ,\t198.51.100.9/24\n,2001:db8::1,  2001:db8:1::9/48",
        )
        .check(
            "192.0.2.1           deny (deny_out 192.0.2.1/32)
             192.0.2.2           allow (default allow)
             198.51.100.200      deny (deny_out 198.51.100.0/24)
             2001:db8::1         deny (deny_out 2001:db8::1/128)
             2001:db8::2         allow (default allow)
             2001:db8:1:ffff::1  deny (deny_out 2001:db8:1::/48)",
        );
    }

    #[test]
    fn all_traffic_covers_ipv6() {
        policy("", "ALL_TRAFFIC").check(
            "8.8.8.8          deny (deny_out ALL_TRAFFIC)
             2001:4860::8888  deny (deny_out ALL_TRAFFIC)",
        );
        policy("ALL_TRAFFIC", "8.8.8.8, ::/0").check(
            "8.8.8.8          allow (allow_out ALL_TRAFFIC)
             2001:4860::8888  allow (allow_out ALL_TRAFFIC)",
        );
    }

    #[test]
    fn zero_slash_zero_covers_ipv6() {
        // "1.2.3.4/0" truncates to the same default route.
        for all in ["0.0.0.0/0", "1.2.3.4/0"] {
            policy("", all).check(
                "8.8.8.8          deny (deny_out ALL_TRAFFIC)
                 2001:4860::8888  deny (deny_out ALL_TRAFFIC)",
            );
            policy(all, "ALL_TRAFFIC").check("2001:4860::8888 allow (allow_out ALL_TRAFFIC)");
        }
    }

    #[test]
    fn v6_default_route_alone_leaves_ipv4() {
        policy("", "::/0").check(
            "2001:4860::8888  deny (deny_out ::/0)
             8.8.8.8          allow (default allow)",
        );
        policy("::/0", "ALL_TRAFFIC").check(
            "2001:4860::8888  allow (allow_out ::/0)
             8.8.8.8          deny (deny_out ALL_TRAFFIC)",
        );
    }

    #[test]
    fn no_internet_denies_everything_but_allow_out() {
        offline(spec("192.0.2.0/24, 2001:db8::/32", "192.0.2.5")).check(
            "192.0.2.5        allow (allow_out 192.0.2.0/24)
             2001:db8::1      allow (allow_out 2001:db8::/32)
             8.8.8.8          deny (deny_out ALL_TRAFFIC)
             2001:4860::8888  deny (deny_out ALL_TRAFFIC)",
        );
    }

    #[test]
    fn internal_ranges_denied_even_when_allowed_out() {
        let p = policy(
            "ALL_TRAFFIC, 10.0.0.0/8, 169.254.169.254, fd00::/8, ::1",
            "",
        );
        p.check(
            "127.0.0.1        deny (internal 127.0.0.0/8)
             0.0.0.0          deny (internal 0.0.0.0/8)
             169.254.169.254  deny (internal 169.254.0.0/16)
             10.0.2.2         deny (internal 10.0.0.0/8)
             172.31.255.255   deny (internal 172.16.0.0/12)
             192.168.1.1      deny (internal 192.168.0.0/16)
             100.100.100.100  deny (internal 100.64.0.0/10)
             224.0.0.251      deny (internal 224.0.0.0/4)
             239.255.255.250  deny (internal 224.0.0.0/4)
             240.0.0.1        deny (internal 240.0.0.0/4)
             255.255.255.255  deny (internal 240.0.0.0/4)
             ::1              deny (internal ::1/128)
             ::               deny (internal ::/128)
             fe80::1          deny (internal fe80::/10)
             fd00::1          deny (internal fc00::/7)
             ff02::fb         deny (internal ff00::/8)",
        );
        let want = verdict(false, Rule::Internal("10.0.0.0/8".parse().unwrap()));
        assert_eq!(p.decide("10.1.2.3".parse().unwrap(), false), want);
    }

    #[test]
    fn allow_internal_opens_a_hole() {
        let mut s = holes(" 10.0.5.0/24 , fd00::1, ::ffff:192.168.7.7");
        s.deny_out = list("10.0.5.9");
        // A hole is only a hole: the sandbox's own deny_out still applies inside it.
        build(&s).check(
            "10.0.5.1     allow (default allow)
             10.0.6.1     deny (internal 10.0.0.0/8)
             10.0.5.9     deny (deny_out 10.0.5.9/32)
             fd00::1      allow (default allow)
             fd00::2      deny (internal fc00::/7)
             192.168.7.7  allow (default allow)",
        );
        // Holes are spelt out: 0.0.0.0/0 opens IPv4 only, and ALL_TRAFFIC is refused.
        build(&holes("0.0.0.0/0")).check(
            "127.0.0.1  allow (default allow)
             ::1        deny (internal ::1/128)",
        );
        let err = error(&holes(ALL_TRAFFIC));
        assert_eq!(err, PolicyError::InvalidInternal(ALL_TRAFFIC.into()));
    }

    #[test]
    fn operator_exempt_skips_internal_but_obeys_deny() {
        policy("", "127.0.0.0/8").check(
            "exempt 10.0.2.2   allow (operator exempt)
             exempt 127.0.0.1  deny (deny_out 127.0.0.0/8)
             exempt 8.8.8.8    allow (default allow)
                    10.0.2.2   deny (internal 10.0.0.0/8)",
        );
        offline(spec("", "")).check("exempt 10.0.0.53 deny (deny_out ALL_TRAFFIC)");
        let p = offline(spec("10.0.0.53", ""));
        p.check("exempt 10.0.0.53 allow (allow_out 10.0.0.53/32)");
    }

    #[test]
    fn ipv4_mapped_ipv6_is_decided_as_ipv4() {
        // Decided as IPv4, so the IPv6 default route does not catch ::ffff:8.8.8.8.
        policy("192.0.2.1", "192.0.2.0/24, ::/0").check(
            "::ffff:10.0.0.1   deny (internal 10.0.0.0/8)
             ::ffff:127.0.0.1  deny (internal 127.0.0.0/8)
             ::ffff:192.0.2.1  allow (allow_out 192.0.2.1/32)
             ::ffff:192.0.2.2  deny (deny_out 192.0.2.0/24)
             ::ffff:8.8.8.8    allow (default allow)",
        );
        policy("", "ALL_TRAFFIC").check("::ffff:8.8.8.8 deny (deny_out ALL_TRAFFIC)");
    }

    #[test]
    fn nat64_and_ipv4_compatible_are_decided_as_ipv4() {
        policy("", "8.8.8.0/24").check(
            "64:ff9b::a9fe:a9fe  deny (internal 169.254.0.0/16)
             ::10.0.0.1          deny (internal 10.0.0.0/8)
             64:ff9b::8.8.8.8    deny (deny_out 8.8.8.0/24)
             ::8.8.8.8           deny (deny_out 8.8.8.0/24)
             64:ff9b::1.1.1.1    allow (default allow)
             ::1                 deny (internal ::1/128)",
        );
        // Rules written in embedded form match the IPv4 they embed.
        policy("", "::ffff:192.0.2.0/120, 64:ff9b::198.51.100.7").check(
            "192.0.2.5     deny (deny_out 192.0.2.0/24)
             198.51.100.7  deny (deny_out 198.51.100.7/32)",
        );
        // ::ffff:0:0/96 is all of IPv4, not the "all traffic" that 0.0.0.0/0 is.
        policy("::ffff:0:0/96", "ALL_TRAFFIC").check(
            "8.8.8.8          allow (allow_out 0.0.0.0/0)
             2001:4860::8888  deny (deny_out ALL_TRAFFIC)",
        );
    }

    #[test]
    fn ipv6_forms_that_embed_internal_ipv4_are_decided_as_it_or_denied() {
        policy("", "8.8.8.0/24").check(
            "64:ff9b:1::10.0.0.1      deny (internal 10.0.0.0/8)
             64:ff9b:1::8.8.8.8       deny (deny_out 8.8.8.0/24)
             64:ff9b:1::1.1.1.1       allow (default allow)
             64:ff9b:1:a9fe:a9::      deny (internal 64:ff9b:1::/48)
             ::ffff:0:10.0.0.1        deny (internal 10.0.0.0/8)
             ::ffff:0:169.254.169.254 deny (internal 169.254.0.0/16)
             ::ffff:0:1.1.1.1         allow (default allow)
             2002:a00:1::1            deny (internal 10.0.0.0/8)
             2002:a9fe:a9fe::1        deny (internal 169.254.0.0/16)
             2002:7f00:1:1::1         deny (internal 127.0.0.0/8)
             2002:808:808::1          allow (default allow)
             2002:101:101::1          allow (default allow)
             2001:0:a00:1::1          deny (internal 10.0.0.0/8)
             2001:0:101:101::f5ff:fffe deny (internal 10.0.0.0/8)
             2001:0:101:101::fefe:fefe allow (default allow)",
        );
        // The IPv6 rules still hold for tunnelled destinations, and allow
        // beats deny within each form.
        policy("2002:101:101::/48", "2002::/16, 2001::/32").check(
            "2002:101:101::1  allow (allow_out 2002:101:101::/48)
             2002:101:102::1  deny (deny_out 2002::/16)
             2002:a00:1::1    deny (internal 10.0.0.0/8)
             2001:0:101:101::fefe:fefe deny (deny_out 2001::/32)",
        );
        // Rules written in the new embedded forms meet the IPv4 they embed.
        policy("", "::ffff:0:192.0.2.0/120, 64:ff9b:1::198.51.100.7").check(
            "192.0.2.5     deny (deny_out 192.0.2.0/24)
             198.51.100.7  deny (deny_out 198.51.100.7/32)",
        );
        // An operator hole in the internal ranges holds for every form.
        build(&holes("10.0.5.0/24")).check(
            "2002:a00:501::1      allow (default allow)
             64:ff9b:1::10.0.5.9  allow (default allow)
             2002:a00:601::1      deny (internal 10.0.0.0/8)",
        );
    }

    #[test]
    fn names_in_allow_out_need_all_traffic_denied() {
        let names = "example.com, *.api.test,*";
        for deny in ["ALL_TRAFFIC", "0.0.0.0/0", "192.0.2.0/24, ALL_TRAFFIC"] {
            let p = build(&spec(names, deny));
            assert_eq!(p.names().iter().count(), 3);
            // Names never open an address by themselves.
            assert!(!p.decide("203.0.113.9".parse().unwrap(), false).allowed);
        }
        let mut off = spec("example.com", "");
        off.allow_internet_access = false;
        assert_eq!(build(&off).names().iter().count(), 1);
        for deny in ["", "192.0.2.0/24", "::/0"] {
            let e = error(&spec("example.com", deny));
            assert_eq!(e, PolicyError::NamesNeedAllTrafficDenied);
            assert_eq!(
                e.to_string(),
                "When specifying allowed domains in allow out, you must include 'ALL_TRAFFIC' in deny out to block all other traffic."
            );
        }
        // Addresses beside names keep their meaning exactly.
        build(&spec("example.com, 198.51.100.0/24", "ALL_TRAFFIC")).check(
            "198.51.100.7  allow (allow_out 198.51.100.0/24)
             192.0.2.1     deny (deny_out ALL_TRAFFIC)",
        );
        // A name is never a denied entry; a bad name is a bad allowed entry.
        assert_eq!(
            error(&spec("", "example.com")),
            PolicyError::InvalidDenied("example.com".into())
        );
        for bad in ["a..b", "*.", "exa mple.com", "-x.test", "*x.test"] {
            assert_eq!(
                error(&spec(bad, "ALL_TRAFFIC")),
                PolicyError::InvalidAllowed(bad.into()),
                "{bad}"
            );
        }
        let p = build(&spec("Example.COM., *.api.test", "ALL_TRAFFIC"));
        let allowed = |n: &str| p.allows_name(n).map(|x| x.to_string());
        assert_eq!(allowed("example.com").as_deref(), Some("example.com"));
        assert_eq!(allowed("v1.api.test").as_deref(), Some("*.api.test"));
        assert_eq!(allowed("api.test"), None);
    }

    #[test]
    fn invalid_entries_name_the_entry() {
        let says = |s: &PolicySpec| error(s).to_string();
        let bad =
            "|   |300.1.1.1|1.2.3.4/33|::/129|hello| hello |all_traffic|fe80::1%eth0|/8|1.2.3.4/";
        for entry in bad.split('|') {
            let mut s = PolicySpec::new();
            s.deny_out = vec![entry.into()];
            assert_eq!(error(&s), PolicyError::InvalidDenied(entry.into()));
            assert_eq!(says(&s), format!("invalid denied CIDR {entry}"));
            (s.deny_out, s.allow_out) = (Vec::new(), vec![entry.into()]);
            if NamePattern::parse(entry).is_some() {
                // `hello` is a name in allow_out, which then needs all else denied.
                assert_eq!(error(&s), PolicyError::NamesNeedAllTrafficDenied, "{entry}");
            } else {
                assert_eq!(says(&s), format!("invalid allowed address {entry}"));
            }
            (s.allow_out, s.allow_internal) = (Vec::new(), vec![entry.into()]);
            assert_eq!(says(&s), format!("invalid internal CIDR {entry}"));
        }
        // The first bad entry is the error, allow_out before deny_out.
        let s = spec("192.0.2.1,bad_allow", "bad-deny-1,bad-deny-2");
        assert_eq!(error(&s), PolicyError::InvalidAllowed("bad_allow".into()));
        let s = spec("", "192.0.2.1,bad-deny-1,bad-deny-2");
        assert_eq!(error(&s), PolicyError::InvalidDenied("bad-deny-1".into()));
        // Overridden by allow_internet_access = false, but still a mistake worth reporting.
        let mut s = spec("", "nope");
        s.allow_internet_access = false;
        assert_eq!(error(&s), PolicyError::InvalidDenied("nope".into()));
    }
}
