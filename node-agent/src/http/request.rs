//! Request stage: what request rules judge, and their verdict (block,
//! hold for approval, allow). Rules see what the upstream will act on:
//! the decoded body (Content-Encoding undone), the JSON-unescaped string
//! values of a JSON body, the percent-decoded path and query, and header
//! values (credentials excluded: they are handled by injection).
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{body::Incoming, http::request::Parts, StatusCode};
use tracing::{info, warn};

use super::{
    decode::{decode_chain, Encoding},
    HttpSession, CREDENTIAL_HEADERS,
};
use crate::{
    approvals::Pending,
    policy::Verdict,
    record::Exchange,
    scan::{charset, json},
};

/// A request the node answers itself.
pub struct Refusal {
    pub status: StatusCode,
    pub body: serde_json::Value,
}

impl Refusal {
    fn new(status: StatusCode, body: serde_json::Value) -> Self {
        Self { status, body }
    }
}

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
    /// Reads the whole request body (bounded), judges it, and returns the
    /// bytes to forward (unchanged), or the refusal.
    pub(super) async fn judge_request(
        &self,
        parts: &Parts,
        body: Incoming,
        ex: &mut Exchange,
    ) -> Result<Bytes, Refusal> {
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
                let (status, msg) = if too_big {
                    (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "request body larger than the {} bytes the policy can scan",
                            self.max_scan_request
                        ),
                    )
                } else {
                    (
                        StatusCode::BAD_REQUEST,
                        format!("reading request body: {e}"),
                    )
                };
                ex.error = Some(msg.clone());
                return Err(Refusal::new(status, serde_json::json!({ "error": msg })));
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
                let msg = format!("request body cannot be inspected: {e}");
                ex.error = Some(msg.clone());
                return Err(Refusal::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    serde_json::json!({ "error": msg }),
                ));
            }
        };
        let text = inspection_text(parts, &decoded);
        let (verdict, decisions) =
            match policy.evaluate_request(&self.target, &self.identity, &text) {
                Ok(v) => v,
                Err(e) => {
                    ex.error = Some(format!("policy scan failed: {e}"));
                    return Err(Refusal::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({"error": "policy scan failed"}),
                    ));
                }
            };
        ex.decisions.extend(decisions);
        match verdict {
            Verdict::Allow => Ok(bytes),
            Verdict::Block { rule, message } => {
                warn!(session = self.id, workload = %self.identity.id, %rule, "request blocked by policy");
                Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    serde_json::json!({
                        "error": "blocked by policy", "rule": rule, "message": message,
                    }),
                ))
            }
            Verdict::Approve {
                rule,
                message,
                timeout_secs,
            } => {
                let pending = Pending {
                    id: 0,
                    session: self.id,
                    workload: self.identity.id.clone(),
                    rule: rule.clone(),
                    message: message.clone(),
                    method: ex.method.clone(),
                    authority: ex.authority.clone(),
                    path: ex.path.clone(),
                    preview: String::from_utf8_lossy(&decoded[..decoded.len().min(512)])
                        .into_owned(),
                    created_ms: 0,
                    expires_ms: 0,
                    hold: String::new(),
                    ci: self.identity.ci.clone(),
                };
                info!(session = self.id, workload = %self.identity.id, %rule, "request held for approval");
                let outcome = self
                    .approvals
                    .request(pending, Duration::from_secs(timeout_secs))
                    .await;
                let detail = serde_json::to_string(&outcome).unwrap_or_default();
                if let Some(d) = ex.decisions.iter_mut().find(|d| d.rule == rule) {
                    d.detail = Some(detail);
                }
                let denial = outcome.denial(timeout_secs);
                // A suspension while held also denies.
                let denial = denial.or_else(|| {
                    self.suspensions
                        .get(&self.identity)
                        .map(|s| format!("identity suspended: {}", s.reason))
                });
                match denial {
                    Some(reason) => Err(Refusal::new(
                        StatusCode::FORBIDDEN,
                        serde_json::json!({
                            "error": "not approved", "rule": rule, "message": message, "reason": reason,
                        }),
                    )),
                    None => Ok(bytes),
                }
            }
        }
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
