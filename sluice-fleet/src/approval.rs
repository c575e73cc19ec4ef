//! Approvals across the fleet: a node announces each request or
//! statement it holds (`Held`), and when it ends (`Ended`); the console
//! answers with a `Decision` it signs, which the holding node accepts
//! only from a key it trusts, for a hold it still has (`hold` is a random
//! token naming that one hold, so a decision cannot be replayed onto
//! another request, even one with the same number after a restart).
use serde::{Deserialize, Serialize};

/// The JWS `typ` of a decision.
pub const DECISION_TYP: &str = "sluice-decision+jwt";

/// How long a signed decision stays valid (it answers a hold that lasts
/// at most the rule's timeout anyway).
pub const DECISION_TTL_SECS: u64 = 300;

/// A request or statement waiting for a decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub node: String,
    /// The node's approval number (`sluice approvals list`).
    pub id: u64,
    pub hold: String,
    /// The connection record it belongs to.
    pub session: u64,
    pub identity: String,
    #[serde(default)]
    pub ci: Option<Ci>,
    pub rule: String,
    pub message: String,
    /// `POST`, …, or `SQL`.
    pub method: String,
    /// The host (HTTP) or the target's name (SQL).
    pub authority: String,
    /// The path (HTTP) or the database (SQL).
    pub path: String,
    /// The start of the body or the statement.
    pub preview: String,
    pub created_ms: u64,
    pub expires_ms: u64,
}

/// The CI job behind an identity, as the node read it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ci {
    pub system: String,
    pub repository: Option<String>,
    pub run_id: Option<String>,
    pub job: Option<String>,
    pub actor: Option<String>,
}

/// What a node says on its held subject.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Notice {
    Held(Box<Held>),
    Ended {
        node: String,
        id: u64,
        hold: String,
        /// `approved`, `denied` or `timed_out`.
        outcome: String,
        #[serde(default)]
        by: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approve,
    Deny,
}

/// The console's answer to one hold (the claims of a signed JWS).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub node: String,
    pub id: u64,
    pub hold: String,
    pub verdict: Verdict,
    /// The person who decided, as the console's login names them.
    pub by: String,
    pub reason: String,
    pub iat: u64,
    pub exp: u64,
}

/// The node's reply to a decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub accepted: bool,
    pub message: String,
}
