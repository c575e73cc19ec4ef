//! MCP over HTTP (streamable HTTP and the older SSE transport post
//! JSON-RPC messages): a `tools/call` request names the tool and its
//! arguments. A blocked call is answered with a JSON-RPC error for its id,
//! which MCP clients raise; the server never sees it.
use serde_json::{json, Value};

use super::{Api, ToolCall};

/// JSON-RPC error code for a call refused by policy (the range JSON-RPC
/// leaves to implementations).
pub const BLOCKED: i64 = -32001;

/// The `tools/call` requests in a JSON-RPC message or batch.
pub fn calls(body: &[u8]) -> Vec<(Value, ToolCall)> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let messages = match v {
        Value::Array(a) => a,
        one => vec![one],
    };
    messages
        .into_iter()
        .filter(|m| m["method"] == "tools/call")
        .map(|m| {
            let id = m["id"].clone();
            let call = ToolCall {
                api: Api::Mcp,
                id: id_text(&id),
                name: m["params"]["name"].as_str().unwrap_or_default().to_owned(),
                arguments: m["params"]
                    .get("arguments")
                    .map(Value::to_string)
                    .unwrap_or_else(|| "{}".into()),
            };
            (id, call)
        })
        .collect()
}

/// The results in an MCP server's answer (a JSON-RPC response or batch,
/// or an SSE stream of them): each id with its content's text joined, and
/// whether the tool said it failed (`isError`) or the server answered an
/// error.
pub fn results(body: &[u8]) -> Vec<(Value, String)> {
    let mut messages = Vec::new();
    let mut take = |v: Value| match v {
        Value::Array(a) => messages.extend(a),
        one => messages.push(one),
    };
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        take(v);
    } else {
        for line in String::from_utf8_lossy(body).lines() {
            if let Some(d) = line.strip_prefix("data:") {
                if let Ok(v) = serde_json::from_str::<Value>(d.trim_start()) {
                    take(v);
                }
            }
        }
    }
    messages
        .into_iter()
        .filter_map(|m| {
            let id = m.get("id")?.clone();
            if let Some(e) = m.get("error") {
                return Some((
                    id,
                    format!("error: {}", e["message"].as_str().unwrap_or("")),
                ));
            }
            let r = m.get("result")?;
            let content = r.get("content")?.as_array()?;
            let text: Vec<&str> = content.iter().filter_map(|c| c["text"].as_str()).collect();
            let prefix = if r["isError"] == true { "error: " } else { "" };
            Some((id, format!("{prefix}{}", text.join("\n"))))
        })
        .collect()
}

/// A JSON-RPC id as the record spells a call's id.
pub fn id_text(id: &Value) -> String {
    match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The JSON-RPC error answering a blocked call.
pub fn error(id: &Value, call: &ToolCall, message: &str) -> Vec<u8> {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": BLOCKED,
            "message": format!("Sluice blocked the tool call `{}`: {message}", call.name),
        },
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_call_requests_are_read_and_answered() {
        let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"shell","arguments":{"command":"rm -rf ~"}}}"#;
        let c = calls(body);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].1.name, "shell");
        assert_eq!(c[0].1.arguments, r#"{"command":"rm -rf ~"}"#);
        let e: Value = serde_json::from_slice(&error(&c[0].0, &c[0].1, "no")).unwrap();
        assert_eq!(e["id"], 7);
        assert_eq!(e["error"]["code"], BLOCKED);
        assert!(calls(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).is_empty());
        assert!(calls(b"not json").is_empty());
        let sse = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"content\":[{\"type\":\"text\",\"text\":\"ran: ls\"}],\"isError\":false}}\n\n";
        assert_eq!(
            results(sse),
            vec![(serde_json::json!(7), "ran: ls".to_owned())]
        );
    }
}
