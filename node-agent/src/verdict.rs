//! The verdict stage every protocol runs a message (an HTTP request, a SQL
//! statement) through: suspension, the policy's rules, an approval hold
//! and the suspension re-check after it. It ends in one typed [`Denial`]
//! that each protocol renders its own way (`http::deny`: a status and a
//! JSON body; `postgres::frontend`: an ErrorResponse), so a new protocol
//! adds a renderer, not a second judge.
use std::time::Duration;

use tracing::info;

use crate::{
    approvals::Pending, policy::Verdict, record::Decision, scan::ScanError, session::Session,
};

/// Why the node refused a message, as a type: what each protocol renders
/// (HTTP status, Postgres SQLSTATE) and what is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenialKind {
    /// The identity is suspended.
    Suspended,
    /// A `block` rule matched (or a node rule such as an upgrade that
    /// would bypass the rules).
    Blocked,
    /// An `approve` rule held it and nobody approved in time, or someone
    /// denied it, or the identity was suspended while it waited.
    NotApproved,
    /// The rules could not be run on it (fail closed).
    ScanFailed,
    /// What it is cannot be read to be judged (an unknown encoding, a
    /// statement the parser cannot read while statement rules apply).
    Uninspectable,
    /// Bigger than the node scans.
    TooLarge,
    /// Its body could not be read from the client.
    Unreadable,
    /// It names another host than its TLS session's.
    Misdirected,
    /// It could not be recorded, so it is not forwarded.
    NotRecorded,
    /// The node's own configuration cannot serve it (a credential that is
    /// not a valid header).
    Misconfigured,
    /// The upstream's answer cannot be read to be masked.
    UninspectableResponse,
    /// A tool call (an MCP `tools/call`) a `block` rule matched.
    ToolCall,
}

impl DenialKind {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            DenialKind::Suspended => "suspended",
            DenialKind::Blocked => "blocked",
            DenialKind::NotApproved => "not_approved",
            DenialKind::ScanFailed => "scan_failed",
            DenialKind::Uninspectable => "uninspectable",
            DenialKind::TooLarge => "too_large",
            DenialKind::Unreadable => "unreadable",
            DenialKind::Misdirected => "misdirected",
            DenialKind::NotRecorded => "not_recorded",
            DenialKind::Misconfigured => "misconfigured",
            DenialKind::UninspectableResponse => "uninspectable_response",
            DenialKind::ToolCall => "tool_call",
        }
    }
}

/// A refused message: the rule (a bundle's rule id, or the node's own
/// such as `identity-suspended`), the kind, the words for people, and for
/// an approval that did not come, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub rule: String,
    pub kind: DenialKind,
    pub message: String,
    pub reason: Option<String>,
    /// The JSON-RPC id of a refused MCP call: the answer is a JSON-RPC
    /// error for it, which MCP clients raise.
    pub rpc_id: Option<serde_json::Value>,
}

impl Denial {
    pub fn new(rule: &str, kind: DenialKind, message: impl Into<String>) -> Self {
        Self {
            rule: rule.into(),
            kind,
            message: message.into(),
            reason: None,
            rpc_id: None,
        }
    }

    /// One line: the message, and the reason an approval did not come.
    pub fn text(&self) -> String {
        match (self.kind, &self.reason) {
            (DenialKind::NotApproved, Some(r)) => format!("{} (not approved: {r})", self.message),
            _ => self.message.clone(),
        }
    }
}

/// The rules' answer before any hold: go on, refuse, or wait for a human.
pub enum Judged {
    Allow,
    Deny(Denial),
    Hold(Hold),
}

/// An `approve` rule's hold, to be waited on with [`Session::hold`] once
/// the protocol has sent on what came before the held message.
pub struct Hold {
    rule: String,
    message: String,
    timeout_secs: u64,
}

impl Hold {
    /// The `approve` rule that holds the message.
    pub fn rule(&self) -> &str {
        &self.rule
    }
}

/// What an approver is shown of a held message.
pub struct Held {
    pub method: String,
    pub authority: String,
    pub path: String,
    pub preview: String,
}

impl Session {
    /// A message refused (rendered by its protocol): counted by kind.
    pub fn denied(&self, d: &Denial) {
        self.metrics
            .denials
            .get_or_create(&crate::metrics::DenialLabels {
                target: self.target.clone(),
                workload: self.workload_name.clone(),
                kind: d.kind.as_str().into(),
            })
            .inc();
    }

    /// Stage: suspension, checked per message (a suspension applies to
    /// connections already open).
    pub fn check_suspension(&self, decisions: &mut Vec<Decision>) -> Result<(), Denial> {
        let Some(s) = self.suspensions.get(&self.identity) else {
            return Ok(());
        };
        decisions.push(Decision::node_block("identity-suspended", s.reason.clone()));
        let mut d = Denial::new(
            "identity-suspended",
            DenialKind::Suspended,
            format!("identity suspended: {}", s.reason),
        );
        d.reason = Some(s.reason);
        Err(d)
    }

    /// Stage: the rules' verdict on what the policy evaluated (fail
    /// closed when it could not). Their decisions go on the record.
    pub fn judge(
        &self,
        evaluated: Result<(Verdict, Vec<Decision>), ScanError>,
        decisions: &mut Vec<Decision>,
    ) -> Judged {
        let (verdict, found) = match evaluated {
            Ok(v) => v,
            Err(e) => {
                let detail = format!("could not be scanned: {e}");
                decisions.push(Decision::node_block("scan-failed", detail.clone()));
                return Judged::Deny(Denial::new("scan-failed", DenialKind::ScanFailed, detail));
            }
        };
        decisions.extend(found);
        match verdict {
            Verdict::Allow => Judged::Allow,
            Verdict::Block { rule, message } => {
                Judged::Deny(Denial::new(&rule, DenialKind::Blocked, message))
            }
            Verdict::Approve {
                rule,
                message,
                timeout_secs,
            } => Judged::Hold(Hold {
                rule,
                message,
                timeout_secs,
            }),
        }
    }

    /// Stage: the approval hold. Waits for an approver (the timeout
    /// denies), puts the outcome on the rule's decision, and re-checks
    /// the suspension: one made while the message waited also denies.
    pub async fn hold(
        &self,
        hold: Hold,
        held: Held,
        decisions: &mut [Decision],
    ) -> Result<(), Denial> {
        let pending = Pending {
            id: 0,
            session: self.id,
            workload: self.identity.id.clone(),
            rule: hold.rule.clone(),
            message: hold.message.clone(),
            method: held.method,
            authority: held.authority,
            path: held.path,
            preview: held.preview,
            created_ms: 0,
            expires_ms: 0,
            hold: String::new(),
            ci: self.identity.ci.clone(),
        };
        info!(session = self.id, workload = %self.identity.id, rule = %hold.rule, "held for approval");
        let outcome = self
            .approvals
            .request(pending, Duration::from_secs(hold.timeout_secs))
            .await;
        if let Some(d) = decisions.iter_mut().find(|d| d.rule == hold.rule) {
            d.detail = Some(serde_json::to_string(&outcome).unwrap_or_default());
        }
        let reason = outcome.denial(hold.timeout_secs).or_else(|| {
            self.suspensions
                .get(&self.identity)
                .map(|s| format!("identity suspended: {}", s.reason))
        });
        match reason {
            None => Ok(()),
            Some(reason) => Err(Denial {
                rule: hold.rule,
                kind: DenialKind::NotApproved,
                message: hold.message,
                reason: Some(reason),
                rpc_id: None,
            }),
        }
    }
}
