//! Bundles from the fleet: a NATS JetStream key-value bucket holds the
//! signed bundle for every node (`sluice policy publish`); each node
//! follows it and applies what arrives exactly as a push (signature,
//! trusted keys, version floor and expiry checked here: the transport is
//! not trusted). A node that cannot reach NATS keeps enforcing the bundle
//! it has.
//!
//! The bucket is used at the stream level, in the key-value layout
//! (stream `KV_<bucket>`, subject `$KV.<bucket>.bundle`, so `nats kv get
//! <bucket> bundle` reads it): the client's key-value API does not speak
//! to the nats-server 2.9 that Debian ships, its stream API does.
use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, stream};
use tracing::{info, warn};

use super::{PolicyEngine, PolicyError};

/// The key every node watches.
pub const KEY: &str = "bundle";

#[derive(Debug, thiserror::Error)]
#[error("NATS: {0}")]
pub struct FleetError(String);

fn nats(e: impl std::fmt::Display) -> FleetError {
    FleetError(e.to_string())
}

fn subject(bucket: &str) -> String {
    format!("$KV.{bucket}.{KEY}")
}

async fn bucket(
    ep: &crate::spool::ship::Endpoint,
    name: &str,
) -> Result<(jetstream::Context, stream::Stream), FleetError> {
    let js = crate::spool::ship::connect(ep).await.map_err(nats)?;
    let s = crate::spool::ship::kv_stream(&js, name)
        .await
        .map_err(nats)?;
    Ok((js, s))
}

/// Puts a signed bundle where every node will see it; returns the
/// bucket's revision.
pub async fn publish(
    ep: &crate::spool::ship::Endpoint,
    bucket_name: &str,
    jws: &str,
) -> Result<u64, FleetError> {
    let (js, _) = bucket(ep, bucket_name).await?;
    let ack = js
        .publish(subject(bucket_name), jws.trim().to_owned().into())
        .await
        .map_err(nats)?
        .await
        .map_err(nats)?;
    Ok(ack.sequence)
}

/// Watches the bucket and applies each new bundle, until the process ends.
pub async fn watch(
    engine: Arc<PolicyEngine>,
    ep: crate::spool::ship::Endpoint,
    bucket_name: String,
) {
    let url = ep.url.clone();
    let mut backoff = Duration::from_millis(500);
    loop {
        match watch_once(&engine, &ep, &bucket_name).await {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(e) => {
                warn!(error = %e, %url, "fleet bundle watch interrupted; the bundle in force stays");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn watch_once(
    engine: &Arc<PolicyEngine>,
    ep: &crate::spool::ship::Endpoint,
    name: &str,
) -> Result<(), FleetError> {
    let (_, store) = bucket(ep, name).await?;
    info!(url = %ep.url, bucket = name, "following the fleet's bundle");
    let mut seen = 0u64;
    loop {
        match store.get_last_raw_message_by_subject(&subject(name)).await {
            Ok(msg) if msg.sequence != seen => {
                seen = msg.sequence;
                let jws = String::from_utf8_lossy(&msg.payload).into_owned();
                let via = format!("nats {name}/{KEY} revision {}", msg.sequence);
                let engine = engine.clone();
                let applied = tokio::task::spawn_blocking(move || engine.apply(&jws, &via))
                    .await
                    .map_err(nats)?;
                match applied {
                    Ok(p) => info!(
                        version = p.version,
                        revision = seen,
                        "bundle from the fleet in force"
                    ),
                    // The one already in force (seen again after a restart).
                    Err(PolicyError::Stale { .. }) => {}
                    Err(e) => {
                        warn!(error = %e, revision = seen, "bundle from the fleet refused; the bundle in force stays")
                    }
                }
            }
            Ok(_) => {}
            // No bundle published yet.
            Err(e) if e.to_string().contains("no message found") => {}
            Err(e) => return Err(nats(e)),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
