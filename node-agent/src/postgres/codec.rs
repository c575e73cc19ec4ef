//! The Postgres wire format (protocol 3): message framing in both
//! directions, the startup packets, and the few messages the node writes
//! itself. Every length read from the network is checked before use.
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::PgError;

/// SSLRequest, GSSENCRequest and CancelRequest codes (in the version field).
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// Startup packets are small; anything bigger is not a client.
const MAX_STARTUP: usize = 10_000;

/// One tagged message; `body` excludes the tag and the length.
#[derive(Clone, Debug)]
pub struct Message {
    pub tag: u8,
    pub body: Bytes,
}

impl Message {
    pub fn new(tag: u8, body: impl Into<Bytes>) -> Self {
        Self {
            tag,
            body: body.into(),
        }
    }

    /// The message as it goes on the wire.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(5 + self.body.len());
        out.put_u8(self.tag);
        out.put_u32(self.body.len() as u32 + 4);
        out.put_slice(&self.body);
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

/// What a pump has to send, batched: messages that arrived together go
/// out in one write (one TLS record, one system call), as the server and
/// libpq batch them.
pub struct Outbox(BytesMut);

/// A batch is sent at this size even if more messages are waiting.
const MAX_BATCH: usize = 64 * 1024;

impl Outbox {
    pub fn with_capacity(n: usize) -> Self {
        Self(BytesMut::with_capacity(n))
    }

    /// Sends the batch unless the reader already holds the next message
    /// (`more`: it would join the batch) and the batch is still small.
    pub async fn send_unless_more<W: AsyncWrite + Unpin>(
        &mut self,
        more: bool,
        to: &mut W,
    ) -> Result<(), PgError> {
        if more && self.0.len() <= MAX_BATCH {
            return Ok(());
        }
        self.send(to).await
    }

    /// Sends whatever is batched.
    pub async fn send<W: AsyncWrite + Unpin>(&mut self, to: &mut W) -> Result<(), PgError> {
        if !self.0.is_empty() {
            to.write_all(&self.0).await.map_err(PgError::Io)?;
            self.0.clear();
        }
        to.flush().await.map_err(PgError::Io)
    }
}

impl std::ops::Deref for Outbox {
    type Target = BytesMut;
    fn deref(&self) -> &BytesMut {
        &self.0
    }
}

impl std::ops::DerefMut for Outbox {
    fn deref_mut(&mut self) -> &mut BytesMut {
        &mut self.0
    }
}

/// A buffered reader of tagged messages.
pub struct Reader<R> {
    inner: R,
    buf: BytesMut,
    max: usize,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        Self::with_buffer(inner, BytesMut::with_capacity(8192), max)
    }

    /// A reader that first yields bytes already read from the stream.
    pub fn with_buffer(inner: R, buf: BytesMut, max: usize) -> Self {
        Self { inner, buf, max }
    }

    async fn fill(&mut self, n: usize) -> Result<bool, PgError> {
        while self.buf.len() < n {
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(8192.max(n - self.buf.len()));
            }
            if self
                .inner
                .read_buf(&mut self.buf)
                .await
                .map_err(PgError::Io)?
                == 0
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The next message, or `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Message>, PgError> {
        if !self.fill(5).await? {
            if self.buf.is_empty() {
                return Ok(None);
            }
            return Err(PgError::Protocol("stream ended inside a message".into()));
        }
        let tag = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len < 4 {
            return Err(PgError::Protocol(format!(
                "message `{}` has length {len} (< 4)",
                tag.escape_ascii()
            )));
        }
        if len > self.max {
            return Err(PgError::Protocol(format!(
                "message `{}` of {len} bytes exceeds the node's limit of {} bytes",
                tag.escape_ascii(),
                self.max
            )));
        }
        if !self.fill(1 + len).await? {
            return Err(PgError::Protocol("stream ended inside a message".into()));
        }
        self.buf.advance(5);
        let body = self.buf.split_to(len - 4).freeze();
        Ok(Some(Message { tag, body }))
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Whether a whole message is already buffered (the next `next` will
    /// not wait): writers batch until it is not.
    pub fn has_message(&self) -> bool {
        self.buf.len() >= 5
            && self.buf.len()
                > u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize
    }

    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }
}

/// The first packet of a connection (untagged).
#[derive(Debug)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel {
        packet: Bytes,
    },
    /// StartupMessage: the protocol version and its parameters in order.
    Params {
        version: u32,
        params: Vec<(String, String)>,
    },
}

impl Startup {
    #[cfg(test)]
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Startup::Params { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Reads one startup packet.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<Startup, PgError> {
    let len = r.read_u32().await.map_err(PgError::Io)? as usize;
    if !(8..=MAX_STARTUP).contains(&len) {
        return Err(PgError::Protocol(format!(
            "startup packet length {len} is not a Postgres client's"
        )));
    }
    let mut body = vec![0u8; len - 4];
    r.read_exact(&mut body).await.map_err(PgError::Io)?;
    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    match code {
        SSL_REQUEST => Ok(Startup::Ssl),
        GSSENC_REQUEST => Ok(Startup::GssEnc),
        CANCEL_REQUEST => {
            let mut packet = BytesMut::with_capacity(len);
            packet.put_u32(len as u32);
            packet.put_slice(&body);
            Ok(Startup::Cancel {
                packet: packet.freeze(),
            })
        }
        v if v >> 16 == 3 => {
            let mut params = Vec::new();
            let mut rest = &body[4..];
            loop {
                let key = cstr(&mut rest)?;
                if key.is_empty() {
                    break;
                }
                let value = cstr(&mut rest)?;
                params.push((key, value));
            }
            Ok(Startup::Params { version: v, params })
        }
        v => Err(PgError::Protocol(format!(
            "unsupported protocol version {}.{}",
            v >> 16,
            v & 0xffff
        ))),
    }
}

/// A StartupMessage with these parameters.
pub fn startup_message(version: u32, params: &[(String, String)]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u32(version);
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = BytesMut::with_capacity(body.len() + 4);
    out.put_u32(body.len() as u32 + 4);
    out.put_slice(&body);
    out.freeze()
}

pub fn ssl_request() -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&8u32.to_be_bytes());
    b[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    b
}

/// Takes a NUL-terminated string off the front of `data`.
pub fn cstr(data: &mut &[u8]) -> Result<String, PgError> {
    let end = data
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| PgError::Protocol("string without its terminating NUL".into()))?;
    let s = String::from_utf8_lossy(&data[..end]).into_owned();
    *data = &data[end + 1..];
    Ok(s)
}

/// A NUL-terminated string that must be UTF-8 to be read as the server
/// reads it: `(text, true)` if it is, the lossy text and `false` if not.
pub fn cstr_exact(data: &mut &[u8]) -> Result<(String, bool), PgError> {
    let end = data
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| PgError::Protocol("string without its terminating NUL".into()))?;
    let out = match std::str::from_utf8(&data[..end]) {
        Ok(s) => (s.to_owned(), true),
        Err(_) => (String::from_utf8_lossy(&data[..end]).into_owned(), false),
    };
    *data = &data[end + 1..];
    Ok(out)
}

/// Big-endian integers off the front of `data`, checked.
pub fn take_i16(data: &mut &[u8]) -> Result<i16, PgError> {
    if data.len() < 2 {
        return Err(PgError::Protocol("message too short".into()));
    }
    let v = i16::from_be_bytes([data[0], data[1]]);
    *data = &data[2..];
    Ok(v)
}

pub fn take_i32(data: &mut &[u8]) -> Result<i32, PgError> {
    if data.len() < 4 {
        return Err(PgError::Protocol("message too short".into()));
    }
    let v = i32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    *data = &data[4..];
    Ok(v)
}

pub fn take_bytes<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], PgError> {
    if data.len() < n {
        return Err(PgError::Protocol("message too short".into()));
    }
    let (head, tail) = data.split_at(n);
    *data = tail;
    Ok(head)
}

/// ErrorResponse: severity, SQLSTATE and message (and a hint, if any).
pub fn error_response(
    severity: &str,
    sqlstate: &str,
    message: &str,
    hint: Option<&str>,
) -> Message {
    let mut b = BytesMut::new();
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        b.put_u8(field);
        b.put_slice(value.replace('\0', " ").as_bytes());
        b.put_u8(0);
    }
    if let Some(h) = hint {
        b.put_u8(b'H');
        b.put_slice(h.replace('\0', " ").as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    Message::new(b'E', b.freeze())
}

pub fn auth_ok() -> Message {
    Message::new(b'R', Bytes::from_static(&[0, 0, 0, 0]))
}

/// The fields of an ErrorResponse / NoticeResponse, by code.
pub fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        rest = tail;
        match cstr(&mut rest) {
            Ok(v) => out.push((code, v)),
            Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_split_anywhere_and_bad_lengths_are_errors() {
        let mut wire = BytesMut::new();
        Message::new(b'Q', &b"select 1\0"[..]).encode(&mut wire);
        Message::new(b'X', Bytes::new()).encode(&mut wire);
        let (a, mut b) = tokio::io::duplex(3);
        let data = wire.freeze();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for c in data.chunks(2) {
                b.write_all(c).await.unwrap();
            }
        });
        let mut r = Reader::new(a, 1 << 20);
        let m = r.next().await.unwrap().unwrap();
        assert_eq!((m.tag, &m.body[..]), (b'Q', &b"select 1\0"[..]));
        assert_eq!(r.next().await.unwrap().unwrap().tag, b'X');
        assert!(r.next().await.unwrap().is_none());

        let bad: &[u8] = &[b'Q', 0, 0, 0, 2];
        let e = Reader::new(bad, 1 << 20).next().await.unwrap_err();
        assert!(e.to_string().contains("length 2"), "{e}");
        let huge: &[u8] = &[b'Q', 0x7f, 0, 0, 0];
        let e = Reader::new(huge, 1 << 20).next().await.unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
    }

    #[tokio::test]
    async fn startup_packets() {
        let msg = startup_message(
            196_608,
            &[
                ("user".into(), "app".into()),
                ("database".into(), "orders".into()),
            ],
        );
        let s = read_startup(&mut &msg[..]).await.unwrap();
        assert_eq!(s.param("database"), Some("orders"));
        let ssl = ssl_request();
        assert!(matches!(
            read_startup(&mut &ssl[..]).await.unwrap(),
            Startup::Ssl
        ));
        let bogus: &[u8] = &[0, 0, 0, 8, 0, 9, 0, 0];
        assert!(read_startup(&mut &bogus[..]).await.is_err());
        let short: &[u8] = &[0, 0, 0, 3];
        assert!(read_startup(&mut &short[..]).await.is_err());
    }
}
