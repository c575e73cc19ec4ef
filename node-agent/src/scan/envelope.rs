//! gRPC and Connect streams: 5-byte envelopes (flags, big-endian length)
//! around each message. Protobuf payloads are walked without a schema:
//! string fields become text segments keyed by their field-number path,
//! so the same field's values across streamed messages form one text.
use std::io::{Read, Write};

use super::{
    json::{self, Span},
    stream::{Segment, SegmentKind},
    ScanError,
};

/// Flag bit: the payload is compressed with the stream's codec.
pub const COMPRESSED: u8 = 0x01;
/// Connect: the end-of-stream message (JSON: error and trailers).
pub const END_STREAM: u8 = 0x02;

/// What the payloads are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    Proto,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Identity,
    Gzip,
}

impl Codec {
    /// From `grpc-encoding` / `connect-content-encoding`.
    pub fn from_header(v: Option<&str>) -> Result<Self, ScanError> {
        match v.map(str::trim) {
            None | Some("") | Some("identity") => Ok(Self::Identity),
            Some("gzip") => Ok(Self::Gzip),
            Some(other) => Err(ScanError::Decode(format!(
                "message encoding `{other}` cannot be inspected"
            ))),
        }
    }

    pub fn decode(self, data: &[u8], limit: usize) -> Result<Vec<u8>, ScanError> {
        match self {
            Self::Identity => Err(ScanError::Framing(
                "compressed message on a stream without a message encoding".into(),
            )),
            Self::Gzip => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(data)
                    .take(limit as u64 + 1)
                    .read_to_end(&mut out)
                    .map_err(|e| ScanError::Decode(format!("gzip message: {e}")))?;
                if out.len() > limit {
                    return Err(ScanError::TooLarge {
                        what: "decompressed message",
                        limit,
                    });
                }
                Ok(out)
            }
        }
    }

    pub fn encode(self, data: &[u8]) -> Result<Vec<u8>, ScanError> {
        match self {
            Self::Identity => Ok(data.to_vec()),
            Self::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data)
                    .and_then(|_| e.finish())
                    .map_err(|e| ScanError::Decode(format!("gzip message: {e}")))
            }
        }
    }
}

/// Cuts a byte stream into messages.
#[derive(Default)]
pub struct EnvelopeFramer {
    buf: Vec<u8>,
}

impl EnvelopeFramer {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole message as (flags, payload).
    pub fn next_message(&mut self, limit: usize) -> Result<Option<(u8, Vec<u8>)>, ScanError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > limit {
            return Err(ScanError::TooLarge {
                what: "streamed message",
                limit,
            });
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let flags = self.buf[0];
        let payload = self.buf[5..5 + len].to_vec();
        self.buf.drain(..5 + len);
        Ok(Some((flags, payload)))
    }

    /// Bytes left at the end of the stream: a cut message is an error.
    pub fn finish(&self) -> Result<(), ScanError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ScanError::Framing(format!(
                "stream ended inside a message ({} bytes left)",
                self.buf.len()
            )))
        }
    }
}

/// Frames a (possibly rewritten) payload.
pub fn frame(flags: u8, payload: &[u8]) -> Result<Vec<u8>, ScanError> {
    let len = u32::try_from(payload.len()).map_err(|_| ScanError::TooLarge {
        what: "message",
        limit: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flags);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// gRPC-Web: the message carries the trailers (`grpc-status: 0\r\n...`).
pub const TRAILERS: u8 = 0x80;

/// Text segments of one decoded payload. JSON payloads are read like
/// JSON events (SSE): decoded string values keyed by path, generated-text
/// fields continuing across messages whatever comes between. The end of
/// a Connect stream and gRPC-Web trailers stand alone: nothing follows.
pub fn segments(payload: &[u8], kind: Payload, flags: u8) -> Vec<Segment> {
    let last = flags & (END_STREAM | TRAILERS) != 0;
    if flags & TRAILERS != 0 {
        return alone(raw_segment("trailers", payload, 0));
    }
    if kind == Payload::Json || last {
        let segs = match json::strings(payload) {
            Ok(s) => s
                .into_iter()
                .map(|s| Segment {
                    key: format!("json{}", field_path(&s.key)),
                    kind: if !in_string(payload, &s.origin) {
                        SegmentKind::Alone
                    } else if s.content {
                        SegmentKind::Content
                    } else {
                        SegmentKind::Typed
                    },
                    decoded: s.decoded,
                    origin: s.origin,
                })
                .collect(),
            Err(_) => raw_segment("json/raw", payload, 0),
        };
        return if last { alone(segs) } else { segs };
    }
    let mut out = Vec::new();
    if walk_proto(payload, 0, "pb", 0, &mut out).is_err() {
        // Not protobuf after all: scan the bytes as they are.
        out = raw_segment("pb/raw", payload, 0);
    }
    out
}

/// A JSON string's key by its field path alone, without what tells
/// parallel SSE streams apart (`{index=3}`, `[index=0]`, `[2]`): a
/// Connect/gRPC message is typed by its schema, its field path names the
/// text as field numbers do in protobuf, and a field such as a chunk's
/// `index` or `type` may change with every message (keyed by it, no two
/// messages' texts would join). Brackets inside names are dropped alike
/// in every message, so the same field keeps the same key.
fn field_path(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut depth = 0usize;
    for c in key.chars() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.saturating_sub(1),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// Whether a JSON text's bytes sit in a string value (its first byte
/// follows a quote). Anything else the JSON scanner may hand out as text
/// (a number) stands alone: joined with the next message's (`index` 1, 2,
/// 3, ...) it would become a long digit run a card rule could match, and
/// a mask inside a number is not JSON.
pub fn in_string(body: &[u8], origin: &[Span]) -> bool {
    origin
        .first()
        .and_then(|o| (o.start as usize).checked_sub(1))
        .is_some_and(|i| body.get(i) == Some(&b'"'))
}

fn alone(mut segs: Vec<Segment>) -> Vec<Segment> {
    for s in &mut segs {
        s.kind = SegmentKind::Alone;
    }
    segs
}

fn raw_segment(key: &str, bytes: &[u8], base: usize) -> Vec<Segment> {
    if bytes.is_empty() {
        return Vec::new();
    }
    vec![Segment {
        key: key.into(),
        kind: SegmentKind::Typed,
        decoded: bytes.to_vec(),
        origin: (0..bytes.len())
            .map(|k| Span {
                start: (base + k) as u32,
                len: 1,
            })
            .collect(),
    }]
}

fn varint(b: &[u8], i: &mut usize) -> Result<u64, ()> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i).ok_or(())?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(())
}

/// Text that reads as text (not a nested message or binary).
fn looks_like_text(b: &[u8]) -> bool {
    std::str::from_utf8(b).is_ok_and(|s| {
        s.chars()
            .all(|c| !c.is_control() || matches!(c, '\n' | '\r' | '\t'))
    })
}

/// Walks protobuf wire format; `base` is the offset of `b` in the payload.
fn walk_proto(
    b: &[u8],
    base: usize,
    path: &str,
    depth: usize,
    out: &mut Vec<Segment>,
) -> Result<(), ()> {
    if depth > 32 {
        return Err(());
    }
    let mut i = 0;
    let mut found = Vec::new();
    while i < b.len() {
        let tag = varint(b, &mut i)?;
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 0 {
            return Err(());
        }
        match wire {
            0 => {
                varint(b, &mut i)?;
            }
            1 => i = i.checked_add(8).filter(|n| *n <= b.len()).ok_or(())?,
            5 => i = i.checked_add(4).filter(|n| *n <= b.len()).ok_or(())?,
            2 => {
                let len = usize::try_from(varint(b, &mut i)?).map_err(|_| ())?;
                let end = i.checked_add(len).filter(|n| *n <= b.len()).ok_or(())?;
                found.push((field, i, end));
                i = end;
            }
            _ => return Err(()),
        }
    }
    for (field, s, e) in found {
        let sub = &b[s..e];
        let p = format!("{path}/{field}");
        // Text first: short ASCII often parses as protobuf too (`hi` is
        // field 13, varint 105). But a nested message whose first field
        // is a string of 32 to 126 bytes starts `\n` + a printable length
        // byte and reads as text: it is a message when it starts with a
        // control character that is a tag and parses whole.
        let tag_first = sub.first().is_some_and(|c| c.is_ascii_control());
        let mut nested = Vec::new();
        let message = (tag_first || !looks_like_text(sub))
            && walk_proto(sub, base + s, &p, depth + 1, &mut nested).is_ok();
        if message {
            out.extend(nested);
        } else {
            out.extend(raw_segment(&p, sub, base + s));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(field: u8, text: &[u8]) -> Vec<u8> {
        let mut m = vec![(field << 3) | 2, text.len() as u8];
        m.extend_from_slice(text);
        m
    }

    #[test]
    fn nested_strings_get_field_paths_and_offsets() {
        let inner = msg(2, b"ghp_A1");
        let mut outer = msg(1, b"hello");
        outer.extend(msg(3, &inner));
        outer.extend([0x20, 0x05]); // field 4 varint
        let s = segments(&outer, Payload::Proto, 0);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].key, "pb/1");
        assert_eq!(s[1].key, "pb/3/2");
        assert_eq!(s[1].decoded, b"ghp_A1");
        let st = s[1].origin[0].start as usize;
        assert_eq!(&outer[st..st + 6], b"ghp_A1");
    }

    #[test]
    fn json_keys_are_field_paths_and_text_fields_continue() {
        let s = segments(
            br#"{"index":3,"type":"delta","parts":[{"text":"a"},{"index":1,"text":"b"}],"id":"x"}"#,
            Payload::Json,
            0,
        );
        let keys: Vec<(&str, SegmentKind)> = s.iter().map(|s| (s.key.as_str(), s.kind)).collect();
        assert_eq!(
            keys,
            [
                ("json/type", SegmentKind::Typed),
                ("json/parts/text", SegmentKind::Content),
                ("json/parts/text", SegmentKind::Content),
                ("json/id", SegmentKind::Typed),
            ]
        );
        let doc = br#"{"a":12,"b":"x"}"#;
        let at = |i: usize| {
            [Span {
                start: i as u32,
                len: 1,
            }]
        };
        assert!(!in_string(doc, &at(5)) && in_string(doc, &at(13)));
        let end = segments(br#"{"error":{"message":"m"}}"#, Payload::Json, END_STREAM);
        assert_eq!(end[0].kind, SegmentKind::Alone);
        let t = segments(b"grpc-status: 0\r\n", Payload::Proto, TRAILERS);
        assert_eq!(
            (t[0].key.as_str(), t[0].kind),
            ("trailers", SegmentKind::Alone)
        );
    }

    #[test]
    fn a_nested_message_that_reads_as_text_is_walked() {
        // Inner { text = 1: 40 characters }: `\n(` then text.
        let text = b"0123456789012345678901234567890123456789";
        let inner = msg(1, text);
        assert!(looks_like_text(&inner));
        let s = segments(&msg(2, &inner), Payload::Proto, 0);
        assert_eq!(s.len(), 1);
        assert_eq!(
            (s[0].key.as_str(), &s[0].decoded[..]),
            ("pb/2/1", &text[..])
        );
        // Plain text that happens to parse as protobuf stays text.
        let s = segments(&msg(1, b"hi"), Payload::Proto, 0);
        assert_eq!((s[0].key.as_str(), &s[0].decoded[..]), ("pb/1", &b"hi"[..]));
    }

    #[test]
    fn framing_and_gzip_round_trip() {
        let mut f = EnvelopeFramer::default();
        let body = Codec::Gzip.encode(b"payload").unwrap();
        let framed = frame(COMPRESSED, &body).unwrap();
        f.push(&framed[..3]);
        assert!(f.next_message(1 << 20).unwrap().is_none());
        f.push(&framed[3..]);
        let (flags, p) = f.next_message(1 << 20).unwrap().unwrap();
        assert_eq!(flags, COMPRESSED);
        assert_eq!(Codec::Gzip.decode(&p, 1 << 20).unwrap(), b"payload");
        f.push(&[0, 0, 0, 0, 9, 1]);
        assert!(f.next_message(1 << 20).unwrap().is_none());
        assert!(f.finish().is_err());
        assert!(Codec::from_header(Some("snappy")).is_err());
    }
}
