//! OIDC login: authorization code with PKCE (S256). The issuer's
//! discovery document and keys are fetched when needed and cached; the ID
//! token is verified with jsonwebtoken (signature against the JWKS, `iss`,
//! `aud`, `exp`) and its `nonce` against the login's; the PKCE verifier
//! and nonce never leave the server (the login table, keyed by `state`).
use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, Method};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64URL, Engine};
use jsonwebtoken::{
    errors::ErrorKind,
    jwk::{Jwk, PublicKeyUse},
    Algorithm, DecodingKey, Validation,
};
use serde::Deserialize;
use serde_json::Value;

use super::{
    fetch, random_token, routes, session::Sessions, tokens::Tokens, AuthArgs, AuthError, Principal,
    Role, Via,
};

/// Signature algorithms accepted on ID tokens (never `none` or HMAC: the
/// client secret is not a key anyone should be able to sign logins with).
const ALGS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);
/// A token signed with an unknown key makes us fetch the keys again (the
/// issuer rotated), but not more often than this.
const JWKS_REFRESH: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Deserialize)]
pub struct Provider {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    token_endpoint_auth_methods_supported: Vec<String>,
    #[serde(default)]
    code_challenge_methods_supported: Vec<String>,
}

pub struct Oidc {
    issuer: String,
    client_id: String,
    client_secret: Option<String>,
    redirect_url: String,
    groups_claim: String,
    scopes: String,
    roles: Vec<(Role, String)>,
    /// Whether cookies are `Secure` (the console is reached over https).
    pub secure: bool,
    /// `scheme://host[:port]` of the console, as browsers send `Origin`.
    pub origin: String,
    pub sessions: Sessions,
    tokens: Option<Tokens>,
    provider: tokio::sync::Mutex<Option<(Provider, Instant)>>,
    jwks: tokio::sync::Mutex<(Vec<Jwk>, Option<Instant>)>,
}

/// What a finished login yields.
pub struct LoggedIn {
    pub session: String,
    pub next: String,
}

fn cfg(why: impl Into<String>) -> AuthError {
    AuthError::Config(why.into())
}

impl Oidc {
    pub fn from_args(a: AuthArgs) -> Result<Self, AuthError> {
        let issuer = a.oidc_issuer.unwrap_or_default();
        let issuer = issuer.trim_end_matches('/').to_string();
        fetch::check_url(&issuer).map_err(|e| cfg(format!("--oidc-issuer {e}")))?;
        let client_id = a
            .oidc_client_id
            .filter(|c| !c.is_empty())
            .ok_or_else(|| cfg("--oidc-client-id is needed with --oidc-issuer"))?;
        let redirect_url = a
            .oidc_redirect_url
            .ok_or_else(|| cfg("--oidc-redirect-url (the console's external …/auth/callback) is needed with --oidc-issuer"))?;
        // An http callback off loopback would carry the code and the
        // session cookie in the clear.
        let ru =
            fetch::check_url(&redirect_url).map_err(|e| cfg(format!("--oidc-redirect-url {e}")))?;
        if ru.path() != "/auth/callback" {
            return Err(cfg(format!(
                "--oidc-redirect-url {redirect_url}: the console answers at /auth/callback (put a path prefix in front of the console, not in it)"
            )));
        }
        let secure = ru.scheme_str() == Some("https");
        let origin = origin_of(&ru);
        let client_secret = match &a.oidc_client_secret_file {
            None => None,
            Some(p) => {
                let s = std::fs::read_to_string(p)
                    .map_err(|e| cfg(format!("--oidc-client-secret-file {}: {e}", p.display())))?;
                let s = s.trim().to_string();
                if s.is_empty() {
                    return Err(cfg(format!(
                        "--oidc-client-secret-file {} is empty",
                        p.display()
                    )));
                }
                Some(s)
            }
        };
        let mut roles = Vec::new();
        for rg in &a.role_group {
            let (r, g) = rg
                .split_once('=')
                .ok_or_else(|| cfg(format!("--role-group {rg:?}: expected ROLE=GROUP")))?;
            let role: Role = r
                .trim()
                .parse()
                .map_err(|e| cfg(format!("--role-group {rg:?}: {e}")))?;
            if g.is_empty() {
                return Err(cfg(format!("--role-group {rg:?}: the group is empty")));
            }
            roles.push((role, g.to_string()));
        }
        if roles.is_empty() {
            return Err(cfg(
                "no --role-group given: with OIDC, nobody could be given a role",
            ));
        }
        let tokens = match &a.api_tokens_file {
            None => None,
            Some(p) => {
                let t = Tokens::load(p)?;
                tracing::info!(tokens = t.len(), file = %p.display(), "API tokens loaded");
                Some(t)
            }
        };
        let mut scopes: Vec<&str> = a.oidc_scopes.split_whitespace().collect();
        if !scopes.contains(&"openid") {
            scopes.insert(0, "openid");
        }
        Ok(Self {
            scopes: scopes.join(" "),
            issuer,
            client_id,
            client_secret,
            redirect_url,
            groups_claim: a.oidc_groups_claim,
            roles,
            secure,
            origin,
            sessions: Sessions::default(),
            tokens,
            provider: tokio::sync::Mutex::new(None),
            jwks: tokio::sync::Mutex::new((Vec::new(), None)),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The issuer's discovery document (cached for an hour).
    pub async fn provider(&self) -> Result<Provider, AuthError> {
        let mut g = self.provider.lock().await;
        if let Some((p, at)) = g.as_ref() {
            if at.elapsed() < DISCOVERY_TTL {
                return Ok(p.clone());
            }
        }
        let url = format!("{}/.well-known/openid-configuration", self.issuer);
        let p: Provider = json(fetch::call(Method::GET, &url, None, None).await?, &url)?;
        // Discovery must describe the issuer we were told to trust (OIDC
        // Discovery §4.3), and its endpoints must be reachable safely.
        if p.issuer.trim_end_matches('/') != self.issuer {
            return Err(AuthError::Provider(format!(
                "discovery names issuer {:?}, not {:?}",
                p.issuer, self.issuer
            )));
        }
        for u in [&p.token_endpoint, &p.jwks_uri, &p.authorization_endpoint] {
            fetch::check_url(u).map_err(AuthError::Provider)?;
        }
        if !p.code_challenge_methods_supported.is_empty()
            && !p
                .code_challenge_methods_supported
                .iter()
                .any(|m| m == "S256")
        {
            return Err(AuthError::Provider(
                "the issuer does not offer PKCE with S256".into(),
            ));
        }
        *g = Some((p.clone(), Instant::now()));
        Ok(p)
    }

    pub fn session(&self, headers: &HeaderMap) -> Option<Principal> {
        let id = routes::cookie(headers, &routes::session_cookie(self.secure))?;
        let l = self.sessions.get(&id)?;
        Some(Principal {
            name: l.name,
            role: l.role,
            csrf: l.csrf,
            via: Via::Session,
        })
    }

    pub fn api_token(&self, token: &str) -> Option<Principal> {
        let (name, role) = self.tokens.as_ref()?.check(token)?;
        Some(Principal {
            name: format!("token:{name}"),
            role,
            csrf: String::new(),
            via: Via::ApiToken,
        })
    }

    /// Starts a login: the authorization URL to send the browser to. The
    /// login is bound to `binding`, a cookie the caller sets.
    pub async fn start(&self, binding: &str, next: String) -> Result<String, AuthError> {
        let p = self.provider().await?;
        let state = random_token();
        let nonce = random_token();
        let verifier = B64URL.encode(super::random_bytes());
        let challenge = B64URL.encode(super::sha256(verifier.as_bytes()));
        self.sessions
            .start(&state, binding, nonce.clone(), verifier, next);
        let q = serde_urlencoded::to_string([
            ("response_type", "code"),
            ("client_id", &self.client_id),
            ("redirect_uri", &self.redirect_url),
            ("scope", &self.scopes),
            ("state", &state),
            ("nonce", &nonce),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ])
        .map_err(|e| AuthError::Provider(e.to_string()))?;
        let sep = if p.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok(format!("{}{sep}{q}", p.authorization_endpoint))
    }

    /// Finishes a login: code for tokens, the ID token verified, the role
    /// from the groups; a new session.
    pub async fn finish(
        &self,
        state: &str,
        binding: Option<&str>,
        code: &str,
    ) -> Result<LoggedIn, AuthError> {
        let pending = self.sessions.finish(state).ok_or(AuthError::UnknownState)?;
        let bound =
            binding.is_some_and(|b| super::ct_eq(&super::sha256(b.as_bytes()), &pending.binding));
        if !bound {
            return Err(AuthError::LoginCookie);
        }
        let p = self.provider().await?;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &self.redirect_url),
            ("code_verifier", &pending.verifier),
            ("client_id", &self.client_id),
        ];
        let mut authorization = None;
        if let Some(secret) = &self.client_secret {
            // client_secret_basic unless the issuer says it only takes the
            // secret in the form.
            let post_only = !p.token_endpoint_auth_methods_supported.is_empty()
                && !p
                    .token_endpoint_auth_methods_supported
                    .iter()
                    .any(|m| m == "client_secret_basic");
            if post_only {
                form.push(("client_secret", secret));
            } else {
                let enc = |s: &str| form_urlencode(s);
                authorization = Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!(
                        "{}:{}",
                        enc(&self.client_id),
                        enc(secret)
                    ))
                ));
            }
        }
        let body =
            serde_urlencoded::to_string(&form).map_err(|e| AuthError::Provider(e.to_string()))?;
        let reply = fetch::call(Method::POST, &p.token_endpoint, Some(body), authorization).await?;
        let v: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        if reply.status != 200 {
            let e = v["error"].as_str().unwrap_or("no error code");
            let d = v["error_description"].as_str().unwrap_or("");
            return Err(AuthError::Refused(format!(
                "token endpoint answered {}: {e} {d}",
                reply.status
            )));
        }
        let id_token = v["id_token"]
            .as_str()
            .ok_or_else(|| AuthError::Provider("the token answer has no id_token".into()))?;
        let claims = self.verify(&p, id_token, &pending.nonce).await?;
        let name = ["preferred_username", "email", "sub"]
            .iter()
            .find_map(|c| claims[*c].as_str().filter(|s| !s.is_empty()))
            .ok_or_else(|| AuthError::Token("it names nobody (no sub)".into()))?
            .to_string();
        let groups = groups(&claims, &self.groups_claim);
        let role = self
            .roles
            .iter()
            .filter(|(_, g)| groups.contains(g))
            .map(|(r, _)| *r)
            .max()
            .ok_or_else(|| {
                let mut gs: Vec<&String> = groups.iter().collect();
                gs.sort();
                AuthError::NoRole {
                    name: name.clone(),
                    groups: if gs.is_empty() {
                        "none".into()
                    } else {
                        gs.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    },
                }
            })?;
        tracing::info!(%name, role = role.as_str(), "login");
        Ok(LoggedIn {
            session: self.sessions.create(name, role),
            next: pending.next,
        })
    }

    /// The ID token's claims, if it is the issuer's, for us, current, and
    /// this login's.
    async fn verify(&self, p: &Provider, token: &str, nonce: &str) -> Result<Value, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Token(e.to_string()))?;
        if !ALGS.contains(&header.alg) {
            return Err(AuthError::Token(format!(
                "signed with {:?}, which this console does not accept",
                header.alg
            )));
        }
        let jwk = self.key_for(header.kid.as_deref(), header.alg).await?;
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| AuthError::Provider(format!("issuer key: {e}")))?;
        let mut v = Validation::new(header.alg);
        // Exactly the issuer discovery named (which matched ours).
        v.set_issuer(&[&p.issuer]);
        v.set_audience(&[&self.client_id]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 60;
        let data = jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAudience => AuthError::Audience,
            ErrorKind::InvalidIssuer => AuthError::Issuer,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::Token("not valid yet".into()),
            ErrorKind::MissingRequiredClaim(c) => AuthError::Token(format!("no {c} claim")),
            ErrorKind::InvalidAlgorithm => {
                AuthError::Token("its algorithm does not match the issuer's key".into())
            }
            _ => AuthError::Token(e.to_string()),
        })?;
        let claims = data.claims;
        // More than one audience: the one it was issued to must be us.
        if claims["aud"].as_array().is_some_and(|a| a.len() > 1)
            && claims["azp"].as_str() != Some(self.client_id.as_str())
        {
            return Err(AuthError::Audience);
        }
        let matches = claims["nonce"]
            .as_str()
            .is_some_and(|n| super::ct_eq(n.as_bytes(), nonce.as_bytes()));
        if !matches {
            return Err(AuthError::Nonce);
        }
        Ok(claims)
    }

    /// The issuer's signing key for `kid` (or its only key for `alg`'s
    /// family when the token names none), fetching the keys again once if
    /// it is not known: the issuer may have rotated.
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<Jwk, AuthError> {
        let mut g = self.jwks.lock().await;
        if let Some(k) = pick(&g.0, kid, alg) {
            return Ok(k);
        }
        if g.1.is_some_and(|at| at.elapsed() < JWKS_REFRESH) {
            return Err(AuthError::BadSignature);
        }
        let p = self.provider().await?;
        let reply = fetch::call(Method::GET, &p.jwks_uri, None, None).await?;
        let set: Value = json(reply, &p.jwks_uri)?;
        // Keys of kinds jsonwebtoken does not know are skipped, not fatal.
        let keys: Vec<Jwk> = set["keys"]
            .as_array()
            .map(|ks| {
                ks.iter()
                    .filter_map(|k| serde_json::from_value(k.clone()).ok())
                    .collect()
            })
            .unwrap_or_default();
        *g = (keys, Some(Instant::now()));
        pick(&g.0, kid, alg).ok_or(AuthError::BadSignature)
    }
}

fn pick(keys: &[Jwk], kid: Option<&str>, alg: Algorithm) -> Option<Jwk> {
    let usable = |k: &&Jwk| {
        !matches!(
            k.common.public_key_use,
            Some(PublicKeyUse::Encryption) | Some(PublicKeyUse::Other(_))
        ) && k
            .common
            .key_algorithm
            .is_none_or(|ka| format!("{ka:?}") == format!("{alg:?}"))
            && family(k) == family_of(alg)
    };
    let mut it = keys.iter().filter(usable);
    match kid {
        Some(kid) => it
            .find(|k| k.common.key_id.as_deref() == Some(kid))
            .cloned(),
        None => {
            let first = it.next()?;
            // Without a kid, only an unambiguous key will do.
            it.next().is_none().then(|| first.clone())
        }
    }
}

fn family(k: &Jwk) -> &'static str {
    match k.algorithm {
        jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => "RSA",
        jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => "EC",
        _ => "other",
    }
}

fn family_of(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES256 | Algorithm::ES384 => "EC",
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => "RSA",
        _ => "none",
    }
}

fn json<T: serde::de::DeserializeOwned>(reply: fetch::Reply, url: &str) -> Result<T, AuthError> {
    if reply.status != 200 {
        return Err(AuthError::Provider(format!(
            "{url} answered {}",
            reply.status
        )));
    }
    serde_json::from_slice(&reply.body).map_err(|e| AuthError::Provider(format!("{url}: {e}")))
}

/// The person's groups: the claim by its whole name (it may be a URL, as
/// namespaced claims are), else as a dotted path; a list or one string.
fn groups(claims: &Value, claim: &str) -> HashSet<String> {
    let mut v = claims.get(claim);
    if v.is_none() {
        v = claim.split('.').try_fold(claims, |at, k| at.get(k));
    }
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|g| g.as_str().map(String::from))
            .collect(),
        Some(Value::String(s)) => HashSet::from([s.clone()]),
        _ => HashSet::new(),
    }
}

/// `scheme://host[:port]`, the default port left out, as `Origin` reads.
fn origin_of(u: &axum::http::Uri) -> String {
    let scheme = u.scheme_str().unwrap_or("https");
    let host = u.host().unwrap_or_default().to_ascii_lowercase();
    match u.port_u16() {
        Some(443) if scheme == "https" => format!("{scheme}://{host}"),
        Some(80) if scheme == "http" => format!("{scheme}://{host}"),
        Some(p) => format!("{scheme}://{host}:{p}"),
        None => format!("{scheme}://{host}"),
    }
}

/// RFC 6749 §2.3.1: the client id and secret are form-encoded before
/// they go into Basic.
fn form_urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("", s)])
        .map(|q| q.trim_start_matches('=').to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_name_path_or_single_string() {
        let c = serde_json::json!({
            "groups": ["a", "b"],
            "https://x.example/groups": "c",
            "realm_access": {"roles": ["d"]},
        });
        assert_eq!(groups(&c, "groups").len(), 2);
        assert!(groups(&c, "https://x.example/groups").contains("c"));
        assert!(groups(&c, "realm_access.roles").contains("d"));
        assert!(groups(&c, "missing").is_empty());
    }

    #[test]
    fn origins_as_browsers_send_them() {
        let o = |s: &str| origin_of(&s.parse().unwrap());
        assert_eq!(
            o("https://Console.example/auth/callback"),
            "https://console.example"
        );
        assert_eq!(
            o("https://c.example:443/auth/callback"),
            "https://c.example"
        );
        assert_eq!(
            o("http://127.0.0.1:8470/auth/callback"),
            "http://127.0.0.1:8470"
        );
        assert_eq!(form_urlencode("a b:c"), "a+b%3Ac");
    }
}
