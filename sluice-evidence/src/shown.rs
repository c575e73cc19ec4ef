//! What an export *shows* checked against what its evidence *proves*: the
//! proof covers the session's own events, but a reader looks at the
//! exchange and statement lines of a JSONL export or the entries of a HAR.
//! Each of those must be exactly what the proven events say, or one
//! edited line would read as verified evidence.
use std::collections::BTreeMap;

use serde_json::Value;

use crate::checkpoint::Evidence;

/// The proven records: the last own event per exchange or statement (the
/// record as it completed), and the connection record. What an export
/// shows is built from these, so that it is the proven state even when
/// the session moved on between reading it and sealing the checkpoint.
pub struct Proven {
    pub session: Value,
    pub exchanges: BTreeMap<u64, Value>,
    pub statements: BTreeMap<u64, Value>,
}

pub fn proven(evidence: &Evidence) -> Proven {
    let mut p = Proven {
        session: Value::Null,
        exchanges: BTreeMap::new(),
        statements: BTreeMap::new(),
    };
    for l in &evidence.links {
        let (Some(kind), Some(body)) = (&l.kind, &l.body) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(body) else {
            continue;
        };
        let seq = v["seq"].as_u64().unwrap_or(0);
        if kind.starts_with("connection") {
            p.session = v;
        } else if kind.starts_with("exchange") {
            p.exchanges.insert(seq, v);
        } else if kind.starts_with("statement") {
            p.statements.insert(seq, v);
        }
    }
    p
}

/// Checks the records `text` (a JSONL or HAR export) shows against
/// `evidence` (already verified); the number of records checked, or the
/// first that differs.
pub fn check(text: &str, evidence: &Evidence) -> Result<usize, String> {
    let p = proven(evidence);
    if let Some(log) = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("log").cloned())
    {
        return check_har(&log, &p);
    }
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return Err(format!("line {}: not JSON", i + 1));
        };
        let (shown, proven, what) = match v["type"].as_str() {
            Some("exchange") => (&v["exchange"], &p.exchanges, "exchange"),
            Some("statement") => (&v["statement"], &p.statements, "statement"),
            _ => continue,
        };
        let seq = shown["seq"].as_u64().unwrap_or(0);
        match proven.get(&seq) {
            Some(want) if want == shown => n += 1,
            Some(_) => {
                return Err(format!(
                    "line {}: {what} {seq} differs from the proven event",
                    i + 1
                ))
            }
            None => {
                return Err(format!(
                    "line {}: {what} {seq} is not among the proven events",
                    i + 1
                ))
            }
        }
    }
    Ok(n)
}

fn check_har(log: &Value, p: &Proven) -> Result<usize, String> {
    let exchanges: Vec<Value> = p.exchanges.values().cloned().collect();
    let want = crate::har::build(&p.session, &exchanges, &Value::Null, "");
    let want = want["log"]["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let shown = log["entries"].as_array().cloned().unwrap_or_default();
    if shown.len() != want.len() {
        return Err(format!(
            "the HAR shows {} entries, the proven events {}",
            shown.len(),
            want.len()
        ));
    }
    if let Some(i) = (0..shown.len()).find(|&i| shown[i] != want[i]) {
        return Err(format!("HAR entry {i} differs from the proven event"));
    }
    let statements = log["_statements"].as_array().cloned().unwrap_or_default();
    for st in &statements {
        let seq = st["seq"].as_u64().unwrap_or(0);
        if p.statements.get(&seq) != Some(st) {
            return Err(format!("statement {seq} differs from the proven event"));
        }
    }
    Ok(shown.len() + statements.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{ProofLink, PublicKey};
    use serde_json::json;

    fn link(seq: u64, kind: &str, body: &Value) -> ProofLink {
        ProofLink {
            seq,
            digest: None,
            at_ms: Some(1),
            connection: Some(7),
            kind: Some(kind.into()),
            body: Some(body.to_string()),
        }
    }

    fn evidence() -> (Evidence, Value, Value) {
        let session = json!({"id": 7, "identity": {"id": "x"}});
        let started = json!({"seq": 0, "method": "POST", "path": "/", "authority": "a",
                             "request_body": {"size": 0}, "response_body": {"size": 0}});
        let done = json!({"seq": 0, "method": "POST", "path": "/", "authority": "a", "status": 200,
                          "request_body": {"size": 4, "text": "ab**"},
                          "response_body": {"size": 2, "text": "ok"}, "duration_ms": 1.5});
        let ev = Evidence {
            node_key: PublicKey {
                kid: "k".into(),
                alg: "Ed25519".into(),
                ed25519: String::new(),
            },
            checkpoint: None,
            prev: String::new(),
            links: vec![
                link(1, "connection.opened", &session),
                link(2, "exchange.started", &started),
                link(3, "exchange", &done),
            ],
        };
        (ev, session, done)
    }

    #[test]
    fn a_jsonl_export_must_show_the_proven_records() {
        let (ev, _, done) = evidence();
        let ok = format!(
            "{}\n{}\n",
            json!({"type": "session"}),
            json!({"type": "exchange", "exchange": done})
        );
        assert_eq!(check(&ok, &ev), Ok(1));
        let edited = ok.replace("ab**", "abcd");
        assert!(check(&edited, &ev).unwrap_err().contains("differs"));
        let extra = json!({"type": "exchange", "exchange": {"seq": 9}}).to_string();
        assert!(check(&extra, &ev).unwrap_err().contains("not among"));
    }

    /// Timings as the node writes them (fractions of a millisecond): a
    /// HAR written out and read back must still be the proven entry, for
    /// every value (serde_json's default float parsing is off by one unit
    /// in the last place for some; `float_roundtrip` reads them exactly).
    #[test]
    fn a_har_export_with_any_timings_checks() {
        let session = json!({"id": 7, "identity": {"id": "x"}});
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            // xorshift: varied durations without a dependency.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let duration = (x % 5_000_000) as f64 / 1000.0 + (x % 997) as f64 / 1e7;
            let ttfb = duration * ((x >> 20) % 1000) as f64 / 1000.0;
            let done = json!({"seq": 0, "method": "GET", "path": "/", "authority": "a", "status": 200,
                              "request_body": {"size": 0}, "response_body": {"size": 0},
                              "duration_ms": duration, "ttfb_ms": ttfb});
            let ev = Evidence {
                node_key: PublicKey {
                    kid: "k".into(),
                    alg: "Ed25519".into(),
                    ed25519: String::new(),
                },
                checkpoint: None,
                prev: String::new(),
                links: vec![link(1, "connection", &session), link(2, "exchange", &done)],
            };
            // The exporter builds from the records as it parsed them.
            let parsed: Value = serde_json::from_str(&done.to_string()).unwrap();
            let har = crate::har::build(&session, &[parsed], &Value::Null, "sluice");
            let text = serde_json::to_string_pretty(&har).unwrap();
            assert_eq!(check(&text, &ev), Ok(1), "duration {duration} ttfb {ttfb}");
        }
    }

    #[test]
    fn a_har_export_must_show_the_proven_records() {
        let (ev, session, done) = evidence();
        let har = crate::har::build(&session, &[done], &Value::Null, "sluice").to_string();
        assert_eq!(check(&har, &ev), Ok(1));
        let edited = har.replace("\"ok\"", "\"no\"");
        assert!(check(&edited, &ev).unwrap_err().contains("entry 0 differs"));
        let mut v: Value = serde_json::from_str(&har).unwrap();
        v["log"]["entries"] = json!([]);
        assert!(check(&v.to_string(), &ev).unwrap_err().contains("shows 0"));
    }
}
