//! Datagram flows: UDP (DNS included) and ICMP echo, relayed per 5-tuple
//! without smoltcp, each forgotten after its idle timeout.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct DatagramKey {
    pub(super) kind: DatagramKind,
    pub(super) guest: SocketAddr,
    pub(super) peer: SocketAddr,
}

pub(super) struct DatagramFlow {
    pub(super) key: DatagramKey,
    /// The name whose pin allowed the flow, if one did.
    pub(super) pin_name: Option<String>,
    pub(super) deadline: Instant,
    pub(super) idle: Duration,
    pub(super) started: Instant,
    pub(super) to_host: u64,
    pub(super) to_guest: u64,
}

pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Stack {
    pub(super) fn on_udp(
        &mut self,
        now: Instant,
        ip: &[u8],
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) {
        if dst.port() == 67 && src.port() == 68 {
            let reply = services::dhcp_reply(&self.cfg, self.gateway_mac, payload);
            return self.emit(reply);
        }
        if self.is_broadcast_or_multicast(dst.ip()) {
            // No ICMP errors for these (RFC 1122); the policy never relays them.
            self.stats.dropped("UDP to broadcast or multicast");
            return;
        }
        let dns = self.is_resolver(dst);
        if dns && !services::looks_like_dns_query(payload) {
            self.stats.dropped("not a DNS query");
            return;
        }
        if dns && self.filters_names() {
            match self.filter_query(src, payload) {
                QueryFate::Forward => {}
                QueryFate::Answer(reply) => {
                    let frame = self.builder().udp(dst, src, &reply);
                    return self.emit(frame);
                }
                QueryFate::Drop => return,
            }
        }
        let Some((host_dst, decided_on, exempt)) = self.redirect(dst) else {
            let from = dst.ip();
            let err = self.builder().unreachable(from, ip, Unreachable::Port);
            return self.emit(err);
        };
        let key = DatagramKey {
            kind: DatagramKind::Udp,
            guest: src,
            peer: dst,
        };
        let idle = if dns {
            self.cfg.dns_timeout
        } else {
            self.cfg.udp_idle_timeout
        };
        self.relay_datagram(
            now,
            ip,
            key,
            host_dst,
            decided_on,
            exempt,
            idle,
            payload.to_vec(),
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_echo(
        &mut self,
        now: Instant,
        ip: &[u8],
        src: IpAddr,
        dst: IpAddr,
        ident: u16,
        seq: u16,
        data: &[u8],
    ) {
        if self.cfg.plan.is_own(dst) {
            // A request over the link MTU would come back over it too; drop it
            // as a link of that MTU would have.
            if ip.len() > self.cfg.mtu {
                self.stats.dropped("echo request over the MTU");
                return;
            }
            let reply = self.builder().echo_reply(dst, src, ident, seq, data);
            return self.emit(reply);
        }
        if self.is_broadcast_or_multicast(dst) {
            self.stats.dropped("echo to broadcast or multicast");
            return;
        }
        let Some((host_dst, decided_on, exempt)) = self.redirect(SocketAddr::new(dst, 0)) else {
            return;
        };
        let key = DatagramKey {
            kind: DatagramKind::IcmpEcho,
            guest: SocketAddr::new(src, ident),
            peer: SocketAddr::new(dst, 0),
        };
        let mut msg = Vec::with_capacity(8 + data.len());
        msg.push(if src.is_ipv4() { 8 } else { 128 });
        msg.extend_from_slice(&[0, 0, 0]);
        msg.extend_from_slice(&ident.to_be_bytes());
        msg.extend_from_slice(&seq.to_be_bytes());
        msg.extend_from_slice(data);
        let idle = self.cfg.udp_idle_timeout;
        self.relay_datagram(now, ip, key, host_dst, decided_on, exempt, idle, msg);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn relay_datagram(
        &mut self,
        now: Instant,
        ip: &[u8],
        key: DatagramKey,
        host_dst: SocketAddr,
        decided_on: IpAddr,
        exempt: bool,
        idle: Duration,
        payload: Vec<u8>,
    ) {
        let proto = match key.kind {
            DatagramKind::Udp => "udp",
            DatagramKind::IcmpEcho => "icmp",
        };
        let flow = match self.datagram_by_key.get(&key) {
            Some(&flow) => flow,
            None => {
                let (verdict, pin_name) = if self.is_resolver(key.peer) && self.filters_names() {
                    // The query was filtered by name: the resolver's own
                    // upstream is no destination the guest chose.
                    let resolver = Verdict {
                        allowed: true,
                        rule: Rule::Resolver,
                    };
                    (resolver, None)
                } else {
                    self.decide(decided_on, exempt)
                };
                let over_cap = self.datagram.len() >= self.cfg.caps.max_datagram_flows;
                if !verdict.allowed || over_cap {
                    let cap = if verdict.allowed {
                        self.stats.hit_cap("max_datagram_flows");
                        Some("max_datagram_flows")
                    } else {
                        self.stats.datagram_denied += 1;
                        None
                    };
                    self.log_refusal(proto, key.guest, key.peer, verdict, cap);
                    let err = self.builder().unreachable(
                        self.cfg.plan.gateway_for(key.peer.ip()),
                        ip,
                        Unreachable::Prohibited,
                    );
                    return self.emit(err);
                }
                self.stats.datagram_allowed += 1;
                if pin_name.is_some() {
                    self.stats.pinned_flows += 1;
                }
                log_decision(
                    proto,
                    key.guest,
                    key.peer,
                    verdict,
                    None,
                    pin_name.as_deref(),
                );
                let flow = self.alloc_flow();
                self.datagram.insert(
                    flow,
                    DatagramFlow {
                        key,
                        pin_name,
                        deadline: now + idle.into(),
                        idle,
                        started: now,
                        to_host: 0,
                        to_guest: 0,
                    },
                );
                self.datagram_by_key.insert(key, flow);
                self.requests.push_back(HostRequest::DatagramOpen {
                    flow,
                    kind: key.kind,
                    dst: host_dst,
                });
                self.next_sweep.get_or_insert(now + SWEEP_EVERY.into());
                flow
            }
        };
        if let Some(f) = self.datagram.get_mut(&flow) {
            f.deadline = now + f.idle.into();
            f.to_host += payload.len() as u64;
        }
        self.stats.bytes_to_host += payload.len() as u64;
        self.requests
            .push_back(HostRequest::DatagramSend { flow, payload });
    }

    /// Whether the driver may read more datagrams from host sockets now.
    pub fn wants_host_datagrams(&self) -> bool {
        !self.tx.is_full()
    }

    /// A datagram (UDP payload, or a whole ICMP echo reply) from the host side of `flow`.
    pub(super) fn datagram_from_host(&mut self, now: Instant, flow: FlowId, payload: &[u8]) {
        let Some(peer) = self.datagram.get(&flow).map(|f| f.key.peer) else {
            return;
        };
        // IPv6 header + UDP header is the most any reply adds to the payload.
        if self.tx.is_full() {
            self.stats
                .dropped("host datagram while the guest queue is full");
            return;
        }
        if payload.len() + 48 > self.cfg.mtu {
            self.stats.dropped("host datagram over the MTU");
            return;
        }
        let filtered;
        let payload = if self.is_resolver(peer) && self.filters_names() {
            match self.filter_answer(payload) {
                Some(p) => {
                    filtered = p;
                    &filtered[..]
                }
                None => return,
            }
        } else {
            payload
        };
        let Some(f) = self.datagram.get_mut(&flow) else {
            return;
        };
        f.deadline = now + f.idle.into();
        f.to_guest += payload.len() as u64;
        self.stats.bytes_to_guest += payload.len() as u64;
        let key = f.key;
        let frame = match key.kind {
            DatagramKind::Udp => self.builder().udp(key.peer, key.guest, payload),
            DatagramKind::IcmpEcho => {
                // Echo reply: type 0 / 129, code, checksum, ident (the kernel's), seq, data.
                if payload.len() < 8 || !(payload[0] == 0 || payload[0] == 129) {
                    return;
                }
                let seq = u16::from_be_bytes([payload[6], payload[7]]);
                self.builder().echo_reply(
                    key.peer.ip(),
                    key.guest.ip(),
                    key.guest.port(),
                    seq,
                    &payload[8..],
                )
            }
        };
        self.emit(frame);
    }

    /// The host reported an error on a datagram flow (e.g. ICMP port unreachable
    /// on a connected UDP socket); tell the guest the same.
    pub(super) fn datagram_host_error(&mut self, flow: FlowId, why: Unreachable) {
        let Some(f) = self.datagram.get(&flow) else {
            return;
        };
        if f.key.kind != DatagramKind::Udp {
            return;
        }
        let Some(quoted) = wire::synthetic_udp(f.key.guest, f.key.peer) else {
            return;
        };
        let err =
            self.builder()
                .unreachable(self.cfg.plan.gateway_for(f.key.peer.ip()), &quoted, why);
        self.emit(err);
    }

    pub(super) fn close_datagram(&mut self, flow: FlowId, why: &str) {
        if let Some(f) = self.datagram.remove(&flow) {
            self.datagram_by_key.remove(&f.key);
            tracing::info!(
                target: "slipway::flow",
                flow = %flow,
                kind = ?f.key.kind,
                src = %f.key.guest,
                dst = %f.key.peer,
                to_host = f.to_host,
                to_guest = f.to_guest,
                secs = (self.now - f.started).secs(),
                why,
                "datagram flow closed"
            );
            self.requests.push_back(HostRequest::DatagramClose { flow });
        }
    }

    pub(super) fn sweep_datagrams(&mut self, now: Instant) {
        let expired: Vec<FlowId> = self
            .datagram
            .iter()
            .filter(|(_, f)| now >= f.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.close_datagram(id, "idle");
        }
        self.next_sweep = (!self.datagram.is_empty()).then(|| now + SWEEP_EVERY.into());
    }
}
