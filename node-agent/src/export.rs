//! Rendering a recorded session for investigators: a readable replay
//! timeline, JSON lines, and HAR 1.2 (what browser dev tools open).
use std::fmt::Write;

use serde_json::{json, Value};

use crate::record::{BodyRecord, ConnectionRecord, Evidence, Exchange, Header, Statement};

use crate::record::rfc3339;

/// Who made the session (the same line the HAR's comment carries).
fn who(s: &ConnectionRecord) -> String {
    sluice_evidence::har::who(&serde_json::to_value(s).unwrap_or(Value::Null))
}

fn body_preview(b: &BodyRecord, out: &mut String) {
    if b.size == 0 {
        return;
    }
    let bytes = b.bytes();
    let mark = if b.truncated { " [truncated]" } else { "" };
    match &b.text {
        Some(t) => {
            let _ = writeln!(out, "      body ({} bytes{mark}):", b.size);
            for line in t.lines().take(40) {
                let _ = writeln!(out, "        {line}");
            }
        }
        None => {
            let _ = writeln!(
                out,
                "      body ({} bytes, binary{mark}, {} captured)",
                b.size,
                bytes.len()
            );
        }
    }
}

fn header_lines(h: &[Header], out: &mut String) {
    for x in h {
        let _ = writeln!(out, "      {}: {}", x.name, x.value);
    }
}

/// What the node decided: an investigator's first question.
fn decision_lines(decisions: &[crate::record::Decision], out: &mut String) {
    for d in decisions {
        let patterns = if d.patterns.is_empty() {
            String::new()
        } else {
            format!(" [{}]", d.patterns.join(", "))
        };
        let detail = d
            .detail
            .as_deref()
            .map(|x| format!(": {x}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "      decision: {} {}{patterns}{detail}",
            d.action, d.rule
        );
    }
}

/// The exchanges and statements, in order, as a readable timeline.
pub fn replay(s: &ConnectionRecord, exchanges: &[Exchange], statements: &[Statement]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "session {} at {}", s.id, rfc3339(s.started_at_ms));
    let _ = writeln!(out, "  who:    {}", who(s));
    let _ = writeln!(
        out,
        "  process: pid {} (thread {}) {} uid {} exe {}",
        s.process.tgid,
        s.process.pid,
        s.process.comm,
        s.process.uid,
        s.process.exe.as_deref().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "  to:     {} ({}){}",
        s.original_dst
            .map(|d| d.to_string())
            .unwrap_or_else(|| "-".into()),
        s.target.as_deref().unwrap_or("-"),
        s.tls
            .as_ref()
            .map(|t| format!(
                " TLS {} SNI {} ALPN {}",
                t.mode,
                t.sni.as_deref().unwrap_or("-"),
                t.alpn.as_deref().unwrap_or("-")
            ))
            .unwrap_or_default()
    );
    for ex in exchanges {
        let t = ex.started_at_ms.saturating_sub(s.started_at_ms);
        let _ = writeln!(
            out,
            "  [+{:>7.3}s] -> {} https://{}{} ({})",
            t as f64 / 1000.0,
            ex.method,
            ex.authority,
            ex.path,
            ex.http_version
        );
        header_lines(&ex.request_headers, &mut out);
        body_preview(&ex.request_body, &mut out);
        match ex.status {
            Some(st) => {
                let _ = writeln!(
                    out,
                    "  [+{:>7.3}s] <- {} after {:.1} ms to first byte, {:.1} ms total",
                    (t as f64 + ex.ttfb_ms.unwrap_or(0.0)) / 1000.0,
                    st,
                    ex.ttfb_ms.unwrap_or(0.0),
                    ex.duration_ms
                );
                header_lines(&ex.response_headers, &mut out);
                body_preview(&ex.response_body, &mut out);
            }
            None => {
                let _ = writeln!(out, "  [        ] <- no response");
            }
        }
        if let Some(u) = &ex.upgrade {
            let _ = writeln!(out, "      upgraded to {u}");
        }
        decision_lines(&ex.decisions, &mut out);
        for t in &ex.tool_calls {
            let _ = writeln!(
                out,
                "      tool call ({}) `{}` {} {}{}",
                serde_json::to_value(t.call.api)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                t.call.name,
                t.call.arguments,
                match t.verdict {
                    crate::record::ToolVerdict::Allowed => "allowed",
                    crate::record::ToolVerdict::Blocked => "BLOCKED",
                },
                t.rule
                    .as_deref()
                    .map(|r| format!(" by {r}"))
                    .unwrap_or_default()
            );
            if let Some(r) = &t.result {
                let _ = writeln!(out, "        result: {r}");
            }
        }
        if let Some(i) = &ex.injected {
            let _ = writeln!(
                out,
                "      credential: node-held `{}` injected; the job's ({}) stripped",
                i.header,
                i.client_presented
                    .iter()
                    .map(|h| format!("{} {}", h.name, h.value))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(e) = &ex.error {
            let _ = writeln!(out, "      error: {e}");
        }
    }
    if let Some(db) = &s.database {
        let _ = writeln!(
            out,
            "  db:     {} database `{}` as `{}`{} — login: {} ({})",
            db.db_system,
            db.db_name,
            db.db_user,
            db.db_application
                .as_deref()
                .map(|a| format!(" ({a})"))
                .unwrap_or_default(),
            db.login,
            db.method
        );
    }
    for st in statements {
        let t = st.started_at_ms.saturating_sub(s.started_at_ms);
        let class = st
            .sql
            .class
            .map(|c| format!("{c:?}").to_lowercase())
            .unwrap_or_else(|| "unparsed".into());
        let _ = writeln!(
            out,
            "  [+{:>7.3}s] SQL ({}, {}{}): {}",
            t as f64 / 1000.0,
            class,
            st.protocol,
            st.prepared
                .as_deref()
                .map(|p| format!(" `{p}`"))
                .unwrap_or_default(),
            st.db_query
        );
        if !st.db_query_parameters.is_empty() {
            let params: Vec<String> = st
                .db_query_parameters
                .iter()
                .map(|p| p.clone().unwrap_or_else(|| "NULL".into()))
                .collect();
            let _ = writeln!(out, "      parameters: {}", params.join(", "));
        }
        let _ = writeln!(
            out,
            "      -> {} {} row(s) returned, {:.1} ms{}",
            st.command_tag.as_deref().unwrap_or("-"),
            st.rows_returned,
            st.duration_ms,
            st.sqlstate
                .as_deref()
                .map(|c| format!(", SQLSTATE {c}"))
                .unwrap_or_default()
        );
        decision_lines(&st.decisions, &mut out);
        if let Some(e) = &st.error {
            let _ = writeln!(out, "      error: {e}");
        }
    }
    let _ = writeln!(
        out,
        "  end:    {} — {} bytes up, {} bytes down, {:?}",
        s.ended_at_ms
            .map(rfc3339)
            .unwrap_or_else(|| "(open)".into()),
        s.bytes_up,
        s.bytes_down,
        s.outcome
    );
    out
}

/// One JSON object per line: the session, each exchange, then the
/// evidence (node key, signed checkpoint, chain links from the session's
/// first event to it; `sluice verify --export` checks it offline).
pub fn jsonl(
    s: &ConnectionRecord,
    exchanges: &[Exchange],
    statements: &[Statement],
    evidence: &Evidence,
) -> Result<String, serde_json::Error> {
    let mut out = serde_json::to_string(&json!({ "type": "session", "session": s }))?;
    out.push('\n');
    for ex in exchanges {
        out.push_str(&serde_json::to_string(
            &json!({ "type": "exchange", "exchange": ex }),
        )?);
        out.push('\n');
    }
    for st in statements {
        out.push_str(&serde_json::to_string(
            &json!({ "type": "statement", "statement": st }),
        )?);
        out.push('\n');
    }
    out.push_str(&serde_json::to_string(
        &json!({ "type": "evidence", "evidence": evidence }),
    )?);
    out.push('\n');
    Ok(out)
}

/// The evidence an export (jsonl or HAR) carries.
pub fn evidence_of(text: &str) -> Option<Evidence> {
    if let Some(ev) = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|har| har.get("log")?.get("_evidence").cloned())
    {
        return serde_json::from_value(ev).ok();
    }
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "evidence")
        .and_then(|v| serde_json::from_value(v["evidence"].clone()).ok())
}

/// HAR 1.2, the evidence in `log._evidence` (one writer with the
/// console's: `sluice_evidence::har`).
pub fn har(s: &ConnectionRecord, exchanges: &[Exchange], evidence: &Evidence) -> Value {
    let session = serde_json::to_value(s).unwrap_or(Value::Null);
    let exchanges: Vec<Value> = exchanges
        .iter()
        .filter_map(|x| serde_json::to_value(x).ok())
        .collect();
    let evidence = serde_json::to_value(evidence).unwrap_or(Value::Null);
    sluice_evidence::har::build(&session, &exchanges, &evidence, "sluice")
}
