//! The edge's route table: an exact local copy of the store's sandbox
//! records, kept by a list at revision R and a watch from R+1, so that a
//! request never waits on the store. A watch that breaks resumes where it
//! stopped; one whose start was compacted away lists again and diffs, so no
//! delete is lost. Progress requests every second tell live-but-quiet from
//! cut off: past `stale_after` without word from the store, private
//! sandboxes are refused (their tokens may have been rotated meanwhile).
//!
//! Every key and value is hostile input (`ingress::record`): a bad one is
//! skipped, logged and counted, and takes out no other route.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use ingress::record::{parse_sandbox_key, BadRecord, SANDBOX_PREFIX};
use ingress::{Directory, Route, SandboxId, SandboxRecord};

use super::dial::{Dialer, TunnelConnector};
use super::store::{call, prefix_end, StoreError};

/// Records per page when listing: bounded messages, whatever the store holds.
const PAGE: i64 = 1000;
/// How often the watch is asked to confirm it is current.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A watch that says nothing this long after being asked is taken as broken.
const WATCH_SILENT: Duration = Duration::from_secs(5);
/// Longest key kept in the table of bad records.
const BAD_KEY_BYTES: usize = 256;

#[derive(Default)]
pub struct RouteStats {
    /// Bad values seen (each version of a key once).
    pub bad_records: AtomicU64,
    pub store_errors: AtomicU64,
    pub lists: AtomicU64,
    pub compactions: AtomicU64,
    /// The store revision the copy is known to be current at.
    pub revision: AtomicI64,
}

pub struct RouteTable {
    directory: Arc<Directory>,
    dialer: Arc<Dialer>,
    max_inbound: usize,
    /// The record each route was made from (shared with its connector: an
    /// edge holds one copy per route).
    records: Mutex<HashMap<SandboxId, Arc<SandboxRecord>>>,
    /// Keys under the prefix whose value is not a record, and the revision
    /// of the bad value (counted once per version).
    bad: Mutex<HashMap<Vec<u8>, i64>>,
    /// When the store last answered (list, event or progress).
    contact: Mutex<Option<Instant>>,
    stale: AtomicBool,
    stale_after: Duration,
    pub stats: RouteStats,
}

/// How a watch ended.
enum WatchEnd {
    /// Its start revision was compacted away: list again.
    Compacted,
    /// The stream broke; resume from this revision.
    Broken(i64, StoreError),
}

impl RouteTable {
    pub fn new(
        directory: Arc<Directory>,
        dialer: Arc<Dialer>,
        max_inbound: usize,
        stale_after: Duration,
    ) -> Arc<Self> {
        // Until the first list, nothing is known: private sandboxes wait.
        directory.refuse_private(true);
        Arc::new(Self {
            directory,
            dialer,
            max_inbound,
            records: Mutex::new(HashMap::new()),
            bad: Mutex::new(HashMap::new()),
            contact: Mutex::new(None),
            stale: AtomicBool::new(true),
            stale_after,
            stats: RouteStats::default(),
        })
    }

    pub fn len(&self) -> usize {
        lock(&self.records).len()
    }

    pub fn bad_now(&self) -> usize {
        lock(&self.bad).len()
    }

    /// Seconds since the store last confirmed the copy; `None` before the first list.
    pub fn contact_age(&self) -> Option<Duration> {
        lock(&self.contact).map(|t| t.elapsed())
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    /// The store confirmed the copy: private sandboxes are served again at
    /// once, not at the next staleness tick (right after the first list,
    /// a route could be there and its private sandbox still refused).
    fn touch(&self) {
        *lock(&self.contact) = Some(Instant::now());
        self.update_staleness();
    }

    /// Refuse private sandboxes while the store has been silent past
    /// `stale_after`; say so when that changes.
    fn update_staleness(&self) {
        let stale = self.contact_age().is_none_or(|age| age > self.stale_after);
        if self.stale.swap(stale, Ordering::Relaxed) != stale {
            if stale {
                tracing::warn!(target: "slipway::edge", stale_after = ?self.stale_after,
                    "no word from the cluster store: private sandboxes are refused (503) until it is back");
            } else {
                tracing::info!(target: "slipway::edge", "the cluster store is back: serving private sandboxes again");
            }
        }
        self.directory.refuse_private(stale);
    }

    /// Keep the copy forever: list, watch, resume or list again.
    pub async fn sync(self: Arc<Self>, client: Client) {
        let mut resume: Option<i64> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let start = match resume.take() {
                Some(rev) => rev,
                None => match self.list(&client).await {
                    Ok(rev) => {
                        backoff = Duration::from_millis(100);
                        rev + 1
                    }
                    Err(e) => {
                        self.store_error(&e);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                },
            };
            match self.watch(&client, start).await {
                WatchEnd::Compacted => {
                    self.stats.compactions.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "slipway::edge", from = start,
                        "the watch's start was compacted away; listing again");
                }
                WatchEnd::Broken(next, e) => {
                    self.store_error(&e);
                    resume = Some(next);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Every record at one revision, page by page; the table becomes it.
    async fn list(&self, client: &Client) -> Result<i64, StoreError> {
        let end = prefix_end(SANDBOX_PREFIX);
        let mut from = SANDBOX_PREFIX.as_bytes().to_vec();
        let mut revision = 0;
        let mut good = HashMap::new();
        let mut bad = HashMap::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut kv = client.kv_client();
            let page = call(kv.get(from.clone(), Some(options))).await?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            for kv in page.kvs() {
                match parse(kv.key(), kv.value()) {
                    Ok((id, rec)) => {
                        good.insert(id, rec);
                    }
                    Err((id, e)) => {
                        bad.insert(short(kv.key()), (kv.mod_revision(), e, id));
                    }
                }
            }
            match (page.more(), page.kvs().last()) {
                (true, Some(last)) => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        self.stats.lists.fetch_add(1, Ordering::Relaxed);
        let n = good.len();
        self.replace_all(good, bad);
        self.set_revision(revision);
        self.touch();
        tracing::info!(target: "slipway::edge", revision, routes = n, bad = self.bad_now(), "route table listed");
        Ok(revision)
    }

    /// Watch from `start` until it breaks or is compacted away.
    async fn watch(&self, client: &Client, start: i64) -> WatchEnd {
        let options = WatchOptions::new().with_prefix().with_start_revision(start);
        let mut watch = client.watch_client();
        let mut stream = match call(watch.watch(SANDBOX_PREFIX, Some(options))).await {
            Ok(s) => s,
            Err(e) => return WatchEnd::Broken(start, e),
        };
        let mut next = start;
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        let mut asked: Option<Instant> = None;
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let resp = match msg {
                        Ok(Some(resp)) => resp,
                        Ok(None) => return WatchEnd::Broken(next, StoreError::Call(
                            etcd_client::Error::WatchError("the watch stream ended".into()))),
                        Err(e) => return WatchEnd::Broken(next, StoreError::Call(e)),
                    };
                    asked = None;
                    if resp.compact_revision() > 0 {
                        return WatchEnd::Compacted;
                    }
                    if resp.canceled() {
                        return WatchEnd::Broken(next, StoreError::Call(etcd_client::Error::WatchError(
                            format!("the store cancelled the watch: {}", resp.cancel_reason()))));
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        match ev.event_type() {
                            EventType::Put => self.put(kv.key(), kv.value(), kv.mod_revision()),
                            EventType::Delete => self.delete(kv.key()),
                        }
                        next = next.max(kv.mod_revision() + 1);
                    }
                    // A progress answer: every event up to its revision was sent.
                    let header_rev = resp.header().map_or(0, |h| h.revision());
                    if resp.events().is_empty() && !resp.created() && header_rev > 0 {
                        next = next.max(header_rev + 1);
                    }
                    if next > start {
                        self.set_revision(next - 1);
                    }
                    self.touch();
                }
                _ = progress.tick() => {
                    if asked.is_some_and(|t| t.elapsed() > WATCH_SILENT) {
                        return WatchEnd::Broken(next, StoreError::TimedOut(WATCH_SILENT));
                    }
                    if let Err(e) = stream.request_progress().await {
                        return WatchEnd::Broken(next, StoreError::Call(e));
                    }
                    asked.get_or_insert_with(Instant::now);
                }
            }
        }
    }

    fn set_revision(&self, rev: i64) {
        self.stats.revision.fetch_max(rev, Ordering::Relaxed);
    }

    fn store_error(&self, e: &StoreError) {
        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "slipway::edge", error = %vmm_glue::chain(e), "cluster store");
    }

    /// A put event: the record replaces what the table held for the id; a
    /// bad value takes the id out (what the store holds is not a route).
    fn put(&self, key: &[u8], value: &[u8], revision: i64) {
        match parse(key, value) {
            Ok((id, rec)) => {
                lock(&self.bad).remove(&short(key));
                self.upsert(id, rec);
            }
            Err((id, e)) => {
                self.note_bad(short(key), revision, &e);
                if let Some(id) = id {
                    self.remove(&id);
                }
            }
        }
    }

    fn delete(&self, key: &[u8]) {
        lock(&self.bad).remove(&short(key));
        if let Ok(id) = parse_sandbox_key(key) {
            self.remove(&id);
        }
    }

    fn note_bad(&self, key: Vec<u8>, revision: i64, e: &BadRecord) {
        let fresh = lock(&self.bad).insert(key.clone(), revision) != Some(revision);
        if fresh {
            self.stats.bad_records.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "slipway::edge", key = %String::from_utf8_lossy(&key), revision,
                error = %e, "skipped a bad record in the cluster store");
        }
    }

    fn upsert(&self, id: SandboxId, rec: SandboxRecord) {
        let mut records = lock(&self.records);
        let same_way = records.get(&id).is_some_and(|old| old.same_way(&rec));
        if let (true, Some(route)) = (same_way, self.directory.get(&id)) {
            // Only the token changed: the live route (its pool, its cap)
            // stays, with the new digest.
            route.set_digest(rec.token_digest);
            return;
        }
        let rec = Arc::new(rec);
        let connector = TunnelConnector {
            dialer: self.dialer.clone(),
            id: id.clone(),
            record: rec.clone(),
        };
        let route = Route::with_digest(
            Arc::new(connector),
            rec.token_digest,
            rec.mask.clone(),
            self.max_inbound,
            rec.https_ports.clone(),
        );
        self.directory.insert(id.clone(), route);
        records.insert(id, rec);
    }

    fn remove(&self, id: &SandboxId) {
        lock(&self.records).remove(id);
        self.directory.remove(id);
    }

    /// The table becomes `good`: ids gone from the store go, the rest are
    /// put as in a watch.
    fn replace_all(
        &self,
        good: HashMap<SandboxId, SandboxRecord>,
        bad: HashMap<Vec<u8>, (i64, BadRecord, Option<SandboxId>)>,
    ) {
        let gone: Vec<SandboxId> = lock(&self.records)
            .keys()
            .filter(|id| !good.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.remove(&id);
        }
        // Stray routes (none should be) go too.
        for id in self.directory.ids() {
            if !good.contains_key(&id) {
                self.directory.remove(&id);
            }
        }
        let nodes: HashSet<_> = good.values().map(|r| (r.node.clone(), r.addr)).collect();
        for (id, rec) in good {
            self.upsert(id, rec);
        }
        self.dialer.retain(&nodes);
        lock(&self.bad).retain(|k, _| bad.contains_key(k));
        for (key, (rev, e, _)) in bad {
            self.note_bad(key, rev, &e);
        }
    }

    /// Notice the store going silent: the staleness is checked every 250 ms
    /// (and at every contact, see `touch`).
    pub async fn watch_staleness(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            self.update_staleness();
        }
    }
}

/// A stored key and value as a route, or why not (with the id when the key
/// was good).
fn parse(
    key: &[u8],
    value: &[u8],
) -> Result<(SandboxId, SandboxRecord), (Option<SandboxId>, BadRecord)> {
    let id = parse_sandbox_key(key).map_err(|e| (None, e))?;
    match SandboxRecord::parse(value) {
        Ok(rec) => Ok((id, rec)),
        Err(e) => Err((Some(id), e)),
    }
}

fn short(key: &[u8]) -> Vec<u8> {
    key[..key.len().min(BAD_KEY_BYTES)].to_vec()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ingress::AccessToken;

    fn table() -> Arc<RouteTable> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        RouteTable::new(
            Arc::new(Directory::new()),
            Dialer::new(Arc::new(tls)),
            8,
            Duration::from_secs(30),
        )
    }

    fn value(node: &str, digest: Option<&AccessToken>) -> Vec<u8> {
        match digest {
            None => format!(r#"{{"node":"{node}","addr":"127.0.0.1:7441","public":true}}"#),
            Some(t) => format!(
                r#"{{"node":"{node}","addr":"127.0.0.1:7441","public":false,"tokenDigest":"{}"}}"#,
                t.digest().to_hex()
            ),
        }
        .into_bytes()
    }

    fn id(s: &str) -> SandboxId {
        SandboxId::parse(s).unwrap()
    }

    #[test]
    fn a_rotation_keeps_the_live_route_and_a_move_replaces_it() {
        let t = table();
        let (t1, t2) = (
            AccessToken::generate().unwrap(),
            AccessToken::generate().unwrap(),
        );
        t.put(b"/slipway/v1/sbx/b", &value("host-a", Some(&t1)), 2);
        let before = t.directory.get(&id("b")).unwrap();
        t.put(b"/slipway/v1/sbx/b", &value("host-a", Some(&t2)), 3);
        let after = t.directory.get(&id("b")).unwrap();
        assert!(Arc::ptr_eq(&before, &after), "a rotation made a new route");
        assert!(after.token_digest().unwrap().same_as(&t2.digest()));
        t.put(b"/slipway/v1/sbx/b", &value("host-b", Some(&t2)), 4);
        let moved = t.directory.get(&id("b")).unwrap();
        assert!(!Arc::ptr_eq(&after, &moved), "a move kept the old route");
    }

    #[test]
    fn a_listing_becomes_the_table_and_bad_values_take_their_id_out() {
        let t = table();
        t.put(b"/slipway/v1/sbx/a", &value("host-a", None), 2);
        t.put(b"/slipway/v1/sbx/b", &value("host-a", None), 3);
        assert_eq!((t.len(), t.directory.len()), (2, 2));
        // b turns to garbage: it is no route any more, and counted once.
        t.put(b"/slipway/v1/sbx/b", b"garbage", 4);
        t.put(b"/slipway/v1/sbx/b", b"garbage", 4);
        assert!(t.directory.get(&id("b")).is_none());
        assert_eq!(
            (t.bad_now(), t.stats.bad_records.load(Ordering::Relaxed)),
            (1, 1)
        );
        // A listing without a, with c, and b's garbage seen again.
        let mut good = HashMap::new();
        good.insert(
            id("c"),
            SandboxRecord::parse(&value("host-b", None)).unwrap(),
        );
        let mut bad = HashMap::new();
        bad.insert(
            b"/slipway/v1/sbx/b".to_vec(),
            (4, BadRecord::Json("x".into()), Some(id("b"))),
        );
        t.replace_all(good, bad);
        assert_eq!(t.directory.ids(), [id("c")]);
        assert_eq!(
            (t.bad_now(), t.stats.bad_records.load(Ordering::Relaxed)),
            (1, 1)
        );
        t.delete(b"/slipway/v1/sbx/b");
        t.delete(b"/slipway/v1/sbx/c");
        assert_eq!((t.len(), t.bad_now(), t.directory.len()), (0, 0, 0));
    }
}
