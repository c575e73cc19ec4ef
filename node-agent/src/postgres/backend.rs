//! Server → client: answers are matched to the statements in flight, in
//! order (CommandComplete, EmptyQueryResponse, PortalSuspended or
//! ErrorResponse ends one; ReadyForQuery ends a query string or a Sync
//! group, and what did not run in it is recorded as such). Rows of a
//! statement under `on: result` rules are masked on the way (`mask.rs`);
//! a refusal from the frontend is written where its answer belongs.
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    codec::{self, Message, Outbox, Reader},
    lock, mask, notice, Entry, InFlight, PgError, Shared,
};
use crate::{
    record::{Decision, ExchangeState},
    session::Session,
};

pub struct Backend {
    ctx: Arc<Session>,
    flow: Shared,
    out: Outbox,
}

impl Backend {
    pub fn new(ctx: Arc<Session>, flow: Shared) -> Self {
        Self {
            ctx,
            flow,
            out: Outbox::with_capacity(16 * 1024),
        }
    }

    pub async fn run<R, W>(
        mut self,
        mut server: Reader<R>,
        mut client: W,
        activity: Arc<AtomicU64>,
    ) -> Result<(), PgError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let Some(msg) = server.next().await? else {
                return self.out.send(&mut client).await;
            };
            activity.fetch_add(1, Ordering::Relaxed);
            let done = self.handle(msg)?;
            for mut st in done {
                finish(&self.ctx, &mut st);
            }
            self.out
                .send_unless_more(server.has_message(), &mut client)
                .await?;
        }
    }

    /// Handles one server message; returns the statements it ended (their
    /// records are written outside the lock).
    fn handle(&mut self, msg: Message) -> Result<Vec<InFlight>, PgError> {
        if msg.tag == b'D' {
            self.data_row(msg)?;
            return Ok(Vec::new());
        }
        let mut done = Vec::new();
        let mut f = lock(&self.flow);
        if matches!(f.queue.front(), Some(Entry::Probe { .. })) && probe(&mut f, &msg) {
            return Ok(done);
        }
        match msg.tag {
            b'C' => f.unreported = true,
            b'Z' => f.unreported = false,
            _ => {}
        }
        match msg.tag {
            b'T' => {
                row_description(&mut f, &msg)?;
                msg.encode(&mut self.out);
            }
            b'n' => {
                if matches!(f.queue.front(), Some(Entry::Describe { .. })) {
                    f.queue.pop_front();
                }
                msg.encode(&mut self.out);
            }
            b'H' => {
                if let Some(Entry::Statement(s)) = f.queue.front_mut() {
                    s.copy_out = true;
                }
                msg.encode(&mut self.out);
            }
            b'd' => match copy_data(&mut f, &msg)? {
                Some(body) => Message::new(b'd', body).encode(&mut self.out),
                None => msg.encode(&mut self.out),
            },
            b'C' | b's' => {
                command_complete(&mut f, &msg, &mut done)?;
                msg.encode(&mut self.out);
            }
            b'I' => match f.queue.front() {
                Some(Entry::Statement(_)) => {
                    if let Some(Entry::Statement(mut s)) = f.queue.pop_front() {
                        s.record.command_tag = Some("EMPTY".into());
                        done.push(*s);
                    }
                    msg.encode(&mut self.out);
                }
                // The empty query sent in a refused one's place.
                Some(Entry::GroupEnd {
                    swallow_empty: true,
                    ..
                }) => {}
                _ => msg.encode(&mut self.out),
            },
            b'E' => {
                // Masked before anything reads it: the record keeps what
                // the client sees.
                let msg = self.masked_text(&mut f, msg, notice::fields)?;
                error_ends(&mut f, &msg, &mut done);
                msg.encode(&mut self.out);
            }
            // FunctionCallResponse: the call's result (length, bytes).
            b'V' => function_call_response(&mut f, msg, &mut done)?.encode(&mut self.out),
            b'N' => self
                .masked_text(&mut f, msg, notice::fields)?
                .encode(&mut self.out),
            b'A' => self
                .masked_text(&mut f, msg, notice::notification)?
                .encode(&mut self.out),
            b'Z' => {
                if let Some(err) = ready_for_query(&mut f, &mut done) {
                    err.encode(&mut self.out);
                }
                msg.encode(&mut self.out);
            }
            b'S' => {
                if let Some(on) = super::backslash_escapes(&msg.body) {
                    f.backslash_escapes = on;
                }
                msg.encode(&mut self.out);
            }
            _ => msg.encode(&mut self.out),
        }
        // The frontend may be waiting for the queue to empty
        // (`Frontend::lexed_differently`).
        if f.waiting {
            f.progress.notify_waiters();
        }
        Ok(done)
    }
}

impl Backend {
    /// A DataRow: counted, and masked under its statement's result rules
    /// outside the lock the frontend also takes (it keeps judging and
    /// pushing the next statements while a wide row is scanned). Only this
    /// pump touches the front statement's mask, so it is lent out of the
    /// queue for the scan and put back with the tally.
    fn data_row(&mut self, msg: Message) -> Result<(), PgError> {
        let lent = {
            let mut f = lock(&self.flow);
            if matches!(f.queue.front(), Some(Entry::Probe { .. })) && probe(&mut f, &msg) {
                return Ok(());
            }
            let super::Flow {
                queue,
                portal_desc,
                statement_desc,
                portal_statement,
                ..
            } = &mut *f;
            match queue.front_mut() {
                Some(Entry::Statement(s)) => {
                    s.record.rows_returned += 1;
                    if s.mask.is_some() && s.desc.is_none() {
                        s.desc = describe((portal_desc, statement_desc, portal_statement), s);
                    }
                    s.mask
                        .take()
                        .map(|plan| (plan, s.desc.clone(), std::mem::take(&mut s.result_formats)))
                }
                _ => None,
            }
        };
        let Some((plan, desc, formats)) = lent else {
            msg.encode(&mut self.out);
            return Ok(());
        };
        let mut masked = std::collections::BTreeMap::new();
        let rewritten = mask::data_row(
            &msg.body,
            desc.as_deref().map(|v| &v[..]),
            &formats,
            &plan,
            &mut masked,
        );
        if let Some(Entry::Statement(s)) = lock(&self.flow).queue.front_mut() {
            s.mask = Some(plan);
            s.result_formats = formats;
            for (rule, n) in masked {
                *s.masked.entry(rule).or_default() += n;
            }
        }
        match rewritten? {
            Some(body) => Message::new(b'D', body).encode(&mut self.out),
            None => msg.encode(&mut self.out),
        }
        Ok(())
    }

    /// An error, notice or notification with the result rules' pattern
    /// matches masked: those of the statement it answers, else the rules
    /// in force (a notice or notification between statements). Matches
    /// count toward the statement's masking decision when there is one.
    fn masked_text(
        &self,
        f: &mut super::Flow,
        msg: Message,
        rewrite: notice::Rewrite,
    ) -> Result<Message, PgError> {
        let body = match f.queue.front_mut() {
            Some(Entry::Statement(s)) => {
                let s = &mut **s;
                match &s.mask {
                    Some(plan) if plan.scans() => rewrite(&msg.body, plan, &mut s.masked)?,
                    _ => None,
                }
            }
            _ => match self
                .ctx
                .policy()
                .result_mask(&self.ctx.target, &self.ctx.identity)
            {
                Some(plan) if plan.scans() => rewrite(&msg.body, &plan, &mut Default::default())?,
                _ => None,
            },
        };
        Ok(match body {
            Some(b) => Message::new(msg.tag, b),
            None => msg,
        })
    }
}

/// A message answering the node's column probe (`copy::probe_sql`):
/// taken in (`true`), or left to the usual handling (notices, parameter
/// reports). At its ReadyForQuery the columns go to the COPY after it;
/// an error or no rows leave them unknown (masked whole).
fn probe(f: &mut super::Flow, msg: &Message) -> bool {
    let Some(Entry::Probe {
        columns,
        failed,
        described,
        statement,
    }) = f.queue.front_mut()
    else {
        return false;
    };
    match msg.tag {
        b'T' if *described => match mask::row_description(&msg.body) {
            Ok(fields) => columns.extend(fields.into_iter().map(|f| f.name)),
            Err(_) => *failed = true,
        },
        b'T' | b'C' | b'I' => {}
        b'E' => *failed = true,
        b'D' if *described => *failed = true,
        b'D' => match mask::text_values(&msg.body) {
            Some(v) if v.len() == 1 && v[0].is_some() => {
                columns.extend(v.into_iter().flatten());
            }
            _ => *failed = true,
        },
        b'Z' => {
            let (columns, failed, n) = (std::mem::take(columns), *failed, *statement);
            f.queue.pop_front();
            let copy = f
                .queue
                .iter_mut()
                .filter_map(|e| match e {
                    Entry::Statement(s) => Some(s),
                    _ => None,
                })
                .nth(n)
                .and_then(|s| s.copy.as_mut());
            if let (Some(c), false, false) = (copy, failed, columns.is_empty()) {
                c.columns = Some(columns);
            }
        }
        _ => return false,
    }
    true
}

type Descs<'a> = (
    &'a std::collections::HashMap<String, Arc<Vec<super::Field>>>,
    &'a std::collections::HashMap<String, Arc<Vec<super::Field>>>,
    &'a std::collections::HashMap<String, String>,
);

/// The row description for an extended-protocol statement: its portal's
/// (Describe P), else its prepared statement's (Describe S) with the
/// Bind's result formats.
fn describe(descs: Descs<'_>, s: &InFlight) -> Option<Arc<Vec<super::Field>>> {
    let (portal_desc, statement_desc, portal_statement) = descs;
    let portal = s.portal.as_ref()?;
    if let Some(d) = portal_desc.get(portal) {
        return Some(d.clone());
    }
    let stmt = portal_statement.get(portal)?;
    let d = statement_desc.get(stmt)?;
    Some(Arc::new(mask::with_formats(d, &s.result_formats)))
}

/// Completes a statement's record (outside the flow lock).
pub fn finish(ctx: &Session, s: &mut InFlight) {
    s.record.state = ExchangeState::Complete;
    s.record.duration_ms = s.started.elapsed().as_secs_f64() * 1000.0;
    for (rule, n) in std::mem::take(&mut s.masked) {
        s.record.decisions.push(Decision {
            rule,
            action: crate::record::Action::Mask,
            patterns: vec![],
            detail: Some(format!("{n} value(s) masked in the result")),
        });
    }
    ctx.observe_statement(&s.record);
    if let Err(e) = ctx.store.put_statement(&s.record) {
        ctx.record_failed(&e);
    }
}

/// RowDescription: the columns of a described statement or portal, or of
/// the statement running (what its rows are masked by).
fn row_description(f: &mut super::Flow, msg: &Message) -> Result<(), PgError> {
    let fields = Arc::new(mask::row_description(&msg.body)?);
    match f.queue.front_mut() {
        Some(Entry::Describe { portal, name }) => {
            let (portal, name) = (*portal, std::mem::take(name));
            let map = if portal {
                &mut f.portal_desc
            } else {
                &mut f.statement_desc
            };
            // Bounded: a job describing without end only loses
            // descriptions (its rows are then masked whole).
            if map.len() >= super::MAX_NAMED && !map.contains_key(&name) {
                map.clear();
            }
            map.insert(name, fields);
            f.queue.pop_front();
        }
        Some(Entry::Statement(s)) => s.desc = Some(fields),
        _ => {}
    }
    Ok(())
}

/// CopyData of a COPY TO STDOUT: a row, rewritten when columns are masked.
fn copy_data(f: &mut super::Flow, msg: &Message) -> Result<Option<bytes::Bytes>, PgError> {
    Ok(match f.queue.front_mut() {
        Some(Entry::Statement(s)) if s.copy_out => {
            s.record.rows_returned += 1;
            let s = &mut **s;
            match s.mask.as_ref() {
                Some(plan) => s.copy.get_or_insert_with(Default::default).row(
                    &msg.body,
                    plan,
                    &mut s.masked,
                )?,
                None => None,
            }
        }
        _ => None,
    })
}

/// CommandComplete or PortalSuspended: the statement at the front ends.
fn command_complete(
    f: &mut super::Flow,
    msg: &Message,
    done: &mut Vec<InFlight>,
) -> Result<(), PgError> {
    if let Some(Entry::Statement(_)) = f.queue.front() {
        if let Some(Entry::Statement(mut s)) = f.queue.pop_front() {
            if msg.tag == b'C' {
                let tag = codec::cstr(&mut &msg.body[..])?;
                s.record.rows_affected = tag.rsplit(' ').next().and_then(|n| n.parse().ok());
                s.record.command_tag = Some(tag);
            } else {
                s.record.command_tag = Some("PORTAL SUSPENDED".into());
            }
            done.push(*s);
        }
    }
    Ok(())
}

/// ErrorResponse (already masked): the statement it answers ends with
/// its SQLSTATE, and the server skips the rest of the query string, or
/// of the pipeline until Sync.
fn error_ends(f: &mut super::Flow, msg: &Message, done: &mut Vec<InFlight>) {
    let fields = codec::error_fields(&msg.body);
    let field = |c: u8| fields.iter().find(|(k, _)| *k == c).map(|(_, v)| v.clone());
    match f.queue.front() {
        Some(Entry::Statement(_)) => {
            if let Some(Entry::Statement(mut s)) = f.queue.pop_front() {
                s.record.sqlstate = field(b'C');
                s.record.error = field(b'M');
                done.push(*s);
            }
        }
        Some(Entry::Describe { .. }) => {
            f.queue.pop_front();
        }
        _ => {}
    }
    while matches!(
        f.queue.front(),
        Some(Entry::Statement(_) | Entry::Describe { .. })
    ) {
        if let Some(Entry::Statement(mut s)) = f.queue.pop_front() {
            s.record.error = Some("not run: an earlier statement failed".into());
            done.push(*s);
        }
    }
}

/// FunctionCallResponse: the fast-path call's result (length, bytes),
/// masked by the result rules.
fn function_call_response(
    f: &mut super::Flow,
    msg: Message,
    done: &mut Vec<InFlight>,
) -> Result<Message, PgError> {
    let mut body = msg.body.to_vec();
    let answers = matches!(f.queue.front(), Some(Entry::Statement(_)));
    if let Some(Entry::Statement(mut s)) = answers.then(|| f.queue.pop_front()).flatten() {
        s.record.command_tag = Some("FUNCTION CALL".into());
        if let (Some(plan), Some(v)) = (s.mask.as_ref(), body.get_mut(4..)) {
            if plan.scans() {
                for (a, b) in mask::spans(v, plan, &mut s.masked)? {
                    v[a..b].fill(crate::scan::MASK);
                }
            }
        }
        s.record.rows_returned = 1;
        done.push(*s);
    }
    Ok(Message::new(b'V', body))
}

/// ReadyForQuery: whatever of the group the server did not answer ends
/// unrun; a refusal's ErrorResponse, if the group had one, goes before it.
fn ready_for_query(f: &mut super::Flow, done: &mut Vec<InFlight>) -> Option<Message> {
    while let Some(e) = f.queue.pop_front() {
        match e {
            Entry::Statement(mut s) => {
                s.record.error.get_or_insert_with(|| {
                    "not run: the server ended the group without running it".into()
                });
                done.push(*s);
            }
            Entry::Describe { .. } | Entry::Probe { .. } => {}
            Entry::GroupEnd { inject, .. } => return inject,
        }
    }
    None
}
