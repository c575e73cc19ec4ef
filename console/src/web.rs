//! The web UI and its JSON API (axum). Read-only for now: searches,
//! replays, nodes. Every response carries a Content-Security-Policy that
//! allows no script, no framing and no outside resource.
use std::sync::Arc;

use axum::{
    extract::{Path, Query, State},
    http::{header, HeaderValue, StatusCode},
    response::{Html, IntoResponse, Redirect, Response},
    routing::get,
    Json, Router,
};
use serde_json::json;

use crate::{
    auth::{Auth, Principal},
    pages,
    store::{Filter, Store, StoreError},
};

/// What every handler may use: the store and who is asking (`auth`).
#[derive(Clone)]
pub struct App {
    pub store: Arc<Store>,
    pub auth: Arc<Auth>,
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
    let (found, info) = blocking(&app.store, move |st| Ok((st.session(&n, id)?, st.node(&n)?))).await?;
    let (session, ex) =
        found.ok_or_else(|| WebError::NotFound(format!("no session {id} on {node}")))?;
    Ok(Html(
        pages::replay(&session, &ex, info.as_ref()).into_string(),
    ))
}

async fn nodes_page(_who: Principal, State(app): State<App>) -> Result<Html<String>, WebError> {
    let rows = blocking(&app.store, |st| st.nodes()).await?;
    Ok(Html(pages::nodes(&rows).into_string()))
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
    let (found, info) = blocking(&app.store, move |st| Ok((st.session(&n, id)?, st.node(&n)?))).await?;
    let (session, ex) =
        found.ok_or_else(|| WebError::NotFound(format!("no session {id} on {node}")))?;
    Ok(Json(json!({
        "session": session,
        "exchanges": ex,
        "chain": info.map(|n| json!({"state": n.chain_state, "detail": n.chain_detail})),
    })))
}

async fn api_nodes(_who: Principal, State(app): State<App>) -> Result<Json<serde_json::Value>, WebError> {
    let rows = blocking(&app.store, |st| st.nodes()).await?;
    Ok(Json(json!({ "nodes": rows })))
}

async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/sessions") }))
        .route("/sessions", get(sessions_page))
        .route("/sessions/{node}/{id}", get(replay_page))
        .route("/nodes", get(nodes_page))
        .route("/api/sessions", get(api_sessions))
        .route("/api/sessions/{node}/{id}", get(api_session))
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
