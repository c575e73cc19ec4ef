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

pub use sluice_evidence::checkpoint::{message, Checkpoint, Evidence, ProofLink, PublicKey};

use super::chain::Hash;
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
