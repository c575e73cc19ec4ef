//! Signing and verifying policy bundles: a compact JWS (EdDSA / Ed25519,
//! via jsonwebtoken) whose claims carry the bundle text. The header's `kid`
//! names the signing key (SHA-256 of its public key), so the node can tell
//! "signed by a key I do not trust" from "tampered".
use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls::pki_types::{pem::PemObject, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const TYP: &str = "sluice-policy+jwt";
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("key file {path}: {message}")]
    Key { path: String, message: String },
    #[error("not a signed bundle (expected a JWS from `sluice policy sign`): {0}")]
    Unsigned(String),
    #[error("signed by a key this node does not trust (kid {0})")]
    UntrustedSigner(String),
    #[error("signature does not verify (bundle altered after signing?): {0}")]
    BadSignature(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The bundle, verbatim (YAML).
    pub bundle: String,
    pub version: u64,
    pub name: String,
    /// Hex SHA-256 of `bundle`.
    pub digest: String,
    pub iat: u64,
}

/// A public key the node accepts bundles from.
pub struct TrustedKey {
    pub kid: String,
    key: DecodingKey,
}

pub use crate::keys::kid_of;

/// Writes `PREFIX.key` (0600, PKCS#8) and `PREFIX.pub` (SPKI); returns the kid.
pub fn keygen(prefix: &Path) -> Result<String, SignError> {
    crate::keys::keygen(prefix).map_err(|e| SignError::Key {
        path: e.path,
        message: e.message,
    })
}

pub fn load_trusted(path: &Path) -> Result<TrustedKey, SignError> {
    let err = |m: String| SignError::Key {
        path: path.display().to_string(),
        message: m,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let raw = crate::keys::public_raw_from_pem(&text)
        .map_err(|e| err(format!("{e} (use `sluice policy keygen`)")))?;
    let key = DecodingKey::from_ed_pem(text.as_bytes()).map_err(|e| err(e.to_string()))?;
    Ok(TrustedKey {
        kid: kid_of(&raw),
        key,
    })
}

/// Signs bundle text with a private key file; returns the JWS.
pub fn sign(bundle: &str, version: u64, name: &str, key_path: &Path) -> Result<String, SignError> {
    let err = |m: String| SignError::Key {
        path: key_path.display().to_string(),
        message: m,
    };
    let text = std::fs::read_to_string(key_path).map_err(|e| err(e.to_string()))?;
    let der = PrivatePkcs8KeyDer::from_pem_slice(text.as_bytes())
        .map_err(|e| err(format!("not a PEM (PKCS#8) private key: {e}")))?;
    let pair = Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der())
        .map_err(|e| err(format!("not an Ed25519 key: {e}")))?;
    let kid = kid_of(pair.public_key().as_ref());
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid);
    header.typ = Some(TYP.into());
    let claims = Claims {
        bundle: bundle.to_owned(),
        version,
        name: name.to_owned(),
        digest: hex::encode(Sha256::digest(bundle.as_bytes())),
        iat: crate::record::now_ms() / 1000,
    };
    let key = EncodingKey::from_ed_pem(text.as_bytes()).map_err(|e| err(e.to_string()))?;
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| SignError::Sign(e.to_string()))
}

/// Checks that `jws` is a signed bundle in form (a JWS header naming a
/// key); the signature itself is each node's to check.
pub fn verify_unsigned_shape(jws: &str) -> Result<(), SignError> {
    let header =
        jsonwebtoken::decode_header(jws.trim()).map_err(|e| SignError::Unsigned(e.to_string()))?;
    if header.kid.is_none() {
        return Err(SignError::Unsigned("the JWS names no signing key".into()));
    }
    Ok(())
}

/// Verifies a JWS against the trusted keys; returns its claims and signer.
pub fn verify(jws: &str, trusted: &[TrustedKey]) -> Result<(Claims, String), SignError> {
    let jws = jws.trim();
    let header =
        jsonwebtoken::decode_header(jws).map_err(|e| SignError::Unsigned(e.to_string()))?;
    if header.alg != Algorithm::EdDSA {
        return Err(SignError::BadSignature(format!(
            "algorithm {:?} is not accepted",
            header.alg
        )));
    }
    let kid = header.kid.unwrap_or_default();
    let key = trusted.iter().find(|k| k.kid == kid).ok_or_else(|| {
        SignError::UntrustedSigner(if kid.is_empty() {
            "none".into()
        } else {
            kid.clone()
        })
    })?;
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<Claims>(jws, &key.key, &validation)
        .map_err(|e| SignError::BadSignature(e.to_string()))?;
    let claims = data.claims;
    if hex::encode(Sha256::digest(claims.bundle.as_bytes())) != claims.digest {
        return Err(SignError::BadSignature(
            "digest does not match the bundle".into(),
        ));
    }
    Ok((claims, kid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_every_kind_of_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let kid = keygen(&dir.path().join("team")).unwrap();
        keygen(&dir.path().join("other")).unwrap();
        let trusted = vec![load_trusted(&dir.path().join("team.pub")).unwrap()];
        assert_eq!(trusted[0].kid, kid);

        let jws = sign(
            "version: 2\nname: x\n",
            2,
            "x",
            &dir.path().join("team.key"),
        )
        .unwrap();
        let (claims, signer) = verify(&jws, &trusted).unwrap();
        assert_eq!((claims.version, signer.as_str()), (2, kid.as_str()));

        // Tampered payload: flip a character of the claims part.
        let mut parts: Vec<String> = jws.split('.').map(str::to_owned).collect();
        let mut c = parts[1].clone().into_bytes();
        c[10] = if c[10] == b'A' { b'B' } else { b'A' };
        parts[1] = String::from_utf8(c).unwrap();
        let e = verify(&parts.join("."), &trusted).unwrap_err();
        assert!(matches!(e, SignError::BadSignature(_)), "{e}");

        let other = sign(
            "version: 3\nname: x\n",
            3,
            "x",
            &dir.path().join("other.key"),
        )
        .unwrap();
        assert!(matches!(
            verify(&other, &trusted),
            Err(SignError::UntrustedSigner(_))
        ));
        assert!(matches!(
            verify("version: 3\n", &trusted),
            Err(SignError::Unsigned(_))
        ));
        let mode = std::fs::metadata(dir.path().join("team.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }
}
