//! HAR 1.2 of a recorded session (what browser dev tools open), built
//! from the records as JSON so that the node's export and the console's
//! are one writer. The evidence rides in `log._evidence` (custom fields
//! start with `_`), so `sluice verify --export` checks a HAR as it checks
//! JSON lines.
use serde_json::{json, Value};

/// The session's line in the HAR's comment: who made it.
pub fn who(session: &Value) -> String {
    let i = &session["identity"];
    let id = i["id"].as_str().unwrap_or("?");
    let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    match i.get("ci").filter(|c| !c.is_null()) {
        Some(ci) => format!(
            "{} {} run {} job {} by {} ({id})",
            s(&ci["system"]),
            s(&ci["repository"]),
            s(&ci["run_id"]),
            s(&ci["job"]),
            s(&ci["actor"]),
        ),
        None => format!("{} ({id})", s(&i["cgroup_path"])),
    }
}

/// The HAR of one session: its connection record, its exchanges (the
/// node's `Exchange` records as JSON), and the evidence.
pub fn build(session: &Value, exchanges: &[Value], evidence: &Value, creator: &str) -> Value {
    let server_ip = session["original_dst"]
        .as_str()
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let id = session["id"].as_u64().unwrap_or(0);
    let entries: Vec<Value> = exchanges
        .iter()
        .map(|ex| entry(ex, &server_ip, id))
        .collect();
    json!({
        "log": {
            "version": "1.2",
            "creator": { "name": creator, "version": env!("CARGO_PKG_VERSION") },
            "comment": format!("session {id} — {}", who(session)),
            "pages": [],
            "entries": entries,
            "_evidence": evidence,
        }
    })
}

fn entry(ex: &Value, server_ip: &str, session: u64) -> Value {
    let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let path = text(&ex["path"]);
    let version = version(ex["http_version"].as_str().unwrap_or(""));
    let req_headers = &ex["request_headers"];
    let resp_headers = &ex["response_headers"];
    let query: Vec<Value> = path
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
    let req_body = &ex["request_body"];
    let mut request = json!({
        "method": text(&ex["method"]),
        "url": format!("https://{}{path}", text(&ex["authority"])),
        "httpVersion": version,
        "cookies": [],
        "headers": headers(req_headers),
        "queryString": query,
        "headersSize": -1,
        "bodySize": req_body["size"].as_u64().unwrap_or(0),
    });
    if req_body["size"].as_u64().unwrap_or(0) > 0 {
        let mut post = json!({
            "mimeType": header(req_headers, "content-type").unwrap_or("application/octet-stream"),
            "text": req_body["text"].as_str().or(req_body["base64"].as_str()).unwrap_or(""),
        });
        if req_body["text"].is_null() {
            post["comment"] = json!("base64");
        }
        request["postData"] = post;
    }
    let resp_body = &ex["response_body"];
    let mut content = json!({
        "size": resp_body["size"].as_u64().unwrap_or(0),
        "mimeType": header(resp_headers, "content-type").unwrap_or(""),
    });
    if let Some(t) = resp_body["text"].as_str() {
        content["text"] = json!(t);
    } else if let Some(b) = resp_body["base64"].as_str() {
        content["text"] = json!(b);
        content["encoding"] = json!("base64");
    }
    if resp_body["truncated"].as_bool() == Some(true) {
        content["comment"] = json!("body truncated at the node's capture cap");
    }
    let duration = ex["duration_ms"].as_f64().unwrap_or(0.0);
    let ttfb = ex["ttfb_ms"].as_f64().unwrap_or(duration);
    let status = ex["status"].as_u64().unwrap_or(0);
    let mut entry = json!({
        "startedDateTime": rfc3339(ex["started_at_ms"].as_u64().unwrap_or(0)),
        "time": duration,
        "request": request,
        "response": {
            "status": status,
            "statusText": u16::try_from(status)
                .ok()
                .and_then(|s| http::StatusCode::from_u16(s).ok())
                .and_then(|s| s.canonical_reason())
                .unwrap_or(""),
            "httpVersion": version,
            "cookies": [],
            "headers": headers(resp_headers),
            "content": content,
            "redirectURL": header(resp_headers, "location").unwrap_or(""),
            "headersSize": -1,
            "bodySize": resp_body["size"].as_u64().unwrap_or(0),
        },
        "cache": {},
        "timings": {
            "send": 0,
            "wait": ttfb,
            "receive": (duration - ttfb).max(0.0),
        },
        "serverIPAddress": server_ip,
        "connection": session.to_string(),
    });
    if let Some(e) = ex["error"].as_str() {
        entry["comment"] = json!(e);
    }
    // Custom field (HAR allows `_`-prefixed ones): the tool calls the
    // exchange carried, with their verdicts.
    if let Some(t) = ex.get("tool_calls").filter(|t| t.is_array()) {
        entry["_toolCalls"] = t.clone();
    }
    entry
}

fn headers(h: &Value) -> Value {
    Value::Array(
        h.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| json!({ "name": x["name"], "value": x["value"] }))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

fn header<'a>(h: &'a Value, name: &str) -> Option<&'a str> {
    h.as_array()?
        .iter()
        .find(|x| {
            x["name"]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .and_then(|x| x["value"].as_str())
}

fn version(v: &str) -> &'static str {
    match v {
        "HTTP/2.0" => "HTTP/2",
        "HTTP/1.0" => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exchange_becomes_a_har_entry_with_its_bodies_and_timings() {
        let session = json!({
            "id": 7,
            "original_dst": "10.0.0.1:443",
            "identity": {"id": "gh-1", "ci": {"system": "github", "repository": "acme/w",
                         "run_id": "9", "job": "build", "actor": "alice"}},
        });
        let ex = json!({
            "method": "POST", "authority": "api.example", "path": "/v1?a=1&b",
            "http_version": "HTTP/2.0", "started_at_ms": 1_700_000_000_000u64,
            "request_headers": [{"name": "Content-Type", "value": "application/json"}],
            "request_body": {"size": 2, "text": "{}", "truncated": false, "complete": true},
            "status": 403,
            "response_headers": [{"name": "content-type", "value": "text/plain"}],
            "response_body": {"size": 3, "base64": "AAEC", "truncated": true, "complete": true},
            "ttfb_ms": 2.0, "duration_ms": 5.0,
        });
        let har = build(&session, &[ex], &json!({"links": []}), "sluice");
        let log = &har["log"];
        assert_eq!(log["version"], "1.2");
        assert_eq!(
            log["comment"],
            "session 7 — github acme/w run 9 job build by alice (gh-1)"
        );
        let e = &log["entries"][0];
        assert_eq!(e["request"]["url"], "https://api.example/v1?a=1&b");
        assert_eq!(
            e["request"]["queryString"][1],
            json!({"name": "b", "value": ""})
        );
        assert_eq!(e["request"]["postData"]["mimeType"], "application/json");
        assert_eq!(e["request"]["httpVersion"], "HTTP/2");
        assert_eq!(e["response"]["statusText"], "Forbidden");
        assert_eq!(e["response"]["content"]["encoding"], "base64");
        assert!(e["response"]["content"]["comment"].is_string());
        assert_eq!(e["timings"]["receive"], 3.0);
        assert_eq!(e["serverIPAddress"], "10.0.0.1");
        assert_eq!(log["_evidence"]["links"], json!([]));
    }
}
