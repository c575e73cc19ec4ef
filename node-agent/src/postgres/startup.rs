//! Opening a Postgres connection on both sides: the client's startup
//! packets (SSLRequest → `S` and TLS with a leaf from the node CA, or `N`;
//! PG17 direct TLS with ALPN `postgresql`; GSSENCRequest → `N`;
//! CancelRequest), and the server side (SSLRequest and a verified TLS
//! handshake, or plaintext when the target says so).
use bytes::BytesMut;
use sha2::{Digest, Sha256, Sha384, Sha512};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsAcceptor;

use super::{
    codec::{self, Startup},
    Endpoint, Io, PgError,
};
use crate::{config::UpstreamTls, record::TlsInfo, tls::hello};

/// ALPN protocol of Postgres over TLS (PG17 direct negotiation).
pub const ALPN: &[u8] = b"postgresql";
const HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// What the client opened the connection for.
pub enum Opening {
    Session {
        client: Box<dyn Io>,
        version: u32,
        params: Vec<(String, String)>,
        tls: Option<TlsInfo>,
        /// The client's normalised SNI, when it is one of the target's names.
        sni: Option<String>,
    },
    Cancel {
        packet: bytes::Bytes,
    },
}

/// Reads the client's startup packets, negotiating TLS on the way.
pub async fn accept_client<C: Io + 'static>(
    mut client: C,
    ep: &Endpoint,
) -> Result<Opening, PgError> {
    let mut first = [0u8; 1];
    client.read_exact(&mut first).await.map_err(PgError::Io)?;
    if first[0] == 0x16 {
        // PG17 `sslnegotiation=direct`: a TLS ClientHello straight away.
        let (stream, tls, sni) = terminate(hello::Rewind::new(first.to_vec(), client), ep).await?;
        return read_params(stream, Some(tls), sni).await;
    }
    let mut client: Box<dyn Io> = Box::new(hello::Rewind::new(first.to_vec(), client));
    let mut tls = None;
    let mut sni = None;
    loop {
        match codec::read_startup(&mut client).await? {
            Startup::Ssl if tls.is_some() => {
                return Err(PgError::Protocol("SSLRequest inside TLS".into()))
            }
            Startup::Ssl => {
                if ep.client_tls.is_none() {
                    // No interception configured: the client may go on in
                    // plaintext (sslmode=prefer) or give up (require).
                    client.write_all(b"N").await.map_err(PgError::Io)?;
                    continue;
                }
                client.write_all(b"S").await.map_err(PgError::Io)?;
                let (s, t, n) = terminate(client, ep).await?;
                client = s;
                tls = Some(t);
                sni = n;
            }
            // Kerberos encryption cannot be intercepted: decline it; libpq
            // then tries TLS or plaintext as its settings allow.
            Startup::GssEnc => client.write_all(b"N").await.map_err(PgError::Io)?,
            Startup::Cancel { packet } => return Ok(Opening::Cancel { packet }),
            Startup::Params { version, params } => {
                return Ok(Opening::Session {
                    client,
                    version,
                    params,
                    tls,
                    sni,
                })
            }
        }
    }
}

async fn read_params(
    mut client: Box<dyn Io>,
    tls: Option<TlsInfo>,
    sni: Option<String>,
) -> Result<Opening, PgError> {
    match codec::read_startup(&mut client).await? {
        Startup::Params { version, params } => Ok(Opening::Session {
            client,
            version,
            params,
            tls,
            sni,
        }),
        Startup::Cancel { packet } => Ok(Opening::Cancel { packet }),
        _ => Err(PgError::Protocol(
            "TLS or GSS request inside direct TLS".into(),
        )),
    }
}

/// The client's TLS, terminated with a leaf for the target's name: the
/// SNI when it is one of the target's names, else the target's first.
async fn terminate<S: Io + 'static>(
    mut stream: S,
    ep: &Endpoint,
) -> Result<(Box<dyn Io>, TlsInfo, Option<String>), PgError> {
    let tls = ep.client_tls.clone().ok_or_else(|| {
        PgError::Refused(crate::record::Refusal::Tls, "TLS from the client, but this target is not intercepted (tls: intercept) or the node has no CA".into())
    })?;
    let (hello, prefix) = tokio::time::timeout(HANDSHAKE, hello::read_client_hello(&mut stream))
        .await
        .map_err(|_| PgError::Protocol("no TLS ClientHello within 10s".into()))?
        .map_err(|e| PgError::Protocol(format!("TLS ClientHello: {e}")))?;
    let names = ep.names();
    let sni = hello
        .sni
        .as_deref()
        .and_then(|s| crate::names::DnsName::parse(s).ok())
        .map(|n| n.as_str().to_owned())
        .filter(|n| names.iter().any(|t| t == n));
    let name = sni
        .clone()
        .or_else(|| names.first().cloned())
        .ok_or_else(|| {
            PgError::Refused(
                crate::record::Refusal::Tls,
                "the target has no name to present a certificate for (set `hosts` or `sni`)".into(),
            )
        })?;
    let cfg = tls
        .server_config(&name, Some(ALPN))
        .map_err(|e| PgError::Refused(crate::record::Refusal::Tls, e.to_string()))?;
    let accept = TlsAcceptor::from(cfg).accept(hello::Rewind::new(prefix, stream));
    let down = tokio::time::timeout(HANDSHAKE, accept)
        .await
        .map_err(|_| PgError::Protocol("client TLS handshake timed out".into()))?
        .map_err(|e| PgError::ClientTls(e.to_string()))?;
    let alpn = down
        .get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let info = TlsInfo {
        sni: hello.sni.clone(),
        mode: "intercepted".into(),
        alpn,
    };
    Ok((Box::new(down), info, sni))
}

/// The server side: TLS (verified for `name`) unless the target disables
/// it. Returns the stream and, with TLS, the server certificate's
/// `tls-server-end-point` hash (SCRAM channel binding, RFC 5929).
pub async fn connect_server(
    mut tcp: TcpStream,
    ep: &Endpoint,
    name: &str,
) -> Result<(Box<dyn Io>, Option<Vec<u8>>), PgError> {
    let pg = ep.target.as_ref().map(|t| &t.postgres);
    if pg.is_some_and(|p| p.upstream_tls == UpstreamTls::Disable) {
        return Ok((Box::new(tcp), None));
    }
    let pins = pg.map(|p| &p.server_cert_sha256[..]).unwrap_or_default();
    let tls = ep.upstream_tls.clone().ok_or_else(|| {
        PgError::Upstream(
            "TLS to the server needs trust roots and the node has none (system store empty, no tls.extra_upstream_roots)".into(),
        )
    })?;
    tcp.write_all(&codec::ssl_request())
        .await
        .map_err(PgError::Io)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(PgError::Io)?;
    if answer[0] != b'S' {
        return Err(PgError::Upstream(format!(
            "the server refused TLS (answered `{}` to SSLRequest); this target requires it (postgres.upstream_tls: verify; `disable` allows plaintext)",
            answer[0].escape_ascii()
        )));
    }
    let option = format!(
        "postgres.server_cert_sha256 of target `{}`",
        ep.target.as_ref().map_or("?", |t| t.name.as_str())
    );
    let up = tls
        .connect_checked(tcp, name, &[ALPN.to_vec()], pins, &option)
        .await
        .map_err(|e| {
            let why = crate::tls::pin::explain(&e).unwrap_or_else(|| e.to_string());
            PgError::Upstream(format!("TLS with the server as `{name}`: {why}"))
        })?;
    let binding = up
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| end_point_hash(c.as_ref()));
    Ok((Box::new(up), binding))
}

/// RFC 5929 `tls-server-end-point`: the certificate's hash with its
/// signature's hash algorithm (SHA-256 for MD5/SHA-1 and unknown ones).
fn end_point_hash(der: &[u8]) -> Vec<u8> {
    let alg = x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.signature_algorithm.algorithm.to_id_string())
        .unwrap_or_default();
    match alg.as_str() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Sha384::digest(der).to_vec(),
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Sha512::digest(der).to_vec(),
        _ => Sha256::digest(der).to_vec(),
    }
}

/// Forwards a CancelRequest to the server the way its sessions go (TLS
/// first when configured; the server closes the connection after it).
pub async fn forward_cancel(
    tcp: TcpStream,
    ep: &Endpoint,
    name: &str,
    packet: &[u8],
) -> Result<(), PgError> {
    let (mut server, _) = connect_server(tcp, ep, name).await?;
    server.write_all(packet).await.map_err(PgError::Io)?;
    server.flush().await.map_err(PgError::Io)?;
    let mut sink = BytesMut::new();
    let _ = tokio::time::timeout(HANDSHAKE, server.read_buf(&mut sink)).await;
    Ok(())
}
