//! The console's store: every node's events as shipped (the evidence),
//! each node's chain head and state, and the projections the searches
//! and replays read (sessions, and their exchanges and statements), all
//! in one SQL schema. The embedded default is a SQLite file in the state
//! directory. Writes of one event (the event, the node's head, the
//! projection) are one transaction, so a crash never leaves a projection
//! without its evidence or a head ahead of what is stored.
use std::{path::Path, sync::Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use serde_json::Value;
use sluice_evidence::{
    chain::Hash,
    follow::{ChainState, Head},
    line::Line,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("store: {0} is not a hash")]
    BadHash(String),
}

/// Schema versions, applied in order (`PRAGMA user_version` is the last
/// one applied).
const MIGRATIONS: &[&str] = &[r#"
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
"#];

pub struct Store {
    db: Mutex<Connection>,
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

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        let version: usize = db.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = db.unchecked_transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(Self { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node's chain head, `None` before its first event.
    pub fn head(&self, node: &str) -> Result<Option<Head>, StoreError> {
        let row: Option<(u64, String, String, Option<String>)> = self
            .db()
            .query_row(
                "SELECT head_seq, head_hash, chain_state, chain_detail FROM nodes WHERE name = ?1",
                [node],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
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
        let h: Option<String> = self
            .db()
            .query_row(
                "SELECT hash FROM events WHERE node = ?1 AND seq = ?2",
                params![node, seq],
                |r| r.get(0),
            )
            .optional()?;
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
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO nodes (name, first_seen_ms, last_event_ms, head_seq, head_hash, chain_state, chain_detail, events)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0)
             ON CONFLICT(name) DO UPDATE SET last_event_ms = excluded.last_event_ms,
               head_seq = excluded.head_seq, head_hash = excluded.head_hash,
               chain_state = excluded.chain_state, chain_detail = excluded.chain_detail",
            params![
                line.node,
                now_ms,
                line.at_ms,
                head.seq,
                hex::encode(head.hash),
                head.state.as_str(),
                head.detail,
            ],
        )?;
        if store_event {
            tx.execute(
                "INSERT OR IGNORE INTO events (node, seq, hash, prev, at_ms, connection, kind, actor, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    line.node,
                    line.seq,
                    hex::encode(line.hash),
                    hex::encode(line.prev),
                    line.at_ms,
                    line.connection,
                    line.kind,
                    line.actor,
                    line.body,
                ],
            )?;
            tx.execute(
                "UPDATE nodes SET events = events + 1 WHERE name = ?1",
                [&line.node],
            )?;
            project(&tx, line)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A message on the stream that is not an event (kept so that it is
    /// seen; the node it claims cannot be trusted).
    pub fn ingest_error(
        &self,
        stream_seq: Option<u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO ingest_errors (at_ms, stream_seq, reason) VALUES (?1, ?2, ?3)",
            params![now_ms, stream_seq, reason],
        )?;
        Ok(())
    }

    pub fn sessions(&self, f: &Filter) -> Result<Vec<SessionRow>, StoreError> {
        let mut sql = String::from(
            "SELECT s.node, s.id, s.identity, s.ci_system, s.repository, s.run_id, s.job, s.actor,
                    s.target, s.comm, s.started_at_ms, s.ended_at_ms, s.outcome,
                    (SELECT count(*) FROM exchanges e WHERE e.node = s.node AND e.session = s.id)
             FROM sessions s WHERE 1 = 1",
        );
        let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
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
                args.push(Box::new(v.to_owned()));
                sql.push_str(&format!(" AND {col} = ?{}", args.len()));
            }
        }
        if let Some(rule) = given(&f.rule) {
            args.push(Box::new(format!("%\"{}\"%", rule.replace('"', ""))));
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM exchanges e WHERE e.node = s.node AND e.session = s.id AND e.rules LIKE ?{})",
                args.len()
            ));
        }
        if let Some(q) = given(&f.q) {
            let escaped = q
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            args.push(Box::new(format!("%{escaped}%")));
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM exchanges e WHERE e.node = s.node AND e.session = s.id AND e.record LIKE ?{} ESCAPE '\\')",
                args.len()
            ));
        }
        if let Some(from) = f.from_ms {
            args.push(Box::new(from));
            sql.push_str(&format!(" AND s.started_at_ms >= ?{}", args.len()));
        }
        if let Some(to) = f.to_ms {
            args.push(Box::new(to));
            sql.push_str(&format!(" AND s.started_at_ms <= ?{}", args.len()));
        }
        let page = f.page.unwrap_or(0);
        sql.push_str(&format!(
            " ORDER BY s.started_at_ms DESC, s.node, s.id DESC LIMIT {PAGE} OFFSET {}",
            u64::from(page) * u64::from(PAGE)
        ));
        let db = self.db();
        let mut stmt = db.prepare(&sql)?;
        let rows = stmt.query_map(
            rusqlite::params_from_iter(args.iter().map(|a| a.as_ref())),
            session_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn session(
        &self,
        node: &str,
        id: u64,
    ) -> Result<Option<(SessionRow, Vec<ExchangeRow>)>, StoreError> {
        let db = self.db();
        let s = db
            .query_row(
                "SELECT s.node, s.id, s.identity, s.ci_system, s.repository, s.run_id, s.job, s.actor,
                        s.target, s.comm, s.started_at_ms, s.ended_at_ms, s.outcome,
                        (SELECT count(*) FROM exchanges e WHERE e.node = s.node AND e.session = s.id)
                 FROM sessions s WHERE s.node = ?1 AND s.id = ?2",
                params![node, id],
                session_row,
            )
            .optional()?;
        let Some(s) = s else {
            return Ok(None);
        };
        let mut stmt = db.prepare(
            "SELECT protocol, seq, state, started_at_ms, summary, status, rules, record
             FROM exchanges WHERE node = ?1 AND session = ?2 ORDER BY started_at_ms, seq",
        )?;
        let rows = stmt.query_map(params![node, id], |r| {
            let rules: String = r.get(6)?;
            let record: String = r.get(7)?;
            Ok(ExchangeRow {
                protocol: r.get(0)?,
                seq: r.get(1)?,
                state: r.get(2)?,
                started_at_ms: r.get(3)?,
                summary: r.get(4)?,
                status: r.get(5)?,
                rules: serde_json::from_str(&rules).unwrap_or_default(),
                record: serde_json::from_str(&record).unwrap_or(serde_json::Value::Null),
            })
        })?;
        let ex = rows.collect::<Result<_, _>>()?;
        Ok(Some((s, ex)))
    }

    pub fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT name, first_seen_ms, last_event_ms, head_seq, chain_state, chain_detail, events
             FROM nodes ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(NodeRow {
                name: r.get(0)?,
                first_seen_ms: r.get(1)?,
                last_event_ms: r.get(2)?,
                head_seq: r.get(3)?,
                chain_state: r.get(4)?,
                chain_detail: r.get(5)?,
                events: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn node(&self, name: &str) -> Result<Option<NodeRow>, StoreError> {
        Ok(self.nodes()?.into_iter().find(|n| n.name == name))
    }

    /// Retention: forgets sessions that started before `cutoff_ms`, with
    /// their exchanges and the events of those connections. Nodes and
    /// their chain heads stay (a later event still links to the head), so
    /// retention never turns into a gap or a break. Returns the sessions
    /// forgotten.
    pub fn retain(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "DELETE FROM events WHERE EXISTS (SELECT 1 FROM sessions s
               WHERE s.node = events.node AND s.id = events.connection AND s.started_at_ms < ?1)",
            [cutoff_ms],
        )?;
        tx.execute(
            "DELETE FROM exchanges WHERE EXISTS (SELECT 1 FROM sessions s
               WHERE s.node = exchanges.node AND s.id = exchanges.session AND s.started_at_ms < ?1)",
            [cutoff_ms],
        )?;
        let n = tx.execute("DELETE FROM sessions WHERE started_at_ms < ?1", [cutoff_ms])?;
        tx.execute("DELETE FROM ingest_errors WHERE at_ms < ?1", [cutoff_ms])?;
        tx.commit()?;
        Ok(n)
    }
}

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        node: r.get(0)?,
        id: r.get(1)?,
        identity: r.get(2)?,
        ci_system: r.get(3)?,
        repository: r.get(4)?,
        run_id: r.get(5)?,
        job: r.get(6)?,
        actor: r.get(7)?,
        target: r.get(8)?,
        comm: r.get(9)?,
        started_at_ms: r.get(10)?,
        ended_at_ms: r.get(11)?,
        outcome: r.get(12)?,
        exchanges: r.get(13)?,
    })
}

/// Updates the searchable projection from one event: the latest record
/// of a connection, exchange or statement replaces the earlier one (a
/// record's events carry it whole). Bodies that are not JSON objects of
/// the known kinds are evidence only.
fn project(tx: &rusqlite::Transaction<'_>, line: &Line) -> Result<(), StoreError> {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&line.body) else {
        return Ok(());
    };
    let family = line.kind.split('.').next().unwrap_or("");
    match family {
        "connection" => {
            let id = body["id"].as_u64().unwrap_or(line.connection);
            let ci = &body["identity"]["ci"];
            tx.execute(
                "INSERT INTO sessions (node, id, identity, ci_system, repository, run_id, job, actor, target, comm,
                                       started_at_ms, ended_at_ms, outcome, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT(node, id) DO UPDATE SET identity = excluded.identity,
                   ci_system = excluded.ci_system, repository = excluded.repository,
                   run_id = excluded.run_id, job = excluded.job, actor = excluded.actor,
                   target = excluded.target, comm = excluded.comm,
                   started_at_ms = excluded.started_at_ms, ended_at_ms = excluded.ended_at_ms,
                   outcome = excluded.outcome, record = excluded.record",
                params![
                    line.node,
                    id,
                    body["identity"]["id"].as_str().unwrap_or(&line.actor),
                    text(&ci["system"]),
                    text(&ci["repository"]),
                    text(&ci["run_id"]),
                    text(&ci["job"]),
                    text(&ci["actor"]),
                    text(&body["target"]),
                    text(&body["process"]["comm"]),
                    body["started_at_ms"].as_u64().unwrap_or(line.at_ms),
                    body["ended_at_ms"].as_u64(),
                    outcome(&body["outcome"]),
                    body.to_string(),
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
            tx.execute(
                "INSERT INTO exchanges (node, session, protocol, seq, state, started_at_ms, summary, status, rules, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT(node, session, protocol, seq) DO UPDATE SET state = excluded.state,
                   summary = excluded.summary, status = excluded.status, rules = excluded.rules,
                   record = excluded.record",
                params![
                    line.node,
                    body["session"].as_u64().unwrap_or(line.connection),
                    if http { "http" } else { "sql" },
                    body["seq"].as_u64().unwrap_or(0),
                    text(&body["state"]),
                    body["started_at_ms"].as_u64().unwrap_or(line.at_ms),
                    summary,
                    status,
                    serde_json::to_string(&rules).unwrap_or_else(|_| "[]".into()),
                    body.to_string(),
                ],
            )?;
        }
        _ => {}
    }
    Ok(())
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

    #[test]
    fn sessions_are_projected_searched_and_retained_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let st = Store::open(&dir.path().join("c.db")).unwrap();
        let bodies = [
            (
                1,
                "connection.open",
                r#"{"id":1,"identity":{"id":"wl-1","ci":{"system":"github-actions","repository":"acme/old","actor":"bob"}},"started_at_ms":1000,"outcome":"open"}"#,
            ),
            (
                1,
                "exchange.completed",
                r#"{"session":1,"seq":0,"method":"GET","authority":"a","path":"/x","status":200,"started_at_ms":1001,"decisions":[{"rule":"mask-secrets"}],"response_body":{"text":"needle here"}}"#,
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
        let f = |q: Filter| st.sessions(&q).unwrap();
        assert_eq!(f(Filter::default()).len(), 2);
        let old = f(Filter {
            repository: Some("acme/old".into()),
            ..Default::default()
        });
        assert_eq!((old.len(), old[0].exchanges), (1, 1));
        assert_eq!(old[0].actor.as_deref(), Some("bob"));
        assert_eq!(
            f(Filter {
                q: Some("needle".into()),
                ..Default::default()
            })
            .len(),
            1
        );
        assert_eq!(
            f(Filter {
                q: Some("%".into()),
                ..Default::default()
            })
            .len(),
            0,
            "LIKE wildcards are text"
        );
        assert_eq!(
            f(Filter {
                rule: Some("mask-secrets".into()),
                ..Default::default()
            })
            .len(),
            1
        );
        let new = f(Filter {
            repository: Some("acme/new".into()),
            ..Default::default()
        });
        assert_eq!(
            new[0].outcome.as_deref(),
            Some("refused: identity suspended")
        );

        assert_eq!(st.retain(10_000).unwrap(), 1);
        assert_eq!(f(Filter::default()).len(), 1);
        assert!(st.held("n1", 0).unwrap().is_none() && st.held("n1", 2).unwrap().is_some());
        let head = st.head("n1").unwrap().unwrap();
        assert_eq!(
            (head.seq, head.state),
            (2, ChainState::Verified),
            "the head stays"
        );
    }
}
