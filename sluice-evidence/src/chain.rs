//! The chain rule. A link commits to its content through a digest, and
//! to the previous link through its hash:
//!
//! ```text
//! digest = SHA-256(len‖at_ms, len‖connection, len‖kind, len‖body)
//! hash   = SHA-256("sluice-chain-v1" ‖ prev ‖ seq ‖ digest)
//! ```
use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// The `prev` of the first event.
pub const GENESIS: Hash = [0; 32];

pub fn content_digest(at_ms: u64, connection: u64, kind: &str, body: &[u8]) -> Hash {
    let mut h = Sha256::new();
    for part in [
        &at_ms.to_be_bytes()[..],
        &connection.to_be_bytes(),
        kind.as_bytes(),
        body,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

pub fn link_hash(prev: &Hash, seq: u64, digest: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(b"sluice-chain-v1");
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(digest);
    h.finalize().into()
}
