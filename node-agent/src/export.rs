//! Rendering a recorded session for investigators: a readable replay
//! timeline, JSON lines, and HAR 1.2 (what browser dev tools open).
use std::{fmt::Write, time::UNIX_EPOCH};

use serde_json::{json, Value};

use crate::record::{BodyRecord, ConnectionRecord, Evidence, Exchange, Header, Statement};

pub(crate) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

fn who(s: &ConnectionRecord) -> String {
    let i = &s.identity;
    match &i.ci {
        Some(ci) => format!(
            "{} {} run {} job {} by {} ({})",
            ci.system,
            ci.repository.as_deref().unwrap_or("?"),
            ci.run_id.as_deref().unwrap_or("?"),
            ci.job.as_deref().unwrap_or("?"),
            ci.actor.as_deref().unwrap_or("?"),
            i.id
        ),
        None => format!("{} ({})", i.cgroup_path.as_deref().unwrap_or("?"), i.id),
    }
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

fn har_headers(h: &[Header]) -> Value {
    Value::Array(
        h.iter()
            .map(|x| json!({ "name": x.name, "value": x.value }))
            .collect(),
    )
}

fn header<'a>(h: &'a [Header], name: &str) -> Option<&'a str> {
    h.iter()
        .find(|x| x.name.eq_ignore_ascii_case(name))
        .map(|x| x.value.as_str())
}

fn har_version(v: &str) -> &'static str {
    match v {
        "HTTP/2.0" => "HTTP/2",
        "HTTP/1.0" => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// HAR 1.2, the evidence in `log._evidence` (custom fields start with `_`).
pub fn har(s: &ConnectionRecord, exchanges: &[Exchange], evidence: &Evidence) -> Value {
    let entries: Vec<Value> = exchanges
        .iter()
        .map(|ex| {
            let url = format!("https://{}{}", ex.authority, ex.path);
            let query: Vec<Value> = ex
                .path
                .split_once('?')
                .map(|(_, q)| {
                    q.split('&')
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (n, v) = p.split_once('=').unwrap_or((p, ""));
                            json!({ "name": n, "value": v })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut request = json!({
                "method": ex.method,
                "url": url,
                "httpVersion": har_version(&ex.http_version),
                "cookies": [],
                "headers": har_headers(&ex.request_headers),
                "queryString": query,
                "headersSize": -1,
                "bodySize": ex.request_body.size,
            });
            if ex.request_body.size > 0 {
                let mut post = json!({
                    "mimeType": header(&ex.request_headers, "content-type").unwrap_or("application/octet-stream"),
                    "text": ex.request_body.text.clone().or_else(|| ex.request_body.base64.clone()).unwrap_or_default(),
                });
                if ex.request_body.text.is_none() {
                    post["comment"] = json!("base64");
                }
                request["postData"] = post;
            }
            let mut content = json!({
                "size": ex.response_body.size,
                "mimeType": header(&ex.response_headers, "content-type").unwrap_or(""),
            });
            if let Some(t) = &ex.response_body.text {
                content["text"] = json!(t);
            } else if let Some(b) = &ex.response_body.base64 {
                content["text"] = json!(b);
                content["encoding"] = json!("base64");
            }
            if ex.response_body.truncated {
                content["comment"] = json!("body truncated at the node's capture cap");
            }
            let ttfb = ex.ttfb_ms.unwrap_or(ex.duration_ms);
            let mut entry = json!({
                "startedDateTime": rfc3339(ex.started_at_ms),
                "time": ex.duration_ms,
                "request": request,
                "response": {
                    "status": ex.status.unwrap_or(0),
                    "statusText": ex.status
                        .and_then(|s| hyper::StatusCode::from_u16(s).ok())
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or(""),
                    "httpVersion": har_version(&ex.http_version),
                    "cookies": [],
                    "headers": har_headers(&ex.response_headers),
                    "content": content,
                    "redirectURL": header(&ex.response_headers, "location").unwrap_or(""),
                    "headersSize": -1,
                    "bodySize": ex.response_body.size,
                },
                "cache": {},
                "timings": {
                    "send": 0,
                    "wait": ttfb,
                    "receive": (ex.duration_ms - ttfb).max(0.0),
                },
                "serverIPAddress": s.original_dst.map(|d| d.0.ip().to_string()).unwrap_or_default(),
                "connection": s.id.to_string(),
            });
            if let Some(e) = &ex.error {
                entry["comment"] = json!(e);
            }
            entry
        })
        .collect();
    json!({
        "log": {
            "version": "1.2",
            "creator": { "name": "sluice", "version": env!("CARGO_PKG_VERSION") },
            "comment": format!("session {} — {}", s.id, who(s)),
            "pages": [],
            "entries": entries,
            "_evidence": evidence,
        }
    })
}
