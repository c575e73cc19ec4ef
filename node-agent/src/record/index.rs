//! Where each session's records are in the log. Session ids count up from
//! 1, so the index is a flat file (`records.idx`) with one 48-byte slot per
//! id, written in place: the session's first event, its latest connection
//! event (the connection record as it stands) and its latest event. A
//! session's exchanges are read from the log between its first and latest
//! events. Nothing here grows in memory with the evidence kept: reads go
//! through the page cache.
//!
//! Slot updates wait in an overlay (memory, consulted first by readers)
//! until the commit thread has synced the log; then they are written and
//! synced, and `records.idx.meta` (where indexing stands, the records
//! still open) is replaced atomically. The index on disk therefore never
//! points past the log on disk, and after a crash the log tail beyond the
//! meta is indexed again (idempotent).
use std::{
    collections::{BTreeSet, HashMap},
    fs::{File, OpenOptions},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{chain, log::Loc, View};

const SLOT: u64 = 48;

/// A session's places in the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    pub first: Option<Loc>,
    /// The latest connection event: the session's record.
    pub conn: Option<Loc>,
    pub last: Option<Loc>,
}

/// `Loc`s are stored with the segment plus one: all zero means none.
fn put_loc(b: &mut [u8], l: Option<Loc>) {
    let (s, o) = l.map_or((0, 0), |l| (l.segment + 1, l.offset));
    b[..8].copy_from_slice(&s.to_be_bytes());
    b[8..16].copy_from_slice(&o.to_be_bytes());
}

fn get_loc(b: &[u8]) -> Option<Loc> {
    let s = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
    let o = u64::from_be_bytes(b.get(8..16)?.try_into().ok()?);
    s.checked_sub(1).map(|segment| Loc { segment, offset: o })
}

impl Slot {
    fn encode(&self) -> [u8; SLOT as usize] {
        let mut b = [0u8; SLOT as usize];
        put_loc(&mut b[..16], self.first);
        put_loc(&mut b[16..32], self.conn);
        put_loc(&mut b[32..48], self.last);
        b
    }

    fn decode(b: &[u8]) -> Slot {
        Slot {
            first: get_loc(&b[..16]),
            conn: get_loc(&b[16..32]),
            last: get_loc(&b[32..48]),
        }
    }
}

/// A record still open: a connection, or an exchange (session, seq).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Open {
    Connection(u64),
    Exchange(u64, u32),
}

/// Where indexing stands; persisted as `records.idx.meta`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    /// Seq of the next event to index.
    pub next: u64,
    /// Log position after the last indexed event.
    pub end: (u64, u64),
    /// Hash of the last indexed event (hex).
    pub hash: String,
    /// Sessions with a slot.
    pub sessions: u64,
    pub open: BTreeSet<Open>,
}

impl Meta {
    pub fn fresh(first_segment: u64) -> Meta {
        Meta {
            next: 0,
            end: (first_segment, 0),
            hash: hex::encode(chain::GENESIS),
            sessions: 0,
            open: BTreeSet::new(),
        }
    }

    pub fn end(&self) -> Loc {
        Loc {
            segment: self.end.0,
            offset: self.end.1,
        }
    }

    pub fn hash(&self) -> Option<chain::Hash> {
        hex::decode(&self.hash).ok()?.try_into().ok()
    }
}

pub struct Index {
    file: File,
    meta_path: PathBuf,
    /// Slot updates not yet written (readers look here first).
    overlay: HashMap<u64, Slot>,
    /// Hash of the last indexed event (`meta.hash` is its hex, written
    /// at `persist`: no hex encoding per event).
    last_hash: Option<chain::Hash>,
    pub meta: Meta,
}

impl Index {
    /// Opens the index in `dir`; the meta is `None` when missing or
    /// unreadable (the caller rebuilds).
    pub fn open(dir: &Path) -> std::io::Result<(Index, Option<Meta>)> {
        let file = super::log::open_rw(&dir.join("records.idx"))?;
        let meta_path = dir.join("records.idx.meta");
        let meta = std::fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Meta>(&b).ok());
        Ok((
            Index {
                file,
                meta_path,
                overlay: HashMap::new(),
                last_hash: None,
                meta: Meta::fresh(0),
            },
            meta,
        ))
    }

    /// Forgets everything (a rebuild from the log follows).
    pub fn reset(&mut self, first_segment: u64) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.overlay.clear();
        self.last_hash = None;
        self.meta = Meta::fresh(first_segment);
        Ok(())
    }

    pub fn get(&self, id: u64) -> std::io::Result<Option<Slot>> {
        if let Some(s) = self.overlay.get(&id) {
            return Ok(Some(*s));
        }
        let mut b = [0u8; SLOT as usize];
        match self.file.read_exact_at(&mut b, id * SLOT) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let s = Slot::decode(&b);
        Ok((s != Slot::default()).then_some(s))
    }

    /// The highest session id with a slot (or 0).
    pub fn max_id(&self) -> std::io::Result<u64> {
        let on_file = (self.file.metadata()?.len() / SLOT).saturating_sub(1);
        Ok(self.overlay.keys().copied().max().unwrap_or(0).max(on_file))
    }

    /// Indexes one event (at `at`, ending at `end`).
    pub fn add(
        &mut self,
        seq: u64,
        hash: &chain::Hash,
        connection: u64,
        view: View,
        at: Loc,
        end: Loc,
    ) -> std::io::Result<()> {
        if connection != 0 {
            let mut slot = match self.get(connection)? {
                Some(s) => s,
                None => {
                    self.meta.sessions += 1;
                    Slot::default()
                }
            };
            slot.first.get_or_insert(at);
            slot.last = Some(at);
            match view {
                View::Connection { open } => {
                    slot.conn = Some(at);
                    self.set_open(Open::Connection(connection), open);
                }
                View::Exchange { seq, open } => {
                    self.set_open(Open::Exchange(connection, seq), open);
                }
                View::None => {}
            }
            self.overlay.insert(connection, slot);
        }
        self.meta.next = seq + 1;
        self.meta.end = (end.segment, end.offset);
        self.last_hash = Some(*hash);
        Ok(())
    }

    fn set_open(&mut self, k: Open, open: bool) {
        if open {
            self.meta.open.insert(k);
        } else {
            self.meta.open.remove(&k);
        }
    }

    /// Writes the overlay and syncs, then replaces the meta. Call after
    /// the log is synced.
    pub fn persist(&mut self) -> std::io::Result<()> {
        if let Some(h) = self.last_hash.take() {
            self.meta.hash = hex::encode(h);
        }
        if !self.overlay.is_empty() {
            let mut ids: Vec<u64> = self.overlay.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                if let Some(s) = self.overlay.get(&id) {
                    self.file.write_all_at(&s.encode(), id * SLOT)?;
                }
            }
            self.file.sync_data()?;
            self.overlay.clear();
        }
        let tmp = self.meta_path.with_extension("meta.new");
        {
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            std::io::Write::write_all(
                &mut f,
                &serde_json::to_vec(&self.meta).map_err(std::io::Error::other)?,
            )?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, &self.meta_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_persist_and_overlay_reads_first() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ix, meta) = Index::open(dir.path()).unwrap();
        assert!(meta.is_none());
        let at = |o| Loc {
            segment: 0,
            offset: o,
        };
        ix.add(
            0,
            &[1; 32],
            3,
            View::Connection { open: true },
            at(0),
            at(10),
        )
        .unwrap();
        ix.add(
            1,
            &[2; 32],
            3,
            View::Exchange { seq: 0, open: true },
            at(10),
            at(20),
        )
        .unwrap();
        ix.add(2, &[3; 32], 0, View::None, at(20), at(30)).unwrap();
        // A session seen only through an exchange so far: no record yet.
        ix.add(
            3,
            &[4; 32],
            5,
            View::Exchange {
                seq: 0,
                open: false,
            },
            at(30),
            at(40),
        )
        .unwrap();
        let s = ix.get(3).unwrap().unwrap();
        assert_eq!(
            (s.first, s.conn, s.last),
            (Some(at(0)), Some(at(0)), Some(at(10)))
        );
        assert_eq!(ix.get(2).unwrap(), None);
        assert_eq!(ix.max_id().unwrap(), 5);
        ix.persist().unwrap();
        let five = ix.get(5).unwrap().unwrap();
        assert_eq!((five.first, five.conn), (Some(at(30)), None));
        drop(ix);
        let (ix, meta) = Index::open(dir.path()).unwrap();
        let meta = meta.unwrap();
        assert_eq!((meta.next, meta.end, meta.sessions), (4, (0, 40), 2));
        assert_eq!(
            meta.open.iter().copied().collect::<Vec<_>>(),
            vec![Open::Connection(3), Open::Exchange(3, 0)]
        );
        assert_eq!(ix.get(3).unwrap().unwrap().last, Some(at(10)));
        assert_eq!(ix.max_id().unwrap(), 5);
    }
}
