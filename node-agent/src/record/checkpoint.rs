//! Signed checkpoints of the chain head. The node has its own Ed25519 key
//! (`node-signing.key`, PKCS#8, 0600, made at first start beside the
//! records); every N events or T seconds the group-commit thread signs
//! (checkpoint number, last event seq, that event's hash, time) and stores
//! it in the `checkpoints` tree, apart from the chain. `verify` checks every
//! checkpoint's signature and that the chain still holds the event it
//! names: events removed after a checkpoint (a truncated tail) or a
//! checkpoint written without the key are named.
//!
//! Signed message: `"sluice-checkpoint-v1\n" ‖ n ‖ seq ‖ head ‖ at_ms`
//! (integers u64 big-endian, `head` the 32 raw hash bytes).
use std::path::{Path, PathBuf};

use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls::pki_types::{pem::PemObject, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

pub use sluice_evidence::checkpoint::{message, Checkpoint, PublicKey};

use super::chain::{link_hash, Hash};
use crate::keys;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("node signing key {path}: {message}")]
    Key { path: String, message: String },
}

/// The node's checkpoint signing key.
pub struct NodeKey {
    pair: Ed25519KeyPair,
    pub kid: String,
}

impl NodeKey {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("node-signing.key")
    }

    /// Loads the key in `dir`, generating it on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, KeyError> {
        let path = Self::path(dir);
        let err = |m: String| KeyError::Key {
            path: path.display().to_string(),
            message: m,
        };
        if !path.exists() {
            keys::keygen(&dir.join("node-signing")).map_err(|e| err(e.to_string()))?;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(text.as_bytes())
            .map_err(|e| err(format!("not a PEM (PKCS#8) private key: {e}")))?;
        let pair =
            Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| err(e.to_string()))?;
        let kid = keys::kid_of(pair.public_key().as_ref());
        Ok(Self { pair, kid })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            kid: self.kid.clone(),
            alg: "Ed25519".into(),
            ed25519: B64.encode(self.pair.public_key().as_ref()),
        }
    }

    pub fn sign(&self, n: u64, seq: u64, head: &Hash, at_ms: u64) -> Checkpoint {
        let sig = self.pair.sign(&message(n, seq, head, at_ms));
        Checkpoint {
            n,
            seq,
            head: hex::encode(head),
            at_ms,
            kid: self.kid.clone(),
            sig: B64.encode(sig.as_ref()),
        }
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
                    super::chain::content_digest(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_private_and_stable_and_signatures_check() {
        let dir = tempfile::tempdir().unwrap();
        let k = NodeKey::load_or_create(dir.path()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(NodeKey::path(dir.path()))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "private key is 0600");
        let again = NodeKey::load_or_create(dir.path()).unwrap();
        assert_eq!(k.public(), again.public());
        let cp = k.sign(3, 41, &[7; 32], 1234);
        cp.check(&k.public()).unwrap();
        let mut forged = cp.clone();
        forged.seq = 40;
        assert!(forged.check(&k.public()).unwrap_err().contains("forged"));
        let other = NodeKey::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        let foreign = other.sign(3, 41, &[7; 32], 1234);
        assert!(foreign.check(&k.public()).unwrap_err().contains("forged"));
    }
}
