//! A spool line as shipped: one chain event as JSON with what a reader
//! files it by (node, actor, OCSF class) and what a verifier checks
//! (sequence, previous and own hash, the exact stored body).
use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::chain::{content_digest, link_hash, Hash};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LineError {
    #[error("not a spool line: {0}")]
    Json(String),
    #[error("event {seq}: {what}")]
    Field { seq: u64, what: &'static str },
}

#[derive(Deserialize)]
struct Wire<'a> {
    seq: u64,
    prev: String,
    hash: String,
    at_ms: u64,
    connection: u64,
    kind: String,
    node: String,
    actor: String,
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
    #[serde(default)]
    body_base64: Option<String>,
}

/// One event read from the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub seq: u64,
    pub prev: Hash,
    pub hash: Hash,
    pub at_ms: u64,
    pub connection: u64,
    pub kind: String,
    pub node: String,
    pub actor: String,
    /// The body exactly as the node hashed it.
    pub body: Vec<u8>,
}

impl Line {
    pub fn parse(bytes: &[u8]) -> Result<Self, LineError> {
        let w: Wire = serde_json::from_slice(bytes).map_err(|e| LineError::Json(e.to_string()))?;
        let field = |what| LineError::Field { seq: w.seq, what };
        let hex32 = |s: &str| -> Option<Hash> { hex::decode(s).ok()?.try_into().ok() };
        let body = match (&w.body, &w.body_base64) {
            (Some(b), _) => b.get().as_bytes().to_vec(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|_| field("body_base64 is not base64"))?,
            (None, None) => return Err(field("no body")),
        };
        Ok(Line {
            seq: w.seq,
            prev: hex32(&w.prev).ok_or_else(|| field("prev is not a hash"))?,
            hash: hex32(&w.hash).ok_or_else(|| field("hash is not a hash"))?,
            at_ms: w.at_ms,
            connection: w.connection,
            kind: w.kind,
            node: w.node,
            actor: w.actor,
            body,
        })
    }

    /// Whether `hash` is what `prev` and the content give.
    pub fn hash_ok(&self) -> bool {
        link_hash(
            &self.prev,
            self.seq,
            &content_digest(self.at_ms, self.connection, &self.kind, &self.body),
        ) == self.hash
    }
}
