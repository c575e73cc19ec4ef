//! Upstream certificates checked beyond the roots: a server pinned by its
//! certificate's SHA-256 (self-signed database servers, whose `CA:TRUE`
//! certificate webpki refuses as an end entity while libpq's
//! `verify-full` takes it as its own root), and a verification failure
//! that says what the server presented and which option would accept it.
use std::{fmt, sync::Arc};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, UnixTime},
    CertificateError, DigitallySignedStruct, OtherError, SignatureScheme,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A certificate's SHA-256 over its DER, as `openssl x509 -fingerprint
/// -sha256` prints it (colons and case optional, `sha256:` prefix allowed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CertSha256(pub [u8; 32]);

impl CertSha256 {
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }
}

impl fmt::Display for CertSha256 {
    /// Upper-case hex with colons: what `openssl x509 -fingerprint` shows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CertSha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

impl TryFrom<String> for CertSha256 {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let t = s.trim();
        let t = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .or_else(|| t.strip_prefix("sha256 Fingerprint="))
            .unwrap_or(t);
        let hex: String = t.chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        match hex::decode_to_slice(&hex, &mut out) {
            Ok(()) => Ok(Self(out)),
            Err(_) => Err(format!(
                "`{s}` is not a SHA-256 certificate fingerprint (64 hex digits, colons allowed: `openssl x509 -noout -fingerprint -sha256 -in server.crt`)"
            )),
        }
    }
}

impl From<CertSha256> for String {
    fn from(p: CertSha256) -> String {
        p.to_string()
    }
}

/// Why the node refused a server's certificate (carried inside rustls's
/// error, read back by `explain`).
#[derive(Debug)]
pub struct Rejected {
    pub presented: CertSha256,
    /// The roots' verdict; `None` when a pin did not match.
    pub cause: Option<String>,
    /// The pin option's name, as the operator writes it.
    pub option: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            None => write!(
                f,
                "the server's certificate (SHA-256 {}) is not one pinned by {}",
                self.presented, self.option
            ),
            Some(cause) => write!(
                f,
                "{cause}; the server presented a certificate with SHA-256 {}: trust its issuer with tls.extra_upstream_roots, or, once you have checked that fingerprint on the server (`openssl x509 -noout -fingerprint -sha256 -in server.crt`), pin it with {}",
                self.presented, self.option
            ),
        }
    }
}

impl std::error::Error for Rejected {}

fn reject(r: Rejected) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(r))))
}

/// The node's reason, when a TLS handshake failed on a certificate this
/// module refused.
pub fn explain(e: &std::io::Error) -> Option<String> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(o))) = inner else {
        return None;
    };
    o.downcast_ref::<Rejected>().map(ToString::to_string)
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Accepts exactly the pinned certificates (any name, any issuer: the pin
/// is the server's identity); the handshake's signatures are still
/// checked against the pinned certificate's key.
#[derive(Debug)]
pub struct Pinned {
    pins: Vec<CertSha256>,
    option: String,
    algs: WebPkiSupportedAlgorithms,
}

impl Pinned {
    pub fn new(pins: Vec<CertSha256>, option: &str) -> Self {
        Self {
            pins,
            option: option.to_owned(),
            algs: algorithms(),
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = CertSha256::of(end_entity);
        if self.pins.contains(&presented) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(reject(Rejected {
                presented,
                cause: None,
                option: self.option.clone(),
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The roots' verification, unchanged, with a refusal that names the
/// presented certificate and the options that would accept it.
#[derive(Debug)]
pub struct Explained {
    inner: Arc<WebPkiServerVerifier>,
    option: String,
}

impl Explained {
    pub fn new(inner: Arc<WebPkiServerVerifier>, option: &str) -> Self {
        Self {
            inner,
            option: option.to_owned(),
        }
    }
}

impl ServerCertVerifier for Explained {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            .map_err(|e| {
                reject(Rejected {
                    presented: CertSha256::of(end_entity),
                    cause: Some(e.to_string()),
                    option: self.option.clone(),
                })
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_as_openssl_prints_them() {
        let colons = "AB:".repeat(31) + "CD";
        let p = CertSha256::try_from(colons.clone()).unwrap();
        assert_eq!(p.0[31], 0xcd);
        assert_eq!(p.to_string(), colons);
        let bare = "ab".repeat(31) + "cd";
        assert_eq!(CertSha256::try_from(bare.clone()).unwrap(), p);
        assert_eq!(CertSha256::try_from(format!("sha256:{bare}")).unwrap(), p);
        assert_eq!(
            CertSha256::try_from(format!("sha256 Fingerprint={colons}")).unwrap(),
            p
        );
        for bad in ["", "abcd", &"zz".repeat(32), &"ab".repeat(33)] {
            let e = CertSha256::try_from(bad.to_owned()).unwrap_err();
            assert!(e.contains("not a SHA-256 certificate fingerprint"), "{e}");
        }
    }
}
