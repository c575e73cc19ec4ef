//! Streaming masking. A response is scanned as it flows and only what a
//! match could still grow into is held back (`Scanner::first_live`).
//!
//! Two shapes:
//! * raw bytes (downloads, plain JSON, text): scanned in place, masked
//!   byte for byte, so lengths never change;
//! * framed streams (SSE events, gRPC/Connect messages): each event or
//!   message is a *unit*; its text *segments* (JSON string values by path,
//!   protobuf string fields by field path) join the segments of the same
//!   key in earlier units into one logical text, so a secret streamed a few
//!   characters per event is seen whole. Masks are written back into the
//!   unit (one `*` per decoded character, escapes included), and a unit is
//!   sent once every byte of it is settled, in order.
use std::collections::{BTreeMap, HashMap, VecDeque};

use super::{
    envelope::{self, Codec, EnvelopeFramer, Payload},
    json::Span,
    sse::{self, SseFramer},
    ScanError, Scanner, ScannerRef, MASK,
};

/// Largest single event or message, decoded.
pub const MAX_UNIT: usize = 4 << 20;
/// Most raw bytes held back at once (events waiting for their text to
/// settle plus an incomplete event).
pub const MAX_HELD: usize = 8 << 20;
/// Distinct keys followed at once; beyond, new keys are scanned alone.
const MAX_STREAMS: usize = 1024;
/// Shortest repeated `Field` value taken for metadata (an id, a model
/// name) rather than more of the text: a secret streamed in pieces this
/// short repeats a piece now and then (see `metadata`).
const MIN_METADATA: usize = 5;
/// Leading bytes two consecutive values of a field share when they are a
/// series of ids (`event_6`, `event_7`) rather than pieces of one text.
const SERIES_PREFIX: usize = 4;

/// How a response body is framed, from its content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Raw,
    Sse,
    /// Newline-delimited JSON (`application/x-ndjson`, Ollama-style streams).
    Ndjson,
    /// WebSocket frames from a server: text and binary payloads, joined.
    WebSocket,
    /// One JSON document (a non-streamed API answer): its string values
    /// are scanned decoded (`\"`, `\n`, `\u0041` undone). Buffered whole up
    /// to `MAX_UNIT` (the client cannot use half a document anyway);
    /// larger documents fall back to raw scanning.
    Json,
    Envelope {
        payload: Payload,
        codec: Codec,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    /// Generated text: continues across units whatever comes between.
    Content,
    /// Any other field: continues only while consecutive units carry it
    /// with a new value (a repeated id or model name is not appended).
    Field,
    /// A field of a schema-typed message (gRPC/Connect, protobuf or
    /// JSON): continues across messages that do not carry it (another
    /// case of a `oneof`, a heartbeat, an empty string proto3 leaves out);
    /// a repeated value is metadata as for `Field`.
    Typed,
    /// Complete on its own (a string of a whole JSON document): scanned
    /// alone, at once.
    Alone,
}

/// Decoded text of one field of one unit, with the raw span of each byte.
#[derive(Debug)]
pub struct Segment {
    pub key: String,
    pub kind: SegmentKind,
    pub decoded: Vec<u8>,
    pub origin: Vec<Span>,
}

pub type Applies = Box<dyn Fn(usize) -> bool + Send + Sync>;

pub struct StreamMasker {
    scanner: ScannerRef,
    applies: Applies,
    mode: Mode,
    /// Masked spans per (rule index, pattern id), for the record.
    pub masked: BTreeMap<(usize, String), u64>,
    pub error: Option<String>,
}

enum Mode {
    /// `ctx`: `held[0]` is the last byte sent, kept as context.
    Raw {
        held: Vec<u8>,
        ctx: bool,
    },
    Units(Box<Units>),
}

enum Framer {
    Sse(SseFramer),
    Lines(Vec<u8>),
    Ws(super::ws::WsFramer),
    Whole(Vec<u8>),
    Envelope {
        framer: EnvelopeFramer,
        payload: Payload,
        codec: Codec,
    },
}

struct Unit {
    body: Vec<u8>,
    masks: Vec<Span>,
    /// Logical bytes of this unit not yet settled.
    pending: usize,
    /// How the (masked) body goes out; `None`: as it is.
    reframe: Option<Reframe>,
}

impl Unit {
    /// Bytes this unit keeps while it waits: its body and what came in.
    fn held(&self) -> usize {
        let original = match &self.reframe {
            Some(Reframe::Envelope { original, .. } | Reframe::WsText { original }) => {
                original.len()
            }
            None => 0,
        };
        self.body.len() + original
    }
}

/// `original`: the bytes as they came (the compressed payload of an
/// envelope, the frames of a WebSocket message), sent when nothing was
/// masked so that a stream no rule touches stays byte-identical (a
/// re-compressed message or a re-framed one would not be).
enum Reframe {
    /// In an envelope with these flags (re-compressed if they say so).
    Envelope { flags: u8, original: Vec<u8> },
    /// As one WebSocket text frame (a JSON message, its frames joined).
    WsText { original: Vec<u8> },
}

#[derive(Clone, Copy)]
struct Origin {
    unit: u64,
    span: Span,
}

#[derive(Default)]
struct Logical {
    /// `text[0]` is the last settled byte, kept as context.
    ctx: bool,
    text: Vec<u8>,
    origin: Vec<Origin>,
    kind: Option<SegmentKind>,
    last_value: Vec<u8>,
}

struct Units {
    framer: Framer,
    queue: VecDeque<Unit>,
    /// Id of `queue[0]`.
    first: u64,
    streams: HashMap<String, Logical>,
}

/// What `settle` decided about a text.
struct Settled {
    /// Bytes before this are final.
    cut: usize,
    /// Ranges (in the text) to mask.
    masks: Vec<(usize, usize)>,
}

/// Chunks larger than this (bulk downloads) hold back the fixed window
/// instead of asking the DFA: throughput matters there, not latency, and
/// a long run of token-like bytes costs the DFA a walk per start.
const PRECISE_CHUNK: usize = 8 << 10;

fn settle(
    scanner: &Scanner,
    applies: &Applies,
    masked: &mut BTreeMap<(usize, String), u64>,
    text: &[u8],
    skip: usize,
    last: bool,
    precise: bool,
) -> Result<Settled, ScanError> {
    let hits = scanner.find(text)?;
    let mut cut = if last {
        text.len()
    } else if precise {
        scanner.first_live(text, skip)
    } else {
        text.len().saturating_sub(scanner.window).max(skip)
    };
    // The first `skip` bytes are context (the last byte already sent), so
    // that `^` and `\b` at the start see what precedes it. A match starting
    // there was settled (not live) when it was sent: it cannot be one now.
    let hits: Vec<_> = hits
        .into_iter()
        .filter(|h| h.start >= skip && applies(h.rule))
        .collect();
    if !last {
        // A match that reaches past the cut may still change: keep it whole.
        for h in &hits {
            if h.end > cut {
                cut = cut.min(h.start);
            }
        }
    }
    let mut masks = Vec::new();
    for h in hits.iter().filter(|h| h.end <= cut) {
        masks.push((h.mask_start, h.mask_end));
        *masked
            .entry((h.rule, scanner.pattern(h.pattern).id.clone()))
            .or_default() += 1;
    }
    Ok(Settled { cut, masks })
}

/// Raw streams: scans what is held, masks in place, and returns the
/// settled bytes, keeping the last one sent as look-behind context.
fn raw_step(
    scanner: &Scanner,
    applies: &Applies,
    masked: &mut BTreeMap<(usize, String), u64>,
    held: &mut Vec<u8>,
    ctx: &mut bool,
    last: bool,
    precise: bool,
) -> Result<Vec<u8>, ScanError> {
    let skip = usize::from(*ctx);
    let s = settle(scanner, applies, masked, held, skip, last, precise)?;
    for (a, b) in s.masks {
        held[a..b].fill(MASK);
    }
    if s.cut <= skip {
        return Ok(Vec::new());
    }
    let out = held[skip..s.cut].to_vec();
    held.drain(..s.cut - 1);
    *ctx = true;
    Ok(out)
}

impl StreamMasker {
    pub fn new(scanner: ScannerRef, framing: Framing, applies: Applies) -> Self {
        let mode = match framing {
            Framing::Raw => Mode::Raw {
                held: Vec::new(),
                ctx: false,
            },
            Framing::Sse => Mode::Units(Box::new(Units::new(Framer::Sse(SseFramer::default())))),
            Framing::Ndjson => Mode::Units(Box::new(Units::new(Framer::Lines(Vec::new())))),
            Framing::WebSocket => Mode::Units(Box::new(Units::new(Framer::Ws(Default::default())))),
            Framing::Json => Mode::Units(Box::new(Units::new(Framer::Whole(Vec::new())))),
            Framing::Envelope { payload, codec } => {
                Mode::Units(Box::new(Units::new(Framer::Envelope {
                    framer: EnvelopeFramer::default(),
                    payload,
                    codec,
                })))
            }
        };
        Self {
            scanner,
            applies,
            mode,
            masked: BTreeMap::new(),
            error: None,
        }
    }

    /// Whether the output has exactly the input's length (raw masking);
    /// framed masking may shorten escapes and re-compress messages.
    pub fn preserves_length(&self) -> bool {
        matches!(self.mode, Mode::Raw { .. })
    }

    /// Masks short values that are each whole on their own (response
    /// header and trailer values: `grpc-message`, error details) in place,
    /// `*` per byte. Percent-encoded values are also read decoded (a
    /// gRPC client shows `grpc-message` decoded) and a match there masks
    /// its escapes. One scan for all of them: they are joined by newlines.
    /// Returns whether anything was masked.
    pub fn mask_values(&mut self, values: &mut [Vec<u8>]) -> Result<bool, ScanError> {
        let scanner = (*self.scanner).as_ref();
        let mut text = Vec::new();
        // Per byte of `text`: (value, start, len) it came from.
        let mut origin: Vec<Option<(usize, usize, usize)>> = Vec::new();
        for (i, v) in values.iter().enumerate() {
            text.extend_from_slice(v);
            origin.extend((0..v.len()).map(|k| Some((i, k, 1))));
            text.push(b'\n');
            origin.push(None);
            if v.contains(&b'%') {
                let mut k = 0;
                while k < v.len() {
                    let hex = (v[k] == b'%')
                        .then(|| v.get(k + 1..k + 3))
                        .flatten()
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    let (byte, len) = hex.map_or((v[k], 1), |b| (b, 3));
                    text.push(byte);
                    origin.push(Some((i, k, len)));
                    k += len;
                }
                text.push(b'\n');
                origin.push(None);
            }
        }
        let s = settle(
            scanner,
            &self.applies,
            &mut self.masked,
            &text,
            0,
            true,
            true,
        )?;
        let masked = !s.masks.is_empty();
        for (a, b) in s.masks {
            for (i, k, len) in origin[a..b].iter().flatten().copied() {
                if let Some(bytes) = values.get_mut(i).and_then(|v| v.get_mut(k..k + len)) {
                    bytes.fill(MASK);
                }
            }
        }
        Ok(masked)
    }

    /// Feeds a chunk; returns what may be sent on now.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<u8>, ScanError> {
        self.step(chunk, false)
    }

    /// End of stream: everything that is left, masked.
    pub fn finish(&mut self) -> Result<Vec<u8>, ScanError> {
        self.step(&[], true)
    }

    /// Whether settled-or-not text is waiting to go out.
    pub fn holds(&self) -> bool {
        match &self.mode {
            Mode::Raw { held, ctx } => held.len() > usize::from(*ctx),
            Mode::Units(u) => !u.queue.is_empty(),
        }
    }

    /// The stream went quiet: what is held is scanned as if the text
    /// ended here and sent (masked where it matches). A long-lived stream
    /// (an MCP or bidi-gRPC session waiting for the client, an SSE event
    /// then silence) must not keep its last words hostage. The texts go on
    /// afterwards; a secret split by a pause longer than the idle delay is
    /// the price, stated in POLICY.md. An incomplete event stays held.
    pub fn flush_idle(&mut self) -> Result<Vec<u8>, ScanError> {
        if let Some(e) = &self.error {
            return Err(ScanError::Failed(e.clone()));
        }
        let scanner = (*self.scanner).as_ref();
        let res = match &mut self.mode {
            Mode::Raw { held, ctx } => raw_step(
                scanner,
                &self.applies,
                &mut self.masked,
                held,
                ctx,
                true,
                true,
            ),
            Mode::Units(u) => {
                let mut ctx = Ctx {
                    scanner,
                    applies: &self.applies,
                    masked: &mut self.masked,
                };
                u.settle_all(&mut ctx).and_then(|_| u.emit())
            }
        };
        if let Err(e) = &res {
            self.error = Some(e.to_string());
        }
        res
    }

    fn step(&mut self, chunk: &[u8], last: bool) -> Result<Vec<u8>, ScanError> {
        if let Some(e) = &self.error {
            return Err(ScanError::Failed(e.clone()));
        }
        let scanner = (*self.scanner).as_ref();
        let mut chunk = chunk;
        let mut spilled = Vec::new();
        if let Mode::Units(u) = &mut self.mode {
            if let Framer::Whole(buf) = &mut u.framer {
                if buf.len() + chunk.len() > MAX_UNIT {
                    // Too big to hold whole: scan it raw from here on.
                    spilled = std::mem::take(buf);
                    spilled.extend_from_slice(chunk);
                    self.mode = Mode::Raw {
                        held: Vec::new(),
                        ctx: false,
                    };
                }
            }
        }
        if !spilled.is_empty() {
            chunk = &spilled;
        }
        let res = match &mut self.mode {
            Mode::Raw { held, ctx } => {
                held.extend_from_slice(chunk);
                let precise = chunk.len() <= PRECISE_CHUNK;
                raw_step(
                    scanner,
                    &self.applies,
                    &mut self.masked,
                    held,
                    ctx,
                    last,
                    precise,
                )
            }
            Mode::Units(u) => u.step(scanner, &self.applies, &mut self.masked, chunk, last),
        };
        if let Err(e) = &res {
            self.error = Some(e.to_string());
        }
        res
    }
}

/// A unit cut from the stream: its body, how it goes out, its segments,
/// and whether it ends every text (a WebSocket message's last piece).
type Cut = (Vec<u8>, Option<Reframe>, Vec<Segment>, bool);

impl Framer {
    /// Takes in a chunk and cuts out the units it completes (all that is
    /// left, at the end of the stream).
    fn cut(&mut self, chunk: &[u8], last: bool) -> Result<Vec<Cut>, ScanError> {
        let mut new_units = Vec::new();
        match self {
            Framer::Sse(f) => sse_units(f, chunk, last, &mut new_units)?,
            Framer::Ws(f) => ws_units(f, chunk, last, &mut new_units)?,
            Framer::Whole(buf) => whole_unit(buf, chunk, last, &mut new_units),
            Framer::Lines(buf) => line_units(buf, chunk, last, &mut new_units)?,
            Framer::Envelope {
                framer,
                payload,
                codec,
            } => envelope_units(framer, *payload, *codec, chunk, last, &mut new_units)?,
        }
        Ok(new_units)
    }
}

/// Server-sent events: one unit per event.
fn sse_units(
    f: &mut SseFramer,
    chunk: &[u8],
    last: bool,
    new_units: &mut Vec<Cut>,
) -> Result<(), ScanError> {
    f.push(chunk);
    while let Some(ev) = f.next_event() {
        let segs = sse::segments(&ev);
        new_units.push((ev, None, segs, false));
    }
    if last {
        let rest = f.take_rest();
        if !rest.is_empty() {
            let segs = sse::segments(&rest);
            new_units.push((rest, None, segs, false));
        }
    } else if f.buffered() > MAX_UNIT {
        return Err(ScanError::TooLarge {
            what: "server-sent event",
            limit: MAX_UNIT,
        });
    }
    Ok(())
}

/// WebSocket frames: one unit per piece of a message.
fn ws_units(
    f: &mut super::ws::WsFramer,
    chunk: &[u8],
    last: bool,
    new_units: &mut Vec<Cut>,
) -> Result<(), ScanError> {
    f.push(chunk);
    let mut pieces = Vec::new();
    f.pieces(MAX_UNIT, &mut pieces)?;
    for p in pieces {
        let reframe = p.original.map(|original| Reframe::WsText { original });
        new_units.push((p.body, reframe, p.segs, p.ends));
    }
    if last {
        f.finish()?;
    }
    Ok(())
}

/// One JSON document: a single unit at the end of the stream.
fn whole_unit(buf: &mut Vec<u8>, chunk: &[u8], last: bool, new_units: &mut Vec<Cut>) {
    buf.extend_from_slice(chunk);
    if last {
        let doc = std::mem::take(buf);
        let segs = match super::json::texts(&doc) {
            Ok(texts) => document_segments(texts),
            Err(_) => line_segments(&doc),
        };
        new_units.push((doc, None, segs, false));
    }
}

/// Newline-delimited JSON: one unit per line.
fn line_units(
    buf: &mut Vec<u8>,
    chunk: &[u8],
    last: bool,
    new_units: &mut Vec<Cut>,
) -> Result<(), ScanError> {
    buf.extend_from_slice(chunk);
    while let Some(i) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=i).collect();
        let segs = line_segments(&line);
        new_units.push((line, None, segs, false));
    }
    if last && !buf.is_empty() {
        let line = std::mem::take(buf);
        let segs = line_segments(&line);
        new_units.push((line, None, segs, false));
    } else if buf.len() > MAX_UNIT {
        return Err(ScanError::TooLarge {
            what: "JSON line",
            limit: MAX_UNIT,
        });
    }
    Ok(())
}

/// gRPC/Connect envelopes: one unit per message, decompressed.
fn envelope_units(
    framer: &mut EnvelopeFramer,
    payload: Payload,
    codec: Codec,
    chunk: &[u8],
    last: bool,
    new_units: &mut Vec<Cut>,
) -> Result<(), ScanError> {
    framer.push(chunk);
    while let Some((flags, body)) = framer.next_message(MAX_UNIT)? {
        let (body, original) = if flags & envelope::COMPRESSED != 0 {
            (codec.decode(&body, MAX_UNIT)?, body)
        } else {
            (body, Vec::new())
        };
        let segs = envelope::segments(&body, payload, flags);
        let reframe = Reframe::Envelope { flags, original };
        new_units.push((body, Some(reframe), segs, false));
    }
    if last {
        framer.finish()?;
    }
    Ok(())
}

impl Units {
    fn new(framer: Framer) -> Self {
        Self {
            framer,
            queue: VecDeque::new(),
            first: 0,
            streams: HashMap::new(),
        }
    }

    fn step(
        &mut self,
        scanner: &Scanner,
        applies: &Applies,
        masked: &mut BTreeMap<(usize, String), u64>,
        chunk: &[u8],
        last: bool,
    ) -> Result<Vec<u8>, ScanError> {
        let mut ctx = Ctx {
            scanner,
            applies,
            masked,
        };
        // Cut the stream into units and take in each one's segments.
        let new_units = self.framer.cut(chunk, last)?;
        for (body, reframe, segs, ends_text) in new_units {
            self.take_unit(&mut ctx, body, reframe, segs)?;
            if ends_text {
                self.settle_all(&mut ctx)?;
            }
        }
        if last {
            self.settle_all(&mut ctx)?;
        }
        let held: usize = self.queue.iter().map(Unit::held).sum();
        if held > MAX_HELD {
            return Err(ScanError::TooLarge {
                what: "held-back stream",
                limit: MAX_HELD,
            });
        }
        self.emit()
    }

    /// Settles every followed text as if it ended here.
    fn settle_all(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ScanError> {
        let keys: Vec<String> = self.streams.keys().cloned().collect();
        for k in keys {
            self.settle_stream(ctx, &k, true)?;
        }
        Ok(())
    }

    fn take_unit(
        &mut self,
        ctx: &mut Ctx<'_>,
        body: Vec<u8>,
        reframe: Option<Reframe>,
        segs: Vec<Segment>,
    ) -> Result<(), ScanError> {
        let id = self.first + self.queue.len() as u64;
        self.queue.push_back(Unit {
            body,
            masks: Vec::new(),
            pending: 0,
            reframe,
        });
        if segs.iter().any(|g| g.kind != SegmentKind::Alone) {
            // A field absent from this unit has ended.
            let present: std::collections::HashSet<&str> =
                segs.iter().map(|g| g.key.as_str()).collect();
            let ended: Vec<String> = self
                .streams
                .iter()
                .filter(|(k, s)| {
                    s.kind == Some(SegmentKind::Field) && !present.contains(k.as_str())
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in ended {
                self.settle_stream(ctx, &k, true)?;
                self.streams.remove(&k);
            }
        }
        for seg in segs {
            let known = self.streams.contains_key(&seg.key);
            let repeat = matches!(seg.kind, SegmentKind::Field | SegmentKind::Typed)
                && self
                    .streams
                    .get(&seg.key)
                    .is_some_and(|s| metadata(&s.last_value, &seg.decoded));
            if repeat {
                self.settle_stream(ctx, &seg.key, true)?;
            }
            let alone = seg.kind == SegmentKind::Alone;
            if alone || repeat || (!known && self.streams.len() >= MAX_STREAMS) {
                // Scanned on its own, settled at once.
                let s = settle(
                    ctx.scanner,
                    ctx.applies,
                    ctx.masked,
                    &seg.decoded,
                    0,
                    true,
                    true,
                )?;
                let unit = self
                    .queue
                    .back_mut()
                    .ok_or(ScanError::Framing("no unit".into()))?;
                for (a, b) in s.masks {
                    unit.masks
                        .extend(seg.origin[a..b].iter().filter(|o| o.len > 0).copied());
                }
                continue;
            }
            let st = self.streams.entry(seg.key.clone()).or_default();
            st.kind = Some(seg.kind);
            if matches!(seg.kind, SegmentKind::Field | SegmentKind::Typed)
                && seg.decoded.len() <= 1024
            {
                st.last_value.clone_from(&seg.decoded);
            } else {
                st.last_value.clear();
            }
            st.text.extend_from_slice(&seg.decoded);
            st.origin
                .extend(seg.origin.iter().map(|&span| Origin { unit: id, span }));
            if let Some(u) = self.queue.back_mut() {
                u.pending += seg.decoded.len();
            }
            self.settle_stream(ctx, &seg.key, false)?;
        }
        Ok(())
    }

    fn settle_stream(&mut self, ctx: &mut Ctx<'_>, key: &str, last: bool) -> Result<(), ScanError> {
        let Some(st) = self.streams.get_mut(key) else {
            return Ok(());
        };
        let skip = usize::from(st.ctx);
        if st.text.len() <= skip {
            return Ok(());
        }
        let s = settle(
            ctx.scanner,
            ctx.applies,
            ctx.masked,
            &st.text,
            skip,
            last,
            true,
        )?;
        for (a, b) in s.masks {
            for o in &st.origin[a..b] {
                if o.span.len > 0 {
                    if let Some(u) = unit_mut(&mut self.queue, self.first, o.unit) {
                        u.masks.push(o.span);
                    }
                }
            }
        }
        if s.cut <= skip {
            return Ok(());
        }
        for o in &st.origin[skip..s.cut] {
            if let Some(u) = unit_mut(&mut self.queue, self.first, o.unit) {
                u.pending = u.pending.saturating_sub(1);
            }
        }
        st.text.drain(..s.cut - 1);
        st.origin.drain(..s.cut - 1);
        st.ctx = true;
        Ok(())
    }

    /// Sends every leading unit whose text is settled.
    fn emit(&mut self) -> Result<Vec<u8>, ScanError> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|u| u.pending == 0) {
            let Some(mut u) = self.queue.pop_front() else {
                break;
            };
            self.first += 1;
            let masked = !u.masks.is_empty();
            let body = render(&u.body, &mut u.masks);
            match u.reframe {
                None => out.extend_from_slice(&body),
                Some(Reframe::WsText { original }) if !masked => out.extend(original),
                Some(Reframe::Envelope { flags, original }) if !masked && !original.is_empty() => {
                    out.extend(envelope::frame(flags, &original)?)
                }
                Some(Reframe::WsText { .. }) => out.extend(super::ws::text_frame(&body)),
                Some(Reframe::Envelope { flags, .. }) => {
                    let payload = if flags & envelope::COMPRESSED != 0 {
                        match &self.framer {
                            Framer::Envelope { codec, .. } => codec.encode(&body)?,
                            Framer::Sse(_)
                            | Framer::Lines(_)
                            | Framer::Ws(_)
                            | Framer::Whole(_) => body,
                        }
                    } else {
                        body
                    };
                    out.extend(envelope::frame(flags, &payload)?);
                }
            }
        }
        Ok(out)
    }
}

/// Whether a field's value, after `prev` in the unit before, is metadata
/// (scanned alone) rather than more of a text: the same value again (an
/// id, a model name), or one of a series (`event_7` after `event_6`: a
/// per-message id, which joined up would read as one long word and be
/// held back). A short value is text either way: a secret streamed one
/// character per message repeats a character now and then (`N` then `N`).
fn metadata(prev: &[u8], value: &[u8]) -> bool {
    if value.len() < MIN_METADATA || prev.len() < MIN_METADATA {
        return false;
    }
    let common = prev.iter().zip(value).take_while(|(a, b)| a == b).count();
    prev == value || common >= SERIES_PREFIX
}

fn unit_mut(queue: &mut VecDeque<Unit>, first: u64, id: u64) -> Option<&mut Unit> {
    let idx = usize::try_from(id.checked_sub(first)?).ok()?;
    queue.get_mut(idx)
}

/// Segments of one JSON document: each text on its own (one document, no
/// joining across units), and the texts that read as one (token arrays,
/// content parts: see `json::runs`) also joined, so a secret spelt a
/// token per element is seen whole while each element keeps its own
/// boundaries.
fn document_segments(texts: Vec<super::json::JsonString>) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::with_capacity(texts.len());
    for run in super::json::runs(&texts) {
        let mut decoded = Vec::new();
        let mut origin = Vec::new();
        for &i in &run {
            decoded.extend_from_slice(&texts[i].decoded);
            origin.extend_from_slice(&texts[i].origin);
        }
        out.push(Segment {
            key: String::new(),
            kind: SegmentKind::Alone,
            decoded,
            origin,
        });
    }
    out.extend(texts.into_iter().map(|s| Segment {
        key: s.key,
        kind: SegmentKind::Alone,
        decoded: s.decoded,
        origin: s.origin,
    }));
    out
}

/// Segments of one NDJSON line: its JSON strings, or the line as text.
fn line_segments(line: &[u8]) -> Vec<Segment> {
    match super::json::stream_texts(line) {
        Ok(strings) => strings
            .into_iter()
            .map(|s| Segment {
                key: s.key,
                kind: if s.content {
                    SegmentKind::Content
                } else {
                    SegmentKind::Field
                },
                decoded: s.decoded,
                origin: s.origin,
            })
            .collect(),
        Err(_) => {
            let body = line.strip_suffix(b"\n").unwrap_or(line);
            vec![Segment {
                key: "line".into(),
                kind: SegmentKind::Content,
                decoded: body.to_vec(),
                origin: (0..body.len())
                    .map(|k| Span {
                        start: k as u32,
                        len: 1,
                    })
                    .collect(),
            }]
        }
    }
}

struct Ctx<'a> {
    scanner: &'a Scanner,
    applies: &'a Applies,
    masked: &'a mut BTreeMap<(usize, String), u64>,
}

/// The body with each masked span replaced by one `*` (a span is one
/// character: a byte, a UTF-8 sequence or an escape such as `\n`).
fn render(body: &[u8], masks: &mut Vec<Span>) -> Vec<u8> {
    if masks.is_empty() {
        return body.to_vec();
    }
    masks.sort_by_key(|s| s.start);
    masks.dedup();
    // A masked JSON number (or byte of a byte array) is rewritten whole so
    // that the document stays valid JSON; only worth a second parse when a
    // mask covers a digit.
    let numeric = masks.iter().any(|m| {
        body.get(m.start as usize)
            .is_some_and(|c| c.is_ascii_digit() || *c == b'-')
    });
    let numbers: HashMap<u32, Vec<u8>> = if numeric {
        super::json::mask_numbers(body, masks)
            .unwrap_or_else(|| sse::mask_numbers(body, masks))
            .into_iter()
            .map(|(span, text)| (span.start, text))
            .collect()
    } else {
        HashMap::new()
    };
    let mut out = Vec::with_capacity(body.len());
    let mut at = 0usize;
    for m in masks.iter() {
        let (s, e) = (m.start as usize, m.start as usize + m.len as usize);
        if s < at || e > body.len() {
            continue;
        }
        out.extend_from_slice(&body[at..s]);
        match numbers.get(&m.start) {
            Some(text) => out.extend_from_slice(text),
            None => out.push(MASK),
        }
        at = e;
    }
    out.extend_from_slice(&body[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::{PatternSpec, Scanner};
    use std::sync::Arc;

    fn scanner() -> Arc<Scanner> {
        Arc::new(
            Scanner::compile(
                vec![
                    PatternSpec::new("github-token", 0, r"\bgh[pousr]_[A-Za-z0-9]{36,251}\b"),
                    PatternSpec::new("aws-access-key", 0, r"\b(?:AKIA|ASIA)[A-Z2-7]{16}\b"),
                ],
                4096,
            )
            .unwrap(),
        )
    }

    const TOKEN: &str = "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8";

    fn run(framing: Framing, chunks: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
        let mut m = StreamMasker::new(scanner(), framing, Box::new(|_| true));
        let mut out = Vec::new();
        let mut sizes = Vec::new();
        for c in chunks {
            let o = m.push(c).unwrap();
            sizes.push(o.len());
            out.extend(o);
        }
        out.extend(m.finish().unwrap());
        (out, sizes)
    }

    /// OpenAI chat-completion chunks carrying `text` a few characters each.
    fn openai_events(text: &str, step: usize) -> Vec<Vec<u8>> {
        let chars: Vec<char> = text.chars().collect();
        let mut evs = Vec::new();
        for part in chars.chunks(step) {
            let s: String = part.iter().collect();
            let v = serde_json::json!({
                "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o",
                "choices": [{"index": 0, "delta": {"content": s}, "finish_reason": null}]
            });
            evs.push(format!("data: {v}\n\n").into_bytes());
        }
        evs.push(b"data: [DONE]\n\n".to_vec());
        evs
    }

    fn content_of(out: &[u8]) -> String {
        let mut text = String::new();
        for ev in String::from_utf8_lossy(out).split("\n\n") {
            let Some(d) = ev.strip_prefix("data: ") else {
                continue;
            };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(d) {
                if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                    text.push_str(c);
                }
            }
        }
        text
    }

    #[test]
    fn token_streamed_as_json_deltas_is_masked() {
        let text = format!("Your token is {TOKEN}, keep it safe.");
        for step in [1, 3, 4, 7] {
            let evs = openai_events(&text, step);
            let (out, _) = run(Framing::Sse, &evs);
            let got = content_of(&out);
            assert_eq!(
                got,
                format!("Your token is {}, keep it safe.", "*".repeat(TOKEN.len())),
                "step {step}"
            );
        }
    }

    #[test]
    fn escapes_are_decoded_and_masks_keep_json_valid() {
        // `\u0041KIA...` is AKIA...: masked, and the escape becomes one `*`.
        let evs = vec![
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"key \\u0041KIAIOS\"}}]}\n\n"
                .to_vec(),
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"FODNN7EXAMPLE\\n\"}}]}\n\n"
                .to_vec(),
        ];
        let (out, _) = run(Framing::Sse, &evs);
        assert_eq!(content_of(&out), format!("key {}\n", "*".repeat(20)));
    }

    #[test]
    fn prose_events_flow_without_waiting_for_the_end() {
        let evs = openai_events("Sure. Here is how to do it. Step one. ", 4);
        let mut m = StreamMasker::new(scanner(), Framing::Sse, Box::new(|_| true));
        let mut flowed = 0;
        for e in &evs[..evs.len() - 1] {
            if !m.push(e).unwrap().is_empty() {
                flowed += 1;
            }
        }
        // The first event waits for the repeated id to show it is metadata;
        // after that each event flows when the next one arrives at most.
        assert!(flowed >= evs.len() - 3, "{flowed} of {}", evs.len());
    }

    #[test]
    fn anthropic_stream_with_pings_between_deltas() {
        let mut evs = vec![b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude\"}}\n\n".to_vec()];
        for (i, part) in ["key: AK", "IAIOSFOD", "NN7EXAMPLE done"]
            .iter()
            .enumerate()
        {
            if i == 1 {
                evs.push(b"event: ping\ndata: {\"type\":\"ping\"}\n\n".to_vec());
            }
            let v = serde_json::json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":part}});
            evs.push(format!("event: content_block_delta\ndata: {v}\n\n").into_bytes());
        }
        let (out, _) = run(Framing::Sse, &evs);
        let s = String::from_utf8(out).unwrap();
        assert!(!s.contains("IOSFOD") && !s.contains("NN7EXAMPLE"), "{s}");
        assert!(
            s.contains("\"key: **\"") && s.contains("\"********** done\""),
            "{s}"
        );
    }

    #[test]
    fn grpc_messages_split_token_is_masked_and_framing_valid() {
        let mk = |text: &str| {
            let mut m = vec![0x0a, text.len() as u8];
            m.extend_from_slice(text.as_bytes());
            envelope::frame(0, &m).unwrap()
        };
        let msgs = [
            mk("token ghp_A1b2C3d4E5f6G7h8"),
            mk("I9j0K1l2M3n4O5p6Q7r8 ok"),
        ];
        let stream: Vec<u8> = msgs.concat();
        for split in [3, 10, 33, 40] {
            let (out, _) = run(
                Framing::Envelope {
                    payload: Payload::Proto,
                    codec: Codec::Identity,
                },
                &[stream[..split].to_vec(), stream[split..].to_vec()],
            );
            assert_eq!(out.len(), stream.len());
            let s = String::from_utf8_lossy(&out);
            assert!(s.contains("token ****") && s.contains("**** ok"), "{s}");
            assert!(!s.contains("I9j0"), "{s}");
        }
    }

    #[test]
    fn gzip_envelopes_are_decoded_masked_and_recompressed() {
        let mut m = vec![0x0a, 26];
        m.extend_from_slice(b"id AKIAIOSFODNN7EXAMPLE ok");
        let z = Codec::Gzip.encode(&m).unwrap();
        let stream = envelope::frame(envelope::COMPRESSED, &z).unwrap();
        let (out, _) = run(
            Framing::Envelope {
                payload: Payload::Proto,
                codec: Codec::Gzip,
            },
            &[stream],
        );
        let mut f = EnvelopeFramer::default();
        f.push(&out);
        let (flags, p) = f.next_message(1 << 20).unwrap().unwrap();
        assert_eq!(flags, envelope::COMPRESSED);
        let plain = Codec::Gzip.decode(&p, 1 << 20).unwrap();
        assert!(plain.ends_with(b"id ******************** ok"));
    }

    #[test]
    fn raw_stream_masks_in_place_and_holds_only_live_tails() {
        let text = format!("header {TOKEN} trailer");
        let b = text.as_bytes();
        let (out, sizes) = run(Framing::Raw, &[b[..12].to_vec(), b[12..].to_vec()]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("header {} trailer", "*".repeat(TOKEN.len()))
        );
        // "header " flowed at once; the token prefix was held.
        assert_eq!(sizes[0], 7);
    }

    #[test]
    fn ndjson_stream_token_split_across_lines_is_masked() {
        let lines: Vec<Vec<u8>> = ["token ghp_A1b2C3d4E5f6G7h8", "I9j0K1l2M3n4O5p6Q7r8 ok"]
            .iter()
            .map(|t| {
                format!(
                    "{}\n",
                    serde_json::json!({"model": "m", "response": t, "done": false})
                )
                .into_bytes()
            })
            .collect();
        let (out, _) = run(Framing::Ndjson, &lines);
        let s = String::from_utf8(out).unwrap();
        assert!(!s.contains("I9j0") && !s.contains("C3d4"), "{s}");
        for l in s.lines() {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
    }

    #[test]
    fn websocket_frames_mask_a_token_split_across_frames_in_place() {
        let frame = |fin: bool, op: u8, p: &[u8]| {
            let mut f = vec![(u8::from(fin) << 7) | op, p.len() as u8];
            f.extend_from_slice(p);
            f
        };
        let stream = [
            frame(false, 1, b"token ghp_A1b2C3d4E5f6G7h8"),
            frame(true, 9, b"ping"),
            frame(true, 0, b"I9j0K1l2M3n4O5p6Q7r8 ok"),
        ]
        .concat();
        let (out, _) = run(
            Framing::WebSocket,
            &[stream[..20].to_vec(), stream[20..].to_vec()],
        );
        assert_eq!(out.len(), stream.len(), "frames keep their length");
        let s = String::from_utf8_lossy(&out);
        assert!(
            s.contains("token ****") && s.contains("ping") && s.contains("**** ok"),
            "{s}"
        );
        assert!(!s.contains("I9j0") && !s.contains("C3d4"), "{s}");
    }

    /// Connect/gRPC messages carrying `text` `step` characters each, in
    /// field 1 (`nested`: in field 1 of a message in field 2), with the
    /// chunk's index and a model name, as connect-node sends them.
    fn connect_messages(text: &str, step: usize, json: bool, nested: bool) -> Vec<u8> {
        let chars: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        for (seq, part) in chars.chunks(step).enumerate() {
            let s: String = part.iter().collect();
            let body = if json {
                let v = if nested {
                    serde_json::json!({"inner": {"text": s}, "index": seq, "model": "fake-model-1"})
                } else {
                    serde_json::json!({"text": s, "index": seq, "model": "fake-model-1"})
                };
                v.to_string().into_bytes()
            } else {
                let pb = |f: u8, b: &[u8]| [&[(f << 3) | 2, b.len() as u8][..], b].concat();
                let mut m = if nested {
                    pb(2, &pb(1, s.as_bytes()))
                } else {
                    pb(1, s.as_bytes())
                };
                m.extend([0x18, seq as u8]);
                m.extend(pb(4, b"fake-model-1"));
                m
            };
            out.extend(envelope::frame(0, &body).unwrap());
        }
        out.extend(envelope::frame(envelope::END_STREAM, b"{}").unwrap());
        out
    }

    fn connect_text(out: &[u8], json: bool) -> String {
        let mut f = EnvelopeFramer::default();
        f.push(out);
        let mut text = String::new();
        while let Some((flags, p)) = f.next_message(1 << 20).unwrap() {
            if flags & envelope::END_STREAM != 0 {
                continue;
            }
            if json {
                let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
                let t = v["text"].as_str().or(v["inner"]["text"].as_str());
                text.push_str(t.unwrap());
            } else {
                let segs = envelope::segments(&p, Payload::Proto, 0);
                let t = segs.iter().find(|s| s.key != "pb/4").unwrap();
                text.push_str(std::str::from_utf8(&t.decoded).unwrap());
            }
        }
        text
    }

    #[test]
    fn connect_messages_of_any_size_and_codec_join_per_field() {
        // A doubled letter (`NN`, `SS`) repeats a one-character value.
        let aws = "AKIAIOSFODNN7EXAMPLS";
        let tok = "ghp_A1b2C3d4E5f6G7h8I9j0KK1l2M3n4O5p6Q7r";
        let text = format!("Keys: {aws} and {tok}. Keep keep-me-4242 intact.");
        let want = text
            .replace(aws, &"*".repeat(aws.len()))
            .replace(tok, &"*".repeat(tok.len()));
        for json in [true, false] {
            for nested in [false, true] {
                for step in [1, 2, 7] {
                    let stream = connect_messages(&text, step, json, nested);
                    let payload = if json { Payload::Json } else { Payload::Proto };
                    let chunks: Vec<Vec<u8>> = stream.chunks(13).map(<[u8]>::to_vec).collect();
                    let (out, _) = run(
                        Framing::Envelope {
                            payload,
                            codec: Codec::Identity,
                        },
                        &chunks,
                    );
                    assert_eq!(
                        connect_text(&out, json),
                        want,
                        "json {json} nested {nested} step {step}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_heartbeat_between_protobuf_messages_does_not_end_the_text() {
        let pb = |f: u8, b: &[u8]| [&[(f << 3) | 2, b.len() as u8][..], b].concat();
        let mut stream = envelope::frame(0, &pb(1, b"token ghp_A1b2C3d4E5f6G7h8")).unwrap();
        // Another case of the oneof: no field 1.
        stream.extend(envelope::frame(0, &pb(5, &pb(1, b"working"))).unwrap());
        stream.extend(envelope::frame(0, &pb(1, b"I9j0K1l2M3n4O5p6Q7r8 ok")).unwrap());
        let (out, _) = run(
            Framing::Envelope {
                payload: Payload::Proto,
                codec: Codec::Identity,
            },
            &[stream],
        );
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("token ****") && s.contains("**** ok"), "{s}");
        assert!(!s.contains("C3d4") && !s.contains("I9j0"), "{s}");
        assert!(s.contains("working"), "{s}");
    }

    #[test]
    fn unmasked_compressed_messages_go_out_as_they_came() {
        let mut m = vec![0x0a, 11];
        m.extend_from_slice(b"hello there");
        let z = Codec::Gzip.encode(&m).unwrap();
        let mut z2 = z.clone();
        z2[9] = 0x03; // another OS byte: same data, other bytes
        let stream = envelope::frame(envelope::COMPRESSED, &z2).unwrap();
        let (out, _) = run(
            Framing::Envelope {
                payload: Payload::Proto,
                codec: Codec::Gzip,
            },
            std::slice::from_ref(&stream),
        );
        assert_eq!(out, stream);
    }

    fn ws_text(fin: bool, op: u8, p: &[u8]) -> Vec<u8> {
        let mut f = vec![(u8::from(fin) << 7) | op];
        if p.len() < 126 {
            f.push(p.len() as u8);
        } else {
            f.push(126);
            f.extend((p.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(p);
        f
    }

    /// The payloads of the data messages in a server's frame stream.
    fn ws_messages(mut b: &[u8]) -> Vec<Vec<u8>> {
        let mut msgs = Vec::new();
        let mut cur = Vec::new();
        while let Some(h) = crate::scan::ws::parse_header(b, 1 << 20).unwrap() {
            if !h.is_control() {
                cur.extend_from_slice(&b[h.header_len..h.total()]);
                if h.fin {
                    msgs.push(std::mem::take(&mut cur));
                }
            }
            b = &b[h.total()..];
        }
        assert!(b.is_empty(), "frames end where the stream ends");
        msgs
    }

    #[test]
    fn websocket_json_deltas_join_and_masks_keep_json_and_frames_valid() {
        let text = format!("Your token is {TOKEN}, keep it.");
        let mut parts: Vec<String> = text
            .as_bytes()
            .chunks(4)
            .map(|p| String::from_utf8(p.to_vec()).unwrap())
            .collect();
        // An escape decodes before joining: `\u0041KIA...` is AKIA....
        parts.push(r" key \u0041KIAIOSFOD".into());
        parts.push("NN7EXAMPLE ok".into());
        let mut stream = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let v = format!(
                r#"{{"type":"response.text.delta","event_id":"event_{i}","output_index":0,"content_index":0,"delta":"{part}"}}"#
            );
            if i == 3 {
                // Fragmented, with a ping between the fragments.
                let (a, b) = v.as_bytes().split_at(10);
                stream.extend(ws_text(false, 1, a));
                stream.extend(ws_text(true, 9, b"ping"));
                stream.extend(ws_text(true, 0, b));
            } else {
                stream.extend(ws_text(true, 1, v.as_bytes()));
            }
        }
        let chunks: Vec<Vec<u8>> = stream.chunks(50).map(<[u8]>::to_vec).collect();
        let (out, _) = run(Framing::WebSocket, &chunks);
        let mut got = String::new();
        for m in ws_messages(&out) {
            let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
            got.push_str(v["delta"].as_str().unwrap());
        }
        assert_eq!(
            got,
            format!(
                "Your token is {}, keep it. key {} ok",
                "*".repeat(TOKEN.len()),
                "*".repeat(20)
            )
        );
        assert!(String::from_utf8_lossy(&out).contains("ping"));
    }

    #[test]
    fn websocket_json_deltas_flow_while_ids_change_per_message() {
        let mut m = StreamMasker::new(scanner(), Framing::WebSocket, Box::new(|_| true));
        let words = "Sure, here is how to do it, step by step, in order. ";
        let mut sent = 0;
        let n = words.len() / 4;
        for (i, part) in words.as_bytes().chunks(4).enumerate() {
            let v = serde_json::json!({
                "type": "response.text.delta", "event_id": format!("event_{i}"),
                "response_id": "resp_1", "output_index": 0, "content_index": 0,
                "delta": std::str::from_utf8(part).unwrap(),
            });
            let out = m
                .push(&crate::scan::ws::text_frame(v.to_string().as_bytes()))
                .unwrap();
            sent += ws_messages(&out).len();
        }
        // A per-message id joined up would be one long live word.
        assert!(sent + 2 >= n, "{sent} of {n} messages flowed");
        assert!(metadata(b"event_6", b"event_7") && metadata(b"resp_1", b"resp_1"));
        assert!(!metadata(b"N", b"N") && !metadata(b"A1b2C3d", b"E4f5G6h"));
    }

    #[test]
    fn websocket_json_without_secrets_is_byte_identical() {
        let mut stream = ws_text(false, 1, br#"{"type":"x","del"#);
        stream.extend(ws_text(true, 0, br#"ta":"hello"}"#));
        stream.extend(ws_text(true, 1, br#"{"type":"x","delta":" world"}"#));
        let (out, _) = run(Framing::WebSocket, &[stream.clone()]);
        assert_eq!(out, stream);
    }

    #[test]
    fn json_documents_are_scanned_unescaped_and_big_ones_raw() {
        let doc = br#"{"choices":[{"message":{"content":"key \u0041KIAIOSFODNN7EXAMPLE\n"}}]}"#;
        let (out, sizes) = run(Framing::Json, &[doc[..20].to_vec(), doc[20..].to_vec()]);
        assert_eq!(sizes, vec![0, 0], "held until the document is whole");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            format!("key {}\n", "*".repeat(20))
        );
        let mut big = b"{\"a\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_UNIT));
        big.extend_from_slice(format!(" {TOKEN} \"}}").as_bytes());
        let (out, _) = run(Framing::Json, &[big[..1000].to_vec(), big[1000..].to_vec()]);
        assert_eq!(out.len(), big.len());
        assert!(!String::from_utf8_lossy(&out).contains(TOKEN));
    }

    #[test]
    fn json_documents_mask_token_arrays_byte_arrays_numbers_and_keys() {
        // A chat completion with logprobs: the answer is masked in
        // `content`, but the tokens and their bytes spell it again.
        let toks = ["key ", "AK", "IAIO", "SFOD", "NN7E", "XAMP", "LE"];
        let logprobs: Vec<serde_json::Value> = toks
            .iter()
            .map(|t| serde_json::json!({"token": t, "logprob": -0.1, "bytes": t.as_bytes()}))
            .collect();
        let doc = serde_json::json!({
            "choices": [{"index": 0, "message": {"content": toks.concat()},
                         "logprobs": {"content": logprobs}}],
            "card": 4111111111111111u64,
            "by_key": {"AKIAIOSFODNN7EXAMPLE": true},
            "n": 3,
        })
        .to_string();
        let cards = Arc::new(
            Scanner::compile(
                vec![
                    PatternSpec::new("aws-access-key", 0, r"\b(?:AKIA|ASIA)[A-Z2-7]{16}\b"),
                    PatternSpec::new("card", 0, r"\b4[0-9]{15}\b"),
                ],
                4096,
            )
            .unwrap(),
        );
        let mut m = StreamMasker::new(cards, Framing::Json, Box::new(|_| true));
        let mut out = m.push(doc.as_bytes()).unwrap();
        out.extend(m.finish().unwrap());
        let v: serde_json::Value = serde_json::from_slice(&out).expect("still JSON");
        let lp = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
        let tokens: String = lp.iter().map(|t| t["token"].as_str().unwrap()).collect();
        assert_eq!(tokens, format!("key {}", "*".repeat(20)));
        let bytes: Vec<u8> = lp
            .iter()
            .flat_map(|t| t["bytes"].as_array().unwrap().clone())
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), tokens);
        assert_eq!(
            v["card"],
            "*".repeat(16),
            "a masked number becomes a masked string"
        );
        assert!(v["by_key"].get("AKIAIOSFODNN7EXAMPLE").is_none(), "{v}");
        assert_eq!(v["by_key"]["*".repeat(20)], true);
        assert_eq!(v["n"], 3, "numbers that match nothing stay numbers");
        assert_eq!(v["choices"][0]["logprobs"]["content"][0]["logprob"], -0.1);
        // Nothing to mask: byte for byte.
        let plain = br#"{"a": [1, 2, 300], "b": {"x y": 12.5e3}, "c": [104, 105]}"#;
        let (out, _) = run(Framing::Json, &[plain.to_vec()]);
        assert_eq!(out, plain);
    }

    #[test]
    fn streamed_logprobs_tokens_and_bytes_are_masked_and_stay_json() {
        let toks = ["key ", "AK", "IAIO", "SFOD", "NN7E", "XAMP", "LE", " ok"];
        let mut evs: Vec<Vec<u8>> = toks
            .iter()
            .map(|t| {
                let v = serde_json::json!({"id": "c1", "choices": [{"index": 0,
                    "delta": {"content": t},
                    "logprobs": {"content": [{"token": t, "logprob": -0.5, "bytes": t.as_bytes()}]}}]});
                format!("data: {v}\n\n").into_bytes()
            })
            .collect();
        evs.push(b"data: [DONE]\n\n".to_vec());
        let (out, _) = run(Framing::Sse, &evs);
        let (mut content, mut tokens, mut bytes) = (String::new(), String::new(), Vec::new());
        for ev in String::from_utf8(out).unwrap().split("\n\n") {
            let Some(d) = ev.strip_prefix("data: ") else {
                continue;
            };
            if d == "[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(d).expect("events stay JSON");
            let c = &v["choices"][0];
            content.push_str(c["delta"]["content"].as_str().unwrap());
            let lp = &c["logprobs"]["content"][0];
            tokens.push_str(lp["token"].as_str().unwrap());
            bytes.extend(
                lp["bytes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8),
            );
        }
        let want = format!("key {} ok", "*".repeat(20));
        assert_eq!(content, want);
        assert_eq!(tokens, want);
        assert_eq!(String::from_utf8(bytes).unwrap(), want);
    }

    #[test]
    fn header_values_are_masked_raw_and_percent_decoded() {
        let mut m = StreamMasker::new(scanner(), Framing::Raw, Box::new(|_| true));
        let mut values = vec![
            b"application/grpc".to_vec(),
            b"bad key %41KIAIOSFODNN7EXAMPLE%20here".to_vec(),
            format!("token={TOKEN}").into_bytes(),
        ];
        assert!(m.mask_values(&mut values).unwrap());
        assert_eq!(values[0], b"application/grpc");
        assert_eq!(
            String::from_utf8_lossy(&values[1]),
            format!("bad key {}%20here", "*".repeat(22))
        );
        assert_eq!(
            String::from_utf8_lossy(&values[2]),
            format!("token={}", "*".repeat(TOKEN.len()))
        );
        assert_eq!(m.masked.values().sum::<u64>(), 2);
    }

    #[test]
    fn an_idle_stream_releases_its_held_tail_masked() {
        let mut m = StreamMasker::new(scanner(), Framing::Sse, Box::new(|_| true));
        let evs = openai_events("the key is AKIAQ5TESTKEYSLUICE7", 40);
        let first = m.push(&evs[0]).unwrap();
        assert!(first.is_empty(), "the live tail is held");
        assert!(m.holds());
        let out = String::from_utf8(m.flush_idle().unwrap()).unwrap();
        assert!(out.contains("the key is ********************"), "{out}");
        assert!(!m.holds());
        // The stream goes on afterwards.
        let more = m.push(&evs[1]).unwrap();
        assert!(String::from_utf8_lossy(&more).contains("[DONE]"));
    }

    #[test]
    fn oversized_event_fails_visibly() {
        let mut m = StreamMasker::new(scanner(), Framing::Sse, Box::new(|_| true));
        let big = vec![b'a'; MAX_UNIT + 1];
        assert!(m.push(b"data: ").is_ok());
        assert!(m.push(&big).is_err());
        assert!(m.finish().is_err(), "a failed stream stays failed");
    }
}
