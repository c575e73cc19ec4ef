//! Just-in-time approvals: a request that matches an `approve` rule is
//! held here until an operator approves or denies it, over the control
//! socket (their uid is recorded) or from the console (a signed decision,
//! `console.rs`; the person and the console's key are recorded), or until
//! the rule's timeout, which means deny. Each hold and each end is told
//! to whoever follows `changes()` (the console link).
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::record::now_ms;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pending {
    pub id: u64,
    pub session: u64,
    pub workload: String,
    pub rule: String,
    pub message: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    /// The start of the request body, for the approver to judge.
    pub preview: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// A random token naming this one hold (signed decisions name it).
    #[serde(default)]
    pub hold: String,
    /// The CI job behind the identity (fleet suspensions by repository or
    /// actor deny what it holds; the console shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci: Option<crate::identity::CiJob>,
}

/// A hold began or ended.
#[derive(Clone, Debug)]
pub enum Change {
    Held(Pending),
    Ended(Pending, Outcome),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Outcome {
    Approved {
        /// Decided over the control socket by this uid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by_uid: Option<u32>,
        /// Decided from the console: who, and the key that signed it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signed: Option<SignedBy>,
    },
    Denied {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by_uid: Option<u32>,
        /// Decided from the console: who, and the key that signed it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signed: Option<SignedBy>,
        reason: String,
    },
    TimedOut,
}

/// Who decided from the console: the person its login names, and the
/// kid of the console key that signed the decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedBy {
    pub by: String,
    pub signer: String,
}

impl Outcome {
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Approved { .. } => "approved",
            Outcome::Denied { .. } => "denied",
            Outcome::TimedOut => "timed_out",
        }
    }

    /// The person or uid who decided, if anyone did.
    pub fn decider(&self) -> Option<String> {
        match self {
            Outcome::Approved { by_uid, signed } | Outcome::Denied { by_uid, signed, .. } => signed
                .as_ref()
                .map(|s| s.by.clone())
                .or_else(|| by_uid.map(|u| format!("uid {u}"))),
            Outcome::TimedOut => None,
        }
    }
}

impl Outcome {
    /// Why the held request or statement may not go on (`None`: approved).
    pub fn denial(&self, timeout_secs: u64) -> Option<String> {
        match self {
            Outcome::Approved { .. } => None,
            Outcome::Denied { reason, .. } => Some(format!("denied: {reason}")),
            Outcome::TimedOut => Some(format!("no approval within {timeout_secs}s")),
        }
    }
}

/// Requests held at once, in all and per identity: beyond, a new request
/// is denied at once (a job must not grow the queue, or bury requests an
/// operator should see, by firing held requests in a loop).
pub const MAX_PENDING: usize = 1024;
pub const MAX_PENDING_PER_IDENTITY: usize = 32;

#[derive(Default)]
pub struct Approvals {
    next: AtomicU64,
    pending: Mutex<HashMap<u64, (Pending, oneshot::Sender<Outcome>)>>,
    changes: Mutex<Option<mpsc::Sender<Change>>>,
}

/// Changes queued for the follower; beyond, they are dropped (the
/// console's heartbeat lists what is held anyway).
const CHANGES_QUEUED: usize = 1024;

impl Approvals {
    /// Every hold and end from now on (one follower: a second call takes
    /// them over).
    pub fn changes(&self) -> mpsc::Receiver<Change> {
        let (tx, rx) = mpsc::channel(CHANGES_QUEUED);
        *self.changes.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    fn tell(&self, c: Change) {
        if let Some(tx) = &*self.changes.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = tx.try_send(c);
        }
    }

    /// Holds until decided or timed out.
    pub async fn request(&self, mut p: Pending, timeout: Duration) -> Outcome {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        p.id = id;
        p.hold = crate::keys::random_token();
        p.created_ms = now_ms();
        p.expires_ms = p.created_ms + timeout.as_millis() as u64;
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let mine = pending
                .values()
                .filter(|(q, _)| q.workload == p.workload)
                .count();
            if pending.len() >= MAX_PENDING || mine >= MAX_PENDING_PER_IDENTITY {
                return Outcome::Denied {
                    by_uid: None,
                    signed: None,
                    reason: format!(
                        "approval queue full ({mine} held for this identity, {} in all; limits {MAX_PENDING_PER_IDENTITY} / {MAX_PENDING})",
                        pending.len()
                    ),
                };
            }
            pending.insert(id, (p.clone(), tx));
        }
        self.tell(Change::Held(p.clone()));
        // Whatever ends the wait — a decision, the timeout, or the client
        // going away (the connection's task drops this future) — the slot
        // is given back and the end is told.
        let mut hold = Hold {
            approvals: self,
            pending: Some(p),
            outcome: None,
        };
        let out = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(o)) => o,
            Ok(Err(_)) => Outcome::Denied {
                by_uid: None,
                signed: None,
                reason: "approval dropped".into(),
            },
            Err(_) => Outcome::TimedOut,
        };
        hold.outcome = Some(out.clone());
        out
    }

    /// The hold `id`, if it is still waiting.
    pub fn get(&self, id: u64) -> Option<Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .map(|(p, _)| p.clone())
    }

    pub fn list(&self) -> Vec<Pending> {
        let mut v: Vec<Pending> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(p, _)| p.clone())
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Delivers a decision; false if no such request is waiting.
    pub fn decide(&self, id: u64, outcome: Outcome) -> Option<Pending> {
        let (p, tx) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)?;
        let _ = tx.send(outcome);
        Some(p)
    }

    /// Denies everything a suspended identity is waiting for.
    pub fn deny_workload(&self, workload: &str, reason: &str) -> usize {
        self.deny_where(|p| p.workload == workload, reason)
    }

    /// Denies every hold `covered` says is suspended.
    pub fn deny_where(&self, covered: impl Fn(&Pending) -> bool, reason: &str) -> usize {
        let ids: Vec<u64> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, (p, _))| covered(p))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.decide(
                *id,
                Outcome::Denied {
                    by_uid: None,
                    signed: None,
                    reason: reason.to_owned(),
                },
            );
        }
        ids.len()
    }
}

/// One request's place in the queue, for as long as it waits.
struct Hold<'a> {
    approvals: &'a Approvals,
    pending: Option<Pending>,
    outcome: Option<Outcome>,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let Some(p) = self.pending.take() else {
            return;
        };
        self.approvals
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&p.id);
        let out = self.outcome.take().unwrap_or_else(|| Outcome::Denied {
            by_uid: None,
            signed: None,
            reason: "the client went away while the request was held".into(),
        });
        self.approvals.tell(Change::Ended(p, out));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pending(workload: &str) -> Pending {
        Pending {
            id: 0,
            session: 1,
            workload: workload.into(),
            rule: "r".into(),
            message: String::new(),
            method: "POST".into(),
            authority: "a".into(),
            path: "/".into(),
            preview: String::new(),
            created_ms: 0,
            expires_ms: 0,
            hold: String::new(),
            ci: None,
        }
    }

    #[tokio::test]
    async fn a_hold_whose_client_goes_away_gives_its_slot_back() {
        let a = Arc::new(Approvals::default());
        let mut changes = a.changes();
        let b = a.clone();
        let waiting =
            tokio::spawn(
                async move { b.request(pending("wl-gone"), Duration::from_secs(60)).await },
            );
        while a.list().is_empty() {
            tokio::task::yield_now().await;
        }
        // The connection's task ends (the client closed): the future drops.
        waiting.abort();
        let _ = waiting.await;
        assert!(
            a.list().is_empty(),
            "the slot is still taken: {:?}",
            a.list()
        );
        assert!(matches!(changes.recv().await, Some(Change::Held(_))));
        match changes.recv().await {
            Some(Change::Ended(_, Outcome::Denied { reason, .. })) => {
                assert!(reason.contains("went away"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_queue_is_bounded_per_identity() {
        let a = Arc::new(Approvals::default());
        let mut held = Vec::new();
        for _ in 0..MAX_PENDING_PER_IDENTITY {
            let a = a.clone();
            held.push(tokio::spawn(async move {
                a.request(pending("wl-flood"), Duration::from_secs(30))
                    .await
            }));
        }
        while a.list().len() < MAX_PENDING_PER_IDENTITY {
            tokio::task::yield_now().await;
        }
        let over = a
            .request(pending("wl-flood"), Duration::from_secs(30))
            .await;
        assert!(
            matches!(&over, Outcome::Denied { reason, .. } if reason.contains("queue full")),
            "{over:?}"
        );
        // Another identity still gets a place in the queue.
        let b = a.clone();
        let other = tokio::spawn(async move {
            b.request(pending("wl-other"), Duration::from_secs(30))
                .await
        });
        while a.list().len() < MAX_PENDING_PER_IDENTITY + 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            a.deny_workload("wl-flood", "test"),
            MAX_PENDING_PER_IDENTITY
        );
        let id = a.list()[0].id;
        a.decide(
            id,
            Outcome::Approved {
                by_uid: Some(0),
                signed: None,
            },
        );
        assert_eq!(
            other.await.unwrap(),
            Outcome::Approved {
                by_uid: Some(0),
                signed: None
            }
        );
        for h in held {
            assert!(matches!(h.await.unwrap(), Outcome::Denied { .. }));
        }
    }
}
