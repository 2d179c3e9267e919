//! A serve process as one node of a cluster: it holds one lease in the
//! store, kept alive every third of its TTL, and publishes under it its own
//! address and a record for each sandbox it serves. When the node dies its
//! lease expires and every record with it; when it finds its lease gone
//! (it was stopped, or cut off from the store, past the TTL) it takes a new
//! one and publishes again what it holds.
//!
//! Every write is a transaction on the owner: a create claims an id only if
//! no one holds it; a rotation or delete touches a record only while it is
//! still under this node's lease, so a late write from a node that lost an
//! id can never clobber the node that holds it now.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, LeaseTimeToLiveOptions,
    PutOptions, Txn, TxnOp,
};
use ingress::record::{node_key, parse_sandbox_key, sandbox_key, SANDBOX_PREFIX};
use ingress::{SandboxId, SandboxRecord};
use tokio::sync::{watch, Notify};

use super::config::NodeCluster;
use super::store::{self, call, StoreError, CALL_TIMEOUT};

/// Why a cluster write was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("sandbox id {id} taken: {by} holds it")]
    Taken { id: SandboxId, by: String },
    #[error("the cluster store cannot be reached, so nothing was changed")]
    Unreachable(#[source] StoreError),
    #[error("this node is leaving the cluster")]
    Leaving,
}

/// What the node did with the store, since it started.
#[derive(Default)]
pub struct NodeStats {
    pub store_errors: AtomicU64,
    pub leases_granted: AtomicU64,
    pub claims_taken: AtomicU64,
    /// Ids another node claimed while this node's lease was gone: served
    /// here still, but no longer published.
    pub ids_lost: AtomicU64,
}

pub struct ClusterNode {
    cfg: NodeCluster,
    client: Client,
    /// The lease held now; `None` while there is none.
    lease: watch::Sender<Option<i64>>,
    /// Wakes the keeper early (a claim is waiting for a lease).
    wake: Notify,
    /// Every sandbox this node serves, as it publishes it.
    held: Mutex<HashMap<SandboxId, SandboxRecord>>,
    /// Ids held here that another node holds in the store now.
    lost: Mutex<HashSet<SandboxId>>,
    /// A write failed while the lease lived on: put the store right.
    dirty: AtomicBool,
    leaving: AtomicBool,
    pub stats: NodeStats,
    /// The tunnel listener's counters (it runs on the sandboxes' runtime).
    pub tunnels: Arc<super::tunnel::TunnelStats>,
}

enum Claim {
    Claimed,
    Taken(String),
}

impl ClusterNode {
    /// Connect (lazily) and start keeping a lease on the current runtime.
    pub async fn start(cfg: NodeCluster) -> Result<Arc<Self>, StoreError> {
        let client = store::client(&cfg.store).await?;
        let node = Arc::new(Self {
            cfg,
            client,
            lease: watch::Sender::new(None),
            wake: Notify::new(),
            held: Mutex::new(HashMap::new()),
            lost: Mutex::new(HashSet::new()),
            dirty: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            stats: NodeStats::default(),
            tunnels: Arc::default(),
        });
        tokio::spawn(node.clone().keep());
        Ok(node)
    }

    pub fn name(&self) -> &ingress::NodeName {
        &self.cfg.node
    }

    /// The record of a sandbox served here.
    pub fn record(
        &self,
        token_digest: Option<ingress::token::TokenDigest>,
        mask: Option<ingress::HostMask>,
        https_ports: &[ingress::GuestPort],
    ) -> SandboxRecord {
        SandboxRecord {
            node: self.cfg.node.clone(),
            addr: self.cfg.advertise,
            token_digest,
            mask,
            https_ports: https_ports.to_vec(),
        }
    }

    pub fn lease_id(&self) -> Option<i64> {
        *self.lease.borrow()
    }

    pub fn published(&self) -> usize {
        let held = lock(&self.held).len();
        held.saturating_sub(lock(&self.lost).len())
    }

    /// Claim `id` cluster-wide for a sandbox just made here: one transaction
    /// that writes the record only if no node holds the id.
    pub async fn claim(&self, id: &SandboxId, record: SandboxRecord) -> Result<(), ClusterError> {
        for _ in 0..2 {
            let lease = self.current_lease().await?;
            match self.claim_one(id, &record, lease).await {
                Ok(Claim::Claimed) => {
                    lock(&self.held).insert(id.clone(), record);
                    lock(&self.lost).remove(id);
                    return Ok(());
                }
                Ok(Claim::Taken(by)) => {
                    self.stats.claims_taken.fetch_add(1, Ordering::Relaxed);
                    return Err(ClusterError::Taken { id: id.clone(), by });
                }
                Err(e) if e.lease_not_found() => self.lease_gone(lease),
                Err(e) => return Err(self.unreachable(e)),
            }
        }
        Err(ClusterError::Unreachable(StoreError::TimedOut(
            CALL_TIMEOUT,
        )))
    }

    /// A sandbox's record changed (its token was rotated): rewrite it if this
    /// node still holds it. Nothing changes when the store cannot be reached.
    pub async fn update(&self, id: &SandboxId, record: SandboxRecord) -> Result<(), ClusterError> {
        for _ in 0..2 {
            let lease = self.current_lease().await?;
            let key = sandbox_key(id);
            let txn = Txn::new()
                .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
                .and_then([TxnOp::put(
                    key,
                    record.to_json(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            match call(self.client.kv_client().txn(txn)).await {
                Ok(r) => {
                    if !r.succeeded() {
                        tracing::warn!(target: "slipway::cluster", sandbox = %id,
                            "the store's record is not this node's; the change stays local");
                    }
                    lock(&self.held).insert(id.clone(), record);
                    return Ok(());
                }
                Err(e) if e.lease_not_found() => self.lease_gone(lease),
                Err(e) => return Err(self.unreachable(e)),
            }
        }
        Err(ClusterError::Unreachable(StoreError::TimedOut(
            CALL_TIMEOUT,
        )))
    }

    /// A sandbox deleted here: remove its record if it is still this node's.
    /// A store that cannot be reached is put right later.
    pub async fn release(&self, id: &SandboxId) {
        lock(&self.held).remove(id);
        lock(&self.lost).remove(id);
        let Some(lease) = self.lease_id() else {
            // No lease: no record of ours is in the store.
            return;
        };
        if let Err(e) = self.delete_if_ours(id, lease).await {
            self.dirty.store(true, Ordering::Relaxed);
            self.count_store_error(&e);
        }
    }

    /// Leave the cluster (SIGTERM): revoke the lease, which takes every
    /// record of this node out of the store at once.
    pub async fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        let Some(lease) = self.lease.send_replace(None) else {
            return;
        };
        match call(self.client.lease_client().revoke(lease)).await {
            Ok(_) => eprintln!("slipway: left the cluster (lease revoked)"),
            Err(e) => {
                tracing::warn!(target: "slipway::cluster", error = %vmm_glue::chain(&e),
                    "cannot revoke the lease; the records expire with it")
            }
        }
    }

    async fn delete_if_ours(&self, id: &SandboxId, lease: i64) -> Result<(), StoreError> {
        let key = sandbox_key(id);
        let txn = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key, None)]);
        call(self.client.kv_client().txn(txn)).await.map(|_| ())
    }

    /// Write the record if no one holds the id; else say who does.
    async fn claim_one(
        &self,
        id: &SandboxId,
        record: &SandboxRecord,
        lease: i64,
    ) -> Result<Claim, StoreError> {
        let key = sandbox_key(id);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                record.to_json(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if call(self.client.kv_client().txn(txn)).await?.succeeded() {
            return Ok(Claim::Claimed);
        }
        let held = call(self.client.kv_client().get(key, None)).await?;
        let by = held
            .kvs()
            .first()
            .and_then(|kv| SandboxRecord::parse(kv.value()).ok())
            .map(|r| format!("node {}", r.node))
            .unwrap_or_else(|| "another writer".into());
        Ok(Claim::Taken(by))
    }

    /// The lease held now, waiting (bounded) for the keeper to get one.
    async fn current_lease(&self) -> Result<i64, ClusterError> {
        if self.leaving.load(Ordering::Relaxed) {
            return Err(ClusterError::Leaving);
        }
        if let Some(lease) = self.lease_id() {
            return Ok(lease);
        }
        self.wake.notify_one();
        let mut rx = self.lease.subscribe();
        let waited = tokio::time::timeout(CALL_TIMEOUT, async {
            rx.wait_for(Option::is_some)
                .await
                .map(|lease| lease.unwrap_or_default())
        })
        .await;
        match waited {
            Ok(Ok(lease)) => Ok(lease),
            _ => Err(ClusterError::Unreachable(StoreError::TimedOut(
                CALL_TIMEOUT,
            ))),
        }
    }

    fn lease_gone(&self, lease: i64) {
        if self.lease.send_if_modified(|l| {
            let gone = *l == Some(lease);
            if gone {
                *l = None;
            }
            gone
        }) {
            self.wake.notify_one();
        }
    }

    fn unreachable(&self, e: StoreError) -> ClusterError {
        self.count_store_error(&e);
        ClusterError::Unreachable(e)
    }

    fn count_store_error(&self, e: &StoreError) {
        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "slipway::cluster", error = %vmm_glue::chain(e), "cluster store call failed");
    }

    /// The keeper: a lease, everything published under it, kept alive;
    /// again from the top whenever the lease is found gone.
    async fn keep(self: Arc<Self>) {
        let ttl = self.cfg.lease_ttl;
        while !self.leaving.load(Ordering::Relaxed) {
            let grant = self.client.lease_client();
            let lease = match call(async move {
                let mut grant = grant;
                grant.grant(ttl.as_secs() as i64, None).await
            })
            .await
            {
                Ok(r) => r.id(),
                Err(e) => {
                    self.count_store_error(&e);
                    self.pause(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if self.leaving.load(Ordering::Relaxed) {
                let _ = call(self.client.lease_client().revoke(lease)).await;
                return;
            }
            let republished = self.stats.leases_granted.fetch_add(1, Ordering::Relaxed) > 0;
            if let Err(e) = self.publish_all(lease).await {
                self.count_store_error(&e);
                self.dirty.store(true, Ordering::Relaxed);
            }
            self.lease.send_replace(Some(lease));
            let n = self.published();
            if republished {
                tracing::warn!(target: "slipway::cluster", lease = format!("{lease:x}"), sandboxes = n,
                    "took a new lease and published every sandbox again");
            } else {
                tracing::info!(target: "slipway::cluster", node = %self.cfg.node, lease = format!("{lease:x}"),
                    sandboxes = n, "joined the cluster");
            }
            self.keep_alive(lease).await;
            self.lease.send_if_modified(|l| {
                let mine = *l == Some(lease);
                if mine {
                    *l = None;
                }
                mine
            });
        }
    }

    /// Renew every third of the TTL until the store says the lease is gone
    /// (or the node leaves). While the store cannot be reached, try every
    /// second; the records stay until the TTL runs out there.
    async fn keep_alive(&self, lease: i64) {
        let period = self.cfg.lease_ttl / 3;
        let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        loop {
            if self.leaving.load(Ordering::Relaxed) || self.lease_id() != Some(lease) {
                return;
            }
            match self.renew(lease, &mut stream).await {
                Ok(true) => {
                    if self.dirty.swap(false, Ordering::Relaxed) {
                        if let Err(e) = self.reconcile(lease).await {
                            self.dirty.store(true, Ordering::Relaxed);
                            self.count_store_error(&e);
                        }
                    }
                    self.pause(period).await;
                }
                Ok(false) => {
                    tracing::warn!(target: "slipway::cluster", lease = format!("{lease:x}"),
                        "the lease is gone from the store (this node was stopped or cut off past the TTL)");
                    return;
                }
                Err(e) => {
                    stream = None;
                    self.dirty.store(true, Ordering::Relaxed);
                    self.count_store_error(&e);
                    self.pause(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// One keep-alive: `Ok(false)` when the store says the lease is gone.
    async fn renew(
        &self,
        lease: i64,
        stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    ) -> Result<bool, StoreError> {
        if stream.is_none() {
            let mut client = self.client.lease_client();
            match call(client.keep_alive(lease)).await {
                Ok(pair) => {
                    // Opening the stream renewed it once already.
                    *stream = Some(pair);
                    return Ok(true);
                }
                Err(StoreError::Call(etcd_client::Error::LeaseKeepAliveError(m)))
                    if m.contains("not found") =>
                {
                    return Ok(false)
                }
                Err(e) if e.lease_not_found() => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        let Some((keeper, responses)) = stream.as_mut() else {
            return Ok(true);
        };
        let answer = call(async {
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await?;
        match answer {
            Some(r) => Ok(r.ttl() > 0),
            None => Err(StoreError::Call(etcd_client::Error::LeaseKeepAliveError(
                "the keep-alive stream ended".into(),
            ))),
        }
    }

    /// Under a new lease: the node's address, then every sandbox held.
    async fn publish_all(&self, lease: i64) -> Result<(), StoreError> {
        call(self.client.kv_client().put(
            node_key(&self.cfg.node),
            self.cfg.advertise.to_string(),
            Some(PutOptions::new().with_lease(lease)),
        ))
        .await?;
        let held: Vec<(SandboxId, SandboxRecord)> = lock(&self.held)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, record) in held {
            self.publish_one(&id, &record, lease).await?;
        }
        Ok(())
    }

    async fn publish_one(
        &self,
        id: &SandboxId,
        record: &SandboxRecord,
        lease: i64,
    ) -> Result<(), StoreError> {
        if let Claim::Taken(by) = self.claim_one(id, record, lease).await? {
            if lock(&self.lost).insert(id.clone()) {
                self.stats.ids_lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "slipway::cluster", sandbox = %id, holder = %by,
                    "another node claimed this sandbox's id while this node's lease was gone; \
                     it is served here but no longer published");
            }
        }
        Ok(())
    }

    /// After failed writes, while the lease lived on: remove records of
    /// sandboxes deleted meanwhile and write the ones missing.
    async fn reconcile(&self, lease: i64) -> Result<(), StoreError> {
        let mut leases = self.client.lease_client();
        let attached =
            call(leases.time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys())))
                .await?;
        let mut present = HashSet::new();
        let mut has_node_key = false;
        for key in attached.keys() {
            if key.as_slice() == node_key(&self.cfg.node).as_bytes() {
                has_node_key = true;
            } else if let Ok(id) = parse_sandbox_key(key) {
                present.insert(id);
            } else if key.starts_with(SANDBOX_PREFIX.as_bytes()) {
                tracing::warn!(target: "slipway::cluster", "a key under this node's lease is not a sandbox record");
            }
        }
        let held: Vec<(SandboxId, SandboxRecord)> = lock(&self.held)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let wanted: HashSet<SandboxId> = held.iter().map(|(id, _)| id.clone()).collect();
        for id in present.difference(&wanted) {
            self.delete_if_ours(id, lease).await?;
        }
        if !has_node_key {
            self.publish_all(lease).await?;
            return Ok(());
        }
        let lost = lock(&self.lost).clone();
        for (id, record) in held {
            if !present.contains(&id) && !lost.contains(&id) {
                self.publish_one(&id, &record, lease).await?;
            }
        }
        Ok(())
    }

    /// Sleep, but wake for a waiting claim or for leaving.
    async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.wake.notified() => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
