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
    util::syntax,
    Anchored, Input, MatchKind,
};

use super::ScanError;

pub struct Liveness {
    dfa: Option<DFA>,
    caches: Mutex<Vec<Cache>>,
}

impl Liveness {
    /// `patterns` as (regex, caseless), in the scanner's dialect (bytes,
    /// no Unicode classes).
    pub fn build(patterns: &[(String, bool)]) -> Result<Self, ScanError> {
        if patterns.is_empty() {
            return Ok(Self {
                dfa: None,
                caches: Mutex::new(Vec::new()),
            });
        }
        let exprs: Vec<String> = patterns
            .iter()
            .map(|(re, caseless)| {
                if *caseless {
                    format!("(?i:{re})")
                } else {
                    format!("(?:{re})")
                }
            })
            .collect();
        let dfa = DFA::builder()
            .configure(
                DFA::config()
                    // Every thread matters, not just the leftmost-first one.
                    .match_kind(MatchKind::All)
                    .cache_capacity(4 << 20),
            )
            .syntax(syntax::Config::new().unicode(false).utf8(false))
            .thompson(thompson::Config::new().utf8(false))
            .build_many(&exprs)
            .map_err(|e| ScanError::Hyperscan(format!("hold-back automaton: {e}")))?;
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
