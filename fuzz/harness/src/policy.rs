//! `EgressPolicy::from_spec` on arbitrary entries and `decide` on arbitrary
//! destinations, against the rules the design states.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::input::{List, Text};
use arbitrary::{Arbitrary, Unstructured};
use ipnet::IpNet;
use netstack::names::NamePattern;
use netstack::policy::{
    canonical_ip, tunnelled_ipv4, EgressPolicy, PolicyError, PolicySpec, Rule, ALL_TRAFFIC,
};

#[derive(Arbitrary, Debug)]
pub enum Entry {
    Raw(Text),
    /// An address or CIDR as an operator would write it, maybe padded.
    Net {
        v6: bool,
        addr: [u8; 16],
        prefix: Option<u8>,
        pad: bool,
    },
    AllTraffic,
}

impl Entry {
    fn text(&self) -> String {
        match self {
            Entry::Raw(s) => s.0.clone(),
            Entry::Net {
                v6,
                addr,
                prefix,
                pad,
            } => {
                let ip = if *v6 {
                    IpAddr::V6(Ipv6Addr::from(*addr))
                } else {
                    IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
                };
                let mut s = match prefix {
                    Some(p) => format!("{ip}/{}", p % 140),
                    None => ip.to_string(),
                };
                if *pad {
                    s = format!(" {s}\t");
                }
                s
            }
            Entry::AllTraffic => ALL_TRAFFIC.to_string(),
        }
    }
}

#[derive(Arbitrary, Debug)]
pub enum Probe {
    V4([u8; 4]),
    V6([u8; 16]),
    /// IPv4 written as IPv4-mapped IPv6.
    Mapped([u8; 4]),
    /// An address taken from one of the entries.
    Listed(u8),
}

#[derive(Arbitrary, Debug)]
pub struct Input {
    pub allow: List<Entry>,
    pub deny: List<Entry>,
    pub internal: List<Entry>,
    pub internet: bool,
    pub probes: Vec<(Probe, bool)>,
}

fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let texts = |v: &[Entry]| v.iter().take(16).map(Entry::text).collect::<Vec<_>>();
    let spec = PolicySpec {
        allow_out: texts(&input.allow),
        deny_out: texts(&input.deny),
        allow_internal: texts(&input.internal),
        allow_internet_access: input.internet,
    };
    let policy = match EgressPolicy::from_spec(&spec) {
        Ok(p) => p,
        Err(e) => {
            let (list, entry) = match &e {
                PolicyError::InvalidAllowed(x) => (&spec.allow_out, x),
                PolicyError::InvalidDenied(x) => (&spec.deny_out, x),
                PolicyError::InvalidInternal(x) => (&spec.allow_internal, x),
                PolicyError::NamesNeedAllTrafficDenied => {
                    let has_name = spec.allow_out.iter().any(|a| {
                        NamePattern::parse(a).is_some()
                            && parse_net(a).is_none()
                            && a.trim() != ALL_TRAFFIC
                    });
                    assert!(has_name, "{e}, but allow_out holds no name");
                    let denies_all = !spec.allow_internet_access
                        || spec.deny_out.iter().any(|d| {
                            d.trim() == ALL_TRAFFIC
                                || parse_net(d)
                                    .is_some_and(|n| n.prefix_len() == 0 && n.addr().is_ipv4())
                        });
                    assert!(!denies_all, "{e}, but all traffic is denied");
                    return;
                }
            };
            assert!(list.contains(entry), "error {e} names no entry of its list");
            assert!(
                parse_net(entry).is_none() || entry.trim() == ALL_TRAFFIC,
                "{e}: but it parses"
            );
            let _ = e.to_string();
            return;
        }
    };
    let allow_nets: Vec<IpNet> = spec.allow_out.iter().filter_map(|s| parse_net(s)).collect();
    let all_entries: Vec<IpNet> = [&spec.allow_out, &spec.deny_out, &spec.allow_internal]
        .into_iter()
        .flatten()
        .filter_map(|s| parse_net(s))
        .collect();
    let deny_all = !input.internet || spec.deny_out.iter().any(|s| s.trim() == ALL_TRAFFIC);
    for (probe, exempt) in input.probes.iter().take(32) {
        let dst = match probe {
            Probe::V4(a) => IpAddr::V4(Ipv4Addr::from(*a)),
            Probe::V6(a) => IpAddr::V6(Ipv6Addr::from(*a)),
            Probe::Mapped(a) => IpAddr::V6(Ipv4Addr::from(*a).to_ipv6_mapped()),
            Probe::Listed(i) if !all_entries.is_empty() => {
                all_entries[usize::from(*i) % all_entries.len()].addr()
            }
            Probe::Listed(_) => continue,
        };
        let v = policy.decide(dst, *exempt);
        let _ = v.to_string();
        let canon = canonical_ip(dst);
        assert_eq!(
            v,
            policy.decide(canon, *exempt),
            "{dst} and {canon} decided apart"
        );
        let allowed_rule = matches!(
            v.rule,
            Rule::AllowOut(_) | Rule::AllTrafficAllowed | Rule::Default | Rule::OperatorExempt
        );
        assert_eq!(
            v.allowed, allowed_rule,
            "{dst}: verdict {v} contradicts its rule"
        );
        match v.rule {
            Rule::Internal(n) => {
                assert!(!exempt, "{dst}: operator-exempt but denied as internal");
                let tunnelled = match dst {
                    IpAddr::V6(a) => tunnelled_ipv4(a),
                    IpAddr::V4(_) => Vec::new(),
                };
                assert!(
                    n.contains(&canon) || tunnelled.iter().any(|v4| n.contains(&IpAddr::V4(*v4))),
                    "{dst}: internal rule {n} does not hold it"
                );
            }
            Rule::AllowOut(n) | Rule::DenyOut(n) => {
                assert!(n.contains(&canon), "{dst}: rule {n} does not hold it")
            }
            _ => {}
        }
        let in_allow = allow_nets.iter().any(|n| n.contains(&canon));
        if in_allow {
            assert!(
                v.allowed || matches!(v.rule, Rule::Internal(_)),
                "{dst} is in allow_out yet {v}"
            );
        }
        if deny_all && spec.allow_out.is_empty() {
            assert!(
                !v.allowed,
                "{dst}: all traffic denied, nothing allowed, yet {v}"
            );
        }
        let lists_empty = spec.allow_out.is_empty() && spec.deny_out.is_empty();
        if lists_empty && input.internet && spec.allow_internal.is_empty() {
            assert!(
                v.allowed || matches!(v.rule, Rule::Internal(_)),
                "{dst}: default spec yet {v}"
            );
        }
    }
}
