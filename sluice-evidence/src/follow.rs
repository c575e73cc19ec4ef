//! Following one node's chain as its events arrive (in stream order):
//! each event must hash to its recorded hash and follow the last one.
//! What does not is named, once, and following goes on from it, so a
//! break is flagged without hiding everything after it.
use serde::{Deserialize, Serialize};

use crate::{
    chain::{Hash, GENESIS},
    line::Line,
};

/// Where a node's chain stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainState {
    /// Every event from the first (seq 0) links up.
    Verified,
    /// Every event links up from the first one seen, which was not the
    /// node's first (the console joined after the stream's retention).
    Partial,
    /// Events are missing between two that arrived.
    Gap,
    /// An event was altered or re-published with other content.
    Broken,
}

impl ChainState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verified => "verified",
            Self::Partial => "partial",
            Self::Gap => "gap",
            Self::Broken => "broken",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "verified" => Self::Verified,
            "partial" => Self::Partial,
            "gap" => Self::Gap,
            "broken" => Self::Broken,
            _ => return None,
        })
    }

    /// The worse of two states (a break is never un-flagged by later
    /// events that link up).
    fn worst(self, other: Self) -> Self {
        let rank = |s: Self| match s {
            Self::Verified => 0,
            Self::Partial => 1,
            Self::Gap => 2,
            Self::Broken => 3,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// The chain head as the console knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: Hash,
    pub state: ChainState,
    /// The first problem found, in words.
    pub detail: Option<String>,
}

/// What one arriving event is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The next link: store it.
    Linked,
    /// Already held with this hash (a re-delivery): nothing to do.
    Duplicate,
    /// Store it, and flag the chain.
    Flagged { state: ChainState, detail: String },
    /// Already held with another hash: do not store; flag the chain.
    Conflict { detail: String },
}

/// Judges `line` against the head (`None`: the node's first event seen),
/// and `held`, the hash already stored for its sequence number if any.
/// Returns the step and the new head. A head's state only ever gets
/// worse, and it keeps the first problem's words.
pub fn step(head: Option<&Head>, line: &Line, held: Option<Hash>) -> (Step, Head) {
    let prior = head.cloned().unwrap_or(Head {
        seq: line.seq,
        hash: line.hash,
        state: ChainState::Verified,
        detail: None,
    });
    let flag = |mut h: Head, state: ChainState, detail: &str| {
        if matches!(h.state, ChainState::Verified | ChainState::Partial) {
            h.detail = Some(detail.to_owned());
        }
        h.state = h.state.worst(state);
        h
    };
    if let Some(h) = held {
        if h == line.hash && line.hash_ok() {
            return (Step::Duplicate, prior);
        }
        let detail = format!(
            "event {} was published again with other content (a re-written tail)",
            line.seq
        );
        let next = flag(prior, ChainState::Broken, &detail);
        return (Step::Conflict { detail }, next);
    }
    let problem = if !line.hash_ok() {
        Some((
            ChainState::Broken,
            format!(
                "event {} does not hash to its recorded hash (altered)",
                line.seq
            ),
        ))
    } else {
        match head {
            None if line.seq == 0 && line.prev == GENESIS => None,
            None => Some((
                ChainState::Partial,
                format!("first event seen is {}, not the node's first", line.seq),
            )),
            Some(h) if line.seq == h.seq + 1 && line.prev == h.hash => None,
            Some(h) if line.seq == h.seq + 1 => Some((
                ChainState::Broken,
                format!(
                    "event {} does not follow event {} (prev hash differs)",
                    line.seq, h.seq
                ),
            )),
            Some(h) if line.seq > h.seq + 1 => Some((
                ChainState::Gap,
                format!(
                    "events {}..{} are missing from the stream",
                    h.seq + 1,
                    line.seq - 1
                ),
            )),
            Some(h) => Some((
                ChainState::Broken,
                format!(
                    "event {} arrived after event {} (out of order or re-published)",
                    line.seq, h.seq
                ),
            )),
        }
    };
    // The head moves to the newest event; one that arrives late does not
    // move it back.
    let mut next = prior;
    if head.is_none_or(|h| line.seq >= h.seq) {
        next.seq = line.seq;
        next.hash = line.hash;
    }
    match problem {
        None => (Step::Linked, next),
        Some((state, detail)) => {
            let next = flag(next, state, &detail);
            (Step::Flagged { state, detail }, next)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{content_digest, link_hash};

    fn chain(n: u64) -> Vec<Line> {
        let mut prev = GENESIS;
        (0..n)
            .map(|seq| {
                let body = format!("{{\"n\":{seq}}}").into_bytes();
                let hash = link_hash(&prev, seq, &content_digest(seq, 1, "k", &body));
                let l = Line {
                    seq,
                    prev,
                    hash,
                    at_ms: seq,
                    connection: 1,
                    kind: "k".into(),
                    node: "n".into(),
                    actor: "a".into(),
                    body,
                };
                prev = hash;
                l
            })
            .collect()
    }

    fn run(lines: &[Line]) -> (Vec<Step>, Option<Head>) {
        let mut head: Option<Head> = None;
        let mut held = std::collections::HashMap::new();
        let mut steps = Vec::new();
        for l in lines {
            let (s, h) = step(head.as_ref(), l, held.get(&l.seq).copied());
            if matches!(s, Step::Linked | Step::Flagged { .. }) {
                held.insert(l.seq, l.hash);
            }
            steps.push(s);
            head = Some(h);
        }
        (steps, head)
    }

    #[test]
    fn a_whole_chain_verifies_and_redeliveries_are_duplicates() {
        let c = chain(4);
        let mut lines = c.clone();
        lines.push(c[2].clone());
        let (steps, head) = run(&lines);
        assert_eq!(
            steps[..4],
            [Step::Linked, Step::Linked, Step::Linked, Step::Linked]
        );
        assert_eq!(steps[4], Step::Duplicate);
        let head = head.unwrap();
        assert_eq!((head.seq, head.state), (3, ChainState::Verified));
    }

    #[test]
    fn gaps_alterations_and_rewritten_tails_are_flagged() {
        let c = chain(6);
        let (_, head) = run(&[c[0].clone(), c[1].clone(), c[3].clone(), c[4].clone()]);
        let head = head.unwrap();
        assert_eq!(head.state, ChainState::Gap);
        assert!(head.detail.unwrap().contains("2..2"));

        let mut altered = c[2].clone();
        altered.body = b"{\"n\":\"changed\"}".to_vec();
        let (steps, head) = run(&[c[0].clone(), c[1].clone(), altered]);
        assert!(matches!(
            steps[2],
            Step::Flagged {
                state: ChainState::Broken,
                ..
            }
        ));
        assert_eq!(head.unwrap().state, ChainState::Broken);

        // A tail re-written from event 1 with recomputed hashes: each new
        // event is self-consistent, but event 1 is already held.
        let mut forged = c[1].clone();
        forged.body = b"{\"n\":\"forged\"}".to_vec();
        forged.hash = link_hash(
            &forged.prev,
            1,
            &content_digest(forged.at_ms, 1, "k", &forged.body),
        );
        let (steps, head) = run(&[c[0].clone(), c[1].clone(), c[2].clone(), forged]);
        assert!(matches!(steps[3], Step::Conflict { .. }), "{steps:?}");
        let head = head.unwrap();
        assert_eq!(head.state, ChainState::Broken);
        assert_eq!(head.seq, 2, "the head stays where it was");
    }

    #[test]
    fn a_late_start_is_partial_and_then_follows() {
        let c = chain(5);
        let (steps, head) = run(&c[2..]);
        assert!(matches!(
            steps[0],
            Step::Flagged {
                state: ChainState::Partial,
                ..
            }
        ));
        assert_eq!(steps[1..], [Step::Linked, Step::Linked]);
        assert_eq!(head.unwrap().state, ChainState::Partial);
    }
}
