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

#[derive(Clone, Debug, Default)]
pub struct ClientHello {
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
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
        for e in exts {
            match e {
                TlsExtension::SNI(names) => {
                    if let Some((_, name)) = names.into_iter().find(|(t, _)| t.0 == 0) {
                        hello.sni = std::str::from_utf8(name)
                            .ok()
                            .map(|s| s.to_ascii_lowercase());
                    }
                }
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
        assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(buf, bytes, "nothing consumed is lost");
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
