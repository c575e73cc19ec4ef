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
    "response",
    // logprobs: each token of the answer, and its UTF-8 bytes.
    "token",
    "bytes",
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
    Obj(Vec<Field>),
}

struct Field {
    /// Decoded name.
    name: Vec<u8>,
    /// Raw range of the name between its quotes.
    raw: (usize, usize),
    value: Node,
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
                    let value = self.value(depth + 1)?;
                    fields.push(Field {
                        name: key,
                        raw: (s, e),
                        value,
                    });
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
    texts_of(input, Read::Strings)
}

/// What a walk reads as text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    Strings,
    /// Streamed events: strings and byte arrays (logprobs' `bytes` spell
    /// the answer again); keys and numbers of event envelopes are schema.
    Stream,
    /// A whole document: everything (`texts`).
    Document,
}

/// Strings and byte arrays of one streamed event (see `texts`).
pub fn stream_texts(input: &[u8]) -> Result<Vec<JsonString>, JsonError> {
    texts_of(input, Read::Stream)
}

/// Everything in a JSON document a reader can take as text, in document
/// order: string values, object keys (path `…/name#key`), numbers (their
/// literal, every digit mapped to the whole token), and arrays of integers
/// 0..=255 read as bytes (logprobs' `bytes`: one decoded byte per element).
/// Masking a number or a byte element rewrites the whole token (see
/// `mask_numbers`).
pub fn texts(input: &[u8]) -> Result<Vec<JsonString>, JsonError> {
    texts_of(input, Read::Document)
}

fn texts_of(input: &[u8], read: Read) -> Result<Vec<JsonString>, JsonError> {
    let mut p = Parser { b: input, i: 0 };
    let root = p.value(0)?;
    p.ws();
    if p.i != input.len() {
        return Err(p.err("trailing bytes after the value"));
    }
    let mut out = Vec::new();
    let mut w = Walk {
        b: input,
        read,
        out: &mut out,
    };
    w.walk(&root, &mut String::new(), "")?;
    Ok(out)
}

/// The values of `texts` or `strings` that read as one text: those whose
/// paths differ only in their innermost array position (content parts
/// `messages[0].content[i].text`, logprobs `content[i].token`), joined in
/// document order. Only groups of two or more; indexes into `strings`.
pub fn runs(strings: &[JsonString]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    let mut at: std::collections::HashMap<String, usize> = Default::default();
    for (i, s) in strings.iter().enumerate() {
        let Some(k) = without_innermost_index(&s.key) else {
            continue;
        };
        match at.get(&k) {
            Some(g) => groups[*g].1.push(i),
            None => {
                at.insert(k.clone(), groups.len());
                groups.push((k, vec![i]));
            }
        }
    }
    groups
        .into_iter()
        .filter(|(_, g)| g.len() > 1)
        .map(|(_, g)| g)
        .collect()
}

/// `/a[0]/b[3]/text` → `/a[0]/b[]/text`; `None` without a numeric index.
fn without_innermost_index(key: &str) -> Option<String> {
    let close = key.rfind(']')?;
    let open = key[..close].rfind('[')?;
    let inner = &key[open + 1..close];
    if inner.is_empty() || !inner.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(format!("{}[]{}", &key[..open + 1], &key[close..]))
}

/// What a masked number token becomes so that the document stays valid
/// JSON: a byte element the byte of `*` (42), any other number a string of
/// one `*` per character of its literal.
pub fn mask_numbers(body: &[u8], masks: &[Span]) -> Option<Vec<(Span, Vec<u8>)>> {
    let mut p = Parser { b: body, i: 0 };
    let root = p.value(0).ok()?;
    let mut found = Vec::new();
    numbers(body, &root, false, &mut found);
    let wanted: std::collections::HashSet<(u32, u16)> =
        masks.iter().map(|m| (m.start, m.len)).collect();
    let out: Vec<(Span, Vec<u8>)> = found
        .into_iter()
        .filter_map(|(s, e, byte)| {
            let span = Span {
                start: s as u32,
                len: u16::try_from(e - s).ok()?,
            };
            wanted.contains(&(span.start, span.len)).then(|| {
                let text = if byte {
                    b"42".to_vec()
                } else {
                    let mut t = vec![b'"'];
                    t.extend(std::iter::repeat_n(super::MASK, e - s));
                    t.push(b'"');
                    t
                };
                (span, text)
            })
        })
        .collect();
    Some(out)
}

fn numbers(b: &[u8], n: &Node, in_bytes: bool, out: &mut Vec<(usize, usize, bool)>) {
    match n {
        Node::Scalar(s, e) => out.push((*s, *e, in_bytes)),
        Node::Str(..) => {}
        Node::Arr(items) => {
            let bytes = byte_array(b, items).is_some();
            for i in items {
                numbers(b, i, bytes, out);
            }
        }
        Node::Obj(fields) => {
            for f in fields {
                numbers(b, &f.value, false, out);
            }
        }
    }
}

/// An array that holds text as bytes: every element an integer literal
/// 0..=255, at least one. Its bytes, each with its element's token.
fn byte_array(b: &[u8], items: &[Node]) -> Option<(Vec<u8>, Vec<Span>)> {
    if items.is_empty() {
        return None;
    }
    let mut bytes = Vec::with_capacity(items.len());
    let mut origin = Vec::with_capacity(items.len());
    for i in items {
        let Node::Scalar(s, e) = i else {
            return None;
        };
        let lit = &b[*s..*e];
        if lit.is_empty() || lit.len() > 3 || !lit.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let v: u16 = std::str::from_utf8(lit).ok()?.parse().ok()?;
        bytes.push(u8::try_from(v).ok()?);
        origin.push(Span {
            start: *s as u32,
            len: (e - s) as u16,
        });
    }
    Some((bytes, origin))
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

fn discriminators(b: &[u8], fields: &[Field]) -> String {
    let mut d = String::new();
    for name in DISCRIMINATORS {
        if let Some(f) = fields.iter().find(|f| f.name == name.as_bytes()) {
            if let Some(t) = scalar_text(b, &f.value) {
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

struct Walk<'a, 'o> {
    b: &'a [u8],
    read: Read,
    out: &'o mut Vec<JsonString>,
}

impl Walk<'_, '_> {
    fn push(&mut self, key: String, leaf: &str, decoded: Vec<u8>, origin: Vec<Span>) {
        if !decoded.is_empty() {
            self.out.push(JsonString {
                key,
                content: CONTENT_FIELDS.contains(&leaf),
                decoded,
                origin,
            });
        }
    }

    fn walk(&mut self, n: &Node, path: &mut String, leaf: &str) -> Result<(), JsonError> {
        let b = self.b;
        match n {
            Node::Str(s, e) => {
                let (decoded, origin) =
                    decode(b, *s, *e).map_err(|what| JsonError { at: *s, what })?;
                self.push(path.clone(), leaf, decoded, origin);
            }
            Node::Scalar(s, e) => {
                let lit = &b[*s..*e];
                if self.read == Read::Document && !matches!(lit, b"true" | b"false" | b"null") {
                    // Every digit maps to the whole token: a mask rewrites it.
                    let span = Span {
                        start: *s as u32,
                        len: u16::try_from(lit.len()).unwrap_or(u16::MAX),
                    };
                    self.push(path.clone(), leaf, lit.to_vec(), vec![span; lit.len()]);
                }
            }
            Node::Arr(items) => {
                if self.read != Read::Strings {
                    if let Some((bytes, origin)) = byte_array(b, items) {
                        self.push(path.clone(), leaf, bytes, origin);
                        return Ok(());
                    }
                }
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    match item {
                        Node::Obj(f) if f.iter().any(|f| f.name == b"index") => {
                            path.push_str(&format!("[{}]", discriminators(b, f)))
                        }
                        _ => path.push_str(&format!("[{i}]")),
                    }
                    self.walk(item, path, leaf)?;
                    path.truncate(len);
                }
            }
            Node::Obj(fields) => {
                let d = discriminators(b, fields);
                let len = path.len();
                if !d.is_empty() && !path.ends_with(']') {
                    path.push_str(&format!("{{{d}}}"));
                }
                for f in fields {
                    let name = String::from_utf8_lossy(&f.name).into_owned();
                    let l2 = path.len();
                    path.push('/');
                    path.push_str(&name);
                    if self.read == Read::Document {
                        let (s, e) = f.raw;
                        let (decoded, origin) =
                            decode(b, s, e).map_err(|what| JsonError { at: s, what })?;
                        self.push(format!("{path}#key"), "", decoded, origin);
                    }
                    self.walk(&f.value, path, &name)?;
                    path.truncate(l2);
                }
                path.truncate(len);
            }
        }
        Ok(())
    }
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
    fn texts_have_keys_numbers_and_byte_arrays_and_runs_join_parts() {
        let doc = br#"{"messages":[{"content":[{"type":"text","text":"produc"},{"type":"text","text":"tion password"}]}],"kA":[104,105],"n":-1.5e3,"t":true}"#;
        let t = texts(doc).unwrap();
        let keys: Vec<&str> = t.iter().map(|s| s.key.as_str()).collect();
        assert!(keys.contains(&"/kA#key"), "{keys:?}");
        let bytes = t.iter().find(|s| s.key == "/kA").unwrap();
        assert_eq!(bytes.decoded, b"hi");
        assert_eq!(bytes.origin[1].len, 3, "a byte maps to its element");
        let n = t.iter().find(|s| s.key == "/n").unwrap();
        assert_eq!(n.decoded, b"-1.5e3");
        assert!(t.iter().all(|s| s.decoded != b"true"));
        let runs = runs(&t);
        let joined: Vec<String> = runs
            .iter()
            .map(|r| {
                r.iter()
                    .map(|&i| String::from_utf8_lossy(&t[i].decoded))
                    .collect()
            })
            .collect();
        assert!(
            joined.contains(&"production password".to_owned()),
            "{joined:?}"
        );
        // Plain strings() is unchanged: strings only.
        assert!(strings(doc)
            .unwrap()
            .iter()
            .all(|s| !s.key.ends_with("#key")));
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
