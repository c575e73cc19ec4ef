//! TLS interception: the node's CA (`ca`), ClientHello reading (`hello`),
//! the downstream acceptor configuration and the always-verified upstream
//! connector.
pub mod ca;
pub mod hello;
pub mod pin;

use std::{path::PathBuf, sync::Arc};

use rustls::{
    client::WebPkiServerVerifier,
    pki_types::{pem::PemObject, CertificateDer, ServerName},
    server::{ClientHello as RustlsHello, ResolvesServerCert},
    sign::CertifiedKey,
    ClientConfig, RootCertStore, ServerConfig,
};
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};
use tracing::warn;

pub use ca::Ca;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error("upstream root file {path}: {message}")]
    Root { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("no usable upstream trust roots (system store empty and none configured)")]
    NoRoots,
    #[error("upstream certificate verifier: {0}")]
    Verifier(String),
}

/// What the proxy needs to intercept: the CA for leaves and the roots it
/// trusts upstream.
pub struct TlsContext {
    pub ca: Arc<Ca>,
    upstream: Arc<Upstream>,
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _: RustlsHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl TlsContext {
    /// Upstream roots: the host's system store plus `extra_roots` (PEM
    /// files), never our own CA (`Upstream::load`).
    pub fn new(ca: Arc<Ca>, extra_roots: &[PathBuf]) -> Result<Self, TlsError> {
        let upstream = Arc::new(Upstream::load(extra_roots, Some(ca.cert_der()))?);
        Ok(Self { ca, upstream })
    }

    /// The verifying side alone (what Postgres targets need).
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// Server side for one intercepted connection: a leaf for `sni`, and
    /// exactly the ALPN protocol the upstream agreed to.
    pub fn server_config(
        &self,
        sni: &str,
        alpn: Option<&[u8]>,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let leaf = self.ca.leaf(sni)?;
        let mut cfg = ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(FixedCert(leaf)));
        cfg.alpn_protocols = alpn.map(|p| vec![p.to_vec()]).unwrap_or_default();
        Ok(Arc::new(cfg))
    }

    /// A verified TLS connection to the real server, offering the ALPN
    /// protocols the client offered (those we can proxy).
    pub async fn connect_upstream(
        &self,
        tcp: TcpStream,
        sni: &str,
        alpn: &[Vec<u8>],
    ) -> std::io::Result<TlsStream<TcpStream>> {
        self.upstream.connect(tcp, sni, alpn).await
    }
}

/// The always-verified client side of TLS to real servers: the trust
/// roots, and pinned certificates where a target names them. Built for
/// every node with a target that verifies a server, intercepted or not
/// (a Postgres target verifies its server whatever `tls` says).
pub struct Upstream {
    roots: Arc<RootCertStore>,
    webpki: Arc<WebPkiServerVerifier>,
}

impl Upstream {
    /// The host's system store plus `extra_roots` (PEM files), without
    /// `exclude` (the node's own CA: once `ca install`ed it is in the
    /// system store, and trusting it upstream would let a forged upstream
    /// pass).
    pub fn load(
        extra_roots: &[PathBuf],
        exclude: Option<&CertificateDer<'_>>,
    ) -> Result<Self, TlsError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            warn!(error = %e, "system trust store entry unreadable");
        }
        for c in native.certs {
            if exclude.is_none_or(|x| c.as_ref() != x.as_ref()) {
                let _ = roots.add(c);
            }
        }
        for path in extra_roots {
            let pem = std::fs::read_to_string(path).map_err(|e| TlsError::Root {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let certs = pem_certs(&pem);
            if certs.is_empty() {
                return Err(TlsError::Root {
                    path: path.clone(),
                    message: "no PEM certificate in file".into(),
                });
            }
            for c in certs {
                roots.add(c).map_err(|e| TlsError::Root {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
        }
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
        let roots = Arc::new(roots);
        let webpki = WebPkiServerVerifier::builder(roots.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        Ok(Self { roots, webpki })
    }

    /// A TLS connection verified against the roots.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        sni: &str,
        alpn: &[Vec<u8>],
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let mut cfg = ClientConfig::builder()
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.to_vec();
        Self::handshake(cfg, tcp, sni).await
    }

    /// A TLS connection to a server verified by its certificate's SHA-256
    /// when `pins` are given (`pin::Pinned`), else against the roots with
    /// a failure that says what the server presented and which options
    /// would accept it (`option`: the pin option's name, for the message).
    pub async fn connect_checked(
        &self,
        tcp: TcpStream,
        sni: &str,
        alpn: &[Vec<u8>],
        pins: &[pin::CertSha256],
        option: &str,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = if pins.is_empty() {
            Arc::new(pin::Explained::new(self.webpki.clone(), option))
        } else {
            Arc::new(pin::Pinned::new(pins.to_vec(), option))
        };
        let mut cfg = ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.to_vec();
        Self::handshake(cfg, tcp, sni).await
    }

    async fn handshake(
        cfg: ClientConfig,
        tcp: TcpStream,
        sni: &str,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(sni.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await
    }
}

/// The ALPN protocols Sluice can proxy, in the client's order.
pub fn proxyable_alpn(offered: &[Vec<u8>]) -> Vec<Vec<u8>> {
    offered
        .iter()
        .filter(|p| p.as_slice() == b"h2" || p.as_slice() == b"http/1.1")
        .cloned()
        .collect()
}

pub fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}
