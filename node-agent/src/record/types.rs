//! The records' types, as stored and shown: connections and their
//! outcomes, exchanges, bodies, decisions and actions, events, filters.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{
    addr::{ClientAddr, OrigDstAddr},
    identity::{ProcessInfo, WorkloadIdentity},
};

/// Why a connection was not forwarded, as a type (metrics count by it,
/// the console alerts on it; records written before it was there read as
/// `other`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Not brought by the redirect (no origin for its client port).
    NoOrigin,
    /// Cannot be attributed to one job.
    Unattributable,
    /// Its original destination is the proxy itself.
    Loop,
    /// Its job was stopped for working against the node.
    Quarantined,
    /// Its identity has `limits.max_connections_per_identity` open.
    IdentityLimit,
    /// Its identity is suspended.
    Suspended,
    /// A host process on a target with rules (`watch.host`).
    HostProcess,
    /// The record could not be written, or the spool cannot ship it.
    Recording,
    /// TLS: no or bad ClientHello, a name that is not the target's, ECH.
    Tls,
    #[default]
    Other,
}

impl Refusal {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoOrigin => "no_origin",
            Refusal::Unattributable => "unattributable",
            Refusal::Loop => "loop",
            Refusal::Quarantined => "quarantined",
            Refusal::IdentityLimit => "identity_limit",
            Refusal::Suspended => "suspended",
            Refusal::HostProcess => "host_process",
            Refusal::Recording => "recording",
            Refusal::Tls => "tls",
            Refusal::Other => "other",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Still being forwarded.
    Open,
    /// Forwarded and closed normally.
    Closed,
    /// Not forwarded (no origin, loop, suspended...): the words for
    /// people, and the kind for counting.
    Refused {
        reason: String,
        #[serde(default)]
        kind: Refusal,
    },
    /// The original destination could not be reached.
    UpstreamFailed { error: String },
    /// Forwarding ended with an I/O error.
    Failed { error: String },
    /// The node stopped while the connection was open.
    Interrupted,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectionRecord {
    pub id: u64,
    pub identity: WorkloadIdentity,
    pub process: ProcessInfo,
    pub client: ClientAddr,
    pub original_dst: Option<OrigDstAddr>,
    pub target: Option<String>,
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    /// Client to upstream.
    pub bytes_up: u64,
    /// Upstream to client.
    pub bytes_down: u64,
    pub outcome: Outcome,
    /// Set for TLS targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsInfo>,
    /// Set for database targets once the login is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<super::statement::DbLogin>,
}

impl ConnectionRecord {
    /// A connection from `client` starting now, open, nothing known yet.
    pub fn new(id: u64, client: ClientAddr) -> Self {
        Self {
            id,
            identity: WorkloadIdentity::default(),
            process: ProcessInfo::default(),
            client,
            original_dst: None,
            target: None,
            started_at_ms: now_ms(),
            ended_at_ms: None,
            bytes_up: 0,
            bytes_down: 0,
            outcome: Outcome::Open,
            tls: None,
            database: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInfo {
    pub sni: Option<String>,
    /// `intercepted` or `spliced`.
    pub mode: String,
    pub alpn: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// A captured body: the first `cap` bytes, as text when it is UTF-8 and
/// base64 otherwise, with its full size and whether it was cut.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BodyRecord {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base64: Option<String>,
    pub truncated: bool,
    pub complete: bool,
}

impl BodyRecord {
    pub fn set_bytes(&mut self, bytes: Vec<u8>) {
        use base64::Engine;
        if bytes.is_empty() {
            return;
        }
        match String::from_utf8(bytes) {
            Ok(t) => self.text = Some(t),
            Err(e) => {
                self.base64 = Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
            }
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        use base64::Engine;
        if let Some(t) = &self.text {
            return t.as_bytes().to_vec();
        }
        self.base64
            .as_deref()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .unwrap_or_default()
    }
}

/// Where an exchange's record stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeState {
    /// Recorded before it was forwarded; the response has not ended yet.
    Started,
    /// The response ended (or the exchange was refused or failed).
    #[default]
    Complete,
    /// The node stopped before the response ended.
    Interrupted,
}

/// One HTTP request and its response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    pub session: u64,
    pub seq: u32,
    /// Records written before this field existed were complete.
    #[serde(default)]
    pub state: ExchangeState,
    pub workload: String,
    pub started_at_ms: u64,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub http_version: String,
    pub request_headers: Vec<Header>,
    pub request_body: BodyRecord,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_trailers: Vec<Header>,
    pub status: Option<u16>,
    pub response_headers: Vec<Header>,
    pub response_body: BodyRecord,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_trailers: Vec<Header>,
    /// Time to the response head.
    pub ttfb_ms: Option<f64>,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Policy decisions taken on this exchange, each with its rule id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<Decision>,
    /// Set when the node injected its own credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub injected: Option<Injection>,
    /// Tool calls the answer (or an MCP request) carried, as judged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallRecord>,
}

/// Which wire format a tool call came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ToolApi {
    OpenaiChat,
    OpenaiResponses,
    Anthropic,
    Mcp,
}

/// One tool call, whole (the record owns the type: `tools` reassembles
/// it, policy judges it, the record keeps it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub api: ToolApi,
    /// The call's id as the API gave it (`call_…`, `toolu_…`, a JSON-RPC id).
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (what the agent parses).
    pub arguments: String,
}

/// What became of a tool call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolVerdict {
    /// Passed to the agent (or the MCP server).
    Allowed,
    /// Not delivered: the client got an error in its API's format.
    Blocked,
}

/// A tool call as recorded: the call, its verdict and the rule that
/// decided it (arguments capped at `TOOL_ARGUMENTS_CAP` bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallRecord {
    #[serde(flatten)]
    pub call: ToolCall,
    pub verdict: ToolVerdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// MCP: the text the server answered the call with (as the client got
    /// it, masked where rules mask; capped like the arguments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

/// Arguments kept per recorded tool call.
pub const TOOL_ARGUMENTS_CAP: usize = 4096;

impl ToolCallRecord {
    pub fn new(mut call: ToolCall, verdict: ToolVerdict, rule: Option<String>) -> Self {
        if call.arguments.len() > TOOL_ARGUMENTS_CAP {
            let mut end = TOOL_ARGUMENTS_CAP;
            while !call.arguments.is_char_boundary(end) {
                end -= 1;
            }
            call.arguments.truncate(end);
            call.arguments.push('…');
        }
        Self {
            call,
            verdict,
            rule,
            result: None,
        }
    }

    /// Sets the result text, capped like the arguments.
    pub fn set_result(&mut self, mut text: String) {
        if text.len() > TOOL_ARGUMENTS_CAP {
            let mut end = TOOL_ARGUMENTS_CAP;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        self.result = Some(text);
    }
}

/// What a rule does, as bundles write it and records keep it (the record
/// owns the type: bundles are read into it, decisions carry it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Responses: redact matches (length-preserving).
    Mask,
    /// Requests: refuse with 403 before the upstream sees it.
    Block,
    /// Requests: hold until a human approves; no answer in time = deny.
    Approve,
    /// Record the match, change nothing (for alerting).
    Log,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Mask => "mask",
            Action::Block => "block",
            Action::Approve => "approve",
            Action::Log => "log",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decision taken on an exchange or statement, as recorded
/// (the record owns the type: policy produces it, the record keeps it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub rule: String,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Decision {
    /// A refusal the node decided itself (not a policy rule's match).
    pub fn node_block(rule: &str, detail: String) -> Self {
        Self {
            rule: rule.into(),
            action: Action::Block,
            patterns: vec![],
            detail: Some(detail),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Injection {
    pub header: String,
    /// Fingerprints of the credentials the client presented (stripped).
    pub client_presented: Vec<Header>,
}

/// A position in the record log (where the next event starts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPos {
    pub segment: u64,
    pub offset: u64,
}

/// One event as stored: the exact body bytes that were hashed.
#[derive(Clone, Debug)]
pub struct RawEvent {
    pub seq: u64,
    pub at_ms: u64,
    pub connection: u64,
    pub kind: String,
    pub body: Vec<u8>,
    pub prev: [u8; 32],
    pub hash: [u8; 32],
}

/// One link of the hash chain, as the control API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: u64,
    pub connection: u64,
    pub kind: String,
    pub body: serde_json::Value,
    /// Hex SHA-256 of the previous event (zeros for the first).
    pub prev: String,
    /// Hex SHA-256 over `prev`, `seq` and the digest of this event's
    /// other fields (see `chain.rs`).
    pub hash: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Filter {
    /// Identity id, or a substring of the CI repository / cgroup path.
    pub identity: Option<String>,
    pub target: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub limit: Option<usize>,
}

impl Filter {
    pub(super) fn matches(&self, r: &ConnectionRecord) -> bool {
        if let Some(id) = &self.identity {
            let i = &r.identity;
            let hit = i.id == *id
                || i.workload.as_deref() == Some(id)
                || i.cgroup_path
                    .as_deref()
                    .is_some_and(|p| p.contains(id.as_str()))
                || i.ci
                    .as_ref()
                    .and_then(|c| c.repository.as_deref())
                    .is_some_and(|p| p.contains(id.as_str()));
            if !hit {
                return false;
            }
        }
        if let Some(t) = &self.target {
            if r.target.as_deref() != Some(t.as_str()) {
                return false;
            }
        }
        if self.since_ms.is_some_and(|s| r.started_at_ms < s) {
            return false;
        }
        if self.until_ms.is_some_and(|u| r.started_at_ms > u) {
            return false;
        }
        true
    }
}

/// How long records may sit in memory before they are on disk, and how
/// often the chain head is signed (`records.*` in the configuration).
#[derive(Clone, Debug)]
pub struct Durability {
    /// Group commit: sled is flushed (fsync) this often when anything
    /// changed. Bounds what a host power loss can take.
    pub fsync_interval: Duration,
    /// A checkpoint is signed once this many events were appended since
    /// the last one...
    pub checkpoint_every_events: u64,
    /// ...or this long after it, whichever comes first (if the chain grew).
    pub checkpoint_interval: Duration,
}

impl From<&crate::config::RecordSettings> for Durability {
    fn from(c: &crate::config::RecordSettings) -> Self {
        Self {
            fsync_interval: std::time::Duration::from_millis(c.fsync_interval_ms),
            checkpoint_every_events: c.checkpoint_every_events,
            checkpoint_interval: std::time::Duration::from_secs(c.checkpoint_interval_secs),
        }
    }
}

impl Default for Durability {
    fn default() -> Self {
        Self {
            fsync_interval: Duration::from_millis(200),
            checkpoint_every_events: 1000,
            checkpoint_interval: Duration::from_secs(10),
        }
    }
}

/// First 16 hex digits of SHA-256: enough to tell keys apart, useless to
/// recover them.
pub fn fingerprint(secret: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(secret)[..8])
}

/// A record time (ms since the epoch) as people read it.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
