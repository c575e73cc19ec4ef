//! A denial as HTTP: the status and the JSON body the node answers with
//! itself. Every refusal of a request is rendered here (the bodies are
//! what clients and users read; they stay as documented in POLICY.md).
use hyper::StatusCode;
use serde_json::{json, Value};

use crate::verdict::{Denial, DenialKind};

pub fn render(d: &Denial, identity: &str) -> (StatusCode, Value) {
    match d.kind {
        DenialKind::Suspended => (
            StatusCode::FORBIDDEN,
            json!({
                "error": "identity suspended",
                "identity": identity,
                "reason": d.reason,
            }),
        ),
        DenialKind::Blocked if d.rule == "upgrade-not-inspectable" => (
            StatusCode::FORBIDDEN,
            json!({ "error": "upgrade refused", "reason": d.message }),
        ),
        DenialKind::Blocked => (
            StatusCode::FORBIDDEN,
            json!({ "error": "blocked by policy", "rule": d.rule, "message": d.message }),
        ),
        DenialKind::NotApproved => (
            StatusCode::FORBIDDEN,
            json!({
                "error": "not approved", "rule": d.rule, "message": d.message, "reason": d.reason,
            }),
        ),
        // The scanner's own error stays in the record, not in the answer.
        DenialKind::ScanFailed => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": "policy scan failed" }),
        ),
        DenialKind::Misdirected => (
            StatusCode::MISDIRECTED_REQUEST,
            json!({ "error": "misdirected request", "reason": d.message }),
        ),
        DenialKind::NotRecorded => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": "the node cannot record this request; not forwarded" }),
        ),
        DenialKind::Misconfigured => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "error": d.message }),
        ),
        DenialKind::Uninspectable => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            json!({ "error": d.message }),
        ),
        DenialKind::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, json!({ "error": d.message })),
        DenialKind::Unreadable => (StatusCode::BAD_REQUEST, json!({ "error": d.message })),
        DenialKind::UninspectableResponse => {
            (StatusCode::BAD_GATEWAY, json!({ "error": d.message }))
        }
        // MCP: a JSON-RPC error for the call's id, as a server answers it.
        DenialKind::ToolCall => match &d.rpc_id {
            Some(id) => (
                StatusCode::OK,
                json!({
                    "jsonrpc": "2.0",
                    "id": id,
                    "error": { "code": crate::tools::mcp::BLOCKED, "message": d.message },
                }),
            ),
            None => (
                StatusCode::FORBIDDEN,
                json!({ "error": "tool call blocked by policy", "rule": d.rule, "message": d.message }),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_status_and_policy_refusals_name_their_rule() {
        let d = Denial::new("no-prod", DenialKind::Blocked, "not in CI");
        let (s, b) = render(&d, "id");
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert_eq!(b["rule"], "no-prod");
        assert_eq!(b["error"], "blocked by policy");
        let mut d = Denial::new("hold", DenialKind::NotApproved, "needs a human");
        d.reason = Some("no approval within 1s".into());
        let (s, b) = render(&d, "id");
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert_eq!(b["reason"], "no approval within 1s");
        let d = Denial::new("scan-failed", DenialKind::ScanFailed, "hyperscan: oom");
        let (s, b) = render(&d, "id");
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!b.to_string().contains("oom"));
        for (k, status) in [
            (DenialKind::Misdirected, 421),
            (DenialKind::TooLarge, 413),
            (DenialKind::Uninspectable, 415),
            (DenialKind::Unreadable, 400),
            (DenialKind::NotRecorded, 503),
            (DenialKind::Misconfigured, 500),
            (DenialKind::UninspectableResponse, 502),
        ] {
            assert_eq!(render(&Denial::new("r", k, "m"), "id").0.as_u16(), status);
        }
    }
}
