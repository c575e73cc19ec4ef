//! Who may do what. Every handler names the role it needs by taking a
//! [`Principal`] (any logged-in person: a viewer) and calling
//! [`Principal::require`] for more; state-changing handlers call
//! [`state_change`] (the session's CSRF token, from the form's `csrf`
//! field or an `X-CSRF-Token` header; API tokens are exempt).
//!
//! Modes: `Local` (no login; the console refuses to listen beyond
//! loopback in this mode, and everyone who reaches it is an admin named
//! `local`), and OIDC login (authorization code + PKCE) with roles from a
//! groups claim, plus API tokens for automation (`Authorization: Bearer`).
//! Sessions live in memory: a console restart logs everyone out.
use std::{path::PathBuf, sync::Arc};

use axum::{
    extract::FromRef,
    http::{header, request::Parts, HeaderMap},
};
use serde::Serialize;

use crate::web::WebError;

pub mod fetch;
mod oidc;
mod routes;
mod session;
mod tokens;

pub use routes::{guard, header_badge, routes, unauthenticated};
pub use tokens::{run as run_token, TokenCmd};

/// Roles, each allowing what the one before it does and more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
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

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "approver" => Ok(Role::Approver),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?} (viewer, approver or admin)"
            )),
        }
    }
}

/// How a principal was recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// Local mode: no login.
    Local,
    /// A login session (a cookie: an ambient credential, so CSRF applies).
    Session,
    /// `Authorization: Bearer`: nothing a browser sends by itself.
    ApiToken,
}

/// The person (or API token) behind a request.
#[derive(Clone, Debug, Serialize)]
pub struct Principal {
    /// As audits and signed decisions name them (API tokens: `token:NAME`).
    pub name: String,
    pub role: Role,
    /// The token state-changing forms must carry.
    #[serde(skip)]
    pub csrf: String,
    pub via: Via,
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

    /// API-token requests pass: a browser never adds a bearer token by
    /// itself, so there is no ambient credential for a forged form to use.
    pub fn check_csrf(&self, submitted: &str) -> Result<(), WebError> {
        if self.via == Via::ApiToken {
            return Ok(());
        }
        if !submitted.is_empty() && ct_eq(self.csrf.as_bytes(), submitted.as_bytes()) {
            Ok(())
        } else {
            Err(WebError::Forbidden(
                "the form's CSRF token is missing or stale: reload the page".into(),
            ))
        }
    }
}

/// The check every state-changing handler makes: not cross-site (by
/// `Sec-Fetch-Site`; `Origin` is checked against the console's own origin
/// by [`guard`] for every unsafe method), and the session's CSRF token,
/// from the form (`form_csrf`) or the `X-CSRF-Token` header.
pub fn state_change(
    who: &Principal,
    headers: &HeaderMap,
    form_csrf: Option<&str>,
) -> Result<(), WebError> {
    if who.via == Via::ApiToken {
        return Ok(());
    }
    if routes::cross_site_fetch(headers) {
        return Err(AuthError::CrossSite.into());
    }
    let submitted = form_csrf.or_else(|| headers.get("x-csrf-token").and_then(|v| v.to_str().ok()));
    who.check_csrf(submitted.unwrap_or(""))
}

/// Why a login, a token or a request was refused. Each message is what the
/// person sees.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Config(String),
    #[error("the identity provider could not be reached or answered badly: {0}")]
    Provider(String),
    #[error("this login is unknown, already used or expired: start again")]
    UnknownState,
    #[error("this login was started in another browser, or its cookie expired: start again")]
    LoginCookie,
    #[error("the identity provider refused the login: {0}")]
    Refused(String),
    #[error("the ID token's signature does not verify against the identity provider's keys")]
    BadSignature,
    #[error("the ID token was issued for another client (audience mismatch)")]
    Audience,
    #[error("the ID token was issued by another issuer")]
    Issuer,
    #[error("the ID token has expired (or this machine's clock is off)")]
    Expired,
    #[error("the ID token does not belong to this login (nonce mismatch): start again")]
    Nonce,
    #[error("the ID token is not acceptable: {0}")]
    Token(String),
    #[error("{name} is in no group that this console maps to a role (groups: {groups}); ask an admin for access")]
    NoRole { name: String, groups: String },
    #[error("the API token is not valid")]
    BadApiToken,
    #[error("a cross-site request to change something was refused")]
    CrossSite,
    #[error("this host name is not the console's (loopback only in local mode)")]
    Host,
}

impl From<AuthError> for WebError {
    fn from(e: AuthError) -> Self {
        WebError::Auth(e)
    }
}

/// `run`'s login options.
#[derive(clap::Args, Debug, Default)]
pub struct AuthArgs {
    /// OIDC issuer URL (discovery at `<issuer>/.well-known/openid-configuration`).
    /// Without it the console has no login and serves loopback only.
    #[arg(long, env = "SLUICE_CONSOLE_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// The console's client id at the issuer.
    #[arg(long, env = "SLUICE_CONSOLE_OIDC_CLIENT_ID")]
    pub oidc_client_id: Option<String>,
    /// File holding the client secret (confidential clients); public
    /// clients leave it out and rely on PKCE.
    #[arg(long, env = "SLUICE_CONSOLE_OIDC_CLIENT_SECRET_FILE")]
    pub oidc_client_secret_file: Option<PathBuf>,
    /// The console's external callback URL, `https://…/auth/callback`
    /// (registered at the issuer); https makes the cookies `Secure`.
    #[arg(long, env = "SLUICE_CONSOLE_OIDC_REDIRECT_URL")]
    pub oidc_redirect_url: Option<String>,
    /// ID token claim listing the person's groups (a dotted path reaches
    /// into objects, e.g. `realm_access.roles`).
    #[arg(
        long,
        env = "SLUICE_CONSOLE_OIDC_GROUPS_CLAIM",
        default_value = "groups"
    )]
    pub oidc_groups_claim: String,
    /// Scopes requested (`openid` is always included).
    #[arg(
        long,
        env = "SLUICE_CONSOLE_OIDC_SCOPES",
        default_value = "openid profile email"
    )]
    pub oidc_scopes: String,
    /// `ROLE=GROUP` (viewer, approver, admin), repeatable: members of GROUP
    /// get ROLE (the highest that applies). Also from
    /// SLUICE_CONSOLE_ROLE_GROUPS, one mapping a line.
    #[arg(long = "role-group", value_name = "ROLE=GROUP")]
    pub role_group: Vec<String>,
    /// API tokens for automation: lines `ROLE NAME SHA256HEX` (see
    /// `sluice-console token new`); must not be readable by group or others.
    #[arg(long, env = "SLUICE_CONSOLE_API_TOKENS_FILE")]
    pub api_tokens_file: Option<PathBuf>,
}

pub struct Auth {
    mode: Mode,
}

enum Mode {
    /// No login: loopback only, everyone is `local`, an admin.
    Local {
        csrf: String,
    },
    Oidc(Box<oidc::Oidc>),
}

impl Auth {
    pub fn local() -> Self {
        Self {
            mode: Mode::Local {
                csrf: random_token(),
            },
        }
    }

    /// Local mode without OIDC options, else OIDC login (and API tokens).
    pub fn from_args(args: AuthArgs) -> Result<Self, AuthError> {
        let mut args = args;
        if args.role_group.is_empty() {
            if let Ok(v) = std::env::var("SLUICE_CONSOLE_ROLE_GROUPS") {
                args.role_group = v
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect();
            }
        }
        if args.oidc_issuer.is_none() {
            let extra = args.oidc_client_id.is_some()
                || args.oidc_client_secret_file.is_some()
                || args.oidc_redirect_url.is_some()
                || !args.role_group.is_empty()
                || args.api_tokens_file.is_some();
            if extra {
                return Err(AuthError::Config(
                    "login options (--oidc-*, --role-group, --api-tokens-file) need --oidc-issuer; without it the console has no login (loopback only, everyone admin)".into(),
                ));
            }
            return Ok(Self::local());
        }
        Ok(Self {
            mode: Mode::Oidc(Box::new(oidc::Oidc::from_args(args)?)),
        })
    }

    /// Whether the console may listen on `addr` in this mode.
    pub fn allows_listen(&self, addr: &std::net::SocketAddr) -> bool {
        match self.mode {
            Mode::Local { .. } => addr.ip().is_loopback(),
            Mode::Oidc(_) => true,
        }
    }

    /// Checks the issuer's discovery document once at start-up, so that a
    /// misconfiguration shows in the log before the first login.
    pub async fn probe(&self) {
        if let Mode::Oidc(o) = &self.mode {
            match o.provider().await {
                Ok(_) => tracing::info!(issuer = %o.issuer(), "OIDC issuer discovered"),
                Err(e) => tracing::warn!(error = %e, "OIDC discovery failed; logins will retry it"),
            }
        }
    }

    fn principal(&self, parts: &Parts) -> Result<Principal, WebError> {
        match &self.mode {
            Mode::Local { csrf } => {
                // Local mode trusts whoever reaches loopback; a page from
                // elsewhere that re-binds its own name to 127.0.0.1 must not
                // count as reaching it.
                if !routes::loopback_host(&parts.headers) {
                    return Err(AuthError::Host.into());
                }
                Ok(Principal {
                    name: "local".into(),
                    role: Role::Admin,
                    csrf: csrf.clone(),
                    via: Via::Local,
                })
            }
            Mode::Oidc(o) => {
                if let Some(v) = parts.headers.get(header::AUTHORIZATION) {
                    let token = v
                        .to_str()
                        .ok()
                        .and_then(|s| s.strip_prefix("Bearer "))
                        .map(str::trim)
                        .ok_or(AuthError::BadApiToken)?;
                    return o.api_token(token).ok_or(AuthError::BadApiToken.into());
                }
                o.session(&parts.headers).ok_or(WebError::Unauthenticated)
            }
        }
    }
}

/// 32 random bytes, hex.
pub fn random_token() -> String {
    hex::encode(random_bytes())
}

fn random_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    // The system's generator failing is not something to serve through.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        std::process::abort();
    }
    b
}

/// Equal, in time that does not depend on where they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl<S> axum::extract::FromRequestParts<S> for Principal
where
    Arc<Auth>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Arc::<Auth>::from_ref(state).principal(parts)
    }
}
