//! The CLI's client of a console's JSON API (`sluice --console URL …`):
//! approvals and suspensions decided where the fleet's decisions are
//! signed, from any machine, with no root on a runner host. Credentials:
//! an API token (`--console-token-file`, sent as a bearer token); without
//! one, the console's local mode (loopback only), whose CSRF token is read
//! from `/api/whoami` first.
use std::{path::Path, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleCliError {
    #[error("console URL {0}: expected http://host[:port] or https://host[:port]")]
    Url(String),
    #[error("console {0}: {1}")]
    Connect(String, String),
    #[error("console answered {status}: {message}")]
    Refused { status: StatusCode, message: String },
    #[error("token file {0}: {1}")]
    Token(String, String),
}

pub struct ConsoleClient {
    tls: bool,
    host: String,
    port: u16,
    token: Option<String>,
    csrf: Option<String>,
}

impl ConsoleClient {
    pub fn new(url: &str, token_file: Option<&Path>) -> Result<Self, ConsoleCliError> {
        let bad = || ConsoleCliError::Url(url.to_owned());
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad());
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(bad());
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                (h.to_owned(), p.parse::<u16>().map_err(|_| bad())?)
            }
            _ => (authority.to_owned(), if tls { 443 } else { 80 }),
        };
        let token = token_file
            .map(|p| {
                std::fs::read_to_string(p)
                    .map(|t| t.trim().to_owned())
                    .map_err(|e| ConsoleCliError::Token(p.display().to_string(), e.to_string()))
            })
            .transpose()?;
        Ok(Self {
            tls,
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            token,
            csrf: None,
        })
    }

    pub async fn get(&mut self, path: &str) -> Result<Value, ConsoleCliError> {
        self.call(Method::GET, path, None).await
    }

    /// A state change: with no token, the local mode's CSRF token first.
    pub async fn post(&mut self, path: &str, body: Value) -> Result<Value, ConsoleCliError> {
        if self.token.is_none() && self.csrf.is_none() {
            let who = self.get("/api/whoami").await?;
            self.csrf = who["csrf"].as_str().map(str::to_owned);
        }
        self.call(Method::POST, path, Some(body)).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ConsoleCliError> {
        let at = format!("{}:{}", self.host, self.port);
        let conn = |e: &dyn std::fmt::Display| ConsoleCliError::Connect(at.clone(), e.to_string());
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| conn(&e))?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &at)
            .header(header::ACCEPT, "application/json");
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(c) = &self.csrf {
            req = req.header("x-csrf-token", c);
        }
        let payload = match body {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(&b).unwrap_or_default())
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(payload)).map_err(|e| conn(&e))?;
        let resp = if self.tls {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
            let cfg = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = ServerName::try_from(self.host.clone()).map_err(|e| conn(&e))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .map_err(|e| conn(&e))?;
            send(TokioIo::new(tls), req).await
        } else {
            send(TokioIo::new(tcp), req).await
        }
        .map_err(|e| conn(&e))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| conn(&e))?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).trim().to_owned()));
        if !status.is_success() {
            let message = v["error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string());
            return Err(ConsoleCliError::Refused { status, message });
        }
        Ok(v)
    }
}

async fn send<I>(
    io: I,
    req: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    sender.send_request(req).await
}
