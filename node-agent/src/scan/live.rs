//! Where a match may still be in progress at the end of a stream.
//!
//! A streaming masker must hold back text that more data could turn into a
//! secret, and nothing else: holding a fixed window (the longest possible
//! match, 4 KiB for a PEM key) would delay every short streamed answer to
//! its end. A lazy DFA over all patterns, run anchored from each candidate
//! start, tells whether a match beginning there is still alive at the end
//! of the text; the earliest such start is where the hold-back begins.
//! For ordinary prose that is the last word or nothing at all.
use std::sync::Mutex;

use regex_automata::{
    hybrid::dfa::{Cache, DFA},
    nfa::thompson,
    Anchored, Input, MatchKind,
};
use regex_syntax::hir::{Hir, HirKind, Repetition};

use super::ScanError;

pub struct Liveness {
    dfa: Option<DFA>,
    caches: Mutex<Vec<Cache>>,
}

impl Liveness {
    /// `patterns` as (regex, caseless), in the scanner's dialect (bytes,
    /// no Unicode classes).
    pub fn build(patterns: &[(String, bool)]) -> Result<Self, ScanError> {
        Self::build_with(patterns, relax)
    }

    fn build_with(patterns: &[(String, bool)], relax: fn(Hir) -> Hir) -> Result<Self, ScanError> {
        if patterns.is_empty() {
            return Ok(Self {
                dfa: None,
                caches: Mutex::new(Vec::new()),
            });
        }
        let bad =
            |e: &dyn std::fmt::Display| ScanError::Hyperscan(format!("hold-back automaton: {e}"));
        let hirs = patterns
            .iter()
            .map(|(re, caseless)| {
                regex_syntax::ParserBuilder::new()
                    .case_insensitive(*caseless)
                    .unicode(false)
                    .utf8(false)
                    .build()
                    .parse(re)
                    .map(relax)
                    .map_err(|e| bad(&e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let nfa = thompson::Compiler::new()
            .configure(
                thompson::Config::new()
                    .utf8(false)
                    .which_captures(thompson::WhichCaptures::None),
            )
            .build_many_from_hir(&hirs)
            .map_err(|e| bad(&e))?;
        let dfa = DFA::builder()
            .configure(
                DFA::config()
                    // Every thread matters, not just the leftmost-first one.
                    .match_kind(MatchKind::All)
                    .cache_capacity(4 << 20),
            )
            .build_from_nfa(nfa)
            .map_err(|e| bad(&e))?;
        Ok(Self {
            dfa: Some(dfa),
            caches: Mutex::new(Vec::new()),
        })
    }

    /// The earliest position in `from..data.len()` where a match could
    /// start that is still alive at the end of `data` (more bytes could
    /// complete or extend it); `data.len()` when there is none. Bytes
    /// before `from` are known settled.
    pub fn first_live(&self, data: &[u8], from: usize) -> usize {
        let Some(dfa) = &self.dfa else {
            return data.len();
        };
        let mut cache = {
            let mut pool = self.caches.lock().unwrap_or_else(|e| e.into_inner());
            pool.pop()
        }
        .unwrap_or_else(|| dfa.create_cache());
        let mut result = data.len();
        for start in from..data.len() {
            if alive_to_end(dfa, &mut cache, data, start) {
                result = start;
                break;
            }
        }
        self.caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cache);
        result
    }
}

/// Counts up to this stay exact in the hold-back automaton.
const EXACT_COUNTS: u32 = 16;

/// The pattern with its long counted repetitions opened up (`x{60,250}`
/// becomes `x{16,}`, `x{3}` stays) and no captures. An automaton over
/// counted classes holds a copy of the class per count: the built-in
/// packs came to 5 MiB per scanner, resident for good. Opened up, a run
/// can only stay alive longer, never die sooner, so the answer errs
/// towards holding back, the safe side; how far back is still capped by
/// the longest exact match (`Scanner::first_live` looks no further).
fn relax(hir: Hir) -> Hir {
    match hir.into_kind() {
        HirKind::Repetition(r) => {
            let sub = Box::new(relax(*r.sub));
            if r.max.is_some_and(|m| m <= EXACT_COUNTS) {
                Hir::repetition(Repetition { sub, ..r })
            } else {
                Hir::repetition(Repetition {
                    min: r.min.min(EXACT_COUNTS),
                    max: None,
                    greedy: r.greedy,
                    sub,
                })
            }
        }
        HirKind::Capture(c) => relax(*c.sub),
        HirKind::Concat(v) => Hir::concat(v.into_iter().map(relax).collect()),
        HirKind::Alternation(v) => Hir::alternation(v.into_iter().map(relax).collect()),
        HirKind::Empty => Hir::empty(),
        HirKind::Literal(l) => Hir::literal(l.0),
        HirKind::Class(c) => Hir::class(c),
        HirKind::Look(l) => Hir::look(l),
    }
}

/// Whether an anchored run from `start` is still alive after the last byte.
/// Errors (a cache that gave up, a quit byte) count as alive: holding back
/// is the safe answer.
fn alive_to_end(dfa: &DFA, cache: &mut Cache, data: &[u8], start: usize) -> bool {
    let input = Input::new(data).range(start..).anchored(Anchored::Yes);
    let Ok(mut sid) = dfa.start_state_forward(cache, &input) else {
        return true;
    };
    for &b in &data[start..] {
        sid = match dfa.next_state(cache, sid, b) {
            Ok(s) => s,
            Err(_) => return true,
        };
        if sid.is_dead() {
            return false;
        }
        if sid.is_quit() {
            return true;
        }
    }
    // Matches are reported one byte late, so a match state may hold no
    // thread that can go on: alive only if some next byte keeps it going.
    if sid.is_match() {
        return (0..=255u8).any(|b| dfa.next_state(cache, sid, b).map_or(true, |s| !s.is_dead()));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> Liveness {
        Liveness::build(&[
            (r"\bgh[pousr]_[A-Za-z0-9]{36,251}\b".into(), false),
            (r"\b(?:AKIA|ASIA)[A-Z2-7]{16}\b".into(), false),
        ])
        .unwrap()
    }

    #[test]
    fn the_built_in_packs_fit_in_little_memory_and_hold_no_less() {
        let pats: Vec<(String, bool)> = ["secrets", "pii"]
            .iter()
            .flat_map(|p| {
                let s = crate::policy::builtin_pack_scanner(p, 4096).unwrap();
                (0..s.len())
                    .map(|i| (s.pattern(i).regex.clone(), s.pattern(i).caseless))
                    .collect::<Vec<_>>()
            })
            .collect();
        let relaxed = Liveness::build(&pats).unwrap();
        let counted = Liveness::build_with(&pats, |h| h).unwrap();
        let size = |l: &Liveness| l.dfa.as_ref().unwrap().get_nfa().memory_usage();
        assert!(size(&counted) > 4 << 20, "counted: {}", size(&counted));
        assert!(size(&relaxed) < 1 << 20, "relaxed: {}", size(&relaxed));
        // Wherever the exact automaton holds back, the relaxed one holds at
        // least as much; on prose they agree (the last word: it could still
        // become `report.password = "...`).
        let texts: Vec<Vec<u8>> = vec![
            b"The build passed. Nothing to report.".to_vec(),
            b"export AWS_ACCESS_KEY_ID=AKIA".to_vec(),
            format!("token: ghp_{}", "a".repeat(30)).into_bytes(),
            format!("token: ghp_{} and more", "b".repeat(36)).into_bytes(),
            b"password = \"hunter2hunter2".to_vec(),
            b"card 4111 1111 1111 11".to_vec(),
            b"mail me at alice@exam".to_vec(),
            b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA".to_vec(),
            b"npm _authToken=abcdefabcdefabcdefabcdef".to_vec(),
        ];
        for t in &texts {
            let (r, c) = (relaxed.first_live(t, 0), counted.first_live(t, 0));
            assert!(
                r <= c,
                "{:?}: relaxed holds from {r}, exact from {c}",
                String::from_utf8_lossy(t)
            );
        }
        let prose = &texts[0];
        assert_eq!(relaxed.first_live(prose, 0), counted.first_live(prose, 0));
        assert_eq!(relaxed.first_live(prose, 0), prose.len() - " report.".len());
        assert!(relaxed.first_live(&texts[1], 0) <= texts[1].len() - 4);
    }

    #[test]
    fn prose_is_not_held() {
        let l = live();
        let t = b"Here is the answer you asked for. ";
        assert_eq!(l.first_live(t, 0), t.len());
    }

    #[test]
    fn a_token_prefix_is_held_from_its_start() {
        let l = live();
        let t = b"your token: ghp_A1b2";
        assert_eq!(l.first_live(t, 0), 12);
        let t = b"key AK";
        assert_eq!(l.first_live(t, 0), 4);
        // A complete token that could still grow is held too.
        let t = format!("x ghp_{}", "a".repeat(40));
        assert_eq!(l.first_live(t.as_bytes(), 0), 2);
        // ... and is settled once a non-token byte follows.
        let t = format!("x ghp_{} ", "a".repeat(40));
        assert_eq!(l.first_live(t.as_bytes(), 0), t.len());
    }
}
