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
    events: sled::Tree,
    /// Serialises appends so that each event sees the true previous hash.
    head: Mutex<(u64, String)>,
    next_id: std::sync::atomic::AtomicU64,
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
        let store = Self {
            db,
            connections,
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

    pub async fn flush(&self) -> Result<(), RecordError> {
        self.db.flush_async().await?;
        Ok(())
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

    /// Walks the whole chain; returns the number of events or the first
    /// broken link.
    pub fn verify(&self) -> Result<Result<u64, String>, RecordError> {
        let mut prev = GENESIS.to_owned();
        let mut expected_seq = 0u64;
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
                return Ok(Err(format!("event {seq} was altered (hash mismatch)")));
            }
            prev = ev.hash;
            expected_seq += 1;
        }
        Ok(Ok(expected_seq))
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

    fn rec(store: &RecordStore, target: &str) -> ConnectionRecord {
        ConnectionRecord {
            id: store.next_id().unwrap(),
            identity: WorkloadIdentity {
                id: "wl-1".into(),
                ..Default::default()
            },
            process: ProcessInfo::default(),
            client: ClientAddr("127.0.0.1:5555".parse().unwrap()),
            original_dst: Some(OrigDstAddr("10.0.0.1:443".parse().unwrap())),
            target: Some(target.into()),
            started_at_ms: now_ms(),
            ended_at_ms: None,
            bytes_up: 0,
            bytes_down: 0,
            outcome: Outcome::Open,
        }
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
        assert_eq!(s.verify().unwrap(), Ok(4));
    }

    #[test]
    fn altered_or_deleted_event_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = RecordStore::open(dir.path()).unwrap();
        for _ in 0..3 {
            let r = rec(&s, "a");
            s.put(&r, "connection.open").unwrap();
        }
        assert_eq!(s.verify().unwrap(), Ok(3));
        let k = 1u64.to_be_bytes();
        let orig = s.events.get(k).unwrap().unwrap();
        let tampered = String::from_utf8(orig.to_vec())
            .unwrap()
            .replace("10.0.0.1", "10.0.0.2");
        s.events.insert(k, tampered.as_bytes()).unwrap();
        let e = s.verify().unwrap().unwrap_err();
        assert!(e.contains("event 1"), "{e}");
        s.events.insert(k, orig).unwrap();
        assert_eq!(s.verify().unwrap(), Ok(3));
        s.events.remove(k).unwrap();
        let e = s.verify().unwrap().unwrap_err();
        assert!(e.contains("event 1 is missing"), "{e}");
    }
}
