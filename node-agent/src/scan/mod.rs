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

pub mod charset;
pub mod envelope;
pub mod json;
pub mod live;
pub mod sse;
pub mod stream;
pub mod validate;
pub mod ws;
pub use stream::{Framing, StreamMasker};
pub use validate::Validator;

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
    /// Only a hit the validator accepts counts (card numbers, IBANs,
    /// phone numbers...); it may shorten the hit.
    pub validate: Option<Validator>,
    /// The country national phone numbers are read in.
    pub region: Option<phonenumber::country::Id>,
    /// A cheaper expression for Hyperscan that every match of `regex`
    /// also matches (e.g. the part around a distinctive `@`); `regex`
    /// still decides and gives the spans.
    pub prefilter: Option<String>,
    /// Only a hit whose secret span has at least this Shannon entropy
    /// (bits per byte) counts: tells `"k3J9x!Qz..."` from `"password"`.
    pub min_entropy: Option<f64>,
    /// A hit whose secret span matches any of these regexes is dropped
    /// (placeholders such as `${VAR}`, `<token>`, `changeme`, or code).
    pub deny: Vec<String>,
}

impl PatternSpec {
    /// A plain pattern: no post-filters.
    pub fn new(id: impl Into<String>, rule: usize, regex: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            rule,
            regex: regex.into(),
            caseless: false,
            validate: None,
            region: None,
            prefilter: None,
            min_entropy: None,
            deny: Vec::new(),
        }
    }
}

/// Name of the capture group that holds the secret within a match.
pub const SECRET_GROUP: &str = "secret";

struct Compiled {
    spec: PatternSpec,
    /// Built on the first Hyperscan candidate: most patterns of a pack
    /// never fire on a given node, and a built regex costs ~100 KB
    /// (validated at load, so building again cannot fail).
    re: std::sync::OnceLock<regex::bytes::Regex>,
    /// Index of the `secret` group, if the pattern has one.
    secret: Option<usize>,
    /// The deny list, built like `re` on first need.
    deny: std::sync::OnceLock<Option<regex::bytes::RegexSet>>,
}

fn build_deny(spec: &PatternSpec) -> Result<Option<regex::bytes::RegexSet>, regex::Error> {
    if spec.deny.is_empty() {
        return Ok(None);
    }
    regex::bytes::RegexSetBuilder::new(&spec.deny)
        .unicode(false)
        .build()
        .map(Some)
}

fn build_regex(spec: &PatternSpec) -> Result<regex::bytes::Regex, regex::Error> {
    regex::bytes::RegexBuilder::new(&spec.regex)
        .case_insensitive(spec.caseless)
        .unicode(false)
        .build()
}

impl Compiled {
    fn re(&self) -> &regex::bytes::Regex {
        self.re.get_or_init(|| {
            build_regex(&self.spec).unwrap_or_else(|e| {
                // Unreachable (the same build passed at load); fail closed:
                // the whole candidate region counts as the match.
                tracing::error!(pattern = %self.spec.id, error = %e, "pattern no longer builds; masking whole candidates");
                regex::bytes::Regex::new(r"(?s-u).+").expect("a constant pattern builds")
            })
        })
    }

    /// The post-filters, over the secret span.
    fn accepts(&self, secret: &[u8]) -> bool {
        if self.spec.validate.is_none() && placeholder(secret) {
            return false;
        }
        if let Some(min) = self.spec.min_entropy {
            if entropy(secret) < min {
                return false;
            }
        }
        // Unbuildable (unreachable: validated at load) counts as no deny
        // list: more is masked, not less.
        let deny = self
            .deny
            .get_or_init(|| build_deny(&self.spec).unwrap_or(None));
        if let Some(deny) = deny {
            if deny.is_match(secret) {
                return false;
            }
        }
        true
    }
}

/// A token-sized value written as a placeholder: a run of eight of the
/// same character (`xxxxxxxx`, `XXXXXXXX`, `00000000`) or mostly `x`.
/// Random tokens of this size practically never hold such a run; key
/// material (PEM bodies, longer than this) may, so it is left alone.
fn placeholder(secret: &[u8]) -> bool {
    const RUN: usize = 8;
    // Numbers repeat digits (`4111111111111111` is a card); only tokens
    // with letters are judged by their runs.
    if secret.len() > 256 || secret.len() < RUN || !secret.iter().any(u8::is_ascii_alphabetic) {
        return false;
    }
    let xs = secret.iter().filter(|b| matches!(b, b'x' | b'X')).count();
    if xs * 2 > secret.len() {
        return true;
    }
    let mut run = 1;
    for w in secret.windows(2) {
        // `A` runs are base64 of zero bytes: structured tokens (Twitter's
        // bearer tokens) begin with them.
        run = if w[0] == w[1] && w[0] != b'A' {
            run + 1
        } else {
            1
        };
        if run >= RUN {
            return true;
        }
    }
    false
}

/// Shannon entropy in bits per byte.
pub fn entropy(data: &[u8]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let n = data.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// The Hyperscan form of a regex: named groups become plain groups
/// (Hyperscan reports no captures; the regex crate gives the spans).
fn hyperscan_expression(regex: &str) -> String {
    regex.replace("(?P<secret>", "(?:")
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
    /// Patterns whose prefilter is `DIGIT_GROUPS`: checked natively, not
    /// in Hyperscan (a class-only expression costs Hyperscan a full pass).
    digit_groups: Vec<usize>,
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
            let bad = |e: &dyn std::fmt::Display| ScanError::Pattern {
                id: spec.id.clone(),
                message: e.to_string(),
            };
            // Built once to validate and find the secret group, then
            // dropped: kept only once a candidate needs it.
            let re = build_regex(&spec).map_err(|e| bad(&e))?;
            if re.is_match(b"") {
                // Hyperscan refuses these without naming them.
                return Err(bad(
                    &"matches the empty string, so it matches everywhere; require at least one character",
                ));
            }
            let secret = re.capture_names().position(|n| n == Some(SECRET_GROUP));
            build_deny(&spec).map_err(|e| bad(&format!("deny: {e}")))?;
            if let Some(min) = spec.min_entropy {
                if !(0.0..=8.0).contains(&min) {
                    return Err(bad(&"min_entropy must be between 0 and 8 bits per byte"));
                }
            }
            patterns.push(Compiled {
                spec,
                re: std::sync::OnceLock::new(),
                secret,
                deny: std::sync::OnceLock::new(),
            });
        }
        let digit_groups: Vec<usize> = patterns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.spec.prefilter.as_deref() == Some(DIGIT_GROUPS))
            .map(|(i, _)| i)
            .collect();
        let db = if patterns.len() == digit_groups.len() {
            None
        } else {
            let hs: Patterns = patterns
                .iter()
                .enumerate()
                .filter(|(i, _)| !digit_groups.contains(i))
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
                            .unwrap_or_else(|| hyperscan_expression(&c.spec.regex)),
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
            digit_groups,
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
    /// Bytes before `skip` are context only (already sent).
    pub fn first_live(&self, data: &[u8], skip: usize) -> usize {
        self.live
            .first_live(data, skip.max(data.len().saturating_sub(self.window)))
    }

    pub fn pattern(&self, i: usize) -> &PatternSpec {
        &self.patterns[i].spec
    }

    /// Whether pattern `i`'s regex matches `text` where its prefilter does
    /// not. A prefilter narrower than its regex makes the pattern found
    /// only when something else in the same chunk wakes it: masked in one
    /// body, left whole in the next, plain and streamed disagreeing (a
    /// bundle author's error `policy lint` names).
    pub fn prefilter_narrower(&self, i: usize, text: &[u8]) -> bool {
        let spec = &self.patterns[i].spec;
        let Some(pre) = spec.prefilter.as_deref() else {
            return false;
        };
        if pre == DIGIT_GROUPS {
            return false;
        }
        let pre = PatternSpec {
            regex: pre.to_owned(),
            ..spec.clone()
        };
        match (build_regex(spec), build_regex(&pre)) {
            (Ok(re), Ok(pf)) => re.is_match(text) && !pf.is_match(text),
            _ => false,
        }
    }

    /// All confirmed hits in `data`, with exact spans.
    pub fn find(&self, data: &[u8]) -> Result<Vec<Hit>, ScanError> {
        let seen = self.candidates(data)?;
        let mut hits = Vec::new();
        for i in seen {
            let c = &self.patterns[i];
            let mut push = |start: usize, end: usize, mask_start: usize, mask_end: usize| {
                let (end, mask_end) = match c.spec.validate {
                    None => (end, mask_end),
                    Some(v) => match v.check(data, mask_start, mask_end, c.spec.region) {
                        // Shortened: the match ends where the secret does.
                        Some(e) if e < mask_end => (e, e),
                        Some(_) => (end, mask_end),
                        None => return,
                    },
                };
                if c.accepts(&data[mask_start..mask_end]) {
                    hits.push(Hit {
                        pattern: i,
                        rule: c.spec.rule,
                        start,
                        end,
                        mask_start,
                        mask_end,
                    });
                }
            };
            match c.secret {
                Some(g) => {
                    for caps in c.re().captures_iter(data) {
                        let Some(m) = caps.get(0) else { continue };
                        let (ms, me) = caps
                            .get(g)
                            .map_or((m.start(), m.end()), |s| (s.start(), s.end()));
                        push(m.start(), m.end(), ms, me);
                    }
                }
                None => {
                    for m in c.re().find_iter(data) {
                        push(m.start(), m.end(), m.start(), m.end());
                    }
                }
            }
        }
        Ok(hits)
    }

    /// The patterns Hyperscan reports in `data` (sorted, deduplicated):
    /// the candidates that `find` confirms with the regex crate.
    pub fn candidates(&self, data: &[u8]) -> Result<Vec<usize>, ScanError> {
        let mut seen = Vec::new();
        if !self.digit_groups.is_empty() && has_digit_groups(data) {
            seen.extend_from_slice(&self.digit_groups);
        }
        let Some(db) = &self.db else {
            return Ok(seen);
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
        Ok(seen)
    }
}

/// A prefilter that `Scanner` evaluates natively instead of in Hyperscan,
/// with the same meaning: four digits, an optional space or dash, four
/// digits (every common card-number layout). Hyperscan has no literal to
/// anchor a digits-only expression and pays a full pass for it.
pub const DIGIT_GROUPS: &str = r"\d{4}[ \-]?\d{4}";

/// Bit `i` set where `block[i]` is an ASCII digit, and where it is a space
/// or dash (block of up to 64 bytes).
fn digit_masks(block: &[u8]) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    if block.len() == 64 {
        // SAFETY: SSE2 is part of x86_64; the loads read 4 x 16 bytes of
        // a 64-byte slice, unaligned.
        unsafe {
            use std::arch::x86_64::*;
            let (zero, nine) = (_mm_set1_epi8(b'0' as i8), _mm_set1_epi8(9));
            let (space, dash) = (_mm_set1_epi8(b' ' as i8), _mm_set1_epi8(b'-' as i8));
            let (mut d, mut s) = (0u64, 0u64);
            for k in 0..4 {
                let x = _mm_loadu_si128(block.as_ptr().add(16 * k) as *const __m128i);
                let t = _mm_sub_epi8(x, zero);
                let dm = _mm_cmpeq_epi8(_mm_min_epu8(t, nine), t);
                let sm = _mm_or_si128(_mm_cmpeq_epi8(x, space), _mm_cmpeq_epi8(x, dash));
                d |= u64::from(_mm_movemask_epi8(dm) as u16) << (16 * k);
                s |= u64::from(_mm_movemask_epi8(sm) as u16) << (16 * k);
            }
            return (d, s);
        }
    }
    let (mut d, mut s) = (0u64, 0u64);
    for (i, &b) in block.iter().enumerate() {
        d |= u64::from(b.wrapping_sub(b'0') < 10) << i;
        s |= u64::from(b == b' ' || b == b'-') << i;
    }
    (d, s)
}

/// Whether `data` contains a match of `DIGIT_GROUPS`, 64 bytes at a time.
pub fn has_digit_groups(data: &[u8]) -> bool {
    let mut blocks = data.chunks(64);
    let Some(first) = blocks.next() else {
        return false;
    };
    let (mut d, mut s) = digit_masks(first);
    loop {
        let next = blocks.next();
        let (nd, ns) = next.map_or((0, 0), digit_masks);
        // Bits 0..64: this block; 64..128: the next one (look-ahead).
        let d2 = u128::from(d) | u128::from(nd) << 64;
        let s2 = u128::from(s) | u128::from(ns) << 64;
        let four = d2 & d2 >> 1 & d2 >> 2 & d2 >> 3;
        let hit = four & (four >> 4 | (s2 >> 4 & four >> 5));
        if hit as u64 != 0 {
            return true;
        }
        if next.is_none() {
            return false;
        }
        (d, s) = (nd, ns);
    }
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
                    PatternSpec::new("aws-access-key", 0, r"\b(?:AKIA|ASIA)[A-Z2-7]{16}\b"),
                    PatternSpec {
                        validate: Some(Validator::Luhn),
                        ..PatternSpec::new("card", 1, r"\b(?:\d[ -]?){12,18}\d\b")
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
    }

    #[test]
    fn placeholders_are_not_secrets() {
        assert!(placeholder(b"ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"));
        assert!(placeholder(
            b"glsa_XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX_AAAAAAAA"
        ));
        assert!(!placeholder(
            b"AAAAAAAAAAAAAAAAAAAAAARvt42mCFrmEtDKLhTraUbYO"
        ));
        assert!(placeholder(b"AIzaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"));
        assert!(!placeholder(b"ghp_k3J9xQz7Lw2Pm4Rt8Yv1Bn6Hc5Ds0Fg2Ja9K"));
        // Key material is longer than a token: left to its pattern.
        assert!(!placeholder(&[b'A'; 300]));
    }

    #[test]
    fn unbounded_and_bad_patterns_are_refused_clearly() {
        let e = Scanner::compile(vec![PatternSpec::new("greedy", 0, "password=.+")], 4096)
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("greedy") && e.to_string().contains("unbounded"),
            "{e}"
        );
        let e = Scanner::compile(vec![PatternSpec::new("broken", 0, "(unclosed")], 4096)
            .err()
            .unwrap();
        assert!(e.to_string().contains("broken"), "{e}");
    }

    #[test]
    fn secret_group_masks_only_the_value_and_filters_apply() {
        let s = Scanner::compile(
            vec![PatternSpec {
                min_entropy: Some(2.5),
                deny: vec![r"(?i)^(?:changeme|example)".into()],
                ..PatternSpec::new(
                    "assign",
                    0,
                    r#"(?i)api_key\s{0,4}=\s{0,4}"(?P<secret>[^"\s]{8,64})""#,
                )
            }],
            4096,
        )
        .unwrap();
        let text =
            br#"x API_KEY = "k3J9xQz7Lw2P" y api_key="changeme123" z api_key="aaaaaaaaaaaa""#;
        let hits = s.find(text).unwrap();
        assert_eq!(hits.len(), 1, "{hits:?}");
        let h = &hits[0];
        assert_eq!(&text[h.start..h.end], br#"API_KEY = "k3J9xQz7Lw2P""#);
        assert_eq!(&text[h.mask_start..h.mask_end], b"k3J9xQz7Lw2P");
        assert!(entropy(b"aaaa") < 0.01 && (entropy(b"abcd") - 2.0).abs() < 1e-9);
        let e = Scanner::compile(
            vec![PatternSpec {
                deny: vec!["(".into()],
                ..PatternSpec::new("bad-deny", 0, "x{3}")
            }],
            4096,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("bad-deny"), "{e}");
    }

    #[test]
    fn digit_groups_match_their_expression() {
        let re = regex::bytes::Regex::new(DIGIT_GROUPS).unwrap();
        let mut rng = 0x2545F4914F6CDD1Du64;
        for n in 0..20_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let len = (rng % 150) as usize;
            let text: Vec<u8> = (0..len)
                .map(|i| {
                    let r = rng.rotate_left(i as u32 * 3) ^ i as u64;
                    b"0123456789 -a"[(r % 13) as usize]
                })
                .collect();
            assert_eq!(
                has_digit_groups(&text),
                re.is_match(&text),
                "case {n}: {:?}",
                String::from_utf8_lossy(&text)
            );
        }
        assert!(has_digit_groups(
            &[b"x".repeat(60), b"4111-1111".to_vec()].concat()
        ));
        assert!(!has_digit_groups(b"2026-11-21T23:59:59Z 123 4567"));
    }
}
