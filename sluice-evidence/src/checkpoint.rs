//! A node's signed checkpoints, as the node writes them and the console
//! checks them from the stream: "events 0..=seq exist and event `seq` has
//! hash `head`", signed with the node's Ed25519 key.
//!
//! Signed message: `"sluice-checkpoint-v1\n" ‖ n ‖ seq ‖ head ‖ at_ms`
//! (integers u64 big-endian, `head` the 32 raw hash bytes).
use base64::Engine;
use ring::signature::{UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::chain::{link_hash, Hash};

const DOMAIN: &[u8] = b"sluice-checkpoint-v1\n";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The public half, as exports carry it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PublicKey {
    /// SHA-256 of the raw key, first 8 bytes, hex (as policy keys).
    pub kid: String,
    pub alg: String,
    /// The raw 32-byte Ed25519 key, base64.
    pub ed25519: String,
}

pub fn message(n: u64, seq: u64, head: &Hash, at_ms: u64) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(&n.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(head);
    m.extend_from_slice(&at_ms.to_be_bytes());
    m
}

/// A signed statement: "events 0..=seq exist and event `seq` has hash
/// `head`".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Checkpoint number, counting up (never reused, even if the chain is
    /// cut and continued).
    pub n: u64,
    /// The last event it covers.
    pub seq: u64,
    /// That event's hash, hex.
    pub head: String,
    pub at_ms: u64,
    pub kid: String,
    /// Ed25519 signature, base64.
    pub sig: String,
}

impl Checkpoint {
    pub fn head_hash(&self) -> Option<Hash> {
        hex::decode(&self.head).ok()?.try_into().ok()
    }

    /// Checks the signature against `key`; the error says why not.
    pub fn check(&self, key: &PublicKey) -> Result<(), String> {
        if self.kid != key.kid {
            return Err(format!(
                "checkpoint #{} is forged: signed by key {}, not this node's key {}",
                self.n, self.kid, key.kid
            ));
        }
        let forged = || {
            format!(
                "checkpoint #{} (seq {}) is forged: its signature does not verify with the node key {}",
                self.n, self.seq, key.kid
            )
        };
        let raw = B64.decode(&key.ed25519).map_err(|_| forged())?;
        let sig = B64.decode(&self.sig).map_err(|_| forged())?;
        let head = self.head_hash().ok_or_else(forged)?;
        UnparsedPublicKey::new(&ED25519, raw)
            .verify(&message(self.n, self.seq, &head, self.at_ms), &sig)
            .map_err(|_| forged())
    }
}

/// One link between a session's first event and a checkpoint, as an
/// export carries it: the session's own events in full (their body is the
/// exact stored JSON), other events by content digest only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProofLink {
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// What an export carries so that an investigator can check, offline, that
/// the session's events are in the node's chain up to a signed checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub node_key: PublicKey,
    /// The first checkpoint at or after the session's last event; none
    /// when the node has not signed one since.
    pub checkpoint: Option<Checkpoint>,
    /// Hash of the event before `links[0]`, hex.
    pub prev: String,
    pub links: Vec<ProofLink>,
}

impl Evidence {
    /// Offline check: the checkpoint's signature, then the chain from
    /// `prev` through every link to the checkpoint's head. Returns the
    /// number of the session's own events it covered.
    pub fn verify(&self) -> Result<usize, String> {
        let cp = self
            .checkpoint
            .as_ref()
            .ok_or("no checkpoint covers this session yet")?;
        cp.check(&self.node_key)?;
        let mut prev: Hash = hex::decode(&self.prev)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or("bad prev hash")?;
        let mut own = 0;
        let mut last = None;
        for l in &self.links {
            if let Some(prev_seq) = last {
                if l.seq != prev_seq + 1 {
                    return Err(format!("link {} does not follow {prev_seq}", l.seq));
                }
            }
            let digest: Hash = match (&l.digest, &l.body) {
                (_, Some(body)) => {
                    own += 1;
                    crate::chain::content_digest(
                        l.at_ms.unwrap_or_default(),
                        l.connection.unwrap_or_default(),
                        l.kind.as_deref().unwrap_or_default(),
                        body.as_bytes(),
                    )
                }
                (Some(d), None) => hex::decode(d)
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .ok_or_else(|| format!("link {}: bad digest", l.seq))?,
                (None, None) => return Err(format!("link {} has neither body nor digest", l.seq)),
            };
            prev = link_hash(&prev, l.seq, &digest);
            last = Some(l.seq);
        }
        if last != Some(cp.seq) || cp.head_hash() != Some(prev) {
            return Err(format!(
                "the session's events do not lead to checkpoint #{} (seq {})",
                cp.n, cp.seq
            ));
        }
        Ok(own)
    }
}

/// What a node ships beside its events (subject `<prefix>.<node>.$checkpoint`):
/// its newest checkpoint once the events it covers are in the stream, and
/// the public key it is signed with (pinned by the console on first sight).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Shipped {
    pub node: String,
    pub checkpoint: Checkpoint,
    pub node_key: PublicKey,
}

/// The subject token checkpoints are shipped under (no identity token can
/// be it: those are letters, digits, `-` and `_`).
pub const TOKEN: &str = "$checkpoint";
