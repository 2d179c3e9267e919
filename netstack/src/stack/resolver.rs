//! Egress by name in the core: the filtering resolver at the stack's DNS
//! address, and the pins it leaves behind (addresses an allowed name
//! resolved to, allowed on any port and protocol for the answer's TTL, at
//! least a minute). Only a policy that holds names turns either on.

use std::collections::VecDeque;

use super::*;
use crate::dns::{self, Answer, Query};
use crate::policy::canonical_ip;

/// A pin lives at least this long, whatever the answer's TTL.
pub(super) const MIN_PIN: Duration = Duration::from_secs(60);
/// ... and at most this long.
pub(super) const MAX_PIN: Duration = Duration::from_secs(24 * 3600);

struct Pin {
    name: String,
    expires: Instant,
}

/// Pinned addresses, the oldest dropped first past the cap.
#[derive(Default)]
pub(super) struct Pins {
    by_addr: HashMap<IpAddr, Pin>,
    /// Insertion order, for dropping the oldest; stale entries are skipped.
    order: VecDeque<(IpAddr, Instant)>,
}

impl Pins {
    fn insert(&mut self, ip: IpAddr, name: &str, expires: Instant, cap: usize) {
        let longer = self
            .by_addr
            .get(&ip)
            .is_none_or(|p| p.expires < expires || p.name != name);
        if !longer {
            return;
        }
        self.by_addr.insert(
            ip,
            Pin {
                name: name.to_string(),
                expires,
            },
        );
        self.order.push_back((ip, expires));
        while self.by_addr.len() > cap.max(1) {
            let Some((old, at)) = self.order.pop_front() else {
                break;
            };
            if self.by_addr.get(&old).is_some_and(|p| p.expires == at) {
                self.by_addr.remove(&old);
            }
        }
        // Entries of re-pinned or dropped addresses pile up in `order`;
        // keep it within twice the pins.
        if self.order.len() > 2 * cap.max(1) {
            let live = &self.by_addr;
            self.order
                .retain(|(ip, at)| live.get(ip).is_some_and(|p| p.expires == *at));
        }
    }

    /// The name `ip` is pinned for, if the pin still holds at `now`.
    fn name(&self, ip: IpAddr, now: Instant) -> Option<&str> {
        self.by_addr
            .get(&ip)
            .filter(|p| p.expires > now)
            .map(|p| p.name.as_str())
    }

    fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.by_addr.retain(|_, p| keep(&p.name));
    }

    pub(super) fn len(&self) -> usize {
        self.by_addr.len()
    }
}

/// What the resolver does with a guest's query.
pub(super) enum QueryFate {
    Forward,
    /// Answer the guest with this message; nothing leaves the host.
    Answer(Vec<u8>),
    Drop,
}

impl Stack {
    /// The verdict for a new flow to `decided_on`, and the name behind it
    /// when a pin allowed it. A pin never opens an internal range.
    pub(super) fn decide(&self, decided_on: IpAddr, exempt: bool) -> (Verdict, Option<String>) {
        let v = self.policy.decide(decided_on, exempt);
        if v.allowed || self.policy.names().is_empty() || matches!(v.rule, Rule::Internal(_)) {
            return (v, None);
        }
        match self.pins.name(canonical_ip(decided_on), self.now) {
            Some(name) if self.policy.allows_name(name).is_some() => (
                Verdict {
                    allowed: true,
                    rule: Rule::DnsPin,
                },
                Some(name.to_string()),
            ),
            _ => (v, None),
        }
    }

    /// Whether the policy in force filters DNS by name.
    pub(super) fn filters_names(&self) -> bool {
        !self.policy.names().is_empty()
    }

    /// A query to the stack's DNS address under a policy with names:
    /// forwarded only when its name is allowed; any other gets NXDOMAIN
    /// with EDE "Blocked" and never leaves the host.
    pub(super) fn filter_query(&mut self, src: SocketAddr, payload: &[u8]) -> QueryFate {
        let Some(q) = Query::parse(payload) else {
            self.stats.dropped("DNS query the resolver cannot read");
            return QueryFate::Drop;
        };
        let allowed = q.name.as_deref().and_then(|n| self.policy.allows_name(n));
        match allowed {
            Some(pattern) => {
                tracing::info!(
                    target: "slipway::dns",
                    %src,
                    name = q.name.as_deref().unwrap_or(""),
                    qtype = q.qtype,
                    rule = %pattern,
                    "query forwarded"
                );
                self.stats.dns_forwarded += 1;
                QueryFate::Forward
            }
            None => {
                self.stats.dns_blocked += 1;
                if self.refusal_log.admit(self.now).is_some() {
                    tracing::info!(
                        target: "slipway::dns",
                        %src,
                        name = q.name.as_deref().unwrap_or("(not a host name)"),
                        qtype = q.qtype,
                        "query blocked: name not allowed"
                    );
                }
                QueryFate::Answer(q.blocked_reply(payload))
            }
        }
    }

    /// An upstream's answer on the resolver's flow: addresses in the
    /// always-denied ranges are taken out (a rebinding guard), the rest are
    /// pinned to the question's name if the policy still allows it. `None`:
    /// nothing to pass on.
    pub(super) fn filter_answer(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        let Some(answer) = Answer::parse(payload) else {
            self.stats.dropped("DNS answer the resolver cannot read");
            return None;
        };
        let policy = &self.policy;
        let internal = |ip: IpAddr| !policy.internal_allowed(ip);
        let mut out = payload.to_vec();
        if answer.addresses.iter().any(|(ip, _)| internal(*ip)) {
            out = dns::without_addresses(payload, |ip| !internal(ip))?;
            self.stats.dns_answers_rewritten += 1;
            tracing::info!(
                target: "slipway::dns",
                name = answer.name.as_deref().unwrap_or(""),
                "answer rewritten: addresses in internal ranges removed"
            );
        }
        let Some(name) = answer.name.as_deref() else {
            return Some(out);
        };
        if self.policy.allows_name(name).is_none() {
            // The policy changed while the query was out.
            return Some(out);
        }
        let cap = self.cfg.caps.max_pins;
        for (ip, ttl) in answer.addresses {
            if internal(ip) {
                continue;
            }
            let life = Duration::from_secs(ttl.into()).clamp(MIN_PIN, MAX_PIN);
            let expires = self.now + life.into();
            self.pins.insert(canonical_ip(ip), name, expires, cap);
        }
        Some(out)
    }

    /// Pins whose names the policy no longer allows go.
    pub(super) fn drop_stale_pins(&mut self) {
        let policy = &self.policy;
        self.pins.retain(|name| policy.allows_name(name).is_some());
    }

    pub fn pinned_addresses(&self) -> usize {
        self.pins.len()
    }
}
