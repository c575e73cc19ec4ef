//! WebSocket on targets with rules: frames are read, never relayed blind.
//!
//! * server → client: text and binary payloads pass through the streaming
//!   masker as one text (a secret split across frames is still caught);
//!   masks are written in place, so frame lengths never change;
//! * client → server: each message goes through the session's verdict
//!   stages (`verdict.rs`) once it is complete: suspension, then the
//!   request rules; a denied message closes both sides with 1008 (policy
//!   violation) and is never forwarded. Without request rules, frames go
//!   on as they come, each after the suspension check: a suspension made
//!   while the socket is open ends it.
//!
//! The node removes `Sec-WebSocket-Extensions` from the upgrade request, so
//! no compression is negotiated and payloads are plain text; a compressed
//! (RSV1) frame anyway is a protocol error that ends the connection.
use std::sync::Arc;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::Mutex,
};

use super::body::IDLE_FLUSH;
use crate::{
    policy::{CompiledPolicy, Decision},
    scan::{json, ws::parse_header, ScanError, StreamMasker},
    session::Session,
    verdict::{Denial, Judged},
};

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("WebSocket frame: {0}")]
    Protocol(&'static str),
    #[error("WebSocket message larger than {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error("WebSocket I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub use crate::config::WebSocketMode;

/// A close frame (1008: policy violation) as a server sends it (unmasked)
/// or a client must (masked; the zero key is valid and keeps it readable).
fn close_frame(reason: &str, from_client: bool) -> Vec<u8> {
    let mut payload = 1008u16.to_be_bytes().to_vec();
    payload.extend(reason.bytes().take(120));
    let mut f = vec![0x88];
    if from_client {
        f.push(0x80 | payload.len() as u8);
        f.extend_from_slice(&[0, 0, 0, 0]);
    } else {
        f.push(payload.len() as u8);
    }
    f.extend(payload);
    f
}

/// What one inspected WebSocket did, for the record.
#[derive(Default)]
pub struct WsReport {
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub decisions: Vec<Decision>,
    pub masked: std::collections::BTreeMap<(usize, String), u64>,
    pub error: Option<String>,
}

pub struct Judge {
    /// The policy at the upgrade (the masker's too).
    pub policy: Arc<CompiledPolicy>,
    pub session: Arc<Session>,
    pub request_rules: bool,
    pub max_message: usize,
}

/// Relays an upgraded WebSocket with inspection until either side ends.
pub async fn relay<C, U>(client: C, upstream: U, masker: StreamMasker, judge: Judge) -> WsReport
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut cr, cw) = tokio::io::split(client);
    let (mut ur, uw) = tokio::io::split(upstream);
    let cw = Arc::new(Mutex::new(cw));
    let uw = Arc::new(Mutex::new(uw));
    let report = Arc::new(std::sync::Mutex::new(WsReport::default()));

    let down = {
        let (cw, uw, report) = (cw.clone(), uw.clone(), report.clone());
        async move {
            let mut masker = masker;
            let mut buf = vec![0u8; 16 * 1024];
            let res: Result<(), WsError> = async {
                loop {
                    // While text is held back (a live tail that more deltas
                    // could complete), a quiet upstream releases it after
                    // the idle delay, as for HTTP streams: the server may
                    // wait for the client, who waits for that text.
                    let read = if masker.holds() {
                        tokio::time::timeout(IDLE_FLUSH, ur.read(&mut buf)).await
                    } else {
                        Ok(ur.read(&mut buf).await)
                    };
                    let Ok(read) = read else {
                        let out = masker.flush_idle()?;
                        if !out.is_empty() {
                            let mut w = cw.lock().await;
                            w.write_all(&out).await?;
                            w.flush().await?;
                        }
                        continue;
                    };
                    let n = read?;
                    let out = if n == 0 {
                        masker.finish()?
                    } else {
                        masker.push(&buf[..n])?
                    };
                    if !out.is_empty() {
                        let mut w = cw.lock().await;
                        w.write_all(&out).await?;
                        w.flush().await?;
                    }
                    if let Ok(mut r) = report.lock() {
                        r.down_bytes += n as u64;
                        r.masked = masker.masked.clone();
                    }
                    if n == 0 {
                        return Ok(());
                    }
                }
            }
            .await;
            if let Ok(mut r) = report.lock() {
                r.masked = masker.masked.clone();
                if let Err(e) = &res {
                    r.error.get_or_insert_with(|| e.to_string());
                }
            }
            // Either way the client's side ends here; on an error the
            // upstream is cut too (fail closed, visibly).
            let _ = cw.lock().await.shutdown().await;
            if res.is_err() {
                let _ = uw.lock().await.shutdown().await;
            }
        }
    };

    let up = {
        let (cw, uw, report) = (cw.clone(), uw.clone(), report.clone());
        async move {
            let res = client_to_server(&mut cr, &uw, &cw, &judge, &report).await;
            if let Err(e) = &res {
                if let Ok(mut r) = report.lock() {
                    r.error.get_or_insert_with(|| e.to_string());
                }
            }
            let _ = uw.lock().await.shutdown().await;
        }
    };
    tokio::join!(down, up);
    let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *r)
}

/// What request rules judge of a client's message: the message, and for
/// a JSON message its decoded string values (what the upstream's JSON
/// parser reads: `production\u0020password` is `production password`),
/// each on its own line, then the generated-text fields (`text`,
/// `content`, ...) joined as a model reads consecutive content parts.
pub fn judged_text(message: &[u8]) -> Vec<u8> {
    let mut text = message.to_vec();
    if let Ok(strings) = json::strings(message) {
        let mut parts = Vec::new();
        for s in &strings {
            text.push(b'\n');
            text.extend_from_slice(&s.decoded);
            if s.content {
                parts.extend_from_slice(&s.decoded);
            }
        }
        text.push(b'\n');
        text.extend(parts);
    }
    text
}

async fn client_to_server<R, W, C>(
    cr: &mut R,
    uw: &Mutex<W>,
    cw: &Mutex<C>,
    judge: &Judge,
    report: &std::sync::Mutex<WsReport>,
) -> Result<(), WsError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    C: AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    // The frames of the data message being assembled, and its text.
    let mut held: Vec<u8> = Vec::new();
    let mut message: Vec<u8> = Vec::new();
    loop {
        while let Some(h) = parse_header(&buf, judge.max_message)? {
            if buf.len() < h.total() {
                break;
            }
            if h.rsv1 {
                return Err(WsError::Protocol(
                    "compressed frame although no extension was negotiated",
                ));
            }
            let frame: Vec<u8> = buf.drain(..h.total()).collect();
            if let Ok(mut r) = report.lock() {
                r.up_bytes += frame.len() as u64;
            }
            let mut decisions = Vec::new();
            if !h.is_control() {
                if let Err(d) = judge.session.check_suspension(&mut decisions) {
                    return refuse(cw, uw, judge, report, decisions, d).await;
                }
            }
            if h.is_control() || !judge.request_rules {
                // Control frames (and everything, without request rules)
                // go on at once; they may interleave a fragmented message.
                let mut w = uw.lock().await;
                w.write_all(&frame).await?;
                w.flush().await?;
                continue;
            }
            let key = h.mask.unwrap_or([0; 4]);
            message.extend(
                frame[h.header_len..]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ key[i % 4]),
            );
            if message.len() > judge.max_message {
                return Err(WsError::TooLarge(judge.max_message));
            }
            held.extend_from_slice(&frame);
            if !h.fin {
                continue;
            }
            let evaluated = judge.policy.evaluate_request(
                &judge.session.target,
                &judge.session.identity,
                &judged_text(&message),
            );
            let denial = match judge.session.judge(evaluated, &mut decisions) {
                Judged::Allow => None,
                Judged::Deny(d) => Some(d),
                // A held message would hold every frame after it.
                Judged::Hold(_) => Some(Denial::new(
                    "websocket-approval",
                    crate::verdict::DenialKind::Blocked,
                    "approval is not available for WebSocket messages",
                )),
            };
            if let Some(d) = denial {
                return refuse(cw, uw, judge, report, decisions, d).await;
            }
            if let Ok(mut r) = report.lock() {
                r.decisions.extend(decisions);
            }
            {
                let mut w = uw.lock().await;
                w.write_all(&held).await?;
                w.flush().await?;
            }
            held.clear();
            message.clear();
        }
        let n = cr.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > judge.max_message + 16 {
            return Err(WsError::TooLarge(judge.max_message));
        }
    }
}

/// A denied client message: 1008 to both sides, the client's side shut,
/// the denial on the exchange's record; the message is not forwarded.
async fn refuse<W, C>(
    cw: &Mutex<C>,
    uw: &Mutex<W>,
    judge: &Judge,
    report: &std::sync::Mutex<WsReport>,
    decisions: Vec<Decision>,
    d: Denial,
) -> Result<(), WsError>
where
    W: AsyncWrite + Unpin,
    C: AsyncWrite + Unpin,
{
    let s = &judge.session;
    s.denied(&d);
    tracing::warn!(session = s.id, workload = %s.identity.id, rule = %d.rule, kind = d.kind.as_str(), "WebSocket message refused; closed");
    let why = match d.kind {
        crate::verdict::DenialKind::Suspended => "identity suspended",
        _ => "blocked by policy",
    };
    {
        let mut w = cw.lock().await;
        let _ = w.write_all(&close_frame(why, false)).await;
        let _ = w.flush().await;
    }
    {
        let mut w = uw.lock().await;
        let _ = w.write_all(&close_frame(why, true)).await;
        let _ = w.flush().await;
    }
    let _ = cw.lock().await.shutdown().await;
    if let Ok(mut r) = report.lock() {
        r.decisions.extend(decisions);
        r.error = Some(format!(
            "message refused, connection closed: {}: {}",
            d.rule,
            d.text()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::ws::parse_header;

    #[test]
    fn json_messages_are_judged_on_their_decoded_strings() {
        let m = br#"{"item":{"content":[{"type":"input_text","text":"the production\u0020pass"},{"type":"input_text","text":"word"}]}}"#;
        let t = String::from_utf8(judged_text(m)).unwrap();
        assert!(t.contains("\nthe production pass\n"), "{t}");
        assert!(t.ends_with("\nthe production password"), "{t}");
        assert_eq!(judged_text(b"plain text"), b"plain text");
    }

    #[test]
    fn close_frames_are_well_formed() {
        let s = close_frame("no", false);
        assert_eq!(s, vec![0x88, 4, 0x03, 0xf0, b'n', b'o']);
        let c = close_frame("no", true);
        let h = parse_header(&c, 1 << 20).unwrap().unwrap();
        assert_eq!((h.opcode, h.payload_len, h.mask), (8, 4, Some([0; 4])));
    }
}
