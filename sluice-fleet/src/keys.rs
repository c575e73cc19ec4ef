//! Ed25519 key files shared by policy signing (`policy::sign`) and the
//! node's checkpoint key (`record::checkpoint`): generation, PEM encoding
//! and the key id. Kept apart so neither subsystem imports the other.
use std::{os::unix::fs::OpenOptionsExt, path::Path};

use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair};
use sha2::{Digest, Sha256};

/// DER prefix of an Ed25519 SubjectPublicKeyInfo.
pub const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, thiserror::Error)]
#[error("key file {path}: {message}")]
pub struct KeyFileError {
    pub path: String,
    pub message: String,
}

/// The key id: SHA-256 of the raw public key, first 8 bytes, hex.
pub fn kid_of(public_raw: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_raw)[..8])
}

pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes `PREFIX.key` (0600, PKCS#8) and `PREFIX.pub` (SPKI); returns the kid.
pub fn keygen(prefix: &Path) -> Result<String, KeyFileError> {
    let rng = ring::rand::SystemRandom::new();
    let err = |m: String| KeyFileError {
        path: prefix.display().to_string(),
        message: m,
    };
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| err(e.to_string()))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| err(e.to_string()))?;
    let public = pair.public_key().as_ref().to_vec();
    let mut spki = ED25519_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(&public);
    let key_path = prefix.with_extension("key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|e| err(format!("{}: {e}", key_path.display())))?;
    std::io::Write::write_all(&mut f, pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes())
        .map_err(|e| err(e.to_string()))?;
    std::fs::write(prefix.with_extension("pub"), pem("PUBLIC KEY", &spki))
        .map_err(|e| err(e.to_string()))?;
    Ok(kid_of(&public))
}

/// 16 random bytes, hex: names one hold, one session.
pub fn random_token() -> String {
    let mut b = [0u8; 16];
    // The system's generator failing is not something to run on with.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        std::process::abort();
    }
    hex::encode(b)
}

/// The raw 32-byte Ed25519 key of a PEM public key (SPKI), as
/// `keygen` writes `PREFIX.pub`.
pub fn public_raw_from_pem(text: &str) -> Result<Vec<u8>, String> {
    use rustls_pki_types::{pem::PemObject, SubjectPublicKeyInfoDer};
    let der = SubjectPublicKeyInfoDer::from_pem_slice(text.as_bytes())
        .map_err(|e| format!("not a PEM public key: {e}"))?;
    der.as_ref()
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .filter(|r| r.len() == 32)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| "not an Ed25519 public key".to_owned())
}
