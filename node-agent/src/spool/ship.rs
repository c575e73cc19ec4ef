//! Shipping the spool to NATS JetStream: at-least-once, in order, each
//! event published with its chain hash as `Nats-Msg-Id` (the stream drops
//! a re-sent event as a duplicate), to `<prefix>.<node>.<identity>`. The
//! acknowledged position is persisted after each acknowledged batch, so a
//! restarted node or a returning server resumes where the stream left off.
//! Shipping runs beside the data path and never blocks it: the spool is
//! the buffer (and its bound the backpressure, `spool.when_full`).
use std::{collections::VecDeque, sync::atomic::Ordering, sync::Arc, time::Duration};

use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use bytes::Bytes;
use tracing::{info, warn};

use sluice_evidence::{
    follow::{self, ChainState, Step},
    line::Line,
};

use super::{line, segments, Spool};
use crate::{config::NatsSettings, record::RecordStore};

/// Events published before their acknowledgements are awaited.
const IN_FLIGHT: usize = 256;
/// The stream's de-duplication window (re-sends after a restart or an
/// outage shorter than this are dropped by the server).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Spool(#[from] super::SpoolError),
}

fn nats(e: impl std::fmt::Display) -> ShipError {
    ShipError::Nats(e.to_string())
}

/// How to reach the NATS server: its URL, TLS roots (TLS then required)
/// and a user with a password file.
#[derive(Clone, Debug, Default)]
pub struct Endpoint {
    pub url: String,
    pub tls_ca: Option<std::path::PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<std::path::PathBuf>,
}

impl From<&NatsSettings> for Endpoint {
    fn from(n: &NatsSettings) -> Self {
        Self {
            url: n.url.clone(),
            tls_ca: n.tls_ca.clone(),
            user: n.user.clone(),
            password_file: n.password_file.clone(),
        }
    }
}

/// A JetStream context (5 s to connect); shipping, the fleet's bundle and
/// `verify --stream` all start here.
pub async fn connect(ep: &Endpoint) -> Result<jetstream::Context, ShipError> {
    let mut opts = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(5));
    if let Some(ca) = &ep.tls_ca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some(user) = &ep.user {
        let path = ep
            .password_file
            .as_ref()
            .ok_or_else(|| ShipError::Nats("`user` needs `password_file`".into()))?;
        let pass = std::fs::read_to_string(path)
            .map_err(|e| ShipError::Nats(format!("{}: {e}", path.display())))?;
        opts = opts.user_and_password(user.clone(), pass.trim().to_owned());
    }
    let client = opts.connect(ep.url.as_str()).await.map_err(nats)?;
    Ok(jetstream::new(client))
}

/// The stream evidence goes to (created if missing).
pub async fn stream(
    js: &jetstream::Context,
    cfg: &NatsSettings,
) -> Result<stream::Stream, ShipError> {
    js.get_or_create_stream(stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.subject_prefix)],
        duplicate_window: DUPLICATE_WINDOW,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(nats)
}

/// A stream in NATS's key-value layout (`KV_<bucket>`, subjects
/// `$KV.<bucket>.>`), created if missing; the fleet's bundle and
/// suspension list live in one each, read at the stream level (Debian's
/// nats-server 2.9 does not speak the client's key-value API).
pub async fn kv_stream(js: &jetstream::Context, bucket: &str) -> Result<stream::Stream, ShipError> {
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 16,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        ..Default::default()
    })
    .await
    .map_err(nats)
}

/// Ships until the process ends, reconnecting with backoff.
pub async fn run(spool: Arc<Spool>, cfg: NatsSettings, store: Arc<RecordStore>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match session(&spool, &cfg, &store).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                spool.status.connected.store(false, Ordering::Relaxed);
                warn!(error = %e, url = %cfg.url, "evidence shipping interrupted; retrying");
                *spool
                    .status
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn session(
    spool: &Arc<Spool>,
    cfg: &NatsSettings,
    store: &Arc<RecordStore>,
) -> Result<(), ShipError> {
    let js = connect(&Endpoint::from(cfg)).await?;
    stream(&js, cfg).await?;
    spool.status.connected.store(true, Ordering::Relaxed);
    *spool
        .status
        .last_error
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = None;
    info!(url = %cfg.url, stream = %cfg.stream, "shipping evidence to NATS JetStream");
    let prefix = format!("{}.{}", cfg.subject_prefix, line::token(&spool.node));
    // How far this session has read the spool (segment, byte offset): only
    // new lines are read again. A new session starts from the
    // acknowledged position.
    let mut read_to = None;
    let mut checkpoint_shipped = None;
    loop {
        let shipped = ship_available(spool, &js, &prefix, &mut read_to).await?;
        ship_checkpoint(spool, store, &js, &prefix, &mut checkpoint_shipped).await?;
        if shipped == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Publishes the newest signed checkpoint once every event it covers is
/// acknowledged in the stream, so that the stream alone proves the chain
/// (a re-written tail cannot match the node's signature). De-duplicated
/// by key and number.
async fn ship_checkpoint(
    spool: &Arc<Spool>,
    store: &Arc<RecordStore>,
    js: &jetstream::Context,
    prefix: &str,
    shipped: &mut Option<u64>,
) -> Result<(), ShipError> {
    let st = store.clone();
    let Ok(Ok(Some(cp))) = tokio::task::spawn_blocking(move || st.last_checkpoint()).await else {
        return Ok(());
    };
    if shipped.is_some_and(|n| n >= cp.n) || cp.seq >= spool.status.acked.load(Ordering::Relaxed) {
        return Ok(());
    }
    let msg = sluice_evidence::checkpoint::Shipped {
        node: spool.node.clone(),
        node_key: store.node_key(),
        checkpoint: cp.clone(),
    };
    let publish = jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(&msg).unwrap_or_default().into())
        .message_id(format!("checkpoint-{}-{}", cp.kid, cp.n));
    js.send_publish(
        format!("{prefix}.{}", sluice_evidence::checkpoint::TOKEN),
        publish,
    )
    .await
    .map_err(nats)?
    .await
    .map_err(nats)?;
    *shipped = Some(cp.n);
    Ok(())
}

/// Publishes every spooled line at or after the acknowledged position;
/// returns how many were acknowledged.
async fn ship_available(
    spool: &Arc<Spool>,
    js: &jetstream::Context,
    prefix: &str,
    read_to: &mut Option<(u64, u64)>,
) -> Result<usize, ShipError> {
    let acked = spool.status.acked.load(Ordering::Relaxed);
    if spool.status.spooled.load(Ordering::Relaxed) <= acked {
        return Ok(0);
    }
    let segs = segments(&spool.dir).map_err(|e| {
        ShipError::Spool(super::SpoolError::Io {
            path: spool.dir.clone(),
            source: e,
        })
    })?;
    let mut in_flight: VecDeque<(u64, u64, PublishAckFuture)> = VecDeque::new();
    let mut next = acked;
    let mut count = 0;
    for (i, (first, path)) in segs.iter().enumerate() {
        // Skip segments wholly before the acknowledged position, or
        // already read by this session.
        if segs.get(i + 1).is_some_and(|(n, _)| *n <= acked)
            || read_to.is_some_and(|(seg, _)| *first < seg)
        {
            continue;
        }
        let from = match *read_to {
            Some((seg, off)) if seg == *first => off,
            _ => 0,
        };
        let text = read_from(path, from).await.map_err(|e| {
            ShipError::Spool(super::SpoolError::Io {
                path: path.clone(),
                source: e,
            })
        })?;
        // Only whole lines: the spool may be writing the last one.
        let end = text.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
        for raw in text[..end].split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(ev) = serde_json::from_slice::<line::In>(raw) else {
                warn!(segment = %path.display(), "unreadable spool line skipped");
                continue;
            };
            if ev.seq < next {
                continue;
            }
            let subject = format!("{prefix}.{}", line::token(&ev.actor));
            let publish = jetstream::message::PublishMessage::build()
                .payload(Bytes::copy_from_slice(raw))
                .message_id(ev.hash);
            let ack = js.send_publish(subject, publish).await.map_err(nats)?;
            in_flight.push_back((ev.seq, ev.at_ms, ack));
            next = ev.seq + 1;
            if in_flight.len() >= IN_FLIGHT {
                count += settle(spool, &mut in_flight, IN_FLIGHT / 2).await?;
            }
        }
        *read_to = Some((*first, from + end as u64));
    }
    count += settle(spool, &mut in_flight, 0).await?;
    if count > 0 {
        spool.release();
    }
    Ok(count)
}

/// A spool segment's bytes from `offset` on.
async fn read_from(path: &std::path::Path, offset: u64) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = tokio::fs::File::open(path).await?;
    f.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut out = Vec::new();
    f.read_to_end(&mut out).await?;
    Ok(out)
}

/// Awaits acknowledgements, oldest first, until `keep` remain; the
/// acknowledged position moves (and is persisted) as they arrive.
async fn settle(
    spool: &Arc<Spool>,
    in_flight: &mut VecDeque<(u64, u64, PublishAckFuture)>,
    keep: usize,
) -> Result<usize, ShipError> {
    let mut n = 0;
    let mut last = None;
    while in_flight.len() > keep {
        let Some((seq, _, ack)) = in_flight.pop_front() else {
            break;
        };
        ack.await.map_err(nats)?;
        last = Some(seq);
        n += 1;
    }
    if let Some(seq) = last {
        spool.set_acked(seq + 1)?;
        let oldest = in_flight.front().map_or(0, |(_, at, _)| *at);
        spool
            .status
            .oldest_unacked_ms
            .store(oldest, Ordering::Relaxed);
    }
    Ok(n)
}

/// What `verify --stream` found.
#[derive(Debug, Default)]
pub struct StreamReport {
    pub events: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Messages carrying an event already seen (0 when de-duplication
    /// held).
    pub duplicates: u64,
    /// Signed checkpoints found, each checked (signature, covered event).
    pub checkpoints: u64,
    pub first_break: Option<String>,
}

/// Checks a node's chain from the stream alone: every event's hash from
/// its content, each `prev` the hash before it, no sequence number
/// missing between the first and the last.
pub async fn verify_stream(
    ep: &Endpoint,
    stream_name: &str,
    prefix: &str,
    node: &str,
) -> Result<StreamReport, ShipError> {
    let js = connect(ep).await?;
    let mut stream = js.get_stream(stream_name).await.map_err(nats)?;
    let state = stream.info().await.map_err(nats)?.state.clone();
    let want = format!("{prefix}.{}.", line::token(node));
    let mut events: std::collections::BTreeMap<u64, Line> = Default::default();
    let mut checkpoints = Vec::new();
    let mut report = StreamReport::default();
    for seq in state.first_sequence.max(1)..=state.last_sequence {
        let msg = match stream.get_raw_message(seq).await {
            Ok(m) => m,
            // Deleted or purged messages leave holes in stream sequence.
            Err(_) => continue,
        };
        if !msg.subject.starts_with(&want) {
            continue;
        }
        if msg.subject.ends_with(sluice_evidence::checkpoint::TOKEN) {
            match serde_json::from_slice::<sluice_evidence::checkpoint::Shipped>(&msg.payload) {
                Ok(c) => checkpoints.push(c),
                Err(e) => {
                    report.first_break =
                        Some(format!("stream message {seq}: not a checkpoint: {e}"));
                    return Ok(report);
                }
            }
            continue;
        }
        let line = match Line::parse(&msg.payload) {
            Ok(l) => l,
            Err(e) => {
                report.first_break = Some(format!("stream message {seq}: {e}"));
                return Ok(report);
            }
        };
        if events.insert(line.seq, line).is_some() {
            report.duplicates += 1;
        }
    }
    // In sequence order, by the rule the console follows arriving events
    // with; a first event other than 0 is a late start, not a break.
    let mut head = None;
    for line in events.values() {
        let (step, next) = follow::step(head.as_ref(), line, None);
        if let Step::Flagged { state, detail } = step {
            if state != ChainState::Partial {
                report.first_break = Some(detail);
                return Ok(report);
            }
        }
        head = Some(next);
    }
    // Every checkpoint signed by one key, and each covered event as signed.
    for c in &checkpoints {
        let first_key = &checkpoints[0].node_key;
        let problem =
            c.checkpoint
                .check(first_key)
                .err()
                .or_else(|| match events.get(&c.checkpoint.seq) {
                    Some(l) if hex::encode(l.hash) != c.checkpoint.head => Some(format!(
                        "event {} differs from the node's signed checkpoint #{}",
                        c.checkpoint.seq, c.checkpoint.n
                    )),
                    _ => None,
                });
        if let Some(p) = problem {
            report.first_break = Some(p);
            return Ok(report);
        }
        report.checkpoints += 1;
    }
    report.events = events.len() as u64;
    report.first_seq = events.keys().next().copied().unwrap_or_default();
    report.last_seq = events.keys().last().copied().unwrap_or_default();
    Ok(report)
}
