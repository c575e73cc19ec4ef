//! The group-commit thread: the only caller of sled's flush (sled 0.34's
//! concurrent `flush_async` calls can deadlock, spacejam/sled#1308).
//!
//! Every `fsync_interval` (if the chain grew), or at once when a caller
//! waits for durability (all callers queued meanwhile share one flush):
//! sign a checkpoint if one is due, index the queued events, fsync the
//! record log, write and fsync the index, then flush sled (checkpoints).
use std::{
    sync::{
        mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender},
        Arc,
    },
    thread::JoinHandle,
    time::Instant,
};

use super::{now_ms, RecordError, Shared};

/// At most this many callers wait for one flush; more block briefly.
const QUEUE: usize = 1024;

struct Req {
    checkpoint: bool,
    done: SyncSender<Result<(), String>>,
}

pub(super) struct Handle {
    tx: Option<SyncSender<Req>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Handle {
    /// Closing the queue makes the thread checkpoint, flush and exit.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(super) struct Waiter(std::sync::mpsc::Receiver<Result<(), String>>);

impl Waiter {
    pub fn wait(self) -> Result<(), RecordError> {
        self.0
            .recv()
            .map_err(|_| RecordError::Flush("group-commit thread is gone".into()))?
            .map_err(RecordError::Flush)
    }
}

impl Handle {
    pub fn request(&self, checkpoint: bool) -> Result<Waiter, RecordError> {
        let (done, rx) = sync_channel(1);
        self.tx
            .as_ref()
            .ok_or_else(|| RecordError::Flush("store is closing".into()))?
            .send(Req { checkpoint, done })
            .map_err(|_| RecordError::Flush("group-commit thread is gone".into()))?;
        Ok(Waiter(rx))
    }
}

pub(super) fn spawn(s: Arc<Shared>) -> Result<Handle, RecordError> {
    let (tx, rx) = sync_channel(QUEUE);
    let mut state = State::new(&s)?;
    let thread = std::thread::Builder::new()
        .name("sluice-commit".into())
        .spawn(move || run(&s, &mut state, rx))?;
    Ok(Handle {
        tx: Some(tx),
        thread: Some(thread),
    })
}

struct State {
    /// Head (next seq) at the last completed flush.
    flushed: u64,
    /// Head (next seq) covered by the last checkpoint.
    checkpointed: u64,
    checkpointed_at: Instant,
    next_n: u64,
}

impl State {
    fn new(s: &Shared) -> Result<Self, RecordError> {
        let (next, _) = s.head();
        let last = s.latest_checkpoint()?;
        Ok(Self {
            flushed: next,
            checkpointed: last.as_ref().map(|c| c.seq + 1).unwrap_or(0),
            checkpointed_at: Instant::now(),
            next_n: last.map(|c| c.n + 1).unwrap_or(0),
        })
    }
}

fn run(s: &Shared, st: &mut State, rx: Receiver<Req>) {
    let interval = s.durability.fsync_interval;
    let mut last_tick = Instant::now();
    loop {
        let mut waiters = Vec::new();
        let mut closing = false;
        match rx.recv_timeout(interval.saturating_sub(last_tick.elapsed())) {
            Ok(r) => {
                waiters.push(r);
                waiters.extend(rx.try_iter());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => closing = true,
        }
        if waiters.is_empty() && !closing && last_tick.elapsed() < interval {
            continue;
        }
        let force = closing || waiters.iter().any(|w| w.checkpoint);
        let res = commit(s, st, force).map_err(|e| e.to_string());
        if let Err(e) = &res {
            tracing::error!(error = %e, "record group commit failed");
        }
        last_tick = Instant::now();
        for w in waiters {
            let _ = w.done.send(res.clone());
        }
        if closing {
            return;
        }
    }
}

/// Free space below which sled is not written: far more than a flush of
/// checkpoints and node state takes.
const SLED_HEADROOM_BYTES: u64 = 256 << 10;

fn headroom(dir: &std::path::Path) -> Result<(), RecordError> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    if free < SLED_HEADROOM_BYTES {
        return Err(RecordError::Io(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!(
                "No space left on device: {free} bytes free, {} kept for node state",
                SLED_HEADROOM_BYTES
            ),
        )));
    }
    Ok(())
}

fn commit(s: &Shared, st: &mut State, force_checkpoint: bool) -> Result<(), RecordError> {
    let (next, hash) = s.head();
    let d = &s.durability;
    let grown = next > st.checkpointed;
    let due = force_checkpoint
        || next - st.checkpointed.min(next) >= d.checkpoint_every_events
        || st.checkpointed_at.elapsed() >= d.checkpoint_interval;
    // sled's IO errors are sticky until it is reopened (0.34: a global
    // error every later call returns), so a disk that filled up would
    // need a restart to record again. sled is written only with room to
    // spare; short of it the commit fails (recording is failing, new
    // connections are refused) and recovers by itself once space is back.
    let room = headroom(&s.log_dir);
    let want = grown && due;
    if want && room.is_ok() {
        let cp = s.key.sign(st.next_n, next - 1, &hash, now_ms());
        let bytes = serde_json::to_vec(&cp).map_err(RecordError::Encode)?;
        s.checkpoints.insert(cp.n.to_be_bytes(), bytes)?;
        // Also in the node's log: a copy outside the store.
        tracing::info!(n = cp.n, seq = cp.seq, head = %cp.head, sig = %cp.sig, "records checkpoint signed");
        st.next_n += 1;
        st.checkpointed = next;
        st.checkpointed_at = Instant::now();
    }
    if next == st.flushed && !want {
        return Ok(());
    }
    // The queue is indexed and the files to sync are taken in one step,
    // under the index lock (readers wait for the commit, appends do not);
    // the log is synced before the index is written, so the index on disk
    // never points past the log on disk.
    {
        let mut ix = s.index.lock().unwrap_or_else(|e| e.into_inner());
        let (files, batch, durable) = {
            let mut h = s.head.lock().unwrap_or_else(|e| e.into_inner());
            (
                h.log.take_unsynced()?,
                std::mem::take(&mut h.pending),
                h.seq,
            )
        };
        s.apply(&mut ix, batch)?;
        let followed = s.followed.load(std::sync::atomic::Ordering::Relaxed);
        for f in files {
            if followed {
                f.file.sync_data()?;
            } else {
                f.sync_and_release()?;
            }
        }
        s.durable
            .store(durable, std::sync::atomic::Ordering::Release);
        ix.persist()?;
    }
    room?;
    // Checkpoints (and node state) in sled.
    s.db.flush()?;
    st.flushed = next;
    Ok(())
}
