//! The login routes (`/auth/…`), the guard every request passes (no
//! cross-site state changes; pages that need a login go to it; who is
//! logged in, for the page header), cookies, and how refusals look.
use std::sync::Arc;

use axum::{
    extract::{rejection::FormRejection, FromRef, Query, Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{Html, IntoResponse, Response},
    routing::{get, post},
    Form, Json, Router,
};
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::json;

use super::{
    random_token, session::PENDING_TTL, session::SESSION_TTL, state_change, Auth, AuthError, Mode,
    Principal, Role, Via,
};
use crate::{pages, web::WebError};

/// Who the page header shows, for the request being served.
#[derive(Clone)]
struct Shown {
    name: String,
    role: Role,
    csrf: String,
    /// A login session (a logout button makes sense).
    session: bool,
}

tokio::task_local! {
    static SHOWN: Option<Shown>;
}

/// Marks a 401 that a page request turns into a redirect to the login.
#[derive(Clone, Copy)]
struct LoginRequired;

pub fn routes<S>() -> Router<S>
where
    Arc<Auth>: FromRef<S>,
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/auth/login", get(login))
        .route("/auth/callback", get(callback))
        .route("/auth/logout", post(logout))
        .route("/auth/logged-out", get(logged_out))
        .route("/api/whoami", get(whoami))
        .route("/api/whoami/check", post(check))
}

/// Every request: state changes from another site are refused (by
/// `Sec-Fetch-Site` and `Origin`; bearer-token requests carry no ambient
/// credential and pass), the principal is noted for the page header, and
/// a page that needs a login redirects to it.
pub async fn guard(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let safe = matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    // Only a bearer token is exempt: a browser may add Basic credentials
    // (a proxy's) to a forged form by itself, never a bearer token.
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer "));
    if !safe && !bearer && auth.cross_site(req.headers()) {
        return WebError::from(AuthError::CrossSite).into_response();
    }
    let (parts, body) = req.into_parts();
    let shown = auth.principal(&parts).ok().map(|p| Shown {
        session: p.via == Via::Session,
        name: p.name,
        role: p.role,
        csrf: p.csrf,
    });
    let logged_in = shown.as_ref().is_some_and(|s| s.session);
    let path = parts.uri.path().to_string();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut resp = SHOWN
        .scope(shown, next.run(Request::from_parts(parts, body)))
        .await;
    if resp.extensions().get::<LoginRequired>().is_some()
        && matches!(method, Method::GET | Method::HEAD)
        && !path.starts_with("/api/")
    {
        let q = serde_urlencoded::to_string([("next", target.as_str())]).unwrap_or_default();
        return see_other(&format!("/auth/login?{q}"));
    }
    if logged_in {
        // Evidence pages are not for shared caches or the back button
        // after a logout.
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// Who is logged in and a logout button, for the page header; nothing
/// when nobody is.
pub fn header_badge() -> Markup {
    let Some(s) = SHOWN.try_with(|s| s.clone()).ok().flatten() else {
        return html! {};
    };
    html! {
        span #who style="margin-left:auto" data-role=(s.role.as_str()) {
            (s.name) " · " (s.role.as_str())
        }
        @if s.session {
            form #logout method="post" action="/auth/logout" style="margin:0" {
                input type="hidden" name="csrf" value=(s.csrf);
                button type="submit" { "Log out" }
            }
        }
    }
}

/// Not logged in: 401 JSON for the API; pages are redirected by [`guard`].
pub fn unauthenticated() -> Response {
    let mut r = (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({"error": "log in first"})),
    )
        .into_response();
    r.extensions_mut().insert(LoginRequired);
    r
}

impl Auth {
    fn cross_site(&self, h: &HeaderMap) -> bool {
        if cross_site_fetch(h) {
            return true;
        }
        let Some(origin) = h.get(header::ORIGIN) else {
            // Old clients and non-browsers: the CSRF token decides.
            return false;
        };
        let Ok(origin) = origin.to_str() else {
            return true;
        };
        let own = match &self.mode {
            Mode::Oidc(o) => o.origin.clone(),
            Mode::Local { .. } => match h.get(header::HOST).and_then(|v| v.to_str().ok()) {
                Some(host) => format!("http://{host}"),
                None => return true,
            },
        };
        !origin.eq_ignore_ascii_case(&own)
    }
}

/// `Sec-Fetch-Site` says another site (or a sibling) sent it.
pub fn cross_site_fetch(h: &HeaderMap) -> bool {
    match h.get("sec-fetch-site").map(|v| v.to_str()) {
        None => false,
        Some(Ok("same-origin" | "none")) => false,
        Some(_) => true,
    }
}

/// The request's `Host` is a loopback name (or absent: no browser omits it).
pub fn loopback_host(h: &HeaderMap) -> bool {
    let Some(host) = h.get(header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => host,
    };
    super::fetch::loopback(name)
}

/// `__Host-` cookies are only sent over https, for this host, path `/`.
pub fn session_cookie(secure: bool) -> String {
    if secure {
        "__Host-sluice_session"
    } else {
        "sluice_session"
    }
    .into()
}

fn login_cookie(secure: bool) -> String {
    if secure {
        "__Host-sluice_login"
    } else {
        "sluice_login"
    }
    .into()
}

pub fn cookie(h: &HeaderMap, name: &str) -> Option<String> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_string())
}

fn set_cookie(r: &mut Response, name: &str, value: &str, max_age: u64, secure: bool) {
    let s = format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    );
    if let Ok(v) = HeaderValue::from_str(&s) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn see_other(location: &str) -> Response {
    let loc = HeaderValue::from_str(location).unwrap_or(HeaderValue::from_static("/"));
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, loc),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response()
}

/// Where to go after the login: a path on this console only (`//host`
/// and `/\host` are other sites to a browser), else `/`.
fn safe_next(n: Option<&str>) -> String {
    match n {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.starts_with("/auth/")
                && n.len() <= 2048
                && n.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') =>
        {
            n.to_string()
        }
        _ => "/".into(),
    }
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

async fn login(
    State(auth): State<Arc<Auth>>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Result<Response, WebError> {
    let next = safe_next(q.next.as_deref());
    let Mode::Oidc(o) = &auth.mode else {
        return Ok(see_other(&next));
    };
    if o.session(&headers).is_some() {
        return Ok(see_other(&next));
    }
    let binding = random_token();
    let url = o.start(&binding, next).await?;
    let mut r = see_other(&url);
    set_cookie(
        &mut r,
        &login_cookie(o.secure),
        &binding,
        PENDING_TTL.as_secs(),
        o.secure,
    );
    Ok(r)
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

async fn callback(
    State(auth): State<Arc<Auth>>,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Result<Response, WebError> {
    let Mode::Oidc(o) = &auth.mode else {
        return Ok(see_other("/"));
    };
    let state = q.state.ok_or(AuthError::UnknownState)?;
    if let Some(e) = q.error {
        o.sessions.finish(&state);
        let d = q.error_description.unwrap_or_default();
        return Err(AuthError::Refused(format!("{e} {d}").trim().to_string()).into());
    }
    let code = q
        .code
        .ok_or_else(|| AuthError::Refused("the answer carries no code".into()))?;
    let binding = cookie(&headers, &login_cookie(o.secure));
    let done = o.finish(&state, binding.as_deref(), &code).await?;
    let mut r = see_other(&done.next);
    set_cookie(
        &mut r,
        &session_cookie(o.secure),
        &done.session,
        SESSION_TTL.as_secs(),
        o.secure,
    );
    set_cookie(&mut r, &login_cookie(o.secure), "", 0, o.secure);
    Ok(r)
}

#[derive(Deserialize, Default)]
struct CsrfForm {
    csrf: Option<String>,
    role: Option<String>,
}

/// A body that is not a form counts as one without a CSRF token.
fn form(f: Result<Form<CsrfForm>, FormRejection>) -> CsrfForm {
    f.map(|Form(f)| f).unwrap_or_default()
}

async fn logout(
    State(auth): State<Arc<Auth>>,
    who: Principal,
    headers: HeaderMap,
    f: Result<Form<CsrfForm>, FormRejection>,
) -> Result<Response, WebError> {
    state_change(&who, &headers, form(f).csrf.as_deref())?;
    let mut r = see_other("/auth/logged-out");
    if let Mode::Oidc(o) = &auth.mode {
        let name = session_cookie(o.secure);
        if let Some(id) = cookie(&headers, &name) {
            o.sessions.remove(&id);
        }
        set_cookie(&mut r, &name, "", 0, o.secure);
        tracing::info!(name = %who.name, "logout");
    }
    Ok(r)
}

async fn logged_out() -> Html<String> {
    Html(
        pages::page(
            "Logged out",
            html! { h1 { "Logged out" } p { a href="/auth/login" { "Log in again" } } },
        )
        .into_string(),
    )
}

/// Who the credential is, and the CSRF token its state changes carry
/// (readable only same-origin, as on the pages; `sluice --console` reads
/// it in local mode).
async fn whoami(who: Principal) -> Json<serde_json::Value> {
    Json(json!({"name": who.name, "role": who.role, "via": who.via, "csrf": who.csrf}))
}

/// Lets automation (and the tests) check a credential: passes the CSRF
/// rule and the role asked for (`role`, admin by default), or is refused.
async fn check(
    who: Principal,
    headers: HeaderMap,
    f: Result<Form<CsrfForm>, FormRejection>,
) -> Result<Json<serde_json::Value>, WebError> {
    let f = form(f);
    state_change(&who, &headers, f.csrf.as_deref())?;
    let role: Role = f
        .role
        .as_deref()
        .unwrap_or("admin")
        .parse()
        .map_err(WebError::Forbidden)?;
    who.require(role)?;
    Ok(Json(
        json!({"ok": true, "name": who.name, "role": who.role}),
    ))
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        let (status, title) = match &self {
            AuthError::Config(_) => (StatusCode::INTERNAL_SERVER_ERROR, "Login is misconfigured"),
            AuthError::Provider(_) => (StatusCode::BAD_GATEWAY, "Login failed"),
            AuthError::NoRole { .. } => (StatusCode::FORBIDDEN, "No access"),
            AuthError::CrossSite | AuthError::Host => (StatusCode::FORBIDDEN, "Not allowed"),
            AuthError::BadApiToken => {
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"")],
                    Json(json!({"error": msg})),
                )
                    .into_response();
            }
            _ => (StatusCode::UNAUTHORIZED, "Login failed"),
        };
        tracing::warn!(reason = %msg, "refused");
        let login_again = !matches!(self, AuthError::CrossSite | AuthError::Host);
        let body = pages::page(
            title,
            html! {
                h1 { (title) }
                p #auth-error { (msg) }
                @if login_again { p { a href="/auth/login" { "Log in again" } } }
            },
        );
        (status, Html(body.into_string())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_this_console() {
        assert_eq!(safe_next(Some("/sessions?node=a")), "/sessions?node=a");
        for bad in [
            "https://evil.example/",
            "//evil.example/",
            "/\\evil.example",
            "evil",
            "/auth/logout",
            "/a\tb",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn cookies_and_hosts() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; sluice_session=xyz; b=2"),
        );
        assert_eq!(cookie(&h, "sluice_session").as_deref(), Some("xyz"));
        assert_eq!(cookie(&h, "sluice"), None);
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8470"));
        assert!(loopback_host(&h));
        h.insert(header::HOST, HeaderValue::from_static("evil.example:8470"));
        assert!(!loopback_host(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site_fetch(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(!cross_site_fetch(&h));
    }
}
