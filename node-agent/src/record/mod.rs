//! Connection and exchange records in sled. Every change is also appended
//! to an event log in which each event commits to the hash of the one
//! before it (`chain.rs`), so that an altered or deleted event is
//! detectable (`verify.rs`).
//!
//! Write path (one `append`, under one lock, on the caller's thread): hash
//! the record's JSON, write the event to the write-ahead file with one
//! `write(2)` (`wal.rs`: in the kernel, so it survives `kill -9`), and
//! queue it for indexing. Nothing else: no sled work, no thread hop, no
//! wait. Indexing (the event and the record's view into sled, one batch
//! per tree) happens in the group-commit thread (`commit.rs`) before each
//! flush, in any reader first (reads see every append that returned), and
//! in the appender itself when the queue is over its bound (backpressure
//! without a wait on another thread). The commit thread flushes sled
//! (fsync) every `records.fsync_interval_ms`, retires write-ahead segments
//! that flush covered, and signs checkpoints of the chain head
//! (`checkpoint.rs`).
//! At start the remaining write-ahead segments are replayed into sled and
//! whatever was open (connections, exchanges) is marked interrupted.
mod chain;
mod checkpoint;
mod commit;
mod verify;
mod wal;

use std::{
    path::{Path, PathBuf},
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

pub use checkpoint::{Checkpoint, Evidence, KeyError, NodeKey, ProofLink, PublicKey};

use crate::{
    addr::{ClientAddr, OrigDstAddr},
    identity::{ProcessInfo, WorkloadIdentity},
};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record store: {0}")]
    Sled(#[from] sled::Error),
    #[error("record store: corrupt entry {key}: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("record store: encoding: {0}")]
    Encode(serde_json::Error),
    #[error("no connection with id {0}")]
    NotFound(u64),
    #[error("record store flush: {0}")]
    Flush(String),
    #[error("record store write-ahead file: {0}")]
    Wal(#[from] std::io::Error),
    #[error(transparent)]
    Key(#[from] KeyError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Still being forwarded.
    Open,
    /// Forwarded and closed normally.
    Closed,
    /// Not forwarded (no origin, loop, suspended...).
    Refused { reason: String },
    /// The original destination could not be reached.
    UpstreamFailed { error: String },
    /// Forwarding ended with an I/O error.
    Failed { error: String },
    /// The node stopped while the connection was open.
    Interrupted,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectionRecord {
    pub id: u64,
    pub identity: WorkloadIdentity,
    pub process: ProcessInfo,
    pub client: ClientAddr,
    pub original_dst: Option<OrigDstAddr>,
    pub target: Option<String>,
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    /// Client to upstream.
    pub bytes_up: u64,
    /// Upstream to client.
    pub bytes_down: u64,
    pub outcome: Outcome,
    /// Set for TLS targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsInfo>,
}

impl ConnectionRecord {
    /// A connection from `client` starting now, open, nothing known yet.
    pub fn new(id: u64, client: ClientAddr) -> Self {
        Self {
            id,
            identity: WorkloadIdentity::default(),
            process: ProcessInfo::default(),
            client,
            original_dst: None,
            target: None,
            started_at_ms: now_ms(),
            ended_at_ms: None,
            bytes_up: 0,
            bytes_down: 0,
            outcome: Outcome::Open,
            tls: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInfo {
    pub sni: Option<String>,
    /// `intercepted` or `spliced`.
    pub mode: String,
    pub alpn: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// A captured body: the first `cap` bytes, as text when it is UTF-8 and
/// base64 otherwise, with its full size and whether it was cut.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BodyRecord {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base64: Option<String>,
    pub truncated: bool,
    pub complete: bool,
}

impl BodyRecord {
    pub fn set_bytes(&mut self, bytes: Vec<u8>) {
        use base64::Engine;
        if bytes.is_empty() {
            return;
        }
        match String::from_utf8(bytes) {
            Ok(t) => self.text = Some(t),
            Err(e) => {
                self.base64 = Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
            }
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        use base64::Engine;
        if let Some(t) = &self.text {
            return t.as_bytes().to_vec();
        }
        self.base64
            .as_deref()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .unwrap_or_default()
    }
}

/// Where an exchange's record stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeState {
    /// Recorded before it was forwarded; the response has not ended yet.
    Started,
    /// The response ended (or the exchange was refused or failed).
    #[default]
    Complete,
    /// The node stopped before the response ended.
    Interrupted,
}

/// One HTTP request and its response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    pub session: u64,
    pub seq: u32,
    /// Records written before this field existed were complete.
    #[serde(default)]
    pub state: ExchangeState,
    pub workload: String,
    pub started_at_ms: u64,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub http_version: String,
    pub request_headers: Vec<Header>,
    pub request_body: BodyRecord,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_trailers: Vec<Header>,
    pub status: Option<u16>,
    pub response_headers: Vec<Header>,
    pub response_body: BodyRecord,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_trailers: Vec<Header>,
    /// Time to the response head.
    pub ttfb_ms: Option<f64>,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Policy decisions taken on this exchange, each with its rule id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<crate::policy::Decision>,
    /// Set when the node injected its own credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub injected: Option<Injection>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Injection {
    pub header: String,
    /// Fingerprints of the credentials the client presented (stripped).
    pub client_presented: Vec<Header>,
}

/// One link of the hash chain, as the control API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: u64,
    pub connection: u64,
    pub kind: String,
    pub body: serde_json::Value,
    /// Hex SHA-256 of the previous event (zeros for the first).
    pub prev: String,
    /// Hex SHA-256 over `prev`, `seq` and the digest of this event's
    /// other fields (see `chain.rs`).
    pub hash: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Filter {
    /// Identity id, or a substring of the CI repository / cgroup path.
    pub identity: Option<String>,
    pub target: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub limit: Option<usize>,
}

impl Filter {
    fn matches(&self, r: &ConnectionRecord) -> bool {
        if let Some(id) = &self.identity {
            let i = &r.identity;
            let hit = i.id == *id
                || i.workload.as_deref() == Some(id)
                || i.cgroup_path
                    .as_deref()
                    .is_some_and(|p| p.contains(id.as_str()))
                || i.ci
                    .as_ref()
                    .and_then(|c| c.repository.as_deref())
                    .is_some_and(|p| p.contains(id.as_str()));
            if !hit {
                return false;
            }
        }
        if let Some(t) = &self.target {
            if r.target.as_deref() != Some(t.as_str()) {
                return false;
            }
        }
        if self.since_ms.is_some_and(|s| r.started_at_ms < s) {
            return false;
        }
        if self.until_ms.is_some_and(|u| r.started_at_ms > u) {
            return false;
        }
        true
    }
}

/// How long records may sit in memory before they are on disk, and how
/// often the chain head is signed (`records.*` in the configuration).
#[derive(Clone, Debug)]
pub struct Durability {
    /// Group commit: sled is flushed (fsync) this often when anything
    /// changed. Bounds what a host power loss can take.
    pub fsync_interval: Duration,
    /// A checkpoint is signed once this many events were appended since
    /// the last one...
    pub checkpoint_every_events: u64,
    /// ...or this long after it, whichever comes first (if the chain grew).
    pub checkpoint_interval: Duration,
}

impl Default for Durability {
    fn default() -> Self {
        Self {
            fsync_interval: Duration::from_millis(200),
            checkpoint_every_events: 1000,
            checkpoint_interval: Duration::from_secs(10),
        }
    }
}

/// Which stored view an event updates.
#[derive(Clone, Copy, Debug, PartialEq)]
enum View {
    /// Node-level audit event: chained, no stored view.
    None,
    Connection {
        open: bool,
    },
    Exchange {
        seq: u32,
        open: bool,
    },
}

impl View {
    /// Recovers the view an event updates from its kind and body (replay
    /// and `verify`; live appends know it already).
    fn of(connection: u64, kind: &str, body: &[u8]) -> View {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(default)]
            seq: Option<u32>,
            #[serde(default)]
            state: Option<ExchangeState>,
            #[serde(default)]
            outcome: Option<Outcome>,
        }
        if connection == 0 {
            return View::None;
        }
        let p: Option<Probe> = serde_json::from_slice(body).ok();
        if kind.starts_with("exchange") {
            View::Exchange {
                seq: p.as_ref().and_then(|p| p.seq).unwrap_or(u32::MAX),
                open: p.and_then(|p| p.state) == Some(ExchangeState::Started),
            }
        } else {
            View::Connection {
                open: p.and_then(|p| p.outcome) == Some(Outcome::Open),
            }
        }
    }
}

struct Head {
    /// Sequence number of the next event.
    seq: u64,
    /// Hash of the last event.
    hash: chain::Hash,
    wal: wal::Wal,
    /// Appended (in the write-ahead file) but not yet in sled, in order.
    pending: Vec<Pending>,
    pending_bytes: usize,
}

/// An event waiting to be indexed into sled.
struct Pending {
    seq: u64,
    connection: u64,
    view: View,
    /// The write-ahead frame: `[len u32][stored event]`.
    frame: Vec<u8>,
    /// The record the event carries (its view's new state).
    body: Vec<u8>,
}

/// Beyond this the appender indexes the queue itself: memory stays
/// bounded however far the commit thread falls behind.
const MAX_PENDING_EVENTS: usize = 8192;
const SLED_CACHE_BYTES: u64 = 8 << 20;
const MAX_PENDING_BYTES: usize = 32 << 20;

/// What the store and its group-commit thread share.
struct Shared {
    db: sled::Db,
    views: Views,
    events: sled::Tree,
    checkpoints: sled::Tree,
    /// Serialises appends so that each event sees the true previous hash
    /// and the write-ahead file holds events in chain order.
    head: Mutex<Head>,
    /// Serialises indexing, so that batches reach sled in chain order.
    /// Taken before `head`, never while holding it.
    index_order: Mutex<()>,
    /// The last indexing failed (sled refuses writes): appends are
    /// refused until one succeeds (fail closed).
    index_failing: Mutex<Option<String>>,
    wal_dir: PathBuf,
    key: NodeKey,
    durability: Durability,
}

pub struct RecordStore {
    s: Arc<Shared>,
    next_id: AtomicU64,
    commit: Option<commit::Handle>,
}

impl Drop for RecordStore {
    /// Stops the group-commit thread (it holds the database): it signs a
    /// last checkpoint and flushes once more on the way out.
    fn drop(&mut self) {
        drop(self.commit.take());
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn open_key(view: View, connection: u64) -> Option<Vec<u8>> {
    match view {
        View::None => None,
        View::Connection { .. } => {
            let mut k = vec![b'c'];
            k.extend_from_slice(&connection.to_be_bytes());
            Some(k)
        }
        View::Exchange { seq, .. } => {
            let mut k = vec![b'x'];
            k.extend_from_slice(&exchange_key(connection, seq));
            Some(k)
        }
    }
}

/// The stored records: each event's record is also kept by key, as the
/// latest state of its connection or exchange.
struct Views {
    connections: sled::Tree,
    exchanges: sled::Tree,
    /// Connections and exchanges still open: `c`+id, `x`+exchange key.
    open: sled::Tree,
}

/// One sled batch per tree for a run of events.
#[derive(Default)]
struct Batches {
    events: sled::Batch,
    connections: sled::Batch,
    exchanges: sled::Batch,
    open: sled::Batch,
}

impl Batches {
    fn add(&mut self, p: &Pending) {
        self.events.insert(&p.seq.to_be_bytes(), &p.frame[4..]);
        let open = match p.view {
            View::None => return,
            View::Connection { open } => {
                self.connections
                    .insert(&p.connection.to_be_bytes(), p.body.as_slice());
                open
            }
            View::Exchange { seq, open } => {
                self.exchanges
                    .insert(&exchange_key(p.connection, seq), p.body.as_slice());
                open
            }
        };
        if let Some(k) = open_key(p.view, p.connection) {
            if open {
                self.open.insert(k, &[]);
            } else {
                self.open.remove(k);
            }
        }
    }
}

impl Views {
    /// Stores the record an event carries in its view, and whether it is
    /// still open. Idempotent (replay applies it again).
    fn apply(&self, connection: u64, view: View, body: &[u8]) -> Result<(), RecordError> {
        let open = match view {
            View::None => return Ok(()),
            View::Connection { open } => {
                self.connections.insert(connection.to_be_bytes(), body)?;
                open
            }
            View::Exchange { seq, open } => {
                self.exchanges.insert(exchange_key(connection, seq), body)?;
                open
            }
        };
        if let Some(k) = open_key(view, connection) {
            if open {
                self.open.insert(k, &[])?;
            } else {
                self.open.remove(k)?;
            }
        }
        Ok(())
    }
}

impl Shared {
    /// Appends an event: chain hash, one `write(2)` to the write-ahead
    /// file (from then on it survives `kill -9`), queued for sled.
    fn append(
        &self,
        connection: u64,
        kind: &str,
        body: Vec<u8>,
        view: View,
    ) -> Result<u64, RecordError> {
        if let Some(e) = self
            .index_failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Err(RecordError::Flush(format!("indexing records failed: {e}")));
        }
        let mut frame = Vec::with_capacity(4 + 96 + kind.len() + body.len());
        frame.extend_from_slice(&[0; 4]);
        let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        let seq = head.seq;
        let hash = chain::encode_into(
            &mut frame,
            seq,
            now_ms(),
            connection,
            kind,
            &body,
            &head.hash,
        );
        head.wal.append(&mut frame)?;
        // In the kernel now: the chain moves on (replay at the next start
        // puts the event into sled if indexing never gets to it).
        head.seq = seq + 1;
        head.hash = hash;
        head.pending_bytes += frame.len() + body.len();
        head.pending.push(Pending {
            seq,
            connection,
            view,
            frame,
            body,
        });
        let full =
            head.pending.len() >= MAX_PENDING_EVENTS || head.pending_bytes >= MAX_PENDING_BYTES;
        drop(head);
        if full {
            self.index()?;
        }
        Ok(seq)
    }

    /// Puts every queued event into sled (memory; the commit thread
    /// flushes). Readers call this first, so they see every append that
    /// returned.
    fn index(&self) -> Result<(), RecordError> {
        let _order = self.index_order.lock().unwrap_or_else(|e| e.into_inner());
        let batch = self.take_pending();
        self.apply(batch)
    }

    fn take_pending(&self) -> Vec<Pending> {
        let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        head.pending_bytes = 0;
        std::mem::take(&mut head.pending)
    }

    /// Applies a run of events (the caller holds `index_order`). On
    /// failure they go back to the front of the queue, to be retried (a
    /// retry re-inserts the same keys: idempotent).
    fn apply(&self, batch: Vec<Pending>) -> Result<(), RecordError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut b = Batches::default();
        for p in &batch {
            b.add(p);
        }
        let res = (|| -> Result<(), sled::Error> {
            self.events.apply_batch(b.events)?;
            self.views.connections.apply_batch(b.connections)?;
            self.views.exchanges.apply_batch(b.exchanges)?;
            self.views.open.apply_batch(b.open)?;
            Ok(())
        })();
        let mut failing = self.index_failing.lock().unwrap_or_else(|e| e.into_inner());
        match res {
            Ok(()) => {
                *failing = None;
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, events = batch.len(), "indexing records into sled failed; new records are refused until it works");
                *failing = Some(e.to_string());
                drop(failing);
                let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
                let newer = std::mem::replace(&mut head.pending, batch);
                head.pending.extend(newer);
                head.pending_bytes = head
                    .pending
                    .iter()
                    .map(|p| p.frame.len() + p.body.len())
                    .sum();
                Err(e.into())
            }
        }
    }

    fn head(&self) -> (u64, chain::Hash) {
        let h = self.head.lock().unwrap_or_else(|e| e.into_inner());
        (h.seq, h.hash)
    }

    fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, RecordError> {
        Ok(match self.checkpoints.last()? {
            Some((k, v)) => {
                Some(
                    serde_json::from_slice(&v).map_err(|source| RecordError::Corrupt {
                        key: format!("checkpoints/{}", key_u64(&k)),
                        source,
                    })?,
                )
            }
            None => None,
        })
    }
}

/// Replays write-ahead segments into sled: events sled lacks are inserted
/// (with their views); events it has get their view applied again (an
/// event and its view are two sled writes, and a crash may keep only the
/// first). Returns the chain head and the last segment number seen.
fn replay(
    events: &sled::Tree,
    views: &Views,
    wal_dir: &Path,
) -> Result<((u64, chain::Hash), u64, u64), RecordError> {
    let mut head = match events.last()? {
        Some((k, v)) => {
            let l = chain::Link::decode(&v).map_err(|e| {
                RecordError::Flush(format!("last event {} does not parse: {e}", key_u64(&k)))
            })?;
            (l.seq + 1, l.hash)
        }
        None => (0, chain::GENESIS),
    };
    let segments = wal::segments(wal_dir)?;
    let last_segment = segments.last().map(|(n, _)| *n).unwrap_or(0);
    let mut replayed = 0u64;
    'segments: for (_, path) in &segments {
        let (links, torn) = wal::read_segment(path)?;
        for l in links {
            let view = View::of(l.connection, &l.kind, &l.body);
            if l.seq < head.0 {
                match events.get(l.seq.to_be_bytes())? {
                    Some(v) if chain::Link::decode(&v).ok().as_ref() == Some(&l) => {
                        views.apply(l.connection, view, &l.body)?
                    }
                    Some(_) => tracing::error!(
                        seq = l.seq,
                        "stored event differs from the write-ahead file; left as stored (verify will name it)"
                    ),
                    None => {
                        // Deleted from sled but in the write-ahead file.
                        let mut enc = Vec::new();
                        chain::encode_into(&mut enc, l.seq, l.at_ms, l.connection, &l.kind, &l.body, &l.prev);
                        events.insert(l.seq.to_be_bytes(), enc)?;
                        views.apply(l.connection, view, &l.body)?;
                    }
                }
            } else if l.seq == head.0 && l.prev == head.1 {
                let mut enc = Vec::new();
                chain::encode_into(
                    &mut enc,
                    l.seq,
                    l.at_ms,
                    l.connection,
                    &l.kind,
                    &l.body,
                    &l.prev,
                );
                events.insert(l.seq.to_be_bytes(), enc)?;
                views.apply(l.connection, view, &l.body)?;
                head = (l.seq + 1, l.hash);
                replayed += 1;
            } else {
                tracing::error!(
                    seq = l.seq,
                    head = head.0,
                    "write-ahead event does not continue the stored chain; replay stops here"
                );
                break 'segments;
            }
        }
        if torn {
            tracing::warn!(segment = %path.display(), "write-ahead segment ends in a torn frame (cut by a crash); the rest is ignored");
        }
    }
    Ok((head, last_segment, replayed))
}

impl RecordStore {
    pub fn open(dir: &Path) -> Result<Self, RecordError> {
        Self::open_with(dir, Durability::default())
    }

    pub fn open_with(dir: &Path, durability: Durability) -> Result<Self, RecordError> {
        // sled's own periodic flush is off: the group-commit thread is the
        // only flusher (sled 0.34 flushes must not run concurrently).
        // Its page cache is bounded (sled's default, 1 GiB, would keep
        // every record ever read or written resident): records are written
        // once and read rarely (replay, export), so a small cache loses
        // little and keeps the node's memory flat under load.
        let db = sled::Config::new()
            .path(dir.join("records.sled"))
            .flush_every_ms(None)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()?;
        let had_open_index = db.tree_names().iter().any(|n| n.as_ref() == b"open");
        let connections = db.open_tree("connections")?;
        let exchanges = db.open_tree("exchanges")?;
        let events = db.open_tree("events")?;
        let open = db.open_tree("open")?;
        let checkpoints = db.open_tree("checkpoints")?;
        let key = NodeKey::load_or_create(dir)?;
        let wal_dir = dir.join("records.wal");
        std::fs::create_dir_all(&wal_dir)?;
        let views = Views {
            connections,
            exchanges,
            open,
        };
        let (head, last_segment, replayed) = replay(&events, &views, &wal_dir)?;
        if replayed > 0 {
            tracing::info!(
                events = replayed,
                "replayed events from the write-ahead file"
            );
        }
        db.flush()?;
        wal::Wal::remove_through(&wal_dir, last_segment)?;
        let wal = wal::Wal::create(&wal_dir, last_segment + 1)?;
        let last_id = views
            .connections
            .last()?
            .map(|(k, _)| key_u64(&k))
            .unwrap_or(0);
        let s = Arc::new(Shared {
            db,
            views,
            events,
            checkpoints,
            head: Mutex::new(Head {
                seq: head.0,
                hash: head.1,
                wal,
                pending: Vec::new(),
                pending_bytes: 0,
            }),
            index_order: Mutex::new(()),
            index_failing: Mutex::new(None),
            wal_dir,
            key,
            durability,
        });
        let commit = commit::spawn(s.clone())?;
        let store = Self {
            s,
            next_id: AtomicU64::new(last_id + 1),
            commit: Some(commit),
        };
        store.check_tail()?;
        store.mark_interrupted(!had_open_index)?;
        Ok(store)
    }

    /// A chain shorter than the latest signed checkpoint lost its tail
    /// while the node was down: said loudly and chained before anything
    /// else is appended (`verify` names it too).
    fn check_tail(&self) -> Result<(), RecordError> {
        let Some(cp) = self.s.latest_checkpoint()? else {
            return Ok(());
        };
        let (next, _) = self.s.head();
        if cp.seq >= next {
            tracing::error!(
                chain_ends_at = next,
                checkpoint = cp.n,
                checkpoint_seq = cp.seq,
                "RECORDS TRUNCATED: the chain is shorter than its latest signed checkpoint"
            );
            self.audit_nowait(
                "records.truncated",
                &serde_json::json!({
                    "chain_next_seq": next,
                    "checkpoint": cp,
                }),
            )?;
        }
        Ok(())
    }

    /// Connections and exchanges left open by a previous run did not end
    /// cleanly: they are marked interrupted (a new event each).
    fn mark_interrupted(&self, legacy_scan: bool) -> Result<(), RecordError> {
        let mut conns = Vec::new();
        let mut exs = Vec::new();
        for item in self.s.views.open.iter() {
            let (k, _) = item?;
            match k.first() {
                Some(b'c') => conns.push(key_u64(&k[1..])),
                Some(b'x') => exs.push(k[1..].to_vec()),
                _ => {}
            }
        }
        if legacy_scan {
            // Stores from before the open index: look at every connection.
            for item in self.s.views.connections.iter() {
                let (k, v) = item?;
                if serde_json::from_slice::<ConnectionRecord>(&v)
                    .is_ok_and(|r| r.outcome == Outcome::Open)
                {
                    conns.push(key_u64(&k));
                }
            }
        }
        for k in exs {
            let Some(v) = self.s.views.exchanges.get(&k)? else {
                continue;
            };
            let mut ex: Exchange =
                serde_json::from_slice(&v).map_err(|source| RecordError::Corrupt {
                    key: format!("exchanges/{}", hex::encode(&k)),
                    source,
                })?;
            ex.state = ExchangeState::Interrupted;
            ex.error.get_or_insert_with(|| {
                "interrupted: the node stopped before the response ended".into()
            });
            self.write_exchange(&ex, "exchange.interrupted")?;
        }
        for id in conns {
            let mut r = self.get(id)?;
            r.outcome = Outcome::Interrupted;
            self.put(&r, "connection.interrupted")?;
        }
        Ok(())
    }

    /// A named tree in the same database (node state kept beside records).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, RecordError> {
        Ok(self.s.db.open_tree(name)?)
    }

    /// Session ids count up from 1 and continue after a restart.
    pub fn next_id(&self) -> Result<u64, RecordError> {
        Ok(self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    /// Stores the record's current state and appends it to the chain.
    /// In the kernel (survives `kill -9`) when this returns.
    pub fn put(&self, r: &ConnectionRecord, kind: &str) -> Result<(), RecordError> {
        let body = serde_json::to_vec(r).map_err(RecordError::Encode)?;
        self.s.append(
            r.id,
            kind,
            body,
            View::Connection {
                open: r.outcome == Outcome::Open,
            },
        )?;
        Ok(())
    }

    /// Appends a node-level event (policy, approvals, suspensions) to the
    /// chain, under session 0, and waits until it is on disk.
    pub fn audit(&self, kind: &str, body: &serde_json::Value) -> Result<(), RecordError> {
        self.audit_nowait(kind, body)?;
        self.flush_blocking()
    }

    fn audit_nowait(&self, kind: &str, body: &serde_json::Value) -> Result<(), RecordError> {
        let text = serde_json::to_vec(body).map_err(RecordError::Encode)?;
        self.s.append(0, kind, text, View::None)?;
        Ok(())
    }

    /// Audit events (session 0) of the given kinds, oldest first.
    pub fn audit_events(&self, prefix: &str) -> Result<Vec<Event>, RecordError> {
        self.s.index()?;
        let mut out = Vec::new();
        for item in self.s.events.iter() {
            let (_, v) = item?;
            if let Ok(l) = chain::Link::decode(&v) {
                if l.connection == 0 && l.kind.starts_with(prefix) {
                    out.push(l.to_event());
                }
            }
        }
        Ok(out)
    }

    /// Records an exchange before it is forwarded (`state: started`):
    /// method, authority, path, request headers, decisions so far. In the
    /// kernel when this returns; `put_exchange` completes it.
    pub fn start_exchange(&self, ex: &Exchange) -> Result<(), RecordError> {
        debug_assert_eq!(ex.state, ExchangeState::Started);
        self.write_exchange(ex, "exchange.started")
    }

    /// Stores a finished exchange and appends it to the chain.
    pub fn put_exchange(&self, ex: &Exchange) -> Result<(), RecordError> {
        self.write_exchange(ex, "exchange")
    }

    fn write_exchange(&self, ex: &Exchange, kind: &str) -> Result<(), RecordError> {
        let body = serde_json::to_vec(ex).map_err(RecordError::Encode)?;
        self.s.append(
            ex.session,
            kind,
            body,
            View::Exchange {
                seq: ex.seq,
                open: ex.state == ExchangeState::Started,
            },
        )?;
        Ok(())
    }

    /// A session's exchanges, in order.
    pub fn exchanges(&self, session: u64) -> Result<Vec<Exchange>, RecordError> {
        self.s.index()?;
        let mut out = Vec::new();
        for item in self.s.views.exchanges.scan_prefix(session.to_be_bytes()) {
            let (k, v) = item?;
            out.push(
                serde_json::from_slice(&v).map_err(|source| RecordError::Corrupt {
                    key: format!("exchanges/{}", hex::encode(&k)),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    fn request(&self, checkpoint: bool) -> Result<commit::Waiter, RecordError> {
        self.commit
            .as_ref()
            .ok_or_else(|| RecordError::Flush("store is closing".into()))?
            .request(checkpoint)
    }

    /// On disk (fsync) once this returns; batched with concurrent callers.
    /// Not needed against `kill -9` (every append is in the kernel
    /// already); this is for host power loss.
    pub async fn flush(&self) -> Result<(), RecordError> {
        let w = self.request(false)?;
        tokio::task::spawn_blocking(move || w.wait())
            .await
            .map_err(|e| RecordError::Flush(e.to_string()))?
    }

    /// As `flush`, for synchronous callers (never from an async hot path).
    pub fn flush_blocking(&self) -> Result<(), RecordError> {
        self.request(false)?.wait()
    }

    /// Signs a checkpoint of the current head (if the chain grew since the
    /// last one) and flushes; for shutdown and exports.
    pub async fn seal(&self) -> Result<(), RecordError> {
        let w = self.request(true)?;
        tokio::task::spawn_blocking(move || w.wait())
            .await
            .map_err(|e| RecordError::Flush(e.to_string()))?
    }

    /// As `seal`, for synchronous callers (the control API).
    pub fn seal_blocking(&self) -> Result<(), RecordError> {
        self.request(true)?.wait()
    }

    pub fn get(&self, id: u64) -> Result<ConnectionRecord, RecordError> {
        self.s.index()?;
        let v = self
            .s
            .views
            .connections
            .get(id.to_be_bytes())?
            .ok_or(RecordError::NotFound(id))?;
        serde_json::from_slice(&v).map_err(|source| RecordError::Corrupt {
            key: format!("connections/{id}"),
            source,
        })
    }

    /// Newest first.
    pub fn list(&self, filter: &Filter) -> Result<Vec<ConnectionRecord>, RecordError> {
        self.s.index()?;
        let limit = filter.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        for item in self.s.views.connections.iter().rev() {
            let (k, v) = item?;
            let r: ConnectionRecord =
                serde_json::from_slice(&v).map_err(|source| RecordError::Corrupt {
                    key: format!("connections/{}", key_u64(&k)),
                    source,
                })?;
            if filter.matches(&r) {
                out.push(r);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn count(&self) -> usize {
        // A failed indexing is reported by the next append or read.
        let _ = self.s.index();
        self.s.views.connections.len()
    }

    /// The node's checkpoint key (public half).
    pub fn node_key(&self) -> PublicKey {
        self.s.key.public()
    }

    /// Signed checkpoints, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, RecordError> {
        let mut out = Vec::new();
        for item in self.s.checkpoints.iter() {
            let (k, v) = item?;
            out.push(
                serde_json::from_slice(&v).map_err(|source| RecordError::Corrupt {
                    key: format!("checkpoints/{}", key_u64(&k)),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// Walks the whole chain, checks it against every signed checkpoint,
    /// then checks that every stored record (or, with `session`, that
    /// session's records) is exactly what the chain says. Returns the
    /// number of events, or the first break.
    pub fn verify(&self, session: Option<u64>) -> Result<Result<u64, String>, RecordError> {
        self.s.index()?;
        verify::verify(&self.s, session)
    }

    /// What an export needs to prove a session offline: the node key, the
    /// first checkpoint at or after the session's last event, and the
    /// links from its first event to that checkpoint. Call `seal` first
    /// so that a checkpoint covers the session.
    pub fn evidence(&self, session: u64) -> Result<Evidence, RecordError> {
        self.s.index()?;
        verify::evidence(&self.s, session)
    }
}

fn exchange_key(session: u64, seq: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&session.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn split_exchange_key(k: &[u8]) -> (u64, u32) {
    let sid = key_u64(&k[..8.min(k.len())]);
    let seq = if k.len() >= 12 {
        u32::from_be_bytes([k[8], k[9], k[10], k[11]])
    } else {
        0
    };
    (sid, seq)
}

fn key_u64(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[8 - n..].copy_from_slice(&k[k.len() - n..]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(store: &RecordStore, target: &str) -> ConnectionRecord {
        let mut r = ConnectionRecord::new(
            store.next_id().unwrap(),
            ClientAddr("127.0.0.1:5555".parse().unwrap()),
        );
        r.identity.id = "wl-1".into();
        r.original_dst = Some(OrigDstAddr("10.0.0.1:443".parse().unwrap()));
        r.target = Some(target.into());
        r
    }

    #[test]
    fn records_survive_reopen_and_chain_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let s = RecordStore::open(dir.path()).unwrap();
            let mut r = rec(&s, "a");
            id = r.id;
            s.put(&r, "connection.open").unwrap();
            r.outcome = Outcome::Closed;
            r.bytes_up = 10;
            s.put(&r, "connection.close").unwrap();
            let _left_open = {
                let r2 = rec(&s, "b");
                s.put(&r2, "connection.open").unwrap();
                r2
            };
            s.s.db.flush().unwrap();
        }
        let s = RecordStore::open(dir.path()).unwrap();
        assert_eq!(s.get(id).unwrap().bytes_up, 10);
        let all = s.list(&Filter::default()).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            all[0].outcome,
            Outcome::Interrupted,
            "open at stop = interrupted"
        );
        let only_a = s
            .list(&Filter {
                target: Some("a".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(only_a.len(), 1);
        assert_eq!(s.verify(None).unwrap(), Ok(4));
    }

    #[test]
    fn altered_or_deleted_event_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = RecordStore::open(dir.path()).unwrap();
        for _ in 0..3 {
            let r = rec(&s, "a");
            s.put(&r, "connection.open").unwrap();
        }
        assert_eq!(s.verify(None).unwrap(), Ok(3));
        let k = 1u64.to_be_bytes();
        let orig = s.s.events.get(k).unwrap().unwrap();
        let mut tampered = orig.to_vec();
        let pos = tampered.windows(8).position(|w| w == b"10.0.0.1").unwrap();
        tampered[pos + 7] = b'2';
        s.s.events.insert(k, tampered).unwrap();
        let e = s.verify(None).unwrap().unwrap_err();
        assert!(e.contains("event 1"), "{e}");
        s.s.events.insert(k, orig).unwrap();
        assert_eq!(s.verify(None).unwrap(), Ok(3));
        s.s.events.remove(k).unwrap();
        let e = s.verify(None).unwrap().unwrap_err();
        assert!(e.contains("event 1 is missing"), "{e}");
    }

    #[test]
    fn altered_views_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = RecordStore::open(dir.path()).unwrap();
        let r = rec(&s, "a");
        s.put(&r, "connection.open").unwrap();
        let ex = Exchange {
            session: r.id,
            seq: 0,
            state: ExchangeState::Complete,
            workload: "wl-1".into(),
            started_at_ms: 1,
            method: "GET".into(),
            authority: "x".into(),
            path: "/".into(),
            http_version: "HTTP/1.1".into(),
            request_headers: vec![],
            request_body: BodyRecord::default(),
            request_trailers: vec![],
            status: Some(200),
            response_headers: vec![],
            response_body: BodyRecord::default(),
            response_trailers: vec![],
            ttfb_ms: Some(1.0),
            duration_ms: 2.0,
            upgrade: None,
            error: None,
            decisions: vec![],
            injected: None,
        };
        s.put_exchange(&ex).unwrap();
        assert_eq!(s.verify(Some(r.id)).unwrap(), Ok(2));
        // The session view edited without touching the chain.
        let mut forged = r.clone();
        forged.target = Some("b".into());
        s.s.views
            .connections
            .insert(r.id.to_be_bytes(), serde_json::to_vec(&forged).unwrap())
            .unwrap();
        let e = s.verify(Some(r.id)).unwrap().unwrap_err();
        assert!(e.contains(&format!("session {}", r.id)), "{e}");
        s.s.views
            .connections
            .insert(r.id.to_be_bytes(), serde_json::to_vec(&r).unwrap())
            .unwrap();
        // An exchange deleted from the view.
        s.s.views.exchanges.remove(exchange_key(r.id, 0)).unwrap();
        let e = s.verify(None).unwrap().unwrap_err();
        assert!(e.contains("deleted"), "{e}");
    }

    fn exchange(session: u64, seq: u32, state: ExchangeState) -> Exchange {
        Exchange {
            session,
            seq,
            state,
            workload: "wl-1".into(),
            started_at_ms: 1,
            method: "GET".into(),
            authority: "x".into(),
            path: format!("/{seq}"),
            http_version: "HTTP/1.1".into(),
            request_headers: vec![],
            request_body: BodyRecord::default(),
            request_trailers: vec![],
            status: None,
            response_headers: vec![],
            response_body: BodyRecord::default(),
            response_trailers: vec![],
            ttfb_ms: None,
            duration_ms: 0.0,
            upgrade: None,
            error: None,
            decisions: vec![],
            injected: None,
        }
    }

    /// What the disk holds right now: what a `kill -9` would leave.
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let dst = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &dst);
            } else {
                std::fs::copy(e.path(), dst).unwrap();
            }
        }
    }

    fn never_flush() -> Durability {
        Durability {
            fsync_interval: Duration::from_secs(3600),
            checkpoint_every_events: 1,
            checkpoint_interval: Duration::from_secs(3600),
        }
    }

    #[test]
    fn kill_9_keeps_every_event_written_and_marks_what_was_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let crashed = tempfile::tempdir().unwrap();
        let sled_only = tempfile::tempdir().unwrap();
        let s = RecordStore::open_with(dir.path(), never_flush()).unwrap();
        let r = rec(&s, "a");
        s.put(&r, "connection.open").unwrap();
        s.start_exchange(&exchange(r.id, 0, ExchangeState::Started))
            .unwrap();
        let mut done = exchange(r.id, 0, ExchangeState::Complete);
        done.status = Some(200);
        s.put_exchange(&done).unwrap();
        s.start_exchange(&exchange(r.id, 1, ExchangeState::Started))
            .unwrap();
        // No flush has run: the process is "killed" here.
        copy_dir(dir.path(), crashed.path());
        copy_dir(dir.path(), sled_only.path());
        std::fs::remove_dir_all(sled_only.path().join("records.wal")).unwrap();
        std::mem::forget(s);

        // sled alone: its inserts were still in process memory (the lost
        // exchanges of issue 8).
        let lost = RecordStore::open(sled_only.path()).unwrap();
        assert!(lost.exchanges(r.id).unwrap().is_empty());
        drop(lost);

        let s = RecordStore::open(crashed.path()).unwrap();
        let exs = s.exchanges(r.id).unwrap();
        assert_eq!(exs.len(), 2);
        assert_eq!(exs[0].state, ExchangeState::Complete);
        assert_eq!(exs[0].status, Some(200));
        assert_eq!(exs[1].state, ExchangeState::Interrupted);
        assert!(exs[1].error.as_deref().unwrap().contains("interrupted"));
        assert_eq!(s.get(r.id).unwrap().outcome, Outcome::Interrupted);
        // open, started, complete, started + two interrupted marks.
        assert_eq!(s.verify(None).unwrap(), Ok(6));
        // Nothing is open any more: a second restart adds nothing.
        drop(s);
        let s = RecordStore::open(crashed.path()).unwrap();
        assert_eq!(s.verify(None).unwrap(), Ok(6));
    }

    #[test]
    fn a_view_lost_apart_from_its_event_is_restored_by_replay() {
        let dir = tempfile::tempdir().unwrap();
        let crashed = tempfile::tempdir().unwrap();
        let s = RecordStore::open_with(dir.path(), never_flush()).unwrap();
        let r = rec(&s, "a");
        s.put(&r, "connection.open").unwrap();
        s.put_exchange(&exchange(r.id, 0, ExchangeState::Complete))
            .unwrap();
        s.s.db.flush().unwrap();
        copy_dir(dir.path(), crashed.path());
        std::mem::forget(s);
        {
            // The crash kept the event but not the view written after it.
            let db = sled::open(crashed.path().join("records.sled")).unwrap();
            db.open_tree("exchanges").unwrap().clear().unwrap();
            db.flush().unwrap();
        }
        let s = RecordStore::open(crashed.path()).unwrap();
        assert_eq!(s.exchanges(r.id).unwrap().len(), 1);
        assert!(s.verify(None).unwrap().is_ok());
    }

    #[test]
    fn truncated_tail_and_forged_checkpoint_are_named() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RecordStore::open_with(dir.path(), never_flush()).unwrap();
            for _ in 0..5 {
                s.put(&rec(&s, "a"), "connection.refused").unwrap();
            }
            s.seal_blocking().unwrap();
            let cps = s.checkpoints().unwrap();
            assert_eq!(cps.last().unwrap().seq, 4);
            assert_eq!(s.verify(None).unwrap(), Ok(5));
        }
        let truncate = |k: u64| {
            let db = sled::open(dir.path().join("records.sled")).unwrap();
            let ev = db.open_tree("events").unwrap();
            for _ in 0..k {
                ev.pop_max().unwrap();
            }
            db.flush().unwrap();
        };
        truncate(2);
        {
            let s = RecordStore::open(dir.path()).unwrap();
            let e = s.verify(None).unwrap().unwrap_err();
            assert!(
                e.contains("TRUNCATED") && e.contains("2 event(s) removed"),
                "{e}"
            );
            // The node chained what it found at start.
            assert_eq!(s.audit_events("records.truncated").unwrap().len(), 1);
        }
        // Forged: the attacker rewrites the checkpoint to the short chain.
        let db = sled::open(dir.path().join("records.sled")).unwrap();
        let cps = db.open_tree("checkpoints").unwrap();
        let (k, v) = cps.last().unwrap().unwrap();
        let mut cp: Checkpoint = serde_json::from_slice(&v).unwrap();
        cp.seq = 2;
        cps.insert(k, serde_json::to_vec(&cp).unwrap()).unwrap();
        db.flush().unwrap();
        drop((cps, db));
        let s = RecordStore::open(dir.path()).unwrap();
        let e = s.verify(None).unwrap().unwrap_err();
        assert!(e.contains("forged"), "{e}");
    }

    #[test]
    fn evidence_verifies_offline_and_catches_an_edit() {
        let dir = tempfile::tempdir().unwrap();
        let s = RecordStore::open_with(dir.path(), never_flush()).unwrap();
        let a = rec(&s, "a");
        s.put(&a, "connection.open").unwrap();
        s.put(&rec(&s, "b"), "connection.open").unwrap();
        s.put_exchange(&exchange(a.id, 0, ExchangeState::Complete))
            .unwrap();
        s.put(&rec(&s, "c"), "connection.open").unwrap();
        s.seal_blocking().unwrap();
        let ev = s.evidence(a.id).unwrap();
        assert_eq!(ev.verify(), Ok(2));
        assert_eq!(
            ev.links.len(),
            4,
            "from the session's first event to the head"
        );
        assert!(ev.links[1].body.is_none(), "other sessions: digest only");
        let mut bad = ev.clone();
        let body = bad.links[2].body.as_mut().unwrap();
        *body = body.replace("GET", "PUT");
        assert!(bad.verify().is_err());
        let mut bad = ev;
        bad.links.pop();
        assert!(bad.verify().is_err());
    }
}
