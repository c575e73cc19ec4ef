//! Following a console over NATS (`console:` in the configuration): the
//! node announces every request or statement it holds and its end, sends
//! a heartbeat, takes the console's signed decisions on what it holds,
//! and follows the fleet's signed suspension list. Nothing here trusts
//! the transport: a decision or a list counts only when signed by a key
//! in `console.keys`, of the right kind, for this node and a hold it
//! still has; anything else is refused, logged and (bounded) audited.
//! A node that cannot reach NATS keeps what it has: holds time out into
//! denials, the suspension list in force stays in force.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use sluice_fleet::{
    approval::{Ci, Held, Notice, Reply, Verdict},
    heartbeat::{Heartbeat, INTERVAL_SECS},
    signed::{self, Trusted},
    subjects,
    suspension::{List, LIST_TYP},
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    approvals::{Approvals, Change, Pending},
    decision::{Deciders, DecisionRefused},
    record::{now_ms, RecordStore},
    spool::ship::Endpoint,
    suspend::{FleetListError, Suspensions},
};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("NATS: {0}")]
    Nats(String),
}

fn nats(e: impl std::fmt::Display) -> LinkError {
    LinkError::Nats(e.to_string())
}

/// What the heartbeat reads of the node (its `sluice status`).
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

pub struct Link {
    pub node: String,
    pub endpoint: Endpoint,
    /// The console's keys: the suspension list is signed by one.
    pub trusted: Vec<Trusted>,
    /// Who may decide on what this node holds (`decision.rs`).
    pub deciders: Arc<Deciders>,
    pub suspensions_bucket: String,
    pub local_decisions: bool,
    pub approvals: Arc<Approvals>,
    pub suspensions: Arc<Suspensions>,
    pub store: Arc<RecordStore>,
    pub status: StatusFn,
}

/// Refused decisions are audited at most this often (the rest counted
/// into the next): a flood of forgeries must not fill the chain.
const REFUSAL_AUDIT_EVERY: Duration = Duration::from_secs(10);

struct Refusals {
    last: Option<Instant>,
    unaudited: u64,
}

impl Link {
    /// Runs until the process ends, reconnecting with backoff.
    pub async fn run(self: Arc<Self>) {
        let mut changes = self.approvals.changes();
        let mut refusals = Refusals {
            last: None,
            unaudited: 0,
        };
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.session(&mut changes, &mut refusals).await {
                Ok(()) => backoff = Duration::from_millis(500),
                Err(e) => {
                    warn!(error = %e, url = %self.endpoint.url, "console link interrupted; holds time out into denials, suspensions in force stay");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn session(
        &self,
        changes: &mut mpsc::Receiver<Change>,
        refusals: &mut Refusals,
    ) -> Result<(), LinkError> {
        let js = crate::spool::ship::connect(&self.endpoint)
            .await
            .map_err(nats)?;
        let client = js.client();
        let mut decisions = client
            .subscribe(subjects::decide(&self.node))
            .await
            .map_err(nats)?;
        let bucket = crate::spool::ship::kv_stream(&js, &self.suspensions_bucket)
            .await
            .map_err(nats)?;
        let list_subject =
            subjects::kv_subject(&self.suspensions_bucket, subjects::SUSPENSIONS_KEY);
        info!(url = %self.endpoint.url, node = %self.node, "following the console");
        let mut beat = tokio::time::interval(Duration::from_secs(INTERVAL_SECS));
        let mut poll = tokio::time::interval(Duration::from_secs(1));
        let mut seen_list = 0u64;
        loop {
            tokio::select! {
                msg = decisions.next() => {
                    let Some(msg) = msg else {
                        return Err(LinkError::Nats("decision subscription ended".into()));
                    };
                    let token = String::from_utf8_lossy(&msg.payload).into_owned();
                    let reply = match self.decide(&token).await {
                        Ok(m) => Reply { accepted: true, message: m },
                        Err(e) => {
                            warn!(error = %e, "console decision refused");
                            self.refused(refusals, &e).await;
                            Reply { accepted: false, message: e.to_string() }
                        }
                    };
                    if let Some(to) = msg.reply {
                        let body = serde_json::to_vec(&reply).unwrap_or_default();
                        client.publish(to, body.into()).await.map_err(nats)?;
                    }
                }
                c = changes.recv() => {
                    let Some(c) = c else { return Ok(()) };
                    let notice = match c {
                        Change::Held(p) => Notice::Held(Box::new(self.held(&p))),
                        Change::Ended(p, o) => Notice::Ended {
                            node: self.node.clone(),
                            id: p.id,
                            hold: p.hold,
                            outcome: o.word().into(),
                            by: o.decider(),
                        },
                    };
                    let body = serde_json::to_vec(&notice).unwrap_or_default();
                    client.publish(subjects::held(&self.node), body.into()).await.map_err(nats)?;
                }
                _ = beat.tick() => {
                    let hb = self.heartbeat().await;
                    let body = serde_json::to_vec(&hb).unwrap_or_default();
                    client.publish(subjects::heartbeat(&self.node), body.into()).await.map_err(nats)?;
                }
                _ = poll.tick() => {
                    match bucket.get_last_raw_message_by_subject(&list_subject).await {
                        Ok(m) if m.sequence != seen_list => {
                            seen_list = m.sequence;
                            self.follow_list(String::from_utf8_lossy(&m.payload).into_owned(), m.sequence).await;
                        }
                        Ok(_) => {}
                        // No list published yet.
                        Err(e) if e.to_string().contains("no message found") => {}
                        Err(e) => return Err(nats(e)),
                    }
                }
            }
        }
    }

    fn held(&self, p: &Pending) -> Held {
        Held {
            node: self.node.clone(),
            id: p.id,
            hold: p.hold.clone(),
            session: p.session,
            identity: p.workload.clone(),
            ci: p.ci.as_ref().map(|c| Ci {
                system: c.system.clone(),
                repository: c.repository.clone(),
                run_id: c.run_id.clone(),
                job: c.job.clone(),
                actor: c.actor.clone(),
            }),
            rule: p.rule.clone(),
            message: p.message.clone(),
            method: p.method.clone(),
            authority: p.authority.clone(),
            path: p.path.clone(),
            preview: p.preview.clone(),
            created_ms: p.created_ms,
            expires_ms: p.expires_ms,
        }
    }

    /// Verifies and applies one signed decision; says what it did.
    async fn decide(&self, token: &str) -> Result<String, DecisionRefused> {
        let (d, outcome, kid) = self.deciders.approval(&self.approvals, token)?;
        let audit = serde_json::json!({"approval": d.id, "outcome": outcome, "via": "console", "reason": d.reason});
        let Some(approval) = self.approvals.decide(d.id, outcome) else {
            return Err(DecisionRefused::NotHeld(d.id));
        };
        // The decision is on the chain (who, which key) before it is
        // answered; off the runtime, as every fsync-waited write.
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.audit("approval.decided", &audit)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot record approval decision"),
            Err(e) => warn!(error = %e, "cannot record approval decision"),
        }
        info!(approval = d.id, by = %d.by, signer = %kid, verdict = ?d.verdict, session = approval.session, workload = %approval.workload, "console decision applied");
        Ok(format!(
            "request {} {}",
            d.id,
            match d.verdict {
                Verdict::Approve => "approved",
                Verdict::Deny => "denied",
            }
        ))
    }

    async fn refused(&self, r: &mut Refusals, e: &DecisionRefused) {
        r.unaudited += 1;
        if r.last.is_some_and(|t| t.elapsed() < REFUSAL_AUDIT_EVERY) {
            return;
        }
        r.last = Some(Instant::now());
        let body = serde_json::json!({"reason": e.to_string(), "refused": r.unaudited});
        r.unaudited = 0;
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = store.audit("decision.refused", &body) {
                warn!(error = %e, "cannot record a refused decision");
            }
        })
        .await;
    }

    /// Verifies a suspension list from the bucket and puts it in force
    /// (held requests it now covers are denied).
    async fn follow_list(&self, token: String, revision: u64) {
        let (list, kid): (List, String) = match signed::verify(&token, LIST_TYP, &self.trusted) {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, revision, "suspension list refused; the list in force stays");
                return;
            }
        };
        let (s, store) = (self.suspensions.clone(), self.store.clone());
        let version = list.version;
        let applied = tokio::task::spawn_blocking(move || s.apply_fleet(&store, list, &kid)).await;
        match applied {
            Ok(Ok(added)) => {
                info!(
                    version,
                    added = added.len(),
                    "fleet suspension list in force"
                );
                for e in &added {
                    let n = self.approvals.deny_where(
                        |p| {
                            let ci = p.ci.as_ref();
                            e.covers(
                                &p.workload,
                                ci.and_then(|c| c.repository.as_deref()),
                                ci.and_then(|c| c.actor.as_deref()),
                            )
                        },
                        &format!("identity suspended: {}", e.reason),
                    );
                    if n > 0 {
                        info!(held = n, scope = e.scope.as_str(), value = %e.value, "held requests denied by a fleet suspension");
                    }
                }
            }
            // Seen again after a restart, or a replayed older list.
            Ok(Err(FleetListError::Stale { .. })) => {}
            Ok(Err(e)) => warn!(error = %e, "suspension list not applied"),
            Err(e) => warn!(error = %e, "suspension list not applied"),
        }
    }

    async fn heartbeat(&self) -> Heartbeat {
        let (status, store) = (self.status.clone(), self.store.clone());
        let (status, checkpoint) = tokio::task::spawn_blocking(move || {
            (
                status(),
                store
                    .last_checkpoint()
                    .ok()
                    .flatten()
                    .and_then(|c| serde_json::to_value(c).ok()),
            )
        })
        .await
        .unwrap_or_default();
        Heartbeat {
            node: self.node.clone(),
            at_ms: now_ms(),
            status,
            durable_seq: self.store.durable_seq(),
            checkpoint,
            node_kid: Some(self.store.node_key().kid),
            suspensions_version: self.suspensions.fleet_version(),
            local_decisions: self.local_decisions,
            held: self.approvals.list().iter().map(|p| self.held(p)).collect(),
        }
    }
}
