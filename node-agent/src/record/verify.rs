//! `verify`: walk the chain in the record log, check it against the
//! signed checkpoints, then check that the index points at each record's
//! latest event. And the proof an export carries (`evidence`).
use std::collections::{BTreeMap, HashMap};

use super::{
    chain::{self, Link},
    key_u64, log, Checkpoint, Evidence, Loc, ProofLink, RecordError, Shared, View,
};

type Verdict = Result<u64, String>;

pub(super) fn verify(s: &Shared, session: Option<u64>) -> Result<Verdict, RecordError> {
    let mut prev = chain::GENESIS;
    let mut expected = 0u64;
    // Latest chained connection event and latest event, per session.
    let mut last_conn: HashMap<u64, Loc> = Default::default();
    let mut last_event: HashMap<u64, Loc> = Default::default();
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
    let mut verdict: Option<String> = None;
    let segments = log::segments(&s.log_dir, "log")?;
    let last_segment = segments.last().map(|(n, _)| *n);
    for (n, path) in &segments {
        let (_, torn) = log::scan(path, *n, 0, |loc, payload| {
            let l = match Link::decode(payload) {
                Ok(l) => l,
                Err(e) => {
                    verdict = Some(format!(
                        "event {expected} does not parse (segment {n} offset {}): {e}",
                        loc.offset
                    ));
                    return false;
                }
            };
            let seq = l.seq;
            if seq != expected {
                verdict = Some(if seq > expected {
                    format!("event {expected} is missing (next present is {seq})")
                } else {
                    format!(
                        "event {seq} appears again after event {}",
                        expected.wrapping_sub(1)
                    )
                });
                return false;
            }
            if l.prev != prev {
                verdict = Some(format!(
                    "event {seq} does not follow event {}",
                    seq.wrapping_sub(1)
                ));
                return false;
            }
            if !l.hash_ok() {
                verdict = Some(format!(
                    "event {seq} (session {}) was altered (hash mismatch)",
                    l.connection
                ));
                return false;
            }
            // The node's own note that it found the chain cut (appended
            // at the cut, so possibly at a checkpointed seq): known before
            // that checkpoint is compared.
            if l.connection == 0 && l.kind == "records.truncated" {
                let b: serde_json::Value = serde_json::from_slice(&l.body).unwrap_or_default();
                found_end = b["chain_next_seq"].as_u64();
            }
            if let Some(cps) = by_seq.remove(&seq) {
                for cp in cps {
                    if cp.head_hash() != Some(l.hash) {
                        // Named against the latest checkpoint: it proves
                        // the most (every later one lies past the cut too).
                        let latest = by_seq
                            .values()
                            .next_back()
                            .and_then(|v| v.first())
                            .unwrap_or(&cp);
                        verdict = Some(truncated(latest, found_end, None));
                        return false;
                    }
                }
            }
            if l.connection != 0 {
                last_event.insert(l.connection, loc);
                if let View::Connection { .. } = View::of(l.connection, &l.kind, &l.body) {
                    last_conn.insert(l.connection, loc);
                }
            }
            prev = l.hash;
            expected += 1;
            true
        })?;
        if let Some(v) = verdict {
            return Ok(Err(v));
        }
        if torn && Some(*n) != last_segment {
            return Ok(Err(format!(
                "record log segment {n} ends in a partial frame before event {expected} (later segments follow)"
            )));
        }
    }
    // Checkpoints past the end of the chain: its tail was cut.
    if let Some((_, cps)) = by_seq.iter().next_back() {
        return Ok(Err(truncated(&cps[0], found_end, Some(expected))));
    }
    // The index: each session's slot points at its latest connection
    // event and its latest event, and every chained session has one.
    let ix = s.index.lock().unwrap_or_else(|e| e.into_inner());
    let ids: Vec<u64> = match session {
        Some(id) => vec![id],
        None => {
            let mut ids: Vec<u64> = last_event.keys().copied().collect();
            ids.sort_unstable();
            let max = ix.max_id()?;
            ids.extend((1..=max).filter(|id| !last_event.contains_key(id)));
            ids
        }
    };
    for id in ids {
        let slot = ix.get(id)?;
        match (slot, last_event.get(&id)) {
            (None, None) => {}
            (None, Some(_)) => {
                return Ok(Err(format!("session {id}: missing from the index")));
            }
            (Some(slot), chained) => {
                if slot.last.as_ref() != chained || slot.conn.as_ref() != last_conn.get(&id) {
                    return Ok(Err(format!(
                        "session {id}: the index does not point at its latest chained events"
                    )));
                }
            }
        }
    }
    drop(ix);
    if let Some(id) = session {
        if !last_event.contains_key(&id) {
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
        super::rfc3339(cp.at_ms),
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
    // First pass: where the session's events are.
    let mut first: Option<(u64, chain::Hash)> = None;
    let mut last = 0u64;
    s.each_event(|_, l| {
        if l.connection == session {
            first.get_or_insert((l.seq, l.prev));
            last = l.seq;
        }
        true
    })?;
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
    s.each_event(|_, l| {
        if l.seq < from {
            return true;
        }
        if l.seq > to {
            return false;
        }
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
        true
    })?;
    Ok(Evidence {
        node_key: s.key.public(),
        checkpoint,
        prev: hex::encode(prev),
        links,
    })
}
