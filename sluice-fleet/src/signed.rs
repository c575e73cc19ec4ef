//! Signed messages between the console and the nodes: compact JWS
//! (EdDSA / Ed25519, via jsonwebtoken, as policy bundles), the header's
//! `typ` naming the kind of message so that one kind can never be passed
//! off as another (a decision as a suspension list, say), and its `kid`
//! naming the key, so "signed by a key this node does not trust" is told
//! from "altered". An `exp` claim, when a message has one, is enforced.
use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls_pki_types::{pem::PemObject, PrivatePkcs8KeyDer};
use serde::{de::DeserializeOwned, Serialize};

use crate::keys::{self, KeyFileError, ED25519_SPKI_PREFIX};

#[derive(Debug, thiserror::Error)]
pub enum SignedError {
    #[error("not a signed message: {0}")]
    Malformed(String),
    #[error("a {got} where a {want} was expected")]
    WrongKind { want: String, got: String },
    #[error("signed by a key this node does not trust (kid {0})")]
    Untrusted(String),
    #[error("signature does not verify (altered after signing?): {0}")]
    BadSignature(String),
    #[error("expired")]
    Expired,
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A private key that signs messages (the console's).
pub struct Signer {
    encoding: EncodingKey,
    public_raw: Vec<u8>,
    pub kid: String,
}

impl Signer {
    /// Loads `PREFIX.key`, generating the pair (`PREFIX.key` 0600 and
    /// `PREFIX.pub`) on first use.
    pub fn load_or_create(prefix: &Path) -> Result<Self, KeyFileError> {
        let path = prefix.with_extension("key");
        if !path.exists() {
            keys::keygen(prefix)?;
        }
        Self::load(&path)
    }

    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let err = |m: String| KeyFileError {
            path: path.display().to_string(),
            message: m,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(text.as_bytes())
            .map_err(|e| err(format!("not a PEM (PKCS#8) private key: {e}")))?;
        let pair = Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| err(format!("not an Ed25519 key: {e}")))?;
        let encoding = EncodingKey::from_ed_pem(text.as_bytes()).map_err(|e| err(e.to_string()))?;
        let public_raw = pair.public_key().as_ref().to_vec();
        Ok(Self {
            encoding,
            kid: keys::kid_of(&public_raw),
            public_raw,
        })
    }

    /// The public key, PEM (SPKI): what nodes list as trusted.
    pub fn public_pem(&self) -> String {
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&self.public_raw);
        keys::pem("PUBLIC KEY", &spki)
    }

    pub fn sign<T: Serialize>(&self, typ: &str, claims: &T) -> Result<String, SignedError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        header.typ = Some(typ.to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| SignedError::Sign(e.to_string()))
    }
}

/// A public key messages are accepted from.
#[derive(Clone)]
pub struct Trusted {
    pub kid: String,
    key: DecodingKey,
}

impl Trusted {
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyFileError {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_pem(&text).map_err(|message| KeyFileError {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn from_pem(text: &str) -> Result<Self, String> {
        let raw = keys::public_raw_from_pem(text)?;
        let key = DecodingKey::from_ed_pem(text.as_bytes()).map_err(|e| e.to_string())?;
        Ok(Self {
            kid: keys::kid_of(&raw),
            key,
        })
    }
}

/// Verifies a message of kind `typ` against the trusted keys; returns its
/// claims and the signer's kid.
pub fn verify<T: DeserializeOwned>(
    token: &str,
    typ: &str,
    trusted: &[Trusted],
) -> Result<(T, String), SignedError> {
    let token = token.trim();
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| SignedError::Malformed(e.to_string()))?;
    if header.alg != Algorithm::EdDSA {
        return Err(SignedError::BadSignature(format!(
            "algorithm {:?} is not accepted",
            header.alg
        )));
    }
    let got = header.typ.unwrap_or_default();
    if got != typ {
        return Err(SignedError::WrongKind {
            want: typ.to_owned(),
            got: if got.is_empty() {
                "message".into()
            } else {
                got
            },
        });
    }
    let kid = header.kid.unwrap_or_default();
    let key = trusted.iter().find(|k| k.kid == kid).ok_or_else(|| {
        SignedError::Untrusted(if kid.is_empty() {
            "none".into()
        } else {
            kid.clone()
        })
    })?;
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.required_spec_claims.clear();
    validation.validate_exp = true;
    validation.leeway = 30;
    validation.validate_aud = false;
    let data =
        jsonwebtoken::decode::<T>(token, &key.key, &validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => SignedError::Expired,
            _ => SignedError::BadSignature(e.to_string()),
        })?;
    Ok((data.claims, kid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Claim {
        n: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn verifies_and_names_every_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let console = Signer::load_or_create(&dir.path().join("console")).unwrap();
        // Loaded again, the same key (made once).
        let again = Signer::load_or_create(&dir.path().join("console")).unwrap();
        assert_eq!(console.kid, again.kid);
        let other = Signer::load_or_create(&dir.path().join("other")).unwrap();
        let trusted = vec![Trusted::from_pem(&console.public_pem()).unwrap()];
        assert_eq!(trusted[0].kid, console.kid);

        let t = console.sign("a+jwt", &Claim { n: 7, exp: None }).unwrap();
        let (c, kid): (Claim, _) = verify(&t, "a+jwt", &trusted).unwrap();
        assert_eq!((c.n, kid), (7, console.kid.clone()));

        let e = verify::<Claim>(&t, "b+jwt", &trusted).unwrap_err();
        assert!(matches!(e, SignedError::WrongKind { .. }), "{e}");

        let forged = other.sign("a+jwt", &Claim { n: 7, exp: None }).unwrap();
        let e = verify::<Claim>(&forged, "a+jwt", &trusted).unwrap_err();
        assert!(matches!(e, SignedError::Untrusted(_)), "{e}");

        // The claims of one token under the signature of another.
        let t8 = console.sign("a+jwt", &Claim { n: 8, exp: None }).unwrap();
        let mut parts: Vec<&str> = t.split('.').collect();
        parts[1] = t8.split('.').nth(1).unwrap();
        let e = verify::<Claim>(&parts.join("."), "a+jwt", &trusted).unwrap_err();
        assert!(matches!(e, SignedError::BadSignature(_)), "{e}");

        let old = console
            .sign(
                "a+jwt",
                &Claim {
                    n: 1,
                    exp: Some(now() - 120),
                },
            )
            .unwrap();
        let e = verify::<Claim>(&old, "a+jwt", &trusted).unwrap_err();
        assert!(matches!(e, SignedError::Expired), "{e}");

        let e = verify::<Claim>("not a jws", "a+jwt", &trusted).unwrap_err();
        assert!(matches!(e, SignedError::Malformed(_)), "{e}");
    }
}
