//! Client → server: every statement becomes "message → verdict → record".
//! A simple query is split into its statements and each is judged (one
//! refused refuses the query string: none of it runs); the extended
//! protocol is judged at Parse and recorded per Execute, with its Bind
//! parameters. A refusal takes the refused message's place in the stream:
//! an empty query (simple) or nothing until Sync (extended), and the
//! backend pump writes the ErrorResponse where the server's answer would
//! have been, so pipelined clients stay in step and the session usable.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

use super::{
    classify,
    codec::{self, Message, Outbox, Reader},
    copy, lock, DbSession, Entry, InFlight, PgError, Portal, Prepared, Shared, MAX_IN_FLIGHT,
    MAX_NAMED,
};
use crate::{
    record::{now_ms, ExchangeState, SqlFacts, Statement},
    session::Session,
    verdict::{Denial, DenialKind, Held, Judged},
};

/// Bind parameters kept per statement, and characters per value.
const MAX_PARAMS: usize = 64;
const MAX_PARAM_CHARS: usize = 256;
/// SQL text kept per statement.
const MAX_SQL: usize = 16 * 1024;

pub struct Frontend {
    ctx: Arc<Session>,
    db: DbSession,
    flow: Shared,
    statements: HashMap<String, Prepared>,
    portals: HashMap<String, Portal>,
    /// Extended protocol after a refusal: the ErrorResponse to give at the
    /// next Sync; messages until then are dropped (as the server would).
    discarding: Option<Message>,
    out: Outbox,
    /// Where unqualified table names may resolve.
    search_path: super::search_path::SearchPath,
}

/// How long a statement with a backslash waits for the statements before
/// it to finish (`Frontend::lexed_differently`).
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Frontend {
    pub fn new(ctx: Arc<Session>, db: DbSession, flow: Shared) -> Self {
        Self {
            search_path: super::search_path::SearchPath::new(&db.user),
            ctx,
            db,
            flow,
            statements: HashMap::new(),
            portals: HashMap::new(),
            discarding: None,
            out: Outbox::with_capacity(8192),
        }
    }

    pub async fn run<R, W>(
        mut self,
        mut client: Reader<R>,
        mut server: W,
        activity: Arc<AtomicU64>,
    ) -> Result<(), PgError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let Some(msg) = client.next().await? else {
                return self.out.send(&mut server).await;
            };
            activity.fetch_add(1, Ordering::Relaxed);
            let end = msg.tag == b'X';
            self.handle(msg, &mut server).await?;
            if end {
                return self.out.send(&mut server).await;
            }
            self.out
                .send_unless_more(client.has_message(), &mut server)
                .await?;
        }
    }

    fn forward(&mut self, msg: &Message) {
        msg.encode(&mut self.out);
    }

    fn push(&self, e: Entry) -> Result<(), PgError> {
        let mut f = lock(&self.flow);
        if f.queue.len() >= MAX_IN_FLIGHT {
            return Err(PgError::Protocol(format!(
                "more than {MAX_IN_FLIGHT} statements in flight on one connection"
            )));
        }
        f.queue.push_back(e);
        Ok(())
    }

    async fn handle<W: AsyncWrite + Unpin>(
        &mut self,
        msg: Message,
        server: &mut W,
    ) -> Result<(), PgError> {
        match msg.tag {
            b'Q' => self.query(msg, server).await,
            b'P' => self.parse(msg, server).await,
            b'B' => self.bind(msg),
            b'D' => {
                if self.discarding.is_none() {
                    let mut body = &msg.body[..];
                    let kind = codec::take_bytes(&mut body, 1)?[0];
                    let name = codec::cstr(&mut body)?;
                    self.push(Entry::Describe {
                        portal: kind == b'P',
                        name,
                    })?;
                    self.forward(&msg);
                }
                Ok(())
            }
            b'E' => self.execute(msg),
            b'S' => {
                let inject = self.discarding.take();
                self.push(Entry::GroupEnd {
                    inject,
                    swallow_empty: false,
                })?;
                self.forward(&msg);
                Ok(())
            }
            b'C' => {
                if self.discarding.is_none() {
                    let mut body = &msg.body[..];
                    let kind = codec::take_bytes(&mut body, 1)?[0];
                    let name = codec::cstr(&mut body)?;
                    if kind == b'P' {
                        self.portals.remove(&name);
                        let mut f = lock(&self.flow);
                        f.portal_desc.remove(&name);
                        f.portal_statement.remove(&name);
                    } else {
                        self.statements.remove(&name);
                        lock(&self.flow).statement_desc.remove(&name);
                    }
                    self.forward(&msg);
                }
                Ok(())
            }
            b'F' => self.function_call(msg),
            // Flush, COPY data from the client, Terminate, and anything
            // else the server itself will judge.
            _ => {
                if self.discarding.is_none() || matches!(msg.tag, b'd' | b'c' | b'f' | b'X') {
                    self.forward(&msg);
                }
                Ok(())
            }
        }
    }

    fn new_record(
        &self,
        protocol: &str,
        prepared: Option<String>,
        sql: &str,
        facts: SqlFacts,
    ) -> Statement {
        // Role passwords in DCL are literals: keep the statement's shape only.
        let text = if facts.class == Some(crate::record::statement::StatementClass::Dcl) {
            pg_query::normalize(sql).unwrap_or_else(|_| "[DCL statement not kept]".into())
        } else {
            sql.to_owned()
        };
        let truncated = text.len() > MAX_SQL;
        let mut text = redact_sql(text);
        if truncated {
            let mut cut = MAX_SQL;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        Statement {
            session: self.ctx.id,
            seq: self.ctx.next_seq(),
            state: ExchangeState::Started,
            workload: self.ctx.workload().to_owned(),
            started_at_ms: now_ms(),
            db_system: "postgresql".into(),
            db_name: self.db.database.clone(),
            db_user: self.db.user.clone(),
            db_application: self.db.application.clone(),
            protocol: protocol.into(),
            prepared,
            db_query: text,
            db_query_truncated: truncated,
            db_query_parameters: Vec::new(),
            sql: facts,
            command_tag: None,
            rows_affected: None,
            rows_returned: 0,
            sqlstate: None,
            error: None,
            duration_ms: 0.0,
            decisions: Vec::new(),
        }
    }

    /// Whether the server may cut this text into tokens otherwise than
    /// the node's parser did, and why. With `standard_conforming_strings`
    /// off, a backslash escapes a quote inside '...': `SELECT '\', 'x;
    /// DROP TABLE users; --'` is one harmless SELECT to the parser and a
    /// DROP to such a server. Only text with a backslash can differ.
    /// Statements already sent may change the setting (`SET`, a function)
    /// and the server reports it only with its next ReadyForQuery, so the
    /// answer waits until the server has answered everything before this
    /// text (asked to send what it holds with a Flush). If statements ran
    /// since the last ReadyForQuery (a pipeline without Sync), the setting
    /// is unknown and the text counts as differing, as does one whose
    /// predecessors do not finish in time (fail closed).
    ///
    /// Text that is not UTF-8 differs too: in the client encodings where a
    /// multibyte character may end in an ASCII byte (GBK, Big5, SJIS...),
    /// `E'\xbf\' ; DROP ...'` closes its string on the server, whose `\`
    /// is inside a character, and not in the node, which cannot decode it.
    async fn lexed_differently<W: AsyncWrite + Unpin>(
        &mut self,
        sql: &str,
        utf8: bool,
        server: &mut W,
    ) -> Result<Option<String>, PgError> {
        if !utf8 {
            return Ok(Some(
                "the statement is not UTF-8 (client_encoding): the node cannot read it as the server will"
                    .into(),
            ));
        }
        const DIFFERS: &str = "the server may read a backslash in a string as an escape \
             (standard_conforming_strings is off) and the node's parser does not: \
             it cannot tell what this statement runs";
        if !sql.contains('\\') {
            return Ok(None);
        }
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        let mut flushed = false;
        let verdict = loop {
            let progress = {
                let mut f = lock(&self.flow);
                if f.queue.is_empty() {
                    f.waiting = false;
                    break if f.backslash_escapes {
                        Some(DIFFERS.to_owned())
                    } else if f.unreported {
                        Some(format!(
                            "{DIFFERS} (statements before it in this pipeline may have changed the setting; send a Sync first)"
                        ))
                    } else {
                        None
                    };
                }
                f.waiting = true;
                f.progress.clone()
            };
            let woken = progress.notified();
            tokio::pin!(woken);
            // Registered before looking again: no wake-up is lost between.
            woken.as_mut().enable();
            if lock(&self.flow).queue.is_empty() {
                continue;
            }
            if !flushed {
                self.forward(&Message::new(b'H', bytes::Bytes::new()));
                self.out.send(server).await?;
                flushed = true;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                lock(&self.flow).waiting = false;
                break Some(format!(
                    "{DIFFERS} (statements before it did not finish within {}s)",
                    SETTLE_TIMEOUT.as_secs()
                ));
            }
        };
        Ok(verdict)
    }

    /// The verdict stages (`verdict.rs`) for one statement. On a hold,
    /// what came before it goes to the server first; this one waits.
    async fn judge<W: AsyncWrite + Unpin>(
        &mut self,
        record: &mut Statement,
        sql: &str,
        server: &mut W,
    ) -> Result<Result<(), Denial>, PgError> {
        if let Err(d) = self.ctx.check_suspension(&mut record.decisions) {
            return Ok(Err(d));
        }
        let policy = self.ctx.policy();
        let evaluated = policy.evaluate_statement(
            &self.ctx.target,
            &self.ctx.identity,
            &record.sql,
            sql.as_bytes(),
        );
        let hold = match self.ctx.judge(evaluated, &mut record.decisions) {
            Judged::Allow => return Ok(Ok(())),
            Judged::Deny(d) => return Ok(Err(d)),
            Judged::Hold(h) => h,
        };
        self.out.send(server).await?;
        let held = Held {
            method: "SQL".into(),
            authority: self.ctx.target.clone(),
            path: self.db.database.clone(),
            preview: sql.chars().take(512).collect(),
        };
        Ok(self.ctx.hold(hold, held, &mut record.decisions).await)
    }

    /// A denial as Postgres renders it: ErrorResponse 42501.
    fn error_for(&self, r: &Denial) -> Message {
        codec::error_response(
            "ERROR",
            "42501",
            &format!(
                "sluice: statement refused by policy rule `{}`: {}",
                r.rule,
                r.text()
            ),
            Some(&format!(
                "recorded in session {} for workload {}",
                self.ctx.id,
                self.ctx.workload()
            )),
        )
    }

    /// Records statements that did not run (refused, or beside a refused one).
    fn record_refused(&self, mut records: Vec<Statement>, refused: usize, r: &Denial) {
        self.ctx.denied(r);
        for (i, mut st) in records.drain(..).enumerate() {
            st.state = ExchangeState::Complete;
            st.sqlstate = Some("42501".into());
            st.error = Some(if i == refused {
                format!("refused by `{}`: {}", r.rule, r.text())
            } else {
                format!(
                    "not run: statement {} of the same query string was refused",
                    refused + 1
                )
            });
            self.ctx.observe_statement(&st);
            if let Err(e) = self.ctx.store.put_statement(&st) {
                self.ctx.record_failed(&e);
            }
        }
        warn!(session = self.ctx.id, workload = %self.ctx.workload(), rule = %r.rule, kind = r.kind.as_str(), "statement refused");
    }

    /// A simple query string: its statements judged together; refused as
    /// one (an empty query in its place) or forwarded with their in-flight
    /// entries, after any COPY column probes.
    async fn query<W: AsyncWrite + Unpin>(
        &mut self,
        msg: Message,
        server: &mut W,
    ) -> Result<(), PgError> {
        let (sql, utf8) = codec::cstr_exact(&mut &msg.body[..])?;
        let parts = self.split_query(&sql, utf8, server).await?;
        let mut records: Vec<Statement> = parts
            .iter()
            .map(|p| self.new_record("simple", None, &p.text, p.facts.clone()))
            .collect();
        let mut refusal = self.judge_each(&parts, &mut records, server).await?;
        let policy = self.ctx.policy();
        let mask = policy.result_mask(&self.ctx.target, &self.ctx.identity);
        let mut copies: Vec<Option<copy::CopyOut>> = parts
            .iter()
            .map(|p| copy_out(&mask, &p.facts, &p.text))
            .collect();
        if let (None, Some(plan)) = (&refusal, &mask) {
            refusal = binary_copy_refusal(&copies, plan);
        }
        if refusal.is_none() {
            refusal = self.start_records(&records);
        }
        if let Some((i, r)) = refusal {
            return self.refuse_query(records, i, &r);
        }
        if let Some(plan) = &mask {
            self.probe_copies(&parts, &mut copies, plan)?;
        }
        for (st, copy) in records.into_iter().zip(copies) {
            self.push(Entry::Statement(Box::new(InFlight {
                record: st,
                started: Instant::now(),
                portal: None,
                result_formats: Vec::new(),
                desc: None,
                mask: policy.result_mask(&self.ctx.target, &self.ctx.identity),
                masked: Default::default(),
                copy_out: false,
                copy,
            })))?;
        }
        self.push(Entry::GroupEnd {
            inject: None,
            swallow_empty: false,
        })?;
        self.forward(&msg);
        Ok(())
    }

    /// A query string cut into its statements, classified, with the
    /// search path followed through them.
    async fn split_query<W: AsyncWrite + Unpin>(
        &mut self,
        sql: &str,
        utf8: bool,
        server: &mut W,
    ) -> Result<Vec<classify::Classified>, PgError> {
        let mut parts = classify::split(sql);
        if let Some(why) = self.lexed_differently(sql, utf8, server).await? {
            for p in &mut parts {
                p.facts.parse_error = Some(why.clone());
            }
        }
        // In order: a SET early in the string applies to what follows.
        for p in &mut parts {
            self.search_path.follow(&mut p.facts);
        }
        Ok(parts)
    }

    /// Judges the statements of a query string in order, up to the first
    /// refused: its index and the denial.
    async fn judge_each<W: AsyncWrite + Unpin>(
        &mut self,
        parts: &[classify::Classified],
        records: &mut [Statement],
        server: &mut W,
    ) -> Result<Option<(usize, Denial)>, PgError> {
        for (i, p) in parts.iter().enumerate() {
            if let Err(r) = self.judge(&mut records[i], &p.text, server).await? {
                return Ok(Some((i, r)));
            }
        }
        Ok(None)
    }

    /// Records the statements as started; a refusal if they cannot be.
    fn start_records(&self, records: &[Statement]) -> Option<(usize, Denial)> {
        let Err(e) = records
            .iter()
            .try_for_each(|r| self.ctx.store.start_statement(r))
        else {
            return None;
        };
        // Fail closed: what cannot be recorded is not run.
        self.ctx.record_failed(&e);
        Some((
            0,
            Denial::new(
                "not-recorded",
                DenialKind::NotRecorded,
                format!("the node cannot record this statement: {e}"),
            ),
        ))
    }

    /// A refused query string: recorded, its ErrorResponse queued, and an
    /// empty query sent in its place.
    fn refuse_query(
        &mut self,
        records: Vec<Statement>,
        refused: usize,
        r: &Denial,
    ) -> Result<(), PgError> {
        let err = self.error_for(r);
        self.record_refused(records, refused, r);
        self.push(Entry::GroupEnd {
            inject: Some(err),
            swallow_empty: true,
        })?;
        // An empty query in its place: the server answers it with
        // EmptyQueryResponse (swallowed) and ReadyForQuery, in order.
        self.forward(&Message::new(b'Q', &b"\0"[..]));
        Ok(())
    }

    /// A `COPY ... TO STDOUT` under column rules whose statement names
    /// no columns: the node asks the server first (the catalog for a
    /// table, a description for a query), once everything before is
    /// answered (nothing unsynced of the extended protocol in the way
    /// of a query of its own). One probe per such COPY of the string,
    /// all before it: a COPY whose table the string itself changes
    /// first gets rows that do not fit the columns, masked whole.
    fn probe_copies(
        &mut self,
        parts: &[classify::Classified],
        copies: &mut [Option<copy::CopyOut>],
        plan: &crate::policy::ResultMask,
    ) -> Result<(), PgError> {
        let settled = matches!(
            lock(&self.flow).queue.back(),
            None | Some(Entry::GroupEnd { .. })
        );
        if !settled {
            return Ok(());
        }
        for i in 0..copies.len() {
            // A table the same string creates first: its columns are
            // in the CREATE TABLE (no catalog has it yet).
            if let Some(c) = copies[i].as_mut().filter(|c| c.needs_probe(plan)) {
                if let Some((schema, table)) = c.table.clone() {
                    c.columns = parts[..i]
                        .iter()
                        .rev()
                        .find_map(|p| copy::created_columns(&p.text, schema.as_deref(), &table));
                }
            }
            // Only text the node read as the server will: a probe
            // wraps the job's query in one of its own.
            let Some(c) = copies[i]
                .as_ref()
                .filter(|c| c.needs_probe(plan) && parts[i].facts.parse_error.is_none())
            else {
                continue;
            };
            let (sql, described) = match (&c.table, &c.query) {
                (Some((schema, table)), _) => (copy::probe_sql(schema.as_deref(), table), false),
                (None, Some(q)) if !q.contains('\\') => (copy::describe_sql(q), true),
                _ => continue,
            };
            if sql.contains('\0') {
                continue;
            }
            let mut probe = sql.into_bytes();
            probe.push(0);
            self.push(Entry::Probe {
                columns: Vec::new(),
                failed: false,
                described,
                statement: i,
            })?;
            self.forward(&Message::new(b'Q', probe));
        }
        Ok(())
    }

    async fn parse<W: AsyncWrite + Unpin>(
        &mut self,
        msg: Message,
        server: &mut W,
    ) -> Result<(), PgError> {
        if self.discarding.is_some() {
            return Ok(());
        }
        let mut body = &msg.body[..];
        let name = codec::cstr(&mut body)?;
        let (sql, utf8) = codec::cstr_exact(&mut body)?;
        let mut facts = classify::classify(&sql);
        if let Some(why) = self.lexed_differently(&sql, utf8, server).await? {
            facts.parse_error = Some(why);
        }
        self.search_path.follow(&mut facts);
        let mut record = self.new_record(
            "extended",
            (!name.is_empty()).then(|| name.clone()),
            &sql,
            facts.clone(),
        );
        if let Err(r) = self.judge(&mut record, &sql, server).await? {
            self.discarding = Some(self.error_for(&r));
            self.record_refused(vec![record], 0, &r);
            return Ok(());
        }
        if !name.is_empty()
            && !self.statements.contains_key(&name)
            && self.statements.len() >= MAX_NAMED
        {
            return Err(PgError::Protocol(format!(
                "more than {MAX_NAMED} prepared statements on one connection"
            )));
        }
        // Log decisions are recorded with each execution.
        self.statements.insert(
            name,
            Prepared {
                sql: sql.into(),
                facts,
                decisions: record.decisions,
                path_generation: self.search_path.generation,
            },
        );
        self.forward(&msg);
        Ok(())
    }

    fn bind(&mut self, msg: Message) -> Result<(), PgError> {
        if self.discarding.is_some() {
            return Ok(());
        }
        let mut body = &msg.body[..];
        let portal = codec::cstr(&mut body)?;
        let statement = codec::cstr(&mut body)?;
        let (params, result_formats) = bind_values(&mut body)?;
        let prepared = self
            .statements
            .get(&statement)
            .cloned()
            .unwrap_or_else(|| Prepared {
                sql: format!("[prepared statement `{statement}` not seen by the node]").into(),
                facts: SqlFacts {
                    parse_error: Some("statement not prepared through the node".into()),
                    ..SqlFacts::default()
                },
                decisions: Vec::new(),
                path_generation: self.search_path.generation,
            });
        // Judged when prepared, with the schemas its unqualified tables
        // could be in then; the path has grown since: prepare it again.
        if prepared.path_generation != self.search_path.generation
            && prepared.facts.tables.iter().any(|t| !t.contains('.'))
            && self
                .ctx
                .policy()
                .has_statement_rules(&self.ctx.target, &self.ctx.identity)
        {
            let r = Denial::new(
                "search-path-changed",
                DenialKind::Uninspectable,
                "the search path changed after this statement was prepared; prepare it again so the node can judge the tables it reads",
            );
            let record = self.new_record(
                "extended",
                (!statement.is_empty()).then(|| statement.clone()),
                &prepared.sql,
                prepared.facts.clone(),
            );
            self.discarding = Some(self.error_for(&r));
            self.record_refused(vec![record], 0, &r);
            return Ok(());
        }
        if !portal.is_empty()
            && !self.portals.contains_key(&portal)
            && self.portals.len() >= MAX_NAMED
        {
            return Err(PgError::Protocol(format!(
                "more than {MAX_NAMED} portals on one connection"
            )));
        }
        {
            let mut f = lock(&self.flow);
            if f.portal_statement.len() < MAX_NAMED || f.portal_statement.contains_key(&portal) {
                f.portal_statement.insert(portal.clone(), statement.clone());
            }
            // A new Bind replaces the portal: its old description is gone.
            f.portal_desc.remove(&portal);
        }
        self.portals.insert(
            portal,
            Portal {
                statement,
                sql: prepared.sql,
                facts: prepared.facts,
                decisions: prepared.decisions,
                params,
                result_formats,
            },
        );
        self.forward(&msg);
        Ok(())
    }

    fn execute(&mut self, msg: Message) -> Result<(), PgError> {
        if self.discarding.is_some() {
            return Ok(());
        }
        let mut body = &msg.body[..];
        let portal_name = codec::cstr(&mut body)?;
        let portal = self.portals.get(&portal_name).cloned();
        let Some(portal) = portal else {
            // The server will answer "portal does not exist"; recorded too.
            let mut st = self.new_record("extended", None, "", SqlFacts::default());
            st.error = Some(format!("portal `{portal_name}` unknown to the node"));
            self.start(st, Some(portal_name), Vec::new(), "")?;
            self.forward(&msg);
            return Ok(());
        };
        let mut st = self.new_record(
            "extended",
            (!portal.statement.is_empty()).then(|| portal.statement.clone()),
            &portal.sql,
            portal.facts.clone(),
        );
        st.decisions = portal.decisions.clone();
        st.db_query_parameters = portal.params.clone();
        // Fail closed: a statement the node did not see prepared is not
        // run where blocking rules apply.
        if portal.facts.parse_error.is_some()
            && self
                .ctx
                .policy()
                .has_statement_rules(&self.ctx.target, &self.ctx.identity)
        {
            let r = Denial::new(
                "unparsable-statement",
                DenialKind::Uninspectable,
                portal.facts.parse_error.clone().unwrap_or_default(),
            );
            self.discarding = Some(self.error_for(&r));
            self.record_refused(vec![st], 0, &r);
            return Ok(());
        }
        if let Err(r) = self.ctx.check_suspension(&mut st.decisions) {
            self.discarding = Some(self.error_for(&r));
            self.record_refused(vec![st], 0, &r);
            return Ok(());
        }
        if let Err(e) = self.ctx.store.start_statement(&st) {
            self.ctx.record_failed(&e);
            let r = Denial::new(
                "not-recorded",
                DenialKind::NotRecorded,
                format!("the node cannot record this statement: {e}"),
            );
            self.discarding = Some(self.error_for(&r));
            self.record_refused(vec![st], 0, &r);
            return Ok(());
        }
        let sql = portal.sql.clone();
        self.start(st, Some(portal_name), portal.result_formats, &sql)?;
        self.forward(&msg);
        Ok(())
    }

    fn start(
        &self,
        st: Statement,
        portal: Option<String>,
        result_formats: Vec<i16>,
        sql: &str,
    ) -> Result<(), PgError> {
        let mask = self
            .ctx
            .policy()
            .result_mask(&self.ctx.target, &self.ctx.identity);
        let copy = copy_out(&mask, &st.sql, sql);
        self.push(Entry::Statement(Box::new(InFlight {
            record: st,
            started: Instant::now(),
            portal,
            result_formats,
            desc: None,
            mask,
            masked: Default::default(),
            copy_out: false,
            copy,
        })))
    }

    /// The legacy fast-path function call (large objects use it): it runs
    /// server code the node cannot read as SQL, so it is refused where
    /// rules that can block apply, and recorded like a statement (its
    /// result masked by the result rules' patterns) where none do.
    fn function_call(&mut self, msg: Message) -> Result<(), PgError> {
        if self.discarding.is_some() {
            return Ok(());
        }
        let oid = codec::take_i32(&mut &msg.body[..]).unwrap_or(0);
        let st = self.new_record(
            "function-call",
            None,
            &format!("[fast-path function call, oid {oid}]"),
            SqlFacts::default(),
        );
        let policy = self.ctx.policy();
        let refusal = if policy.has_statement_rules(&self.ctx.target, &self.ctx.identity) {
            Some(Denial::new(
                "function-call",
                DenialKind::Uninspectable,
                "fast-path function calls are not inspected; use SELECT",
            ))
        } else if let Err(e) = self.ctx.store.start_statement(&st) {
            self.ctx.record_failed(&e);
            Some(Denial::new(
                "not-recorded",
                DenialKind::NotRecorded,
                format!("the node cannot record this statement: {e}"),
            ))
        } else {
            None
        };
        if let Some(r) = refusal {
            let err = self.error_for(&r);
            self.record_refused(vec![st], 0, &r);
            self.push(Entry::GroupEnd {
                inject: Some(err),
                swallow_empty: true,
            })?;
            self.forward(&Message::new(b'Q', &b"\0"[..]));
            return Ok(());
        }
        // Answered by FunctionCallResponse (or an error), then ReadyForQuery.
        self.start(st, None, Vec::new(), "")?;
        self.push(Entry::GroupEnd {
            inject: None,
            swallow_empty: false,
        })?;
        self.forward(&msg);
        Ok(())
    }
}

/// A Bind's parameters (the first `MAX_PARAMS`, as text for the record)
/// and its result formats.
fn bind_values(body: &mut &[u8]) -> Result<(Vec<Option<String>>, Vec<i16>), PgError> {
    let nformats = codec::take_i16(body)?.max(0) as usize;
    let mut formats = Vec::with_capacity(nformats.min(1024));
    for _ in 0..nformats {
        formats.push(codec::take_i16(body)?);
    }
    let nparams = codec::take_i16(body)?.max(0) as usize;
    let mut params = Vec::new();
    for i in 0..nparams {
        let len = codec::take_i32(body)?;
        let value = if len < 0 {
            None
        } else {
            Some(codec::take_bytes(body, len as usize)?)
        };
        if i < MAX_PARAMS {
            let binary = match formats.len() {
                0 => false,
                1 => formats[0] == 1,
                _ => formats.get(i) == Some(&1),
            };
            params.push(value.map(|v| param_text(v, binary)));
        }
    }
    let nresults = codec::take_i16(body)?.max(0) as usize;
    let mut result_formats = Vec::with_capacity(nresults.min(1024));
    for _ in 0..nresults {
        result_formats.push(codec::take_i16(body)?);
    }
    Ok((params, result_formats))
}

/// Binary rows are not rewritten: a binary COPY a column rule may
/// apply to is refused (fail closed), the query string with it.
fn binary_copy_refusal(
    copies: &[Option<copy::CopyOut>],
    plan: &crate::policy::ResultMask,
) -> Option<(usize, Denial)> {
    let i = copies
        .iter()
        .position(|c| c.as_ref().is_some_and(|c| c.binary_needs_masking(plan)))?;
    Some((
        i,
        Denial::new(
            "binary-copy-masked",
            DenialKind::Uninspectable,
            "COPY in binary format of columns under masking rules is not masked by the node; use text or CSV format",
        ),
    ))
}

/// For a COPY TO STDOUT under result masking: how it writes its rows.
fn copy_out(
    mask: &Option<crate::policy::ResultMask>,
    facts: &SqlFacts,
    sql: &str,
) -> Option<copy::CopyOut> {
    if mask.is_none() || facts.class != Some(crate::record::statement::StatementClass::Copy) {
        return None;
    }
    copy::copy_out(sql)
}

/// The built-in `secrets` pack that keeps credentials out of statement
/// records whatever the bundle says. Compiling it takes about a second of
/// CPU: done once, on a blocking thread, never on a data thread (where it
/// would stall every connection of that thread).
static REDACTION: tokio::sync::OnceCell<Option<crate::scan::Scanner>> =
    tokio::sync::OnceCell::const_new();

/// Compiles the redaction scanner if it is not yet; a session awaits this
/// before its first statement (`super::pump`), the daemon at start when it
/// has a Postgres target.
pub async fn redaction_ready() {
    warm(&REDACTION, || {
        crate::policy::builtin_pack_scanner("secrets", 64 * 1024)
            .inspect_err(
                |e| warn!(error = %e, "secrets pack unusable: statement records are not redacted"),
            )
            .ok()
    })
    .await;
}

/// `cell`'s value, built by `build` on the blocking pool: the runtime
/// thread that awaits it goes on serving its other tasks meanwhile.
async fn warm<T: Send + Sync + 'static>(
    cell: &'static tokio::sync::OnceCell<Option<T>>,
    build: fn() -> Option<T>,
) -> Option<&'static T> {
    cell.get_or_init(|| async {
        tokio::task::spawn_blocking(build)
            .await
            .unwrap_or_else(|e| {
                warn!(error = %e, "building a scanner failed");
                None
            })
    })
    .await
    .as_ref()
}

/// Spans of credentials in `text` (the secret part of each match).
fn secret_spans(text: &[u8]) -> Vec<(usize, usize)> {
    let s = match REDACTION.get() {
        Some(Some(s)) => s,
        // The pack did not compile (warned): nothing to redact with.
        Some(None) => return Vec::new(),
        // Not compiled yet (a statement before `redaction_ready`, which
        // `pump` rules out): redacted whole, fail closed.
        None => return vec![(0, text.len())],
    };
    // Unscannable text is redacted whole (fail closed).
    match s.find(text) {
        Ok(hits) => hits
            .into_iter()
            .filter(|h| h.mask_start < h.mask_end && h.mask_end <= text.len())
            .map(|h| (h.mask_start, h.mask_end))
            .collect(),
        Err(_) => vec![(0, text.len())],
    }
}

/// SQL for the record, with credentials in literals masked.
fn redact_sql(sql: String) -> String {
    let spans = secret_spans(sql.as_bytes());
    if spans.is_empty() {
        return sql;
    }
    let mut b = sql.into_bytes();
    for (a, e) in spans {
        b[a..e].fill(crate::scan::MASK);
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// A Bind parameter for the record: text capped, credential-looking
/// values (a `secrets` pack match, or long, high-entropy and unspaced)
/// kept as a fingerprint.
fn param_text(v: &[u8], binary: bool) -> String {
    if binary {
        return format!("[binary, {} bytes]", v.len());
    }
    let secretish = (v.len() >= 16 && !v.contains(&b' ') && crate::scan::entropy(v) >= 3.5)
        || !secret_spans(v).is_empty();
    if secretish {
        return format!("[credential sha256:{}]", crate::record::fingerprint(v));
    }
    let text = String::from_utf8_lossy(v);
    if text.chars().count() > MAX_PARAM_CHARS {
        let cut: String = text.chars().take(MAX_PARAM_CHARS).collect();
        format!("{cut}… [{} bytes]", v.len())
    } else {
        text.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A scanner built on first need must not stall the data thread that
    /// needs it: on a current-thread runtime (as each data thread is),
    /// another task keeps running while the build is in progress. With the
    /// build done in place, the ticker would not run once before it ended.
    #[test]
    fn a_first_build_leaves_the_data_thread_serving() {
        static CELL: tokio::sync::OnceCell<Option<u32>> = tokio::sync::OnceCell::const_new();
        static BUILDING: AtomicUsize = AtomicUsize::new(0);
        static TICKS_DURING: AtomicUsize = AtomicUsize::new(0);
        fn slow() -> Option<u32> {
            BUILDING.store(1, Ordering::SeqCst);
            // Stands for the pack's compile; ends once the ticker has run
            // while it was in progress (or after 10 s, and the test fails).
            for _ in 0..1000 {
                if TICKS_DURING.load(Ordering::SeqCst) >= 3 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            BUILDING.store(2, Ordering::SeqCst);
            Some(7)
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ticker = tokio::spawn(async {
                loop {
                    if BUILDING.load(Ordering::SeqCst) == 1 {
                        TICKS_DURING.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            });
            assert_eq!(super::warm(&CELL, slow).await, Some(&7));
            ticker.abort();
        });
        assert!(
            TICKS_DURING.load(Ordering::SeqCst) >= 3,
            "the runtime thread was blocked while the scanner was built"
        );
    }
}
