//! The intercepted HTTP path: hyper on both sides, HTTP/1.1 (keep-alive,
//! upgrades) or HTTP/2 (multiplexed) as negotiated with the upstream.
//! Bodies stream through a `Tap` that keeps a capped copy for the record;
//! nothing is ever buffered whole, so SSE and large downloads flow as they
//! arrive. Each request/response pair is recorded as an exchange when it
//! ends.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::Incoming,
    header::{HeaderMap, HeaderValue, CONTENT_TYPE, HOST, UPGRADE},
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{oneshot, Mutex},
};
use tracing::{debug, warn};

use crate::{
    policy::Decision,
    record::{now_ms, BodyRecord, Exchange, ExchangeState, Header, Injection},
    scan::StreamMasker,
    session::Session,
    verdict::{Denial, DenialKind},
};

mod body;
pub mod clock;
pub mod decode;
pub mod deny;
mod request;
mod response;
pub mod websocket;

pub use websocket::WebSocketMode;

pub use body::{Captured, MaskBody, MaskReport, Meet, Side, Tap};

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
pub(crate) const CREDENTIAL_HEADERS: &[&str] = &[
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

/// What one intercepted HTTP connection's exchanges share: the
/// connection's `Session` and the HTTP specifics.
pub struct HttpSession {
    pub ctx: Arc<Session>,
    /// The name the TLS session was opened for (the SNI, a target name).
    pub authority: String,
    /// The name is one of the target's exact names, not only under a
    /// wildcard (node credentials go to wildcard names only when listed).
    pub exact_name: bool,
    pub body_cap: usize,
    /// HTTP/1.1: the previous exchange's "stored durably" signal. The next
    /// request on the connection waits for it, so a completed exchange is
    /// never more than one request behind the store (kill -9 loses at
    /// most the exchange in flight).
    pub prev_durable: Mutex<Option<oneshot::Receiver<()>>>,
    /// Largest request body buffered for scanning; bigger ones are refused
    /// (fail closed) when request rules apply.
    pub max_scan_request: usize,
    pub websocket: WebSocketMode,
}

impl std::ops::Deref for HttpSession {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.ctx
    }
}

enum Upstream {
    H1(Mutex<H1Upstream>),
    H2(hyper::client::conn::http2::SendRequest<Tap<UpBody>>),
}

/// How to open the upstream again: the address the job dialled, the name
/// the first connection was verified for, and the node's TLS context.
pub struct Redial {
    pub tls: Arc<crate::tls::TlsContext>,
    pub addr: std::net::SocketAddr,
    pub sni: String,
    pub connect_timeout: std::time::Duration,
}

/// An HTTP/1.1 upstream connection that is let go when idle and opened
/// again on the next request.
struct H1Upstream {
    sender: Option<hyper::client::conn::http1::SendRequest<Tap<UpBody>>>,
    redial: Option<Redial>,
    max_buf: usize,
    used: Instant,
}

impl H1Upstream {
    fn new(
        sender: hyper::client::conn::http1::SendRequest<Tap<UpBody>>,
        redial: Option<Redial>,
        max_buf: usize,
    ) -> Self {
        Self {
            sender: Some(sender),
            redial,
            max_buf,
            used: Instant::now(),
        }
    }

    /// The connection, opened again if it was let go or has closed.
    async fn ready(
        &mut self,
    ) -> Result<&mut hyper::client::conn::http1::SendRequest<Tap<UpBody>>, String> {
        self.used = Instant::now();
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let Some(r) = &self.redial else {
                return Err("the upstream connection has closed".into());
            };
            let tcp =
                tokio::time::timeout(r.connect_timeout, tokio::net::TcpStream::connect(r.addr))
                    .await
                    .map_err(|_| format!("connecting to {} again timed out", r.addr))?
                    .map_err(|e| format!("connecting to {} again: {e}", r.addr))?;
            let tls = r
                .tls
                .connect_upstream(tcp, &r.sni, &[b"http/1.1".to_vec()])
                .await
                .map_err(|e| format!("TLS to {} again: {e}", r.sni))?;
            self.sender = Some(
                h1_handshake(tls, self.max_buf)
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        let sender = self
            .sender
            .as_mut()
            .ok_or_else(|| "no upstream connection".to_owned())?;
        sender.ready().await.map_err(|e| e.to_string())?;
        Ok(sender)
    }
}

/// Opens hyper's HTTP/1.1 client on an upstream stream; its connection
/// task ends when the sender is dropped and nothing is in flight.
async fn h1_handshake<U>(
    upstream: U,
    max_buf: usize,
) -> Result<hyper::client::conn::http1::SendRequest<Tap<UpBody>>, HttpError>
where
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(max_buf)
        .handshake(TokioIo::new(upstream))
        .await
        .map_err(HttpError::UpstreamHandshake)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "upstream h1 connection ended");
        }
    });
    Ok(sender)
}

/// Lets an idle HTTP/1.1 upstream connection go, every so often, for as
/// long as the connection is served. Idle: no request for `idle`, and the
/// last exchange has ended (its response body too: dropping hyper's
/// sender while a body streams would cut the body off).
async fn let_go_when_idle(up: &Upstream, idle: std::time::Duration, session: &HttpSession) {
    let Upstream::H1(h1) = up else {
        return std::future::pending().await;
    };
    if idle.is_zero() {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(idle / 2).await;
        let exchange_open = match session.prev_durable.try_lock() {
            Ok(mut prev) => match prev.as_mut().map(|rx| rx.try_recv()) {
                Some(Err(oneshot::error::TryRecvError::Empty)) => true,
                // Done: nothing left to wait for (a receiver must not be
                // polled again once it has answered).
                Some(_) => {
                    *prev = None;
                    false
                }
                None => false,
            },
            Err(_) => true,
        };
        if exchange_open {
            continue;
        }
        // Locked: a request is being sent.
        if let Ok(mut h1) = h1.try_lock() {
            if h1.redial.is_some() && h1.sender.is_some() && h1.used.elapsed() >= idle {
                h1.sender = None;
            }
        }
    }
}

/// Serves one intercepted connection until either side closes.
pub async fn serve<D, U>(
    downstream: D,
    upstream: U,
    h2: bool,
    session: Arc<HttpSession>,
    redial: Option<Redial>,
    received: clock::Received,
) -> Result<(), HttpError>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let lim = session.limits.clone();
    let window = u32::try_from(lim.http_max_buffer_bytes)
        .unwrap_or(u32::MAX)
        .clamp(65_535, (1 << 31) - 1);
    // Upstream streams mirror downstream ones one to one, so the server
    // side's stream cap bounds them too (and the upstream's own SETTINGS).
    let up = if h2 {
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_send_buf_size(lim.http_max_buffer_bytes)
            .initial_stream_window_size(window)
            .initial_connection_window_size(window)
            .handshake(TokioIo::new(upstream))
            .await
            .map_err(HttpError::UpstreamHandshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream h2 connection ended");
            }
        });
        Upstream::H2(sender)
    } else {
        let max_buf = lim.http_max_buffer_bytes.max(8192);
        let sender = h1_handshake(upstream, max_buf).await?;
        Upstream::H1(Mutex::new(H1Upstream::new(sender, redial, max_buf)))
    };
    let up = Arc::new(up);
    let reaper = (up.clone(), session.clone());
    let idle = std::time::Duration::from_secs(lim.upstream_idle_secs);
    let svc = service_fn(move |req| {
        let up = up.clone();
        let session = session.clone();
        async move { Ok::<_, std::convert::Infallible>(session.exchange(req, &up).await) }
    });
    let io = TokioIo::new(downstream);
    if h2 {
        // The client may open at most this many streams, and make us hold
        // at most the window (plus send buffer) per connection.
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(lim.http2_max_concurrent_streams)
            .max_send_buf_size(lim.http_max_buffer_bytes)
            .initial_stream_window_size(window)
            .initial_connection_window_size(window)
            .serve_connection(io, svc)
            .await
            .map_err(HttpError::Serve)
    } else {
        // A client that trickles its header block is cut after the
        // timeout (slowloris), and a header block beyond the buffer is 431.
        let serving = hyper::server::conn::http1::Builder::new()
            .timer(clock::HeaderClock::new(received))
            .header_read_timeout(std::time::Duration::from_secs(lim.header_read_timeout_secs))
            .max_buf_size(lim.http_max_buffer_bytes.max(8192))
            .serve_connection(io, svc)
            .with_upgrades();
        tokio::select! {
            r = serving => r.map_err(HttpError::Serve),
            _ = let_go_when_idle(&reaper.0, idle, &reaper.1) => Ok(()),
        }
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

/// Sends the request upstream (HTTP/1.1: on the connection, opened again
/// if it was let go; h2: a new stream).
async fn forward(
    up: &Upstream,
    up_req: Request<Tap<UpBody>>,
) -> Result<Response<Incoming>, String> {
    match up {
        Upstream::H1(h1) => {
            let mut h1 = h1.lock().await;
            match h1.ready().await {
                Ok(sender) => sender.send_request(up_req).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            }
        }
        Upstream::H2(sender) => sender
            .clone()
            .send_request(up_req)
            .await
            .map_err(|e| e.to_string()),
    }
}

/// Where responses are masked: asks for what the client will read
/// uncompressed, and for the whole representation.
fn ask_for_whole_identity(headers: &mut HeaderMap) {
    // Ask for what the client will read uncompressed; a response
    // compressed anyway is decoded before it is scanned.
    headers.insert(
        hyper::header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    // A masked value must not come back in pieces: each 206 part
    // would be scanned alone, and two ranges put the value back
    // together. The whole representation (200) is valid for a
    // range request.
    headers.remove(hyper::header::RANGE);
    headers.remove(hyper::header::IF_RANGE);
}

impl HttpSession {
    /// One request/response pair, stage by stage: record skeleton →
    /// ordering (HTTP/1.1 durability) → suspension → authority (421) →
    /// upgrade gate → request rules (`request.rs`) → credential injection → forward →
    /// upgrade relay or response masking (`response.rs`) → record.
    async fn exchange(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        up: &Upstream,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let mut ex = self.new_exchange(&req);
        let upgrade = matches!(up, Upstream::H1(_)) && req.headers().contains_key(UPGRADE);
        let durable_tx = self.wait_turn(up).await;
        let policy = self.policy();
        if let Err(d) = self
            .check_suspension(&mut ex.decisions)
            .and_then(|()| self.check_authority(req.headers(), req.uri(), &mut ex))
        {
            body::discard(req.into_body());
            return self.refuse(ex, started, durable_tx, d).await;
        }
        let masks = policy.masks_responses(&self.target, &self.identity);
        let request_rules = policy.has_request_rules(&self.target, &self.identity);
        let tool_rules = policy.has_tool_rules(&self.target, &self.identity);
        let inspect_ws =
            match self.upgrade_gate(req.headers(), upgrade, masks || request_rules, &mut ex) {
                Ok(inspect) => inspect,
                Err(d) => {
                    body::discard(req.into_body());
                    return self.refuse(ex, started, durable_tx, d).await;
                }
            };
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let up_body: UpBody = if request_rules || tool_rules {
            // Prompts are judged whole before anything is forwarded.
            match self.judge_request(&parts, body, &mut ex).await {
                Ok(bytes) => Full::new(bytes).map_err(|e| match e {}).boxed(),
                Err(d) => return self.refuse(ex, started, durable_tx, d).await,
            }
        } else {
            body.boxed()
        };
        if inspect_ws {
            // No compression extension: the frames must be readable.
            parts.headers.remove("sec-websocket-extensions");
        }
        if let Err(d) = self.inject_credential(&policy, &mut parts, &mut ex) {
            body::discard(up_body);
            return self.refuse(ex, started, durable_tx, d).await;
        }
        if masks || tool_rules {
            ask_for_whole_identity(&mut parts.headers);
        }
        if let Err(d) = self.record_start(&mut ex) {
            return self.refuse(ex, started, durable_tx, d).await;
        }
        let meet = Meet::new();
        let req_tap = Tap::meeting(up_body, self.body_cap, meet.clone(), Side::Request);
        let up_req = Request::from_parts(parts, req_tap);
        let resp = match forward(up, up_req).await {
            Ok(r) => r,
            Err(e) => return self.upstream_failed(ex, started, durable_tx, &meet, e),
        };
        ex.ttfb_ms = Some(ms(started));
        ex.status = Some(resp.status().as_u16());
        ex.response_headers = headers(resp.headers());

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let inspect = inspect_ws.then(|| websocket::Judge {
                    policy: policy.clone(),
                    session: self.ctx.clone(),
                    request_rules,
                    max_message: self.max_scan_request,
                });
                return self.relay_upgrade(ex, started, durable_tx, client_upgrade, resp, inspect);
            }
        }

        self.respond(
            ex, started, durable_tx, resp, meet, policy, masks, tool_rules,
        )
        .await
    }

    /// Upgrade gate: on a target with rules (`ruled`) an upgrade is
    /// inspected (WebSocket, when configured) or refused. `Ok(true)`: the
    /// upgraded stream is inspected.
    fn upgrade_gate(
        &self,
        headers: &HeaderMap,
        upgrade: bool,
        ruled: bool,
        ex: &mut Exchange,
    ) -> Result<bool, Denial> {
        let proto = headers
            .get(UPGRADE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown")
            .to_owned();
        let inspect_ws = upgrade
            && ruled
            && proto.eq_ignore_ascii_case("websocket")
            && self.websocket == WebSocketMode::Inspect;
        if upgrade && ruled && !inspect_ws {
            // Where rules apply an upgraded stream is inspected (WebSocket)
            // or refused; it is never relayed raw.
            ex.decisions.push(Decision::node_block(
                "upgrade-not-inspectable",
                format!("`{proto}` upgrade on a target with rules"),
            ));
            return Err(Denial::new(
                "upgrade-not-inspectable",
                DenialKind::Blocked,
                format!("policy rules apply to this target and `{proto}` streams are not inspected here (policy.websocket: {:?}); the upgrade would bypass them", self.websocket),
            ));
        }
        Ok(inspect_ws)
    }

    /// Records the exchange as started; a refusal if it cannot be.
    fn record_start(&self, ex: &mut Exchange) -> Result<(), Denial> {
        // Recorded (in the kernel) before a byte goes upstream; what cannot
        // be recorded is not forwarded.
        let Err(e) = self.store.start_exchange(ex) else {
            return Ok(());
        };
        warn!(session = self.id, error = %e, "cannot record the exchange; refusing");
        ex.error = Some(format!("not recorded: {e}"));
        Err(Denial::new(
            "not-recorded",
            DenialKind::NotRecorded,
            format!("the node cannot record this request: {e}"),
        ))
    }

    /// The upstream request failed: 502 to the client, the exchange
    /// recorded once the request body's copy is in.
    fn upstream_failed(
        self: &Arc<Self>,
        mut ex: Exchange,
        started: Instant,
        durable_tx: Option<oneshot::Sender<()>>,
        meet: &Meet,
        e: String,
    ) -> Response<ProxyBody> {
        warn!(session = self.id, workload = %self.identity.id, error = %e, "upstream request failed");
        ex.error = Some(format!("upstream: {e}"));
        ex.duration_ms = ms(started);
        let this = self.clone();
        meet.then(
            false,
            Box::new(move |rq, _| {
                ex.request_body = rq.body;
                this.finish(ex, durable_tx);
            }),
        );
        error_response(
            StatusCode::BAD_GATEWAY,
            &format!("upstream request failed: {e}"),
        )
    }

    /// Response stage: masking (`response.rs`, `MaskBody`) where rules
    /// apply, a capped copy for the record (`Tap`), and the exchange
    /// completed on the record once both bodies have ended.
    #[allow(clippy::too_many_arguments)]
    async fn respond(
        self: &Arc<Self>,
        mut ex: Exchange,
        started: Instant,
        durable_tx: Option<oneshot::Sender<()>>,
        resp: Response<Incoming>,
        meet: Arc<Meet>,
        policy: Arc<crate::policy::CompiledPolicy>,
        masks: bool,
        tool_rules: bool,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        let report = Arc::new(std::sync::Mutex::new(MaskReport::default()));
        let body: ProxyBody = if masks || tool_rules {
            let (p, target, identity) =
                (policy.clone(), self.target.clone(), self.identity.clone());
            let applies: crate::scan::stream::Applies = Box::new(move |rule| {
                p.rule(rule).action == crate::policy::bundle::Action::Mask
                    && p.rule_applies(rule, &target, &identity)
            });
            // Fail closed: a response that cannot be read is not sent.
            let prepared = response::prepare(&mut parts.headers).and_then(|(framing, decoder)| {
                let mut masker = StreamMasker::new(policy.clone(), framing, applies);
                response::mask_headers(&mut parts.headers, &mut masker)?;
                Ok((masker, decoder, framing))
            });
            let (masker, decoder, framing) = match prepared {
                Ok(p) => p,
                Err(e) => {
                    let d = Denial::new(
                        "response-uninspectable",
                        DenialKind::UninspectableResponse,
                        format!("response cannot be inspected: {e}"),
                    );
                    ex.error = Some(d.message.clone());
                    drop(body);
                    return self.refuse(ex, started, durable_tx, d).await;
                }
            };
            // The record keeps what the client got, as for bodies.
            ex.response_headers = headers(&parts.headers);
            let body = MaskBody::new(body, decoder, masker, report.clone());
            // Tool calls come in event streams and JSON answers.
            match framing {
                crate::scan::Framing::Sse if tool_rules => {
                    let judge = self.tool_judge(&policy, &report);
                    body.with_guard(crate::tools::stream::ToolGuard::new(judge))
                        .boxed()
                }
                crate::scan::Framing::Json if tool_rules => {
                    let judge = self.tool_judge(&policy, &report);
                    body.with_guard(crate::tools::stream::ToolGuard::document(judge))
                        .boxed()
                }
                _ => body.boxed(),
            }
        } else {
            body.map_err(|e| Box::new(e) as BoxError).boxed()
        };
        let resp_tap = Tap::meeting(body, self.body_cap, meet.clone(), Side::Response);
        let this = self.clone();
        meet.then(
            true,
            Box::new(move |rq, rs| {
                let rs = rs.unwrap_or_default();
                ex.request_trailers = rq.trailers.clone();
                ex.response_trailers = rs.trailers.clone();
                ex.request_body = rq.body;
                if !rs.body.complete && ex.error.is_none() {
                    ex.error = Some(
                        "response body did not complete (client or upstream went away)".into(),
                    );
                }
                ex.response_body = rs.body;
                mcp_results_into(&mut ex);
                let report = std::mem::take(&mut *report.lock().unwrap_or_else(|e| e.into_inner()));
                ex.decisions.extend(mask_decisions(&policy, report.masked));
                ex.decisions.extend(report.tool_decisions);
                ex.tool_calls.extend(report.tool_calls);
                if let Some(e) = report.error {
                    ex.error = Some(format!("response scan failed, stream cut: {e}"));
                }
                ex.duration_ms = ms(started);
                this.finish(ex, durable_tx);
            }),
        );
        Response::from_parts(parts, resp_tap.boxed())
    }

    /// The judge of the tool calls in this session's answers: the
    /// `on: tool_call` rules that apply here; what it decides goes into
    /// the exchange's report (a scan failure blocks: fail closed).
    fn tool_judge(
        &self,
        policy: &Arc<crate::policy::CompiledPolicy>,
        report: &Arc<std::sync::Mutex<MaskReport>>,
    ) -> crate::tools::stream::Judge {
        use crate::{
            record::{ToolCallRecord, ToolVerdict},
            tools::stream::Ruling,
            verdict::Judged,
        };
        let (p, target, identity, report) = (
            policy.clone(),
            self.target.clone(),
            self.identity.clone(),
            report.clone(),
        );
        let (session, workload) = (self.id, self.identity.id.clone());
        let ctx = self.ctx.clone();
        Box::new(move |call| {
            let workspace = identity.ci.as_ref().and_then(|c| c.workspace.as_deref());
            let evaluated =
                p.evaluate_tool_call_in(call, workspace, |i| p.rule_applies(i, &target, &identity));
            let mut decisions = Vec::new();
            let ruling = match ctx.judge(evaluated, &mut decisions) {
                Judged::Allow => Ruling::Allow,
                Judged::Deny(d) if p.refuses_with_text(&d.rule) => Ruling::Refuse {
                    rule: d.rule,
                    message: d.message,
                },
                Judged::Deny(d) => Ruling::Block {
                    rule: d.rule,
                    message: d.message,
                },
                Judged::Hold(hold) => {
                    // Held for a human through the session's approvals;
                    // the stream waits on this.
                    let (ctx, report, call, target) =
                        (ctx.clone(), report.clone(), call.clone(), target.clone());
                    return Ruling::Wait(Box::pin(async move {
                        let rule = hold.rule().to_owned();
                        let held = crate::verdict::Held {
                            method: "TOOL CALL".into(),
                            authority: target,
                            path: call.name.clone(),
                            preview: call.arguments.chars().take(512).collect(),
                        };
                        let outcome = ctx.hold(hold, held, &mut decisions).await;
                        let (ruling, verdict) = match outcome {
                            Ok(()) => (Ruling::Allow, ToolVerdict::Allowed),
                            Err(d) => (
                                Ruling::Block {
                                    rule: d.rule.clone(),
                                    message: d.text(),
                                },
                                ToolVerdict::Blocked,
                            ),
                        };
                        let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                        r.tool_calls
                            .push(ToolCallRecord::new(call, verdict, Some(rule)));
                        r.tool_decisions.extend(decisions);
                        ruling
                    }));
                }
            };
            let (verdict, rule) = match &ruling {
                Ruling::Allow | Ruling::Wait(_) => (ToolVerdict::Allowed, None),
                Ruling::Block { rule, .. } | Ruling::Refuse { rule, .. } => {
                    warn!(session, workload = %workload, rule = %rule, tool = %call.name, "tool call blocked");
                    (ToolVerdict::Blocked, Some(rule.clone()))
                }
            };
            let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
            r.tool_calls
                .push(ToolCallRecord::new(call.clone(), verdict, rule));
            r.tool_decisions.extend(decisions);
            ruling
        })
    }

    fn new_exchange(&self, req: &Request<Incoming>) -> Exchange {
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
        Exchange {
            session: self.id,
            seq: self.next_seq(),
            state: ExchangeState::Started,
            workload: self.identity.id.clone(),
            started_at_ms: now_ms(),
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
            tool_calls: Vec::new(),
        }
    }

    /// HTTP/1.1: waits for the previous exchange on this connection to be
    /// durable, and returns the signal this one will give.
    async fn wait_turn(&self, up: &Upstream) -> Option<oneshot::Sender<()>> {
        if !matches!(up, Upstream::H1(_)) {
            return None;
        }
        let mut prev = self.prev_durable.lock().await;
        if let Some(rx) = prev.take() {
            let _ = rx.await;
        }
        let (tx, rx) = oneshot::channel();
        *prev = Some(rx);
        Some(tx)
    }

    /// The request must be for the name the TLS session was opened for
    /// (the SNI, already a target name): `Host` and `:authority` / an
    /// absolute URI, port ignored, normalised. Anything else (domain
    /// fronting, a coalesced HTTP/2 connection, no authority at all) is
    /// 421 Misdirected Request, recorded, and never gets the credential.
    fn check_authority(
        &self,
        headers: &HeaderMap,
        uri: &hyper::Uri,
        ex: &mut Exchange,
    ) -> Result<(), Denial> {
        let mut named: Vec<String> = headers
            .get_all(HOST)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        if let Some(a) = uri.authority() {
            named.push(a.as_str().to_owned());
        }
        let sni = crate::names::DnsName::parse(&self.authority);
        let mismatch = if named.is_empty() {
            Some("the request names no host".to_owned())
        } else {
            named
                .iter()
                .find_map(|a| match (crate::names::DnsName::from_authority(a), &sni) {
                    (Ok(n), Ok(s)) if n == *s => None,
                    _ => Some(format!(
                        "request for `{a}` on a TLS session for `{}`",
                        self.authority
                    )),
                })
        };
        let Some(detail) = mismatch else {
            return Ok(());
        };
        warn!(session = self.id, workload = %self.identity.id, %detail, "misdirected request refused");
        ex.decisions
            .push(Decision::node_block("authority-mismatch", detail.clone()));
        Err(Denial::new(
            "authority-mismatch",
            DenialKind::Misdirected,
            detail,
        ))
    }

    /// Replaces the job's credential with the node's, recording the
    /// fingerprint of what the job presented.
    fn inject_credential(
        &self,
        policy: &crate::policy::CompiledPolicy,
        parts: &mut hyper::http::request::Parts,
        ex: &mut Exchange,
    ) -> Result<(), Denial> {
        let Some(cred) = policy.credential(&self.target) else {
            return Ok(());
        };
        let for_this_name = if cred.hosts.is_empty() {
            self.exact_name
        } else {
            cred.applies_to(&self.authority)
        };
        if !for_this_name {
            ex.decisions.push(Decision {
                rule: "credential-not-for-name".into(),
                action: crate::record::Action::Log,
                patterns: vec![],
                detail: Some(format!(
                    "`{}` matches the target only by a wildcard; the node credential is not injected (list it in credentials.hosts)",
                    self.authority
                )),
            });
            return Ok(());
        }
        let mut presented = Vec::new();
        for h in &cred.strip {
            for v in parts.headers.get_all(h.as_str()) {
                presented.push(Header {
                    name: h.clone(),
                    value: format!("sha256:{}", crate::record::fingerprint(v.as_bytes())),
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
                return Err(Denial::new(
                    "credential-misconfigured",
                    DenialKind::Misconfigured,
                    "node credential misconfigured",
                ));
            }
        }
        ex.injected = Some(Injection {
            header: cred.header.clone(),
            client_presented: presented,
        });
        Ok(())
    }

    /// Relays an upgraded stream: inspected frame by frame (WebSocket on a
    /// target with rules) or as bytes (no rules), and records it with its
    /// byte counts and decisions when it ends.
    fn relay_upgrade(
        self: &Arc<Self>,
        mut ex: Exchange,
        started: Instant,
        durable_tx: Option<oneshot::Sender<()>>,
        client_upgrade: hyper::upgrade::OnUpgrade,
        mut resp: Response<Incoming>,
        inspect: Option<websocket::Judge>,
    ) -> Response<ProxyBody> {
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
            match (client_upgrade.await, upstream_upgrade.await, inspect) {
                (Ok(c), Ok(u), Some(judge)) => {
                    let (p, target, identity) = (
                        judge.policy.clone(),
                        judge.session.target.clone(),
                        judge.session.identity.clone(),
                    );
                    let masker = StreamMasker::new(
                        judge.policy.clone(),
                        crate::scan::Framing::WebSocket,
                        Box::new(move |rule| {
                            p.rule(rule).action == crate::policy::bundle::Action::Mask
                                && p.rule_applies(rule, &target, &identity)
                        }),
                    );
                    let policy = judge.policy.clone();
                    let r = websocket::relay(TokioIo::new(c), TokioIo::new(u), masker, judge).await;
                    ex.request_body.size = r.up_bytes;
                    ex.response_body.size = r.down_bytes;
                    ex.decisions.extend(r.decisions);
                    ex.decisions.extend(mask_decisions(&policy, r.masked));
                    if let Some(e) = r.error {
                        ex.error = Some(format!("WebSocket: {e}"));
                    }
                }
                (Ok(c), Ok(u), None) => {
                    let (cr, cw) = tokio::io::split(TokioIo::new(c));
                    let (ur, uw) = tokio::io::split(TokioIo::new(u));
                    let moved = (AtomicU64::new(0), AtomicU64::new(0));
                    let idle = std::time::Duration::from_secs(this.limits.idle_timeout_secs);
                    let both =
                        async { tokio::join!(pump(cr, uw, &moved.0), pump(ur, cw, &moved.1)) };
                    let activity =
                        || moved.0.load(Ordering::Relaxed) + moved.1.load(Ordering::Relaxed);
                    tokio::select! {
                        (up, down) = both => {
                            if let Some(e) = up.or(down) {
                                ex.error = Some(format!("upgraded stream: {e}"));
                            }
                        }
                        _ = crate::session::idle_for(idle, activity) => {
                            ex.error = Some(format!(
                                "upgraded stream idle for {}s (limits.idle_timeout_secs)",
                                idle.as_secs()
                            ));
                        }
                    }
                    ex.request_body.size = moved.0.load(Ordering::Relaxed);
                    ex.response_body.size = moved.1.load(Ordering::Relaxed);
                }
                _ => ex.error = Some("upgrade did not complete".into()),
            }
            ex.duration_ms = ms(started);
            this.finish(ex, durable_tx);
        });
        let (parts, _) = resp.into_parts();
        Response::from_parts(
            parts,
            http_body_util::Empty::new().map_err(|e| match e {}).boxed(),
        )
    }

    /// Answers the client without contacting the upstream, and records it.
    async fn refuse(
        &self,
        mut ex: Exchange,
        started: Instant,
        durable: Option<oneshot::Sender<()>>,
        denial: Denial,
    ) -> Response<ProxyBody> {
        self.denied(&denial);
        let (status, body) = deny::render(&denial, &self.identity.id);
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
        self.finish(ex, durable);
        let mut resp = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }

    fn finish(&self, mut ex: Exchange, durable: Option<oneshot::Sender<()>>) {
        ex.state = ExchangeState::Complete;
        self.observe_exchange(&ex);
        // In the kernel when this returns (survives kill -9); on disk
        // within `records.fsync_interval_ms` (group commit).
        if let Err(e) = self.store.put_exchange(&ex) {
            self.record_failed(&e);
            return;
        }
        if let Some(tx) = durable {
            let _ = tx.send(());
        }
    }
}

/// MCP: each allowed call's result, from the response the client got.
fn mcp_results_into(ex: &mut Exchange) {
    use crate::{record::ToolApi, tools::mcp};
    if !ex.tool_calls.iter().any(|t| t.call.api == ToolApi::Mcp) {
        return;
    }
    for (id, text) in mcp::results(&ex.response_body.bytes()) {
        let id = mcp::id_text(&id);
        if let Some(t) = ex
            .tool_calls
            .iter_mut()
            .find(|t| t.call.api == ToolApi::Mcp && t.call.id == id)
        {
            t.set_result(text);
        }
    }
}

/// Recorded decisions for what the response masker did, one per rule.
fn mask_decisions(
    policy: &crate::policy::CompiledPolicy,
    masked: std::collections::BTreeMap<(usize, String), u64>,
) -> Vec<Decision> {
    let mut by_rule: std::collections::BTreeMap<usize, (Vec<String>, u64)> = Default::default();
    for ((rule, pattern), n) in masked {
        let e = by_rule.entry(rule).or_default();
        e.0.push(pattern);
        e.1 += n;
    }
    by_rule
        .into_iter()
        .map(|(rule, (patterns, n))| Decision {
            rule: policy.rule(rule).id.clone(),
            action: crate::record::Action::Mask,
            patterns,
            detail: Some(format!("{n} span(s) masked in the response")),
        })
        .collect()
}

/// Copies one direction, counting bytes in `n` as they go (also when it
/// ends in an error: a peer that drops TLS without close_notify still
/// moved those bytes; the count is the idle watchdog's activity too).
async fn pump<R, W>(mut r: R, mut w: W, n: &AtomicU64) -> Option<std::io::Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => {
                let _ = w.shutdown().await;
                return None;
            }
            Ok(k) => {
                if let Err(e) = w.write_all(&buf[..k]).await {
                    return Some(e);
                }
                n.fetch_add(k as u64, Ordering::Relaxed);
            }
            Err(e) => {
                let _ = w.shutdown().await;
                return Some(e);
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
                    value: format!(
                        "[credential sha256:{}]",
                        crate::record::fingerprint(value.as_bytes())
                    ),
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

#[cfg(test)]
mod tests {
    use super::*;

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
            format!(
                "[credential sha256:{}]",
                crate::record::fingerprint(b"Bearer sk-secret")
            )
        );
        assert_eq!(
            out.iter().find(|h| h.name == "accept").unwrap().value,
            "*/*"
        );
    }
}
