//! `sluice-console bench`: the store under generated evidence, through the
//! same path ingest takes (`ingest::take`: parse, chain check, store,
//! projection): events per second into the chosen store, then search
//! latency (p50/p95) over everything generated for the searches the
//! sessions page offers. Prints one JSON object. Run by `cargo xtask
//! bench console`, never as a timed test.
use std::time::Instant;

use serde_json::json;
use sluice_evidence::chain::{content_digest, link_hash, Hash};

use crate::{
    ingest,
    notify::Notifier,
    store::{Filter, Store, StoreError},
};

const REPOS: usize = 200;
const ACTORS: usize = 50;

/// One spool line as a node ships it.
fn line(
    node: &str,
    seq: u64,
    prev: &Hash,
    connection: u64,
    kind: &str,
    body: &str,
) -> (Vec<u8>, Hash) {
    let at_ms = 1_700_000_000_000 + seq;
    let hash = link_hash(
        prev,
        seq,
        &content_digest(at_ms, connection, kind, body.as_bytes()),
    );
    let text = format!(
        r#"{{"seq":{seq},"prev":"{}","hash":"{}","at_ms":{at_ms},"connection":{connection},"kind":"{kind}","node":"{node}","actor":"wl-{}","body":{body}}}"#,
        hex::encode(prev),
        hex::encode(hash),
        connection % 997
    );
    (text.into_bytes(), hash)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

pub fn run(
    store: &Store,
    exchanges: u64,
    per_session: u64,
) -> Result<serde_json::Value, StoreError> {
    let node = "bench-node";
    let mut prev = [0u8; 32];
    let mut seq = 0u64;
    let sessions = exchanges.div_ceil(per_session.max(1));
    let started = Instant::now();
    let mut events = 0u64;
    let notify = Notifier::disabled();
    let mut take = |conn: u64, kind: &str, body: String, prev: &mut Hash, seq: &mut u64| {
        let (payload, hash) = line(node, *seq, prev, conn, kind, &body);
        *prev = hash;
        *seq += 1;
        events += 1;
        ingest::take(
            store,
            &notify,
            "sluice.evidence.bench-node.wl",
            &payload,
            None,
        )
    };
    for s in 1..=sessions {
        let repo = format!("acme/repo-{}", s as usize % REPOS);
        let actor = format!("dev-{}", s as usize % ACTORS);
        // A node writes the whole connection record with each of its events.
        let mut record = json!({"id": s, "identity": {"id": format!("wl-{}", s % 997), "ci": {"system": "github-actions", "repository": repo, "run_id": (s / 10).to_string(), "job": "build", "actor": actor}}, "target": "cursor-api", "started_at_ms": 1_700_000_000_000u64 + s * 10, "outcome": "open"});
        take(
            s,
            "connection.open",
            record.to_string(),
            &mut prev,
            &mut seq,
        )?;
        for x in 0..per_session {
            let body = json!({
                "session": s, "seq": x, "method": "POST", "authority": "api2.cursor.sh",
                "path": "/aiserver.v1.ChatService/StreamUnifiedChatWithTools", "status": 200,
                "started_at_ms": 1_700_000_000_000u64 + s * 10 + x,
                "decisions": if x % 17 == 0 { json!([{"rule": "mask-secrets"}]) } else { json!([]) },
                "request_body": {"text": format!("refactor the parser in module {x} of session {s}")},
                "response_body": {"text": format!("here is the change {s}-{x} with key ********************")},
            });
            take(
                s,
                "exchange.completed",
                body.to_string(),
                &mut prev,
                &mut seq,
            )?;
        }
        record["ended_at_ms"] = json!(1_700_000_000_000u64 + s * 10 + 9);
        record["outcome"] = json!("closed");
        take(
            s,
            "connection.closed",
            record.to_string(),
            &mut prev,
            &mut seq,
        )?;
    }
    let secs = started.elapsed().as_secs_f64();
    let ingest_rate = events as f64 / secs;
    let searches: Vec<(&str, Filter)> = vec![
        ("recent (no filter)", Filter::default()),
        (
            "repository",
            Filter {
                repository: Some("acme/repo-17".into()),
                ..Default::default()
            },
        ),
        (
            "actor",
            Filter {
                actor: Some("dev-3".into()),
                ..Default::default()
            },
        ),
        (
            "run",
            Filter {
                run_id: Some((sessions / 20).to_string()),
                ..Default::default()
            },
        ),
        (
            "rule",
            Filter {
                rule: Some("mask-secrets".into()),
                ..Default::default()
            },
        ),
        (
            "free text",
            Filter {
                q: Some(format!("change {}-3 ", sessions / 2)),
                ..Default::default()
            },
        ),
        (
            "repository + time range",
            Filter {
                repository: Some("acme/repo-17".into()),
                from_ms: Some(1_700_000_000_000 + sessions * 5),
                to_ms: Some(1_700_000_000_000 + sessions * 8),
                ..Default::default()
            },
        ),
    ];
    let mut results = Vec::new();
    for (name, f) in searches {
        let mut ms = Vec::new();
        let mut found = 0;
        for _ in 0..15 {
            let t = Instant::now();
            found = store.sessions(&f)?.len();
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        results.push(json!({
            "search": name, "sessions_found": found,
            "p50_ms": percentile(&mut ms.clone(), 0.5), "p95_ms": percentile(&mut ms, 0.95),
        }));
    }
    Ok(json!({
        "store": store.backend(),
        "exchanges": sessions * per_session,
        "sessions": sessions,
        "events": events,
        "ingest_seconds": secs,
        "ingest_events_per_second": ingest_rate,
        "searches": results,
    }))
}
