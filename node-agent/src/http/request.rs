//! Request stage: what request rules judge, and their verdict (block,
//! hold for approval, allow). Rules see what the upstream will act on:
//! the decoded body (Content-Encoding undone), the JSON-unescaped string
//! values of a JSON body, the percent-decoded path and query, and header
//! values (credentials excluded: they are handled by injection).
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{body::Incoming, http::request::Parts};
use tracing::warn;

use super::{
    decode::{decode_chain, Encoding},
    HttpSession, CREDENTIAL_HEADERS,
};
use crate::{
    record::Exchange,
    scan::{charset, json},
    verdict::{Denial, DenialKind, Held, Judged},
};

/// Percent-decoding of a path or query (`+` is a space in queries).
fn percent_decode(s: &str, plus_is_space: bool) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// The text request rules scan: body, the texts of a JSON body (unescaped
/// strings, keys, numbers, byte arrays; content parts also joined), URL
/// and headers, separated by newlines so nothing matches across parts.
pub fn inspection_text(parts: &Parts, body: &[u8]) -> Vec<u8> {
    let mut text = Vec::with_capacity(body.len() * 2 + 256);
    text.extend_from_slice(body);
    if let Ok(texts) = json::texts(body) {
        // Content parts (`[{"text":"produc"},{"text":"tion password"}]`)
        // reach the model as one text: judged joined as well as alone.
        for run in json::runs(&texts) {
            text.push(b'\n');
            for &i in &run {
                text.extend_from_slice(&texts[i].decoded);
            }
        }
        for s in texts {
            text.push(b'\n');
            text.extend_from_slice(&s.decoded);
        }
    }
    text.push(b'\n');
    text.extend(percent_decode(parts.uri.path(), false));
    if let Some(q) = parts.uri.query() {
        text.push(b'?');
        text.extend(percent_decode(q, true));
    }
    for (name, value) in &parts.headers {
        if CREDENTIAL_HEADERS.contains(&name.as_str()) {
            continue;
        }
        text.push(b'\n');
        text.extend_from_slice(name.as_str().as_bytes());
        text.extend_from_slice(b": ");
        text.extend_from_slice(value.as_bytes());
    }
    text
}

impl HttpSession {
    /// Reads the whole request body (bounded), judges it through the
    /// session's verdict stages, and returns the bytes to forward
    /// (unchanged), or the denial.
    pub(super) async fn judge_request(
        &self,
        parts: &Parts,
        body: Incoming,
        ex: &mut Exchange,
    ) -> Result<Bytes, Denial> {
        let policy = self.policy.current();
        let bytes = match http_body_util::Limited::new(body, self.max_scan_request)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let too_big = e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some();
                let d = if too_big {
                    Denial::new(
                        "request-too-large",
                        DenialKind::TooLarge,
                        format!(
                            "request body larger than the {} bytes the policy can scan",
                            self.max_scan_request
                        ),
                    )
                } else {
                    Denial::new(
                        "request-unreadable",
                        DenialKind::Unreadable,
                        format!("reading request body: {e}"),
                    )
                };
                ex.error = Some(d.message.clone());
                return Err(d);
            }
        };
        ex.request_body.size = bytes.len() as u64;
        ex.request_body
            .set_bytes(bytes[..bytes.len().min(self.body_cap)].to_vec());
        ex.request_body.truncated = bytes.len() > self.body_cap;
        ex.request_body.complete = true;

        // Fail closed: what cannot be decoded cannot be judged. Every coding of every Content-Encoding header, last applied first.
        let decoded = match Encoding::parse_all(
            parts
                .headers
                .get_all(hyper::header::CONTENT_ENCODING)
                .iter()
                .map(|v| v.as_bytes()),
        )
        .and_then(|c| decode_chain(&c, &bytes, self.max_scan_request))
        .map_err(|e| e.to_string())
        .and_then(|d| {
            // JSON in UTF-16/32 or behind a BOM is judged as the text it is.
            let t = charset::json_text(&d).map_err(|e| e.to_string())?;
            let text = match t {
                std::borrow::Cow::Borrowed(s) if s.len() == d.len() => None,
                other => Some(other.into_owned()),
            };
            Ok(text.unwrap_or(d))
        }) {
            Ok(d) => d,
            Err(e) => {
                let d = Denial::new(
                    "request-uninspectable",
                    DenialKind::Uninspectable,
                    format!("request body cannot be inspected: {e}"),
                );
                ex.error = Some(d.message.clone());
                return Err(d);
            }
        };
        let text = inspection_text(parts, &decoded);
        let evaluated = policy.evaluate_request(&self.target, &self.identity, &text);
        let denial = match self.judge(evaluated, &mut ex.decisions) {
            Judged::Allow => {
                return self
                    .judge_tool_calls(&policy, &decoded, ex)
                    .await
                    .map(|()| bytes)
            }
            Judged::Deny(d) => d,
            Judged::Hold(hold) => {
                let held = Held {
                    method: ex.method.clone(),
                    authority: ex.authority.clone(),
                    path: ex.path.clone(),
                    preview: String::from_utf8_lossy(&decoded[..decoded.len().min(512)])
                        .into_owned(),
                };
                match self.hold(hold, held, &mut ex.decisions).await {
                    Ok(()) => {
                        return self
                            .judge_tool_calls(&policy, &decoded, ex)
                            .await
                            .map(|()| bytes)
                    }
                    Err(d) => d,
                }
            }
        };
        if denial.kind == DenialKind::ScanFailed {
            ex.error = Some(format!("policy scan failed: {}", denial.message));
        }
        warn!(session = self.id, workload = %self.identity.id, rule = %denial.rule, kind = denial.kind.as_str(), "request refused");
        Err(denial)
    }
}

impl HttpSession {
    /// MCP: each `tools/call` in the (JSON-RPC) body judged by the
    /// `on: tool_call` rules through the session's verdict stages (an
    /// `approve` rule holds it for a human); the first refused call
    /// refuses the request with a JSON-RPC error for its id. Every call is
    /// recorded.
    async fn judge_tool_calls(
        &self,
        policy: &crate::policy::CompiledPolicy,
        body: &[u8],
        ex: &mut Exchange,
    ) -> Result<(), Denial> {
        use crate::record::{ToolCallRecord, ToolVerdict};
        if !policy.has_tool_rules(&self.target, &self.identity) {
            return Ok(());
        }
        for (id, call) in crate::tools::mcp::calls(body) {
            let workspace = self
                .identity
                .ci
                .as_ref()
                .and_then(|c| c.workspace.as_deref());
            let evaluated = policy.evaluate_tool_call_in(&call, workspace, |i| {
                policy.rule_applies(i, &self.target, &self.identity)
            });
            let refused = match self.judge(evaluated, &mut ex.decisions) {
                Judged::Allow => None,
                Judged::Deny(d) => Some(d),
                Judged::Hold(hold) => {
                    let rule = Some(hold.rule().to_owned());
                    let held = Held {
                        method: "MCP tools/call".into(),
                        authority: ex.authority.clone(),
                        path: call.name.clone(),
                        preview: call.arguments.chars().take(512).collect(),
                    };
                    match self.hold(hold, held, &mut ex.decisions).await {
                        Ok(()) => {
                            ex.tool_calls.push(ToolCallRecord::new(
                                call,
                                ToolVerdict::Allowed,
                                rule,
                            ));
                            continue;
                        }
                        Err(d) => Some(d),
                    }
                }
            };
            let Some(d) = refused else {
                ex.tool_calls
                    .push(ToolCallRecord::new(call, ToolVerdict::Allowed, None));
                continue;
            };
            warn!(session = self.id, workload = %self.identity.id, rule = %d.rule, tool = %call.name, "MCP tool call refused");
            let mut denial = Denial::new(
                &d.rule,
                DenialKind::ToolCall,
                format!("Sluice blocked the tool call `{}`: {}", call.name, d.text()),
            );
            denial.rpc_id = Some(id);
            ex.tool_calls.push(ToolCallRecord::new(
                call,
                ToolVerdict::Blocked,
                Some(d.rule),
            ));
            return Err(denial);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspection_sees_unescaped_json_url_and_headers_not_credentials() {
        let req = hyper::Request::builder()
            .uri("/v1/chat?q=production%20password&x=a+b")
            .header("x-note", "hello header")
            .header("authorization", "Bearer sk-should-not-appear")
            .body(())
            .unwrap();
        let (parts, _) = req.into_parts();
        let body = br#"{"messages":[{"content":"\u0041KIA and production\u0020password"}]}"#;
        let text = String::from_utf8(inspection_text(&parts, body)).unwrap();
        assert!(text.contains("AKIA and production password"), "{text}");
        assert!(text.contains("q=production password&x=a b"), "{text}");
        assert!(text.contains("x-note: hello header"), "{text}");
        assert!(!text.contains("sk-should-not-appear"), "{text}");
    }

    #[test]
    fn percent_decoding_tolerates_bad_escapes() {
        assert_eq!(percent_decode("%41%zz%4", false), b"A%zz%4");
    }
}
