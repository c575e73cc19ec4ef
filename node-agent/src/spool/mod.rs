//! The evidence spool: every chain event, once it is fsync'd in the record
//! log, is written as one JSON line (`line.rs`: the event with its hashes,
//! its exact stored body, and OCSF class fields) to bounded, rotating
//! segment files `spool-<first seq>.jsonl`, fsync'd. It is the source the
//! shipper (`ship.rs`) publishes from, and any log shipper can tail it.
//!
//! Bounded: when its segments would exceed `spool.max_bytes`, either the
//! node refuses new connections until shipping frees space (`fail-closed`,
//! the default: nothing recorded goes unshipped), or the oldest segment is
//! dropped, counted and alarmed (`drop-oldest`). Never blocks the data
//! path: the spool follows the log on its own thread.
pub mod line;
pub mod ship;

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::{
    config::{SpoolSettings, WhenFull},
    record::{LogPos, RecordStore},
};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool: {0}")]
    Record(#[from] crate::record::RecordError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the spool has read the log to (persisted with a rename).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Cursor {
    pos: Option<LogPos>,
    next_seq: u64,
}

/// What status and metrics show of the spool and shipping.
#[derive(Default)]
pub struct SpoolStatus {
    /// Next sequence number to spool / to be acknowledged by the stream.
    pub spooled: AtomicU64,
    pub acked: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped_events: AtomicU64,
    /// Fail-closed spool that cannot take more (full, or writes failing):
    /// new connections are refused until it can.
    pub full: AtomicBool,
    pub connected: AtomicBool,
    /// `at_ms` of the oldest event not yet acknowledged (0: none).
    pub oldest_unacked_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl SpoolStatus {
    pub fn describe(&self) -> String {
        let pending = self
            .spooled
            .load(Ordering::Relaxed)
            .saturating_sub(self.acked.load(Ordering::Relaxed));
        let mut s = format!(
            "{} event(s) spooled not yet acknowledged, {} bytes on disk",
            pending,
            self.bytes.load(Ordering::Relaxed)
        );
        if self.full.load(Ordering::Relaxed) {
            s.push_str(", FULL");
        }
        let dropped = self.dropped_events.load(Ordering::Relaxed);
        if dropped > 0 {
            s.push_str(&format!(
                ", {dropped} event(s) DROPPED (spool.when_full: drop-oldest)"
            ));
        }
        if let Some(e) = &*self.last_error.lock().unwrap_or_else(|e| e.into_inner()) {
            s.push_str(&format!(", last error: {e}"));
        }
        s
    }
}

pub struct Spool {
    pub dir: PathBuf,
    settings: SpoolSettings,
    pub status: Arc<SpoolStatus>,
    pub node: String,
}

/// A segment: first sequence number and path, in order.
pub fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("spool-")
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse().ok())
        {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("spool-{first:020}.jsonl"))
}

/// Replaces `path` with `bytes` (write, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_data().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl Spool {
    pub fn open(
        dir: PathBuf,
        settings: SpoolSettings,
        node: String,
    ) -> Result<Arc<Self>, SpoolError> {
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let s = Arc::new(Self {
            dir,
            settings,
            status: Default::default(),
            node,
        });
        s.status.acked.store(s.acked(), Ordering::Relaxed);
        // What is spooled already (lines past the cursor included: a crash
        // between a segment's fsync and the cursor's rename).
        let spooled = s
            .cursor()
            .next_seq
            .max(s.last_spooled().map_or(0, |l| l + 1));
        s.status.spooled.store(spooled, Ordering::Relaxed);
        s.status.bytes.store(s.disk_bytes(), Ordering::Relaxed);
        Ok(s)
    }

    /// Next sequence number not yet acknowledged by the stream.
    pub fn acked(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("acked"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn set_acked(&self, next: u64) -> Result<(), SpoolError> {
        write_atomic(&self.dir.join("acked"), format!("{next}\n").as_bytes())?;
        self.status.acked.store(next, Ordering::Relaxed);
        Ok(())
    }

    fn disk_bytes(&self) -> u64 {
        segments(&self.dir)
            .unwrap_or_default()
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    fn cursor(&self) -> Cursor {
        std::fs::read(self.dir.join("cursor.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Segments entirely acknowledged (all but the newest) are removed.
    pub fn release(&self) {
        let acked = self.status.acked.load(Ordering::Relaxed);
        let segs = segments(&self.dir).unwrap_or_default();
        for w in segs.windows(2) {
            // Everything in w[0] is below the next segment's first seq.
            if w[1].0 <= acked {
                let _ = std::fs::remove_file(&w[0].1);
            }
        }
        self.status
            .bytes
            .store(self.disk_bytes(), Ordering::Relaxed);
        if self.status.full.load(Ordering::Relaxed) && self.disk_bytes() < self.settings.max_bytes {
            self.status.full.store(false, Ordering::Relaxed);
        }
    }

    /// Follows the record log on its own thread until the process ends.
    pub fn spawn(self: &Arc<Self>, store: Arc<RecordStore>) -> std::io::Result<()> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("sluice-spool".into())
            .spawn(move || {
                store.follow();
                let mut cur = this.cursor();
                // Lines already spooled past the cursor (a crash between
                // the segment's fsync and the cursor's rename) are skipped.
                let last = this.last_spooled();
                loop {
                    match this.step(&store, &mut cur, last) {
                        Ok(true) => {}
                        Ok(false) => std::thread::sleep(Duration::from_millis(100)),
                        Err(e) => {
                            error!(error = %e, "spool write failed");
                            *this
                                .status
                                .last_error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                            // Fail closed: what cannot be spooled stops new
                            // connections (`Proxy` checks `full`).
                            if this.settings.when_full == WhenFull::FailClosed {
                                this.status.full.store(true, Ordering::Relaxed);
                            }
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    }
                }
            })?;
        Ok(())
    }

    fn last_spooled(&self) -> Option<u64> {
        let (_, path) = segments(&self.dir).ok()?.pop()?;
        let text = std::fs::read_to_string(path).ok()?;
        text.lines()
            .rev()
            .find_map(|l| serde_json::from_str::<line::Head>(l).ok())
            .map(|h| h.seq)
    }

    /// Spools what became durable; `Ok(false)` when there was nothing.
    fn step(
        &self,
        store: &RecordStore,
        cur: &mut Cursor,
        last: Option<u64>,
    ) -> Result<bool, SpoolError> {
        let durable = store.durable_seq();
        if cur.next_seq >= durable {
            return Ok(false);
        }
        if self.status.full.load(Ordering::Relaxed) {
            self.release();
            if self.status.full.load(Ordering::Relaxed) {
                return Ok(false);
            }
        }
        let (events, next) = store.read_events(cur.pos, durable, 2048)?;
        if events.is_empty() {
            return Ok(false);
        }
        let mut batch = Vec::new();
        // Where each line starts, with its event's sequence number.
        let mut starts: Vec<(u64, usize)> = Vec::new();
        for ev in &events {
            if last.is_some_and(|l| ev.seq <= l) {
                continue;
            }
            starts.push((ev.seq, batch.len()));
            batch.extend_from_slice(&line::encode(ev, &self.node));
            batch.push(b'\n');
        }
        let last_seq = events.last().map_or(cur.next_seq, |e| e.seq + 1);
        let oldest_ms = events.first().map_or(0, |e| e.at_ms);
        match self.settings.when_full {
            // All or nothing: a batch that does not fit is not written at
            // all (and retried whole once there is room).
            WhenFull::FailClosed => {
                if let Some((first, _)) = starts.first() {
                    self.write(*first, &batch, oldest_ms)?;
                }
            }
            // A segment's worth at a time, so a burst cannot take the
            // spool past its bound: room is made before each.
            WhenFull::DropOldest => {
                for (first, range) in groups(&starts, batch.len(), self.settings.segment_bytes) {
                    self.write(first, &batch[range], oldest_ms)?;
                }
            }
        }
        self.status.full.store(false, Ordering::Relaxed);
        if let Some(to) = next {
            store.release_read(cur.pos, to);
        }
        cur.pos = next;
        cur.next_seq = last_seq;
        let c = serde_json::to_vec(cur).unwrap_or_default();
        write_atomic(&self.dir.join("cursor.json"), &c)?;
        self.status.spooled.store(last_seq, Ordering::Relaxed);
        Ok(true)
    }

    fn write(&self, first: u64, batch: &[u8], oldest_ms: u64) -> Result<(), SpoolError> {
        // `segs` is re-read per call: a group may have started a segment.
        let mut segs = segments(&self.dir).map_err(io(&self.dir))?;
        let mut total = self.disk_bytes();
        while total + batch.len() as u64 > self.settings.max_bytes {
            match self.settings.when_full {
                WhenFull::FailClosed => {
                    self.status.full.store(true, Ordering::Relaxed);
                    return Err(SpoolError::Io {
                        path: self.dir.clone(),
                        source: std::io::Error::other("spool full (spool.max_bytes)"),
                    });
                }
                WhenFull::DropOldest => {
                    if segs.is_empty() {
                        break;
                    }
                    let (n, path) = segs.remove(0);
                    // Up to the next segment, or to this batch if it was
                    // the last one.
                    let next = segs.first().map_or(first, |s| s.0);
                    let dropped = next.saturating_sub(n);
                    warn!(segment = %path.display(), events = dropped, "SPOOL FULL: oldest segment dropped (spool.when_full: drop-oldest)");
                    let _ = std::fs::remove_file(&path);
                    self.status
                        .dropped_events
                        .fetch_add(dropped, Ordering::Relaxed);
                    // What was dropped will not be shipped: move past it.
                    let acked = self.status.acked.load(Ordering::Relaxed).max(next);
                    self.set_acked(acked)?;
                    total = self.disk_bytes();
                }
            }
        }
        let path = match segs.last() {
            Some((_, p))
                if std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
                    < self.settings.segment_bytes =>
            {
                p.clone()
            }
            _ => seg_path(&self.dir, first),
        };
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        f.write_all(batch).map_err(io(&path))?;
        f.sync_data().map_err(io(&path))?;
        if self.status.oldest_unacked_ms.load(Ordering::Relaxed) == 0 {
            self.status
                .oldest_unacked_ms
                .store(oldest_ms, Ordering::Relaxed);
        }
        self.status
            .bytes
            .store(total + batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Consecutive lines (`starts`: sequence number and offset of each, the
/// batch `len` bytes long) in groups of at most `max` bytes (at least one
/// line each), as (first sequence number, byte range).
fn groups(starts: &[(u64, usize)], len: usize, max: u64) -> Vec<(u64, std::ops::Range<usize>)> {
    let max = usize::try_from(max).unwrap_or(usize::MAX).max(1);
    let mut out: Vec<(u64, std::ops::Range<usize>)> = Vec::new();
    for (i, (seq, at)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(len, |(_, next)| *next);
        match out.last_mut() {
            Some((_, r)) if end - r.start <= max => r.end = end,
            _ => out.push((*seq, *at..end)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::groups;

    #[test]
    fn lines_are_grouped_up_to_a_segment() {
        // Lines of 10, 10, 30 and 5 bytes, at most 25 per group.
        let starts = [(7, 0), (8, 10), (9, 20), (10, 50)];
        assert_eq!(
            groups(&starts, 55, 25),
            vec![(7, 0..20), (9, 20..50), (10, 50..55)]
        );
        assert_eq!(groups(&starts, 55, 1000), vec![(7, 0..55)]);
        assert!(groups(&[], 0, 10).is_empty());
    }
}
