//! The fleet's suspension list: every entry the console has in force,
//! signed as one message with a version that only grows. A node applies a
//! list only when it verifies and is newer than the last it applied (a
//! replayed older list cannot lift a suspension on a node that saw the
//! newer one), and keeps it across restarts.
use serde::{Deserialize, Serialize};

/// The JWS `typ` of a suspension list.
pub const LIST_TYP: &str = "sluice-suspensions+jwt";

/// The JWS `typ` of an operator's resume of one node-local suspension.
pub const RESUME_TYP: &str = "sluice-resume+jwt";

/// An operator lifts one suspension on one node (the claims of a signed
/// JWS). It names the suspension by the time it began, so a resume signed
/// for an earlier incident cannot lift a later suspension of the same
/// identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub node: String,
    pub identity: String,
    pub suspended_at_ms: u64,
    /// The person who decided (`sluice identities resume --by`).
    pub by: String,
    pub iat: u64,
    pub exp: u64,
}

/// What an entry suspends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One workload identity (the id records name).
    Identity,
    /// Every job of a repository (`owner/name`).
    Repository,
    /// Every job started by a CI actor.
    Actor,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Identity => "identity",
            Scope::Repository => "repository",
            Scope::Actor => "actor",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "identity" => Some(Scope::Identity),
            "repository" => Some(Scope::Repository),
            "actor" => Some(Scope::Actor),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub scope: Scope,
    pub value: String,
    pub reason: String,
    pub by: String,
    pub at_ms: u64,
}

impl Entry {
    /// Whether this entry suspends a connection of `identity`, run for
    /// `repository` by `actor` (as the node read them).
    pub fn covers(&self, identity: &str, repository: Option<&str>, actor: Option<&str>) -> bool {
        match self.scope {
            Scope::Identity => self.value == identity,
            Scope::Repository => repository == Some(self.value.as_str()),
            Scope::Actor => actor == Some(self.value.as_str()),
        }
    }
}

/// The claims of a signed list.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct List {
    /// Grows with every change (milliseconds since the epoch, or one more
    /// than the last, whichever is larger).
    pub version: u64,
    pub entries: Vec<Entry>,
    pub iat: u64,
}

impl List {
    pub fn covering(
        &self,
        identity: &str,
        repository: Option<&str>,
        actor: Option<&str>,
    ) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.covers(identity, repository, actor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_cover_by_their_scope_only() {
        let e = |scope, value: &str| Entry {
            scope,
            value: value.into(),
            reason: "r".into(),
            by: "b".into(),
            at_ms: 0,
        };
        let list = List {
            version: 1,
            entries: vec![
                e(Scope::Repository, "acme/widgets"),
                e(Scope::Actor, "mallory"),
                e(Scope::Identity, "wl-1"),
            ],
            iat: 0,
        };
        assert!(list.covering("x", Some("acme/widgets"), None).is_some());
        assert!(list.covering("x", Some("acme/widgets2"), None).is_none());
        assert!(list.covering("x", None, Some("mallory")).is_some());
        assert!(list.covering("wl-1", None, None).is_some());
        // An actor named like a repository is not the repository.
        assert!(list.covering("x", None, Some("acme/widgets")).is_none());
        assert!(list
            .covering("wl-2", Some("acme/other"), Some("alice"))
            .is_none());
    }
}
