//! Header injection on outbound HTTPS (E2B's network `rules`): for a TLS
//! flow whose SNI a sandbox's rule names (and whose name the policy
//! allows), slipway terminates the guest's TLS with a leaf of the
//! sandbox's own CA, opens verified TLS to the real server, and gives every
//! request the rule's headers, their `${e2b.secrets.NAME}` placeholders
//! resolved from secrets the guest never sees.
//!
//! Rooms: `rules` (hostile JSON and flags → `HeaderRules`), `secrets` (the
//! store, wiped on drop), `ca` (the sandbox's CA and its leaves),
//! `upstream` (verified client TLS), `proxy` (one connection), `rewrite`
//! (one request's head, without I/O), and here the
//! per-sandbox `Injector` that the stack's driver hands flows to.

pub mod ca;
mod proxy;
pub mod rewrite;
pub mod rules;
pub mod secrets;
pub mod upstream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use netstack::driver::{InterceptedFlow, Interceptor, SharedInterceptor};
use tokio::sync::Semaphore;

pub use ca::{CaError, SandboxCa};
pub use rules::{HeaderRules, RuleError};
pub use secrets::{SecretError, SecretStore};
pub use upstream::{UpstreamError, UpstreamTls};

/// Intercepted connections one sandbox may have open at once; more are
/// closed at once (the guest sees its connection end). With the HTTP/2
/// windows and HTTP/1.1 buffers each holds (under 1 MiB), a sandbox's
/// interception holds about 100 MiB at the very most.
pub const MAX_CONNECTIONS: usize = 128;

/// Counters of one sandbox's interception (never a value).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InjectCounts {
    /// Connections handed over by the stack.
    pub connections: u64,
    /// ... closed at once because the sandbox had `MAX_CONNECTIONS` open.
    pub refused_over_cap: u64,
    pub requests: u64,
    /// Requests that were given a rule's headers.
    pub transformed: u64,
    /// Requests answered 421: their Host or :authority was not the SNI.
    pub misdirected: u64,
    /// Servers whose certificate failed verification (nothing sent).
    pub upstream_unverified: u64,
    /// Servers that failed otherwise (TLS, HTTP, gone).
    pub upstream_failed: u64,
    /// Requests refused because a secret their rule names is not set.
    pub missing_secret: u64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Stat {
    Connection,
    OverCap,
    Request,
    Transformed,
    Misdirected,
    UpstreamUnverified,
    UpstreamFailed,
    MissingSecret,
}

#[derive(Debug, Default)]
struct Counters([AtomicU64; 8]);

/// What one sandbox's intercepted connections share.
pub(crate) struct Shared {
    ca: SandboxCa,
    rules: RwLock<Arc<HeaderRules>>,
    secrets: SecretStore,
    upstream: UpstreamTls,
    counters: Counters,
    slots: Arc<Semaphore>,
}

impl Shared {
    pub(crate) fn count(&self, stat: Stat) {
        self.counters.0[stat as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rules(&self) -> Arc<HeaderRules> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One sandbox's header injection: its CA, its rules (replaced whole on
/// update), the process's secrets and upstream trust. Cheap to clone.
#[derive(Clone)]
pub struct Injector {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector")
            .field("rules", &self.shared.rules().keys())
            .finish_non_exhaustive()
    }
}

impl Injector {
    /// A new CA for `sandbox` (its id), and these rules. The rules'
    /// secrets should have been checked against `secrets` already
    /// (`HeaderRules::check_secrets`); one that goes missing later fails
    /// its requests (502), never sends the placeholder.
    pub fn new(
        sandbox: &str,
        rules: HeaderRules,
        secrets: SecretStore,
        upstream: UpstreamTls,
    ) -> Result<Injector, CaError> {
        Ok(Injector {
            shared: Arc::new(Shared {
                ca: SandboxCa::new(sandbox)?,
                rules: RwLock::new(Arc::new(rules)),
                secrets,
                upstream,
                counters: Counters::default(),
                slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            }),
        })
    }

    /// For the stack's driver (`Driver::set_interceptor`).
    pub fn interceptor(&self) -> SharedInterceptor {
        Arc::new(self.clone())
    }

    /// The sandbox's CA certificate (PEM), for the guest to trust.
    pub fn ca_pem(&self) -> &str {
        self.shared.ca.cert_pem()
    }

    pub fn rules(&self) -> Arc<HeaderRules> {
        self.shared.rules()
    }

    /// Replace the rules (with the policy that carries their keys):
    /// connections from now on use them.
    pub fn set_rules(&self, rules: HeaderRules) {
        *self.shared.rules.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
    }

    pub fn counts(&self) -> InjectCounts {
        let c = |s: Stat| self.shared.counters.0[s as usize].load(Ordering::Relaxed);
        InjectCounts {
            connections: c(Stat::Connection),
            refused_over_cap: c(Stat::OverCap),
            requests: c(Stat::Request),
            transformed: c(Stat::Transformed),
            misdirected: c(Stat::Misdirected),
            upstream_unverified: c(Stat::UpstreamUnverified),
            upstream_failed: c(Stat::UpstreamFailed),
            missing_secret: c(Stat::MissingSecret),
        }
    }
}

impl Interceptor for Injector {
    fn intercept(&self, flow: InterceptedFlow) {
        self.shared.count(Stat::Connection);
        let Ok(slot) = self.shared.slots.clone().try_acquire_owned() else {
            self.shared.count(Stat::OverCap);
            tracing::info!(target: "slipway::inject", flow = %flow.flow, name = %flow.name,
                cap = MAX_CONNECTIONS, "intercepted connection refused: the sandbox has too many open");
            return;
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            proxy::serve(shared, flow).await;
            drop(slot);
        });
    }
}

/// An error and its causes on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
