//! Fleet actions over NATS: the requests nodes hold (listed live, from
//! their notices and heartbeats), decisions on them signed with the
//! console's Ed25519 key and sent to the holding node (which answers
//! whether it accepted), the fleet's signed suspension list in its
//! key-value bucket, and each node's last heartbeat.
//!
//! The console keeps no state of its own here that it could not rebuild:
//! what is held comes back with the next heartbeat, the suspension list
//! lives in the bucket (read before every change, written with the
//! expected last sequence so two consoles cannot lose each other's
//! change).
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::{
    jetstream::{self, stream},
    HeaderMap,
};
use futures_util::StreamExt;
use serde::Serialize;
use sluice_fleet::{
    approval::{Decision, Held, Notice, Reply, Verdict, DECISION_TTL_SECS, DECISION_TYP},
    heartbeat::{Heartbeat, INTERVAL_SECS},
    signed::{self, Signer, Trusted},
    subjects,
    suspension::{Entry, List, Scope, LIST_TYP},
};
use tokio::sync::RwLock;
use tracing::{info, warn};

use crate::notify::Alert;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("NATS is not reachable yet: {0}")]
    Offline(String),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("no request {id} is held on {node} (decided, expired, or never held)")]
    NotHeld { node: String, id: u64 },
    #[error("node {node} did not answer within {secs}s (is it running and connected?)")]
    NoAnswer { node: String, secs: u64 },
    #[error("node {node} refused the decision: {message}")]
    Refused { node: String, message: String },
    #[error("the suspension list in the bucket is not signed by this console: {0}")]
    ForeignList(String),
    #[error("another console changed the suspension list at the same time; try again")]
    Conflict,
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Sign(#[from] signed::SignedError),
}

fn nats(e: impl std::fmt::Display) -> FleetError {
    FleetError::Nats(e.to_string())
}

/// A node as its heartbeats describe it.
#[derive(Clone, Debug, Serialize)]
pub struct NodeBeat {
    pub beat: Heartbeat,
    pub received_ms: u64,
}

#[derive(Clone)]
struct Conn {
    client: async_nats::Client,
    js: jetstream::Context,
    list: stream::Stream,
}

pub struct Fleet {
    pub signer: Signer,
    /// The console's own key: lists in the bucket must verify against it
    /// (or against `also_trusted`) before the console builds on them.
    trusted: Vec<Trusted>,
    bucket: String,
    /// The connection, and the suspension list's stream (made once per
    /// connection, not per read).
    conn: RwLock<Option<Conn>>,
    held: Mutex<BTreeMap<(String, u64), Held>>,
    beats: Mutex<BTreeMap<String, NodeBeat>>,
    /// The newest list this console has read or written: a genuinely
    /// signed but older list republished into the bucket is not built on.
    newest: Mutex<List>,
    notify: crate::notify::Notifier,
}

/// How long the console waits for a node to answer a decision.
const ANSWER_SECS: u64 = 5;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Fleet {
    pub fn new(
        signer: Signer,
        bucket: String,
        notify: crate::notify::Notifier,
    ) -> Result<Self, FleetError> {
        let own = Trusted::from_pem(&signer.public_pem()).map_err(FleetError::Invalid)?;
        Ok(Self {
            signer,
            trusted: vec![own],
            bucket,
            conn: RwLock::new(None),
            held: Mutex::default(),
            beats: Mutex::default(),
            newest: Mutex::default(),
            notify,
        })
    }

    /// Follows the nodes' notices and heartbeats until the process ends,
    /// reconnecting with backoff.
    pub async fn run(self: Arc<Self>, url: String) {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.follow(&url).await {
                Ok(()) => backoff = Duration::from_millis(500),
                Err(e) => {
                    warn!(error = %e, %url, "fleet link interrupted; retrying");
                    *self.conn.write().await = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn follow(&self, url: &str) -> Result<(), FleetError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(nats)?;
        let js = jetstream::new(client.clone());
        let list = bucket(&js, &self.bucket).await?;
        let mut held = client.subscribe(subjects::HELD_ALL).await.map_err(nats)?;
        let mut beats = client
            .subscribe(subjects::HEARTBEAT_ALL)
            .await
            .map_err(nats)?;
        *self.conn.write().await = Some(Conn {
            client: client.clone(),
            js,
            list,
        });
        info!(%url, "following the fleet's holds and heartbeats");
        loop {
            tokio::select! {
                m = held.next() => {
                    let Some(m) = m else { return Err(FleetError::Nats("subscription ended".into())) };
                    match serde_json::from_slice::<Notice>(&m.payload) {
                        Ok(n) => self.notice(n),
                        Err(e) => warn!(subject = %m.subject, error = %e, "not a held-request notice"),
                    }
                }
                m = beats.next() => {
                    let Some(m) = m else { return Err(FleetError::Nats("subscription ended".into())) };
                    match serde_json::from_slice::<Heartbeat>(&m.payload) {
                        Ok(b) => self.beat(b),
                        Err(e) => warn!(subject = %m.subject, error = %e, "not a heartbeat"),
                    }
                }
            }
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notice(&self, n: Notice) {
        let mut held = Self::lock(&self.held);
        match n {
            Notice::Held(h) => {
                info!(node = %h.node, id = h.id, rule = %h.rule, "request held on a node");
                // Once per hold: the notifier remembers holds it alerted.
                self.notify.alert(Alert::ApprovalPending(h.clone()));
                held.insert((h.node.clone(), h.id), *h);
            }
            Notice::Ended { node, id, hold, .. } => {
                if held
                    .get(&(node.clone(), id))
                    .is_some_and(|h| h.hold == hold)
                {
                    held.remove(&(node, id));
                }
            }
        }
    }

    /// A heartbeat names everything its node still holds: what it no
    /// longer names has ended.
    fn beat(&self, b: Heartbeat) {
        {
            let mut held = Self::lock(&self.held);
            held.retain(|(node, _), _| node != &b.node);
            for h in &b.held {
                // A hold whose notice this console missed; one already
                // alerted is not alerted again.
                if h.expires_ms > now_ms() {
                    self.notify
                        .alert(Alert::ApprovalPending(Box::new(h.clone())));
                }
                held.insert((h.node.clone(), h.id), h.clone());
            }
        }
        Self::lock(&self.beats).insert(
            b.node.clone(),
            NodeBeat {
                beat: b,
                received_ms: now_ms(),
            },
        );
    }

    /// What is held now, oldest first (expired holds left out).
    pub fn held(&self) -> Vec<Held> {
        let now = now_ms();
        let mut v: Vec<Held> = Self::lock(&self.held)
            .values()
            .filter(|h| h.expires_ms > now)
            .cloned()
            .collect();
        v.sort_by_key(|h| h.created_ms);
        v
    }

    pub fn beats(&self) -> BTreeMap<String, NodeBeat> {
        Self::lock(&self.beats).clone()
    }

    /// Whether a node has been heard from within three beats.
    pub fn silent(b: &NodeBeat) -> bool {
        now_ms().saturating_sub(b.received_ms) > 3 * INTERVAL_SECS * 1000
    }

    async fn conn(&self) -> Result<Conn, FleetError> {
        self.conn
            .read()
            .await
            .clone()
            .ok_or_else(|| FleetError::Offline("not connected".into()))
    }

    /// Signs a decision on a held request and delivers it to its node;
    /// Ok when the node accepted it.
    pub async fn decide(
        &self,
        node: &str,
        id: u64,
        verdict: Verdict,
        by: &str,
        reason: &str,
    ) -> Result<String, FleetError> {
        let hold = Self::lock(&self.held)
            .get(&(node.to_owned(), id))
            .map(|h| h.hold.clone())
            .ok_or_else(|| FleetError::NotHeld {
                node: node.into(),
                id,
            })?;
        let iat = now_ms() / 1000;
        let token = self.signer.sign(
            DECISION_TYP,
            &Decision {
                node: node.into(),
                id,
                hold: hold.clone(),
                verdict,
                by: by.into(),
                reason: reason.into(),
                iat,
                exp: iat + DECISION_TTL_SECS,
            },
        )?;
        let client = self.conn().await?.client;
        let answer = tokio::time::timeout(
            Duration::from_secs(ANSWER_SECS),
            client.request(subjects::decide(node), token.into()),
        )
        .await
        .map_err(|_| FleetError::NoAnswer {
            node: node.into(),
            secs: ANSWER_SECS,
        })?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => FleetError::NoAnswer {
                node: node.into(),
                secs: 0,
            },
            _ => nats(e),
        })?;
        let reply: Reply = serde_json::from_slice(&answer.payload)
            .map_err(|e| FleetError::Nats(format!("the node's answer is not a reply: {e}")))?;
        if !reply.accepted {
            return Err(FleetError::Refused {
                node: node.into(),
                message: reply.message,
            });
        }
        {
            let mut held = Self::lock(&self.held);
            if held
                .get(&(node.to_owned(), id))
                .is_some_and(|h| h.hold == hold)
            {
                held.remove(&(node.to_owned(), id));
            }
        }
        let word = match verdict {
            Verdict::Approve => "approved",
            Verdict::Deny => "denied",
        };
        info!(%node, id, %by, verdict = word, "decision accepted by the node");
        Ok(reply.message)
    }

    /// The suspension list in the bucket (verified), and the sequence it
    /// is at (0: none yet).
    pub async fn suspensions(&self) -> Result<(List, u64), FleetError> {
        let s = self.conn().await?.list;
        match s
            .get_last_raw_message_by_subject(&subjects::kv_subject(
                &self.bucket,
                subjects::SUSPENSIONS_KEY,
            ))
            .await
        {
            Ok(m) => {
                let token = String::from_utf8_lossy(&m.payload);
                let (list, _) = signed::verify::<List>(&token, LIST_TYP, &self.trusted)
                    .map_err(|e| FleetError::ForeignList(e.to_string()))?;
                let mut newest = Self::lock(&self.newest);
                if list.version < newest.version {
                    warn!(
                        bucket = list.version,
                        newest = newest.version,
                        "the bucket's suspension list is older than one this console saw (replayed?): the newer one stands"
                    );
                    return Ok((newest.clone(), m.sequence));
                }
                *newest = list.clone();
                Ok((list, m.sequence))
            }
            Err(e) if e.to_string().contains("no message found") => Ok((List::default(), 0)),
            Err(e) => Err(nats(e)),
        }
    }

    /// Adds (or, `resume`, removes) an entry and publishes the new list,
    /// signed; every node following the bucket applies it.
    pub async fn change_suspension(
        &self,
        scope: Scope,
        value: &str,
        reason: &str,
        by: &str,
        resume: bool,
    ) -> Result<List, FleetError> {
        let value = value.trim();
        if value.is_empty() || value.len() > 512 {
            return Err(FleetError::Invalid(
                "name what to suspend (at most 512 characters)".into(),
            ));
        }
        let (mut list, seq) = self.suspensions().await?;
        let before = list.entries.len();
        list.entries
            .retain(|e| !(e.scope == scope && e.value == value));
        if resume {
            if list.entries.len() == before {
                return Err(FleetError::Invalid(format!(
                    "{} {value} is not suspended",
                    scope.as_str()
                )));
            }
        } else {
            list.entries.push(Entry {
                scope,
                value: value.into(),
                reason: reason.into(),
                by: by.into(),
                at_ms: now_ms(),
            });
        }
        list.version = (list.version + 1).max(now_ms());
        list.iat = now_ms() / 1000;
        let token = self.signer.sign(LIST_TYP, &list)?;
        let js = self.conn().await?.js;
        let mut headers = HeaderMap::new();
        // Optimistic concurrency: the bucket refuses the write if anyone
        // wrote the list since it was read.
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            seq.to_string().as_str(),
        );
        js.publish_with_headers(
            subjects::kv_subject(&self.bucket, subjects::SUSPENSIONS_KEY),
            headers,
            token.into(),
        )
        .await
        .map_err(nats)?
        .await
        .map_err(|e| {
            if e.to_string().contains("wrong last sequence") {
                FleetError::Conflict
            } else {
                nats(e)
            }
        })?;
        *Self::lock(&self.newest) = list.clone();
        let word = if resume { "resumed" } else { "suspended" };
        info!(scope = scope.as_str(), %value, %by, version = list.version, "{word} across the fleet");
        // Held requests the new entry covers are denied by their nodes.
        Ok(list)
    }
}

/// The bundle in the fleet's bucket, as far as the console can tell
/// without the team's keys (each node verifies it against its own).
#[derive(Clone, Debug, Serialize)]
pub struct PublishedBundle {
    pub name: String,
    pub version: u64,
    pub signer: String,
    pub revision: u64,
}

#[derive(serde::Deserialize)]
struct BundleClaims {
    name: String,
    version: u64,
}

/// Reads a bundle JWS's claims without checking its signature.
fn bundle_claims(jws: &str) -> Result<(BundleClaims, String), FleetError> {
    let bad = |e: &dyn std::fmt::Display| {
        FleetError::Invalid(format!(
            "not a signed bundle (`sluice policy sign` makes one): {e}"
        ))
    };
    let header = jsonwebtoken::decode_header(jws.trim()).map_err(|e| bad(&e))?;
    let kid = header
        .kid
        .ok_or_else(|| bad(&"the JWS names no signing key"))?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.insecure_disable_signature_validation();
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_aud = false;
    let data = jsonwebtoken::decode::<BundleClaims>(
        jws.trim(),
        &jsonwebtoken::DecodingKey::from_secret(&[]),
        &v,
    )
    .map_err(|e| bad(&e))?;
    Ok((data.claims, kid))
}

impl Fleet {
    /// The bundle the nodes follow (`None`: none published yet).
    pub async fn bundle(&self, bucket_name: &str) -> Result<Option<PublishedBundle>, FleetError> {
        let js = self.conn().await?.js;
        let s = bucket(&js, bucket_name).await?;
        match s
            .get_last_raw_message_by_subject(&subjects::kv_subject(bucket_name, "bundle"))
            .await
        {
            Ok(m) => {
                let (c, kid) = bundle_claims(&String::from_utf8_lossy(&m.payload))?;
                Ok(Some(PublishedBundle {
                    name: c.name,
                    version: c.version,
                    signer: kid,
                    revision: m.sequence,
                }))
            }
            Err(e) if e.to_string().contains("no message found") => Ok(None),
            Err(e) => Err(nats(e)),
        }
    }

    /// Publishes a signed bundle for every node following the bucket; each
    /// applies it only if signed by a key it trusts and newer than its floor.
    pub async fn publish_bundle(
        &self,
        bucket_name: &str,
        jws: &str,
    ) -> Result<PublishedBundle, FleetError> {
        let (c, kid) = bundle_claims(jws)?;
        let js = self.conn().await?.js;
        bucket(&js, bucket_name).await?;
        let ack = js
            .publish(
                subjects::kv_subject(bucket_name, "bundle"),
                jws.trim().to_owned().into(),
            )
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
        info!(name = %c.name, version = c.version, signer = %kid, "bundle published to the fleet");
        Ok(PublishedBundle {
            name: c.name,
            version: c.version,
            signer: kid,
            revision: ack.sequence,
        })
    }
}

/// The suspension list's stream, in the key-value layout the nodes read.
async fn bucket(js: &jetstream::Context, name: &str) -> Result<stream::Stream, FleetError> {
    js.get_or_create_stream(stream::Config {
        name: subjects::kv_stream(name),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 16,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        ..Default::default()
    })
    .await
    .map_err(nats)
}
