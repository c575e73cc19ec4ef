//! Connection and exchange records. Every change is an event appended to
//! the record log (`log.rs`), in which each event commits to the hash of
//! the one before it (`chain.rs`), so that an altered or deleted event is
//! detectable (`verify.rs`). The log is the store: a record's current
//! state is its latest event, found through a small sled index.
//!
//! Write path (one `append`, under one lock, on the caller's thread): hash
//! the record's JSON, write the event to the log with one `write(2)` (in
//! the kernel from then on, so it survives `kill -9`), and queue its index
//! entry. Nothing else: no thread hop, no wait. Indexing (one sled batch
//! per tree, a few dozen bytes per event) happens in the group-commit
//! thread (`commit.rs`) before each flush, in any reader first (reads see
//! every append that returned), and in the appender itself when the queue
//! is over its bound. The commit thread fsyncs the log and flushes the
//! index every `records.fsync_interval_ms`, and signs checkpoints of the
//! chain head (`checkpoint.rs`). At start the index catches up with the
//! log (`recover`) and whatever was open (connections, exchanges) is
//! marked interrupted.
mod health;
pub use health::RecordHealth;
mod chain;
mod checkpoint;
mod commit;
mod index;
mod log;
mod recover;
pub mod statement;
mod types;
mod verify;

use std::{
    path::{Path, PathBuf},
    sync::{atomic::AtomicU64, Arc, Mutex},
};

use serde::{Deserialize, Serialize};

pub use checkpoint::{Checkpoint, Evidence, KeyError, NodeKey, ProofLink, PublicKey};
use log::Loc;
use recover::{migrate_legacy, recover};
pub use statement::{SqlFacts, Statement};
pub use types::*;

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
    #[error("record log: {0}")]
    Io(#[from] std::io::Error),
    #[error("record log: {0}")]
    Log(String),
    #[error(transparent)]
    Key(#[from] KeyError),
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
        if kind.starts_with("exchange") || kind.starts_with("statement") {
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
    log: log::LogWriter,
    /// Appended (in the log) but not yet in the sled index, in order.
    pending: Vec<Pending>,
}

/// An event waiting to be indexed.
struct Pending {
    seq: u64,
    hash: chain::Hash,
    connection: u64,
    view: View,
    at: Loc,
    /// Where the log continues after it.
    end: Loc,
}

/// Beyond this the appender indexes the queue itself: memory stays
/// bounded however far the commit thread falls behind.
const MAX_PENDING_EVENTS: usize = 8192;
/// sled holds node state (suspensions, policy floor) and checkpoints:
/// a small page cache.
const SLED_CACHE_BYTES: u64 = 8 << 20;

/// What the store and its group-commit thread share.
struct Shared {
    db: sled::Db,
    checkpoints: sled::Tree,
    /// Serialises appends so that each event sees the true previous hash
    /// and the log holds events in chain order.
    head: Mutex<Head>,
    /// The index; its lock also orders indexing (batches go in in chain
    /// order). Taken before `head`, never while holding it.
    index: Mutex<index::Index>,
    /// The last indexing failed: appends are refused until one succeeds
    /// (fail closed).
    index_failing: Mutex<Option<String>>,
    log_dir: PathBuf,
    key: NodeKey,
    durability: Durability,
    /// Sequence number below which every event is fsync'd (set by the
    /// commit thread): what may leave the node (spool, shipping).
    durable: AtomicU64,
    /// A follower reads every durable event back (the spool): it, not the
    /// commit, lets the log's pages leave the page cache.
    followed: std::sync::atomic::AtomicBool,
}

pub struct RecordStore {
    s: Arc<Shared>,
    next_id: AtomicU64,
    commit: Option<commit::Handle>,
}

impl Drop for RecordStore {
    /// Stops the group-commit thread (it holds the database): it signs a
    /// last checkpoint, syncs and flushes once more on the way out.
    fn drop(&mut self) {
        drop(self.commit.take());
    }
}

impl Shared {
    /// Appends a record as an event: its JSON serialised straight into
    /// the frame, chain hash, one `write(2)` to the log (from then on it
    /// survives `kill -9`), queued for the index.
    fn append_json<T: Serialize + ?Sized>(
        &self,
        connection: u64,
        kind: &str,
        record: &T,
        view: View,
    ) -> Result<u64, RecordError> {
        // The frame buffer is the thread's, reused: an append then costs
        // no allocation (a record's JSON grown by doubling used to be
        // several, and a copy into the frame).
        thread_local! {
            static FRAME: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut frame = FRAME.with(|f| f.take());
        frame.clear();
        let res = self.append_frame(&mut frame, connection, kind, record, view);
        // A huge record's buffer is not kept for the thread's lifetime.
        if frame.capacity() <= 256 << 10 {
            FRAME.with(|f| f.set(frame));
        }
        res
    }

    fn append_frame<T: Serialize + ?Sized>(
        &self,
        frame: &mut Vec<u8>,
        connection: u64,
        kind: &str,
        record: &T,
        view: View,
    ) -> Result<u64, RecordError> {
        if let Some(e) = self
            .index_failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Err(RecordError::Log(format!("indexing records failed: {e}")));
        }
        frame.extend_from_slice(&[0; 4]);
        // Encoded and digested before the lock: appends from many
        // connections only queue for the link hash and the write(2).
        let draft = chain::draft_with(frame, now_ms(), connection, kind, |out| {
            serde_json::to_writer(out, record).map_err(RecordError::Encode)
        })?;
        let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        let seq = head.seq;
        let hash = draft.seal(frame, seq, &head.hash);
        let at = head.log.append(frame)?;
        head.seq = seq + 1;
        head.hash = hash;
        let end = head.log.end();
        head.pending.push(Pending {
            seq,
            hash,
            connection,
            view,
            at,
            end,
        });
        let full = head.pending.len() >= MAX_PENDING_EVENTS;
        drop(head);
        if full {
            drop(self.index()?);
        }
        Ok(seq)
    }

    /// Puts every queued event into the index (its overlay; the commit
    /// thread writes it out). Readers call this first, so they see every
    /// append that returned.
    fn index(&self) -> Result<std::sync::MutexGuard<'_, index::Index>, RecordError> {
        let mut ix = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let batch =
            std::mem::take(&mut self.head.lock().unwrap_or_else(|e| e.into_inner()).pending);
        self.apply(&mut ix, batch)?;
        Ok(ix)
    }

    /// Indexes a run of events (the caller holds the index lock). On
    /// failure they go back to the front of the queue, to be retried
    /// (adding an event twice gives the same slot).
    fn apply(&self, ix: &mut index::Index, batch: Vec<Pending>) -> Result<(), RecordError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut res = Ok(());
        for p in &batch {
            res = ix.add(p.seq, &p.hash, p.connection, p.view, p.at, p.end);
            if res.is_err() {
                break;
            }
        }
        let mut failing = self.index_failing.lock().unwrap_or_else(|e| e.into_inner());
        match res {
            Ok(()) => {
                *failing = None;
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, events = batch.len(), "indexing records failed; new records are refused until it works");
                *failing = Some(e.to_string());
                drop(failing);
                let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
                let newer = std::mem::replace(&mut head.pending, batch);
                head.pending.extend(newer);
                Err(e.into())
            }
        }
    }

    fn head(&self) -> (u64, chain::Hash) {
        let h = self.head.lock().unwrap_or_else(|e| e.into_inner());
        (h.seq, h.hash)
    }

    /// The event at `at` (from the index).
    fn read(&self, at: Loc, what: &str) -> Result<chain::Link, RecordError> {
        let payload = log::read_at(&self.log_dir, at)
            .map_err(|e| RecordError::Log(format!("{what}: {e}")))?;
        chain::Link::decode(&payload).map_err(|e| RecordError::Log(format!("{what}: {e}")))
    }

    /// A session's events, in order: the log from its first to its latest
    /// event, others' events skipped.
    fn session_events(
        &self,
        slot: &index::Slot,
        session: u64,
    ) -> Result<Vec<chain::Link>, RecordError> {
        let (Some(first), Some(last)) = (slot.first, slot.last) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut bad = None;
        for (n, path) in log::segments(&self.log_dir, "log")? {
            if n < first.segment || n > last.segment {
                continue;
            }
            let from = if n == first.segment { first.offset } else { 0 };
            log::scan(&path, n, from, |loc, payload| {
                if loc > last {
                    return false;
                }
                match chain::Link::decode(payload) {
                    Ok(l) if l.connection == session => out.push(l),
                    Ok(_) => {}
                    Err(e) => {
                        bad = Some(e);
                        return false;
                    }
                }
                true
            })?;
            if let Some(e) = bad {
                return Err(RecordError::Log(format!("session {session}: {e}")));
            }
        }
        Ok(out)
    }

    /// Every event in the log, in order, until `f` returns false. Stops
    /// at a frame that is not an event (reported as an error).
    fn each_event(&self, mut f: impl FnMut(Loc, chain::Link) -> bool) -> Result<(), RecordError> {
        let mut bad = None;
        for (n, path) in log::segments(&self.log_dir, "log")? {
            let mut go = true;
            let (_, torn) = log::scan(&path, n, 0, |loc, payload| {
                match chain::Link::decode(payload) {
                    Ok(l) => go = f(loc, l),
                    Err(e) => {
                        bad = Some(format!("segment {n} offset {}: {e}", loc.offset));
                        go = false;
                    }
                }
                go
            })?;
            if let Some(e) = bad {
                return Err(RecordError::Log(e));
            }
            if !go {
                return Ok(());
            }
            if torn {
                tracing::warn!(segment = n, "record log segment ends in a partial frame");
            }
        }
        Ok(())
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

impl RecordStore {
    pub fn open(dir: &Path) -> Result<Self, RecordError> {
        Self::open_with(dir, Durability::default())
    }

    pub fn open_with(dir: &Path, durability: Durability) -> Result<Self, RecordError> {
        // sled's own periodic flush is off: the group-commit thread is the
        // only flusher (sled 0.34 flushes must not run concurrently).
        let db = sled::Config::new()
            .path(dir.join("records.sled"))
            .flush_every_ms(None)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()?;
        let log_dir = dir.join("records.log");
        migrate_legacy(&db, dir, &log_dir)?;
        let checkpoints = db.open_tree("checkpoints")?;
        let key = NodeKey::load_or_create(dir)?;
        let (mut ix, meta) = index::Index::open(dir)?;
        let (head, writer, last_id) = recover(&mut ix, meta, &log_dir)?;
        let s = Arc::new(Shared {
            db,
            checkpoints,
            head: Mutex::new(Head {
                seq: head.0,
                hash: head.1,
                log: writer,
                pending: Vec::new(),
            }),
            index: Mutex::new(ix),
            index_failing: Mutex::new(None),
            log_dir,
            key,
            durability,
            // Recovery leaves the log as it finds it on disk.
            durable: AtomicU64::new(head.0),
            followed: Default::default(),
        });
        let commit = commit::spawn(s.clone())?;
        let store = Self {
            s,
            next_id: AtomicU64::new(last_id + 1),
            commit: Some(commit),
        };
        store.check_tail()?;
        store.mark_interrupted()?;
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
    fn mark_interrupted(&self) -> Result<(), RecordError> {
        let open: Vec<index::Open> = self.s.index()?.meta.open.iter().copied().collect();
        for o in &open {
            let index::Open::Exchange(session, seq) = *o else {
                continue;
            };
            if let Some(mut st) = self.statements(session)?.into_iter().find(|e| e.seq == seq) {
                st.state = ExchangeState::Interrupted;
                st.error.get_or_insert_with(|| {
                    "interrupted: the node stopped before the statement ended".into()
                });
                self.write_statement(&st, "statement.interrupted")?;
                continue;
            }
            let Some(mut ex) = self.exchanges(session)?.into_iter().find(|e| e.seq == seq) else {
                continue;
            };
            ex.state = ExchangeState::Interrupted;
            ex.error.get_or_insert_with(|| {
                "interrupted: the node stopped before the response ended".into()
            });
            self.write_exchange(&ex, "exchange.interrupted")?;
        }
        for o in open {
            let index::Open::Connection(id) = o else {
                continue;
            };
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

    /// Appends the record's current state to the chain. In the kernel
    /// (survives `kill -9`) when this returns.
    pub fn put(&self, r: &ConnectionRecord, kind: &str) -> Result<(), RecordError> {
        self.s.append_json(
            r.id,
            kind,
            r,
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

    /// An audit event on the chain now, on disk with the next flush: for
    /// paths a job can drive (the accept path), which must not wait for
    /// fsync.
    pub fn audit_soon(&self, kind: &str, body: &serde_json::Value) -> Result<(), RecordError> {
        self.audit_nowait(kind, body)
    }

    fn audit_nowait(&self, kind: &str, body: &serde_json::Value) -> Result<(), RecordError> {
        self.s.append_json(0, kind, body, View::None)?;
        Ok(())
    }

    /// Audit events (session 0) of the given kinds, oldest first.
    pub fn audit_events(&self, prefix: &str) -> Result<Vec<Event>, RecordError> {
        let mut out = Vec::new();
        self.s.each_event(|_, l| {
            if l.connection == 0 && l.kind.starts_with(prefix) {
                out.push(l.to_event());
            }
            true
        })?;
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
        self.write_numbered(ex, ex.session, ex.seq, ex.state, kind)
    }

    /// An exchange or statement: numbered within its session, open while
    /// `started` (marked interrupted at the next start if it stays so).
    fn write_numbered<T: Serialize>(
        &self,
        record: &T,
        session: u64,
        seq: u32,
        state: ExchangeState,
        kind: &str,
    ) -> Result<(), RecordError> {
        self.s.append_json(
            session,
            kind,
            record,
            View::Exchange {
                seq,
                open: state == ExchangeState::Started,
            },
        )?;
        Ok(())
    }

    /// Records a statement before it is forwarded (`state: started`); in
    /// the kernel when this returns. `put_statement` completes it.
    pub fn start_statement(&self, st: &Statement) -> Result<(), RecordError> {
        self.write_statement(st, "statement.started")
    }

    pub fn put_statement(&self, st: &Statement) -> Result<(), RecordError> {
        self.write_statement(st, "statement")
    }

    fn write_statement(&self, st: &Statement, kind: &str) -> Result<(), RecordError> {
        self.write_numbered(st, st.session, st.seq, st.state, kind)
    }

    /// From now on a follower reads every durable event back with
    /// `read_events` and calls `release_read` after: the commit leaves the
    /// log's pages cached for it.
    pub fn follow(&self) {
        self.s
            .followed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The follower has read the log from `from` (its start when `None`) to
    /// `to`: those pages may leave the page cache.
    pub fn release_read(&self, from: Option<LogPos>, to: LogPos) {
        let loc = |p: LogPos| log::Loc {
            segment: p.segment,
            offset: p.offset,
        };
        let from = from.map(loc).unwrap_or(log::Loc {
            segment: 0,
            offset: 0,
        });
        log::release_read(&self.s.log_dir, from, loc(to));
    }

    /// Every event below this sequence number is on disk (fsync'd).
    pub fn durable_seq(&self) -> u64 {
        self.s.durable.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Events in chain order starting at `from` (the log's start when
    /// `None`), up to `max` of them and only below `below_seq`; returns
    /// them with where to continue.
    pub fn read_events(
        &self,
        from: Option<LogPos>,
        below_seq: u64,
        max: usize,
    ) -> Result<(Vec<RawEvent>, Option<LogPos>), RecordError> {
        let mut out = Vec::new();
        let mut next = from;
        let start = from.map(|p| (p.segment, p.offset)).unwrap_or((0, 0));
        let mut bad = None;
        for (n, path) in log::segments(&self.s.log_dir, "log")? {
            if n < start.0 {
                continue;
            }
            let offset = if n == start.0 { start.1 } else { 0 };
            let mut stop = false;
            let (end, _) = log::scan(&path, n, offset, |loc, payload| {
                if out.len() >= max {
                    stop = true;
                    return false;
                }
                match chain::Link::decode(payload) {
                    Ok(l) if l.seq < below_seq => {
                        out.push(RawEvent {
                            seq: l.seq,
                            at_ms: l.at_ms,
                            connection: l.connection,
                            kind: l.kind,
                            body: l.body,
                            prev: l.prev,
                            hash: l.hash,
                        });
                        next = Some(LogPos {
                            segment: n,
                            offset: loc.offset + 4 + payload.len() as u64,
                        });
                        true
                    }
                    Ok(_) => {
                        stop = true;
                        false
                    }
                    Err(e) => {
                        bad = Some(format!("segment {n} offset {}: {e}", loc.offset));
                        false
                    }
                }
            })?;
            if let Some(e) = bad {
                return Err(RecordError::Log(e));
            }
            if stop {
                break;
            }
            // A later segment starts after this one's end.
            if next.is_none_or(|p| p.segment < n) && end > 0 {
                next = Some(LogPos {
                    segment: n,
                    offset: end,
                });
            }
        }
        Ok((out, next))
    }

    /// A session's statements, in order (each as its latest event has it).
    pub fn statements(&self, session: u64) -> Result<Vec<Statement>, RecordError> {
        self.latest_numbered(session, "statement", |st: &Statement| st.seq)
    }

    /// A session's exchanges, in order (each as its latest event has it).
    pub fn exchanges(&self, session: u64) -> Result<Vec<Exchange>, RecordError> {
        self.latest_numbered(session, "exchange", |ex: &Exchange| ex.seq)
    }

    /// The latest version of each numbered record of one kind in a session.
    fn latest_numbered<T: serde::de::DeserializeOwned>(
        &self,
        session: u64,
        kind: &str,
        seq: impl Fn(&T) -> u32,
    ) -> Result<Vec<T>, RecordError> {
        let Some(slot) = self.s.index()?.get(session)? else {
            return Ok(Vec::new());
        };
        let mut by_seq: std::collections::BTreeMap<u32, T> = Default::default();
        for l in self.s.session_events(&slot, session)? {
            if !l.kind.starts_with(kind) {
                continue;
            }
            let r: T = serde_json::from_slice(&l.body).map_err(|source| RecordError::Corrupt {
                key: format!("session {session} event {}", l.seq),
                source,
            })?;
            by_seq.insert(seq(&r), r);
        }
        Ok(by_seq.into_values().collect())
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
        let slot = self.s.index()?.get(id)?;
        let at = slot.and_then(|s| s.conn).ok_or(RecordError::NotFound(id))?;
        self.read_connection(id, at)
    }

    fn read_connection(&self, id: u64, at: Loc) -> Result<ConnectionRecord, RecordError> {
        let what = format!("connections/{id}");
        let l = self.s.read(at, &what)?;
        serde_json::from_slice(&l.body).map_err(|source| RecordError::Corrupt { key: what, source })
    }

    /// Newest first.
    pub fn list(&self, filter: &Filter) -> Result<Vec<ConnectionRecord>, RecordError> {
        let max = self.s.index()?.max_id()?;
        let limit = filter.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        for id in (1..=max).rev() {
            // Indexed up to date above; the lock only per slot, so appends
            // and commits go on while a long list is read.
            let slot = self
                .s
                .index
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(id)?;
            let Some(at) = slot.and_then(|s| s.conn) else {
                continue;
            };
            let r = self.read_connection(id, at)?;
            if filter.matches(&r) {
                out.push(r);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Sessions recorded.
    pub fn count(&self) -> usize {
        // A failed indexing is reported by the next append or read.
        match self.s.index() {
            Ok(ix) => ix.meta.sessions as usize,
            Err(_) => 0,
        }
    }

    /// The node's checkpoint key (public half).
    pub fn node_key(&self) -> PublicKey {
        self.s.key.public()
    }

    /// The newest signed checkpoint.
    pub fn last_checkpoint(&self) -> Result<Option<Checkpoint>, RecordError> {
        self.s.latest_checkpoint()
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
    /// then checks that the index (or, with `session`, that session's
    /// entries) points at each record's latest event. Returns the number
    /// of events, or the first break.
    pub fn verify(&self, session: Option<u64>) -> Result<Result<u64, String>, RecordError> {
        drop(self.s.index()?);
        verify::verify(&self.s, session)
    }

    /// What an export needs to prove a session offline: the node key, the
    /// first checkpoint at or after the session's last event, and the
    /// links from its first event to that checkpoint. Call `seal` first
    /// so that a checkpoint covers the session.
    pub fn evidence(&self, session: u64) -> Result<Evidence, RecordError> {
        drop(self.s.index()?);
        verify::evidence(&self.s, session)
    }
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
    use crate::addr::{ClientAddr, OrigDstAddr};
    use std::time::Duration;

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

    /// Every frame in the log: (segment file, offset, length with header).
    fn frames(dir: &Path) -> Vec<(PathBuf, u64, u64)> {
        let mut out = Vec::new();
        for (n, p) in log::segments(&dir.join("records.log"), "log").unwrap() {
            log::scan(&p, n, 0, |loc, payload| {
                out.push((p.clone(), loc.offset, 4 + payload.len() as u64));
                true
            })
            .unwrap();
        }
        out
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
        let f = frames(dir.path());
        let (path, off, len) = f[1].clone();
        let orig = std::fs::read(&path).unwrap();
        let mut tampered = orig.clone();
        let frame = &mut tampered[off as usize..(off + len) as usize];
        let pos = frame.windows(8).position(|w| w == b"10.0.0.1").unwrap();
        frame[pos + 7] = b'2';
        std::fs::write(&path, &tampered).unwrap();
        let e = s.verify(None).unwrap().unwrap_err();
        assert!(e.contains("event 1"), "{e}");
        std::fs::write(&path, &orig).unwrap();
        assert_eq!(s.verify(None).unwrap(), Ok(3));
        // Event 1 cut out of the log.
        let mut cut = orig[..off as usize].to_vec();
        cut.extend_from_slice(&orig[(off + len) as usize..]);
        std::fs::write(&path, &cut).unwrap();
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
            tool_calls: Vec::new(),
        };
        s.put_exchange(&ex).unwrap();
        assert_eq!(s.verify(Some(r.id)).unwrap(), Ok(2));
        // The session's slot edited so that its record reads as another
        // event (the exchange): the connection location := the latest.
        s.flush_blocking().unwrap();
        let idx = dir.path().join("records.idx");
        let orig = std::fs::read(&idx).unwrap();
        let mut forged = orig.clone();
        let slot = r.id as usize * 48;
        forged.copy_within(slot + 32..slot + 48, slot + 16);
        std::fs::write(&idx, &forged).unwrap();
        let e = s.verify(Some(r.id)).unwrap().unwrap_err();
        assert!(e.contains(&format!("session {}", r.id)), "{e}");
        std::fs::write(&idx, &orig).unwrap();
        assert_eq!(s.verify(None).unwrap(), Ok(2));
        // The session removed from the index.
        std::fs::write(&idx, &orig[..slot]).unwrap();
        let e = s.verify(None).unwrap().unwrap_err();
        assert!(e.contains("missing from the index"), "{e}");
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
            tool_calls: Vec::new(),
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

    /// The commit drops the fsync'd log from the page cache, unless a
    /// follower (the spool) is going to read it back: then the follower
    /// releases it once read, so its reads do not go to disk.
    #[test]
    fn the_log_stays_cached_until_its_follower_has_read_it() {
        use log::tests::resident;
        let pages = |dir: &Path| {
            let (_, seg) = log::segments(&dir.join("records.log"), "log")
                .unwrap()
                .pop()
                .unwrap();
            resident(&std::fs::File::open(seg).unwrap())
        };
        let write = |s: &RecordStore| {
            for seq in 0..200 {
                s.put_exchange(&exchange(1, seq, ExchangeState::Complete))
                    .unwrap();
            }
            s.flush_blocking().unwrap();
        };
        let alone = tempfile::tempdir_in("/var/tmp").unwrap();
        let s = RecordStore::open_with(alone.path(), never_flush()).unwrap();
        write(&s);
        let r = pages(alone.path());
        assert!(
            r[..r.len() - 1].iter().all(|r| !*r),
            "released at the commit: {r:?}"
        );

        let followed = tempfile::tempdir_in("/var/tmp").unwrap();
        let s = RecordStore::open_with(followed.path(), never_flush()).unwrap();
        s.follow();
        write(&s);
        assert!(
            pages(followed.path()).iter().all(|r| *r),
            "kept for the follower"
        );
        let (events, next) = s.read_events(None, s.durable_seq(), usize::MAX).unwrap();
        assert!(events.len() >= 200);
        s.release_read(None, next.unwrap());
        let r = pages(followed.path());
        assert!(
            r[..r.len() - 1].iter().all(|r| !*r),
            "released once read: {r:?}"
        );
    }

    #[test]
    fn kill_9_keeps_every_event_written_and_marks_what_was_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let crashed = tempfile::tempdir().unwrap();
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
        // The index on disk knows none of it (never flushed).
        copy_dir(dir.path(), crashed.path());
        std::mem::forget(s);

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
    fn a_lost_index_is_rebuilt_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RecordStore::open(dir.path()).unwrap();
            let r = rec(&s, "a");
            s.put(&r, "connection.open").unwrap();
            s.put_exchange(&exchange(r.id, 0, ExchangeState::Complete))
                .unwrap();
            s.flush_blocking().unwrap();
        }
        {
            std::fs::remove_file(dir.path().join("records.idx")).unwrap();
            std::fs::remove_file(dir.path().join("records.idx.meta")).unwrap();
        }
        let s = RecordStore::open(dir.path()).unwrap();
        assert_eq!(s.list(&Filter::default()).unwrap().len(), 1);
        assert_eq!(s.exchanges(1).unwrap().len(), 1);
        // The connection was open in the log: marked interrupted.
        assert_eq!(s.get(1).unwrap().outcome, Outcome::Interrupted);
        assert_eq!(s.verify(None).unwrap(), Ok(3));
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
        let truncate = |k: usize| {
            let f = frames(dir.path());
            let (path, off, _) = &f[f.len() - k];
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(*off)
                .unwrap();
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
    fn a_store_from_before_the_log_is_migrated() {
        // The previous layout: events (and records) in sled, the newest
        // events in `records.wal` only.
        let dir = tempfile::tempdir().unwrap();
        let body = |id: u64| {
            let mut r = ConnectionRecord::new(id, ClientAddr("127.0.0.1:1".parse().unwrap()));
            r.target = Some("old".into());
            r.outcome = Outcome::Closed;
            serde_json::to_vec(&r).unwrap()
        };
        let mut prev = chain::GENESIS;
        let mut stored = Vec::new();
        for seq in 0..4u64 {
            let mut e = Vec::new();
            prev = chain::encode_into(
                &mut e,
                seq,
                1,
                seq + 1,
                "connection.refused",
                &body(seq + 1),
                &prev,
            );
            stored.push(e);
        }
        {
            let db = sled::open(dir.path().join("records.sled")).unwrap();
            let events = db.open_tree("events").unwrap();
            for (seq, e) in stored.iter().enumerate().take(3) {
                events
                    .insert((seq as u64).to_be_bytes(), e.as_slice())
                    .unwrap();
            }
            db.open_tree("connections").unwrap();
            db.flush().unwrap();
            let wal = dir.path().join("records.wal");
            std::fs::create_dir_all(&wal).unwrap();
            // The WAL repeats event 2 (already in sled) and adds 3.
            let mut w = Vec::new();
            for e in &stored[2..] {
                w.extend_from_slice(&(e.len() as u32).to_le_bytes());
                w.extend_from_slice(e);
            }
            std::fs::write(wal.join("seg-0000000000000007.wal"), w).unwrap();
        }
        let s = RecordStore::open(dir.path()).unwrap();
        assert_eq!(s.verify(None).unwrap(), Ok(4));
        assert_eq!(s.list(&Filter::default()).unwrap().len(), 4);
        assert_eq!(s.get(4).unwrap().target.as_deref(), Some("old"));
        assert!(!dir.path().join("records.wal").exists());
        let r = rec(&s, "new");
        s.put(&r, "connection.open").unwrap();
        assert_eq!(r.id, 5, "ids continue after the migrated ones");
        assert_eq!(s.verify(None).unwrap(), Ok(5));
    }

    #[test]
    fn after_a_break_in_the_log_new_records_are_still_kept_and_found() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RecordStore::open(dir.path()).unwrap();
            for _ in 0..3 {
                let mut r = rec(&s, "a");
                r.outcome = Outcome::Closed;
                s.put(&r, "connection.closed").unwrap();
            }
        }
        // Event 1 cut out of the log by someone with the disk.
        let f = frames(dir.path());
        let (path, off, len) = f[1].clone();
        let orig = std::fs::read(&path).unwrap();
        let mut cut = orig[..off as usize].to_vec();
        cut.extend_from_slice(&orig[(off + len) as usize..]);
        std::fs::write(&path, &cut).unwrap();
        let id = {
            let s = RecordStore::open(dir.path()).unwrap();
            let mut r = rec(&s, "after");
            r.outcome = Outcome::Closed;
            s.put(&r, "connection.closed").unwrap();
            assert!(s.verify(None).unwrap().unwrap_err().contains("event 1"));
            assert_eq!(r.id, 4, "ids past the break are not reused");
            r.id
        };
        // Kept in a fresh segment, and indexed again at the next start.
        let s = RecordStore::open(dir.path()).unwrap();
        assert_eq!(s.get(id).unwrap().target.as_deref(), Some("after"));
        assert_eq!(
            log::segments(&dir.path().join("records.log"), "log")
                .unwrap()
                .len(),
            2
        );
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
