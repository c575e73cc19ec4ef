//! Streaming, length-preserving masking with a hold-back window.
use std::collections::BTreeMap;

use super::{Hit, ScannerRef, MASK};

/// Where the unemitted raw bytes begin, for SSE parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineState {
    LineStart,
    InData,
    InOther,
}

/// Masks a byte stream as it flows. Feed chunks with `push`, emit what it
/// returns; call `finish` at the end of the stream.
pub struct StreamMasker {
    scanner: ScannerRef,
    /// Which rules mask in this stream.
    applies: Box<dyn Fn(usize) -> bool + Send + Sync>,
    held: Vec<u8>,
    sse: bool,
    state: LineState,
    /// Masked spans per (rule index, pattern id), for the record.
    pub masked: BTreeMap<(usize, String), u64>,
    pub error: Option<String>,
}

impl StreamMasker {
    pub fn new(
        scanner: ScannerRef,
        sse: bool,
        applies: Box<dyn Fn(usize) -> bool + Send + Sync>,
    ) -> Self {
        Self {
            scanner,
            applies,
            held: Vec::new(),
            sse,
            state: LineState::LineStart,
            masked: BTreeMap::new(),
            error: None,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.held.extend_from_slice(chunk);
        self.step(false)
    }

    pub fn finish(&mut self) -> Vec<u8> {
        self.step(true)
    }

    /// SSE: the concatenated `data:` bytes to scan and, for each, its index
    /// in `held` (raw streams are scanned in place, no projection).
    fn project_sse(&self) -> (Vec<u8>, Vec<usize>, Option<usize>) {
        let mut logical = Vec::new();
        let mut map = Vec::new();
        let mut state = self.state;
        let mut i = 0;
        // Start of an incomplete line we cannot classify yet.
        let mut undecided = None;
        while i < self.held.len() {
            match state {
                LineState::LineStart => {
                    let rest = &self.held[i..];
                    if rest.starts_with(b"data:") {
                        i += 5;
                        if self.held.get(i) == Some(&b' ') {
                            i += 1;
                        }
                        state = LineState::InData;
                    } else if b"data:".starts_with(rest) {
                        undecided = Some(i);
                        break;
                    } else {
                        state = LineState::InOther;
                    }
                }
                LineState::InData => {
                    let b = self.held[i];
                    if b == b'\n' {
                        state = LineState::LineStart;
                    } else if b != b'\r' {
                        logical.push(b);
                        map.push(i);
                    }
                    i += 1;
                }
                LineState::InOther => {
                    if self.held[i] == b'\n' {
                        state = LineState::LineStart;
                    }
                    i += 1;
                }
            }
        }
        (logical, map, undecided)
    }

    fn step(&mut self, last: bool) -> Vec<u8> {
        let (projected, map, undecided) = if self.sse {
            let (l, m, u) = self.project_sse();
            (Some(l), Some(m), u)
        } else {
            (None, None, None)
        };
        let logical: &[u8] = projected.as_deref().unwrap_or(&self.held);
        let logical_len = logical.len();
        // Logical index -> index in `held`.
        let raw = |i: usize| map.as_ref().map_or(i, |m| m[i]);
        let scanner = (*self.scanner).as_ref();
        let hits = match scanner.find(logical) {
            Ok(h) => h,
            Err(e) => {
                // Fail closed: an unscannable stream is not passed on.
                self.error = Some(e.to_string());
                self.held.clear();
                return Vec::new();
            }
        };
        let window = scanner.window;
        // Logical position up to which matches are final.
        let mut cut = if last {
            logical_len
        } else {
            logical_len.saturating_sub(window)
        };
        let hits: Vec<Hit> = hits
            .into_iter()
            .filter(|h| (self.applies)(h.rule))
            .collect();
        if !last {
            for h in &hits {
                if h.start < cut && h.end > cut {
                    cut = h.start;
                }
            }
        }
        for h in hits.iter().filter(|h| h.end <= cut) {
            for i in h.mask_start..h.mask_end {
                self.held[raw(i)] = MASK;
            }
            *self
                .masked
                .entry((h.rule, scanner.pattern(h.pattern).id.clone()))
                .or_default() += 1;
        }
        // Raw bytes to emit: everything before the first logical byte kept.
        let raw_cut = if last {
            self.held.len()
        } else if cut < logical_len {
            raw(cut)
        } else {
            // Every logical byte is settled: keep only an undecided tail.
            undecided.unwrap_or(self.held.len())
        };
        let raw_cut = match undecided {
            Some(u) if !last => raw_cut.min(u),
            _ => raw_cut,
        };
        let out: Vec<u8> = self.held.drain(..raw_cut).collect();
        // Line state at the new start of `held`.
        self.state = if !self.sse || out.is_empty() {
            self.state
        } else {
            line_state_after(self.state, &out)
        };
        out
    }
}

/// SSE line state after consuming `bytes` from `state`.
fn line_state_after(mut state: LineState, bytes: &[u8]) -> LineState {
    let mut i = 0;
    while i < bytes.len() {
        match state {
            LineState::LineStart => {
                if bytes[i..].starts_with(b"data:") {
                    i += 5;
                    state = LineState::InData;
                    // The optional space is consumed with the prefix.
                    if bytes.get(i) == Some(&b' ') {
                        i += 1;
                    }
                    continue;
                }
                state = LineState::InOther;
            }
            LineState::InData | LineState::InOther => {
                if bytes[i] == b'\n' {
                    state = LineState::LineStart;
                }
                i += 1;
            }
        }
    }
    state
}
