//! The write-ahead file: every chain event is written here with one
//! `write(2)` before the caller goes on (before a request is forwarded),
//! so it is in the kernel — and survives `kill -9` of the node — even
//! though sled keeps its own writes in process memory until it flushes.
//!
//! Frames are `[len u32 LE][stored event]`; the event's own hash is the
//! checksum, so a torn tail (a write cut short by a crash or power loss)
//! is recognised and ignored. Segments (`seg-<n>.wal`) are rotated by the
//! group-commit thread; a segment is deleted once a sled flush (fsync)
//! that started after its last write has completed. At start every
//! remaining segment is replayed into sled.
use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use super::chain::Link;

pub struct Wal {
    dir: PathBuf,
    file: File,
    segment: u64,
    written: u64,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("seg-{n:016}.wal"))
}

/// Existing segments, oldest first.
pub fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("seg-"))
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((n, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// The intact frames of one segment, in order, and whether it ended in a
/// torn (partial or corrupt) frame.
pub fn read_segment(path: &Path) -> std::io::Result<(Vec<Link>, bool)> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let Some(len) = rest
            .get(..4)
            .map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
        else {
            return Ok((out, true));
        };
        let Some(frame) = rest.get(4..4 + len) else {
            return Ok((out, true));
        };
        match Link::decode(frame) {
            Ok(l) if !l.legacy && l.hash_ok() => out.push(l),
            _ => return Ok((out, true)),
        }
        rest = &rest[4 + len..];
    }
    Ok((out, false))
}

impl Wal {
    /// Starts a new, empty segment `n`.
    pub fn create(dir: &Path, n: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(segment_path(dir, n))?;
        Ok(Self {
            dir: dir.to_owned(),
            file,
            segment: n,
            written: 0,
        })
    }

    /// Writes one frame (`[4 bytes reserved][event]`, the length is filled
    /// in here) with a single `write(2)` in the common case.
    pub fn append(&mut self, frame: &mut [u8]) -> std::io::Result<()> {
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        self.file.write_all(frame)?;
        self.written += frame.len() as u64;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// Switches to a fresh segment; returns the number of the old one.
    pub fn rotate(&mut self) -> std::io::Result<u64> {
        let next = Self::create(&self.dir, self.segment + 1)?;
        let old = std::mem::replace(self, next);
        Ok(old.segment)
    }

    /// Deletes segments up to and including `n` (their events are in a
    /// flushed sled).
    pub fn remove_through(dir: &Path, n: u64) -> std::io::Result<()> {
        for (k, p) in segments(dir)? {
            if k <= n {
                std::fs::remove_file(p)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::chain::{encode_into, GENESIS};

    fn frame(seq: u64, prev: &[u8; 32]) -> (Vec<u8>, [u8; 32]) {
        let mut f = vec![0u8; 4];
        let h = encode_into(&mut f, seq, 1, 1, "k", b"{}", prev);
        (f, h)
    }

    #[test]
    fn frames_roundtrip_and_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::create(dir.path(), 1).unwrap();
        let (mut a, ha) = frame(0, &GENESIS);
        let (mut b, _) = frame(1, &ha);
        w.append(&mut a).unwrap();
        w.append(&mut b).unwrap();
        let (links, torn) = read_segment(&segment_path(dir.path(), 1)).unwrap();
        assert_eq!((links.len(), torn), (2, false));
        // A write cut short by a crash.
        let (mut c, _) = frame(2, &links[1].hash);
        let n = c.len();
        let len = (n - 4) as u32;
        c[..4].copy_from_slice(&len.to_le_bytes());
        w.file.write_all(&c[..n - 3]).unwrap();
        let (links, torn) = read_segment(&segment_path(dir.path(), 1)).unwrap();
        assert_eq!((links.len(), torn), (2, true));
        let old = w.rotate().unwrap();
        assert_eq!(old, 1);
        assert_eq!(segments(dir.path()).unwrap().len(), 2);
        Wal::remove_through(dir.path(), old).unwrap();
        assert_eq!(segments(dir.path()).unwrap()[0].0, 2);
    }
}
