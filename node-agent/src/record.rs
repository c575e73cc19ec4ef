//! Connection records in sled. Every change is also appended to an event
//! log in which each event commits to the hash of the one before it, so
//! that an altered or deleted event is detectable (`verify`).
use std::{
    path::Path,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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

/// One HTTP request and its response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    pub session: u64,
    pub seq: u32,
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

/// One link of the hash chain.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: u64,
    pub connection: u64,
    pub kind: String,
    pub body: serde_json::Value,
    /// Hex SHA-256 of the previous event (zeros for the first).
    pub prev: String,
    /// Hex SHA-256 over `prev` and this event's other fields.
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

pub struct RecordStore {
    db: sled::Db,
    connections: sled::Tree,
    exchanges: sled::Tree,
    events: sled::Tree,
    /// Serialises appends so that each event sees the true previous hash.
    head: Mutex<(u64, String)>,
    next_id: std::sync::atomic::AtomicU64,
    flusher: Option<FlushTx>,
    flusher_thread: Option<std::thread::JoinHandle<()>>,
}

type FlushTx = std::sync::mpsc::Sender<std::sync::mpsc::Sender<Result<(), String>>>;

impl Drop for RecordStore {
    /// Stops the flusher (it holds the database) so the store is really
    /// closed when dropped; it flushes once more on the way out.
    fn drop(&mut self) {
        drop(self.flusher.take());
        if let Some(t) = self.flusher_thread.take() {
            let _ = t.join();
        }
    }
}

/// One thread does every flush, batching all waiters that queued up while
/// the previous flush ran (group commit). sled 0.34's concurrent
/// `flush_async` calls can deadlock (spacejam/sled#1308); this never calls
/// it, and never runs two flushes at once.
fn spawn_flusher(db: sled::Db) -> (FlushTx, Option<std::thread::JoinHandle<()>>) {
    let (tx, rx) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<Result<(), String>>>();
    let spawned = std::thread::Builder::new()
        .name("sluice-flush".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut waiters = vec![first];
                waiters.extend(rx.try_iter());
                let res = db.flush().map(|_| ()).map_err(|e| e.to_string());
                for w in waiters {
                    let _ = w.send(res.clone());
                }
            }
            let _ = db.flush();
        });
    match spawned {
        Ok(handle) => (tx, Some(handle)),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the record flusher; flushes will report errors");
            (tx, None)
        }
    }
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn event_hash(prev: &str, seq: u64, at_ms: u64, connection: u64, kind: &str, body: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        prev.as_bytes(),
        &seq.to_be_bytes(),
        &at_ms.to_be_bytes(),
        &connection.to_be_bytes(),
        kind.as_bytes(),
        body.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    hex::encode(h.finalize())
}

impl RecordStore {
    pub fn open(dir: &Path) -> Result<Self, RecordError> {
        let db = sled::Config::new()
            .path(dir.join("records.sled"))
            .flush_every_ms(Some(200))
            .open()?;
        let connections = db.open_tree("connections")?;
        let exchanges = db.open_tree("exchanges")?;
        let events = db.open_tree("events")?;
        let head = match events.last()? {
            Some((k, v)) => {
                let ev: Event =
                    serde_json::from_slice(&v).map_err(|source| RecordError::Corrupt {
                        key: format!("events/{}", key_u64(&k)),
                        source,
                    })?;
                (ev.seq + 1, ev.hash)
            }
            None => (0, GENESIS.to_owned()),
        };
        let last_id = connections.last()?.map(|(k, _)| key_u64(&k)).unwrap_or(0);
        let (flusher, flusher_thread) = spawn_flusher(db.clone());
        let store = Self {
            flusher: Some(flusher),
            flusher_thread,
            db,
            connections,
            exchanges,
            events,
            head: Mutex::new(head),
            next_id: std::sync::atomic::AtomicU64::new(last_id + 1),
        };
        store.mark_interrupted()?;
        Ok(store)
    }

    /// Connections left `open` by a previous run did not end cleanly.
    fn mark_interrupted(&self) -> Result<(), RecordError> {
        let mut open = Vec::new();
        for item in self.connections.iter() {
            let (_, v) = item?;
            if let Ok(r) = serde_json::from_slice::<ConnectionRecord>(&v) {
                if r.outcome == Outcome::Open {
                    open.push(r);
                }
            }
        }
        for mut r in open {
            r.outcome = Outcome::Interrupted;
            self.put(&r, "connection.interrupted")?;
        }
        Ok(())
    }

    /// Session ids count up from 1 and continue after a restart.
    /// A named tree in the same database (node state kept beside records).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, RecordError> {
        Ok(self.db.open_tree(name)?)
    }

    pub fn next_id(&self) -> Result<u64, RecordError> {
        Ok(self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    /// Stores the record's current state and appends it to the chain.
    pub fn put(&self, r: &ConnectionRecord, kind: &str) -> Result<(), RecordError> {
        let body = serde_json::to_string(r).map_err(RecordError::Encode)?;
        self.append(r.id, kind, &body)?;
        self.connections
            .insert(r.id.to_be_bytes(), body.as_bytes())?;
        Ok(())
    }

    /// Appends a node-level event (policy, approvals, suspensions) to the
    /// chain, under session 0.
    pub fn audit(&self, kind: &str, body: &serde_json::Value) -> Result<(), RecordError> {
        let text = serde_json::to_string(body).map_err(RecordError::Encode)?;
        self.append(0, kind, &text)?;
        self.flush_blocking()
    }

    /// Audit events (session 0) of the given kinds, oldest first.
    pub fn audit_events(&self, prefix: &str) -> Result<Vec<Event>, RecordError> {
        let mut out = Vec::new();
        for item in self.events.iter() {
            let (_, v) = item?;
            if let Ok(ev) = serde_json::from_slice::<Event>(&v) {
                if ev.connection == 0 && ev.kind.starts_with(prefix) {
                    out.push(ev);
                }
            }
        }
        Ok(out)
    }

    /// Stores a finished exchange and appends it to the chain.
    pub fn put_exchange(&self, ex: &Exchange) -> Result<(), RecordError> {
        let body = serde_json::to_string(ex).map_err(RecordError::Encode)?;
        self.append(ex.session, "exchange", &body)?;
        self.exchanges
            .insert(exchange_key(ex.session, ex.seq), body.as_bytes())?;
        Ok(())
    }

    /// A session's exchanges, in order.
    pub fn exchanges(&self, session: u64) -> Result<Vec<Exchange>, RecordError> {
        let mut out = Vec::new();
        for item in self.exchanges.scan_prefix(session.to_be_bytes()) {
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

    fn append(&self, connection: u64, kind: &str, body: &str) -> Result<(), RecordError> {
        let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        let (seq, prev) = (head.0, head.1.clone());
        let at_ms = now_ms();
        // Hash the canonical form (sorted keys) that `verify` recomputes.
        let body: serde_json::Value = serde_json::from_str(body).map_err(RecordError::Encode)?;
        let canonical = serde_json::to_string(&body).map_err(RecordError::Encode)?;
        let hash = event_hash(&prev, seq, at_ms, connection, kind, &canonical);
        let ev = Event {
            seq,
            at_ms,
            connection,
            kind: kind.to_owned(),
            body,
            prev,
            hash: hash.clone(),
        };
        let bytes = serde_json::to_vec(&ev).map_err(RecordError::Encode)?;
        self.events.insert(seq.to_be_bytes(), bytes)?;
        *head = (seq + 1, hash);
        Ok(())
    }

    /// Queues a flush; the receiver gets its result.
    fn request_flush(&self) -> Result<std::sync::mpsc::Receiver<Result<(), String>>, RecordError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.flusher
            .as_ref()
            .ok_or_else(|| RecordError::Flush("store is closing".into()))?
            .send(tx)
            .map_err(|_| RecordError::Flush("flusher thread is gone".into()))?;
        Ok(rx)
    }

    fn flush_result(
        r: Result<Result<(), String>, std::sync::mpsc::RecvError>,
    ) -> Result<(), RecordError> {
        r.map_err(|_| RecordError::Flush("flusher thread is gone".into()))?
            .map_err(RecordError::Flush)
    }

    /// Durable once this returns (batched with concurrent callers).
    pub async fn flush(&self) -> Result<(), RecordError> {
        let rx = self.request_flush()?;
        let r = tokio::task::spawn_blocking(move || rx.recv())
            .await
            .map_err(|e| RecordError::Flush(e.to_string()))?;
        Self::flush_result(r)
    }

    /// As `flush`, for synchronous callers (never from a async hot path).
    pub fn flush_blocking(&self) -> Result<(), RecordError> {
        Self::flush_result(self.request_flush()?.recv())
    }

    pub fn get(&self, id: u64) -> Result<ConnectionRecord, RecordError> {
        let v = self
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
        let limit = filter.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        for item in self.connections.iter().rev() {
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
        self.connections.len()
    }

    /// Walks the whole chain, then checks that every stored record (or, with
    /// `session`, that session's records) is exactly what the chain says.
    /// Returns the number of events, or the first broken link.
    pub fn verify(&self, session: Option<u64>) -> Result<Result<u64, String>, RecordError> {
        let mut prev = GENESIS.to_owned();
        let mut expected_seq = 0u64;
        // Latest chained body per connection, and every chained exchange.
        let mut last_conn: std::collections::HashMap<u64, String> = Default::default();
        let mut chained_ex: std::collections::HashMap<Vec<u8>, String> = Default::default();
        for item in self.events.iter() {
            let (k, v) = item?;
            let seq = key_u64(&k);
            if seq != expected_seq {
                return Ok(Err(format!(
                    "event {expected_seq} is missing (next present is {seq})"
                )));
            }
            let ev: Event = match serde_json::from_slice(&v) {
                Ok(ev) => ev,
                Err(e) => return Ok(Err(format!("event {seq} does not parse: {e}"))),
            };
            if ev.prev != prev {
                return Ok(Err(format!(
                    "event {seq} does not follow event {}",
                    seq.wrapping_sub(1)
                )));
            }
            let body = serde_json::to_string(&ev.body).map_err(RecordError::Encode)?;
            let hash = event_hash(&ev.prev, ev.seq, ev.at_ms, ev.connection, &ev.kind, &body);
            if hash != ev.hash || ev.seq != seq {
                return Ok(Err(format!(
                    "event {seq} (session {}) was altered (hash mismatch)",
                    ev.connection
                )));
            }
            if ev.connection == 0 {
                // Node-level audit event: chained, no stored view.
            } else if ev.kind == "exchange" {
                let exseq = ev
                    .body
                    .get("seq")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(u64::MAX) as u32;
                chained_ex.insert(exchange_key(ev.connection, exseq).to_vec(), body);
            } else {
                last_conn.insert(ev.connection, body);
            }
            prev = ev.hash;
            expected_seq += 1;
        }
        let canonical = |v: &[u8]| -> Option<String> {
            serde_json::from_slice::<serde_json::Value>(v)
                .ok()
                .and_then(|v| serde_json::to_string(&v).ok())
        };
        let conns: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = match session
        {
            Some(id) => Box::new(
                self.connections
                    .get(id.to_be_bytes())?
                    .map(|v| Ok((sled::IVec::from(&id.to_be_bytes()[..]), v)))
                    .into_iter(),
            ),
            None => Box::new(self.connections.iter()),
        };
        for item in conns {
            let (k, v) = item?;
            let id = key_u64(&k);
            if last_conn.get(&id) != canonical(&v).as_ref() {
                return Ok(Err(format!(
                    "session {id}: stored record differs from its chained events"
                )));
            }
        }
        let exs: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = match session {
            Some(id) => Box::new(self.exchanges.scan_prefix(id.to_be_bytes())),
            None => Box::new(self.exchanges.iter()),
        };
        let mut stored_ex = 0usize;
        for item in exs {
            let (k, v) = item?;
            stored_ex += 1;
            if chained_ex.get(k.as_ref()) != canonical(&v).as_ref() {
                let (sid, seq) = split_exchange_key(&k);
                return Ok(Err(format!(
                    "session {sid} exchange {seq}: stored record differs from its chained event"
                )));
            }
        }
        let chained_in_scope = chained_ex
            .keys()
            .filter(|k| session.is_none_or(|id| k.starts_with(&id.to_be_bytes())))
            .count();
        if chained_in_scope != stored_ex {
            return Ok(Err(format!(
                "{} exchange record(s) deleted from the store",
                chained_in_scope.saturating_sub(stored_ex)
            )));
        }
        if let Some(id) = session {
            if !last_conn.contains_key(&id) {
                return Ok(Err(format!("session {id} has no events")));
            }
        }
        Ok(Ok(expected_seq))
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
            s.db.flush().unwrap();
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
        let orig = s.events.get(k).unwrap().unwrap();
        let tampered = String::from_utf8(orig.to_vec())
            .unwrap()
            .replace("10.0.0.1", "10.0.0.2");
        s.events.insert(k, tampered.as_bytes()).unwrap();
        let e = s.verify(None).unwrap().unwrap_err();
        assert!(e.contains("event 1"), "{e}");
        s.events.insert(k, orig).unwrap();
        assert_eq!(s.verify(None).unwrap(), Ok(3));
        s.events.remove(k).unwrap();
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
        s.connections
            .insert(r.id.to_be_bytes(), serde_json::to_vec(&forged).unwrap())
            .unwrap();
        let e = s.verify(Some(r.id)).unwrap().unwrap_err();
        assert!(e.contains(&format!("session {}", r.id)), "{e}");
        s.connections
            .insert(r.id.to_be_bytes(), serde_json::to_vec(&r).unwrap())
            .unwrap();
        // An exchange deleted from the view.
        s.exchanges.remove(exchange_key(r.id, 0)).unwrap();
        let e = s.verify(None).unwrap().unwrap_err();
        assert!(e.contains("deleted"), "{e}");
    }
}
