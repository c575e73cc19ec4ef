//! WebSocket frames (RFC 6455 section 5.2), for the masker's framing and
//! the client-to-server message judge.
//!
//! A server's text message that is JSON (Realtime-API-style events, one
//! delta each) is read like an SSE JSON event: its decoded string values
//! join the same field's values in earlier messages, so a token streamed
//! a few characters per message is seen whole. Such a message is held
//! until its last frame and goes out as one frame (an intermediary may
//! change the fragmentation of a message without extensions, section
//! 5.4), so a mask that shortens an escape keeps the frame length right.
//! Other messages pass frame by frame, masked in place.
use super::{
    json::{self, Span},
    stream::{Segment, SegmentKind},
    ScanError,
};

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub rsv1: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub header_len: usize,
    pub payload_len: usize,
}

impl FrameHeader {
    pub fn total(&self) -> usize {
        self.header_len + self.payload_len
    }

    pub fn is_control(&self) -> bool {
        self.opcode >= 8
    }
}

/// The header at the start of `buf`, once it is all there.
pub fn parse_header(buf: &[u8], limit: usize) -> Result<Option<FrameHeader>, ScanError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x30 != 0 {
        return Err(ScanError::Framing(
            "WebSocket reserved bits RSV2/RSV3 set".into(),
        ));
    }
    let opcode = b0 & 0x0f;
    if !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) {
        return Err(ScanError::Framing("unknown WebSocket opcode".into()));
    }
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    let payload_len =
        usize::try_from(len)
            .ok()
            .filter(|l| *l <= limit)
            .ok_or(ScanError::TooLarge {
                what: "WebSocket frame",
                limit,
            })?;
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let k = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(k)
    } else {
        None
    };
    Ok(Some(FrameHeader {
        fin: b0 & 0x80 != 0,
        rsv1: b0 & 0x40 != 0,
        opcode,
        mask,
        header_len: at,
        payload_len,
    }))
}

/// What the masker gets from the frame stream, in order.
#[derive(Debug)]
pub struct WsPiece {
    /// A frame as it came, or the payload of a whole JSON text message,
    /// framed again when it goes out.
    pub body: Vec<u8>,
    pub segs: Vec<Segment>,
    /// For a JSON message: its frames as they came.
    pub original: Option<Vec<u8>>,
    /// The last frame of a message that is not JSON: its text ends here
    /// (the peer may wait for it before sending more).
    pub ends: bool,
}

/// A fragmented text message that may be JSON, until its last frame.
struct Held {
    /// Each frame as it came, with its header length.
    frames: Vec<(Vec<u8>, usize)>,
    text: Vec<u8>,
}

/// Cuts a server's frame stream into pieces.
#[derive(Default)]
pub struct WsFramer {
    buf: Vec<u8>,
    held: Option<Held>,
    /// Inside a fragmented message that passes frame by frame.
    streaming: bool,
}

impl WsFramer {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Every piece that is complete; `limit` bounds a frame and a held
    /// message.
    pub fn pieces(&mut self, limit: usize, out: &mut Vec<WsPiece>) -> Result<(), ScanError> {
        while let Some(h) = parse_header(&self.buf, limit)? {
            if self.buf.len() < h.total() {
                break;
            }
            if h.rsv1 || h.mask.is_some() {
                return Err(ScanError::Framing(
                    "compressed or masked WebSocket frame from the server".into(),
                ));
            }
            let frame: Vec<u8> = self.buf.drain(..h.total()).collect();
            if h.is_control() {
                // May come between the frames of a message; nothing to read.
                out.push(WsPiece {
                    body: frame,
                    segs: Vec::new(),
                    original: None,
                    ends: false,
                });
                continue;
            }
            let payload = &frame[h.header_len..];
            match (h.opcode, self.held.take()) {
                (0, Some(mut m)) => {
                    m.text.extend_from_slice(payload);
                    if m.text.len() > limit {
                        return Err(ScanError::TooLarge {
                            what: "WebSocket message",
                            limit,
                        });
                    }
                    m.frames.push((frame, h.header_len));
                    if h.fin {
                        finish_text(m.frames, m.text, out);
                    } else {
                        self.held = Some(m);
                    }
                }
                (0, None) if self.streaming => {
                    self.streaming = !h.fin;
                    out.push(raw_piece(frame, h.header_len, h.fin));
                }
                (0, None) => {
                    return Err(ScanError::Framing(
                        "WebSocket continuation frame outside a message".into(),
                    ))
                }
                (_, Some(_)) => {
                    return Err(ScanError::Framing(
                        "WebSocket message started inside a fragmented message".into(),
                    ))
                }
                _ if self.streaming => {
                    return Err(ScanError::Framing(
                        "WebSocket message started inside a fragmented message".into(),
                    ))
                }
                (1, None) if h.fin => {
                    let text = payload.to_vec();
                    finish_text(vec![(frame, h.header_len)], text, out);
                }
                (1, None)
                    if payload
                        .trim_ascii_start()
                        .first()
                        .is_some_and(|c| *c == b'{' || *c == b'[') =>
                {
                    let text = payload.to_vec();
                    self.held = Some(Held {
                        frames: vec![(frame, h.header_len)],
                        text,
                    });
                }
                _ => {
                    self.streaming = !h.fin;
                    out.push(raw_piece(frame, h.header_len, h.fin));
                }
            }
        }
        Ok(())
    }

    /// The stream ended: a cut frame or message is an error.
    pub fn finish(&self) -> Result<(), ScanError> {
        if self.buf.is_empty() && self.held.is_none() {
            Ok(())
        } else {
            Err(ScanError::Framing(
                "WebSocket stream ended inside a frame".into(),
            ))
        }
    }
}

/// A whole text message: JSON events become one piece read by field;
/// anything else goes frame by frame as raw text.
fn finish_text(frames: Vec<(Vec<u8>, usize)>, text: Vec<u8>, out: &mut Vec<WsPiece>) {
    if let Ok(strings) = json::strings(&text) {
        let segs = strings
            .into_iter()
            .map(|s| Segment {
                key: format!("ws{}", s.key),
                kind: if !super::envelope::in_string(&text, &s.origin) {
                    SegmentKind::Alone
                } else if s.content {
                    SegmentKind::Content
                } else {
                    SegmentKind::Field
                },
                decoded: s.decoded,
                origin: s.origin,
            })
            .collect();
        let original = frames.into_iter().flat_map(|(f, _)| f).collect();
        out.push(WsPiece {
            body: text,
            segs,
            original: Some(original),
            ends: false,
        });
        return;
    }
    let n = frames.len();
    for (i, (frame, header_len)) in frames.into_iter().enumerate() {
        out.push(raw_piece(frame, header_len, i + 1 == n));
    }
}

/// A data frame scanned as raw text, masked in place.
fn raw_piece(frame: Vec<u8>, header_len: usize, fin: bool) -> WsPiece {
    let segs = if frame.len() > header_len {
        vec![Segment {
            key: "ws".into(),
            kind: SegmentKind::Content,
            decoded: frame[header_len..].to_vec(),
            origin: (header_len..frame.len())
                .map(|k| Span {
                    start: k as u32,
                    len: 1,
                })
                .collect(),
        }]
    } else {
        Vec::new()
    };
    WsPiece {
        body: frame,
        segs,
        original: None,
        ends: fin,
    }
}

/// One unmasked final text frame around `payload` (server to client).
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x81);
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_of_every_length_form() {
        assert_eq!(parse_header(&[0x81], 1 << 20).unwrap(), None);
        let h = parse_header(&[0x81, 0x05, b'h'], 1 << 20).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.header_len, h.payload_len),
            (true, 1, 2, 5)
        );
        let h = parse_header(&[0x01, 0xfe, 0x01, 0x00, 1, 2, 3, 4], 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.fin, h.payload_len, h.mask),
            (false, 256, Some([1, 2, 3, 4]))
        );
        let mut big = vec![0x82, 0x7f];
        big.extend(70_000u64.to_be_bytes());
        assert_eq!(parse_header(&big, 1 << 20).unwrap().unwrap().header_len, 10);
        assert!(parse_header(&big, 1000).is_err());
        assert!(parse_header(&[0xb1, 0x00], 1 << 20).is_err(), "RSV2");
        assert!(parse_header(&[0x83, 0x00], 1 << 20).is_err(), "opcode 3");
    }
}
