//! Every sandbox this process serves: its stack's driver (a task of its own
//! on the multi-thread runtime), its route in the shared gateway directory,
//! its policy as asked, and how to tear it all down. Creation happens under
//! the registry's lock and either completes or leaves nothing behind.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ingress::token::NoRandomness;
use ingress::{Directory, Route, RouteSpec, SandboxId};
use netstack::driver::{DriverHandle, Parked, Snapshot};
use netstack::{AddressPlan, Stack};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::Instrument;

use vmm_glue::transport::{FdOwner, OpenOptions};
use vmm_glue::{Transport, TransportError, TransportSpec};

use super::api::{CreateSandbox, Egress, NetworkUpdate};
use super::secrets::InjectBase;
use super::settings::SandboxDefaults;
use super::view::{
    CountersView, EgressProxyView, GuestView, NetworkView, SandboxView, TransportView,
};
use crate::door::StackDoor;

/// How long a sandbox's driver may take to answer a question or to stop.
const DRIVER_ANSWER: Duration = Duration::from_secs(2);
/// How long GET waits for a sandbox's counters: a sandbox waiting for its
/// VMM has no driver to answer, and shows none.
const COUNTERS_WAIT: Duration = Duration::from_millis(250);

/// Why the registry refused or failed a request. `control` alone turns
/// these into HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("slipway is shutting down")]
    Draining,
    #[error("sandbox {0} not found")]
    NotFound(SandboxId),
    #[error("sandbox {0} already exists")]
    Exists(SandboxId),
    #[error("this slipway serves its limit of {0} sandboxes (sandbox.max_sandboxes)")]
    Full(usize),
    #[error("{} is sandbox {owner}'s socket", path.display())]
    SocketTaken { path: PathBuf, owner: SandboxId },
    /// Confinement fences this transport off (confine.socket_dirs, confine.tap_fd).
    #[error("{why}")]
    Fenced { spec: TransportSpec, why: String },
    /// The transport would not open; the spec says which request field.
    #[error("{source}")]
    Transport {
        spec: TransportSpec,
        #[source]
        source: TransportError,
    },
    #[error(transparent)]
    Random(#[from] NoRandomness),
    #[error("sandbox {id}'s network is not running ({state}): delete it")]
    NotRunning { id: SandboxId, state: String },
    #[error("sandbox {0} allows public traffic: it has no traffic access token")]
    NoToken(SandboxId),
    /// A rule names a secret that is not set (checked at create and update).
    #[error(transparent)]
    Rules(#[from] inject::RuleError),
    #[error(transparent)]
    Secret(#[from] inject::SecretError),
    #[error("secret {0} is not set")]
    NoSecret(String),
    #[error(
        "secret {name} is used by the header rules of sandbox {users}: change their rules first"
    )]
    SecretInUse { name: String, users: String },
    #[error("cannot make sandbox {id}'s CA")]
    Ca {
        id: SandboxId,
        #[source]
        source: inject::CaError,
    },
}

/// What became of a sandbox's link.
#[derive(Debug, Clone)]
pub enum LinkState {
    Running,
    Stopped,
    Failed(String),
}

impl LinkState {
    fn describe(&self) -> String {
        match self {
            LinkState::Running => "running".into(),
            LinkState::Stopped => "stopped".into(),
            LinkState::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// The egress rules as asked (for GET), beside the built policy the driver holds.
#[derive(Debug, Clone)]
struct AskedEgress {
    allow_internet_access: bool,
    allow_out: Vec<String>,
    deny_out: Vec<String>,
    /// In force: as asked, or the sandbox's default when not given.
    dns_servers: Vec<IpAddr>,
    /// What GET shows of it: no password, no CA.
    egress_proxy: Option<EgressProxyView>,
}

impl AskedEgress {
    fn new(e: &Egress, default_dns_servers: &[IpAddr]) -> Self {
        Self {
            allow_internet_access: e.allow_internet_access,
            allow_out: e.allow_out.clone(),
            deny_out: e.deny_out.clone(),
            dns_servers: dns_servers_in_force(e, default_dns_servers),
            egress_proxy: e.egress_proxy.as_ref().map(EgressProxyView::from),
        }
    }
}

/// The DNS servers a sandbox's resolver answers for: those asked, else the default.
fn dns_servers_in_force(e: &Egress, default: &[IpAddr]) -> Vec<IpAddr> {
    match &e.dns_servers {
        Some(asked) => asked.iter().copied().map(IpAddr::V4).collect(),
        None => default.to_vec(),
    }
}

pub struct Sandbox {
    pub id: SandboxId,
    pub handle: DriverHandle,
    route: Arc<Route>,
    transport: TransportSpec,
    transport_detail: String,
    pub state: Arc<Mutex<LinkState>>,
    egress: Mutex<AskedEgress>,
    /// dnsServers when a request leaves them out (serve's stack default).
    default_dns_servers: Vec<IpAddr>,
    /// Its CA and header rules (replaced with the policy).
    pub injector: inject::Injector,
    allow_public_traffic: bool,
    mask_request_host: Option<String>,
    https_ports: Vec<u16>,
    plan: AddressPlan,
    mtu: usize,
    created_at: SystemTime,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Sandbox {
    /// Its route in the gateway directory (the cluster publishes its token
    /// digest and mask).
    pub fn route(&self) -> &Arc<Route> {
        &self.route
    }

    pub fn transport_kind(&self) -> &'static str {
        self.transport.kind()
    }

    pub fn is_running(&self) -> bool {
        matches!(*lock(&self.state), LinkState::Running)
    }

    fn view(&self, token: Option<String>, snapshot: Option<&Snapshot>) -> SandboxView {
        let plan = &self.plan;
        let egress = lock(&self.egress).clone();
        SandboxView {
            sandbox_id: self.id.to_string(),
            transport: TransportView {
                kind: self.transport.kind(),
                detail: self.transport_detail.clone(),
                state: lock(&self.state).describe(),
            },
            guest: GuestView {
                ipv4: format!("{}/{}", plan.guest_v4, plan.prefix_v4),
                gateway_v4: plan.gateway_v4.to_string(),
                dns_v4: plan.dns_v4.to_string(),
                ipv6: format!("{}/{}", plan.guest_v6, plan.prefix_v6),
                gateway_v6: plan.gateway_v6_link_local.to_string(),
                dns_v6: plan.dns_v6.to_string(),
                mtu: self.mtu,
            },
            allow_internet_access: egress.allow_internet_access,
            network: NetworkView {
                allow_out: egress.allow_out,
                deny_out: egress.deny_out,
                dns_servers: egress.dns_servers.iter().map(IpAddr::to_string).collect(),
                allow_public_traffic: self.allow_public_traffic,
                mask_request_host: self.mask_request_host.clone(),
                egress_proxy: egress.egress_proxy,
                https_ports: self.https_ports.clone(),
                rules: {
                    let rules = self.injector.rules();
                    (!rules.is_empty()).then(|| rules.to_json())
                },
            },
            ca_cert: None,
            traffic_access_token: token,
            created_at: self
                .created_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            counters: snapshot.map(|s| CountersView::new(s, self.injector.counts())),
        }
    }

    /// The stack's counters, if its driver answers in time.
    pub async fn snapshot(&self, within: Duration) -> Option<Snapshot> {
        tokio::time::timeout(within, self.handle.snapshot())
            .await
            .ok()
            .flatten()
    }

    /// Reset every flow (the guest and the host peers get RSTs), stop the
    /// driver and wait for it: its link, sockets and buffers are freed.
    async fn tear_down(&self) {
        // Every flow is reset: the driver takes the command in the round it
        // runs after being told to stop (see `drive`), sends the RSTs to the
        // guest, and closes the host sockets with RST. A sandbox waiting for
        // its VMM has no flows and stops at once.
        self.handle.reset_flows();
        if let Some(stop) = lock(&self.stop).take() {
            let _ = stop.send(());
        }
        let task = lock(&self.task).take();
        if let Some(mut task) = task {
            if tokio::time::timeout(DRIVER_ANSWER, &mut task)
                .await
                .is_err()
            {
                tracing::warn!(sandbox = %self.id, "the sandbox's driver did not stop in time; aborting it");
                task.abort();
            }
        }
    }
}

pub struct Registry {
    sandboxes: Mutex<HashMap<SandboxId, Arc<Sandbox>>>,
    pub directory: Arc<Directory>,
    /// Where the sandboxes' drivers run.
    runtime: tokio::runtime::Handle,
    /// Connections from the gateway into guests, alive now.
    pub guest_connections: Arc<AtomicUsize>,
    draining: AtomicBool,
    /// The secrets and upstream trust every sandbox's header rules use.
    inject: InjectBase,
}

impl Registry {
    pub fn new(runtime: tokio::runtime::Handle, inject: InjectBase) -> Self {
        Self {
            sandboxes: Mutex::new(HashMap::new()),
            directory: Arc::new(Directory::new()),
            runtime,
            guest_connections: Arc::new(AtomicUsize::new(0)),
            draining: AtomicBool::new(false),
            inject,
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.sandboxes).len()
    }

    pub fn all(&self) -> Vec<Arc<Sandbox>> {
        let mut all: Vec<_> = lock(&self.sandboxes).values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    pub fn get(&self, id: &SandboxId) -> Result<Arc<Sandbox>, RegistryError> {
        lock(&self.sandboxes)
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(id.clone()))
    }

    /// Create a sandbox: open its transport, build its stack, route it, start
    /// its driver. `caller` is the requesting process (for `tapFd`).
    pub fn create(
        &self,
        req: CreateSandbox,
        caller: Option<i32>,
        defaults: &SandboxDefaults,
    ) -> Result<SandboxView, RegistryError> {
        let mut sandboxes = lock(&self.sandboxes);
        if self.draining.load(Ordering::Relaxed) {
            return Err(RegistryError::Draining);
        }
        let id = match req.id {
            Some(id) => id,
            None => unused_id(&sandboxes)?,
        };
        if sandboxes.contains_key(&id) {
            return Err(RegistryError::Exists(id));
        }
        if sandboxes.len() >= defaults.max_sandboxes {
            return Err(RegistryError::Full(defaults.max_sandboxes));
        }
        if let Some(path) = req.transport.socket_path() {
            if let Some(other) = sandboxes
                .values()
                .find(|s| s.transport.socket_path() == Some(path))
            {
                return Err(RegistryError::SocketTaken {
                    path: path.clone(),
                    owner: other.id.clone(),
                });
            }
        }
        let secrets = &self.inject.secrets;
        req.egress.rules.check_secrets(|n| secrets.contains(n))?;
        let injector = inject::Injector::new(
            id.as_str(),
            req.egress.rules.clone(),
            self.inject.secrets.clone(),
            self.inject.upstream.clone(),
        )
        .map_err(|source| RegistryError::Ca {
            id: id.clone(),
            source,
        })?;
        let transport = open(&req.transport, caller, defaults.stack.mtu)?;
        let transport_detail = transport.describe();
        let mut cfg = defaults.stack.clone();
        cfg.random_seed = random_u64()?;
        let default_dns_servers = cfg.dns_servers.clone();
        cfg.dns_servers = dns_servers_in_force(&req.egress, &default_dns_servers);
        let (plan, mtu) = (cfg.plan.clone(), cfg.mtu);
        let stack = Stack::new(cfg, req.egress.policy.clone(), std::time::Instant::now());
        let mut parked = Parked::new(stack);
        parked.set_egress_proxy(req.egress.egress_proxy.clone());
        parked.set_interceptor(injector.interceptor());
        let handle = parked.handle();
        let door = StackDoor::new(handle.clone(), self.guest_connections.clone());
        let spec = RouteSpec {
            allow_public_traffic: req.public.allow_public_traffic,
            mask_request_host: req.public.mask_request_host.as_ref().map(|m| m.1.clone()),
            max_connections: defaults.max_inbound,
            https_ports: req.public.https_ports.clone(),
        };
        let (route, token) = Route::new(Arc::new(door), spec)?;
        // Nothing can fail from here on.
        let route = self.directory.insert(id.clone(), route);
        let state = Arc::new(Mutex::new(LinkState::Running));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = self.runtime.spawn(
            drive(parked, transport, stopped, state.clone())
                .instrument(tracing::info_span!("sandbox", id = %id)),
        );
        let sandbox = Arc::new(Sandbox {
            id: id.clone(),
            handle,
            route,
            transport: req.transport,
            transport_detail,
            state,
            egress: Mutex::new(AskedEgress::new(&req.egress, &default_dns_servers)),
            default_dns_servers,
            injector,
            allow_public_traffic: req.public.allow_public_traffic,
            mask_request_host: req.public.mask_request_host.map(|m| m.0),
            https_ports: req.public.https_ports.iter().map(|p| p.get()).collect(),
            plan,
            mtu,
            created_at: SystemTime::now(),
            stop: Mutex::new(Some(stop)),
            task: Mutex::new(Some(task)),
        });
        let mut view = sandbox.view(token.map(|t| t.as_str().to_string()), None);
        view.ca_cert = Some(sandbox.injector.ca_pem().to_string());
        sandboxes.insert(id, sandbox);
        tracing::info!(sandbox = %view.sandbox_id, transport = %view.transport.detail, "sandbox created");
        Ok(view)
    }

    pub fn list(&self) -> Vec<SandboxView> {
        self.all().iter().map(|s| s.view(None, None)).collect()
    }

    /// One sandbox with its counters (null when its driver does not answer).
    pub async fn describe(&self, id: &SandboxId) -> Result<SandboxView, RegistryError> {
        let sandbox = self.get(id)?;
        let snapshot = sandbox.snapshot(COUNTERS_WAIT).await;
        Ok(sandbox.view(None, snapshot.as_ref()))
    }

    /// Replace the egress configuration whole (E2B's PUT: what the update
    /// leaves out goes back to its default): the policy, whose newly denied
    /// flows the driver resets, and the DNS servers its resolver answers for.
    pub fn set_network(&self, id: &SandboxId, update: NetworkUpdate) -> Result<(), RegistryError> {
        let sandbox = self.get(id)?;
        let secrets = &self.inject.secrets;
        update.egress.rules.check_secrets(|n| secrets.contains(n))?;
        let mut asked = lock(&sandbox.egress);
        let fresh = AskedEgress::new(&update.egress, &sandbox.default_dns_servers);
        // Rules first: a flow the new policy marks finds its rule. A flow
        // the old one marked meanwhile may find none and gets no header:
        // never a header for a name whose rule is gone.
        let old_rules = sandbox.injector.rules();
        sandbox.injector.set_rules(update.egress.rules.clone());
        // Both commands go down the driver's one queue, in this order; a
        // closed queue refuses the first.
        if !sandbox.handle.set_policy(update.egress.policy.clone())
            || !sandbox.handle.set_dns_servers(fresh.dns_servers.clone())
        {
            sandbox.injector.set_rules((*old_rules).clone());
            return Err(RegistryError::NotRunning {
                id: id.clone(),
                state: lock(&sandbox.state).describe(),
            });
        }
        // Flows opened from now on take the new path; open ones keep theirs.
        sandbox
            .handle
            .set_egress_proxy(update.egress.egress_proxy.clone());
        *asked = fresh;
        let egress_proxy = asked.egress_proxy.as_ref().map(|p| p.address.as_str());
        tracing::info!(sandbox = %id, allow_out = ?asked.allow_out, deny_out = ?asked.deny_out,
                       allow_internet_access = asked.allow_internet_access,
                       dns_servers = ?asked.dns_servers, ?egress_proxy, "policy replaced");
        Ok(())
    }

    /// The sandbox's CA certificate (PEM), for its guest to trust.
    pub fn ca_pem(&self, id: &SandboxId) -> Result<String, RegistryError> {
        Ok(self.get(id)?.injector.ca_pem().to_string())
    }

    /// Set or replace a secret; the next request that names it uses it.
    pub fn put_secret(&self, name: &str, value: Vec<u8>) -> Result<(), RegistryError> {
        self.inject.secrets.put(name, value)?;
        tracing::info!(secret = name, "secret set");
        Ok(())
    }

    pub fn secret_names(&self) -> Vec<String> {
        self.inject.secrets.names()
    }

    /// Forget a secret no sandbox's rules name.
    pub fn delete_secret(&self, name: &str) -> Result<(), RegistryError> {
        // Under the registry's lock, so no create or update slips in between.
        let sandboxes = lock(&self.sandboxes);
        let mut users: Vec<&str> = sandboxes
            .values()
            .filter(|s| s.injector.rules().secrets().any(|n| n == name))
            .map(|s| s.id.as_str())
            .collect();
        if !users.is_empty() {
            users.sort();
            return Err(RegistryError::SecretInUse {
                name: name.to_string(),
                users: users.join(", "),
            });
        }
        if !self.inject.secrets.remove(name) {
            return Err(RegistryError::NoSecret(name.to_string()));
        }
        tracing::info!(secret = name, "secret removed");
        Ok(())
    }

    pub fn rotate_token(&self, id: &SandboxId) -> Result<String, RegistryError> {
        let sandbox = self.get(id)?;
        match sandbox.route.rotate_token()? {
            Some(token) => {
                tracing::info!(sandbox = %id, "traffic access token rotated");
                Ok(token.as_str().to_string())
            }
            None => Err(RegistryError::NoToken(id.clone())),
        }
    }

    /// Take the sandbox out of the gateway and the registry, reset its flows,
    /// stop its driver.
    pub async fn delete(&self, id: &SandboxId) -> Result<(), RegistryError> {
        let sandbox = lock(&self.sandboxes)
            .remove(id)
            .ok_or_else(|| RegistryError::NotFound(id.clone()))?;
        self.directory.remove(id);
        sandbox.tear_down().await;
        tracing::info!(sandbox = %id, "sandbox deleted");
        Ok(())
    }

    /// Refuse new sandboxes from now on.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Tear every sandbox down, all at once.
    pub async fn delete_all(&self) {
        let all: Vec<Arc<Sandbox>> = lock(&self.sandboxes).drain().map(|(_, s)| s).collect();
        let mut set = tokio::task::JoinSet::new();
        for sandbox in all {
            self.directory.remove(&sandbox.id);
            set.spawn(async move { sandbox.tear_down().await });
        }
        while set.join_next().await.is_some() {}
    }

    /// Gateway requests in flight now: connections into guests less the
    /// idle ones the gateway keeps for reuse.
    pub fn requests_in_flight(&self) -> usize {
        let idle: usize = self.all().iter().map(|s| s.route.idle_connections()).sum();
        self.guest_connections
            .load(Ordering::Relaxed)
            .saturating_sub(idle)
    }
}

/// A sandbox's driver task: serve its transport until told to stop.
async fn drive(
    parked: Parked,
    transport: Transport,
    stopped: oneshot::Receiver<()>,
    state: Arc<Mutex<LinkState>>,
) {
    // One more round of the driver after the stop: commands sent before it
    // (the tear-down's deny-all policy) are taken and their resets sent.
    let stop = async {
        let _ = stopped.await;
        tokio::task::yield_now().await;
    };
    let mut stop = std::pin::pin!(stop);
    let end = match vmm_glue::transport::serve(parked, transport, stop.as_mut()).await {
        Ok(()) => LinkState::Stopped,
        Err(e) => {
            let why = vmm_glue::chain(&e);
            tracing::warn!(error = %why, "the sandbox's link failed; its network is down until it is deleted");
            LinkState::Failed(why)
        }
    };
    *lock(&state) = end;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Open a sandbox's transport, unless confinement fences it off; nothing
/// is left behind on error. Taps and vhost-user get checksum and
/// segmentation offloads at `mtu` (a tapFd only when it was attached with a
/// virtio-net header). A tapFd is taken from `caller`, the requesting process.
fn open(spec: &TransportSpec, caller: Option<i32>, mtu: usize) -> Result<Transport, RegistryError> {
    let fenced = match spec {
        TransportSpec::TapFd(_) => crate::confine::tap_fd_refusal().map(str::to_string),
        TransportSpec::QemuStream { connect: true, .. } | TransportSpec::Tap(_) => None,
        TransportSpec::QemuStream { path, .. }
        | TransportSpec::QemuDgram { path, .. }
        | TransportSpec::VhostUser { path } => crate::confine::socket_refusal(path),
    };
    if let Some(why) = fenced {
        return Err(RegistryError::Fenced {
            spec: spec.clone(),
            why,
        });
    }
    let options = OpenOptions {
        offload_mtu: Some(mtu),
        fd_owner: FdOwner::Caller(caller),
    };
    spec.open(options)
        .map_err(|source| RegistryError::Transport {
            spec: spec.clone(),
            source,
        })
}

fn random_u64() -> Result<u64, RegistryError> {
    let mut raw = [0u8; 8];
    ingress::token::random_bytes(&mut raw)?;
    Ok(u64::from_ne_bytes(raw))
}

/// Twelve characters of a-z0-9 not in use yet.
fn unused_id(taken: &HashMap<SandboxId, Arc<Sandbox>>) -> Result<SandboxId, RegistryError> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    loop {
        let mut seed = random_u64()?;
        let id: String = (0..12)
            .map(|_| {
                let c = ALPHABET[(seed % ALPHABET.len() as u64) as usize] as char;
                seed /= ALPHABET.len() as u64;
                c
            })
            .collect();
        let id = SandboxId::parse(&id).expect("the alphabet is valid");
        if !taken.contains_key(&id) {
            return Ok(id);
        }
    }
}
