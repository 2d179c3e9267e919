//! Egress by name on TCP, where the core itself terminates the guest's
//! connection before any host socket exists:
//!
//! - the name-dial path: under a policy with names, a flow to an address
//!   that is neither CIDR-allowed nor pinned is accepted by the stack, its
//!   first bytes (bounded in size and time) must carry an allowed name (a
//!   TLS SNI or an HTTP Host), and the host then resolves that name through
//!   the stack's upstream and connects to what it resolved to. The address
//!   the guest chose plays no part;
//! - fronting on pinned addresses: a flow a DNS pin allowed connects as
//!   usual, but its first guest bytes wait until they are known not to name
//!   a host the policy denies;
//! - DNS over TCP to the filtering resolver: each query is filtered as over
//!   UDP, and an allowed one is asked of the upstream over UDP.
//!
//! The stack's own queries to the upstream travel on datagram flows of
//! their own (`OwnQuery`), which the driver serves like any other.

use super::*;
use crate::dns;
use crate::sniff::{self, How, Sniff, MAX_FIRST_BYTES};
use tcp_flow::TcpPhase;

/// How long a flow's first bytes may take to name a host.
pub(super) const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(5);
/// Queries one DNS-over-TCP connection may have out at once.
const TCP_DNS_IN_FLIGHT: usize = 16;

/// A datagram flow the stack opened to its upstream for itself.
pub(super) struct OwnQuery {
    /// The TCP flow it serves.
    pub(super) tcp: FlowId,
    pub(super) purpose: Purpose,
}

pub(super) enum Purpose {
    /// Resolving the name a flow's first bytes gave, to dial it (an A and
    /// an AAAA query; the first answer with a usable address wins).
    Dial {
        name: String,
        how: How,
        pattern: String,
        ids: [u16; 2],
        answered: u8,
    },
    /// Queries a guest sent over TCP to the resolver, by id.
    TcpDns { pending: Vec<u16> },
}

impl Stack {
    /// Accept a guest's SYN in the stack itself (no host connect): for the
    /// name-dial path (`Inspecting`) and for DNS over TCP (`Resolver`).
    pub(super) fn accept_locally(
        &mut self,
        now: Instant,
        frame: &[u8],
        ip: &[u8],
        (src, dst): (SocketAddr, SocketAddr),
        phase: TcpPhase,
    ) {
        let inspecting = phase == TcpPhase::Inspecting;
        // A flow to be inspected got here because no rule matched its
        // address; DNS over TCP because it is for the resolver.
        let rule = if inspecting {
            Rule::Default
        } else {
            Rule::Resolver
        };
        if let Some(cap) = self.tcp_cap_hit(inspecting) {
            self.stats.hit_cap(cap);
            let v = Verdict {
                allowed: true,
                rule,
            };
            self.log_refusal("tcp", src, dst, v, Some(cap));
            let rst = self.builder().rst_for_syn(ip, src, dst);
            return self.emit(rst);
        }
        let (mut socket, buffers) = self.flow_socket();
        if socket.listen(tcp_flow::listen_endpoint(dst)).is_err() {
            self.discard_flow_socket(socket, buffers);
            let rst = self.builder().rst_for_syn(ip, src, dst);
            return self.emit(rst);
        }
        let handle = self.sockets.add(socket);
        self.ingest(now, frame);
        if self.sockets.get::<tcp::Socket>(handle).state() != tcp::State::SynReceived {
            self.remove_flow_socket(handle, Some(buffers), None);
            let rst = self.builder().rst_for_syn(ip, src, dst);
            return self.emit(rst);
        }
        let flow = self.alloc_flow();
        let mut entry = tcp_flow::TcpFlow::new((src, dst), handle, phase, rule, now);
        entry.buffers = Some(buffers);
        if inspecting {
            let at = now + FIRST_BYTES_TIMEOUT.into();
            entry.inspect_deadline = Some(at);
            self.inspect_deadlines.insert((at, flow));
            self.half_open += 1;
            tracing::debug!(target: "slipway::flow", flow = %flow, %src, %dst, "reading the first bytes for a name");
        } else {
            self.stats.tcp_allowed += 1;
            tracing::info!(target: "slipway::flow", flow = %flow, proto = "tcp", %src, %dst,
                verdict = "allow", rule = %Rule::Resolver, "new flow");
        }
        self.insert_flow(flow, entry);
    }

    /// The flow's caps, as for any new TCP flow; `half_open`: it counts as
    /// one until it is decided.
    pub(super) fn tcp_cap_hit(&self, half_open: bool) -> Option<&'static str> {
        let caps = &self.cfg.caps;
        if self.tcp.len() >= caps.max_tcp_flows {
            Some("max_tcp_flows")
        } else if half_open && self.half_open >= caps.max_half_open {
            Some("max_half_open")
        } else if self.buffer_bytes + 2 * self.cfg.tcp_buffer > caps.max_buffer_bytes {
            Some("max_buffer_bytes")
        } else {
            None
        }
    }

    /// A guest segment of flow `id` was taken: act on what it brought.
    pub(super) fn after_guest_segment(&mut self, id: FlowId) {
        let Some(f) = self.tcp.get(&id) else {
            return;
        };
        match f.phase {
            TcpPhase::Inspecting if !f.aborted => self.inspect(id),
            TcpPhase::Open if f.held && !f.aborted => self.check_held(id),
            TcpPhase::Resolver if !f.aborted => self.resolver_tcp_read(id),
            _ => {}
        }
    }

    /// What the flow's first bytes say so far, and whether the guest
    /// finished sending.
    fn first_bytes(&mut self, id: FlowId) -> Option<(Sniff, usize, bool)> {
        let f = self.tcp.get(&id)?;
        let s = self.sockets.get_mut::<tcp::Socket>(f.handle);
        let fin = matches!(
            s.state(),
            tcp::State::CloseWait
                | tcp::State::LastAck
                | tcp::State::Closing
                | tcp::State::TimeWait
                | tcp::State::Closed
        );
        let bytes = s.peek(MAX_FIRST_BYTES).unwrap_or(&[]);
        Some((sniff::sniff(bytes), bytes.len(), fin))
    }

    /// The name-dial path: decide once the first bytes say enough.
    fn inspect(&mut self, id: FlowId) {
        let Some((what, len, fin)) = self.first_bytes(id) else {
            return;
        };
        match what {
            Sniff::NeedMore if len < MAX_FIRST_BYTES && !fin => {}
            Sniff::Name { name, how } => match self.policy.allows_name(&name) {
                Some(pattern) => {
                    let pattern = pattern.to_string();
                    self.dial(id, name, how, pattern);
                }
                None => {
                    let why = format!("name {name} not allowed");
                    self.refuse_by_name(id, &why, Some((&name, how)));
                }
            },
            Sniff::NeedMore => self.refuse_by_name(id, "no name in the first bytes", None),
            Sniff::NoName(detail) => {
                let why = format!("no name in the first bytes ({detail})");
                self.refuse_by_name(id, &why, None);
            }
            Sniff::Other => self.refuse_by_name(
                id,
                "no name in the first bytes (neither TLS nor HTTP)",
                None,
            ),
        }
    }

    /// Reset a flow the name rules refuse, with the flow log's reason.
    fn refuse_by_name(&mut self, id: FlowId, why: &str, named: Option<(&str, How)>) {
        let Some(f) = self.tcp.get_mut(&id) else {
            return;
        };
        f.aborted = true;
        let (src, dst, handle, phase) = (f.key.0, f.key.1, f.handle, f.phase);
        self.sockets.get_mut::<tcp::Socket>(handle).abort();
        if phase == TcpPhase::Inspecting {
            self.stats.tcp_denied += 1;
        }
        self.stats.name_refused += 1;
        if self.refusal_log.admit(self.now).is_some() {
            let (name, how) = named.map_or((None, None), |(n, h)| (Some(n), Some(h.as_str())));
            tracing::info!(target: "slipway::flow", flow = %id, proto = "tcp", %src, %dst,
                verdict = "deny", rule = why, name, how, "new flow");
        } else {
            self.stats.log_lines_suppressed += 1;
        }
    }

    /// An allowed name: ask the upstream for its addresses (A and AAAA).
    fn dial(&mut self, id: FlowId, name: String, how: How, pattern: String) {
        let Some(upstream) = self.cfg.dns_upstream else {
            let why = format!("no DNS upstream to resolve {name}");
            return self.refuse_by_name(id, &why, Some((&name, how)));
        };
        let lookup = self.alloc_flow();
        let ids = [self.next_query_id(), self.next_query_id()];
        self.requests.push_back(HostRequest::DatagramOpen {
            flow: lookup,
            kind: DatagramKind::Udp,
            dst: upstream,
        });
        for (qid, qtype) in ids.into_iter().zip([dns::TYPE_A, dns::TYPE_AAAA]) {
            self.requests.push_back(HostRequest::DatagramSend {
                flow: lookup,
                payload: dns::query(qid, &name, qtype),
            });
        }
        self.own_queries.insert(
            lookup,
            OwnQuery {
                tcp: id,
                purpose: Purpose::Dial {
                    name: name.clone(),
                    how,
                    pattern,
                    ids,
                    answered: 0,
                },
            },
        );
        self.clear_inspect_deadline(id);
        let deadline = self.now + self.cfg.connect_timeout.into();
        let f = self.tcp.get_mut(&id).expect("flow being inspected");
        f.phase = TcpPhase::Dialing;
        f.lookup = Some(lookup);
        f.name = Some(name);
        f.rule = match how {
            How::Sni => Rule::Sni,
            How::Host => Rule::HttpHost,
        };
        f.connect_deadline = Some(deadline);
        self.connect_deadlines.insert((deadline, id));
    }

    fn next_query_id(&mut self) -> u16 {
        // Not a secret: the lookup's socket is connected to the upstream
        // and lives for this lookup only.
        self.query_seq = self
            .query_seq
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.query_seq >> 48) as u16
    }

    fn clear_inspect_deadline(&mut self, id: FlowId) {
        if let Some(at) = self
            .tcp
            .get_mut(&id)
            .and_then(|f| f.inspect_deadline.take())
        {
            self.inspect_deadlines.remove(&(at, id));
        }
    }

    /// A datagram on one of the stack's own query flows.
    pub(super) fn own_answer(&mut self, lookup: FlowId, payload: Option<&[u8]>) {
        let Some(q) = self.own_queries.get_mut(&lookup) else {
            return;
        };
        let tcp = q.tcp;
        match &mut q.purpose {
            Purpose::Dial {
                name,
                how,
                pattern,
                ids,
                answered,
            } => {
                let answer = payload.and_then(dns::Answer::parse);
                let Some(answer) = answer else {
                    if payload.is_none() {
                        // An ICMP error: the upstream is not there.
                        *answered = 2;
                    }
                    return self.dial_answered(lookup, None);
                };
                if !ids.contains(&answer.id) || answer.name.as_deref() != Some(name.as_str()) {
                    self.stats.dropped("DNS answer for no query of the stack's");
                    return;
                }
                *answered += 1;
                let policy = &self.policy;
                let usable = answer
                    .addresses
                    .iter()
                    .map(|(ip, _)| canonical_ip_of(*ip))
                    .find(|ip| policy.internal_allowed(*ip));
                let (name, how, pattern) = (name.clone(), *how, pattern.clone());
                self.dial_answered(lookup, usable.map(|ip| (ip, name, how, pattern)));
            }
            Purpose::TcpDns { pending } => {
                let Some(payload) = payload else {
                    return;
                };
                let Some(answer) = dns::Answer::parse(payload) else {
                    self.stats.dropped("DNS answer the resolver cannot read");
                    return;
                };
                let Some(at) = pending.iter().position(|&i| i == answer.id) else {
                    self.stats.dropped("DNS answer for no query of the stack's");
                    return;
                };
                pending.swap_remove(at);
                if let Some(out) = self.filter_answer(payload) {
                    self.write_tcp_dns(tcp, &out);
                }
            }
        }
    }

    /// A dial lookup got an answer: connect to `found`, or fail once both
    /// queries came back with nothing usable.
    fn dial_answered(&mut self, lookup: FlowId, found: Option<(IpAddr, String, How, String)>) {
        let Some(q) = self.own_queries.get(&lookup) else {
            return;
        };
        let tcp = q.tcp;
        let Purpose::Dial {
            name,
            how,
            answered,
            ..
        } = &q.purpose
        else {
            return;
        };
        let Some((ip, name, how, pattern)) = found else {
            if *answered >= 2 {
                let why = format!("name {name} did not resolve to a usable address");
                let (name, how) = (name.clone(), *how);
                self.close_own_query(lookup);
                self.refuse_by_name(tcp, &why, Some((&name, how)));
            }
            return;
        };
        self.close_own_query(lookup);
        let Some(f) = self.tcp.get_mut(&tcp) else {
            return;
        };
        f.lookup = None;
        let port = f.key.1.port();
        let (src, dst, rule) = (f.key.0, f.key.1, f.rule);
        let to = SocketAddr::new(ip, port);
        match how {
            How::Sni => self.stats.sni_flows += 1,
            How::Host => self.stats.host_flows += 1,
        }
        self.stats.tcp_allowed += 1;
        let intercepted = self.intercept_if_ruled(tcp, &name, how);
        tracing::info!(target: "slipway::flow", flow = %tcp, proto = "tcp", %src, %dst,
            verdict = "allow", rule = %rule, name = %name, pattern = %pattern, dialed = %to,
            intercepted = intercepted.as_deref(), "new flow");
        self.requests.push_back(HostRequest::TcpConnect {
            flow: tcp,
            dst: to,
            name: Some(name),
        });
    }

    pub(super) fn close_own_query(&mut self, lookup: FlowId) {
        if self.own_queries.remove(&lookup).is_some() {
            self.requests
                .push_back(HostRequest::DatagramClose { flow: lookup });
        }
    }

    /// A flow a DNS pin allowed, open on the host: its first guest bytes
    /// wait until they are known not to front for a host the policy denies.
    fn check_held(&mut self, id: FlowId) {
        let Some((what, len, fin)) = self.first_bytes(id) else {
            return;
        };
        if len == 0 {
            // A server-first protocol: nothing from the guest yet.
            return;
        }
        match what {
            Sniff::Name { name, how } => {
                if self.policy.allows_name(&name).is_some() {
                    if let Some(rule) = self.intercept_if_ruled(id, &name, how) {
                        let f = &self.tcp[&id];
                        tracing::info!(target: "slipway::flow", flow = %id, proto = "tcp",
                            src = %f.key.0, dst = %f.key.1, name = %name,
                            intercepted = %rule, "intercepted, rule {rule}");
                    }
                    self.release(id);
                } else {
                    self.stats.fronting_refused += 1;
                    let why = format!("name {name} not allowed (on an address pinned for another)");
                    self.refuse_by_name(id, &why, Some((&name, how)));
                }
            }
            Sniff::NeedMore if len >= MAX_FIRST_BYTES => {
                self.stats.fronting_refused += 1;
                self.refuse_by_name(id, "no name in the first bytes", None);
            }
            Sniff::NeedMore if fin => self.release(id),
            Sniff::NeedMore => {
                let f = self.tcp.get_mut(&id).expect("held flow");
                if f.inspect_deadline.is_none() {
                    let at = self.now + FIRST_BYTES_TIMEOUT.into();
                    f.inspect_deadline = Some(at);
                    self.inspect_deadlines.insert((at, id));
                }
            }
            Sniff::NoName(_) | Sniff::Other => self.release(id),
        }
    }

    /// A TLS flow to an allowed `name` that a header rule matches is the
    /// interceptor's: the host is told before it may take a byte of the
    /// guest's (see `TcpFlow::intercept_pending`). Plain HTTP never is:
    /// no secret goes out in clear text. The rule's key, if one matched.
    fn intercept_if_ruled(&mut self, id: FlowId, name: &str, how: How) -> Option<String> {
        if how != How::Sni {
            return None;
        }
        let rule = self.policy.intercept_for(name)?.to_string();
        let f = self.tcp.get_mut(&id)?;
        f.intercept = Some(rule.clone());
        f.intercept_pending = true;
        let port = f.key.1.port();
        self.stats.intercepted_flows += 1;
        self.requests.push_back(HostRequest::Intercept {
            flow: id,
            name: name.to_string(),
            rule: rule.clone(),
            port,
        });
        Some(rule)
    }

    fn release(&mut self, id: FlowId) {
        self.clear_inspect_deadline(id);
        if let Some(f) = self.tcp.get_mut(&id) {
            f.held = false;
        }
    }

    /// First bytes that did not say enough in time.
    pub(super) fn inspect_timed_out(&mut self, id: FlowId) {
        let Some(f) = self.tcp.get_mut(&id) else {
            return;
        };
        f.inspect_deadline = None;
        if f.aborted {
            return;
        }
        if f.phase == TcpPhase::Open && f.held {
            self.stats.fronting_refused += 1;
        }
        self.refuse_by_name(id, "no name in the first bytes (timed out)", None);
    }

    // ----- DNS over TCP ----------------------------------------------------

    /// Take every whole DNS message the guest sent on a resolver connection.
    fn resolver_tcp_read(&mut self, id: FlowId) {
        loop {
            let Some(f) = self.tcp.get(&id) else {
                return;
            };
            let (src, handle) = (f.key.0, f.handle);
            let s = self.sockets.get_mut::<tcp::Socket>(handle);
            if s.state() == tcp::State::CloseWait && s.recv_queue() < 2 {
                // The guest is done asking; what it left is no whole query.
                s.close();
                return;
            }
            let mut len = [0u8; 2];
            if s.recv_queue() < 2 || s.peek_slice(&mut len) != Ok(2) {
                return;
            }
            let len = usize::from(u16::from_be_bytes(len));
            if len == 0 || 2 + len > s.recv_capacity() {
                return self.abort_resolver_tcp(id, "a DNS message of a bad length");
            }
            if s.recv_queue() < 2 + len {
                if s.state() == tcp::State::CloseWait {
                    s.close();
                }
                return;
            }
            let mut msg = vec![0u8; 2 + len];
            if s.recv_slice(&mut msg) != Ok(2 + len) {
                return;
            }
            self.dirty = true;
            let msg = &msg[2..];
            if !services::looks_like_dns_query(msg) {
                return self.abort_resolver_tcp(id, "not a DNS query");
            }
            match self.filter_query(src, msg) {
                QueryFate::Forward => self.forward_tcp_query(id, msg),
                QueryFate::Answer(reply) => self.write_tcp_dns(id, &reply),
                QueryFate::Drop => {}
            }
        }
    }

    fn abort_resolver_tcp(&mut self, id: FlowId, why: &'static str) {
        self.stats.dropped(why);
        if let Some(f) = self.tcp.get_mut(&id) {
            f.aborted = true;
            let handle = f.handle;
            self.sockets.get_mut::<tcp::Socket>(handle).abort();
        }
    }

    /// Ask the upstream over UDP, on the connection's own query flow.
    fn forward_tcp_query(&mut self, id: FlowId, msg: &[u8]) {
        let Some(upstream) = self.cfg.dns_upstream else {
            self.stats.dropped("DNS query with no upstream");
            return;
        };
        let qid = u16::from_be_bytes([msg[0], msg[1]]);
        let lookup = match self.tcp.get(&id).and_then(|f| f.lookup) {
            Some(l) => l,
            None => {
                let l = self.alloc_flow();
                self.requests.push_back(HostRequest::DatagramOpen {
                    flow: l,
                    kind: DatagramKind::Udp,
                    dst: upstream,
                });
                self.own_queries.insert(
                    l,
                    OwnQuery {
                        tcp: id,
                        purpose: Purpose::TcpDns {
                            pending: Vec::new(),
                        },
                    },
                );
                if let Some(f) = self.tcp.get_mut(&id) {
                    f.lookup = Some(l);
                }
                l
            }
        };
        let Some(OwnQuery {
            purpose: Purpose::TcpDns { pending },
            ..
        }) = self.own_queries.get_mut(&lookup)
        else {
            return;
        };
        if pending.len() >= TCP_DNS_IN_FLIGHT {
            self.stats
                .dropped("DNS over TCP: too many queries in flight");
            return;
        }
        pending.push(qid);
        self.requests.push_back(HostRequest::DatagramSend {
            flow: lookup,
            payload: msg.to_vec(),
        });
    }

    /// One DNS message to the guest on a resolver connection, whole or
    /// not at all (the guest asks again).
    fn write_tcp_dns(&mut self, id: FlowId, msg: &[u8]) {
        let Some(f) = self.tcp.get(&id) else {
            return;
        };
        let Ok(len) = u16::try_from(msg.len()) else {
            return;
        };
        let s = self.sockets.get_mut::<tcp::Socket>(f.handle);
        if !s.may_send() || s.send_capacity() - s.send_queue() < 2 + msg.len() {
            self.stats.dropped("DNS over TCP: the guest is not reading");
            return;
        }
        let _ = s.send_slice(&len.to_be_bytes());
        let _ = s.send_slice(msg);
        self.dirty = true;
    }

    /// A flow that never had a host socket and is gone: its own queries go too.
    pub(super) fn forget_inspection(&mut self, id: FlowId, f: &tcp_flow::TcpFlow) {
        if let Some(at) = f.inspect_deadline {
            self.inspect_deadlines.remove(&(at, id));
        }
        if let Some(l) = f.lookup {
            self.close_own_query(l);
        }
    }

    /// Abort a dial in progress (its connect failed or timed out).
    pub(super) fn dial_failed(&mut self, id: FlowId, err: ConnectError) {
        let Some(f) = self.tcp.get_mut(&id) else {
            return;
        };
        let (src, dst, handle, lookup) = (f.key.0, f.key.1, f.handle, f.lookup.take());
        f.aborted = true;
        if let Some(l) = lookup {
            self.close_own_query(l);
        }
        tracing::info!(target: "slipway::flow", flow = %id, proto = "tcp", %src, %dst, error = ?err,
            name = self.tcp.get(&id).and_then(|f| f.name.as_deref()), "host connect failed");
        let s = self.sockets.get_mut::<tcp::Socket>(handle);
        s.abort();
    }
}

fn canonical_ip_of(ip: IpAddr) -> IpAddr {
    crate::policy::canonical_ip(ip)
}
