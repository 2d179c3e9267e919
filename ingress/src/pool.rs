//! Idle HTTP/1.1 connections into one sandbox, kept for the next request to
//! the same port: a new connection costs a TCP handshake inside the stack and
//! an accept in the guest, which for small requests is most of the work.
//!
//! Kept per port and per the token that opened them: a way in through
//! another host (`slipway edge`'s tunnels) had the token checked there when
//! it opened, so a connection is only reused for the same token.
//!
//! Bounded: a few idle connections per port, each forgotten after a short
//! idle time. An idle connection holds no slot under the sandbox's cap (it
//! serves no one); the stack's own inbound cap leaves room for them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

use crate::target::GuestPort;
use crate::token::TokenDigest;
use crate::Body;

/// Idle connections kept per guest port (per port and SNI on httpsPorts).
pub const MAX_IDLE_PER_PORT: usize = 16;
/// Idle connections kept per sandbox, all ports together.
pub const MAX_IDLE: usize = 64;
/// How long an idle connection is kept: shorter than the common servers'
/// keep-alive timeouts (Node.js: 5 s), so the guest rarely closes one just as
/// a request goes out on it.
pub const IDLE_FOR: Duration = Duration::from_secs(4);
/// How long a pooled connection may take to be ready for the next request.
const READY_WAIT: Duration = Duration::from_millis(20);

/// A kept connection and since when it is idle.
type Kept = (SendRequest<Body>, Instant);

/// What a kept connection may serve again: the same guest port, the digest
/// of the token presented when it opened (`None` for a public sandbox) and,
/// on an httpsPorts port, the same SNI (a guest may serve other sites by
/// name).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub port: GuestPort,
    pub token: Option<[u8; 32]>,
    /// The host its TLS session named; `None` on a plain port.
    pub tls_host: Option<String>,
}

impl PoolKey {
    pub fn new(port: GuestPort, presented: Option<&TokenDigest>, tls_host: Option<String>) -> Self {
        Self {
            port,
            token: presented.map(TokenDigest::bytes),
            tls_host,
        }
    }
}

#[derive(Default)]
pub(crate) struct GuestPool {
    idle: Mutex<HashMap<PoolKey, Vec<Kept>>>,
}

impl GuestPool {
    /// A ready connection for `key`, if one is idle.
    pub async fn take(&self, key: &PoolKey) -> Option<SendRequest<Body>> {
        loop {
            let (mut sender, since) = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.get_mut(key)?.pop()?
            };
            if since.elapsed() > IDLE_FOR || sender.is_closed() {
                continue;
            }
            if sender.is_ready() {
                return Some(sender);
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
                return Some(sender);
            }
        }
    }

    /// Keep a connection whose last response was read to the end.
    pub fn give_back(&self, key: PoolKey, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for list in idle.values_mut() {
            list.retain(|(s, since)| !s.is_closed() && now - *since <= IDLE_FOR);
        }
        idle.retain(|_, list| !list.is_empty());
        let total: usize = idle.values().map(Vec::len).sum();
        let list = idle.entry(key).or_default();
        if total < MAX_IDLE && list.len() < MAX_IDLE_PER_PORT {
            list.push((sender, now));
        }
    }

    /// Idle connections held now.
    pub fn len(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.values().map(Vec::len).sum()
    }
}
