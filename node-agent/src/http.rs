//! The intercepted HTTP path: hyper on both sides, HTTP/1.1 (keep-alive,
//! upgrades) or HTTP/2 (multiplexed) as negotiated with the upstream.
//! Bodies stream through a `Tap` that keeps a capped copy for the record;
//! nothing is ever buffered whole, so SSE and large downloads flow as they
//! arrive. Each request/response pair is recorded as an exchange when it
//! ends.
use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::Incoming,
    header::{HeaderMap, HeaderValue, CONTENT_TYPE, HOST, UPGRADE},
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{oneshot, Mutex},
};
use tracing::{debug, info, warn};

use crate::{
    approvals::{self, Approvals, Pending},
    identity::WorkloadIdentity,
    policy::{Decision, PolicyEngine, Verdict},
    record::{now_ms, BodyRecord, Exchange, Header, Injection, RecordStore},
    scan::StreamMasker,
    suspend::Suspensions,
};

type UpBody = BoxBody<Bytes, hyper::Error>;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = BoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("upstream HTTP handshake: {0}")]
    UpstreamHandshake(hyper::Error),
    #[error("serving the client: {0}")]
    Serve(hyper::Error),
}

/// Headers whose values are credentials: stored only as a fingerprint.
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-goog-api-key",
    "x-amz-security-token",
];

/// What one intercepted connection's exchanges share.
pub struct HttpSession {
    pub session: u64,
    pub workload: String,
    pub authority: String,
    pub store: Arc<RecordStore>,
    pub body_cap: usize,
    pub next_seq: AtomicU32,
    /// HTTP/1.1: the previous exchange's "stored durably" signal. The next
    /// request on the connection waits for it, so a completed exchange is
    /// never more than one request behind the store (kill -9 loses at
    /// most the exchange in flight).
    pub prev_durable: Mutex<Option<oneshot::Receiver<()>>>,
    pub target: String,
    pub identity: WorkloadIdentity,
    pub policy: Arc<PolicyEngine>,
    pub approvals: Arc<Approvals>,
    pub suspensions: Arc<Suspensions>,
    /// Largest request body buffered for scanning; bigger ones are refused
    /// (fail closed) when request rules apply.
    pub max_scan_request: usize,
}

enum Upstream {
    H1(Mutex<hyper::client::conn::http1::SendRequest<Tap<UpBody>>>),
    H2(hyper::client::conn::http2::SendRequest<Tap<UpBody>>),
}

/// Serves one intercepted connection until either side closes.
pub async fn serve<D, U>(
    downstream: D,
    upstream: U,
    h2: bool,
    session: Arc<HttpSession>,
) -> Result<(), HttpError>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let up = if h2 {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(upstream))
                .await
                .map_err(HttpError::UpstreamHandshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream h2 connection ended");
            }
        });
        Upstream::H2(sender)
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(upstream))
            .await
            .map_err(HttpError::UpstreamHandshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream h1 connection ended");
            }
        });
        Upstream::H1(Mutex::new(sender))
    };
    let up = Arc::new(up);
    let svc = service_fn(move |req| {
        let up = up.clone();
        let session = session.clone();
        async move { Ok::<_, std::convert::Infallible>(session.exchange(req, &up).await) }
    });
    let io = TokioIo::new(downstream);
    if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await
            .map_err(HttpError::Serve)
    } else {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades()
            .await
            .map_err(HttpError::Serve)
    }
}

/// Serves a connection whose upstream could not be reached safely: every
/// request gets a 502 that says why, so the client sees a clear error
/// instead of a TLS alert it cannot explain.
pub async fn serve_error<D>(downstream: D, h2: bool, message: String)
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |_req: Request<Incoming>| {
        let message = message.clone();
        async move {
            Ok::<_, std::convert::Infallible>(error_response(StatusCode::BAD_GATEWAY, &message))
        }
    });
    let io = TokioIo::new(downstream);
    let _ = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .serve_connection(io, svc)
            .await
    };
}

pub fn error_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": message, "by": "sluice" }).to_string();
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

impl HttpSession {
    async fn exchange(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        up: &Upstream,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let started_at_ms = now_ms();
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| self.authority.clone());
        let mut ex = Exchange {
            session: self.session,
            seq,
            workload: self.workload.clone(),
            started_at_ms,
            method: req.method().to_string(),
            authority,
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "/".into()),
            http_version: format!("{:?}", req.version()),
            request_headers: headers(req.headers()),
            request_body: BodyRecord::default(),
            request_trailers: Vec::new(),
            status: None,
            response_headers: Vec::new(),
            response_body: BodyRecord::default(),
            response_trailers: Vec::new(),
            ttfb_ms: None,
            duration_ms: 0.0,
            upgrade: None,
            error: None,
            decisions: Vec::new(),
            injected: None,
        };
        let upgrade = matches!(up, Upstream::H1(_)) && req.headers().contains_key(UPGRADE);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let durable_tx = if matches!(up, Upstream::H1(_)) {
            let mut prev = self.prev_durable.lock().await;
            if let Some(rx) = prev.take() {
                let _ = rx.await;
            }
            let (tx, rx) = oneshot::channel();
            *prev = Some(rx);
            Some(tx)
        } else {
            None
        };
        let policy = self.policy.current();
        if let Some(susp) = self.suspensions.get(&self.identity.id) {
            ex.decisions.push(Decision {
                rule: "identity-suspended".into(),
                action: "block".into(),
                patterns: vec![],
                detail: Some(susp.reason.clone()),
            });
            return self
                .refuse(
                    ex,
                    started,
                    durable_tx,
                    StatusCode::FORBIDDEN,
                    serde_json::json!({
                        "error": "identity suspended",
                        "identity": self.identity.id,
                        "reason": susp.reason,
                    }),
                )
                .await;
        }
        let (mut parts, body) = req.into_parts();
        let up_body: UpBody = if policy.has_request_rules(&self.target, &self.identity) {
            // Prompts are scanned whole before anything is forwarded.
            let bytes = match http_body_util::Limited::new(body, self.max_scan_request)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let too_big = e
                        .downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some();
                    let (status, msg) = if too_big {
                        (
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!(
                                "request body larger than the {} bytes the policy can scan",
                                self.max_scan_request
                            ),
                        )
                    } else {
                        (
                            StatusCode::BAD_REQUEST,
                            format!("reading request body: {e}"),
                        )
                    };
                    ex.error = Some(msg.clone());
                    return self
                        .refuse(
                            ex,
                            started,
                            durable_tx,
                            status,
                            serde_json::json!({"error": msg}),
                        )
                        .await;
                }
            };
            ex.request_body.size = bytes.len() as u64;
            ex.request_body
                .set_bytes(bytes[..bytes.len().min(self.body_cap)].to_vec());
            ex.request_body.truncated = bytes.len() > self.body_cap;
            ex.request_body.complete = true;
            let (verdict, decisions) =
                match policy.evaluate_request(&self.target, &self.identity, &bytes) {
                    Ok(v) => v,
                    Err(e) => {
                        // Fail closed: what cannot be scanned is not forwarded.
                        ex.error = Some(format!("policy scan failed: {e}"));
                        return self
                            .refuse(
                                ex,
                                started,
                                durable_tx,
                                StatusCode::SERVICE_UNAVAILABLE,
                                serde_json::json!({"error": "policy scan failed"}),
                            )
                            .await;
                    }
                };
            ex.decisions.extend(decisions);
            match verdict {
                Verdict::Allow => {}
                Verdict::Block { rule, message } => {
                    warn!(session = self.session, workload = %self.identity.id, %rule, "request blocked by policy");
                    return self
                        .refuse(
                            ex,
                            started,
                            durable_tx,
                            StatusCode::FORBIDDEN,
                            serde_json::json!({
                                "error": "blocked by policy", "rule": rule, "message": message,
                            }),
                        )
                        .await;
                }
                Verdict::Approve {
                    rule,
                    message,
                    timeout_secs,
                } => {
                    let pending = Pending {
                        id: 0,
                        session: self.session,
                        workload: self.identity.id.clone(),
                        rule: rule.clone(),
                        message: message.clone(),
                        method: ex.method.clone(),
                        authority: ex.authority.clone(),
                        path: ex.path.clone(),
                        preview: String::from_utf8_lossy(&bytes[..bytes.len().min(512)])
                            .into_owned(),
                        created_ms: 0,
                        expires_ms: 0,
                    };
                    info!(session = self.session, workload = %self.identity.id, %rule, "request held for approval");
                    let outcome = self
                        .approvals
                        .request(pending, std::time::Duration::from_secs(timeout_secs))
                        .await;
                    let detail = serde_json::to_string(&outcome).unwrap_or_default();
                    if let Some(d) = ex.decisions.iter_mut().find(|d| d.rule == rule) {
                        d.detail = Some(detail);
                    }
                    let denial = match outcome {
                        approvals::Outcome::Approved { .. } => None,
                        approvals::Outcome::Denied { reason, .. } => {
                            Some(format!("denied: {reason}"))
                        }
                        approvals::Outcome::TimedOut => {
                            Some(format!("no approval within {timeout_secs}s"))
                        }
                    };
                    // A suspension while held also denies.
                    let denial = denial.or_else(|| {
                        self.suspensions
                            .get(&self.identity.id)
                            .map(|s| format!("identity suspended: {}", s.reason))
                    });
                    if let Some(reason) = denial {
                        return self
                            .refuse(ex, started, durable_tx, StatusCode::FORBIDDEN, serde_json::json!({
                                "error": "not approved", "rule": rule, "message": message, "reason": reason,
                            }))
                            .await;
                    }
                }
            }
            Full::new(bytes).map_err(|e| match e {}).boxed()
        } else {
            body.boxed()
        };
        if let Some(cred) = policy.credential(&self.target) {
            let mut presented = Vec::new();
            for h in &cred.strip {
                for v in parts.headers.get_all(h.as_str()) {
                    presented.push(Header {
                        name: h.clone(),
                        value: format!("sha256:{}", fingerprint(v.as_bytes())),
                    });
                }
                parts.headers.remove(h.as_str());
            }
            match (
                hyper::header::HeaderName::from_bytes(cred.header.as_bytes()),
                HeaderValue::from_str(cred.value.expose()),
            ) {
                (Ok(name), Ok(mut value)) => {
                    value.set_sensitive(true);
                    parts.headers.insert(name, value);
                }
                _ => {
                    ex.error = Some("node credential is not a valid header".into());
                    return self
                        .refuse(
                            ex,
                            started,
                            durable_tx,
                            StatusCode::INTERNAL_SERVER_ERROR,
                            serde_json::json!({"error": "node credential misconfigured"}),
                        )
                        .await;
                }
            }
            ex.injected = Some(Injection {
                header: cred.header.clone(),
                client_presented: presented,
            });
        }
        let masks = policy.masks_responses(&self.target, &self.identity);
        if masks {
            // Scan what the client will read: ask the upstream for an
            // uncompressed body (decoding would change lengths).
            parts.headers.insert(
                hyper::header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        let (req_tap, req_rx) = Tap::new(up_body, self.body_cap);
        let up_req = Request::from_parts(parts, req_tap);
        let result = match up {
            Upstream::H1(sender) => {
                let mut sender = sender.lock().await;
                match sender.ready().await {
                    Ok(()) => sender.send_request(up_req).await,
                    Err(e) => Err(e),
                }
            }
            Upstream::H2(sender) => sender.clone().send_request(up_req).await,
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                warn!(session = self.session, workload = %self.workload, error = %e, "upstream request failed");
                ex.error = Some(format!("upstream: {e}"));
                ex.duration_ms = ms(started);
                let this = self.clone();
                tokio::spawn(async move {
                    ex.request_body = req_rx.await.unwrap_or_default().body;
                    this.finish(ex, durable_tx).await;
                });
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("upstream request failed: {e}"),
                );
            }
        };
        ex.ttfb_ms = Some(ms(started));
        ex.status = Some(resp.status().as_u16());
        ex.response_headers = headers(resp.headers());

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let proto = resp
                    .headers()
                    .get(UPGRADE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("unknown")
                    .to_owned();
                ex.upgrade = Some(proto);
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let this = self.clone();
                tokio::spawn(async move {
                    // The upgraded stream is relayed as bytes and recorded
                    // as an upgrade (its contents are not parsed).
                    if let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) {
                        let (cr, cw) = tokio::io::split(TokioIo::new(c));
                        let (ur, uw) = tokio::io::split(TokioIo::new(u));
                        let (up, down) = tokio::join!(pump(cr, uw), pump(ur, cw));
                        ex.request_body.size = up.0;
                        ex.response_body.size = down.0;
                        if let Some(e) = up.1.or(down.1) {
                            ex.error = Some(format!("upgraded stream: {e}"));
                        }
                    }
                    ex.duration_ms = ms(started);
                    this.finish(ex, durable_tx).await;
                });
                let (parts, _) = resp.into_parts();
                return Response::from_parts(
                    parts,
                    http_body_util::Empty::new().map_err(|e| match e {}).boxed(),
                );
            }
        }

        let (parts, body) = resp.into_parts();
        let masked = Arc::new(std::sync::Mutex::new(MaskReport::default()));
        let body: UpBody = if masks {
            let sse = parts
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|c| c.starts_with("text/event-stream"));
            let (p, target, identity) =
                (policy.clone(), self.target.clone(), self.identity.clone());
            let masker = StreamMasker::new(
                policy.clone(),
                sse,
                Box::new(move |rule| {
                    p.rule(rule).action == crate::policy::bundle::Action::Mask
                        && p.rule_applies(rule, &target, &identity)
                }),
            );
            MaskBody::new(body, masker, masked.clone()).boxed()
        } else {
            body.boxed()
        };
        let (resp_tap, resp_rx) = Tap::new(body, self.body_cap);
        let this = self.clone();
        let mask_policy = policy.clone();
        tokio::spawn(async move {
            let (rq, rs) = tokio::join!(req_rx, resp_rx);
            let rq = rq.unwrap_or_default();
            let rs = rs.unwrap_or_default();
            ex.request_trailers = rq.trailers.clone();
            ex.response_trailers = rs.trailers.clone();
            ex.request_body = rq.body;
            if !rs.body.complete && ex.error.is_none() {
                ex.error =
                    Some("response body did not complete (client or upstream went away)".into());
            }
            ex.response_body = rs.body;
            let report = std::mem::take(&mut *masked.lock().unwrap_or_else(|e| e.into_inner()));
            let mut by_rule: std::collections::BTreeMap<usize, (Vec<String>, u64)> =
                Default::default();
            for ((rule, pattern), n) in report.masked {
                let e = by_rule.entry(rule).or_default();
                e.0.push(pattern);
                e.1 += n;
            }
            for (rule, (patterns, n)) in by_rule {
                ex.decisions.push(Decision {
                    rule: mask_policy.rule(rule).id.clone(),
                    action: "mask".into(),
                    patterns,
                    detail: Some(format!("{n} span(s) masked in the response")),
                });
            }
            if let Some(e) = report.error {
                ex.error = Some(format!("response scan failed, stream cut: {e}"));
            }
            ex.duration_ms = ms(started);
            this.finish(ex, durable_tx).await;
        });
        Response::from_parts(parts, resp_tap.map_err(|e| Box::new(e) as BoxError).boxed())
    }

    /// Answers the client without contacting the upstream, and records it.
    async fn refuse(
        &self,
        mut ex: Exchange,
        started: Instant,
        durable: Option<oneshot::Sender<()>>,
        status: StatusCode,
        body: serde_json::Value,
    ) -> Response<ProxyBody> {
        let text = body.to_string();
        ex.status = Some(status.as_u16());
        ex.response_headers = vec![Header {
            name: "content-type".into(),
            value: "application/json".into(),
        }];
        ex.response_body.size = text.len() as u64;
        ex.response_body.set_bytes(text.clone().into_bytes());
        ex.response_body.complete = true;
        ex.ttfb_ms = Some(ms(started));
        ex.duration_ms = ms(started);
        // The refusal is recorded before the client hears about it.
        self.finish(ex, durable).await;
        let mut resp = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }

    async fn finish(&self, ex: Exchange, durable: Option<oneshot::Sender<()>>) {
        if let Err(e) = self.store.put_exchange(&ex) {
            warn!(session = self.session, workload = %self.workload, error = %e, "recording exchange failed");
            return;
        }
        // Completed exchanges must survive kill -9.
        let _ = self.store.flush().await;
        if let Some(tx) = durable {
            let _ = tx.send(());
        }
    }
}

/// Copies one direction, counting bytes even when it ends in an error (a
/// peer that drops TLS without close_notify still moved those bytes).
async fn pump<R, W>(mut r: R, mut w: W) -> (u64, Option<std::io::Error>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut n = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => {
                let _ = w.shutdown().await;
                return (n, None);
            }
            Ok(k) => {
                if let Err(e) = w.write_all(&buf[..k]).await {
                    return (n, Some(e));
                }
                n += k as u64;
            }
            Err(e) => {
                let _ = w.shutdown().await;
                return (n, Some(e));
            }
        }
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Header list for the record, credentials replaced by a fingerprint.
pub fn headers(map: &HeaderMap) -> Vec<Header> {
    map.iter()
        .map(|(name, value)| {
            let n = name.as_str();
            if CREDENTIAL_HEADERS.contains(&n) {
                Header {
                    name: n.to_owned(),
                    value: format!("[credential sha256:{}]", fingerprint(value.as_bytes())),
                }
            } else {
                Header {
                    name: n.to_owned(),
                    value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
                }
            }
        })
        .collect()
}

/// First 16 hex digits of SHA-256: enough to tell keys apart, useless to
/// recover them.
pub fn fingerprint(secret: &[u8]) -> String {
    hex::encode(&Sha256::digest(secret)[..8])
}

#[derive(Default)]
pub struct MaskReport {
    pub masked: std::collections::BTreeMap<(usize, String), u64>,
    pub error: Option<String>,
}

/// A response body passed through a `StreamMasker`: frames flow as soon
/// as they are past the hold-back window; lengths never change.
pub struct MaskBody<B> {
    inner: B,
    masker: StreamMasker,
    report: Arc<std::sync::Mutex<MaskReport>>,
    /// Trailers waiting for the flushed tail to go out first.
    trailers: Option<HeaderMap>,
    done: bool,
}

impl<B> MaskBody<B> {
    pub fn new(inner: B, masker: StreamMasker, report: Arc<std::sync::Mutex<MaskReport>>) -> Self {
        Self {
            inner,
            masker,
            report,
            trailers: None,
            done: false,
        }
    }

    fn report(&mut self) {
        let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
        r.masked = self.masker.masked.clone();
        r.error = self.masker.error.clone();
    }
}

impl<B> Body for MaskBody<B>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.masker.push(&data);
                        if this.masker.error.is_some() {
                            this.report();
                            this.done = true;
                            continue;
                        }
                        if !out.is_empty() {
                            this.report();
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            this.trailers = Some(t);
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    this.report();
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    let tail = this.masker.finish();
                    this.report();
                    this.done = true;
                    if !tail.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Masking preserves length.
        self.inner.size_hint()
    }
}

/// What a `Tap` saw of its body.
#[derive(Default)]
pub struct Captured {
    pub body: BodyRecord,
    pub trailers: Vec<Header>,
}

/// A body that passes every frame through unchanged and keeps the first
/// `cap` bytes for the record.
pub struct Tap<B> {
    inner: B,
    cap: usize,
    seen: Captured,
    captured: Vec<u8>,
    tx: Option<oneshot::Sender<Captured>>,
}

impl<B: Body> Tap<B> {
    pub fn new(inner: B, cap: usize) -> (Self, oneshot::Receiver<Captured>) {
        let (tx, rx) = oneshot::channel();
        (
            Tap {
                inner,
                cap,
                seen: Captured::default(),
                captured: Vec::new(),
                tx: Some(tx),
            },
            rx,
        )
    }
}

impl<B> Tap<B> {
    fn finish(&mut self, complete: bool) {
        if let Some(tx) = self.tx.take() {
            let mut seen = std::mem::take(&mut self.seen);
            seen.body.set_bytes(std::mem::take(&mut self.captured));
            seen.body.complete = complete;
            let _ = tx.send(seen);
        }
    }
}

impl<B> Body for Tap<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen.body.size += data.len() as u64;
                    let room = this.cap.saturating_sub(this.captured.len());
                    if data.len() > room {
                        this.seen.body.truncated = true;
                    }
                    this.captured
                        .extend_from_slice(&data[..room.min(data.len())]);
                } else if let Some(t) = frame.trailers_ref() {
                    this.seen.trailers = headers(t);
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // Preserves Content-Length on the other side.
        self.inner.size_hint()
    }
}

impl<B> Drop for Tap<B> {
    fn drop(&mut self) {
        // A body never polled because it was empty is complete; anything
        // else dropped before its end was cut short.
        let complete = self.seen.body.size == 0;
        self.finish(complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tap_passes_everything_and_caps_the_copy() {
        let data = Bytes::from(vec![b'a'; 1000]);
        let (tap, rx) = Tap::new(Full::new(data.clone()), 100);
        let out = tap.collect().await.unwrap().to_bytes();
        assert_eq!(out, data, "the body is forwarded unchanged");
        let c = rx.await.unwrap();
        assert_eq!(c.body.size, 1000);
        assert!(c.body.truncated);
        assert!(c.body.complete);
        assert_eq!(c.body.text.as_deref().map(str::len), Some(100));
    }

    #[test]
    fn credentials_are_fingerprinted() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer sk-secret"),
        );
        h.insert("accept", HeaderValue::from_static("*/*"));
        let out = headers(&h);
        let auth = out.iter().find(|h| h.name == "authorization").unwrap();
        assert!(!auth.value.contains("sk-secret"));
        assert_eq!(
            auth.value,
            format!("[credential sha256:{}]", fingerprint(b"Bearer sk-secret"))
        );
        assert_eq!(
            out.iter().find(|h| h.name == "accept").unwrap().value,
            "*/*"
        );
    }
}
