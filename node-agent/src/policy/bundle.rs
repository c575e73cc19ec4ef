//! The policy bundle format (docs/POLICY.md): what the security team
//! writes, signs and pushes. Parsed strictly and compiled once.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Rule packs shipped with the node, referenced by name from bundles.
pub const BUILTIN_PACKS: &[(&str, &str)] = &[
    (
        "secrets",
        include_str!("../../../policies/packs/secrets.yaml"),
    ),
    ("pii", include_str!("../../../policies/packs/pii.yaml")),
    ("agent", include_str!("../../../policies/packs/agent.yaml")),
];

/// The example policy in force until a signed bundle is pushed.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../policies/default-policy.yaml");

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// Monotonic: a node only accepts a bundle newer than the one in force.
    pub version: u64,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Custom packs, in addition to the built-in `secrets` and `pii`.
    #[serde(default)]
    pub packs: BTreeMap<String, Vec<PatternDef>>,
    #[serde(default)]
    pub credentials: Vec<CredentialDef>,
    /// When present, replaces the node configuration's target list (same
    /// schema). Intercepted names must be within the node CA's constraints.
    #[serde(default)]
    pub targets: Option<Vec<crate::config::Target>>,
    /// RFC 3339 time in UTC (`2026-03-31T00:00:00Z`) after which the
    /// bundle is refused: at push, and at node start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// Selects workloads by their identity; every given field must match.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    /// Glob over the cgroup path.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Glob over the CI repository / project path.
    #[serde(default)]
    pub repository: Option<String>,
    /// `github-actions` or `gitlab-ci`.
    #[serde(default)]
    pub ci_system: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Request,
    Response,
    /// A database statement (Postgres targets), judged before it runs.
    Statement,
    /// Rows a database statement returns (Postgres targets), masked.
    Result,
    /// A tool call in a model answer or an MCP request, judged whole
    /// before the agent (or the MCP server) sees it.
    ToolCall,
}

pub use crate::record::statement::{Shape, StatementClass};

/// SQL-aware conditions of an `on: statement` rule; every given field must
/// match (each field: any of its values).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<StatementClass>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shapes: Vec<Shape>,
    /// Globs over the tables a statement touches (`users`,
    /// `billing.*`); a name matches with or without its schema.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
}

pub use crate::record::Action;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub id: String,
    pub on: Direction,
    /// Target names (node configuration); empty = every target.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Workload names (this bundle); empty = every workload.
    #[serde(default)]
    pub workloads: Vec<String>,
    /// Packs whose patterns this rule uses.
    #[serde(default)]
    pub packs: Vec<String>,
    #[serde(default)]
    pub patterns: Vec<PatternDef>,
    pub action: Action,
    #[serde(default)]
    pub message: Option<String>,
    /// Approve: seconds to wait for a decision.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// `on: statement`: conditions on the parsed statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<SqlMatch>,
    /// `on: result`: column-name globs (from the row description) whose
    /// values are masked whole, e.g. `*email*`, `ssn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// `on: tool_call`: globs over the tool's name (`run_terminal_cmd`,
    /// `*shell*`); empty = every tool. With patterns, both must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// `on: tool_call`: how a blocked call in a streamed answer is
    /// refused: `error` (the API's error event, which its library raises)
    /// or `text` (the answer ends with a refusal the agent reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
    /// Texts the rule must catch and texts it must leave alone, checked by
    /// `sluice policy lint` (a rule that misses its own examples, or that
    /// an earlier rule always decides first, is reported).
    #[serde(default, skip_serializing_if = "Examples::is_empty")]
    pub examples: Examples,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    Error,
    Text,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Examples {
    /// Each must be hit by the rule (masked, blocked, held or logged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hit: Vec<String>,
    /// None may be hit by the rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clean: Vec<String>,
}

impl Examples {
    pub fn is_empty(&self) -> bool {
        self.hit.is_empty() && self.clean.is_empty()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternDef {
    pub id: String,
    pub regex: String,
    #[serde(default)]
    pub caseless: bool,
    /// Old spelling of `validate: luhn`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub luhn: bool,
    /// What the format allows to check beyond the regex (a checksum, an
    /// issuer, a parser's verdict).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validate: Option<crate::scan::Validator>,
    /// ISO 3166 country that `validate: phone` reads national numbers in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Left out of the pack unless a rule names it (`pack/id` or `pack/*`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub opt_in: bool,
    /// Optional cheaper Hyperscan expression implied by `regex`.
    #[serde(default)]
    pub prefilter: Option<String>,
    /// Post-filter: the secret span (the `(?P<secret>...)` group, else the
    /// whole match) needs at least this Shannon entropy, bits per byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_entropy: Option<f64>,
    /// Post-filter: a secret span matching any of these regexes is not a
    /// hit (placeholders, code).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Post-filter: a hit whose whole match (the name before the value
    /// included) matches any of these is not a hit (a public key's name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_match: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pack {
    pub name: String,
    pub patterns: Vec<PatternDef>,
}

/// A node-held credential injected on the outbound request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialDef {
    pub target: String,
    /// Header that carries the credential upstream.
    #[serde(default = "default_cred_header")]
    pub header: String,
    /// `{}` is replaced by the secret, e.g. `Bearer {}`.
    #[serde(default = "default_cred_format")]
    pub format: String,
    /// `file:/path` or `systemd:NAME` (from $CREDENTIALS_DIRECTORY).
    pub source: String,
    /// Client headers removed (their fingerprints are recorded).
    #[serde(default = "default_strip")]
    pub strip: Vec<String>,
    /// Postgres targets: the role the node logs in as with this secret
    /// (SCRAM, channel binding included, MD5 or password). A job
    /// connecting as this role is admitted on its identity, without a
    /// password of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Postgres targets: also give the secret to a server that asks for
    /// it in clear text or as MD5. Off by default: the secret goes only
    /// into SCRAM, which never hands it to the server (a server that
    /// merely asks is not trusted with it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub weak_auth: bool,
    /// HTTP targets: the names (exact, or `*.example.com`) the credential
    /// is injected for. Empty: the target's exact names only; a wildcard
    /// target name gives it to a subdomain only when listed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

fn default_cred_header() -> String {
    "authorization".into()
}
fn default_cred_format() -> String {
    "Bearer {}".into()
}
fn default_strip() -> Vec<String> {
    vec![
        "authorization".into(),
        "x-api-key".into(),
        "proxy-authorization".into(),
    ]
}
