//! The record log: every chain event, in order, in append-only segment
//! files (`records.log/seg-<n>.log`, rotated at `SEGMENT_MAX`). It is the
//! store of record: each event is written here once, with one `write(2)`
//! before the caller goes on (so it survives `kill -9`), and fsync'd by the
//! group-commit thread (against power loss). sled only indexes it (`Loc`s
//! by session and exchange), so the node's memory does not grow with the
//! evidence it keeps.
//!
//! Frames are `[len u32 LE][stored event]` (`chain.rs`); the event's own
//! hash is its checksum, so a torn tail (a write cut short by a crash or
//! power loss) is recognised, and cut off at the next start.
use std::{
    fs::{File, OpenOptions},
    io::{BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// A segment is closed and a new one started beyond this size.
pub const SEGMENT_MAX: u64 = 64 << 20;
/// A frame longer than this is corrupt (no record is that large).
const FRAME_MAX: usize = 256 << 20;

/// Where an event's frame starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Loc {
    pub segment: u64,
    pub offset: u64,
}

pub fn segment_path(dir: &Path, n: u64, ext: &str) -> PathBuf {
    dir.join(format!("seg-{n:016}.{ext}"))
}

/// Existing segments with extension `ext`, oldest first.
pub fn segments(dir: &Path, ext: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let suffix = format!(".{ext}");
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("seg-"))
            .and_then(|n| n.strip_suffix(suffix.as_str()))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((n, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// Reads the frames of one segment from `offset`, calling `f` with each
/// frame's location and payload; `f` returns false to stop. Returns the
/// offset after the last whole frame read, and whether the segment ended
/// in a partial frame there. Whether a payload is a valid event is the
/// caller's question.
pub fn scan(
    path: &Path,
    segment: u64,
    offset: u64,
    mut f: impl FnMut(Loc, &[u8]) -> bool,
) -> std::io::Result<(u64, bool)> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut r = BufReader::with_capacity(256 << 10, file);
    let mut at = offset;
    let mut payload = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match read_full(&mut r, &mut len)? {
            0 => return Ok((at, false)),
            4 => {}
            _ => return Ok((at, true)),
        }
        let n = u32::from_le_bytes(len) as usize;
        if n > FRAME_MAX {
            return Ok((at, true));
        }
        payload.resize(n, 0);
        if read_full(&mut r, &mut payload)? != n {
            return Ok((at, true));
        }
        if !f(
            Loc {
                segment,
                offset: at,
            },
            &payload,
        ) {
            return Ok((at + 4 + n as u64, false));
        }
        at += 4 + n as u64;
    }
}

/// Reads until `buf` is full or the end; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The payload of the frame at `loc`.
pub fn read_at(dir: &Path, loc: Loc) -> std::io::Result<Vec<u8>> {
    let file = File::open(segment_path(dir, loc.segment, "log"))?;
    let mut len = [0u8; 4];
    file.read_exact_at(&mut len, loc.offset)?;
    let n = u32::from_le_bytes(len) as usize;
    if n > FRAME_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame at {}:{} claims {n} bytes", loc.segment, loc.offset),
        ));
    }
    let mut payload = vec![0u8; n];
    file.read_exact_at(&mut payload, loc.offset + 4)?;
    Ok(payload)
}

/// Opens (creating, root only) a store file for reading and writing in
/// place.
pub fn open_rw(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(path)
}

/// The appending end of the log (held under the store's head lock).
pub struct LogWriter {
    dir: PathBuf,
    file: File,
    segment: u64,
    size: u64,
    /// Closed segments not yet fsync'd (the commit thread does it).
    unsynced: Vec<Unsynced>,
    /// Anything written since the last `take_unsynced`.
    dirty: bool,
    /// Bytes of this segment already handed over to leave the page cache.
    released: u64,
}

/// A log file holding writes not yet fsync'd, and the range of it that may
/// leave the page cache once they are.
///
/// Why drop it: the log is written once and read rarely (replay, export,
/// verify read it back from disk), so keeping it cached only pushes the
/// build's own files out of memory on a runner, and every new cached page
/// is memory the kernel has to find and zero on the write path. Pages
/// released after each group commit return to the allocator and serve the
/// next appends. When a follower reads every event back (the spool), it
/// releases what it has read instead (`release_read`): dropped at the
/// fsync, each of its reads would go to disk.
pub struct Unsynced {
    pub file: File,
    /// Page-aligned byte range that is complete: no later append touches it.
    pub settled: std::ops::Range<u64>,
}

impl Unsynced {
    /// fsyncs the file, then drops its settled range from the page cache
    /// (advice only: a failure costs memory, never data).
    pub fn sync_and_release(&self) -> std::io::Result<()> {
        self.file.sync_data()?;
        if !self.settled.is_empty() {
            let _ = nix::fcntl::posix_fadvise(
                &self.file,
                self.settled.start as i64,
                (self.settled.end - self.settled.start) as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
        Ok(())
    }
}

const PAGE: u64 = 4096;

/// Drops the log between `from` and `to` (events a follower has read back,
/// all fsync'd) from the page cache, whole pages only: the page holding
/// `to` may still be written into. Advice only, like `sync_and_release`.
pub fn release_read(dir: &Path, from: Loc, to: Loc) {
    for (n, path) in segments(dir, "log").unwrap_or_default() {
        if n < from.segment || n > to.segment {
            continue;
        }
        let start = if n == from.segment {
            from.offset / PAGE * PAGE
        } else {
            0
        };
        // Length 0: to the end of a segment the follower has read past.
        let len = if n == to.segment {
            match (to.offset / PAGE * PAGE).checked_sub(start) {
                Some(l) if l > 0 => l,
                _ => continue,
            }
        } else {
            0
        };
        if let Ok(f) = File::open(&path) {
            let _ = nix::fcntl::posix_fadvise(
                &f,
                start as i64,
                len as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
    }
}

impl LogWriter {
    /// Continues segment `n` at `size` (cutting anything after it: a torn
    /// frame), or starts it.
    pub fn open(dir: &Path, segment: u64, size: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = open_rw(&segment_path(dir, segment, "log"))?;
        if file.metadata()?.len() != size {
            file.set_len(size)?;
        }
        let mut file = file;
        file.seek(SeekFrom::Start(size))?;
        Ok(Self {
            dir: dir.to_owned(),
            file,
            segment,
            size,
            unsynced: Vec::new(),
            dirty: false,
            released: 0,
        })
    }

    /// Writes one frame (`[4 bytes reserved][event]`, the length is
    /// filled in here) with a single `write(2)` in the common case.
    pub fn append(&mut self, frame: &mut [u8]) -> std::io::Result<Loc> {
        if self.size > 0 && self.size + frame.len() as u64 > SEGMENT_MAX {
            let next = Self::open(&self.dir, self.segment + 1, 0)?;
            let old = std::mem::replace(self, next);
            self.unsynced = old.unsynced;
            if old.dirty || old.released < old.size {
                self.unsynced.push(Unsynced {
                    settled: old.released..old.size.next_multiple_of(PAGE),
                    file: old.file,
                });
            }
        }
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        let loc = Loc {
            segment: self.segment,
            offset: self.size,
        };
        if let Err(e) = self.file.write_all(frame) {
            // A partial write leaves a torn frame: cut it, so the next
            // append starts on a frame boundary.
            let _ = self.file.set_len(self.size);
            let _ = self.file.seek(SeekFrom::Start(self.size));
            return Err(e);
        }
        self.size += frame.len() as u64;
        self.dirty = true;
        Ok(loc)
    }

    /// Files holding writes not yet fsync'd (clones: the commit thread
    /// syncs them without holding the head lock).
    pub fn take_unsynced(&mut self) -> std::io::Result<Vec<Unsynced>> {
        let mut files = std::mem::take(&mut self.unsynced);
        if self.dirty {
            // The page holding the end stays: the next append writes into
            // it, and would otherwise read it back from disk first.
            let settled = self.released..(self.size / PAGE * PAGE).max(self.released);
            files.push(Unsynced {
                file: self.file.try_clone()?,
                settled: settled.clone(),
            });
            self.released = settled.end;
            self.dirty = false;
        }
        Ok(files)
    }

    /// Where the next frame will go.
    pub fn end(&self) -> Loc {
        Loc {
            segment: self.segment,
            offset: self.size,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::record::chain::{encode_into, Link, GENESIS};

    fn frame(seq: u64, prev: &[u8; 32], body: &[u8]) -> (Vec<u8>, [u8; 32]) {
        let mut f = vec![0u8; 4];
        let h = encode_into(&mut f, seq, 1, 1, "k", body, prev);
        (f, h)
    }

    #[test]
    fn frames_roundtrip_rotate_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), 0, 0).unwrap();
        let (mut a, ha) = frame(0, &GENESIS, b"{}");
        let (mut b, hb) = frame(1, &ha, b"{\"x\":1}");
        let la = w.append(&mut a).unwrap();
        let lb = w.append(&mut b).unwrap();
        assert_eq!(
            Link::decode(&read_at(dir.path(), lb).unwrap()).unwrap().seq,
            1
        );
        assert_eq!(la.offset, 0);
        // A write cut short by a crash.
        let (mut c, _) = frame(2, &hb, b"{}");
        let n = c.len();
        let len = (n - 4) as u32;
        c[..4].copy_from_slice(&len.to_le_bytes());
        w.file.write_all(&c[..n - 3]).unwrap();
        let path = segment_path(dir.path(), 0, "log");
        let mut seen = Vec::new();
        let (end, torn) = scan(&path, 0, 0, |loc, p| {
            seen.push((loc, Link::decode(p).unwrap().seq));
            true
        })
        .unwrap();
        assert!(torn);
        assert_eq!(seen, vec![(la, 0), (lb, 1)]);
        // Reopened where the whole frames end: the torn one is cut.
        let mut w = LogWriter::open(dir.path(), 0, end).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), end);
        let (mut c, _) = frame(2, &hb, b"{}");
        assert_eq!(w.append(&mut c).unwrap().offset, end);
        let (_, torn) = scan(&path, 0, end, |_, _| true).unwrap();
        assert!(!torn);
        assert_eq!(w.take_unsynced().unwrap().len(), 1);
        assert!(w.take_unsynced().unwrap().is_empty());
        // Big frames start a new segment.
        let big = vec![b'a'; (SEGMENT_MAX / 2) as usize];
        for seq in 3..6 {
            let (mut f, _) = frame(seq, &GENESIS, &big);
            w.append(&mut f).unwrap();
        }
        assert_eq!(segments(dir.path(), "log").unwrap().len(), 3);
        assert_eq!(w.take_unsynced().unwrap().len(), 3);
    }

    /// Which of `file`'s pages are in the page cache.
    pub(crate) fn resident(file: &File) -> Vec<bool> {
        use std::os::fd::AsRawFd;
        let len = file.metadata().unwrap().len() as usize;
        let pages = len.div_ceil(PAGE as usize);
        let mut vec = vec![0u8; pages];
        // SAFETY: a shared read-only mapping of a file we hold open, of
        // its current length, unmapped before return; mincore writes one
        // byte per page into `vec`, which has that many.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
            libc::munmap(p, len);
        }
        vec.iter().map(|b| b & 1 == 1).collect()
    }

    #[test]
    fn synced_log_leaves_the_page_cache_but_the_page_being_written() {
        // On disk: tmpfs pages cannot leave the page cache (/tmp may be
        // tmpfs; /var/tmp is disk-backed by convention).
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let mut w = LogWriter::open(dir.path(), 0, 0).unwrap();
        let mut prev = GENESIS;
        let mut locs = Vec::new();
        for seq in 0..100 {
            let (mut f, h) = frame(seq, &prev, &[b'x'; 3000]);
            prev = h;
            locs.push(w.append(&mut f).unwrap());
        }
        let file = File::open(segment_path(dir.path(), 0, "log")).unwrap();
        assert!(
            resident(&file).iter().all(|r| *r),
            "written pages start cached"
        );
        let taken = w.take_unsynced().unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].settled.start, 0);
        assert_eq!(taken[0].settled.end % PAGE, 0);
        for u in &taken {
            u.sync_and_release().unwrap();
        }
        let r = resident(&file);
        let last = r.len() - 1;
        assert!(
            r[..last].iter().all(|r| !*r),
            "settled pages released: {r:?}"
        );
        assert!(r[last], "the page the next append writes into stays");
        // The next commit releases from where the last one stopped, and
        // everything reads back whole.
        let (mut f, _) = frame(100, &prev, &[b'y'; 9000]);
        locs.push(w.append(&mut f).unwrap());
        let taken = w.take_unsynced().unwrap();
        assert_eq!(taken[0].settled.start, last as u64 * PAGE);
        for u in &taken {
            u.sync_and_release().unwrap();
        }
        for (seq, loc) in locs.iter().enumerate() {
            assert_eq!(
                Link::decode(&read_at(dir.path(), *loc).unwrap())
                    .unwrap()
                    .seq,
                seq as u64
            );
        }
    }

    #[test]
    fn what_a_follower_has_read_leaves_the_page_cache() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let mut w = LogWriter::open(dir.path(), 0, 0).unwrap();
        let mut prev = GENESIS;
        let mut end = Loc {
            segment: 0,
            offset: 0,
        };
        for seq in 0..50 {
            let (mut f, h) = frame(seq, &prev, &[b'x'; 3000]);
            prev = h;
            w.append(&mut f).unwrap();
            end = w.end();
        }
        for u in w.take_unsynced().unwrap() {
            u.file.sync_data().unwrap();
        }
        let file = File::open(segment_path(dir.path(), 0, "log")).unwrap();
        assert!(resident(&file).iter().all(|r| *r));
        let start = Loc {
            segment: 0,
            offset: 0,
        };
        release_read(dir.path(), start, end);
        let r = resident(&file);
        let last = r.len() - 1;
        assert!(r[..last].iter().all(|r| !*r), "read pages released: {r:?}");
        assert!(r[last], "the page holding the end stays");
    }
}
