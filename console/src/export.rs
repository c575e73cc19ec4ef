//! A session as evidence, from the console alone (the runner host may be
//! long gone): JSON lines in the node's export format — the connection
//! record, its exchanges and statements, and the proof: the session's own
//! events in full and every other event between them and the node's next
//! signed checkpoint by content digest, with the node's pinned key. The
//! node's CLI checks it offline (`sluice verify --export FILE`), by the
//! same `Evidence::verify` the node's own exports use.
use serde_json::{json, Value};
use sluice_evidence::{
    chain::content_digest,
    checkpoint::{Evidence, ProofLink, PublicKey},
};

use crate::store::{Store, StoreError};

/// What an export is made of: the connection record as the node last
/// wrote it, the exchanges and statements, and the proof (or why there is
/// none yet).
struct Parts {
    session: Value,
    exchanges: Vec<crate::store::ExchangeRow>,
    evidence: Result<Evidence, String>,
}

fn parts(store: &Store, node: &str, id: u64) -> Result<Option<Parts>, StoreError> {
    let Some((_, exchanges)) = store.session(node, id)? else {
        return Ok(None);
    };
    let evidence = evidence(store, node, id)?;
    let own = match store.session_span(node, id)? {
        Some((first, last)) => store.events_between(node, first, last)?,
        None => Vec::new(),
    };
    let session: Value = own
        .iter()
        .rev()
        .filter(|e| e.connection == id && e.kind.starts_with("connection"))
        .find_map(|e| serde_json::from_slice(&e.body).ok())
        .unwrap_or(Value::Null);
    // With a proof, what is shown is what it proves (events ingested
    // between the reads above and the checkpoint's choice are in it).
    if let Ok(ev) = &evidence {
        let p = sluice_evidence::shown::proven(ev);
        if !p.session.is_null() {
            let row = |protocol: &str, record: Value| crate::store::ExchangeRow {
                protocol: protocol.into(),
                seq: record["seq"].as_u64().unwrap_or(0),
                state: None,
                started_at_ms: 0,
                summary: String::new(),
                status: None,
                rules: Vec::new(),
                record,
            };
            let exchanges = p
                .exchanges
                .into_values()
                .map(|r| row("http", r))
                .chain(p.statements.into_values().map(|r| row("sql", r)))
                .collect();
            return Ok(Some(Parts {
                session: p.session,
                exchanges,
                evidence,
            }));
        }
    }
    Ok(Some(Parts {
        session,
        exchanges,
        evidence,
    }))
}

/// The JSONL export, or `None` if the console has no such session.
pub fn jsonl(store: &Store, node: &str, id: u64) -> Result<Option<String>, StoreError> {
    let Some(p) = parts(store, node, id)? else {
        return Ok(None);
    };
    let mut out = String::new();
    let mut line = |v: Value| {
        out.push_str(&v.to_string());
        out.push('\n');
    };
    line(json!({ "type": "session", "session": p.session, "node": node }));
    for x in p.exchanges {
        if x.protocol == "sql" {
            line(json!({ "type": "statement", "statement": x.record }));
        } else {
            line(json!({ "type": "exchange", "exchange": x.record }));
        }
    }
    match p.evidence {
        Ok(e) => line(json!({ "type": "evidence", "evidence": e })),
        Err(why) => line(json!({ "type": "evidence", "evidence": null, "missing": why })),
    }
    Ok(Some(out))
}

/// The HAR export (HTTP exchanges; a Postgres session's statements are in
/// `log._statements`), the proof in `log._evidence`, or `None`.
pub fn har(store: &Store, node: &str, id: u64) -> Result<Option<Value>, StoreError> {
    let Some(p) = parts(store, node, id)? else {
        return Ok(None);
    };
    let (sql, http): (Vec<_>, Vec<_>) = p.exchanges.into_iter().partition(|x| x.protocol == "sql");
    let http: Vec<Value> = http.into_iter().map(|x| x.record).collect();
    let evidence = match &p.evidence {
        Ok(e) => serde_json::to_value(e).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let mut har = sluice_evidence::har::build(&p.session, &http, &evidence, "sluice-console");
    har["log"]["_node"] = json!(node);
    if !sql.is_empty() {
        har["log"]["_statements"] = sql.into_iter().map(|x| x.record).collect();
    }
    if let Err(why) = p.evidence {
        har["log"]["_evidence_missing"] = json!(why);
    }
    Ok(Some(har))
}

/// The proof for a session, or why there is none yet.
pub fn evidence(
    store: &Store,
    node: &str,
    id: u64,
) -> Result<Result<Evidence, String>, StoreError> {
    let Some((first, last)) = store.session_span(node, id)? else {
        return Ok(Err("no event of this session is held".into()));
    };
    let Some(key) = store.node_key(node)? else {
        return Ok(Err(
            "no key is known for this node yet (no checkpoint received)".into(),
        ));
    };
    let Some(cp) = store.checkpoint_from(node, last)? else {
        return Ok(Err(format!(
            "no signed checkpoint covers event {last} yet (the node signs one every few seconds)"
        )));
    };
    let events = store.events_between(node, first, cp.seq)?;
    if events.len() as u64 != cp.seq - first + 1 {
        return Ok(Err(format!(
            "events {first}..={} are not all held here (retention, or the console joined late)",
            cp.seq
        )));
    }
    let links = events
        .iter()
        .map(|e| {
            if e.connection == id {
                ProofLink {
                    seq: e.seq,
                    digest: None,
                    at_ms: Some(e.at_ms),
                    connection: Some(e.connection),
                    kind: Some(e.kind.clone()),
                    body: Some(String::from_utf8_lossy(&e.body).into_owned()),
                }
            } else {
                ProofLink {
                    seq: e.seq,
                    digest: Some(hex::encode(content_digest(
                        e.at_ms,
                        e.connection,
                        &e.kind,
                        &e.body,
                    ))),
                    at_ms: None,
                    connection: None,
                    kind: None,
                    body: None,
                }
            }
        })
        .collect();
    let ev = Evidence {
        node_key: PublicKey {
            kid: key.kid,
            alg: "Ed25519".into(),
            ed25519: key.ed25519,
        },
        checkpoint: Some(cp),
        prev: events.first().map(|e| e.prev.clone()).unwrap_or_default(),
        links,
    };
    // Offered only if it holds: a console never hands out a proof that fails.
    Ok(ev.verify().map(|_| ev))
}
