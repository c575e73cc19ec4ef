//! One spool line: a chain event as JSON, with what a SIEM needs to file
//! it (OCSF class, the acting workload identity, the node) and what a
//! verifier needs to check it (sequence, previous and own hash, the exact
//! stored body: `body` is those bytes, verbatim).
//!
//! ```json
//! {"seq":42,"prev":"<hex>","hash":"<hex>","at_ms":1795900000000,"connection":7,
//!  "kind":"statement","node":"runner-17","actor":"wl-3f2a...",
//!  "ocsf_class_uid":6005,"ocsf_class_name":"Datastore Activity","body":{...}}
//! ```
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::record::RawEvent;

#[derive(Serialize)]
struct Out<'a> {
    seq: u64,
    prev: String,
    hash: String,
    at_ms: u64,
    connection: u64,
    kind: &'a str,
    node: &'a str,
    actor: String,
    ocsf_class_uid: u32,
    ocsf_class_name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
}

/// The fields every reader needs first (no body).
#[derive(Deserialize)]
pub struct Head {
    pub seq: u64,
}

/// What shipping reads back of a line (the whole line, for `verify
/// --stream` and the console, is `sluice_evidence::line::Line`).
#[derive(Deserialize)]
pub struct In<'a> {
    pub seq: u64,
    #[serde(borrow)]
    pub hash: &'a str,
    pub at_ms: u64,
    #[serde(borrow)]
    pub actor: std::borrow::Cow<'a, str>,
}

/// OCSF class of an event kind.
fn ocsf(kind: &str) -> (u32, &'static str) {
    match kind.split('.').next().unwrap_or("") {
        "exchange" => (4002, "HTTP Activity"),
        "statement" => (6005, "Datastore Activity"),
        "connection" => (4001, "Network Activity"),
        _ => (6003, "API Activity"),
    }
}

/// Who acted: the workload identity of the event's body.
fn actor(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        workload: Option<String>,
        #[serde(default)]
        identity: Option<Id>,
    }
    #[derive(Deserialize)]
    struct Id {
        id: String,
    }
    serde_json::from_slice::<Probe>(body)
        .ok()
        .and_then(|p| p.workload.or(p.identity.map(|i| i.id)))
        .unwrap_or_else(|| "node".into())
}

pub fn encode(ev: &RawEvent, node: &str) -> Vec<u8> {
    use base64::Engine;
    let raw: Option<&RawValue> = serde_json::from_slice(&ev.body).ok();
    let (uid, name) = ocsf(&ev.kind);
    let out = Out {
        seq: ev.seq,
        prev: hex::encode(ev.prev),
        hash: hex::encode(ev.hash),
        at_ms: ev.at_ms,
        connection: ev.connection,
        kind: &ev.kind,
        node,
        actor: actor(&ev.body),
        ocsf_class_uid: uid,
        ocsf_class_name: name,
        body: raw,
        body_base64: raw
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(&ev.body)),
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

/// A subject token: letters, digits, `-` and `_` only (one rule for the
/// evidence and the fleet's subjects).
pub use sluice_fleet::subjects::token;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_the_exact_stored_events_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::record::RecordStore::open(dir.path()).unwrap();
        store
            .audit(
                "policy.applied",
                &serde_json::json!({"version": 3, "note": "é \\u0000"}),
            )
            .unwrap();
        store
            .audit(
                "identity.suspended",
                &serde_json::json!({"workload": "wl-1"}),
            )
            .unwrap();
        let (events, next) = store.read_events(None, store.durable_seq(), 100).unwrap();
        assert_eq!(events.len(), 2);
        assert!(next.is_some());
        for ev in &events {
            let line = encode(ev, "node-1");
            assert!(!line.contains(&b'\n'));
            // Read as the console and `verify --stream` read it.
            let back = sluice_evidence::line::Line::parse(&line).unwrap();
            assert_eq!(back.body, ev.body, "body bytes must survive verbatim");
            assert!(back.hash_ok());
            let shipped: In = serde_json::from_slice(&line).unwrap();
            assert_eq!(
                (shipped.seq, shipped.hash),
                (ev.seq, hex::encode(ev.hash).as_str())
            );
        }
        let second_line = encode(&events[1], "n");
        let second = sluice_evidence::line::Line::parse(&second_line).unwrap();
        assert_eq!(second.actor, "wl-1");
        assert_eq!(second.prev, events[0].hash);
        // Nothing more until more is durable.
        let (more, _) = store.read_events(next, store.durable_seq(), 100).unwrap();
        assert!(more.is_empty());
        assert_eq!(token("a.b*c>"), "a_b_c_");
    }
}
