//! Reading a TLS ClientHello off a redirected connection without losing
//! it: the bytes are kept and replayed (`Rewind`) either into our own TLS
//! acceptor (intercept) or to the upstream (splice).
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use tls_parser::{
    parse_tls_extensions, parse_tls_plaintext, TlsExtension, TlsMessage, TlsMessageHandshake,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Largest ClientHello we accept (post-quantum key shares make them big).
const MAX_HELLO: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("client closed before sending a complete TLS ClientHello")]
    Eof,
    #[error("not a TLS ClientHello: {0}")]
    NotTls(String),
    #[error("ClientHello larger than {MAX_HELLO} bytes")]
    TooLarge,
    #[error("reading ClientHello: {0}")]
    Io(#[from] io::Error),
}

/// TLS extension number of Encrypted Client Hello (draft-ietf-tls-esni).
const EXT_ECH: u16 = 0xfe0d;

#[derive(Clone, Debug, Default)]
pub struct ClientHello {
    /// The server_name as the client sent it (not normalised: see
    /// `crate::names::DnsName`). Invalid UTF-8 is replaced, so it can
    /// never match a target name.
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
    /// An `encrypted_client_hello` (or legacy ESNI) extension is present:
    /// the SNI above is only the outer, public name.
    pub ech: bool,
}

/// Reads until one complete ClientHello record is buffered.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(ClientHello, Vec<u8>), HelloError> {
    let mut buf = Vec::with_capacity(2048);
    loop {
        match parse(&buf) {
            Ok(Some(h)) => return Ok((h, buf)),
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        if buf.len() >= MAX_HELLO {
            return Err(HelloError::TooLarge);
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HelloError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `Ok(None)`: need more bytes.
fn parse(buf: &[u8]) -> Result<Option<ClientHello>, HelloError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != 0x16 {
        return Err(HelloError::NotTls(format!(
            "first byte 0x{:02x} is not a TLS handshake record",
            buf[0]
        )));
    }
    let (_, record) = match parse_tls_plaintext(buf) {
        Ok(r) => r,
        Err(tls_parser::nom::Err::Incomplete(_)) => return Ok(None),
        Err(e) => return Err(HelloError::NotTls(format!("malformed record: {e:?}"))),
    };
    let Some(TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch))) = record.msg.first()
    else {
        return Err(HelloError::NotTls(
            "first handshake message is not a ClientHello".into(),
        ));
    };
    let mut hello = ClientHello::default();
    if let Some(ext) = ch.ext {
        let (_, exts) = parse_tls_extensions(ext)
            .map_err(|e| HelloError::NotTls(format!("malformed extensions: {e:?}")))?;
        let mut seen_sni = false;
        for e in exts {
            match e {
                TlsExtension::SNI(names) => {
                    // Two server_name extensions, or two host names in
                    // one: servers disagree on which counts, so refuse.
                    let mut hosts = names.into_iter().filter(|(t, _)| t.0 == 0);
                    let first = hosts.next();
                    if seen_sni || hosts.next().is_some() {
                        return Err(HelloError::NotTls(
                            "more than one server name in the ClientHello".into(),
                        ));
                    }
                    seen_sni = true;
                    hello.sni = first.map(|(_, name)| String::from_utf8_lossy(name).into_owned());
                }
                TlsExtension::EncryptedServerName { .. } => hello.ech = true,
                TlsExtension::Unknown(t, _) if t.0 == EXT_ECH => hello.ech = true,
                TlsExtension::ALPN(protos) => {
                    hello.alpn = protos.into_iter().map(<[u8]>::to_vec).collect();
                }
                _ => {}
            }
        }
    }
    Ok(Some(hello))
}

/// A stream that first yields `prefix`, then reads from `inner`.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix: Bytes::from(prefix),
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // An emptied `Bytes` still holds the whole buffer; the
                // connection may live for hours.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello, produced by rustls itself.
    fn hello_bytes(sni: &str) -> Vec<u8> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let roots = rustls::RootCertStore::empty();
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn reads_sni_and_alpn_even_when_split() {
        let bytes = hello_bytes("api.example.test");
        // Deliver one byte at a time: the reader must keep going.
        let (mut a, mut b) = tokio::io::duplex(1);
        let send = bytes.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for x in send {
                let _ = b.write_all(&[x]).await;
            }
        });
        let (h, buf) = read_client_hello(&mut a).await.unwrap();
        assert_eq!(h.sni.as_deref(), Some("api.example.test"));
        assert!(!h.ech);
        assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(buf, bytes, "nothing consumed is lost");
    }

    /// Appends one extension to a ClientHello record (extensions come
    /// last), fixing the three enclosing lengths.
    fn with_extension(mut rec: Vec<u8>, ty: u16, data: &[u8]) -> Vec<u8> {
        let mut ext = ty.to_be_bytes().to_vec();
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(data);
        let n = ext.len();
        let bump16 = |b: &mut [u8], at: usize| {
            let v = u16::from_be_bytes([b[at], b[at + 1]]) as usize + n;
            b[at..at + 2].copy_from_slice(&(v as u16).to_be_bytes());
        };
        bump16(&mut rec, 3);
        let hs = u32::from_be_bytes([0, rec[6], rec[7], rec[8]]) as usize + n;
        rec[6..9].copy_from_slice(&(hs as u32).to_be_bytes()[1..]);
        // Walk to the extensions length: version, random, session id,
        // cipher suites, compression methods.
        let mut at = 9 + 2 + 32;
        at += 1 + rec[at] as usize;
        at += 2 + u16::from_be_bytes([rec[at], rec[at + 1]]) as usize;
        at += 1 + rec[at] as usize;
        bump16(&mut rec, at);
        rec.extend_from_slice(&ext);
        rec
    }

    #[tokio::test]
    async fn ech_no_sni_and_duplicate_names_are_seen() {
        let plain = hello_bytes("api.example.test");
        let (h, _) = read_client_hello(&mut plain.as_slice()).await.unwrap();
        assert!(!h.ech);

        let ech = with_extension(plain.clone(), EXT_ECH, &[0, 1, 2, 3]);
        let (h, buf) = read_client_hello(&mut ech.as_slice()).await.unwrap();
        assert!(h.ech, "encrypted_client_hello seen");
        assert_eq!(buf, ech);

        // rustls sends no SNI for an IP address.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("10.1.2.3").unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        let (h, _) = read_client_hello(&mut out.as_slice()).await.unwrap();
        assert_eq!(h.sni, None);

        // A second server_name extension: refused.
        let name = b"other.example.test";
        let mut sni = ((name.len() + 3) as u16).to_be_bytes().to_vec();
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let dup = with_extension(plain, 0, &sni);
        let e = read_client_hello(&mut dup.as_slice()).await.unwrap_err();
        assert!(e.to_string().contains("more than one server name"), "{e}");
    }

    #[tokio::test]
    async fn garbage_is_refused_clearly() {
        let mut input: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        let e = read_client_hello(&mut input).await.unwrap_err();
        assert!(e.to_string().contains("not a TLS"), "{e}");
        let mut truncated: &[u8] = &[0x16, 0x03, 0x01, 0x00];
        assert!(matches!(
            read_client_hello(&mut truncated).await,
            Err(HelloError::Eof)
        ));
        let mut bad: &[u8] = &[0x16, 0x03, 0x01, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(read_client_hello(&mut bad).await.is_err());
    }
}
