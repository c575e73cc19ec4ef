//! The web UI and its JSON API (axum): searches, replays, nodes, and the
//! fleet actions (approvals, suspensions). Every response carries a
//! Content-Security-Policy that allows no inline script (only the
//! console's own `/assets/live.js`), no framing and no outside resource.
use std::sync::Arc;

use axum::{
    extract::{Path, Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
    Form, Json, Router,
};
use serde::Deserialize;
use serde_json::json;
use sluice_fleet::{approval::Verdict, suspension::Scope};

use crate::{
    auth::{self, Auth, Principal, Role},
    fleet::{self, Fleet, FleetError},
    pages::{self, fleet::Flash},
    store::{AuditRow, Filter, Store, StoreError},
};

/// What every handler may use: the store and who is asking (`auth`).
#[derive(Clone)]
pub struct App {
    pub store: Arc<Store>,
    pub auth: Arc<Auth>,
    pub fleet: Arc<Fleet>,
    /// The fleet's bundle bucket (`--bundles-bucket`).
    pub bundles_bucket: Arc<str>,
}

impl axum::extract::FromRef<App> for Arc<Auth> {
    fn from_ref(app: &App) -> Self {
        app.auth.clone()
    }
}

/// Errors rendered in one place: a status and a message, never a panic.
pub enum WebError {
    NotFound(String),
    /// Not logged in (API: 401; pages go to the login).
    Unauthenticated,
    /// Logged in, but the role does not allow it.
    Forbidden(String),
    /// A login, an API token or a cross-site request refused.
    Auth(crate::auth::AuthError),
    Store(StoreError),
    Task(String),
    /// A fleet action that did not happen (API callers get it as JSON).
    Fleet(FleetError),
    BadRequest(String),
}

impl From<FleetError> for WebError {
    fn from(e: FleetError) -> Self {
        Self::Fleet(e)
    }
}

fn fleet_status(e: &FleetError) -> StatusCode {
    match e {
        FleetError::NotHeld { .. } => StatusCode::NOT_FOUND,
        FleetError::Refused { .. } | FleetError::Conflict | FleetError::ForeignList(_) => {
            StatusCode::CONFLICT
        }
        FleetError::Invalid(_) => StatusCode::BAD_REQUEST,
        FleetError::NoAnswer { .. } => StatusCode::GATEWAY_TIMEOUT,
        FleetError::Offline(_) | FleetError::Nats(_) | FleetError::Sign(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

impl From<StoreError> for WebError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        match self {
            Self::NotFound(what) => (
                StatusCode::NOT_FOUND,
                Html(pages::not_found(&what).into_string()),
            )
                .into_response(),
            Self::Unauthenticated => crate::auth::unauthenticated(),
            Self::Auth(e) => e.into_response(),
            Self::Forbidden(why) => (
                StatusCode::FORBIDDEN,
                Html(pages::forbidden(&why).into_string()),
            )
                .into_response(),
            Self::Store(e) => {
                tracing::warn!(error = %e, "store query failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "store error").into_response()
            }
            Self::Task(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
            Self::Fleet(e) => {
                (fleet_status(&e), Json(json!({ "error": e.to_string() }))).into_response()
            }
            Self::BadRequest(m) => {
                (StatusCode::BAD_REQUEST, Json(json!({ "error": m }))).into_response()
            }
        }
    }
}

/// Runs a store query off the async runtime.
async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, WebError> {
    let s = store.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| WebError::Task(e.to_string()))?
        .map_err(WebError::from)
}

async fn sessions_page(
    _who: Principal,
    State(app): State<App>,
    Query(f): Query<Filter>,
) -> Result<Html<String>, WebError> {
    let f2 = f.clone();
    let rows = blocking(&app.store, move |st| st.sessions(&f2)).await?;
    Ok(Html(pages::sessions(&f, &rows).into_string()))
}

async fn replay_page(
    _who: Principal,
    State(app): State<App>,
    Path((node, id)): Path<(String, u64)>,
) -> Result<Html<String>, WebError> {
    let n = node.clone();
    let (found, info) = blocking(&app.store, move |st| {
        Ok((st.session(&n, id)?, st.node(&n)?))
    })
    .await?;
    let (session, ex) =
        found.ok_or_else(|| WebError::NotFound(format!("no session {id} on {node}")))?;
    Ok(Html(
        pages::replay(&session, &ex, info.as_ref()).into_string(),
    ))
}

/// A session as JSON lines with its proof (`sluice verify --export`).
async fn export_jsonl(
    _who: Principal,
    State(app): State<App>,
    Path((node, id)): Path<(String, u64)>,
) -> Result<Response, WebError> {
    let n = node.clone();
    let text = blocking(&app.store, move |st| crate::export::jsonl(st, &n, id))
        .await?
        .ok_or_else(|| WebError::NotFound(format!("no session {id} on {node}")))?;
    let file = format!(
        "attachment; filename=\"sluice-{}-{id}.jsonl\"",
        node.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_owned()),
            (header::CONTENT_DISPOSITION, file),
        ],
        text,
    )
        .into_response())
}

/// A session as HAR 1.2 (browser dev tools open it) with its proof in
/// `log._evidence` (`sluice verify --export` checks it too).
async fn export_har(
    _who: Principal,
    State(app): State<App>,
    Path((node, id)): Path<(String, u64)>,
) -> Result<Response, WebError> {
    let n = node.clone();
    let har = blocking(&app.store, move |st| crate::export::har(st, &n, id))
        .await?
        .ok_or_else(|| WebError::NotFound(format!("no session {id} on {node}")))?;
    let file = format!(
        "attachment; filename=\"sluice-{}-{id}.har\"",
        node.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::CONTENT_DISPOSITION, file),
        ],
        har.to_string(),
    )
        .into_response())
}

async fn policy_html(app: &App, who: &Principal, f: Flash) -> Result<Html<String>, WebError> {
    let published = app.fleet.bundle(&app.bundles_bucket).await;
    let changes = history(app, POLICY).await?;
    Ok(Html(
        pages::fleet::policy(who, &published, &app.fleet.beats(), &changes, &f).into_string(),
    ))
}

const POLICY: &[&str] = &["publish", "publish.failed"];

async fn policy_page(who: Principal, State(app): State<App>) -> Result<Html<String>, WebError> {
    policy_html(&app, &who, Flash::None).await
}

#[derive(Deserialize)]
struct PublishForm {
    jws: String,
    #[serde(default)]
    csrf: String,
}

async fn publish(
    app: &App,
    who: &Principal,
    jws: &str,
) -> Result<fleet::PublishedBundle, FleetError> {
    let r = app.fleet.publish_bundle(&app.bundles_bucket, jws).await;
    let (action, subject, detail) = match &r {
        Ok(b) => (
            "publish",
            format!("bundle {} v{}", b.name, b.version),
            json!({"signer": b.signer, "revision": b.revision}),
        ),
        Err(e) => (
            "publish.failed",
            "bundle".to_owned(),
            json!({"error": e.to_string()}),
        ),
    };
    audit(app, who, action, subject, detail).await;
    r
}

async fn publish_form(
    who: Principal,
    State(app): State<App>,
    headers: HeaderMap,
    Form(f): Form<PublishForm>,
) -> Result<Html<String>, WebError> {
    auth::state_change(&who, &headers, Some(&f.csrf))?;
    who.require(Role::Admin)?;
    let flash = match publish(&app, &who, &f.jws).await {
        Ok(b) => Flash::Done(format!(
            "bundle {} version {} (signed by {}) published; each node applies it if it trusts the key",
            b.name, b.version, b.signer
        )),
        Err(e) => Flash::Failed(e.to_string()),
    };
    policy_html(&app, &who, flash).await
}

async fn api_policy(
    _who: Principal,
    State(app): State<App>,
) -> Result<Json<serde_json::Value>, WebError> {
    let published = app.fleet.bundle(&app.bundles_bucket).await?;
    let nodes: serde_json::Map<String, serde_json::Value> = app
        .fleet
        .beats()
        .into_iter()
        .map(|(n, b)| {
            (
                n,
                json!({
                    "policy_version": b.beat.status["policy_version"],
                    "policy_floor": b.beat.status["policy_floor"],
                    "policy_expired": b.beat.status["policy_expired"],
                }),
            )
        })
        .collect();
    Ok(Json(json!({ "published": published, "nodes": nodes })))
}

#[derive(Deserialize)]
struct PublishBody {
    jws: String,
}

async fn api_publish(
    who: Principal,
    State(app): State<App>,
    headers: HeaderMap,
    Json(b): Json<PublishBody>,
) -> Result<Json<serde_json::Value>, WebError> {
    auth::state_change(&who, &headers, None)?;
    who.require(Role::Admin)?;
    Ok(Json(
        json!({ "published": publish(&app, &who, &b.jws).await? }),
    ))
}

async fn nodes_page(_who: Principal, State(app): State<App>) -> Result<Html<String>, WebError> {
    let rows = blocking(&app.store, |st| st.nodes()).await?;
    Ok(Html(
        pages::fleet::nodes(&rows, &app.fleet.beats()).into_string(),
    ))
}

fn verdict(word: &str) -> Result<Verdict, WebError> {
    match word {
        "approve" => Ok(Verdict::Approve),
        "deny" => Ok(Verdict::Deny),
        other => Err(WebError::BadRequest(format!(
            "verdict {other:?}: approve or deny"
        ))),
    }
}

fn scope(word: &str) -> Result<Scope, WebError> {
    Scope::parse(word).ok_or_else(|| {
        WebError::BadRequest(format!("scope {word:?}: identity, repository or actor"))
    })
}

/// The console's audit of fleet actions, by kind of page.
async fn history(app: &App, kinds: &'static [&'static str]) -> Result<Vec<AuditRow>, WebError> {
    let rows = blocking(&app.store, |st| st.audits(500)).await?;
    Ok(rows
        .into_iter()
        .filter(|a| kinds.contains(&a.action.as_str()))
        .take(100)
        .collect())
}

const DECISIONS: &[&str] = &["approve", "deny", "decision.failed"];
const SUSPENSIONS: &[&str] = &["suspend", "resume", "suspension.failed"];

/// Records a fleet action with the person who asked (a store failure is
/// logged: the action itself already happened, or was refused).
async fn audit(
    app: &App,
    who: &Principal,
    action: &str,
    subject: String,
    detail: serde_json::Value,
) {
    let (who_name, role, action) = (who.name.clone(), who.role.as_str(), action.to_owned());
    let r = blocking(&app.store, move |st| {
        st.audit(fleet::now_ms(), &who_name, role, &action, &subject, &detail)
    })
    .await;
    if r.is_err() {
        tracing::warn!("cannot record a fleet action in the console's audit");
    }
}

/// Decides through the fleet and audits the attempt, accepted or not.
async fn decide(
    app: &App,
    who: &Principal,
    node: &str,
    id: u64,
    v: Verdict,
    reason: &str,
) -> Result<String, FleetError> {
    let r = app.fleet.decide(node, id, v, &who.name, reason).await;
    let (action, detail) = match &r {
        Ok(m) => (
            match v {
                Verdict::Approve => "approve",
                Verdict::Deny => "deny",
            },
            json!({"reason": reason, "node_says": m}),
        ),
        Err(e) => (
            "decision.failed",
            json!({"error": e.to_string(), "verdict": v}),
        ),
    };
    audit(app, who, action, format!("{node} request {id}"), detail).await;
    r
}

async fn change_suspension(
    app: &App,
    who: &Principal,
    sc: Scope,
    value: &str,
    reason: &str,
    resume: bool,
) -> Result<sluice_fleet::suspension::List, FleetError> {
    let r = app
        .fleet
        .change_suspension(sc, value, reason, &who.name, resume)
        .await;
    let (action, detail) = match &r {
        Ok(l) => (
            if resume { "resume" } else { "suspend" },
            json!({"reason": reason, "version": l.version}),
        ),
        Err(e) => (
            "suspension.failed",
            json!({"error": e.to_string(), "resume": resume}),
        ),
    };
    audit(
        app,
        who,
        action,
        format!("{} {}", sc.as_str(), value.trim()),
        detail,
    )
    .await;
    r
}

async fn approvals_html(app: &App, who: &Principal, f: Flash) -> Result<Html<String>, WebError> {
    let recent = history(app, DECISIONS).await?;
    Ok(Html(
        pages::fleet::approvals(who, &app.fleet.held(), &recent, &f).into_string(),
    ))
}

async fn approvals_page(who: Principal, State(app): State<App>) -> Result<Html<String>, WebError> {
    approvals_html(&app, &who, Flash::None).await
}

#[derive(Deserialize)]
struct DecideForm {
    verdict: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    csrf: String,
}

/// A decision from the page: the result is shown on the page it came
/// from (no redirect carrying a message a link could forge).
async fn decide_form(
    who: Principal,
    State(app): State<App>,
    Path((node, id)): Path<(String, u64)>,
    headers: HeaderMap,
    Form(f): Form<DecideForm>,
) -> Result<Html<String>, WebError> {
    auth::state_change(&who, &headers, Some(&f.csrf))?;
    who.require(Role::Approver)?;
    let v = verdict(&f.verdict)?;
    let flash = match decide(&app, &who, &node, id, v, &f.reason).await {
        Ok(m) => Flash::Done(format!("{node}: {m}")),
        Err(e) => Flash::Failed(e.to_string()),
    };
    approvals_html(&app, &who, flash).await
}

async fn api_approvals(
    _who: Principal,
    State(app): State<App>,
) -> Result<Json<serde_json::Value>, WebError> {
    let recent = history(&app, DECISIONS).await?;
    Ok(Json(json!({ "held": app.fleet.held(), "recent": recent })))
}

#[derive(Deserialize)]
struct DecideBody {
    verdict: String,
    #[serde(default)]
    reason: String,
}

async fn api_decide(
    who: Principal,
    State(app): State<App>,
    Path((node, id)): Path<(String, u64)>,
    headers: HeaderMap,
    Json(b): Json<DecideBody>,
) -> Result<Json<serde_json::Value>, WebError> {
    auth::state_change(&who, &headers, None)?;
    who.require(Role::Approver)?;
    let v = verdict(&b.verdict)?;
    let message = decide(&app, &who, &node, id, v, &b.reason).await?;
    Ok(Json(json!({ "accepted": true, "message": message })))
}

async fn identities_html(app: &App, who: &Principal, f: Flash) -> Result<Html<String>, WebError> {
    let list = app.fleet.suspensions().await.ok().map(|(l, _)| l);
    let recent = blocking(&app.store, |st| st.sessions(&Filter::default())).await?;
    let changes = history(app, SUSPENSIONS).await?;
    Ok(Html(
        pages::fleet::identities(who, list.as_ref(), &recent, &changes, &f).into_string(),
    ))
}

async fn identities_page(who: Principal, State(app): State<App>) -> Result<Html<String>, WebError> {
    identities_html(&app, &who, Flash::None).await
}

#[derive(Deserialize)]
struct SuspendForm {
    scope: String,
    value: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    csrf: String,
}

async fn suspend_form(
    who: Principal,
    State(app): State<App>,
    headers: HeaderMap,
    Form(f): Form<SuspendForm>,
) -> Result<Html<String>, WebError> {
    auth::state_change(&who, &headers, Some(&f.csrf))?;
    who.require(Role::Approver)?;
    let sc = scope(&f.scope)?;
    let flash = match change_suspension(&app, &who, sc, &f.value, &f.reason, false).await {
        Ok(l) => Flash::Done(format!(
            "{} {} suspended on every node following the console (list version {})",
            sc.as_str(),
            f.value.trim(),
            l.version
        )),
        Err(e) => Flash::Failed(e.to_string()),
    };
    identities_html(&app, &who, flash).await
}

async fn resume_form(
    who: Principal,
    State(app): State<App>,
    headers: HeaderMap,
    Form(f): Form<SuspendForm>,
) -> Result<Html<String>, WebError> {
    auth::state_change(&who, &headers, Some(&f.csrf))?;
    who.require(Role::Admin)?;
    let sc = scope(&f.scope)?;
    let flash = match change_suspension(&app, &who, sc, &f.value, "", true).await {
        Ok(l) => Flash::Done(format!(
            "{} {} resumed (list version {})",
            sc.as_str(),
            f.value.trim(),
            l.version
        )),
        Err(e) => Flash::Failed(e.to_string()),
    };
    identities_html(&app, &who, flash).await
}

async fn api_suspensions(
    _who: Principal,
    State(app): State<App>,
) -> Result<Json<serde_json::Value>, WebError> {
    let (list, _) = app.fleet.suspensions().await?;
    Ok(Json(
        json!({ "version": list.version, "entries": list.entries }),
    ))
}

#[derive(Deserialize)]
struct SuspendBody {
    scope: String,
    value: String,
    #[serde(default)]
    reason: String,
    /// Lift the suspension instead (admin).
    #[serde(default)]
    resume: bool,
}

async fn api_suspend(
    who: Principal,
    State(app): State<App>,
    headers: HeaderMap,
    Json(b): Json<SuspendBody>,
) -> Result<Json<serde_json::Value>, WebError> {
    auth::state_change(&who, &headers, None)?;
    who.require(if b.resume {
        Role::Admin
    } else {
        Role::Approver
    })?;
    let sc = scope(&b.scope)?;
    let list = change_suspension(&app, &who, sc, &b.value, &b.reason, b.resume).await?;
    Ok(Json(
        json!({ "version": list.version, "entries": list.entries }),
    ))
}

async fn api_sessions(
    _who: Principal,
    State(app): State<App>,
    Query(f): Query<Filter>,
) -> Result<Json<serde_json::Value>, WebError> {
    let rows = blocking(&app.store, move |st| st.sessions(&f)).await?;
    Ok(Json(json!({ "sessions": rows })))
}

async fn api_session(
    _who: Principal,
    State(app): State<App>,
    Path((node, id)): Path<(String, u64)>,
) -> Result<Json<serde_json::Value>, WebError> {
    let n = node.clone();
    let (found, info) = blocking(&app.store, move |st| {
        Ok((st.session(&n, id)?, st.node(&n)?))
    })
    .await?;
    let (session, ex) =
        found.ok_or_else(|| WebError::NotFound(format!("no session {id} on {node}")))?;
    Ok(Json(json!({
        "session": session,
        "exchanges": ex,
        "chain": info.map(|n| json!({"state": n.chain_state, "detail": n.chain_detail})),
    })))
}

async fn api_nodes(
    _who: Principal,
    State(app): State<App>,
) -> Result<Json<serde_json::Value>, WebError> {
    let rows = blocking(&app.store, |st| st.nodes()).await?;
    let beats: serde_json::Map<String, serde_json::Value> = app
        .fleet
        .beats()
        .into_iter()
        .map(|(n, b)| {
            let silent = Fleet::silent(&b);
            (
                n,
                json!({"heartbeat": b.beat, "received_ms": b.received_ms, "silent": silent}),
            )
        })
        .collect();
    Ok(Json(json!({ "nodes": rows, "heartbeats": beats })))
}

async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        // Not `no-referrer`: under it Chromium sends `Origin: null` with
        // the console's own form posts, which the cross-site guard refuses.
        // `same-origin` still tells no other site where a link came from.
        HeaderValue::from_static("same-origin"),
    );
    resp
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/sessions") }))
        .route("/sessions", get(sessions_page))
        .route("/sessions/{node}/{id}", get(replay_page))
        .route("/nodes", get(nodes_page))
        .route("/approvals", get(approvals_page))
        .route("/approvals/{node}/{id}", post(decide_form))
        .route("/identities", get(identities_page))
        .route("/identities/suspend", post(suspend_form))
        .route("/identities/resume", post(resume_form))
        .route("/policy", get(policy_page).post(publish_form))
        .route("/api/policy", get(api_policy).post(api_publish))
        .route("/api/approvals", get(api_approvals))
        .route("/api/approvals/{node}/{id}", post(api_decide))
        .route("/api/suspensions", get(api_suspensions).post(api_suspend))
        .route(
            "/assets/live.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    pages::fleet::LIVE_JS,
                )
            }),
        )
        .route("/api/sessions", get(api_sessions))
        .route("/api/sessions/{node}/{id}", get(api_session))
        .route("/api/sessions/{node}/{id}/export.jsonl", get(export_jsonl))
        .route("/api/sessions/{node}/{id}/export.har", get(export_har))
        .route("/api/nodes", get(api_nodes))
        .route("/healthz", get(|| async { "ok" }))
        .merge(crate::auth::routes())
        .layer(axum::middleware::from_fn_with_state(
            app.auth.clone(),
            crate::auth::guard,
        ))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(app)
}
