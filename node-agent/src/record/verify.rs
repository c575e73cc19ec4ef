//! `verify`: walk the chain, check it against the signed checkpoints, then
//! check the stored views against the chain. And the proof an export
//! carries (`evidence`).
use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

use super::{
    chain::{self, Link},
    key_u64, split_exchange_key, Checkpoint, Evidence, ProofLink, RecordError, Shared, View,
};

/// What a view must hash to: the stored JSON, byte for byte (canonical
/// JSON for events from before the binary format).
fn view_digest(bytes: &[u8], legacy: bool) -> Option<[u8; 32]> {
    if legacy {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        Some(Sha256::digest(serde_json::to_vec(&v).ok()?).into())
    } else {
        Some(Sha256::digest(bytes).into())
    }
}

type Verdict = Result<u64, String>;

pub(super) fn verify(s: &Shared, session: Option<u64>) -> Result<Verdict, RecordError> {
    let mut prev = chain::GENESIS;
    let mut expected = 0u64;
    // Latest chained record per connection / exchange: (legacy, digest).
    let mut last_conn: HashMap<u64, (bool, [u8; 32])> = Default::default();
    let mut chained_ex: HashMap<[u8; 12], (bool, [u8; 32])> = Default::default();
    // Checkpoints by the seq they cover, to compare during the walk.
    let mut by_seq: BTreeMap<u64, Vec<Checkpoint>> = BTreeMap::new();
    let key = s.key.public();
    for item in s.checkpoints.iter() {
        let (k, v) = item?;
        let cp: Checkpoint = match serde_json::from_slice(&v) {
            Ok(cp) => cp,
            Err(e) => {
                return Ok(Err(format!(
                    "checkpoint #{} does not parse: {e}",
                    key_u64(&k)
                )))
            }
        };
        if cp.n != key_u64(&k) {
            return Ok(Err(format!(
                "checkpoint #{} is forged: stored under #{}",
                cp.n,
                key_u64(&k)
            )));
        }
        if let Err(e) = cp.check(&key) {
            return Ok(Err(e));
        }
        by_seq.entry(cp.seq).or_default().push(cp);
    }
    // Where the node found the chain ending at a start, if it was short.
    let mut found_end: Option<u64> = None;
    for item in s.events.iter() {
        let (k, v) = item?;
        let seq = key_u64(&k);
        if seq != expected {
            return Ok(Err(format!(
                "event {expected} is missing (next present is {seq})"
            )));
        }
        let l = match Link::decode(&v) {
            Ok(l) => l,
            Err(e) => return Ok(Err(format!("event {seq} does not parse: {e}"))),
        };
        if l.prev != prev {
            return Ok(Err(format!(
                "event {seq} does not follow event {}",
                seq.wrapping_sub(1)
            )));
        }
        if !l.hash_ok() || l.seq != seq {
            return Ok(Err(format!(
                "event {seq} (session {}) was altered (hash mismatch)",
                l.connection
            )));
        }
        // The node's own note that it found the chain cut (appended at the
        // cut, so possibly at a checkpointed seq): known before that
        // checkpoint is compared.
        if l.connection == 0 && l.kind == "records.truncated" {
            let b: serde_json::Value = serde_json::from_slice(&l.body).unwrap_or_default();
            found_end = b["chain_next_seq"].as_u64();
        }
        if let Some(cps) = by_seq.remove(&seq) {
            for cp in cps {
                if cp.head_hash() != Some(l.hash) {
                    // Named against the latest checkpoint: it proves the
                    // most (every later one lies past the cut too).
                    let latest = by_seq
                        .values()
                        .next_back()
                        .and_then(|v| v.first())
                        .unwrap_or(&cp);
                    return Ok(Err(truncated(latest, found_end, None)));
                }
            }
        }
        let d = view_digest(&l.body, l.legacy).unwrap_or_default();
        match View::of(l.connection, &l.kind, &l.body) {
            View::None => {}
            View::Exchange { seq: exseq, .. } => {
                chained_ex.insert(super::exchange_key(l.connection, exseq), (l.legacy, d));
            }
            View::Connection { .. } => {
                last_conn.insert(l.connection, (l.legacy, d));
            }
        }
        prev = l.hash;
        expected += 1;
    }
    // Checkpoints past the end of the chain: its tail was cut.
    if let Some((_, cps)) = by_seq.iter().next_back() {
        return Ok(Err(truncated(&cps[0], found_end, Some(expected))));
    }
    let conns: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = match session {
        Some(id) => Box::new(
            s.views
                .connections
                .get(id.to_be_bytes())?
                .map(|v| Ok((sled::IVec::from(&id.to_be_bytes()[..]), v)))
                .into_iter(),
        ),
        None => Box::new(s.views.connections.iter()),
    };
    for item in conns {
        let (k, v) = item?;
        let id = key_u64(&k);
        let ok = last_conn
            .get(&id)
            .is_some_and(|(legacy, d)| view_digest(&v, *legacy).as_ref() == Some(d));
        if !ok {
            return Ok(Err(format!(
                "session {id}: stored record differs from its chained events"
            )));
        }
    }
    let exs: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = match session {
        Some(id) => Box::new(s.views.exchanges.scan_prefix(id.to_be_bytes())),
        None => Box::new(s.views.exchanges.iter()),
    };
    let mut stored_ex = 0usize;
    for item in exs {
        let (k, v) = item?;
        stored_ex += 1;
        let key: Option<[u8; 12]> = k.as_ref().try_into().ok();
        let ok = key
            .and_then(|k| chained_ex.get(&k))
            .is_some_and(|(legacy, d)| view_digest(&v, *legacy).as_ref() == Some(d));
        if !ok {
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
    Ok(Ok(expected))
}

/// Names a cut tail against the checkpoint that proves it: how many
/// events were removed when known (the chain's end as the node found it at
/// start, or as it is now), otherwise that the checkpointed event differs.
fn truncated(cp: &Checkpoint, found_end: Option<u64>, chain_end: Option<u64>) -> String {
    let signed = format!(
        "signed checkpoint #{} (at {}) covers events up to {}",
        cp.n,
        crate::export::rfc3339(cp.at_ms),
        cp.seq
    );
    match found_end.or(chain_end) {
        Some(end) if end <= cp.seq => format!(
            "TRUNCATED: {signed}, but {} event {} ({} event(s) removed from the tail)",
            if found_end.is_some() {
                "at start the node found the chain ending before"
            } else {
                "the chain ends before"
            },
            end,
            cp.seq + 1 - end
        ),
        _ => format!(
            "TRUNCATED or rewritten: {signed}, but event {} is not the one it signed",
            cp.seq
        ),
    }
}

pub(super) fn evidence(s: &Shared, session: u64) -> Result<Evidence, RecordError> {
    let corrupt = |seq: u64, e: String| RecordError::Flush(format!("event {seq}: {e}"));
    // First pass: where the session's events are.
    let mut first: Option<(u64, chain::Hash)> = None;
    let mut last = 0u64;
    for item in s.events.iter() {
        let (k, v) = item?;
        let l = Link::decode(&v).map_err(|e| corrupt(key_u64(&k), e))?;
        if l.connection == session {
            first.get_or_insert((l.seq, l.prev));
            last = l.seq;
        }
    }
    let Some((from, prev)) = first else {
        return Err(RecordError::NotFound(session));
    };
    let mut checkpoint = None;
    for item in s.checkpoints.iter() {
        let (_, v) = item?;
        if let Ok(cp) = serde_json::from_slice::<Checkpoint>(&v) {
            if cp.seq >= last {
                checkpoint = Some(cp);
                break;
            }
        }
    }
    let to = checkpoint.as_ref().map(|c| c.seq).unwrap_or(last);
    let mut links = Vec::new();
    for item in s.events.range(from.to_be_bytes()..=to.to_be_bytes()) {
        let (k, v) = item?;
        let l = Link::decode(&v).map_err(|e| corrupt(key_u64(&k), e))?;
        links.push(if l.connection == session && !l.legacy {
            ProofLink {
                seq: l.seq,
                digest: None,
                at_ms: Some(l.at_ms),
                connection: Some(l.connection),
                body: Some(String::from_utf8_lossy(&l.body).into_owned()),
                kind: Some(l.kind),
            }
        } else {
            ProofLink {
                seq: l.seq,
                digest: Some(hex::encode(l.digest())),
                at_ms: None,
                connection: None,
                kind: None,
                body: None,
            }
        });
    }
    Ok(Evidence {
        node_key: s.key.public(),
        checkpoint,
        prev: hex::encode(prev),
        links,
    })
}
