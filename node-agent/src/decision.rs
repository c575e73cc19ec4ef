//! Signed decisions: an approve, a deny or a resume takes effect only when
//! a key this node trusts signed it (an operator's, `decisions.keys`, or
//! the console's, `console.keys`). Being root outside the job's cgroup is
//! not enough: a root job can reach the control socket through any host
//! daemon that runs commands for it. The console link and the control
//! socket both verify here, so "who may decide" has one answer.
use sluice_fleet::{
    approval::{Decision, Verdict, DECISION_TYP},
    signed::{self, SignedError, Trusted},
    suspension::{Resume, RESUME_TYP},
};

use crate::{
    approvals::{Approvals, Outcome, SignedBy},
    suspend::Suspensions,
};

/// Why a decision was not applied (the caller's error says it; refusals
/// are audited).
#[derive(Debug, thiserror::Error)]
pub enum DecisionRefused {
    #[error("{0}")]
    Signature(#[from] SignedError),
    #[error("the decision is for node {0}, not this one")]
    OtherNode(String),
    #[error("no request {0} is held here with that hold token (decided, expired, or never held)")]
    NotHeld(u64),
    #[error("the decision is for request {signed}, not {asked}")]
    OtherRequest { signed: u64, asked: u64 },
    #[error("the decision is to {signed}, not to {asked}")]
    OtherVerdict { signed: String, asked: String },
    #[error("{0} is not suspended here by the node (or not since the time the resume names)")]
    NotSuspended(String),
    #[error("{op} needs a decision signed by an operator key this node trusts (`--key`; the node's `decisions.keys`{console})")]
    Unsigned {
        op: &'static str,
        console: &'static str,
    },
}

/// The keys whose decisions this node applies, and the node's name they
/// must carry.
pub struct Deciders {
    pub node: String,
    pub trusted: Vec<Trusted>,
}

impl Deciders {
    /// Verifies a signed approve or deny for a request held here: the
    /// decision, the outcome to apply (not applied yet) and the signer.
    pub fn approval(
        &self,
        approvals: &Approvals,
        token: &str,
    ) -> Result<(Decision, Outcome, String), DecisionRefused> {
        let (d, kid): (Decision, String) = signed::verify(token, DECISION_TYP, &self.trusted)?;
        if d.node != self.node {
            return Err(DecisionRefused::OtherNode(d.node));
        }
        match approvals.get(d.id) {
            Some(p) if !p.hold.is_empty() && p.hold == d.hold => {}
            _ => return Err(DecisionRefused::NotHeld(d.id)),
        }
        let signed = Some(SignedBy {
            by: d.by.clone(),
            signer: kid.clone(),
        });
        let outcome = match d.verdict {
            Verdict::Approve => Outcome::Approved {
                by_uid: None,
                signed,
            },
            Verdict::Deny => Outcome::Denied {
                by_uid: None,
                signed,
                reason: if d.reason.trim().is_empty() {
                    "denied by approver".into()
                } else {
                    d.reason.clone()
                },
            },
        };
        Ok((d, outcome, kid))
    }

    /// Verifies a signed resume of a suspension in force here.
    pub fn resume(
        &self,
        suspensions: &Suspensions,
        token: &str,
    ) -> Result<(Resume, SignedBy), DecisionRefused> {
        let (r, kid): (Resume, String) = signed::verify(token, RESUME_TYP, &self.trusted)?;
        if r.node != self.node {
            return Err(DecisionRefused::OtherNode(r.node));
        }
        match suspensions.local(&r.identity) {
            Some(s) if s.at_ms == r.suspended_at_ms => {}
            _ => return Err(DecisionRefused::NotSuspended(r.identity)),
        }
        let by = SignedBy {
            by: r.by.clone(),
            signer: kid,
        };
        Ok((r, by))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_fleet::signed::Signer;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn a_resume_names_the_node_and_the_suspension_it_lifts() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::record::RecordStore::open(&dir.path().join("db")).unwrap();
        let suspensions = Suspensions::open(&store).unwrap();
        let op = Signer::load_or_create(&dir.path().join("op")).unwrap();
        let other = Signer::load_or_create(&dir.path().join("other")).unwrap();
        let d = Deciders {
            node: "runner-1".into(),
            trusted: vec![Trusted::from_pem(&op.public_pem()).unwrap()],
        };
        let s = suspensions.suspend(&store, "job-a", "incident", 0).unwrap();
        let resume = |signer: &Signer, node: &str, at: u64| {
            signer
                .sign(
                    RESUME_TYP,
                    &Resume {
                        node: node.into(),
                        identity: "job-a".into(),
                        suspended_at_ms: at,
                        by: "alice".into(),
                        iat: now(),
                        exp: now() + 60,
                    },
                )
                .unwrap()
        };
        let e = d
            .resume(&suspensions, &resume(&other, "runner-1", s.at_ms))
            .unwrap_err();
        assert!(
            matches!(e, DecisionRefused::Signature(SignedError::Untrusted(_))),
            "{e}"
        );
        let e = d
            .resume(&suspensions, &resume(&op, "runner-2", s.at_ms))
            .unwrap_err();
        assert!(matches!(e, DecisionRefused::OtherNode(_)), "{e}");
        // Signed for an earlier suspension of the same identity.
        let e = d
            .resume(&suspensions, &resume(&op, "runner-1", s.at_ms - 1))
            .unwrap_err();
        assert!(matches!(e, DecisionRefused::NotSuspended(_)), "{e}");
        let (r, by) = d
            .resume(&suspensions, &resume(&op, "runner-1", s.at_ms))
            .unwrap();
        assert_eq!((r.identity.as_str(), by.by.as_str()), ("job-a", "alice"));
        assert_eq!(by.signer, op.kid);
    }
}
