//! Ingest: a durable JetStream consumer on the evidence stream (console
//! replicas may share it: each message goes to one of them). Each event
//! is checked against its node's chain head (`sluice_evidence::follow`),
//! stored with the new head and its projection in one transaction, and
//! only then acknowledged: a console that dies mid-way gets the message
//! again, and a re-delivery is recognised by its hash.
use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use sluice_evidence::{
    checkpoint,
    follow::{self, Step},
    line::Line,
};
use tracing::{info, warn};

use crate::{
    notify::Notifier,
    store::{NodeKey, Store, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn nats(e: impl std::fmt::Display) -> IngestError {
    IngestError::Nats(e.to_string())
}

#[derive(Clone, Debug)]
pub struct Source {
    pub url: String,
    pub stream: String,
    pub subject_prefix: String,
    /// The durable consumer's name (shared by replicas).
    pub durable: String,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Judges and stores one message: an event, or a node's checkpoint.
pub fn take(
    store: &Store,
    notify: &Notifier,
    subject: &str,
    payload: &[u8],
    stream_seq: Option<u64>,
) -> Result<(), StoreError> {
    if subject.ends_with(checkpoint::TOKEN) {
        return take_checkpoint(store, notify, payload, stream_seq);
    }
    let line = match Line::parse(payload) {
        Ok(l) => l,
        Err(e) => {
            warn!(stream_seq, error = %e, "evidence stream message is not an event");
            return store.ingest_error(stream_seq, &e.to_string(), now_ms());
        }
    };
    let head = store.head(&line.node)?;
    let held = store.held(&line.node, line.seq)?;
    let (step, new_head) = follow::step(head.as_ref(), &line, held);
    match &step {
        Step::Duplicate => return Ok(()),
        Step::Linked => {}
        Step::Flagged { state, detail } => {
            warn!(node = %line.node, seq = line.seq, state = state.as_str(), %detail, "node chain flagged");
        }
        Step::Conflict { detail } => {
            warn!(node = %line.node, seq = line.seq, %detail, "node chain broken");
        }
    }
    let stored = !matches!(step, Step::Conflict { .. });
    store.apply(&line, &new_head, stored, now_ms())?;
    let before = head.map_or(follow::ChainState::Verified, |h| h.state);
    notify.ingested(&line, before, &new_head, stored);
    // An event the node signed a checkpoint over must be the one signed.
    if stored {
        for (n, head) in store.checkpoints_at(&line.node, line.seq)? {
            if head != hex::encode(line.hash) {
                flag(
                    store,
                    notify,
                    &line.node,
                    format!(
                        "event {} differs from the node's signed checkpoint #{n}",
                        line.seq
                    ),
                )?;
            }
        }
    }
    Ok(())
}

fn flag(store: &Store, notify: &Notifier, node: &str, detail: String) -> Result<(), StoreError> {
    warn!(%node, %detail, "node chain broken");
    let before = store.head(node)?;
    store.break_chain(node, &detail)?;
    if let (Some(before), Some(after)) = (before, store.head(node)?) {
        if let Some(a) = crate::notify::Alert::chain(node, before.state, &after) {
            notify.alert(a);
        }
    }
    Ok(())
}

/// A node's signed checkpoint: its key pinned on first sight (or as
/// enrolled), the signature checked, and the event it names compared
/// with the one held. A re-written tail cannot match the node's key.
fn take_checkpoint(
    store: &Store,
    notify: &Notifier,
    payload: &[u8],
    stream_seq: Option<u64>,
) -> Result<(), StoreError> {
    let c: checkpoint::Shipped = match serde_json::from_slice(payload) {
        Ok(c) => c,
        Err(e) => {
            warn!(stream_seq, error = %e, "checkpoint message is not a checkpoint");
            return store.ingest_error(stream_seq, &format!("not a checkpoint: {e}"), now_ms());
        }
    };
    let offered = NodeKey {
        kid: c.node_key.kid.clone(),
        ed25519: c.node_key.ed25519.clone(),
        source: "first-sight".into(),
        at_ms: now_ms(),
    };
    let pinned = store.pin_key(&c.node, &offered)?;
    if pinned.ed25519 != offered.ed25519 {
        return flag(
            store,
            notify,
            &c.node,
            format!(
                "checkpoint #{} is signed by key {}, not the node's {} key {}",
                c.checkpoint.n, c.node_key.kid, pinned.source, pinned.kid
            ),
        );
    }
    let key = checkpoint::PublicKey {
        kid: pinned.kid,
        alg: "Ed25519".into(),
        ed25519: pinned.ed25519,
    };
    if let Err(why) = c.checkpoint.check(&key) {
        return flag(store, notify, &c.node, why);
    }
    store.add_checkpoint(&c.node, &c.checkpoint)?;
    if let Some(held) = store.held(&c.node, c.checkpoint.seq)? {
        if hex::encode(held) != c.checkpoint.head {
            return flag(
                store,
                notify,
                &c.node,
                format!(
                    "event {} differs from the node's signed checkpoint #{}",
                    c.checkpoint.seq, c.checkpoint.n
                ),
            );
        }
    }
    Ok(())
}

/// Follows the stream until the process ends, reconnecting with backoff.
pub async fn run(store: Arc<Store>, notify: Notifier, src: Source) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match session(&store, &notify, &src).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                warn!(error = %e, url = %src.url, "evidence ingest interrupted; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn session(store: &Arc<Store>, notify: &Notifier, src: &Source) -> Result<(), IngestError> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(src.url.as_str())
        .await
        .map_err(nats)?;
    let js = jetstream::new(client);
    // Created as the nodes create it (same subjects and de-duplication
    // window), so the console may start before any node has shipped.
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: src.stream.clone(),
            subjects: vec![format!("{}.>", src.subject_prefix)],
            duplicate_window: Duration::from_secs(3600),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            &src.durable,
            consumer::pull::Config {
                durable_name: Some(src.durable.clone()),
                filter_subject: format!("{}.>", src.subject_prefix),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .map_err(nats)?;
    info!(stream = %src.stream, durable = %src.durable, "ingesting evidence");
    let mut messages = consumer.messages().await.map_err(nats)?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(nats)?;
        let stream_seq = m.info().ok().map(|i| i.stream_sequence);
        let st = store.clone();
        let (subject, payload) = (m.subject.to_string(), m.payload.clone());
        let n = notify.clone();
        tokio::task::spawn_blocking(move || take(&st, &n, &subject, &payload, stream_seq))
            .await
            .map_err(|e| IngestError::Nats(format!("ingest task: {e}")))??;
        m.ack().await.map_err(nats)?;
    }
    Ok(())
}
