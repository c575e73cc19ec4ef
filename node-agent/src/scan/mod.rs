//! The scanning engine. All patterns of a policy are compiled once into a
//! Hyperscan block database (prefilter: which patterns occur at all), then
//! each hit is confirmed with the `regex` crate to get exact spans (the
//! Nosey Parker approach: Hyperscan without start-of-match is fastest).
//!
//! Streams (responses) go through `stream::StreamMasker`, which holds back
//! only what a match could still grow into (`live`) and, for framed
//! streams (`sse`, `envelope`), scans the decoded text of each field
//! (`json`, protobuf strings) joined across events and messages.
use std::sync::Mutex;

use hyperscan::prelude::*;

pub mod envelope;
pub mod json;
pub mod live;
pub mod sse;
pub mod stream;
pub use stream::{Framing, StreamMasker};

/// The byte that replaces masked bytes.
pub const MASK: u8 = b'*';

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("pattern `{id}`: {message}")]
    Pattern { id: String, message: String },
    #[error("pattern `{id}` can match an unbounded number of bytes; bound its repeats (e.g. `{{1,256}}` instead of `+`)")]
    Unbounded { id: String },
    #[error(
        "pattern `{id}` can match up to {len} bytes, more than the {max}-byte hold-back limit"
    )]
    TooLong { id: String, len: usize, max: usize },
    #[error("hyperscan: {0}")]
    Hyperscan(String),
    #[error("malformed stream: {0}")]
    Framing(String),
    #[error("cannot decode: {0}")]
    Decode(String),
    #[error("{what} larger than {limit} bytes")]
    TooLarge { what: &'static str, limit: usize },
    #[error("stream scan failed earlier: {0}")]
    Failed(String),
}

#[derive(Clone, Debug)]
pub struct PatternSpec {
    /// Stable id for records (e.g. `aws-access-key`).
    pub id: String,
    /// Index of the policy rule this pattern belongs to.
    pub rule: usize,
    pub regex: String,
    pub caseless: bool,
    /// Only a hit whose digits pass the Luhn check counts (card numbers).
    pub luhn: bool,
    /// A cheaper expression for Hyperscan that every match of `regex`
    /// also matches (e.g. the part around a distinctive `@`); `regex`
    /// still decides and gives the spans.
    pub prefilter: Option<String>,
}

struct Compiled {
    spec: PatternSpec,
    re: regex::bytes::Regex,
}

/// A confirmed match. `start..end` is the whole match (what decides
/// whether it is final in a stream); `mask_start..mask_end` is the part
/// that is the secret and gets masked (a pattern's `secret` group, else
/// the whole match).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    pub pattern: usize,
    pub rule: usize,
    pub start: usize,
    pub end: usize,
    pub mask_start: usize,
    pub mask_end: usize,
}

pub struct Scanner {
    db: Option<BlockDatabase>,
    patterns: Vec<Compiled>,
    scratch: Mutex<Vec<Scratch>>,
    /// Longest possible match over all patterns (the hold-back window).
    pub window: usize,
    /// Which stream tails could still become a match.
    live: live::Liveness,
}

/// Longest match of a pattern, from its parsed form.
fn max_len(spec: &PatternSpec) -> Result<Option<usize>, ScanError> {
    let hir = regex_syntax::ParserBuilder::new()
        .case_insensitive(spec.caseless)
        .unicode(false)
        .utf8(false)
        .build()
        .parse(&spec.regex)
        .map_err(|e| ScanError::Pattern {
            id: spec.id.clone(),
            message: e.to_string(),
        })?;
    Ok(hir.properties().maximum_len())
}

impl Scanner {
    pub fn compile(specs: Vec<PatternSpec>, max_window: usize) -> Result<Self, ScanError> {
        let mut window = 0;
        let mut patterns = Vec::with_capacity(specs.len());
        for spec in specs {
            let len = max_len(&spec)?.ok_or_else(|| ScanError::Unbounded {
                id: spec.id.clone(),
            })?;
            if len > max_window {
                return Err(ScanError::TooLong {
                    id: spec.id.clone(),
                    len,
                    max: max_window,
                });
            }
            window = window.max(len);
            let re = regex::bytes::RegexBuilder::new(&spec.regex)
                .case_insensitive(spec.caseless)
                .unicode(false)
                .build()
                .map_err(|e| ScanError::Pattern {
                    id: spec.id.clone(),
                    message: e.to_string(),
                })?;
            patterns.push(Compiled { spec, re });
        }
        let db = if patterns.is_empty() {
            None
        } else {
            let hs: Patterns = patterns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut flags = CompileFlags::SINGLEMATCH;
                    if c.spec.caseless {
                        flags |= CompileFlags::CASELESS;
                    }
                    Pattern {
                        expression: c
                            .spec
                            .prefilter
                            .clone()
                            .unwrap_or_else(|| c.spec.regex.clone()),
                        flags,
                        id: Some(i),
                        ext: Default::default(),
                        som: None,
                    }
                })
                .collect();
            Some(hs.build::<hyperscan::Block>().map_err(|e| {
                // Name the pattern Hyperscan rejected when it says which.
                ScanError::Hyperscan(e.to_string())
            })?)
        };
        let live = live::Liveness::build(
            &patterns
                .iter()
                .map(|c| (c.spec.regex.clone(), c.spec.caseless))
                .collect::<Vec<_>>(),
        )?;
        Ok(Self {
            db,
            patterns,
            scratch: Mutex::new(Vec::new()),
            window,
            live,
        })
    }

    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Where the hold-back of a stream ending with `data` must begin: the
    /// earliest start of a match that more bytes could complete or extend.
    pub fn first_live(&self, data: &[u8]) -> usize {
        self.live
            .first_live(data, data.len().saturating_sub(self.window))
    }

    pub fn pattern(&self, i: usize) -> &PatternSpec {
        &self.patterns[i].spec
    }

    /// All confirmed hits in `data`, with exact spans.
    pub fn find(&self, data: &[u8]) -> Result<Vec<Hit>, ScanError> {
        let Some(db) = &self.db else {
            return Ok(Vec::new());
        };
        let scratch = {
            let mut pool = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            pool.pop()
        };
        let scratch = match scratch {
            Some(s) => s,
            None => db
                .alloc_scratch()
                .map_err(|e| ScanError::Hyperscan(e.to_string()))?,
        };
        let mut seen = Vec::new();
        let res = db.scan(
            data,
            &scratch,
            |id: u32, _from: u64, _to: u64, _flags: u32| {
                seen.push(id as usize);
                Matching::Continue
            },
        );
        self.scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(scratch);
        res.map_err(|e| ScanError::Hyperscan(e.to_string()))?;
        seen.sort_unstable();
        seen.dedup();
        let mut hits = Vec::new();
        for i in seen {
            let c = &self.patterns[i];
            for m in c.re.find_iter(data) {
                if c.spec.luhn && !luhn(m.as_bytes()) {
                    continue;
                }
                hits.push(Hit {
                    pattern: i,
                    rule: c.spec.rule,
                    start: m.start(),
                    end: m.end(),
                    mask_start: m.start(),
                    mask_end: m.end(),
                });
            }
        }
        Ok(hits)
    }
}

/// Luhn check over the digits of a candidate card number.
pub fn luhn(candidate: &[u8]) -> bool {
    let digits: Vec<u32> = candidate
        .iter()
        .filter(|b| b.is_ascii_digit())
        .map(|b| u32::from(b - b'0'))
        .collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

impl AsRef<Scanner> for Scanner {
    fn as_ref(&self) -> &Scanner {
        self
    }
}

/// Something that holds the scanner (the policy in force, shared).
pub type ScannerRef = std::sync::Arc<dyn AsRef<Scanner> + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    fn scanner() -> std::sync::Arc<Scanner> {
        std::sync::Arc::new(
            Scanner::compile(
                vec![
                    PatternSpec {
                        id: "aws-access-key".into(),
                        rule: 0,
                        regex: r"\b(?:AKIA|ASIA)[A-Z2-7]{16}\b".into(),
                        caseless: false,
                        luhn: false,
                        prefilter: None,
                    },
                    PatternSpec {
                        id: "card".into(),
                        rule: 1,
                        regex: r"\b(?:\d[ -]?){12,18}\d\b".into(),
                        caseless: false,
                        luhn: true,
                        prefilter: None,
                    },
                ],
                4096,
            )
            .unwrap(),
        )
    }

    #[test]
    fn card_numbers_need_luhn() {
        let s = scanner();
        let hits = s
            .find(b"valid 4111 1111 1111 1111 invalid 4111 1111 1111 1112")
            .unwrap();
        assert_eq!(hits.len(), 1);
        assert!(luhn(b"4111111111111111"));
        assert!(!luhn(b"4111111111111112"));
    }

    #[test]
    fn unbounded_and_bad_patterns_are_refused_clearly() {
        let e = Scanner::compile(
            vec![PatternSpec {
                id: "greedy".into(),
                rule: 0,
                regex: "password=.+".into(),
                caseless: false,
                luhn: false,
                prefilter: None,
            }],
            4096,
        )
        .err()
        .unwrap();
        assert!(
            e.to_string().contains("greedy") && e.to_string().contains("unbounded"),
            "{e}"
        );
        let e = Scanner::compile(
            vec![PatternSpec {
                id: "broken".into(),
                rule: 0,
                regex: "(unclosed".into(),
                caseless: false,
                luhn: false,
                prefilter: None,
            }],
            4096,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("broken"), "{e}");
    }
}
