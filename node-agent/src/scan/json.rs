//! The string values of a JSON document, decoded, each with the path it
//! sits at and, for every decoded byte, the raw bytes it came from.
//!
//! Streamed AI answers arrive as JSON events carrying a few characters
//! each; a secret is only visible once the same field's values are joined
//! and unescaped (`\u0041KIA...`, `\n` inside a PEM key). The path is the
//! join key; the raw spans let a mask be written back into the JSON
//! string so the event stays valid JSON.

/// Where a decoded byte came from: `len` raw bytes at `start` (one
/// character, or one escape such as `\n` or `\u00e9`). `len == 0` marks a
/// byte that has no raw counterpart and is never masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub len: u16,
}

/// One string value.
#[derive(Debug, PartialEq, Eq)]
pub struct JsonString {
    /// Path with discriminators, e.g. `/choices[index=0]/delta/content`.
    pub key: String,
    /// Whether the field holds generated text (a delta of an answer),
    /// which continues across events whatever comes between them.
    pub content: bool,
    pub decoded: Vec<u8>,
    pub origin: Vec<Span>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not JSON at byte {at}: {what}")]
pub struct JsonError {
    pub at: usize,
    pub what: &'static str,
}

/// Fields whose string values are generated text in the AI APIs' stream
/// shapes (OpenAI chat and Responses, Anthropic Messages).
const CONTENT_FIELDS: &[&str] = &[
    "content",
    "text",
    "partial_json",
    "thinking",
    "reasoning_content",
    "reasoning",
    "refusal",
    "arguments",
    "delta",
];

/// Fields that tell parallel streams apart (choice n, content block n,
/// output item n) and so become part of the key.
const DISCRIMINATORS: &[&str] = &["type", "index", "output_index", "content_index"];

const MAX_DEPTH: usize = 128;

enum Node {
    /// Raw range of the string's content, between the quotes.
    Str(usize, usize),
    Scalar(usize, usize),
    Arr(Vec<Node>),
    Obj(Vec<(Vec<u8>, Node)>),
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn err(&self, what: &'static str) -> JsonError {
        JsonError { at: self.i, what }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node, JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nested too deeply"));
        }
        self.ws();
        match self.b.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Node::Obj(fields));
                }
                loop {
                    self.ws();
                    let (s, e) = self.string()?;
                    let key = decode(self.b, s, e)
                        .map(|(d, _)| d)
                        .map_err(|w| JsonError { at: s, what: w })?;
                    self.ws();
                    if self.b.get(self.i) != Some(&b':') {
                        return Err(self.err("expected `:`"));
                    }
                    self.i += 1;
                    let v = self.value(depth + 1)?;
                    fields.push((key, v));
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Node::Obj(fields));
                        }
                        _ => return Err(self.err("expected `,` or `}`")),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Node::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Node::Arr(items));
                        }
                        _ => return Err(self.err("expected `,` or `]`")),
                    }
                }
            }
            Some(b'"') => {
                let (s, e) = self.string()?;
                Ok(Node::Str(s, e))
            }
            Some(b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
                let s = self.i;
                while let Some(b'-' | b'+' | b'.' | b'0'..=b'9' | b'a'..=b'z' | b'E') =
                    self.b.get(self.i)
                {
                    self.i += 1;
                }
                let lit = &self.b[s..self.i];
                let ok = matches!(lit, b"true" | b"false" | b"null")
                    || (lit
                        .first()
                        .is_some_and(|c| *c == b'-' || c.is_ascii_digit())
                        && lit
                            .iter()
                            .all(|c| matches!(c, b'-' | b'+' | b'.' | b'0'..=b'9' | b'e' | b'E')));
                if !ok {
                    return Err(JsonError {
                        at: s,
                        what: "bad literal",
                    });
                }
                Ok(Node::Scalar(s, self.i))
            }
            _ => Err(self.err("expected a value")),
        }
    }

    /// A string token; returns the raw range of its content.
    fn string(&mut self) -> Result<(usize, usize), JsonError> {
        if self.b.get(self.i) != Some(&b'"') {
            return Err(self.err("expected a string"));
        }
        self.i += 1;
        let start = self.i;
        loop {
            match self.b.get(self.i) {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    let end = self.i;
                    self.i += 1;
                    return Ok((start, end));
                }
                Some(b'\\') => self.i += 2,
                Some(_) => self.i += 1,
            }
        }
    }
}

fn hex4(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    let s = std::str::from_utf8(s).ok()?;
    u32::from_str_radix(s, 16).ok()
}

/// Decodes the raw content `b[s..e]` of a JSON string.
fn decode(b: &[u8], s: usize, e: usize) -> Result<(Vec<u8>, Vec<Span>), &'static str> {
    let mut out = Vec::with_capacity(e - s);
    let mut origin = Vec::with_capacity(e - s);
    let mut i = s;
    let span = |start: usize, len: usize| Span {
        start: start as u32,
        len: len as u16,
    };
    while i < e {
        let c = b[i];
        if c == b'\\' {
            let esc = *b.get(i + 1).ok_or("dangling escape")?;
            let simple = match esc {
                b'"' => Some(b'"'),
                b'\\' => Some(b'\\'),
                b'/' => Some(b'/'),
                b'b' => Some(8),
                b'f' => Some(12),
                b'n' => Some(b'\n'),
                b'r' => Some(b'\r'),
                b't' => Some(b'\t'),
                b'u' => None,
                _ => return Err("bad escape"),
            };
            if let Some(d) = simple {
                out.push(d);
                origin.push(span(i, 2));
                i += 2;
                continue;
            }
            let hi = hex4(b, i + 2).ok_or("bad \\u escape")?;
            let (cp, len) = if (0xD800..0xDC00).contains(&hi)
                && b.get(i + 6) == Some(&b'\\')
                && b.get(i + 7) == Some(&b'u')
            {
                match hex4(b, i + 8) {
                    Some(lo) if (0xDC00..0xE000).contains(&lo) => {
                        (0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00), 12)
                    }
                    _ => (0xFFFD, 6),
                }
            } else {
                (hi, 6)
            };
            let ch = char::from_u32(cp).unwrap_or('\u{FFFD}');
            let mut buf = [0u8; 4];
            for &d in ch.encode_utf8(&mut buf).as_bytes() {
                out.push(d);
                origin.push(span(i, len));
            }
            i += len;
        } else if c < 0x20 {
            return Err("control character in string");
        } else {
            // One UTF-8 character is one span: masked as one `*`.
            let n = match c {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            }
            .min(e - i);
            for k in 0..n {
                out.push(b[i + k]);
                origin.push(span(i, n));
            }
            i += n;
        }
    }
    Ok((out, origin))
}

/// Every string value of `input` (which must be exactly one JSON value,
/// surrounding whitespace allowed), in document order.
pub fn strings(input: &[u8]) -> Result<Vec<JsonString>, JsonError> {
    let mut p = Parser { b: input, i: 0 };
    let root = p.value(0)?;
    p.ws();
    if p.i != input.len() {
        return Err(p.err("trailing bytes after the value"));
    }
    let mut out = Vec::new();
    walk(input, &root, &mut String::new(), "", &mut out)?;
    Ok(out)
}

fn scalar_text(b: &[u8], n: &Node) -> Option<String> {
    match n {
        Node::Str(s, e) => decode(b, *s, *e)
            .ok()
            .map(|(d, _)| String::from_utf8_lossy(&d).into_owned()),
        Node::Scalar(s, e) => Some(String::from_utf8_lossy(&b[*s..*e]).into_owned()),
        _ => None,
    }
}

fn discriminators(b: &[u8], fields: &[(Vec<u8>, Node)]) -> String {
    let mut d = String::new();
    for name in DISCRIMINATORS {
        if let Some((_, v)) = fields.iter().find(|(k, _)| k == name.as_bytes()) {
            if let Some(t) = scalar_text(b, v) {
                if !d.is_empty() {
                    d.push(',');
                }
                d.push_str(name);
                d.push('=');
                d.push_str(&t);
            }
        }
    }
    d
}

fn walk(
    b: &[u8],
    n: &Node,
    path: &mut String,
    leaf: &str,
    out: &mut Vec<JsonString>,
) -> Result<(), JsonError> {
    match n {
        Node::Str(s, e) => {
            let (decoded, origin) = decode(b, *s, *e).map_err(|what| JsonError { at: *s, what })?;
            if !decoded.is_empty() {
                out.push(JsonString {
                    key: path.clone(),
                    content: CONTENT_FIELDS.contains(&leaf),
                    decoded,
                    origin,
                });
            }
        }
        Node::Scalar(..) => {}
        Node::Arr(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                match item {
                    Node::Obj(f) if f.iter().any(|(k, _)| k == b"index") => {
                        path.push_str(&format!("[{}]", discriminators(b, f)))
                    }
                    _ => path.push_str(&format!("[{i}]")),
                }
                walk(b, item, path, leaf, out)?;
                path.truncate(len);
            }
        }
        Node::Obj(fields) => {
            let d = discriminators(b, fields);
            let len = path.len();
            if !d.is_empty() && !path.ends_with(']') {
                path.push_str(&format!("{{{d}}}"));
            }
            for (k, v) in fields {
                let name = String::from_utf8_lossy(k);
                let l2 = path.len();
                path.push('/');
                path.push_str(&name);
                walk(b, v, path, &name, out)?;
                path.truncate(l2);
            }
            path.truncate(len);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_chunk_paths_and_decoding() {
        let ev = br#"{"id":"c1","choices":[{"index":0,"delta":{"content":"gh\u0070_A\n1"}}]}"#;
        let s = strings(ev).unwrap();
        let c = s.iter().find(|s| s.content).unwrap();
        assert_eq!(c.key, "/choices[index=0]/delta/content");
        assert_eq!(c.decoded, b"ghp_A\n1");
        // `p` came from a 6-byte escape, `\n` from a 2-byte one.
        assert_eq!(c.origin[2].len, 6);
        assert_eq!(c.origin[5].len, 2);
        let id = s.iter().find(|s| !s.content).unwrap();
        assert_eq!(id.key, "/id");
    }

    #[test]
    fn anthropic_and_responses_keys() {
        let a = br#"{"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"hi"}}"#;
        let s = strings(a).unwrap();
        let t = s.iter().find(|s| s.content).unwrap();
        assert_eq!(
            t.key,
            "{type=content_block_delta,index=1}/delta{type=text_delta}/text"
        );
        let r = br#"{"type":"response.output_text.delta","output_index":0,"content_index":0,"delta":"x"}"#;
        let s = strings(r).unwrap();
        let d = s.iter().find(|s| s.content).unwrap();
        assert_eq!(
            d.key,
            "{type=response.output_text.delta,output_index=0,content_index=0}/delta"
        );
    }

    #[test]
    fn surrogates_utf8_and_errors() {
        let s = strings(br#"["\ud83d\ude00\u00e9\u00"]"#);
        assert!(s.is_err());
        let s = strings("[\"\\ud83d\\ude00é\"]".as_bytes()).unwrap();
        assert_eq!(s[0].decoded, "😀é".as_bytes());
        assert_eq!(s[0].origin[0].len, 12);
        assert_eq!(s[0].origin[4].len, 2);
        assert!(strings(b"{\"a\":1} x").is_err());
        assert!(strings(b"[DONE]").is_err());
        assert!(strings(b"{\"a\":tru}").is_err());
    }
}
