//! Who may do what. Every handler names the role it needs by taking a
//! [`Principal`] (any logged-in person: a viewer) and calling
//! [`Principal::require`] for more; state-changing forms carry the
//! principal's CSRF token, checked with [`Principal::check_csrf`].
//!
//! Modes: `Local` (no login; the console refuses to listen beyond
//! loopback in this mode, and everyone who reaches it is an admin named
//! `local`), and OIDC login with roles from a groups claim (to come).
use axum::{extract::FromRef, http::request::Parts};
use serde::Serialize;

use crate::web::WebError;

/// Roles, each allowing what the one before it does and more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    // Given by the OIDC login's group mapping.
    #[allow(dead_code)]
    Viewer,
    Approver,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }
}

/// The person (or API token) behind a request.
#[derive(Clone, Debug, Serialize)]
pub struct Principal {
    /// As audits and signed decisions name them.
    pub name: String,
    pub role: Role,
    /// The token state-changing forms must carry.
    #[serde(skip)]
    pub csrf: String,
}

impl Principal {
    pub fn require(&self, role: Role) -> Result<(), WebError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(WebError::Forbidden(format!(
                "{} is a {}; this needs the {} role",
                self.name,
                self.role.as_str(),
                role.as_str()
            )))
        }
    }

    pub fn check_csrf(&self, submitted: &str) -> Result<(), WebError> {
        if constant_time_eq(self.csrf.as_bytes(), submitted.as_bytes()) {
            Ok(())
        } else {
            Err(WebError::Forbidden(
                "the form's CSRF token is missing or stale: reload the page".into(),
            ))
        }
    }
}

pub struct Auth {
    mode: Mode,
}

enum Mode {
    /// No login: loopback only, everyone is `local`, an admin.
    Local { csrf: String },
}

impl Auth {
    pub fn local() -> Self {
        Self {
            mode: Mode::Local {
                csrf: random_token(),
            },
        }
    }

    /// Whether the console may listen on `addr` in this mode.
    pub fn allows_listen(&self, addr: &std::net::SocketAddr) -> bool {
        match self.mode {
            Mode::Local { .. } => addr.ip().is_loopback(),
        }
    }

    fn principal(&self, _parts: &Parts) -> Result<Principal, WebError> {
        match &self.mode {
            Mode::Local { csrf } => Ok(Principal {
                name: "local".into(),
                role: Role::Admin,
                csrf: csrf.clone(),
            }),
        }
    }
}

/// Equal, in a time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// 32 random bytes, hex.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    // The system's generator failing is not something to serve through.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        std::process::abort();
    }
    hex::encode(b)
}

impl<S> axum::extract::FromRequestParts<S> for Principal
where
    std::sync::Arc<Auth>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        std::sync::Arc::<Auth>::from_ref(state).principal(parts)
    }
}
