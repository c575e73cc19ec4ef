//! Start-up: the index brought up to the end of the log, the chain head
//! found, torn tails cut, and stores from before the record log migrated.
use super::*;

/// Brings the index up to the end of the log and finds the chain head.
/// Indexing resumes where the meta says it stood; when the log ends
/// before that (its tail was cut) or the meta is missing, the index is
/// rebuilt from the start. A partial frame at the very end (a write cut by
/// a crash) is cut off; any other break leaves the log as it is (it is
/// evidence: `verify` names it) and new events go to a fresh segment.
/// Returns the head and the writer.
pub(super) fn recover(
    ix: &mut index::Index,
    meta: Option<index::Meta>,
    dir: &Path,
) -> Result<((u64, chain::Hash), log::LogWriter, u64), RecordError> {
    let segments = log::segments(dir, "log")?;
    let first_segment = segments.first().map(|(n, _)| *n).unwrap_or(0);
    let size = |n: u64| -> Option<u64> {
        std::fs::metadata(log::segment_path(dir, n, "log"))
            .ok()
            .map(|m| m.len())
    };
    let usable = meta.filter(|m| {
        let end = m.end();
        let reaches = size(end.segment).is_some_and(|len| len >= end.offset)
            || (end.offset == 0 && segments.is_empty());
        if !reaches {
            tracing::error!(
                segment = end.segment,
                offset = end.offset,
                "the record log ends before what was indexed (its tail was cut); rebuilding the index"
            );
        }
        reaches && m.hash().is_some()
    });
    match usable {
        Some(m) => ix.meta = m,
        None => {
            if !segments.is_empty() {
                tracing::warn!("indexing the record log from its start");
            }
            ix.reset(first_segment)?;
        }
    }
    let start = ix.meta.end();
    let mut next = ix.meta.next;
    let mut hash = ix.meta.hash().unwrap_or(chain::GENESIS);
    let mut end = start;
    let mut broken = false;
    let mut replayed = 0u64;
    let mut err = None;
    for (n, path) in segments.iter().filter(|(n, _)| *n >= start.segment) {
        let offset = if *n == start.segment { start.offset } else { 0 };
        let mut stop = false;
        let (seg_end, torn) = log::scan(
            path,
            *n,
            offset,
            |loc, payload| match chain::Link::decode(payload) {
                Ok(l) if l.seq == next && l.prev == hash && l.hash_ok() => {
                    let after = Loc {
                        segment: loc.segment,
                        offset: loc.offset + 4 + payload.len() as u64,
                    };
                    let view = View::of(l.connection, &l.kind, &l.body);
                    if let Err(e) = ix.add(l.seq, &l.hash, l.connection, view, loc, after) {
                        err = Some(e);
                        return false;
                    }
                    next += 1;
                    hash = l.hash;
                    replayed += 1;
                    true
                }
                _ => {
                    tracing::error!(segment = n, offset = loc.offset, seq = next, "record log event does not continue the chain; indexing stops here (verify will name it)");
                    stop = true;
                    false
                }
            },
        )?;
        if let Some(e) = err {
            return Err(e.into());
        }
        end = Loc {
            segment: *n,
            offset: seg_end,
        };
        let last = segments.last().map(|(l, _)| *l) == Some(*n);
        if stop || (torn && !last) {
            broken = true;
            break;
        }
        if torn {
            tracing::warn!(
                segment = n,
                at = seg_end,
                "record log ends in a partial frame (a write cut by a crash); cut off"
            );
        }
    }
    // Session ids must not be reused, not even those of events past a
    // break (they are no longer indexed, but still evidence).
    let mut max_id = ix.max_id()?;
    let writer = if broken {
        for (n, path) in &segments {
            log::scan(path, *n, 0, |_, payload| {
                if let Ok(l) = chain::Link::decode(payload) {
                    max_id = max_id.max(l.connection);
                }
                true
            })?;
        }
        // Indexing continues in the fresh segment (the chain continues
        // from the last good event), at this start and the next.
        let n = segments.last().map(|(n, _)| n + 1).unwrap_or(0);
        ix.meta.end = (n, 0);
        log::LogWriter::open(dir, n, 0)?
    } else {
        log::LogWriter::open(dir, end.segment, end.offset)?
    };
    ix.persist()?;
    if replayed > 0 {
        tracing::info!(events = replayed, "indexed events from the record log");
    }
    Ok(((next, hash), writer, max_id))
}

/// Stores from before the record log kept every event and record in sled
/// (and unflushed events in `records.wal`). Their events are copied, in
/// chain order and byte for byte, into a new log (written aside, then
/// renamed into place), and the old trees dropped.
pub(super) fn migrate_legacy(db: &sled::Db, dir: &Path, log_dir: &Path) -> Result<(), RecordError> {
    let wal_dir = dir.join("records.wal");
    let has_tree = db.tree_names().iter().any(|n| n.as_ref() == b"events");
    if !has_tree && !wal_dir.exists() {
        return Ok(());
    }
    if !log_dir.exists() {
        let tmp = dir.join("records.log.new");
        let _ = std::fs::remove_dir_all(&tmp);
        struct Copier {
            w: log::LogWriter,
            next: u64,
            hash: chain::Hash,
        }
        impl Copier {
            /// Appends a stored event if it continues the chain.
            fn copy(&mut self, stored: &[u8], l: &chain::Link) -> Result<bool, RecordError> {
                if l.seq != self.next || l.prev != self.hash {
                    return Ok(false);
                }
                let mut frame = Vec::with_capacity(4 + stored.len());
                frame.extend_from_slice(&[0; 4]);
                frame.extend_from_slice(stored);
                self.w.append(&mut frame)?;
                self.next += 1;
                self.hash = l.hash;
                Ok(true)
            }
        }
        let mut c = Copier {
            w: log::LogWriter::open(&tmp, 0, 0)?,
            next: 0,
            hash: chain::GENESIS,
        };
        let events = db.open_tree("events")?;
        for item in events.iter() {
            let (_, v) = item?;
            match chain::Link::decode(&v) {
                Ok(l) if c.copy(&v, &l)? => {}
                _ => break,
            }
        }
        for (n, path) in log::segments(&wal_dir, "wal")? {
            let mut err = None;
            log::scan(&path, n, 0, |_, payload| {
                match chain::Link::decode(payload) {
                    Ok(l) if l.seq < c.next => true,
                    Ok(l) => c.copy(payload, &l).unwrap_or_else(|e| {
                        err = Some(e);
                        false
                    }),
                    Err(_) => false,
                }
            })?;
            if let Some(e) = err {
                return Err(e);
            }
        }
        for f in c.w.take_unsynced()? {
            f.file.sync_all()?;
        }
        let next = c.next;
        std::fs::rename(&tmp, log_dir)?;
        tracing::info!(events = next, "records moved from sled into the record log");
    }
    for t in ["events", "connections", "exchanges", "open"] {
        db.drop_tree(t)?;
    }
    db.flush()?;
    if wal_dir.exists() {
        std::fs::remove_dir_all(&wal_dir)?;
    }
    Ok(())
}
