//! The console's store: every node's events as shipped (the evidence),
//! each node's chain head and state, the projections the searches and
//! replays read (sessions, and their exchanges and statements), and the
//! audit trail of what the console's own users did, all in one SQL
//! schema. Two backends share it: an embedded SQLite file in the state
//! directory (the default) and a PostgreSQL database (`--store
//! postgres://…`, for a console that outgrows one file or runs as
//! replicas). Writes of one event (the event, the node's head, the
//! projection) are one transaction, so a crash never leaves a projection
//! without its evidence or a head ahead of what is stored.
//!
//! One set of semantics: every query below is written once, with `?N`
//! placeholders, and runs on either backend through [`Exec`]; the only
//! dialect differences are the schema's column types (kept as parallel
//! migration lists, `sqlite::MIGRATIONS` and `pg::MIGRATIONS`) and the
//! case-insensitive match operator ([`Backend::like`]).
use std::path::Path;

use serde::Serialize;
use serde_json::Value;
use sluice_evidence::{
    chain::Hash,
    checkpoint::Checkpoint,
    follow::{ChainState, Head},
    line::Line,
};

mod pg;
mod sqlite;
#[cfg(test)]
mod testpg;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    /// Its causes are in the message (not `source`): the log lines
    /// that print a store error print only its message.
    #[error("store (PostgreSQL): {}", pg::describe(.0))]
    Postgres(postgres::Error),
    #[error("store: {0} is not a hash")]
    BadHash(String),
    /// The `--store` value names no store this console has.
    #[error("store: {0}")]
    Location(String),
    #[error("store: the schema is at version {found}, newer than this console knows ({known}); run a newer console")]
    Newer { found: u64, known: usize },
    #[error("store: {0} does not fit a signed 64-bit column")]
    Range(u64),
    #[error("store: unexpected value in result column {0}")]
    Column(usize),
    #[error("store (PostgreSQL): no connection free within {0:?}")]
    Busy(std::time::Duration),
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Postgres(e)
    }
}

/// A value bound to a `?N` placeholder: the few types the schema has.
/// Integers are signed 64-bit in both backends; a `u64` past `i64::MAX`
/// is refused ([`StoreError::Range`]) rather than wrapped.
#[derive(Debug)]
enum Arg {
    Text(String),
    OptText(Option<String>),
    Int(i64),
    OptInt(Option<i64>),
    Bytes(Vec<u8>),
}

impl Arg {
    fn text(s: impl Into<String>) -> Self {
        Arg::Text(s.into())
    }
    fn int(v: u64) -> Result<Self, StoreError> {
        i64::try_from(v)
            .map(Arg::Int)
            .map_err(|_| StoreError::Range(v))
    }
    fn opt_int(v: Option<u64>) -> Result<Self, StoreError> {
        v.map(|v| i64::try_from(v).map_err(|_| StoreError::Range(v)))
            .transpose()
            .map(Arg::OptInt)
    }
}

/// One result row, whichever backend read it.
trait Row {
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError>;
    fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError>;
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError>;

    fn text(&self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?.ok_or(StoreError::Column(i))
    }
    fn opt_u64(&self, i: usize) -> Result<Option<u64>, StoreError> {
        self.opt_i64(i)?
            .map(|v| u64::try_from(v).map_err(|_| StoreError::Column(i)))
            .transpose()
    }
    fn u64(&self, i: usize) -> Result<u64, StoreError> {
        self.opt_u64(i)?.ok_or(StoreError::Column(i))
    }
}

/// Runs the shared SQL (`?N` placeholders, never a literal `?`: the
/// PostgreSQL side turns them into `$N`).
trait Exec {
    fn execute(&mut self, sql: &str, args: &[Arg]) -> Result<u64, StoreError>;
    fn each(
        &mut self,
        sql: &str,
        args: &[Arg],
        row: &mut dyn FnMut(&dyn Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
}

fn rows<T>(
    ex: &mut dyn Exec,
    sql: &str,
    args: &[Arg],
    mut f: impl FnMut(&dyn Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    ex.each(sql, args, &mut |r| {
        out.push(f(r)?);
        Ok(())
    })?;
    Ok(out)
}

fn first<T>(
    ex: &mut dyn Exec,
    sql: &str,
    args: &[Arg],
    f: impl FnMut(&dyn Row) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    Ok(rows(ex, sql, args, f)?.into_iter().next())
}

enum Backend {
    Sqlite(sqlite::Sqlite),
    // Boxed: the pool is larger than the SQLite side.
    Postgres(Box<pg::Postgres>),
}

impl Backend {
    /// Runs `f` outside a transaction (a read).
    fn read<T>(
        &self,
        f: impl FnMut(&mut dyn Exec) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self {
            Backend::Sqlite(s) => s.run(false, f),
            Backend::Postgres(p) => p.run(false, f),
        }
    }

    /// Runs `f` in one transaction, committed only if it succeeds.
    fn write<T>(
        &self,
        f: impl FnMut(&mut dyn Exec) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self {
            Backend::Sqlite(s) => s.run(true, f),
            Backend::Postgres(p) => p.run(true, f),
        }
    }

    /// The case-insensitive pattern match: SQLite's `LIKE` already
    /// ignores (ASCII) case, PostgreSQL's needs `ILIKE` for the same
    /// answers.
    fn like(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "LIKE",
            Backend::Postgres(_) => "ILIKE",
        }
    }
}

pub struct Store {
    db: Backend,
}

/// One session (connection) as listed.
#[derive(Clone, Debug, Serialize)]
pub struct SessionRow {
    pub node: String,
    pub id: u64,
    pub identity: String,
    pub ci_system: Option<String>,
    pub repository: Option<String>,
    pub run_id: Option<String>,
    pub job: Option<String>,
    pub actor: Option<String>,
    pub target: Option<String>,
    pub comm: Option<String>,
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    pub outcome: Option<String>,
    pub exchanges: u64,
}

/// One exchange (HTTP) or statement (SQL) of a session, as recorded.
#[derive(Clone, Debug, Serialize)]
pub struct ExchangeRow {
    pub protocol: String,
    pub seq: u64,
    pub state: Option<String>,
    pub started_at_ms: u64,
    pub summary: String,
    pub status: Option<String>,
    pub rules: Vec<String>,
    /// The record's JSON as the node wrote it (bodies already masked).
    pub record: serde_json::Value,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeRow {
    pub name: String,
    pub first_seen_ms: u64,
    pub last_event_ms: u64,
    pub head_seq: u64,
    pub chain_state: String,
    pub chain_detail: Option<String>,
    pub events: u64,
    /// The checkpoint key in force and how it came to be trusted.
    pub key_kid: Option<String>,
    pub key_source: Option<String>,
    /// The newest signed checkpoint: its number and the event it covers.
    pub checkpoint_n: Option<u64>,
    pub checkpoint_seq: Option<u64>,
}

/// One thing a console user did (approved, denied, suspended …).
#[derive(Clone, Debug, Serialize)]
pub struct AuditRow {
    pub id: u64,
    pub at_ms: u64,
    pub who: String,
    pub role: String,
    pub action: String,
    pub subject: String,
    pub detail: serde_json::Value,
}

/// One stored event, as shipped.
#[derive(Clone, Debug)]
pub struct EventRow {
    pub seq: u64,
    pub hash: String,
    pub prev: String,
    pub at_ms: u64,
    pub connection: u64,
    pub kind: String,
    pub body: Vec<u8>,
}

fn event_row(r: &dyn Row) -> Result<EventRow, StoreError> {
    Ok(EventRow {
        seq: r.u64(0)?,
        hash: r.text(1)?,
        prev: r.text(2)?,
        at_ms: r.u64(3)?,
        connection: r.u64(4)?,
        kind: r.text(5)?,
        body: r.opt_bytes(6)?.unwrap_or_default(),
    })
}

/// A node's checkpoint key as the console keeps it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeKey {
    pub kid: String,
    /// The raw 32-byte Ed25519 key, base64.
    pub ed25519: String,
    /// `first-sight` or `enrolled`.
    pub source: String,
    pub at_ms: u64,
}

/// Search filters: every field given must match.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct Filter {
    pub repository: Option<String>,
    pub run_id: Option<String>,
    pub job: Option<String>,
    pub actor: Option<String>,
    pub identity: Option<String>,
    pub target: Option<String>,
    pub node: Option<String>,
    /// A rule id that decided on an exchange of the session.
    pub rule: Option<String>,
    /// Free text in the recorded exchanges and statements.
    pub q: Option<String>,
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    pub page: Option<u32>,
}

pub const PAGE: u32 = 50;

fn hex32(s: &str) -> Result<Hash, StoreError> {
    hex::decode(s)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| StoreError::BadHash(s.to_owned()))
}

fn text(v: &Value) -> Option<String> {
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// A connection's outcome in words: its status, and why where the node
/// says (`refused: identity suspended`).
fn outcome(v: &Value) -> Option<String> {
    let status = v["status"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| text(v))?;
    match v["reason"].as_str().or(v["error"].as_str()) {
        Some(r) => Some(format!("{status}: {r}")),
        None => Some(status),
    }
}

/// Nonempty filter text.
fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Text matched literally inside a `LIKE`/`ILIKE … ESCAPE '\'` pattern:
/// the user's `%` and `_` are characters, not wildcards.
fn like_text(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

const SESSION_COLUMNS: &str =
    "s.node, s.id, s.identity, s.ci_system, s.repository, s.run_id, s.job, s.actor,
     s.target, s.comm, s.started_at_ms, s.ended_at_ms, s.outcome,
     (SELECT count(*) FROM exchanges e WHERE e.node = s.node AND e.session = s.id)";

/// The search as SQL: every filter given narrows it; each has an index
/// (see the migrations) or rides a session's primary key.
fn sessions_query(f: &Filter, like: &str) -> Result<(String, Vec<Arg>), StoreError> {
    let mut sql = format!("SELECT {SESSION_COLUMNS} FROM sessions s WHERE 1 = 1");
    let mut args: Vec<Arg> = Vec::new();
    for (col, v) in [
        ("s.repository", &f.repository),
        ("s.run_id", &f.run_id),
        ("s.job", &f.job),
        ("s.actor", &f.actor),
        ("s.identity", &f.identity),
        ("s.target", &f.target),
        ("s.node", &f.node),
    ] {
        if let Some(v) = given(v) {
            args.push(Arg::text(v));
            sql.push_str(&format!(" AND {col} = ?{}", args.len()));
        }
    }
    if let Some(rule) = given(&f.rule) {
        // `rules` is a JSON array of strings: the id between its quotes.
        args.push(Arg::Text(format!(
            "%\"{}\"%",
            like_text(&rule.replace('"', ""))
        )));
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM exchanges e WHERE e.node = s.node AND e.session = s.id AND e.rules {like} ?{} ESCAPE '\\')",
            args.len()
        ));
    }
    if let Some(q) = given(&f.q) {
        args.push(Arg::Text(format!("%{}%", like_text(q))));
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM exchanges e WHERE e.node = s.node AND e.session = s.id AND e.record {like} ?{} ESCAPE '\\')",
            args.len()
        ));
    }
    if let Some(from) = f.from_ms {
        args.push(Arg::int(from)?);
        sql.push_str(&format!(" AND s.started_at_ms >= ?{}", args.len()));
    }
    if let Some(to) = f.to_ms {
        args.push(Arg::int(to)?);
        sql.push_str(&format!(" AND s.started_at_ms <= ?{}", args.len()));
    }
    let page = f.page.unwrap_or(0);
    sql.push_str(&format!(
        " ORDER BY s.started_at_ms DESC, s.node, s.id DESC LIMIT {PAGE} OFFSET {}",
        u64::from(page) * u64::from(PAGE)
    ));
    Ok((sql, args))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Store {
    /// The embedded store: a SQLite file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            db: Backend::Sqlite(sqlite::Sqlite::open(path)?),
        })
    }

    /// A PostgreSQL database, by URL (`postgres://user@host/db`) or
    /// libpq key/value string; its schema is brought up to date.
    pub fn open_postgres(url: &str) -> Result<Self, StoreError> {
        Ok(Self {
            db: Backend::Postgres(Box::new(pg::Postgres::open(url)?)),
        })
    }

    /// The store `--store` names: a `postgres://` (or `postgresql://`)
    /// URL, `sqlite:PATH`, or nothing for the SQLite file at
    /// `default_sqlite`. Blocks (connects, migrates): call it off the
    /// async runtime.
    pub fn open_location(
        location: Option<&str>,
        default_sqlite: &Path,
    ) -> Result<Self, StoreError> {
        match location.map(str::trim).filter(|s| !s.is_empty()) {
            None => Self::open(default_sqlite),
            Some(l) if l.starts_with("postgres://") || l.starts_with("postgresql://") => {
                Self::open_postgres(l)
            }
            Some(l) if l.starts_with("sqlite:") => Self::open(Path::new(&l["sqlite:".len()..])),
            // Not echoed: a mistyped URL may still carry a password.
            Some(_) => Err(StoreError::Location(
                "--store takes postgres://user@host/db or sqlite:PATH (unset: console.db in the state directory)".into(),
            )),
        }
    }

    /// Which backend this is, for the log.
    pub fn backend(&self) -> &'static str {
        match self.db {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The node's chain head, `None` before its first event.
    pub fn head(&self, node: &str) -> Result<Option<Head>, StoreError> {
        let row = self.db.read(|ex| {
            first(
                ex,
                "SELECT head_seq, head_hash, chain_state, chain_detail FROM nodes WHERE name = ?1",
                &[Arg::text(node)],
                |r| Ok((r.u64(0)?, r.text(1)?, r.text(2)?, r.opt_text(3)?)),
            )
        })?;
        row.map(|(seq, hash, state, detail)| {
            Ok(Head {
                seq,
                hash: hex32(&hash)?,
                state: ChainState::parse(&state).unwrap_or(ChainState::Broken),
                detail,
            })
        })
        .transpose()
    }

    /// The hash already stored for (node, seq).
    pub fn held(&self, node: &str, seq: u64) -> Result<Option<Hash>, StoreError> {
        let h = self.db.read(|ex| {
            first(
                ex,
                "SELECT hash FROM events WHERE node = ?1 AND seq = ?2",
                &[Arg::text(node), Arg::int(seq)?],
                |r| r.text(0),
            )
        })?;
        h.map(|h| hex32(&h)).transpose()
    }

    /// Stores an event (unless `store_event` is false: a conflicting
    /// re-publication is never stored over the evidence), the node's new
    /// head, and the event's projection, in one transaction.
    pub fn apply(
        &self,
        line: &Line,
        head: &Head,
        store_event: bool,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.db.write(|ex| {
            ex.execute(
                "INSERT INTO nodes (name, first_seen_ms, last_event_ms, head_seq, head_hash, chain_state, chain_detail, events)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0)
                 ON CONFLICT (name) DO UPDATE SET last_event_ms = excluded.last_event_ms,
                   head_seq = excluded.head_seq, head_hash = excluded.head_hash,
                   chain_state = excluded.chain_state, chain_detail = excluded.chain_detail",
                &[
                    Arg::text(&line.node),
                    Arg::int(now_ms)?,
                    Arg::int(line.at_ms)?,
                    Arg::int(head.seq)?,
                    Arg::Text(hex::encode(head.hash)),
                    Arg::text(head.state.as_str()),
                    Arg::OptText(head.detail.clone()),
                ],
            )?;
            if store_event {
                let added = ex.execute(
                    "INSERT INTO events (node, seq, hash, prev, at_ms, connection, kind, actor, body)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT DO NOTHING",
                    &[
                        Arg::text(&line.node),
                        Arg::int(line.seq)?,
                        Arg::Text(hex::encode(line.hash)),
                        Arg::Text(hex::encode(line.prev)),
                        Arg::int(line.at_ms)?,
                        Arg::int(line.connection)?,
                        Arg::text(&line.kind),
                        Arg::text(&line.actor),
                        Arg::Bytes(line.body.clone()),
                    ],
                )?;
                // Counted as stored: an event already held is not a new one.
                if added > 0 {
                    ex.execute(
                        "UPDATE nodes SET events = events + 1 WHERE name = ?1",
                        &[Arg::text(&line.node)],
                    )?;
                }
                project(ex, line)?;
            }
            Ok(())
        })
    }

    /// The node's checkpoint key: enrolled by an admin, or pinned on
    /// first sight (`source` says which).
    pub fn node_key(&self, node: &str) -> Result<Option<NodeKey>, StoreError> {
        self.db.read(|ex| {
            first(
                ex,
                "SELECT kid, ed25519, source, at_ms FROM node_keys WHERE node = ?1",
                &[Arg::text(node)],
                |r| {
                    Ok(NodeKey {
                        kid: r.text(0)?,
                        ed25519: r.text(1)?,
                        source: r.text(2)?,
                        at_ms: r.u64(3)?,
                    })
                },
            )
        })
    }

    /// Keeps `key` as the node's unless one is already kept; returns the
    /// one in force.
    pub fn pin_key(&self, node: &str, key: &NodeKey) -> Result<NodeKey, StoreError> {
        self.db.write(|ex| {
            ex.execute(
                "INSERT INTO node_keys (node, kid, ed25519, source, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT DO NOTHING",
                &[
                    Arg::text(node),
                    Arg::text(&key.kid),
                    Arg::text(&key.ed25519),
                    Arg::text(&key.source),
                    Arg::int(key.at_ms)?,
                ],
            )?;
            Ok(())
        })?;
        self.node_key(node)?.ok_or(StoreError::Column(0))
    }

    /// An admin's word on the node's key: replaces whatever was pinned.
    pub fn enroll_key(&self, node: &str, key: &NodeKey) -> Result<(), StoreError> {
        self.db.write(|ex| {
            ex.execute(
                "INSERT INTO node_keys (node, kid, ed25519, source, at_ms) VALUES (?1, ?2, ?3, 'enrolled', ?4)
                 ON CONFLICT (node) DO UPDATE SET kid = excluded.kid, ed25519 = excluded.ed25519,
                   source = 'enrolled', at_ms = excluded.at_ms",
                &[
                    Arg::text(node),
                    Arg::text(&key.kid),
                    Arg::text(&key.ed25519),
                    Arg::int(key.at_ms)?,
                ],
            )?;
            Ok(())
        })
    }

    /// The node's events from `from` to `to` (inclusive), in order, as
    /// shipped; what an export's proof is built from.
    pub fn events_between(
        &self,
        node: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<EventRow>, StoreError> {
        self.db.read(|ex| {
            rows(
                ex,
                "SELECT seq, hash, prev, at_ms, connection, kind, body FROM events
                 WHERE node = ?1 AND seq >= ?2 AND seq <= ?3 ORDER BY seq",
                &[Arg::text(node), Arg::int(from)?, Arg::int(to)?],
                event_row,
            )
        })
    }

    /// The first and last sequence numbers of a connection's events.
    pub fn session_span(&self, node: &str, id: u64) -> Result<Option<(u64, u64)>, StoreError> {
        self.db.read(|ex| {
            first(
                ex,
                "SELECT MIN(seq), MAX(seq) FROM events WHERE node = ?1 AND connection = ?2",
                &[Arg::text(node), Arg::int(id)?],
                |r| Ok(r.opt_u64(0)?.zip(r.opt_u64(1)?)),
            )
            .map(Option::flatten)
        })
    }

    /// The first checkpoint at or after event `seq`.
    pub fn checkpoint_from(&self, node: &str, seq: u64) -> Result<Option<Checkpoint>, StoreError> {
        self.db.read(|ex| {
            first(
                ex,
                "SELECT n, seq, head, at_ms, kid, sig FROM checkpoints
                 WHERE node = ?1 AND seq >= ?2 ORDER BY seq, n LIMIT 1",
                &[Arg::text(node), Arg::int(seq)?],
                |r| {
                    Ok(Checkpoint {
                        n: r.u64(0)?,
                        seq: r.u64(1)?,
                        head: r.text(2)?,
                        at_ms: r.u64(3)?,
                        kid: r.text(4)?,
                        sig: r.text(5)?,
                    })
                },
            )
        })
    }

    /// Stores a verified checkpoint (a re-delivery changes nothing).
    pub fn add_checkpoint(&self, node: &str, cp: &Checkpoint) -> Result<(), StoreError> {
        self.db.write(|ex| {
            ex.execute(
                "INSERT INTO checkpoints (node, n, seq, head, at_ms, kid, sig) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT DO NOTHING",
                &[
                    Arg::text(node),
                    Arg::int(cp.n)?,
                    Arg::int(cp.seq)?,
                    Arg::text(&cp.head),
                    Arg::int(cp.at_ms)?,
                    Arg::text(&cp.kid),
                    Arg::text(&cp.sig),
                ],
            )?;
            Ok(())
        })
    }

    /// The checkpoints covering event `seq` of the node: (number, head).
    pub fn checkpoints_at(&self, node: &str, seq: u64) -> Result<Vec<(u64, String)>, StoreError> {
        self.db.read(|ex| {
            rows(
                ex,
                "SELECT n, head FROM checkpoints WHERE node = ?1 AND seq = ?2",
                &[Arg::text(node), Arg::int(seq)?],
                |r| Ok((r.u64(0)?, r.text(1)?)),
            )
        })
    }

    /// The node's newest checkpoint: (number, seq, at_ms).
    pub fn last_checkpoint(&self, node: &str) -> Result<Option<(u64, u64, u64)>, StoreError> {
        self.db.read(|ex| {
            first(
                ex,
                "SELECT n, seq, at_ms FROM checkpoints WHERE node = ?1 ORDER BY n DESC LIMIT 1",
                &[Arg::text(node)],
                |r| Ok((r.u64(0)?, r.u64(1)?, r.u64(2)?)),
            )
        })
    }

    /// Marks the node's chain broken (keeping the first problem's words
    /// if it already is); false if the node has no events here yet.
    pub fn break_chain(&self, node: &str, detail: &str) -> Result<bool, StoreError> {
        self.db.write(|ex| {
            let n = ex.execute(
                "UPDATE nodes SET chain_state = 'broken',
                   chain_detail = CASE WHEN chain_state = 'broken' THEN chain_detail ELSE ?2 END
                 WHERE name = ?1",
                &[Arg::text(node), Arg::text(detail)],
            )?;
            Ok(n > 0)
        })
    }

    /// A message on the stream that is not an event (kept so that it is
    /// seen; the node it claims cannot be trusted).
    pub fn ingest_error(
        &self,
        stream_seq: Option<u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.db.write(|ex| {
            ex.execute(
                "INSERT INTO ingest_errors (at_ms, stream_seq, reason) VALUES (?1, ?2, ?3)",
                &[
                    Arg::int(now_ms)?,
                    Arg::opt_int(stream_seq)?,
                    Arg::text(reason),
                ],
            )
        })?;
        Ok(())
    }

    pub fn sessions(&self, f: &Filter) -> Result<Vec<SessionRow>, StoreError> {
        let (sql, args) = sessions_query(f, self.db.like())?;
        self.db.read(|ex| rows(ex, &sql, &args, session_row))
    }

    pub fn session(
        &self,
        node: &str,
        id: u64,
    ) -> Result<Option<(SessionRow, Vec<ExchangeRow>)>, StoreError> {
        let key = || Ok::<_, StoreError>([Arg::text(node), Arg::int(id)?]);
        self.db.read(|ex| {
            let s = first(
                ex,
                &format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions s WHERE s.node = ?1 AND s.id = ?2"
                ),
                &key()?,
                session_row,
            )?;
            let Some(s) = s else {
                return Ok(None);
            };
            let exchanges = rows(
                ex,
                "SELECT protocol, seq, state, started_at_ms, summary, status, rules, record
                 FROM exchanges WHERE node = ?1 AND session = ?2 ORDER BY started_at_ms, seq",
                &key()?,
                |r| {
                    Ok(ExchangeRow {
                        protocol: r.text(0)?,
                        seq: r.u64(1)?,
                        state: r.opt_text(2)?,
                        started_at_ms: r.u64(3)?,
                        summary: r.text(4)?,
                        status: r.opt_text(5)?,
                        rules: serde_json::from_str(&r.text(6)?).unwrap_or_default(),
                        record: serde_json::from_str(&r.text(7)?)
                            .unwrap_or(serde_json::Value::Null),
                    })
                },
            )?;
            Ok(Some((s, exchanges)))
        })
    }

    pub fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        self.db.read(|ex| {
            rows(
                ex,
                "SELECT n.name, n.first_seen_ms, n.last_event_ms, n.head_seq, n.chain_state, n.chain_detail, n.events,
                   k.kid, k.source,
                   (SELECT MAX(c.n) FROM checkpoints c WHERE c.node = n.name),
                   (SELECT MAX(c.seq) FROM checkpoints c WHERE c.node = n.name)
                 FROM nodes n LEFT JOIN node_keys k ON k.node = n.name ORDER BY n.name",
                &[],
                |r| {
                    Ok(NodeRow {
                        name: r.text(0)?,
                        first_seen_ms: r.u64(1)?,
                        last_event_ms: r.u64(2)?,
                        head_seq: r.u64(3)?,
                        chain_state: r.text(4)?,
                        chain_detail: r.opt_text(5)?,
                        events: r.u64(6)?,
                        key_kid: r.opt_text(7)?,
                        key_source: r.opt_text(8)?,
                        checkpoint_n: r.opt_u64(9)?,
                        checkpoint_seq: r.opt_u64(10)?,
                    })
                },
            )
        })
    }

    pub fn node(&self, name: &str) -> Result<Option<NodeRow>, StoreError> {
        Ok(self.nodes()?.into_iter().find(|n| n.name == name))
    }

    /// Retention: forgets sessions that started before `cutoff_ms`, with
    /// their exchanges and the events of those connections. Nodes and
    /// their chain heads stay (a later event still links to the head), so
    /// retention never turns into a gap or a break; so does the audit
    /// trail (who approved what outlives the sessions it was about).
    /// Returns the sessions forgotten.
    pub fn retain(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        self.db.write(|ex| {
            let cutoff = || Arg::int(cutoff_ms);
            ex.execute(
                "DELETE FROM events WHERE (node, connection) IN
                   (SELECT node, id FROM sessions WHERE started_at_ms < ?1)",
                &[cutoff()?],
            )?;
            ex.execute(
                "DELETE FROM exchanges WHERE (node, session) IN
                   (SELECT node, id FROM sessions WHERE started_at_ms < ?1)",
                &[cutoff()?],
            )?;
            let n = ex.execute(
                "DELETE FROM sessions WHERE started_at_ms < ?1",
                &[cutoff()?],
            )?;
            ex.execute("DELETE FROM ingest_errors WHERE at_ms < ?1", &[cutoff()?])?;
            Ok(n as usize)
        })
    }

    /// Records what a console user did: `who` (their login) in `role`
    /// did `action` (`approve`, `deny`, `suspend` …) to `subject` (an
    /// approval id, an identity), with whatever else is worth keeping in
    /// `detail`.
    pub fn audit(
        &self,
        at_ms: u64,
        who: &str,
        role: &str,
        action: &str,
        subject: &str,
        detail: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.db.write(|ex| {
            ex.execute(
                "INSERT INTO audit (at_ms, who, role, action, subject, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                &[
                    Arg::int(at_ms)?,
                    Arg::text(who),
                    Arg::text(role),
                    Arg::text(action),
                    Arg::text(subject),
                    Arg::Text(detail.to_string()),
                ],
            )
        })?;
        Ok(())
    }

    /// The latest `limit` audit records, newest first.
    pub fn audits(&self, limit: usize) -> Result<Vec<AuditRow>, StoreError> {
        let limit = Arg::int(
            u64::try_from(limit)
                .unwrap_or(u64::MAX)
                .min(i64::MAX as u64),
        )?;
        self.db.read(|ex| {
            rows(
                ex,
                "SELECT id, at_ms, who, role, action, subject, detail FROM audit
                 ORDER BY at_ms DESC, id DESC LIMIT ?1",
                std::slice::from_ref(&limit),
                |r| {
                    let detail = r.text(6)?;
                    Ok(AuditRow {
                        id: r.u64(0)?,
                        at_ms: r.u64(1)?,
                        who: r.text(2)?,
                        role: r.text(3)?,
                        action: r.text(4)?,
                        subject: r.text(5)?,
                        // Written as JSON by `audit`; kept as text if not.
                        detail: serde_json::from_str(&detail)
                            .unwrap_or(serde_json::Value::String(detail)),
                    })
                },
            )
        })
    }
}

fn session_row(r: &dyn Row) -> Result<SessionRow, StoreError> {
    Ok(SessionRow {
        node: r.text(0)?,
        id: r.u64(1)?,
        identity: r.text(2)?,
        ci_system: r.opt_text(3)?,
        repository: r.opt_text(4)?,
        run_id: r.opt_text(5)?,
        job: r.opt_text(6)?,
        actor: r.opt_text(7)?,
        target: r.opt_text(8)?,
        comm: r.opt_text(9)?,
        started_at_ms: r.u64(10)?,
        ended_at_ms: r.opt_u64(11)?,
        outcome: r.opt_text(12)?,
        exchanges: r.u64(13)?,
    })
}

/// Updates the searchable projection from one event: the latest record
/// of a connection, exchange or statement replaces the earlier one (a
/// record's events carry it whole). Bodies that are not JSON objects of
/// the known kinds are evidence only.
fn project(ex: &mut dyn Exec, line: &Line) -> Result<(), StoreError> {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&line.body) else {
        return Ok(());
    };
    let family = line.kind.split('.').next().unwrap_or("");
    match family {
        "connection" => {
            let id = body["id"].as_u64().unwrap_or(line.connection);
            let ci = &body["identity"]["ci"];
            ex.execute(
                "INSERT INTO sessions (node, id, identity, ci_system, repository, run_id, job, actor, target, comm,
                                       started_at_ms, ended_at_ms, outcome, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT (node, id) DO UPDATE SET identity = excluded.identity,
                   ci_system = excluded.ci_system, repository = excluded.repository,
                   run_id = excluded.run_id, job = excluded.job, actor = excluded.actor,
                   target = excluded.target, comm = excluded.comm,
                   started_at_ms = excluded.started_at_ms, ended_at_ms = excluded.ended_at_ms,
                   outcome = excluded.outcome, record = excluded.record",
                &[
                    Arg::text(&line.node),
                    Arg::int(id)?,
                    Arg::text(body["identity"]["id"].as_str().unwrap_or(&line.actor)),
                    Arg::OptText(text(&ci["system"])),
                    Arg::OptText(text(&ci["repository"])),
                    Arg::OptText(text(&ci["run_id"])),
                    Arg::OptText(text(&ci["job"])),
                    Arg::OptText(text(&ci["actor"])),
                    Arg::OptText(text(&body["target"])),
                    Arg::OptText(text(&body["process"]["comm"])),
                    Arg::int(body["started_at_ms"].as_u64().unwrap_or(line.at_ms))?,
                    Arg::opt_int(body["ended_at_ms"].as_u64())?,
                    Arg::OptText(outcome(&body["outcome"])),
                    Arg::Text(body.to_string()),
                ],
            )?;
        }
        "exchange" | "statement" => {
            let http = family == "exchange";
            let summary = if http {
                format!(
                    "{} {}{}",
                    body["method"].as_str().unwrap_or("?"),
                    body["authority"].as_str().unwrap_or(""),
                    body["path"].as_str().unwrap_or("")
                )
            } else {
                body["db_query"].as_str().unwrap_or("").to_owned()
            };
            let status = if http {
                text(&body["status"])
            } else {
                text(&body["sqlstate"]).or_else(|| text(&body["command_tag"]))
            };
            let rules: Vec<String> = body["decisions"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .filter_map(|d| d["rule"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            ex.execute(
                "INSERT INTO exchanges (node, session, protocol, seq, state, started_at_ms, summary, status, rules, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (node, session, protocol, seq) DO UPDATE SET state = excluded.state,
                   summary = excluded.summary, status = excluded.status, rules = excluded.rules,
                   record = excluded.record",
                &[
                    Arg::text(&line.node),
                    Arg::int(body["session"].as_u64().unwrap_or(line.connection))?,
                    Arg::text(if http { "http" } else { "sql" }),
                    Arg::int(body["seq"].as_u64().unwrap_or(0))?,
                    Arg::OptText(text(&body["state"])),
                    Arg::int(body["started_at_ms"].as_u64().unwrap_or(line.at_ms))?,
                    Arg::Text(summary),
                    Arg::OptText(status),
                    Arg::Text(serde_json::to_string(&rules).unwrap_or_else(|_| "[]".into())),
                    Arg::Text(body.to_string()),
                ],
            )?;
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
impl Store {
    /// The plan the backend picks for a search, as text (SQLite's
    /// `EXPLAIN QUERY PLAN`, PostgreSQL's `EXPLAIN` with sequential
    /// scans priced out: a test's tables are too small for an index to
    /// win on cost, and the question is whether one applies at all).
    fn plan(&self, f: &Filter) -> Result<String, StoreError> {
        let (sql, args) = sessions_query(f, self.db.like())?;
        let lines = match &self.db {
            Backend::Sqlite(_) => self.db.read(|ex| {
                rows(ex, &format!("EXPLAIN QUERY PLAN {sql}"), &args, |r| {
                    r.text(3)
                })
            })?,
            Backend::Postgres(_) => self.db.write(|ex| {
                ex.execute("SET LOCAL enable_seqscan = off", &[])?;
                rows(ex, &format!("EXPLAIN {sql}"), &args, |r| r.text(0))
            })?,
        };
        Ok(lines.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_evidence::chain::{content_digest, link_hash, GENESIS};

    fn line(seq: u64, prev: Hash, connection: u64, kind: &str, body: &str) -> Line {
        let body = body.as_bytes().to_vec();
        let hash = link_hash(&prev, seq, &content_digest(seq, connection, kind, &body));
        Line {
            seq,
            prev,
            hash,
            at_ms: seq,
            connection,
            kind: kind.into(),
            node: "n1".into(),
            actor: "wl-1".into(),
            body,
        }
    }

    /// Runs a test on a fresh store of each backend: a SQLite file and a
    /// database on a throwaway PostgreSQL cluster. No PostgreSQL is a
    /// failure, not a skip (CI has it: scripts/setup.sh).
    fn each_backend(test: impl Fn(&Store)) {
        {
            let dir = tempfile::tempdir().unwrap();
            let st = Store::open(&dir.path().join("c.db")).unwrap();
            eprintln!("backend: sqlite");
            test(&st);
        }
        let db = testpg::database();
        let st = Store::open_postgres(&db.url).unwrap();
        eprintln!("backend: postgres");
        test(&st);
    }

    fn load(st: &Store) {
        let bodies = [
            (
                1,
                "connection.open",
                r#"{"id":1,"identity":{"id":"wl-1","ci":{"system":"github-actions","repository":"acme/old","run_id":"77","job":"build","actor":"bob"}},"started_at_ms":1000,"outcome":"open"}"#,
            ),
            (
                1,
                "exchange.completed",
                r#"{"session":1,"seq":0,"method":"GET","authority":"a","path":"/x","status":200,"started_at_ms":1001,"decisions":[{"rule":"mask-secrets"}],"response_body":{"text":"Needle here, 100% sure"}}"#,
            ),
            (
                2,
                "connection.open",
                r#"{"id":2,"identity":{"id":"wl-2","ci":{"repository":"acme/new"}},"started_at_ms":900000,"outcome":{"status":"refused","reason":"identity suspended"}}"#,
            ),
        ];
        let mut prev = GENESIS;
        for (seq, (conn, kind, body)) in bodies.iter().enumerate() {
            let l = line(seq as u64, prev, *conn, kind, body);
            let head = Head {
                seq: l.seq,
                hash: l.hash,
                state: ChainState::Verified,
                detail: None,
            };
            st.apply(&l, &head, true, 5).unwrap();
            prev = l.hash;
        }
    }

    #[test]
    fn sessions_are_projected_searched_and_retained_by_age() {
        each_backend(|st| {
            load(st);
            let f = |q: Filter| st.sessions(&q).unwrap();
            let q = |q: &str| {
                f(Filter {
                    q: Some(q.into()),
                    ..Default::default()
                })
                .len()
            };
            assert_eq!(f(Filter::default()).len(), 2);
            let old = f(Filter {
                repository: Some("acme/old".into()),
                ..Default::default()
            });
            assert_eq!((old.len(), old[0].exchanges), (1, 1));
            assert_eq!(old[0].actor.as_deref(), Some("bob"));
            assert_eq!(q("needle"), 1, "free text ignores case");
            assert_eq!(q("100% sure"), 1, "a % in the text is found as itself");
            assert_eq!(q("%"), 1);
            assert_eq!(q("1_0"), 0, "LIKE wildcards are text");
            assert_eq!(q("needle%sure"), 0, "LIKE wildcards are text");
            let rule = |r: &str| {
                f(Filter {
                    rule: Some(r.into()),
                    ..Default::default()
                })
                .len()
            };
            assert_eq!(rule("mask-secrets"), 1);
            assert_eq!(rule("mask_secrets"), 0, "a rule id is matched as written");
            assert_eq!(rule("mask"), 0, "a whole rule id");
            let new = f(Filter {
                repository: Some("acme/new".into()),
                ..Default::default()
            });
            assert_eq!(
                new[0].outcome.as_deref(),
                Some("refused: identity suspended")
            );
            assert_eq!(
                f(Filter {
                    from_ms: Some(2000),
                    ..Default::default()
                })[0]
                    .id,
                2
            );
            let (s, ex) = st.session("n1", 1).unwrap().unwrap();
            assert_eq!((s.id, ex.len()), (1, 1));
            assert_eq!(ex[0].rules, ["mask-secrets"]);
            assert_eq!(ex[0].summary, "GET a/x");
            assert_eq!(ex[0].record["status"], 200);
            assert!(st.session("n1", 9).unwrap().is_none());
            let n = st.node("n1").unwrap().unwrap();
            assert_eq!((n.events, n.head_seq, n.first_seen_ms), (3, 2, 5));

            st.ingest_error(Some(4), "not an event", 1).unwrap();
            assert_eq!(st.retain(10_000).unwrap(), 1);
            assert_eq!(f(Filter::default()).len(), 1);
            assert!(st.held("n1", 0).unwrap().is_none() && st.held("n1", 2).unwrap().is_some());
            assert!(st.session("n1", 1).unwrap().is_none());
            let head = st.head("n1").unwrap().unwrap();
            assert_eq!(
                (head.seq, head.state),
                (2, ChainState::Verified),
                "the head stays"
            );
            assert_eq!(st.retain(10_000).unwrap(), 0, "retention is idempotent");
        });
    }

    #[test]
    fn a_duplicate_event_is_not_stored_or_counted_twice() {
        each_backend(|st| {
            let l = line(0, GENESIS, 1, "connection.open", r#"{"id":1}"#);
            let head = Head {
                seq: 0,
                hash: l.hash,
                state: ChainState::Verified,
                detail: None,
            };
            st.apply(&l, &head, true, 5).unwrap();
            st.apply(&l, &head, true, 6).unwrap();
            let n = st.node("n1").unwrap().unwrap();
            assert_eq!(n.events, 1);
            assert_eq!(st.held("n1", 0).unwrap(), Some(l.hash));
            assert_eq!(st.sessions(&Filter::default()).unwrap().len(), 1);
        });
    }

    #[test]
    fn audit_records_are_kept_and_listed_newest_first() {
        each_backend(|st| {
            assert!(st.audits(10).unwrap().is_empty());
            let detail = serde_json::json!({"reason": "looks fine", "ttl_s": 600});
            st.audit(10, "alice", "approver", "approve", "apr-1", &detail)
                .unwrap();
            st.audit(
                30,
                "bob",
                "admin",
                "suspend",
                "wl-9",
                &serde_json::json!(null),
            )
            .unwrap();
            st.audit(
                20,
                "alice",
                "approver",
                "deny",
                "apr-2",
                &serde_json::json!({}),
            )
            .unwrap();
            let all = st.audits(10).unwrap();
            let order: Vec<_> = all.iter().map(|a| a.action.as_str()).collect();
            assert_eq!(order, ["suspend", "deny", "approve"]);
            let a = &all[2];
            assert_eq!(
                (a.at_ms, a.who.as_str(), a.role.as_str(), a.subject.as_str()),
                (10, "alice", "approver", "apr-1")
            );
            assert_eq!(a.detail, detail);
            assert_eq!(st.audits(1).unwrap().len(), 1);
            assert!(all[0].id != all[1].id);
            // Retention keeps the trail.
            st.retain(u64::MAX >> 1).unwrap();
            assert_eq!(st.audits(10).unwrap().len(), 3);
        });
    }

    #[test]
    fn the_searches_use_their_indexes() {
        each_backend(|st| {
            load(st);
            let by = |f: Filter, index: &str| {
                let plan = st.plan(&f).unwrap();
                assert!(
                    plan.contains(index),
                    "{} search does not use {index}:\n{plan}",
                    st.backend()
                );
            };
            let one = |set: fn(&mut Filter)| {
                let mut f = Filter::default();
                set(&mut f);
                f
            };
            by(
                one(|f| f.repository = Some("r".into())),
                "sessions_by_repository",
            );
            by(one(|f| f.run_id = Some("1".into())), "sessions_by_run");
            by(one(|f| f.job = Some("j".into())), "sessions_by_job");
            by(one(|f| f.actor = Some("a".into())), "sessions_by_actor");
            by(
                one(|f| f.identity = Some("i".into())),
                "sessions_by_identity",
            );
            by(one(|f| f.target = Some("t".into())), "sessions_by_target");
            by(one(|f| f.from_ms = Some(1)), "sessions_by_time");
            // A node's sessions and a session's exchanges: primary keys.
            let pk = match st.backend() {
                "sqlite" => "sqlite_autoindex_exchanges_1",
                _ => "exchanges_pkey",
            };
            by(one(|f| f.q = Some("x".into())), pk);
            by(one(|f| f.rule = Some("x".into())), pk);
        });
    }

    #[test]
    fn two_consoles_opening_one_postgres_database_at_once_both_succeed() {
        let db = testpg::database();
        let start = std::sync::Arc::new(std::sync::Barrier::new(3));
        let opens: Vec<_> = (0..3)
            .map(|_| {
                let (url, start) = (db.url.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    Store::open_postgres(&url).map(|_| ())
                })
            })
            .collect();
        for o in opens {
            o.join().unwrap().unwrap();
        }
        let mut c = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
        let row = c
            .query_one("SELECT count(*), max(version) FROM schema_version", &[])
            .unwrap();
        let (n, max): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(
            (n, max),
            (pg::MIGRATIONS.len() as i64, pg::MIGRATIONS.len() as i64)
        );
        // And once more, later: nothing to do.
        Store::open_postgres(&db.url).unwrap();
    }

    #[test]
    fn the_migration_lists_are_parallel() {
        assert_eq!(sqlite::MIGRATIONS.len(), pg::MIGRATIONS.len());
    }

    #[test]
    fn sqlite_upgrades_a_version_1_file_and_refuses_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(sqlite::MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
        }
        let st = Store::open(&path).unwrap();
        st.audit(1, "a", "r", "x", "s", &serde_json::json!({}))
            .unwrap();
        drop(st);
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::Newer { found: 99, .. })
        ));
    }

    #[test]
    fn a_bad_store_location_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("c.db");
        let err = |l: &str| match Store::open_location(Some(l), &default) {
            Ok(_) => panic!("{l} opened"),
            Err(e) => e.to_string(),
        };
        assert!(err("mysql://u:secret@localhost/db").contains("--store takes"));
        assert!(!err("mysql://u:secret@localhost/db").contains("secret"));
        assert!(err("postgres://u@[::1/db").contains("PostgreSQL"));
        // Nothing listens there (a socket directory that does not exist;
        // and a loopback port that refuses).
        let nowhere = format!(
            "postgresql://u@{}/db",
            dir.path()
                .join("none")
                .display()
                .to_string()
                .replace('/', "%2F")
        );
        assert!(err(&nowhere).contains("connect"), "{}", err(&nowhere));
        assert!(err("postgres://u@127.0.0.1:1/db").contains("connect"));
        let st = Store::open_location(None, &default).unwrap();
        assert_eq!(st.backend(), "sqlite");
        let st =
            Store::open_location(Some(&format!("sqlite:{}", default.display())), &default).unwrap();
        assert_eq!(st.backend(), "sqlite");
    }

    #[test]
    fn a_postgres_outage_is_an_error_and_the_store_recovers() {
        let cluster = testpg::Cluster::start();
        let url = cluster.create_database();
        let st = Store::open_postgres(&url).unwrap();
        assert!(st.nodes().unwrap().is_empty());
        cluster.stop();
        assert!(st.nodes().is_err());
        assert!(st.audit(1, "a", "r", "x", "s", &Value::Null).is_err());
        cluster.restart();
        // Reads retry once on a fresh connection; a write may see the
        // dead one once (it is not retried: it might have committed).
        let _ = st.audit(1, "a", "r", "x", "s", &Value::Null);
        assert!(st.nodes().unwrap().is_empty());
        st.audit(2, "a", "r", "x", "s", &Value::Null).unwrap();
        assert!(!st.audits(5).unwrap().is_empty());
    }
}
