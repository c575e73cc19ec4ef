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

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, warn, Instrument};

use crate::{
    addr::{ClientAddr, OrigDstAddr, ProxyAddr},
    identity::{IdentityResolver, ProcessInfo, WorkloadIdentity},
    record::{now_ms, ConnectionRecord, Outcome, RecordStore},
    redirect::Redirector,
};

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

pub struct Proxy {
    pub redirector: Arc<Redirector>,
    pub identities: IdentityResolver,
    pub store: Arc<RecordStore>,
    pub target_names: Vec<String>,
    pub listen: Vec<ProxyAddr>,
    pub connect_timeout: Duration,
    pub counters: Counters,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    let err = |source| ProxyError::Listen { addr, source };
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
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
        if let Err(e) = self.store.put(r, kind) {
            self.counters.record_errors.fetch_add(1, Ordering::Relaxed);
            warn!(session = r.id, error = %e, "recording failed");
        }
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
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            warn!(session = id, %peer, "no redirect origin for this connection; refusing");
            let r = ConnectionRecord {
                id,
                identity: WorkloadIdentity::default(),
                process: ProcessInfo::default(),
                client: peer,
                original_dst: None,
                target: None,
                started_at_ms: now_ms(),
                ended_at_ms: Some(now_ms()),
                bytes_up: 0,
                bytes_down: 0,
                outcome: Outcome::Refused {
                    reason: "no redirect origin (not redirected by Sluice)".into(),
                },
            };
            self.record(&r, "connection.refused");
            refuse(client);
            return;
        };
        let span = tracing::info_span!("conn", session = id, workload = tracing::field::Empty);
        self.forward(id, client, peer, dst, origin)
            .instrument(span)
            .await
    }

    async fn forward(
        &self,
        id: u64,
        mut client: TcpStream,
        peer: ClientAddr,
        dst: OrigDstAddr,
        origin: sluice_common::Origin,
    ) {
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
            let (identity, process) = self.identities.resolve(&origin);
            let mut r = ConnectionRecord {
                id,
                identity,
                process,
                client: peer,
                original_dst: Some(dst),
                target: self.target_names.get(origin.target_id as usize).cloned(),
                started_at_ms: now_ms(),
                ended_at_ms: None,
                bytes_up: 0,
                bytes_down: 0,
                outcome: Outcome::Open,
            };
            if loops {
                r.outcome = Outcome::Refused {
                    reason: "original destination is the proxy itself".into(),
                };
                r.ended_at_ms = Some(now_ms());
            }
            let recorded = self.store.put(
                &r,
                if loops {
                    "connection.refused"
                } else {
                    "connection.open"
                },
            );
            (r, recorded)
        };
        let (upstream, (mut r, recorded)) = tokio::join!(connect, attribute);
        tracing::Span::current().record("workload", r.identity.id.as_str());
        if let Err(e) = recorded {
            // Fail closed: what cannot be recorded is not forwarded.
            self.counters.record_errors.fetch_add(1, Ordering::Relaxed);
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "cannot record the connection; refusing");
            refuse(client);
            return;
        }
        let Some(upstream) = upstream else {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            warn!(%dst, "connection to the proxy itself refused");
            refuse(client);
            return;
        };
        info!(%peer, %dst, pid = r.process.tgid, comm = %r.process.comm, "intercepted");

        let mut upstream = match upstream {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return self.upstream_failed(r, client, e.to_string()).await,
            Err(_) => {
                return self
                    .upstream_failed(r, client, "connect timed out".into())
                    .await
            }
        };
        let _ = upstream.set_nodelay(true);
        let _ = client.set_nodelay(true);
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        self.counters.active.fetch_add(1, Ordering::Relaxed);
        // 64 KiB each way: the 8 KiB default costs a third of bulk throughput.
        let result =
            tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 1 << 16, 1 << 16)
                .await;
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
        r.ended_at_ms = Some(now_ms());
        match result {
            Ok((up, down)) => {
                r.bytes_up = up;
                r.bytes_down = down;
                r.outcome = Outcome::Closed;
            }
            Err(e) => {
                r.outcome = Outcome::Failed {
                    error: e.to_string(),
                };
            }
        }
        debug!(up = r.bytes_up, down = r.bytes_down, "closed");
        self.record(&r, "connection.close");
        let _ = self.store.flush().await;
    }

    async fn upstream_failed(&self, mut r: ConnectionRecord, client: TcpStream, error: String) {
        warn!(dst = ?r.original_dst, %error, "upstream connect failed");
        self.counters
            .upstream_failed
            .fetch_add(1, Ordering::Relaxed);
        r.outcome = Outcome::UpstreamFailed { error };
        r.ended_at_ms = Some(now_ms());
        self.record(&r, "connection.close");
        let _ = self.store.flush().await;
        refuse(client);
    }
}

/// Closes with RST so the client sees a refused/reset connection at once
/// instead of an orderly EOF that could pass for an empty answer.
fn refuse(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
