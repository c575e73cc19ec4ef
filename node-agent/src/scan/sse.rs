//! Server-sent events: the stream is cut into events (a blank line ends
//! one), and each event's `data` becomes the text segments to scan: the
//! string values of a JSON payload by path, or the payload itself.
use super::{
    json::{self, Span},
    stream::{Segment, SegmentKind},
};

/// Cuts a byte stream into whole events (each ending with its blank line).
#[derive(Default)]
pub struct SseFramer {
    buf: Vec<u8>,
    /// Where the line being read starts, and how far `buf` was searched.
    line_start: usize,
    searched: usize,
}

impl SseFramer {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete event, if any.
    pub fn next_event(&mut self) -> Option<Vec<u8>> {
        while self.searched < self.buf.len() {
            let i = self.searched;
            self.searched += 1;
            if self.buf[i] != b'\n' {
                continue;
            }
            let line = &self.buf[self.line_start..i];
            let empty = line.is_empty() || line == b"\r";
            self.line_start = i + 1;
            if empty {
                let ev: Vec<u8> = self.buf.drain(..=i).collect();
                self.line_start = 0;
                self.searched = 0;
                return Some(ev);
            }
        }
        None
    }

    /// Whatever is left at the end of the stream (an unterminated event).
    pub fn take_rest(&mut self) -> Vec<u8> {
        self.line_start = 0;
        self.searched = 0;
        std::mem::take(&mut self.buf)
    }
}

/// The text segments of one event (`raw` is the whole event).
pub fn segments(raw: &[u8]) -> Vec<Segment> {
    let mut event = String::new();
    let mut payload = Vec::new();
    // Payload byte -> raw span (the `\n` joining data lines has none).
    let mut map: Vec<Span> = Vec::new();
    let mut pos = 0;
    for line in raw.split_inclusive(|b| *b == b'\n') {
        let start = pos;
        pos += line.len();
        let mut body = line;
        if let Some(b) = body.strip_suffix(b"\n") {
            body = b;
        }
        if let Some(b) = body.strip_suffix(b"\r") {
            body = b;
        }
        if let Some(v) = body.strip_prefix(b"event:") {
            event = String::from_utf8_lossy(v.strip_prefix(b" ").unwrap_or(v)).into_owned();
        } else if let Some(v) = body.strip_prefix(b"data:") {
            let off = start + 5 + usize::from(v.first() == Some(&b' '));
            let v = v.strip_prefix(b" ").unwrap_or(v);
            if !map.is_empty() {
                payload.push(b'\n');
                map.push(Span { start: 0, len: 0 });
            }
            payload.extend_from_slice(v);
            map.extend((0..v.len()).map(|k| Span {
                start: (off + k) as u32,
                len: 1,
            }));
        }
    }
    if payload.is_empty() {
        return Vec::new();
    }
    match json::stream_texts(&payload) {
        Ok(strings) => strings
            .into_iter()
            .map(|s| {
                // Spans are relative to the payload: move them to the event,
                // widening a multi-byte span to the raw bytes it covers.
                let origin = s
                    .origin
                    .iter()
                    .map(|sp| {
                        let first = map[sp.start as usize];
                        Span {
                            start: first.start,
                            len: sp.len,
                        }
                    })
                    .collect();
                Segment {
                    key: format!("{event}{}", s.key),
                    kind: if s.content {
                        SegmentKind::Content
                    } else {
                        SegmentKind::Field
                    },
                    decoded: s.decoded,
                    origin,
                }
            })
            .collect(),
        // Plain-text events: the payloads form one text across events.
        Err(_) => vec![Segment {
            key: format!("{event}/data"),
            kind: SegmentKind::Content,
            decoded: payload,
            origin: map,
        }],
    }
}

/// `json::mask_numbers` for the JSON payload of each single `data:` line
/// of an event (streamed logprobs carry byte arrays), in event offsets.
pub fn mask_numbers(event: &[u8], masks: &[Span]) -> Vec<(Span, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for line in event.split_inclusive(|b| *b == b'\n') {
        let start = pos;
        pos += line.len();
        let Some(v) = line.strip_prefix(b"data:") else {
            continue;
        };
        let off = start + 5 + usize::from(v.first() == Some(&b' '));
        let end = start + line.trim_ascii_end().len();
        if off >= end {
            continue;
        }
        let inside: Vec<Span> = masks
            .iter()
            .filter(|m| (m.start as usize) >= off && (m.start as usize) < end)
            .map(|m| Span {
                start: m.start - off as u32,
                len: m.len,
            })
            .collect();
        if inside.is_empty() {
            continue;
        }
        for (sp, text) in json::mask_numbers(&event[off..end], &inside).unwrap_or_default() {
            out.push((
                Span {
                    start: sp.start + off as u32,
                    len: sp.len,
                },
                text,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_events_across_pushes_and_line_endings() {
        let mut f = SseFramer::default();
        f.push(b"data: a\r\n\r");
        assert!(f.next_event().is_none());
        f.push(b"\ndata: b\n");
        assert_eq!(f.next_event().unwrap(), b"data: a\r\n\r\n");
        assert!(f.next_event().is_none());
        f.push(b"\nrest");
        assert_eq!(f.next_event().unwrap(), b"data: b\n\n");
        assert_eq!(f.take_rest(), b"rest");
    }

    #[test]
    fn json_segments_point_into_the_raw_event() {
        let raw = b"event: x\ndata: {\"text\":\"hi\\n\"}\n\n";
        let s = segments(raw);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].key, "x/text");
        assert_eq!(s[0].decoded, b"hi\n");
        let o = s[0].origin[2];
        assert_eq!(
            &raw[o.start as usize..o.start as usize + o.len as usize],
            b"\\n"
        );
        let plain = segments(b"data: hello\ndata: world\n\n");
        assert_eq!(plain[0].decoded, b"hello\nworld");
        assert_eq!(plain[0].origin[5].len, 0);
    }
}
