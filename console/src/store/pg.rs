//! The PostgreSQL backend, on the sync `postgres` client (rust-postgres):
//! the store's callers are already blocking code run off the async
//! runtime (`spawn_blocking`), so a sync client keeps one code path with
//! the SQLite backend and adds only the protocol crates the workspace
//! already builds. A few connections are pooled here (no pool crate):
//! the web UI's queries and ingest do not wait on each other.
//!
//! Every call here blocks (the client drives its own small runtime):
//! never call it on an async worker thread.
use std::{
    sync::{Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use postgres::{types::ToSql, Client, GenericClient, NoTls};

use super::{now_ms, Arg, Exec, Row, StoreError};

/// Schema versions, applied in order; `schema_version` holds one row per
/// version applied. Parallel to `sqlite::MIGRATIONS`: a change goes in
/// both. Integers are BIGINT (the store binds `i64`), bodies BYTEA.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    first_seen_ms BIGINT NOT NULL,
    last_event_ms BIGINT NOT NULL,
    head_seq BIGINT NOT NULL,
    head_hash TEXT NOT NULL,
    chain_state TEXT NOT NULL,
    chain_detail TEXT,
    events BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE events (
    node TEXT NOT NULL,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    prev TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    connection BIGINT NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (node, seq)
);
CREATE TABLE sessions (
    node TEXT NOT NULL,
    id BIGINT NOT NULL,
    identity TEXT NOT NULL,
    ci_system TEXT,
    repository TEXT,
    run_id TEXT,
    job TEXT,
    actor TEXT,
    target TEXT,
    comm TEXT,
    started_at_ms BIGINT NOT NULL,
    ended_at_ms BIGINT,
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
    session BIGINT NOT NULL,
    protocol TEXT NOT NULL,
    seq BIGINT NOT NULL,
    state TEXT,
    started_at_ms BIGINT NOT NULL,
    summary TEXT NOT NULL,
    status TEXT,
    rules TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (node, session, protocol, seq)
);
CREATE INDEX exchanges_by_rules ON exchanges (rules);
CREATE TABLE ingest_errors (
    at_ms BIGINT NOT NULL,
    stream_seq BIGINT,
    reason TEXT NOT NULL
);
"#,
    // As sqlite's version 2: run and job searches, retention lookups,
    // the audit trail; the unusable index on `rules` goes.
    r#"
CREATE INDEX sessions_by_run ON sessions (run_id, started_at_ms DESC);
CREATE INDEX sessions_by_job ON sessions (job, started_at_ms DESC);
CREATE INDEX events_by_connection ON events (node, connection);
CREATE INDEX ingest_errors_by_time ON ingest_errors (at_ms);
DROP INDEX exchanges_by_rules;
CREATE TABLE audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms BIGINT NOT NULL,
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
    at_ms BIGINT NOT NULL
);
CREATE TABLE checkpoints (
    node TEXT NOT NULL,
    n BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    head TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    kid TEXT NOT NULL,
    sig TEXT NOT NULL,
    PRIMARY KEY (node, n)
);
CREATE INDEX checkpoints_by_seq ON checkpoints (node, seq);
"#,
];

/// The advisory lock consoles take while migrating ("sluice-c" in
/// ASCII); advisory locks are per database.
const MIGRATION_LOCK: i64 = 0x736c_7569_6365_2d63;
/// Connections kept open at most; the console's work is small queries.
const POOL: usize = 4;
/// How long a call waits for a connection when all are busy.
const WAIT: Duration = Duration::from_secs(10);

/// The error's words and its causes' (`postgres::Error` alone says only
/// "db error" or "error connecting to server").
pub(super) fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.to_string();
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

pub(super) struct Postgres {
    config: postgres::Config,
    pool: Mutex<Pool>,
    freed: Condvar,
}

struct Pool {
    idle: Vec<Client>,
    /// Connections open, idle or lent.
    open: usize,
}

/// A lent connection, given back on drop (dropped if it has died).
struct Lease<'a> {
    pg: &'a Postgres,
    client: Option<Client>,
    reused: bool,
}

impl Postgres {
    pub(super) fn open(url: &str) -> Result<Self, StoreError> {
        let mut config: postgres::Config = url.parse()?;
        // A dead address fails the start in seconds, not minutes.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("sluice-console");
        }
        let pg = Self {
            config,
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        };
        pg.migrate()?;
        Ok(pg)
    }

    /// Brings the schema up to date in one transaction under an advisory
    /// lock: consoles starting together take turns, and the later ones
    /// find the versions already applied.
    fn migrate(&self) -> Result<(), StoreError> {
        let mut lease = self.take()?;
        let Some(client) = lease.client.as_mut() else {
            return Err(StoreError::Busy(WAIT));
        };
        let mut tx = client.transaction()?;
        tx.execute(
            &format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"),
            &[],
        )?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                 version BIGINT PRIMARY KEY,
                 applied_at_ms BIGINT NOT NULL
             )",
        )?;
        let version: i64 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])?
            .try_get(0)?;
        let version = u64::try_from(version).unwrap_or(0);
        if version > MIGRATIONS.len() as u64 {
            return Err(StoreError::Newer {
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(m)?;
            tx.execute(
                "INSERT INTO schema_version (version, applied_at_ms) VALUES ($1, $2)",
                &[&(i as i64 + 1), &now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection, or a new one while fewer than `POOL` are
    /// open, or the next one given back within `WAIT`.
    fn take(&self) -> Result<Lease<'_>, StoreError> {
        let deadline = Instant::now() + WAIT;
        let mut pool = self.pool();
        loop {
            while let Some(c) = pool.idle.pop() {
                if c.is_closed() {
                    pool.open -= 1;
                    continue;
                }
                return Ok(Lease {
                    pg: self,
                    client: Some(c),
                    reused: true,
                });
            }
            if pool.open < POOL {
                pool.open += 1;
                drop(pool);
                return match self.config.connect(NoTls) {
                    Ok(c) => Ok(Lease {
                        pg: self,
                        client: Some(c),
                        reused: false,
                    }),
                    Err(e) => {
                        self.pool().open -= 1;
                        self.freed.notify_one();
                        Err(e.into())
                    }
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::Busy(WAIT));
            }
            pool = match self.freed.wait_timeout(pool, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Runs `f` on a pooled connection, in a transaction if asked. A
    /// connection found dead takes the idle ones with it (a restarted
    /// server killed them all), and a read on a reused connection that
    /// died is tried once more on a fresh one. A write is not: it may
    /// have committed before the connection went.
    pub(super) fn run<T>(
        &self,
        transaction: bool,
        mut f: impl FnMut(&mut dyn Exec) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut lease = self.take()?;
            let Some(client) = lease.client.as_mut() else {
                return Err(StoreError::Busy(WAIT));
            };
            let out = if transaction {
                (|| {
                    let mut tx = client.transaction()?;
                    let out = f(&mut Pg(&mut tx))?;
                    tx.commit()?;
                    Ok(out)
                })()
            } else {
                f(&mut Pg(client))
            };
            match out {
                Err(e) if client.is_closed() => {
                    let idle = {
                        let mut pool = self.pool();
                        let idle = std::mem::take(&mut pool.idle);
                        pool.open -= idle.len();
                        idle
                    };
                    // Closed outside the pool's lock.
                    drop(idle);
                    if !transaction && lease.reused && attempt == 1 {
                        continue;
                    }
                    return Err(e);
                }
                out => return out,
            }
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(c) = self.client.take() else {
            return;
        };
        let mut pool = self.pg.pool();
        if c.is_closed() {
            pool.open -= 1;
        } else {
            pool.idle.push(c);
        }
        drop(pool);
        self.pg.freed.notify_one();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Closing a client blocks on its own runtime, which panics on an
        // async worker thread (the last `Arc<Store>` may go there): close
        // them on a plain thread then.
        let idle = std::mem::take(&mut self.pool().idle);
        if idle.is_empty() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if let Ok(t) = std::thread::Builder::new().spawn(move || drop(idle)) {
            let _ = t.join();
        }
    }
}

/// The shared SQL's `?N` as PostgreSQL's `$N` (the store's SQL has no
/// other `?`).
fn dollars(sql: &str) -> String {
    sql.replace('?', "$")
}

fn params(args: &[Arg]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter()
        .map(|a| match a {
            Arg::Text(s) => s as &(dyn ToSql + Sync),
            Arg::OptText(s) => s,
            Arg::Int(i) => i,
            Arg::OptInt(i) => i,
            Arg::Bytes(b) => b,
        })
        .collect()
}

struct Pg<'a, C: GenericClient>(&'a mut C);

impl<C: GenericClient> Exec for Pg<'_, C> {
    fn execute(&mut self, sql: &str, args: &[Arg]) -> Result<u64, StoreError> {
        Ok(self.0.execute(dollars(sql).as_str(), &params(args))?)
    }

    fn each(
        &mut self,
        sql: &str,
        args: &[Arg],
        row: &mut dyn FnMut(&dyn Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for r in self.0.query(dollars(sql).as_str(), &params(args))? {
            row(&PgRow(r))?;
        }
        Ok(())
    }
}

struct PgRow(postgres::Row);

impl Row for PgRow {
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.0.try_get(i)?)
    }
    fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.0.try_get(i)?)
    }
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.0.try_get(i)?)
    }
}
