//! The embedded backend: one SQLite file (Debian's libsqlite3), one
//! connection behind a mutex (SQLite has one writer anyway), WAL.
use std::{path::Path, sync::Mutex};

use rusqlite::{
    types::{ToSqlOutput, ValueRef},
    Connection, TransactionBehavior,
};

use super::{Arg, Exec, Row, StoreError};

/// Schema versions, applied in order (`PRAGMA user_version` is the last
/// one applied). Parallel to `pg::MIGRATIONS`: a change goes in both.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    first_seen_ms INTEGER NOT NULL,
    last_event_ms INTEGER NOT NULL,
    head_seq INTEGER NOT NULL,
    head_hash TEXT NOT NULL,
    chain_state TEXT NOT NULL,
    chain_detail TEXT,
    events INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE events (
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    prev TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    connection INTEGER NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (node, seq)
);
CREATE TABLE sessions (
    node TEXT NOT NULL,
    id INTEGER NOT NULL,
    identity TEXT NOT NULL,
    ci_system TEXT,
    repository TEXT,
    run_id TEXT,
    job TEXT,
    actor TEXT,
    target TEXT,
    comm TEXT,
    started_at_ms INTEGER NOT NULL,
    ended_at_ms INTEGER,
    outcome TEXT,
    record TEXT NOT NULL,
    PRIMARY KEY (node, id)
);
CREATE INDEX sessions_by_time ON sessions (started_at_ms DESC);
CREATE INDEX sessions_by_repository ON sessions (repository, started_at_ms DESC);
CREATE INDEX sessions_by_actor ON sessions (actor, started_at_ms DESC);
CREATE INDEX sessions_by_identity ON sessions (identity, started_at_ms DESC);
CREATE INDEX sessions_by_target ON sessions (target, started_at_ms DESC);
CREATE TABLE exchanges (
    node TEXT NOT NULL,
    session INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    seq INTEGER NOT NULL,
    state TEXT,
    started_at_ms INTEGER NOT NULL,
    summary TEXT NOT NULL,
    status TEXT,
    rules TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (node, session, protocol, seq)
);
CREATE INDEX exchanges_by_rules ON exchanges (rules);
CREATE TABLE ingest_errors (
    at_ms INTEGER NOT NULL,
    stream_seq INTEGER,
    reason TEXT NOT NULL
);
"#,
    // The searches by run and job, retention's lookups (a connection's
    // events, old ingest errors), and the audit trail. The index on
    // `rules` goes: a `LIKE '%…%'` never uses it, it only cost writes.
    r#"
CREATE INDEX sessions_by_run ON sessions (run_id, started_at_ms DESC);
CREATE INDEX sessions_by_job ON sessions (job, started_at_ms DESC);
CREATE INDEX events_by_connection ON events (node, connection);
CREATE INDEX ingest_errors_by_time ON ingest_errors (at_ms);
DROP INDEX exchanges_by_rules;
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    who TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_by_time ON audit (at_ms DESC, id DESC);
"#,
    r#"
CREATE TABLE node_keys (
    node TEXT PRIMARY KEY,
    kid TEXT NOT NULL,
    ed25519 TEXT NOT NULL,
    source TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE checkpoints (
    node TEXT NOT NULL,
    n INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    head TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    kid TEXT NOT NULL,
    sig TEXT NOT NULL,
    PRIMARY KEY (node, n)
);
CREATE INDEX checkpoints_by_seq ON checkpoints (node, seq);
"#,
];

pub(super) struct Sqlite {
    db: Mutex<Connection>,
}

impl Sqlite {
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        let mut db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        // All pending versions in one write transaction taken up front,
        // the version read inside it: a second console opening the same
        // file waits (busy timeout) and then finds nothing left to do.
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: u64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > MIGRATIONS.len() as u64 {
            return Err(StoreError::Newer {
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for m in MIGRATIONS.iter().skip(version as usize) {
            tx.execute_batch(m)?;
        }
        tx.pragma_update(None, "user_version", MIGRATIONS.len())?;
        tx.commit()?;
        Ok(Self { db: Mutex::new(db) })
    }

    pub(super) fn run<T>(
        &self,
        transaction: bool,
        mut f: impl FnMut(&mut dyn Exec) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        if !transaction {
            return f(&mut Lite(&db));
        }
        let tx = db.transaction()?;
        let out = f(&mut Lite(&tx))?;
        tx.commit()?;
        Ok(out)
    }
}

struct Lite<'a>(&'a Connection);

impl rusqlite::ToSql for Arg {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Arg::Text(s) | Arg::OptText(Some(s)) => ValueRef::Text(s.as_bytes()),
            Arg::Int(i) | Arg::OptInt(Some(i)) => ValueRef::Integer(*i),
            Arg::OptText(None) | Arg::OptInt(None) => ValueRef::Null,
            Arg::Bytes(b) => ValueRef::Blob(b),
        }))
    }
}

impl Exec for Lite<'_> {
    fn execute(&mut self, sql: &str, args: &[Arg]) -> Result<u64, StoreError> {
        let n = self
            .0
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(args))?;
        Ok(n as u64)
    }

    fn each(
        &mut self,
        sql: &str,
        args: &[Arg],
        row: &mut dyn FnMut(&dyn Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        while let Some(r) = rows.next()? {
            row(&LiteRow(r))?;
        }
        Ok(())
    }
}

struct LiteRow<'a, 'b>(&'a rusqlite::Row<'b>);

impl Row for LiteRow<'_, '_> {
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.0.get(i)?)
    }
    fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.0.get(i)?)
    }
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.0.get(i)?)
    }
}
