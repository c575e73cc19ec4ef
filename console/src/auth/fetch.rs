//! The console's few outbound calls (OIDC discovery, JWKS, token,
//! webhooks): one HTTP/1.1 request per connection over hyper, TLS by
//! rustls against the host's trust store. Plain http only to loopback (a local identity
//! provider, or the tests' stand-in), so a code or a secret never crosses
//! a network in the clear. Bounded in time and size.
use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::http::{header, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::AuthError;

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BODY: usize = 1 << 20;

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Whether `host` (as in a URL, IPv6 in brackets or not) is loopback.
pub fn loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `url` if it is https, or http to loopback.
pub fn check_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if loopback(host) => Ok(uri),
        Some("http") => Err(format!("{url}: plain http is allowed to loopback only")),
        _ => Err(format!("{url}: not an http(s) URL")),
    }
}

fn tls() -> Result<Arc<rustls::ClientConfig>, String> {
    static CFG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CFG.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "system trust store entry unreadable");
        }
        for c in native.certs {
            let _ = roots.add(c);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    })
    .clone()
}

/// One request; `form` is sent as `application/x-www-form-urlencoded`,
/// `authorization` as the header of that name.
pub async fn call(
    method: Method,
    url: &str,
    form: Option<String>,
    authorization: Option<String>,
) -> Result<Reply, AuthError> {
    let mut out = Outgoing {
        method,
        content_type: form
            .is_some()
            .then_some("application/x-www-form-urlencoded"),
        body: form.unwrap_or_default().into_bytes(),
        headers: Vec::new(),
    };
    if let Some(a) = authorization {
        out.headers.push((header::AUTHORIZATION.as_str(), a));
    }
    send_to(url, out, TIMEOUT)
        .await
        .map_err(|why| AuthError::Provider(format!("{url}: {why}")))
}

/// A request to send with [`send_to`].
pub struct Outgoing {
    pub method: Method,
    pub content_type: Option<&'static str>,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

/// One request to `url` (checked by [`check_url`]) within `timeout`. The
/// error does not name the URL: a webhook's URL is itself a secret, the
/// caller says which one failed.
pub async fn send_to(url: &str, out: Outgoing, timeout: Duration) -> Result<Reply, String> {
    tokio::time::timeout(timeout, call_inner(url, out))
        .await
        .map_err(|_| format!("no answer in {timeout:?}"))?
}

async fn call_inner(url: &str, out: Outgoing) -> Result<Reply, String> {
    let uri = check_url(url).map_err(|_| "not https, nor http to loopback".to_string())?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().unwrap_or_default().to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_else(|| host.clone());
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());

    let mut req = Request::builder()
        .method(out.method)
        .uri(path)
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json")
        .header(header::USER_AGENT, "sluice-console");
    if let Some(ct) = out.content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    for (name, value) in out.headers {
        req = req.header(name, value);
    }
    let req = req
        .body(Full::new(hyper::body::Bytes::from(out.body)))
        .map_err(|e| e.to_string())?;

    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
        .await
        .map_err(|e| e.to_string())?;
    if https {
        let name = rustls::pki_types::ServerName::try_from(bare).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(tls()?)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(tls, req).await
    } else {
        send(tcp, req).await
    }
}

async fn send<S>(io: S, req: Request<Full<hyper::body::Bytes>>) -> Result<Reply, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes()
        .to_vec();
    Ok(Reply { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(check_url("https://idp.example/x").is_ok());
        assert!(check_url("http://127.0.0.1:5556/x").is_ok());
        assert!(check_url("http://[::1]:5556/x").is_ok());
        assert!(check_url("http://localhost/x").is_ok());
        assert!(check_url("http://idp.example/x").is_err());
        assert!(check_url("http://127.0.0.1.evil.example/x").is_err());
        assert!(check_url("ftp://idp.example/x").is_err());
    }
}
