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
use regex_automata::{meta, util::syntax, Input};

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
    /// A hit whose whole match (the name before the value included)
    /// matches any of these is dropped: `vapidPublicKey = "…"` names a
    /// public key, which the same shape under `apiKey` is not.
    pub deny_match: Vec<String>,
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
            deny_match: Vec::new(),
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
    re: std::sync::OnceLock<meta::Regex>,
    /// Index of the `secret` group, if the pattern has one.
    secret: Option<usize>,
    /// Longest match of `regex`: how far around a prefilter hit a match
    /// can lie.
    max_len: usize,
    /// The deny lists (`deny`, `deny_match`), built like `re` on first
    /// need.
    deny: std::sync::OnceLock<Option<regex::bytes::RegexSet>>,
    deny_match: std::sync::OnceLock<Option<regex::bytes::RegexSet>>,
}

fn build_deny(spec: &PatternSpec) -> Result<Option<regex::bytes::RegexSet>, regex::Error> {
    build_set(&spec.deny)
}

fn build_set(list: &[String]) -> Result<Option<regex::bytes::RegexSet>, regex::Error> {
    if list.is_empty() {
        return Ok(None);
    }
    regex::bytes::RegexSetBuilder::new(list)
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

/// The regex as the scanner runs it: the `regex` crate's engine with the
/// same syntax, reached directly because a search there can be bounded to
/// a range of the data while `^`, `$` and `\b` still see the bytes around
/// it (`Input::range`).
fn build_meta(spec: &PatternSpec) -> Result<meta::Regex, Box<meta::BuildError>> {
    meta::Regex::builder()
        .syntax(
            syntax::Config::new()
                .case_insensitive(spec.caseless)
                .unicode(false)
                .utf8(false),
        )
        .configure(meta::Regex::config().utf8_empty(false))
        .build(&spec.regex)
        .map_err(Box::new)
}

impl Compiled {
    fn re(&self) -> &meta::Regex {
        self.re.get_or_init(|| {
            build_meta(&self.spec).unwrap_or_else(|e| {
                // Unreachable (the same build passed at load); fail closed:
                // the whole candidate region counts as the match.
                tracing::error!(pattern = %self.spec.id, error = %e, "pattern no longer builds; masking whole candidates");
                build_meta(&PatternSpec::new("fallback", 0, r"(?s-u).+"))
                    .expect("a constant pattern builds")
            })
        })
    }

    /// The post-filters, over the secret span and the whole match.
    fn accepts(&self, secret: &[u8], whole: &[u8]) -> bool {
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
        let deny_match = self
            .deny_match
            .get_or_init(|| build_set(&self.spec.deny_match).unwrap_or(None));
        !deny_match.as_ref().is_some_and(|d| d.is_match(whole))
    }
}

/// A token-sized value written as a placeholder: a run of eight of the
/// same character (`xxxxxxxx`, `XXXXXXXX`, `00000000`) or mostly `x`, or a
/// short unit repeated over twelve characters (`123123123123`). Random
/// tokens of this size practically never hold either (twelve characters of
/// a period-4 unit in random hex: 16^-8 per position); key material (PEM
/// bodies, longer than this) may, so it is left alone. Typed filler
/// (`abc123`) is not judged: the other scanners' suites use it in their
/// true cases as often as in their false ones. Nor are AWS's documented
/// `…EXAMPLE` keys: they are what users paste to see masking work.
fn placeholder(secret: &[u8]) -> bool {
    const RUN: usize = 8;
    const PERIODIC: usize = 12;
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
    // A unit of 2-4 characters repeated; runs of one character are judged
    // above (with their `A` exception), so a span of one character is not
    // counted here.
    for p in 2..=4 {
        let mut span = p;
        for i in p..secret.len() {
            span = if secret[i] == secret[i - p] {
                span + 1
            } else {
                p
            };
            if span >= PERIODIC {
                // The repeating stretch, not its unit: one character
                // throughout is a run, left to the rule above.
                let stretch = &secret[i + 1 - span..i + 1];
                if stretch.iter().any(|b| *b != stretch[0]) {
                    return true;
                }
            }
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
    /// Hyperscan scratch space with a table of reports per pattern, reused
    /// (zeroed again after each scan) so a scan allocates neither.
    scratch: Mutex<Vec<(Scratch, Vec<u16>)>>,
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
            // The same syntax as `build_meta`'s: what builds here builds there.
            let re = build_regex(&spec).map_err(|e| bad(&e))?;
            if re.is_match(b"") {
                // Hyperscan refuses these without naming them.
                return Err(bad(
                    &"matches the empty string, so it matches everywhere; require at least one character",
                ));
            }
            let secret = re.capture_names().position(|n| n == Some(SECRET_GROUP));
            build_deny(&spec).map_err(|e| bad(&format!("deny: {e}")))?;
            build_set(&spec.deny_match).map_err(|e| bad(&format!("deny_match: {e}")))?;
            if let Some(min) = spec.min_entropy {
                if !(0.0..=8.0).contains(&min) {
                    return Err(bad(&"min_entropy must be between 0 and 8 bits per byte"));
                }
            }
            patterns.push(Compiled {
                spec,
                re: std::sync::OnceLock::new(),
                secret,
                max_len: len,
                deny: std::sync::OnceLock::new(),
                deny_match: std::sync::OnceLock::new(),
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
                    // Every place it ends is reported (up to `MAX_ENDS` are
                    // kept): the regex confirms only around them, since
                    // every match contains a match of this expression.
                    let mut flags = CompileFlags::empty();
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
        let seen = self.candidate_ends(data)?;
        let mut hits = Vec::new();
        for (i, ends) in seen {
            let c = &self.patterns[i];
            let ranges = match ends {
                Some(ends) => windows(&ends, c.max_len, data.len()),
                None => std::iter::once(0..data.len()).collect(),
            };
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
                if c.accepts(&data[mask_start..mask_end], &data[start..end]) {
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
            for range in ranges {
                let input = Input::new(data).range(range);
                match c.secret {
                    Some(g) => {
                        for caps in c.re().captures_iter(input) {
                            let Some(m) = caps.get_match() else { continue };
                            let (ms, me) = caps
                                .get_group(g)
                                .map_or((m.start(), m.end()), |s| (s.start, s.end));
                            push(m.start(), m.end(), ms, me);
                        }
                    }
                    None => {
                        for m in c.re().find_iter(input) {
                            push(m.start(), m.end(), m.start(), m.end());
                        }
                    }
                }
            }
        }
        Ok(hits)
    }

    /// The patterns Hyperscan reports in `data` (sorted, deduplicated):
    /// the candidates that `find` confirms with the regex crate.
    pub fn candidates(&self, data: &[u8]) -> Result<Vec<usize>, ScanError> {
        Ok(self
            .candidate_ends(data)?
            .into_iter()
            .map(|(i, _)| i)
            .collect())
    }

    /// The candidates with where Hyperscan saw their expression end in
    /// `data` (digit groups: where they start), sorted, or `None` where the
    /// regex must look at all of it: reported in more than `MAX_ENDS`
    /// places.
    fn candidate_ends(&self, data: &[u8]) -> Result<Vec<Candidate>, ScanError> {
        let mut out: Vec<Candidate> = Vec::new();
        if !self.digit_groups.is_empty() {
            // Where digit groups start is as good as where a prefilter
            // ends: every match holds one, so it lies within its length.
            let mut starts = Vec::new();
            if digit_group_starts(data, MAX_ENDS + 1, &mut starts) {
                let at = (starts.len() <= MAX_ENDS).then_some(starts);
                out.extend(self.digit_groups.iter().map(|&i| (i, at.clone())));
            }
        }
        let Some(db) = &self.db else {
            return Ok(out);
        };
        let mut seen: Vec<(usize, usize)> = Vec::new();
        let pooled = {
            let mut pool = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            pool.pop()
        };
        let (scratch, mut counts) = match pooled {
            Some(s) => s,
            None => (
                db.alloc_scratch()
                    .map_err(|e| ScanError::Hyperscan(e.to_string()))?,
                vec![0u16; self.patterns.len()],
            ),
        };
        let res = db.scan(
            data,
            &scratch,
            |id: u32, _from: u64, to: u64, _flags: u32| {
                let i = id as usize;
                let n = &mut counts[i];
                // Past the cap the pattern is confirmed over all the data;
                // further reports cost a comparison, not memory.
                if usize::from(*n) < MAX_ENDS {
                    *n += 1;
                    let whole = usize::from(*n) == MAX_ENDS;
                    seen.push((i, if whole { usize::MAX } else { to as usize }));
                }
                Matching::Continue
            },
        );
        for &(i, _) in &seen {
            counts[i] = 0;
        }
        self.scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((scratch, counts));
        res.map_err(|e| ScanError::Hyperscan(e.to_string()))?;
        seen.sort_unstable();
        seen.dedup();
        for group in seen.chunk_by(|a, b| a.0 == b.0) {
            let i = group[0].0;
            let ends: Vec<usize> = group.iter().map(|&(_, e)| e).collect();
            // `usize::MAX` sorts last: present when the whole data is due.
            let whole = ends.last() == Some(&usize::MAX);
            out.push((i, (!whole).then_some(ends)));
        }
        out.sort_unstable_by_key(|(i, _)| *i);
        Ok(out)
    }
}

/// A pattern to confirm, with where its Hyperscan expression ended
/// (`None`: all of the data).
type Candidate = (usize, Option<Vec<usize>>);

/// Reports of one windowed pattern kept per scan; past this the pattern
/// is confirmed over all the data (one pass is then cheaper than many
/// windows).
const MAX_ENDS: usize = 64;

/// The ranges of `0..len` within `max_len` of an end (sorted), merged where
/// they overlap: every match of a pattern contains a match of its
/// prefilter, so it lies within `max_len` of where that one ended, and the
/// matches in merged ranges are those of the whole data.
fn windows(ends: &[usize], max_len: usize, len: usize) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for &e in ends {
        let r = e.saturating_sub(max_len)..e.saturating_add(max_len).min(len);
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
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

/// Where matches of `DIGIT_GROUPS` start in `data`, 64 bytes at a time,
/// into `starts`, up to `cap` of them; whether there is any.
fn digit_group_starts(data: &[u8], cap: usize, starts: &mut Vec<usize>) -> bool {
    let mut blocks = data.chunks(64);
    let Some(first) = blocks.next() else {
        return false;
    };
    let (mut d, mut s) = digit_masks(first);
    let mut any = false;
    for base in (0..).step_by(64) {
        let next = blocks.next();
        let (nd, ns) = next.map_or((0, 0), digit_masks);
        // Bits 0..64: this block; 64..128: the next one (look-ahead).
        let d2 = u128::from(d) | u128::from(nd) << 64;
        let s2 = u128::from(s) | u128::from(ns) << 64;
        let four = d2 & d2 >> 1 & d2 >> 2 & d2 >> 3;
        let mut hit = (four & (four >> 4 | (s2 >> 4 & four >> 5))) as u64;
        any |= hit != 0;
        while hit != 0 && starts.len() < cap {
            starts.push(base + hit.trailing_zeros() as usize);
            hit &= hit - 1;
        }
        if next.is_none() || starts.len() >= cap {
            return any;
        }
        (d, s) = (nd, ns);
    }
    any
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

    /// Confirming around the prefilter's reports finds exactly what the
    /// regex finds in the whole data: line anchors and word boundaries at
    /// a window's edge see the bytes beyond it, close hits share a window,
    /// hits at either end of the data, and a pattern reported more often
    /// than `MAX_ENDS` (confirmed over everything).
    #[test]
    fn windowed_confirmation_finds_what_the_whole_data_holds() {
        let specs = vec![
            PatternSpec {
                prefilter: Some(r"TOKEN_[A-Z]{0,10}=[a-z0-9]{12}".into()),
                ..PatternSpec::new(
                    "line",
                    0,
                    r"(?m)^[ \t]{0,4}(?:export )?TOKEN_[A-Z]{0,10}=(?P<secret>[a-z0-9]{12,40})\b",
                )
            },
            PatternSpec {
                prefilter: Some(r"kx_[a-z0-9]{8}".into()),
                ..PatternSpec::new("word", 1, r"\bkx_[a-z0-9]{8,30}\b")
            },
            PatternSpec {
                prefilter: Some(DIGIT_GROUPS.into()),
                ..PatternSpec::new("digits", 2, r"\b(?:\d[ \-]?){12,18}\d\b")
            },
            // No prefilter: Hyperscan runs the regex itself, reporting an
            // end at every length the repeat allows.
            PatternSpec::new("plain", 3, r"\bzq[0-9]{6,12}\b"),
        ];
        let s = Scanner::compile(specs.clone(), 4096).unwrap();
        let mut r = 0x2545f4914f6cdd1du64;
        let mut next = move |n: u64| {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            r % n
        };
        for (round, count) in [(0, 3usize), (1, 20), (2, 200)] {
            let mut data = Vec::new();
            data.extend_from_slice(b"TOKEN_A=abcdef0123456789 kx_0a9b8c7d\n");
            for _ in 0..count {
                let filler = next(3000) as usize;
                data.extend(std::iter::repeat_n(b'w', filler));
                match next(10) {
                    8 => data.extend_from_slice(b" zq0123456789 "),
                    9 => data.extend_from_slice(b" zq01234567890123 "),
                    6 => data.extend_from_slice(b" 4929 1234 5678 9012 "),
                    7 => data.extend_from_slice(b"x1234567890123456789012 "),
                    0 => data.extend_from_slice(b"\nTOKEN_DB=q1w2e3r4t5y6u7i8\n"),
                    1 => data.extend_from_slice(b"xTOKEN_DB=q1w2e3r4t5y6u7i8\n"),
                    2 => data.extend_from_slice(b"\n  export TOKEN_X=0a1b2c3d4e5f6a7b8c9d tail\n"),
                    3 => data.extend_from_slice(b" kx_a1b2c3d4e5 "),
                    4 => data.extend_from_slice(b"wkx_a1b2c3d4e5 "),
                    _ => data.extend_from_slice(b"\nTOKEN_A=short1\n"),
                }
            }
            data.extend_from_slice(b"\nTOKEN_Z=z9y8x7w6v5u4t3");
            let got: Vec<(usize, usize, usize, usize)> = {
                let mut h: Vec<_> = s
                    .find(&data)
                    .unwrap()
                    .iter()
                    .map(|h| (h.start, h.end, h.mask_start, h.mask_end))
                    .collect();
                h.sort_unstable();
                h
            };
            let mut want = Vec::new();
            for spec in &specs {
                let re = build_regex(spec).unwrap();
                for c in re.captures_iter(&data) {
                    let (m, g) = (
                        c.get(0).unwrap(),
                        c.name(SECRET_GROUP).or(c.get(0)).unwrap(),
                    );
                    want.push((m.start(), m.end(), g.start(), g.end()));
                }
            }
            want.sort_unstable();
            assert!(!want.is_empty(), "round {round}");
            assert_eq!(got, want, "round {round}");
        }
        assert_eq!(windows(&[5, 10, 100], 8, 104), vec![0..18, 92..104]);
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
        // A repeated unit; not AWS's documented key.
        assert!(!placeholder(b"AKIAIOSFODNN7EXAMPLE"));
        assert!(placeholder(b"GR134894112312312312312312312"));
        assert!(placeholder(b"token_abababababab"));
        // Eleven characters of a unit are not yet a placeholder; base64
        // of zero bytes (a run of `A`) is not one either.
        assert!(!placeholder(b"k3J9xQz7Lw2P1231231231"));
        assert!(!placeholder(b"AAAAAAAAAAAAAAAAAAAAAMLheAAAAAAA0"));
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
    fn deny_match_judges_the_name_before_the_value() {
        let spec = PatternSpec {
            deny_match: vec![r"(?i)public[_.-]?key".into()],
            ..PatternSpec::new(
                "named",
                0,
                r#"\w{1,40}Key\s{0,4}=\s{0,4}"(?P<secret>[A-Za-z0-9]{16,64})""#,
            )
        };
        let s = Scanner::compile(vec![spec], 4096).unwrap();
        let text = br#"vapidPublicKey = "k3J9xQz7Lw2Pm4Rt8Yv1" deployKey = "Bn6Hc5Ds0Fg2Ja9Kq7Wz""#;
        let hits = s.find(text).unwrap();
        assert_eq!(hits.len(), 1, "{hits:?}");
        assert_eq!(
            &text[hits[0].mask_start..hits[0].mask_end],
            b"Bn6Hc5Ds0Fg2Ja9Kq7Wz"
        );
        // The secret alone says nothing of the name: `deny` could not
        // have told the two apart.
        let e = Scanner::compile(
            vec![PatternSpec {
                deny_match: vec!["(".into()],
                ..PatternSpec::new("bad-deny-match", 0, "x{3}")
            }],
            4096,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("deny_match"), "{e}");
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
        let has_digit_groups = |t: &[u8]| digit_group_starts(t, 1, &mut Vec::new());
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
        // Every start, as the expression finds them one after another.
        let text = [
            b"x".repeat(70),
            b"4111 1111 1111 1111 and 5555555555554444".to_vec(),
        ]
        .concat();
        let mut starts = Vec::new();
        assert!(digit_group_starts(&text, 100, &mut starts));
        let want: Vec<usize> = (0..text.len())
            .filter(|&i| re.find_at(&text, i).is_some_and(|m| m.start() == i))
            .collect();
        assert_eq!(starts, want);
    }
}
