//! The userspace data path: accepts connections the kernel redirected,
//! recovers their origin, attributes them to a workload, forwards them to
//! the original destination and records them. A connection whose origin is
//! unknown is refused (reset), never forwarded blind.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::{
    addr::{ClientAddr, OrigDstAddr, ProxyAddr},
    attribution::IdentityResolver,
    config::{Protocol, TlsMode},
    http::{self, HttpSession},
    record::{now_ms, ConnectionRecord, Outcome, RecordHealth, RecordStore, Refusal, TlsInfo},
    redirect::Redirector,
    session::Session,
    targets::SniVerdict,
    tls::{hello, proxyable_alpn, TlsContext},
};

/// How long a client may take to send its ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub forwarded: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub active: AtomicU64,
    pub record_errors: AtomicU64,
}

/// How a connection ended, for `Proxy::end`.
enum Ended {
    /// The record could not be written (nothing more can be).
    Unrecorded(crate::record::RecordError),
    /// Not forwarded.
    Refused { kind: Refusal, reason: String },
    /// The original destination could not be reached.
    UpstreamFailed(String),
    /// Forwarded; how the protocol module's relay ended.
    Closed(Outcome),
}

impl Ended {
    fn refused(kind: Refusal, reason: String) -> Self {
        Ended::Refused { kind, reason }
    }
}

/// Why a host process's connection to a target with rules is refused.
const HOST_REFUSED: &str =
    "a host process outside the watched job cgroups (watch.host.ruled_targets: refuse)";

pub struct Proxy {
    pub redirector: Arc<Redirector>,
    pub identities: IdentityResolver,
    pub store: Arc<RecordStore>,
    pub targets: Arc<crate::targets::LiveTargets>,
    pub tls: Option<Arc<TlsContext>>,
    /// Trust roots for servers the node verifies (also without a CA).
    pub upstream_tls: Option<Arc<crate::tls::Upstream>>,
    pub body_cap: usize,
    pub policy: Arc<crate::policy::PolicyEngine>,
    pub approvals: Arc<crate::approvals::Approvals>,
    pub suspensions: Arc<crate::suspend::Suspensions>,
    /// Jobs stopped for working against the node (`contain::Guard`).
    pub quarantine: Arc<crate::contain::Quarantine>,
    pub max_scan_request: usize,
    /// WebSocket upgrades on targets with rules: inspect or refuse.
    pub websocket: crate::http::WebSocketMode,
    pub listen: Vec<ProxyAddr>,
    /// What host processes get on targets with rules (`watch.host`).
    pub host_ruled: crate::config::HostRuled,
    pub connect_timeout: Duration,
    pub limits: crate::config::Limits,
    pub per_identity: ConnLimiter,
    pub health: Arc<RecordHealth>,
    pub counters: Counters,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The evidence spool and shipping, when on.
    pub spool: Option<Arc<crate::spool::SpoolStatus>>,
}

/// Open connections per identity, capped.
#[derive(Default)]
pub struct ConnLimiter {
    open: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// One counted connection; the count drops with it.
pub struct ConnPermit {
    open: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    identity: String,
}

impl ConnLimiter {
    /// A permit, or the number already open when the cap is reached.
    pub fn acquire(&self, identity: &str, max: usize) -> Result<ConnPermit, usize> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(identity.to_owned()).or_default();
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        Ok(ConnPermit {
            open: self.open.clone(),
            identity: identity.to_owned(),
        })
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.identity);
            }
        }
    }
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    let err = |source| ProxyError::Listen { addr, source };
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    // Never SO_REUSEPORT: a root job could bind the same port into the
    // reuse group and be handed other jobs' redirected connections. The
    // data threads share this one socket instead (`daemon::data_threads`).
    sock.bind(addr).map_err(err)?;
    sock.listen(4096).map_err(err)
}

impl Proxy {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    let this = self.clone();
                    tokio::spawn(async move { this.handle(stream, ClientAddr(peer)).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn record(&self, r: &ConnectionRecord, kind: &str) {
        self.observe(r);
        if let Err(e) = self.store.put(r, kind) {
            self.counters.record_errors.fetch_add(1, Ordering::Relaxed);
            self.health.failed(&e);
            warn!(session = r.id, error = %e, "recording failed");
        }
    }

    /// Node-wide values, read when metrics are scraped.
    pub fn refresh_metrics(&self, m: &crate::metrics::Metrics) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        m.connections_active
            .set(gauge(self.counters.active.load(Ordering::Relaxed)));
        m.record_errors
            .set(gauge(self.counters.record_errors.load(Ordering::Relaxed)));
        m.approvals_pending
            .set(gauge(self.approvals.list().len() as u64));
        m.jobs_quarantined.set(gauge(self.quarantine.len() as u64));
        let policy = self.policy.current();
        m.policy_version.set(gauge(policy.version));
        m.policy_applied_seconds.set(gauge(policy.loaded_ms / 1000));
        for (name, v) in sluice_common::stat::NAMES
            .iter()
            .zip(self.redirector.kernel_stats())
        {
            m.kernel_counter(name, v);
        }
        if let Some(sp) = &self.spool {
            let spooled = sp.spooled.load(Ordering::Relaxed);
            let acked = sp.acked.load(Ordering::Relaxed);
            m.spool_pending.set(gauge(spooled.saturating_sub(acked)));
            m.spool_bytes.set(gauge(sp.bytes.load(Ordering::Relaxed)));
            m.spool_dropped
                .set(gauge(sp.dropped_events.load(Ordering::Relaxed)));
            let oldest = sp.oldest_unacked_ms.load(Ordering::Relaxed);
            let lag = if oldest == 0 || spooled <= acked {
                0
            } else {
                now_ms().saturating_sub(oldest) / 1000
            };
            m.ship_lag_seconds.set(gauge(lag));
        }
    }

    /// A connection's final record, counted for metrics.
    fn observe(&self, r: &ConnectionRecord) {
        let workload = crate::metrics::workload_label(&r.identity, &self.policy.current());
        self.metrics.connection(r, &workload);
    }

    async fn handle(self: Arc<Self>, client: TcpStream, peer: ClientAddr) {
        let id = match self.store.next_id() {
            Ok(id) => id,
            Err(e) => {
                // Fail closed: what cannot be recorded is not forwarded.
                warn!(%peer, error = %e, "cannot allocate a record id; refusing");
                refuse(client);
                return;
            }
        };
        let Some((dst, origin)) = self.redirector.origin(peer) else {
            refuse(client);
            let reason = "no redirect origin (not redirected by Sluice)".to_owned();
            let r = ConnectionRecord::new(id, peer);
            let _span = tracing::info_span!("conn", session = id, %peer).entered();
            return self.end(r, Ended::refused(Refusal::NoOrigin, reason));
        };
        let span = tracing::info_span!("conn", session = id, workload = tracing::field::Empty);
        self.forward(id, client, peer, dst, origin)
            .instrument(span)
            .await
    }

    /// A connection from admission to its end. Every exit goes through
    /// `end`: recorded, counted and observed exactly once.
    async fn forward(
        &self,
        id: u64,
        client: TcpStream,
        peer: ClientAddr,
        dst: OrigDstAddr,
        origin: sluice_common::Origin,
    ) {
        let (r, ended) = self.admit_and_serve(id, client, peer, dst, origin).await;
        self.end(r, ended);
    }

    /// The one place a connection's result is written down: its outcome
    /// on the record (one event), the node's counters, the metrics and the
    /// log line (a refused client was reset where it was refused).
    fn end(&self, mut r: ConnectionRecord, ended: Ended) {
        let kind = match ended {
            Ended::Unrecorded(e) => {
                // Fail closed: what cannot be recorded is not forwarded,
                // and nothing more can be written about it.
                self.counters.record_errors.fetch_add(1, Ordering::Relaxed);
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                self.health.failed(&e);
                warn!(error = %e, "cannot record the connection; refused");
                r.outcome = Outcome::Refused {
                    reason: format!("not recorded: {e}"),
                    kind: Refusal::Recording,
                };
                self.observe(&r);
                return;
            }
            Ended::Refused { kind, reason } => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                warn!(%reason, kind = kind.as_str(), "connection refused");
                r.outcome = Outcome::Refused { reason, kind };
                "connection.refused"
            }
            Ended::UpstreamFailed(error) => {
                self.counters
                    .upstream_failed
                    .fetch_add(1, Ordering::Relaxed);
                warn!(dst = ?r.original_dst, %error, "upstream connect failed");
                r.outcome = Outcome::UpstreamFailed { error };
                "connection.close"
            }
            Ended::Closed(outcome) => {
                debug!(up = r.bytes_up, down = r.bytes_down, outcome = ?outcome, "closed");
                r.outcome = outcome;
                "connection.close"
            }
        };
        r.ended_at_ms = Some(now_ms());
        self.record(&r, kind);
    }

    /// Attribution (overlapping the upstream connect), then admission,
    /// then the protocol module. Returns the record and how it ended; a
    /// refused client has been reset.
    async fn admit_and_serve(
        &self,
        id: u64,
        client: TcpStream,
        peer: ClientAddr,
        dst: OrigDstAddr,
        origin: sluice_common::Origin,
    ) -> (ConnectionRecord, Ended) {
        // One view of the targets for the whole connection, even if a
        // policy swaps them meanwhile.
        let targets = self.targets.current();
        // Never connect to ourselves: that would loop forever.
        let loops = self.listen.iter().any(|l| l.0 == dst.0);
        // The upstream handshake runs while we attribute and record; the
        // record is written before a single byte is forwarded.
        let connect = async {
            if loops {
                return None;
            }
            Some(tokio::time::timeout(self.connect_timeout, TcpStream::connect(dst.0)).await)
        };
        let attribute = async {
            let (identity, process) = self.identities.resolve(origin, &self.store, id).await;
            let mut r = ConnectionRecord::new(id, peer);
            r.identity = identity;
            r.process = process;
            r.original_dst = Some(dst);
            r.target = targets.name(origin.target_id).map(str::to_owned);
            // Fail closed: a connection that cannot be attributed to one
            // job is not forwarded (it could be a suspended one's). Its
            // one event is the refusal, written by `end`.
            let refused = match (&r.identity.unattributed, loops) {
                (_, true) => Some(Ended::refused(
                    Refusal::Loop,
                    "original destination is the proxy itself".to_owned(),
                )),
                (Some(why), false) => Some(Ended::refused(
                    Refusal::Unattributable,
                    format!("identity unattributable: {why}"),
                )),
                (None, false) => None,
            };
            let recorded = match refused {
                Some(ended) => Err(ended),
                None => self
                    .store
                    .put(&r, "connection.open")
                    .map_err(Ended::Unrecorded),
            };
            (r, recorded)
        };
        let (upstream, (mut r, recorded)) = tokio::join!(connect, attribute);
        tracing::Span::current().record("workload", r.identity.id.as_str());
        if let Err(ended) = recorded {
            refuse(client);
            return (r, ended);
        }
        if let Err(ended) = self.admit(&r, &targets, origin.target_id).await {
            refuse(client);
            return (r, ended);
        }
        let max = self.limits.max_connections_per_identity;
        let _permit = match self.per_identity.acquire(&r.identity.id, max) {
            Ok(p) => p,
            Err(n) => {
                refuse(client);
                let reason = format!("identity has {n} connections open (limit {max})");
                return (r, Ended::refused(Refusal::IdentityLimit, reason));
            }
        };
        let upstream = match upstream {
            Some(Ok(Ok(s))) => s,
            Some(Ok(Err(e))) => {
                refuse(client);
                return (r, Ended::UpstreamFailed(e.to_string()));
            }
            Some(Err(_)) => {
                refuse(client);
                return (r, Ended::UpstreamFailed("connect timed out".into()));
            }
            None => {
                refuse(client);
                let reason = "original destination is the proxy itself".to_owned();
                return (r, Ended::refused(Refusal::Loop, reason));
            }
        };
        info!(%peer, %dst, pid = r.process.tgid, comm = %r.process.comm, "intercepted");
        let outcome = self
            .serve_protocol(&mut r, client, upstream, dst, &targets, origin.target_id)
            .await;
        (r, Ended::Closed(outcome))
    }

    /// Admission checks after attribution: recording healthy and
    /// shippable, the job not quarantined, a host process kept off a
    /// database with rules, a suspended identity off connections the node
    /// does not inspect per message.
    async fn admit(
        &self,
        r: &ConnectionRecord,
        targets: &crate::targets::TargetTable,
        target_id: u32,
    ) -> Result<(), Ended> {
        // The store has been failing (disk full, I/O errors): forward only
        // once a flush proves it takes writes again.
        if self.health.is_failing() && !self.health.flush(&self.store).await {
            let reason = format!("recording is failing: {}", self.health.describe());
            return Err(Ended::refused(Refusal::Recording, reason));
        }
        if self
            .spool
            .as_ref()
            .is_some_and(|s| s.full.load(Ordering::Relaxed))
        {
            return Err(Ended::refused(
                Refusal::Recording,
                "evidence spool full (spool.when_full: fail-closed): recording cannot be shipped"
                    .into(),
            ));
        }
        if let Some(why) = self
            .quarantine
            .reason_for(r.identity.cgroup_path.as_deref())
        {
            let reason = format!("job quarantined: {why}");
            return Err(Ended::refused(Refusal::Quarantined, reason));
        }
        let protocol = targets.protocol(target_id);
        if self.host_refused(r) && protocol == Protocol::Postgres {
            return Err(Ended::refused(Refusal::HostProcess, HOST_REFUSED.into()));
        }
        // Intercepted HTTP gets a 403 per request and Postgres an error
        // per statement (clearer to the job); any other suspended
        // connection is refused outright.
        let intercepting =
            targets.mode(target_id) == TlsMode::Intercept || protocol == Protocol::Postgres;
        if let (Some(susp), false) = (self.suspensions.get(&r.identity), intercepting) {
            let reason = format!("identity suspended: {}", susp.reason);
            return Err(Ended::refused(Refusal::Suspended, reason));
        }
        Ok(())
    }

    /// A host process (outside every job cgroup: a daemon, a container,
    /// a job that left its cgroup) is kept away from what the policy
    /// guards: a database at once, an HTTPS target once its name says it
    /// is one (names spliced untouched stay open).
    fn host_refused(&self, r: &ConnectionRecord) -> bool {
        r.identity.host
            && self.host_ruled == crate::config::HostRuled::Refuse
            && r.target
                .as_deref()
                .is_some_and(|t| self.policy.current().target_has_rules(t))
    }

    /// Detect/negotiate: the target's protocol picks the module that
    /// drives the connection's messages. Counts bytes both ways.
    async fn serve_protocol(
        &self,
        r: &mut ConnectionRecord,
        client: TcpStream,
        upstream: TcpStream,
        dst: OrigDstAddr,
        targets: &crate::targets::TargetTable,
        target_id: u32,
    ) -> Outcome {
        let _ = upstream.set_nodelay(true);
        let _ = client.set_nodelay(true);
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        self.counters.active.fetch_add(1, Ordering::Relaxed);
        let bytes = Arc::new(ByteCounts::default());
        let client = Counted {
            inner: client,
            counts: bytes.clone(),
        };
        let mode = targets.mode(target_id);
        let outcome = match (targets.protocol(target_id), mode) {
            (Protocol::Postgres, _) => {
                let endpoint = crate::postgres::Endpoint {
                    client_tls: self.tls.clone().filter(|_| mode == TlsMode::Intercept),
                    upstream_tls: self.upstream_tls.clone(),
                    target: targets.target(target_id).cloned(),
                    dst,
                };
                let (outcome, opened) =
                    crate::postgres::serve(self.session(r), client, upstream, endpoint).await;
                r.tls = opened.tls;
                r.database = opened.database;
                outcome
            }
            (_, TlsMode::None) => splice(client, upstream, &[], self.idle()).await,
            (_, TlsMode::Intercept | TlsMode::Passthrough) => {
                let host_refused = self.host_refused(r);
                self.tls_path(r, client, upstream, targets, target_id, host_refused)
                    .await
            }
        };
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
        r.bytes_up = bytes.up.load(Ordering::Relaxed);
        r.bytes_down = bytes.down.load(Ordering::Relaxed);
        outcome
    }

    /// The per-connection context the protocol modules work through.
    fn session(&self, r: &ConnectionRecord) -> Arc<Session> {
        Arc::new(Session::new(
            r.id,
            r.identity.clone(),
            r.target.clone().unwrap_or_default(),
            self.store.clone(),
            self.policy.clone(),
            self.approvals.clone(),
            self.suspensions.clone(),
            self.health.clone(),
            self.limits.clone(),
            self.metrics.clone(),
        ))
    }

    fn idle(&self) -> Duration {
        Duration::from_secs(self.limits.idle_timeout_secs)
    }

    /// A TLS target: the ClientHello read, its name judged (intercept,
    /// splice or refuse), then the upstream's TLS verified first and the
    /// client's terminated with a leaf for the ALPN the upstream chose.
    async fn tls_path(
        &self,
        r: &mut ConnectionRecord,
        client: Counted<TcpStream>,
        upstream: TcpStream,
        targets: &crate::targets::TargetTable,
        target_id: u32,
        host_refused: bool,
    ) -> Outcome {
        let counts = client.counts.clone();
        let (hello, prefix, client) = match read_hello(client).await {
            Ok(read) => read,
            Err(outcome) => return outcome,
        };
        let name = match self.judge_sni(r, &hello, targets, target_id, host_refused) {
            TlsVerdict::Intercept(name) => name,
            TlsVerdict::Splice => return splice(client, upstream, &prefix, self.idle()).await,
            TlsVerdict::Refuse(outcome) => {
                refuse(client.inner);
                return outcome;
            }
        };
        let Some(tls) = self.tls.clone() else {
            refuse(client.inner);
            return Outcome::Refused {
                reason: format!("`{name}` is a target name but this node has no CA"),
                kind: Refusal::Tls,
            };
        };
        let sni = name.as_str().to_owned();
        let alpn = proxyable_alpn(&hello.alpn);
        let upstream_addr = upstream.peer_addr().ok();
        let up = match tls.connect_upstream(upstream, &sni, &alpn).await {
            Ok(s) => s,
            Err(e) => {
                let message = format!("upstream TLS with {sni} failed: {e}");
                warn!(%sni, error = %e, "upstream TLS failed; answering the client with 502");
                answer_upstream_failure(&tls, &sni, &alpn, prefix, client, message.clone()).await;
                return Outcome::UpstreamFailed { error: message };
            }
        };
        let negotiated = up.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        if let Some(t) = r.tls.as_mut() {
            t.alpn = negotiated
                .as_deref()
                .map(|p| String::from_utf8_lossy(p).into_owned());
        }
        let down = match accept_client(&tls, &sni, negotiated.as_deref(), prefix, client).await {
            Ok(d) => d,
            Err(outcome) => return outcome,
        };
        let exact_name = targets.names_exactly(target_id, &sni);
        self.serve_intercepted(
            r,
            down,
            up,
            tls,
            sni,
            exact_name,
            negotiated,
            upstream_addr,
            counts,
        )
        .await
    }

    /// The SNI verdict for a TLS target, with a host process refused on a
    /// target with rules; the record's TLS mode set to match.
    fn judge_sni(
        &self,
        r: &mut ConnectionRecord,
        hello: &hello::ClientHello,
        targets: &crate::targets::TargetTable,
        target_id: u32,
        host_refused: bool,
    ) -> TlsVerdict {
        // The SNI is recorded as the client sent it; decisions use its
        // normal form.
        let tls_info = |mode: &str| TlsInfo {
            sni: hello.sni.clone(),
            mode: mode.into(),
            alpn: None,
        };
        let name = match targets.classify(target_id, hello) {
            SniVerdict::Intercept(name) => name,
            SniVerdict::Splice(why) => {
                r.tls = Some(tls_info("spliced"));
                info!(sni = ?hello.sni, %why, "TLS spliced");
                return TlsVerdict::Splice;
            }
            SniVerdict::Refuse(reason) => {
                r.tls = Some(tls_info("refused"));
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                warn!(sni = ?hello.sni, %reason, "TLS refused");
                return TlsVerdict::Refuse(Outcome::Refused {
                    reason,
                    kind: Refusal::Tls,
                });
            }
        };
        if host_refused {
            r.tls = Some(tls_info("refused"));
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            warn!(sni = %name.as_str(), "host process refused on a target with rules");
            return TlsVerdict::Refuse(Outcome::Refused {
                reason: HOST_REFUSED.into(),
                kind: Refusal::HostProcess,
            });
        }
        r.tls = Some(tls_info("intercepted"));
        TlsVerdict::Intercept(name)
    }

    /// An intercepted TLS session: HTTP/1.1 or h2 (what the upstream
    /// chose) through `http::serve`, until it ends or idles out.
    #[allow(clippy::too_many_arguments)]
    async fn serve_intercepted(
        &self,
        r: &ConnectionRecord,
        down: tokio_rustls::server::TlsStream<hello::Rewind<Counted<TcpStream>>>,
        up: tokio_rustls::client::TlsStream<TcpStream>,
        tls: Arc<TlsContext>,
        sni: String,
        exact_name: bool,
        negotiated: Option<Vec<u8>>,
        upstream_addr: Option<SocketAddr>,
        counts: Arc<ByteCounts>,
    ) -> Outcome {
        let session = Arc::new(HttpSession {
            ctx: self.session(r),
            exact_name,
            authority: sni.clone(),
            body_cap: self.body_cap,
            prev_durable: Default::default(),
            max_scan_request: self.max_scan_request,
            websocket: self.websocket,
        });
        let h2 = negotiated.as_deref() == Some(b"h2");
        info!(%sni, h2, "TLS intercepted");
        let redial = upstream_addr.map(|addr| http::Redial {
            tls: tls.clone(),
            addr,
            sni: sni.clone(),
            connect_timeout: self.connect_timeout,
        });
        let received: http::clock::Received = {
            let counts = counts.clone();
            Arc::new(move || counts.up.load(Ordering::Relaxed))
        };
        let idle = self.idle();
        tokio::select! {
            served = http::serve(down, up, h2, session, redial, received) => match served {
                Ok(()) => Outcome::Closed,
                Err(e) => Outcome::Failed {
                    error: e.to_string(),
                },
            },
            // Nothing in either direction (no request, no streamed byte)
            // for the idle limit.
            _ = crate::session::idle_for(idle, || counts.up.load(Ordering::Relaxed) + counts.down.load(Ordering::Relaxed)) => {
                info!(idle_secs = idle.as_secs(), "intercepted connection idle; closed");
                Outcome::Failed {
                    error: format!("idle for {}s (limits.idle_timeout_secs)", idle.as_secs()),
                }
            }
        }
    }
}

/// What the ClientHello's name decides for a TLS target (`judge_sni`).
enum TlsVerdict {
    /// Terminate TLS for this target name.
    Intercept(crate::names::DnsName),
    /// Relay byte for byte.
    Splice,
    /// Reset the client; the connection ends so.
    Refuse(Outcome),
}

/// Reads the client's ClientHello (and the bytes it came in); a client
/// that sends none in time is refused.
async fn read_hello(
    mut client: Counted<TcpStream>,
) -> Result<(hello::ClientHello, Vec<u8>, Counted<TcpStream>), Outcome> {
    match tokio::time::timeout(HELLO_TIMEOUT, hello::read_client_hello(&mut client)).await {
        Ok(Ok((hello, prefix))) => Ok((hello, prefix, client)),
        Ok(Err(e)) => {
            // Fail closed: a TLS target that does not speak TLS
            // is not forwarded.
            warn!(error = %e, "refusing connection to a TLS target");
            refuse(client.inner);
            Err(Outcome::Refused {
                reason: e.to_string(),
                kind: Refusal::Tls,
            })
        }
        Err(_) => {
            refuse(client.inner);
            Err(Outcome::Refused {
                reason: "no TLS ClientHello within 10s".into(),
                kind: Refusal::Tls,
            })
        }
    }
}

/// Terminates the client's TLS with a leaf for `sni` and the ALPN the
/// upstream chose.
async fn accept_client(
    tls: &TlsContext,
    sni: &str,
    negotiated: Option<&[u8]>,
    prefix: Vec<u8>,
    client: Counted<TcpStream>,
) -> Result<tokio_rustls::server::TlsStream<hello::Rewind<Counted<TcpStream>>>, Outcome> {
    let cfg = match tls.server_config(sni, negotiated) {
        Ok(c) => c,
        Err(e) => {
            warn!(%sni, error = %e, "cannot serve this name; refusing");
            refuse(client.inner);
            return Err(Outcome::Refused {
                reason: e.to_string(),
                kind: Refusal::Tls,
            });
        }
    };
    match tokio::time::timeout(
        HELLO_TIMEOUT,
        TlsAcceptor::from(cfg).accept(hello::Rewind::new(prefix, client)),
    )
    .await
    {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => {
            // Typically: the client does not trust the node's CA.
            warn!(%sni, error = %e, "client TLS handshake failed");
            Err(Outcome::Failed {
                error: format!("client TLS handshake: {e}"),
            })
        }
        Err(_) => Err(Outcome::Failed {
            error: "client TLS handshake timed out".into(),
        }),
    }
}

/// The upstream's TLS failed: the client is told in its own protocol (a
/// 502 over a TLS session with the node's leaf), not by a reset.
async fn answer_upstream_failure(
    tls: &TlsContext,
    sni: &str,
    alpn: &[Vec<u8>],
    prefix: Vec<u8>,
    client: Counted<TcpStream>,
    message: String,
) {
    let h1 = alpn.is_empty() || alpn.iter().any(|p| p == b"http/1.1");
    let proto: Option<&[u8]> = if h1 && !alpn.is_empty() {
        Some(b"http/1.1")
    } else if h1 {
        None
    } else {
        Some(b"h2")
    };
    if let Ok(cfg) = tls.server_config(sni, proto) {
        let accept = TlsAcceptor::from(cfg).accept(hello::Rewind::new(prefix, client));
        if let Ok(Ok(down)) = tokio::time::timeout(HELLO_TIMEOUT, accept).await {
            http::serve_error(down, !h1, message).await;
        }
    }
}

/// Relays both ways until either side closes, or nothing moves for `idle`.
async fn splice(
    mut client: Counted<TcpStream>,
    mut upstream: TcpStream,
    prefix: &[u8],
    idle: Duration,
) -> Outcome {
    if !prefix.is_empty() {
        if let Err(e) = upstream.write_all(prefix).await {
            return Outcome::Failed {
                error: e.to_string(),
            };
        }
        client
            .counts
            .up
            .fetch_add(prefix.len() as u64, Ordering::Relaxed);
    }
    let counts = client.counts.clone();
    // 64 KiB each way: the 8 KiB default costs a third of bulk throughput.
    let copy =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 1 << 16, 1 << 16);
    tokio::select! {
        res = copy => match res {
            Ok(_) => Outcome::Closed,
            Err(e) => Outcome::Failed {
                error: e.to_string(),
            },
        },
        _ = crate::session::idle_for(idle, || counts.up.load(Ordering::Relaxed) + counts.down.load(Ordering::Relaxed)) => {
            info!(idle_secs = idle.as_secs(), "spliced connection idle; closed");
            Outcome::Failed {
                error: format!("idle for {}s (limits.idle_timeout_secs)", idle.as_secs()),
            }
        }
    }
}

#[derive(Default)]
struct ByteCounts {
    /// Read from the client (client to upstream).
    up: AtomicU64,
    /// Written to the client.
    down: AtomicU64,
}

/// The client stream, counting bytes each way whichever path it takes.
struct Counted<S> {
    inner: S,
    counts: Arc<ByteCounts>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counts.up.fetch_add(n as u64, Ordering::Relaxed);
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let res = std::pin::Pin::new(&mut self.inner).poll_write(cx, b);
        if let std::task::Poll::Ready(Ok(n)) = &res {
            self.counts.down.fetch_add(*n as u64, Ordering::Relaxed);
        }
        res
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Closes with RST so the client sees a refused/reset connection at once
/// instead of an orderly EOF that could pass for an empty answer.
fn refuse(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
