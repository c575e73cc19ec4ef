//! Policy: signed bundles (`bundle`, `sign`), compiled once into scanners
//! and rule tables, swapped in atomically so live connections keep going
//! (each request reads the policy in force when it starts).
pub mod bundle;
pub mod fleet;
pub mod sign;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

use crate::{
    identity::WorkloadIdentity,
    record::RecordStore,
    scan::{PatternSpec, ScanError, Scanner},
};
use bundle::{Action, Bundle, Direction, Pack};
use sign::{SignError, TrustedKey};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("bundle does not parse: {0}")]
    Parse(String),
    #[error("bundle field `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("bundle rule patterns: {0}")]
    Scan(#[from] ScanError),
    #[error("bundle version {version} is not newer than the version in force ({current})")]
    Stale { version: u64, current: u64 },
    #[error("bundle claims version {claimed} but contains version {actual}")]
    VersionMismatch { claimed: u64, actual: u64 },
    #[error("credential for target `{target}`: {message}")]
    Credential { target: String, message: String },
    #[error("bundle targets: {0}")]
    Targets(String),
    #[error("policy state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bundle expired at {expires_at}")]
    Expired { expires_at: String },
    #[error("bundle version {version} is below the policy floor {floor} (the highest version this node has accepted)")]
    BelowFloor { version: u64, floor: u64 },
    #[error("bundle version {version} is the floor version but not the bundle accepted as it (digest {digest} differs)")]
    FloorDigest { version: u64, digest: String },
    #[error("policy floor store: {0}")]
    Floor(String),
    #[error("stored policy {path} no longer verifies or compiles: {reason}; refusing to start (fail closed). Restore the signed bundle, or put a signed bundle of version >= {floor} there")]
    StoredInvalid {
        path: PathBuf,
        reason: String,
        floor: u64,
    },
    #[error("stored policy {path} is missing but this node has accepted version {floor}; refusing to start rather than fall back to the embedded example. Put a signed bundle of version >= {floor} at {path} or in the policy watch directory")]
    StoredMissing { path: PathBuf, floor: u64 },
}

/// A credential value: never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Clone, Debug)]
pub struct Credential {
    pub header: String,
    pub value: Secret,
    pub strip: Vec<String>,
    /// The secret alone (Postgres logins), and the role it is for.
    pub secret: Secret,
    pub user: Option<String>,
    /// Postgres: the secret may answer a cleartext or MD5 challenge.
    pub weak_auth: bool,
    /// HTTP: the names it is injected for (empty: exact target names).
    pub hosts: Vec<crate::names::NamePattern>,
}

impl Credential {
    /// Whether `authority` (the TLS name the session was verified for) is
    /// one of `hosts`. Without `hosts` the caller allows only the
    /// target's exact names: a wildcard target name alone does not let the
    /// credential go to any subdomain (one an attacker owns included).
    pub fn applies_to(&self, authority: &str) -> bool {
        let Ok(name) = crate::names::DnsName::parse(authority) else {
            return false;
        };
        self.hosts.iter().any(|h| h.matches(&name))
    }
}

struct WorkloadMatch {
    name: String,
    cgroup: Option<glob::Pattern>,
    repository: Option<glob::Pattern>,
    ci_system: Option<String>,
}

impl WorkloadMatch {
    fn matches(&self, id: &WorkloadIdentity) -> bool {
        let path = id.cgroup_path.as_deref().unwrap_or("");
        let repo = id.ci.as_ref().and_then(|c| c.repository.as_deref());
        let system = id.ci.as_ref().map(|c| c.system.as_str());
        self.cgroup.as_ref().is_none_or(|p| p.matches(path))
            && self
                .repository
                .as_ref()
                .is_none_or(|p| repo.is_some_and(|r| p.matches(r)))
            && self.ci_system.as_deref().is_none_or(|s| system == Some(s))
    }
}

pub use crate::record::Decision;

pub enum Verdict {
    Allow,
    Block {
        rule: String,
        message: String,
    },
    Approve {
        rule: String,
        message: String,
        timeout_secs: u64,
    },
}

impl Verdict {
    /// The verdict of a matched `block` or `approve` rule.
    fn of(r: &bundle::Rule) -> Self {
        let message = r
            .message
            .clone()
            .unwrap_or_else(|| format!("matched policy rule {}", r.id));
        match r.action {
            Action::Block => Verdict::Block {
                rule: r.id.clone(),
                message,
            },
            _ => Verdict::Approve {
                rule: r.id.clone(),
                message,
                timeout_secs: r.timeout_secs.unwrap_or(60),
            },
        }
    }
}

pub struct CompiledPolicy {
    pub version: u64,
    /// When this node compiled it (start-up or push), Unix ms.
    pub loaded_ms: u64,
    /// From the bundle's `expires_at`.
    pub expires_at: Option<SystemTime>,
    pub name: String,
    pub signer: String,
    pub digest: String,
    pub bundle: Bundle,
    request: Scanner,
    response: Scanner,
    /// Patterns of `on: statement` rules (over the SQL text) and of
    /// `on: result` rules (over column values).
    statement: Scanner,
    result: Scanner,
    /// Patterns of `on: tool_call` rules, over `ToolCall::judged_text`.
    tool: Scanner,
    /// Per rule: compiled `tools` name globs.
    tool_globs: HashMap<usize, Vec<glob::Pattern>>,
    /// Per rule: compiled `sql.tables` and `columns` globs.
    table_globs: HashMap<usize, Vec<glob::Pattern>>,
    column_globs: HashMap<usize, Vec<glob::Pattern>>,
    workloads: Vec<WorkloadMatch>,
    credentials: HashMap<String, Credential>,
}

/// Reads a credential from `file:/path` or `systemd:NAME`.
fn read_credential(target: &str, source: &str) -> Result<Secret, PolicyError> {
    let err = |message: String| PolicyError::Credential {
        target: target.to_owned(),
        message,
    };
    let path = if let Some(p) = source.strip_prefix("file:") {
        PathBuf::from(p)
    } else if let Some(name) = source.strip_prefix("systemd:") {
        let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
            err("systemd credential requested but $CREDENTIALS_DIRECTORY is not set".into())
        })?;
        PathBuf::from(dir).join(name)
    } else {
        return Err(err(format!(
            "source `{source}` must be `file:PATH` or `systemd:NAME`"
        )));
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let value = text.trim().to_owned();
    if value.is_empty() {
        return Err(err(format!("{} is empty", path.display())));
    }
    Ok(Secret(value))
}

/// A scanner over one built-in pack (all its patterns as rule 0), for
/// what the node redacts whatever the bundle says (credential-looking
/// values in records).
pub fn builtin_pack_scanner(name: &str, max_window: usize) -> Result<Scanner, PolicyError> {
    let yaml = bundle::BUILTIN_PACKS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, y)| *y)
        .ok_or_else(|| PolicyError::Parse(format!("no built-in pack `{name}`")))?;
    let pack: Pack = serde_yaml::from_str(yaml)
        .map_err(|e| PolicyError::Parse(format!("built-in pack {name}: {e}")))?;
    let specs = pack
        .patterns
        .into_iter()
        .filter(|d| !d.opt_in)
        .map(|d| spec(d, 0, "pack"))
        .collect::<Result<_, _>>()?;
    Ok(Scanner::compile(specs, max_window)?)
}

/// A bundle pattern as the scanner takes it, for rule `rule` (`field`
/// names where it was written, for errors).
fn spec(d: bundle::PatternDef, rule: usize, field: &str) -> Result<PatternSpec, PolicyError> {
    let bad = |message: String| PolicyError::Invalid {
        field: format!("{field}: pattern `{}`", d.id),
        message,
    };
    let validate = match (d.luhn, d.validate) {
        (true, Some(v)) if v != crate::scan::Validator::Luhn => {
            return Err(bad("`luhn: true` and `validate` both given".into()))
        }
        (true, _) => Some(crate::scan::Validator::Luhn),
        (false, v) => v,
    };
    let region = match (&d.region, validate) {
        (None, _) => None,
        (Some(r), Some(crate::scan::Validator::Phone)) => {
            Some(crate::scan::validate::region(r).map_err(bad)?)
        }
        (Some(_), _) => return Err(bad("`region` is read only by `validate: phone`".into())),
    };
    Ok(PatternSpec {
        id: d.id,
        rule,
        regex: d.regex,
        caseless: d.caseless,
        validate,
        region,
        prefilter: d.prefilter,
        min_entropy: d.min_entropy,
        deny: d.deny,
        deny_match: d.deny_match,
    })
}

/// The patterns a rule's `packs:` entry names: `pack` (its patterns but
/// the opt-in ones), `pack/id` (one pattern, opt-in or not) or `pack/*`.
fn select_pack(
    packs: &HashMap<String, Vec<bundle::PatternDef>>,
    entry: &str,
) -> Result<Vec<bundle::PatternDef>, String> {
    let (name, id) = match entry.split_once('/') {
        Some((n, i)) => (n, Some(i)),
        None => (entry, None),
    };
    let pack = packs
        .get(name)
        .ok_or_else(|| format!("no pack named `{name}`"))?;
    match id {
        None => Ok(pack.iter().filter(|d| !d.opt_in).cloned().collect()),
        Some("*") => Ok(pack.clone()),
        Some(id) => pack
            .iter()
            .find(|d| d.id == id)
            .map(|d| vec![d.clone()])
            .ok_or_else(|| format!("pack `{name}` has no pattern `{id}`")),
    }
}

impl CompiledPolicy {
    pub fn compile(text: &str, signer: &str, max_window: usize) -> Result<Self, PolicyError> {
        Self::compile_with(text, signer, max_window, true)
    }

    /// As the node compiles it, but without reading the credentials it
    /// names (their files are on nodes): what `policy test`/`lint` run.
    pub fn compile_offline(text: &str, max_window: usize) -> Result<Self, PolicyError> {
        Self::compile_with(text, "offline", max_window, false)
    }

    fn compile_with(
        text: &str,
        signer: &str,
        max_window: usize,
        read_credentials: bool,
    ) -> Result<Self, PolicyError> {
        let bundle: Bundle =
            serde_yaml::from_str(text).map_err(|e| PolicyError::Parse(e.to_string()))?;
        let bad = |field: String, message: String| PolicyError::Invalid { field, message };
        if bundle.name.trim().is_empty() {
            return Err(bad("name".into(), "must not be empty".into()));
        }
        let expires_at = bundle
            .expires_at
            .as_deref()
            .map(|t| {
                humantime::parse_rfc3339_weak(t).map_err(|e| {
                    bad(
                        "expires_at".into(),
                        format!(
                            "`{t}` is not an RFC 3339 UTC time (e.g. 2026-03-31T00:00:00Z): {e}"
                        ),
                    )
                })
            })
            .transpose()?;
        let mut packs: HashMap<String, Vec<bundle::PatternDef>> = HashMap::new();
        for (name, yaml) in bundle::BUILTIN_PACKS {
            let p: Pack = serde_yaml::from_str(yaml)
                .map_err(|e| PolicyError::Parse(format!("built-in pack {name}: {e}")))?;
            packs.insert(p.name, p.patterns);
        }
        for (name, pats) in &bundle.packs {
            packs.insert(name.clone(), pats.clone());
        }
        if let Some(t) = &bundle.targets {
            crate::config::validate_targets(t, "targets")
                .map_err(|(field, message)| bad(field, message))?;
        }
        let mut workloads = Vec::new();
        for (i, w) in bundle.workloads.iter().enumerate() {
            let glob =
                |g: &Option<String>, f: &str| -> Result<Option<glob::Pattern>, PolicyError> {
                    g.as_deref()
                        .map(glob::Pattern::new)
                        .transpose()
                        .map_err(|e| bad(format!("workloads[{i}].{f}"), e.to_string()))
                };
            workloads.push(WorkloadMatch {
                name: w.name.clone(),
                cgroup: glob(&w.cgroup, "cgroup")?,
                repository: glob(&w.repository, "repository")?,
                ci_system: w.ci_system.clone(),
            });
        }
        let names: HashSet<&str> = bundle.workloads.iter().map(|w| w.name.as_str()).collect();
        let mut ids = HashSet::new();
        let (mut req, mut resp, mut stmt, mut res, mut tool) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut tool_globs = HashMap::new();
        let (mut table_globs, mut column_globs) = (HashMap::new(), HashMap::new());
        let globs = |list: &[String], field: String| -> Result<Vec<glob::Pattern>, PolicyError> {
            list.iter()
                .map(|g| glob::Pattern::new(&g.to_ascii_lowercase()))
                .collect::<Result<_, _>>()
                .map_err(|e| bad(field, e.to_string()))
        };
        for (i, r) in bundle.rules.iter().enumerate() {
            if !ids.insert(r.id.as_str()) {
                return Err(bad(
                    format!("rules[{i}].id"),
                    format!("`{}` is used twice", r.id),
                ));
            }
            if r.refusal.is_some() && r.on != Direction::ToolCall {
                return Err(bad(
                    format!("rules[{i}].refusal"),
                    "only `on: tool_call` rules have a refusal".into(),
                ));
            }
            if !r.tools.is_empty() && r.on != Direction::ToolCall {
                return Err(bad(
                    format!("rules[{i}].tools"),
                    "only `on: tool_call` rules select tools".into(),
                ));
            }
            if r.on == Direction::ToolCall {
                if r.action == Action::Mask {
                    return Err(bad(
                        format!("rules[{i}].action"),
                        "tool_call rules block, approve or log".into(),
                    ));
                }
                let g = r
                    .tools
                    .iter()
                    .map(|g| glob::Pattern::new(g))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(format!("rules[{i}].tools"), e.to_string()))?;
                tool_globs.insert(i, g);
            }
            match (r.on, r.action) {
                (Direction::Response | Direction::Result, Action::Block | Action::Approve) => {
                    return Err(bad(
                        format!("rules[{i}].action"),
                        "block and approve act on requests and statements (`on: request`, `on: statement`)".into(),
                    ))
                }
                (Direction::Request | Direction::Statement, Action::Mask) => {
                    return Err(bad(
                        format!("rules[{i}].action"),
                        "mask acts on responses and results (`on: response`, `on: result`)".into(),
                    ))
                }
                _ => {}
            }
            if r.sql.is_some() && r.on != Direction::Statement {
                return Err(bad(
                    format!("rules[{i}].sql"),
                    "only `on: statement` rules have SQL conditions".into(),
                ));
            }
            if !r.columns.is_empty() && r.on != Direction::Result {
                return Err(bad(
                    format!("rules[{i}].columns"),
                    "only `on: result` rules select columns".into(),
                ));
            }
            if let Some(sql) = &r.sql {
                table_globs.insert(i, globs(&sql.tables, format!("rules[{i}].sql.tables"))?);
            }
            if !r.columns.is_empty() {
                column_globs.insert(i, globs(&r.columns, format!("rules[{i}].columns"))?);
            }
            for w in &r.workloads {
                if !names.contains(w.as_str()) {
                    return Err(bad(
                        format!("rules[{i}].workloads"),
                        format!("no workload named `{w}`"),
                    ));
                }
            }
            let mut defs = r.patterns.clone();
            for p in &r.packs {
                let selected =
                    select_pack(&packs, p).map_err(|m| bad(format!("rules[{i}].packs"), m))?;
                for d in selected {
                    // `pii` and `pii/card-number` in one rule: once.
                    if !defs.iter().any(|x| x.id == d.id) {
                        defs.push(d);
                    }
                }
            }
            if defs.is_empty() && r.sql.is_none() && r.columns.is_empty() && r.tools.is_empty() {
                return Err(bad(
                    format!("rules[{i}]"),
                    format!(
                        "rule `{}` has no patterns or packs (nor `sql` / `columns` / `tools`)",
                        r.id
                    ),
                ));
            }
            let target = match r.on {
                Direction::Request => &mut req,
                Direction::Response => &mut resp,
                Direction::Statement => &mut stmt,
                Direction::Result => &mut res,
                Direction::ToolCall => &mut tool,
            };
            for d in defs {
                target.push(spec(d, i, &format!("rules[{i}]"))?);
            }
        }
        let mut bundle = bundle;
        let mut credentials = HashMap::new();
        let mut secrets = Vec::new();
        for c in bundle.credentials.iter().filter(|_| read_credentials) {
            if !c.format.contains("{}") {
                return Err(bad(
                    "credentials.format".into(),
                    "must contain `{}` for the secret".into(),
                ));
            }
            let secret = read_credential(&c.target, &c.source)?;
            credentials.insert(
                c.target.clone(),
                Credential {
                    header: c.header.to_ascii_lowercase(),
                    value: Secret(c.format.replace("{}", secret.expose())),
                    strip: c.strip.iter().map(|s| s.to_ascii_lowercase()).collect(),
                    secret: Secret(secret.expose().to_owned()),
                    user: c.user.clone(),
                    weak_auth: c.weak_auth,
                    hosts: c
                        .hosts
                        .iter()
                        .map(|h| {
                            crate::names::NamePattern::parse(h)
                                .map_err(|e| bad("credentials.hosts".into(), format!("`{h}`: {e}")))
                        })
                        .collect::<Result<_, _>>()?,
                },
            );
            secrets.push((c.target.clone(), secret));
        }
        // The node's own credential must never flow back to a job (an
        // upstream echoing it in an error, say): mask it in responses.
        for (target, secret) in secrets {
            let rule = bundle.rules.len();
            bundle.rules.push(bundle::Rule {
                id: format!("protect-node-credential-{target}"),
                on: Direction::Response,
                targets: vec![target],
                workloads: vec![],
                packs: vec![],
                patterns: vec![],
                action: Action::Mask,
                message: None,
                timeout_secs: None,
                sql: None,
                columns: vec![],
                examples: Default::default(),
                tools: vec![],
                refusal: None,
            });
            resp.push(PatternSpec::new(
                "node-credential",
                rule,
                regex::escape(secret.expose()),
            ));
        }
        let request = Scanner::compile(req, max_window)?;
        let response = Scanner::compile(resp, max_window)?;
        let statement = Scanner::compile(stmt, max_window)?;
        let result = Scanner::compile(res, max_window)?;
        let tool = Scanner::compile(tool, max_window)?;
        Ok(Self {
            version: bundle.version,
            loaded_ms: crate::record::now_ms(),
            expires_at,
            name: bundle.name.clone(),
            signer: signer.to_owned(),
            digest: hex::encode(Sha256::digest(text.as_bytes())),
            bundle,
            request,
            response,
            statement,
            result,
            tool,
            tool_globs,
            table_globs,
            column_globs,
            workloads,
            credentials,
        })
    }

    /// Whether the bundle's expiry has passed (at `now`).
    pub fn expired_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    fn check_expiry(&self) -> Result<(), PolicyError> {
        if self.expired_at(SystemTime::now()) {
            return Err(PolicyError::Expired {
                expires_at: self.bundle.expires_at.clone().unwrap_or_default(),
            });
        }
        Ok(())
    }

    pub fn rule_applies(&self, rule: usize, target: &str, identity: &WorkloadIdentity) -> bool {
        let Some(r) = self.bundle.rules.get(rule) else {
            return false;
        };
        (r.targets.is_empty() || r.targets.iter().any(|t| t == target))
            && (r.workloads.is_empty()
                || r.workloads.iter().any(|w| {
                    self.workloads
                        .iter()
                        .any(|m| &m.name == w && m.matches(identity))
                }))
    }

    /// Whether rule `rule` applies offline: to `target` and to a job of
    /// the workload named `workload`, each `None` meaning any.
    pub fn rule_applies_offline(
        &self,
        rule: usize,
        target: Option<&str>,
        workload: Option<&str>,
    ) -> bool {
        let Some(r) = self.bundle.rules.get(rule) else {
            return false;
        };
        target.is_none_or(|t| r.targets.is_empty() || r.targets.iter().any(|x| x == t))
            && workload.is_none_or(|w| r.workloads.is_empty() || r.workloads.iter().any(|x| x == w))
    }

    /// Whether any `on: tool_call` rule applies here.
    /// Only rules that can stop a call count: holding a stream or reading
    /// a request whole changes the traffic, which `log` rules must not (a
    /// log-only bundle gives the client what a direct connection gives;
    /// its tool_call log rules are recorded where a blocking rule runs).
    pub fn has_tool_rules(&self, target: &str, identity: &WorkloadIdentity) -> bool {
        self.any_rule(Direction::ToolCall, target, identity, |a| {
            matches!(a, Action::Block | Action::Approve)
        })
    }

    /// Whether the rule named `id` refuses tool calls with a text.
    pub fn refuses_with_text(&self, id: &str) -> bool {
        self.bundle
            .rules
            .iter()
            .any(|r| r.id == id && r.refusal == Some(bundle::Refusal::Text))
    }

    /// The tool-call scanner (`on: tool_call` patterns).
    pub fn tool_scanner(&self) -> &Scanner {
        &self.tool
    }

    /// Judges one whole tool call: rules in bundle order, the first block
    /// decides, log rules are all recorded. A rule matches when the tool's
    /// name matches one of its `tools` globs (or it has none) and, if it
    /// has patterns, one of them hits the call's judged text.
    pub fn evaluate_tool_call_where(
        &self,
        call: &crate::record::ToolCall,
        applies: impl Fn(usize) -> bool,
    ) -> Result<(Verdict, Vec<Decision>), ScanError> {
        self.evaluate_tool_call_in(call, None, applies)
    }

    /// As `evaluate_tool_call_where`, knowing the job's checkout (file
    /// tools' paths outside it are named in the judged text).
    pub fn evaluate_tool_call_in(
        &self,
        call: &crate::record::ToolCall,
        workspace: Option<&str>,
        applies: impl Fn(usize) -> bool,
    ) -> Result<(Verdict, Vec<Decision>), ScanError> {
        let text = call.judged_text_in(workspace);
        let hits = self.tool.find(text.as_bytes())?;
        let mut decisions = Vec::new();
        let mut verdict = Verdict::Allow;
        for (i, r) in self.bundle.rules.iter().enumerate() {
            if r.on != Direction::ToolCall || !applies(i) {
                continue;
            }
            let name_ok = self
                .tool_globs
                .get(&i)
                .is_none_or(|g| g.is_empty() || g.iter().any(|p| p.matches(&call.name)));
            let mut patterns: Vec<String> = hits
                .iter()
                .filter(|h| h.rule == i)
                .map(|h| self.tool.pattern(h.pattern).id.clone())
                .collect();
            patterns.dedup();
            let has_patterns = !r.patterns.is_empty() || !r.packs.is_empty();
            if !name_ok || (has_patterns && patterns.is_empty()) {
                continue;
            }
            let decisive = matches!(verdict, Verdict::Allow)
                && matches!(r.action, Action::Block | Action::Approve);
            if !(decisive || r.action == Action::Log) {
                continue;
            }
            decisions.push(Decision {
                rule: r.id.clone(),
                action: r.action,
                patterns,
                detail: Some(format!(
                    "tool call `{}`{}",
                    call.name,
                    r.message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                )),
            });
            if decisive {
                verdict = Verdict::of(r);
            }
        }
        Ok((verdict, decisions))
    }

    /// The request scanner (`on: request` patterns).
    pub fn request_scanner(&self) -> &Scanner {
        &self.request
    }

    /// The statement scanner (`on: statement` patterns).
    pub fn statement_scanner(&self) -> &Scanner {
        &self.statement
    }

    fn any_rule(
        &self,
        dir: Direction,
        target: &str,
        identity: &WorkloadIdentity,
        pred: impl Fn(Action) -> bool,
    ) -> bool {
        self.bundle
            .rules
            .iter()
            .enumerate()
            .any(|(i, r)| r.on == dir && pred(r.action) && self.rule_applies(i, target, identity))
    }

    /// The bundle's name for this identity's workload (bounded: a metrics
    /// label), `-` when none matches.
    pub fn workload_name(&self, identity: &WorkloadIdentity) -> &str {
        self.workloads
            .iter()
            .find(|w| w.matches(identity))
            .map_or("-", |w| w.name.as_str())
    }

    /// Whether any rule or credential of the bundle concerns `target`
    /// (whatever the workload): what a host process is kept away from
    /// (`watch.host.ruled_targets: refuse`).
    pub fn target_has_rules(&self, target: &str) -> bool {
        self.credentials.contains_key(target)
            || self
                .bundle
                .rules
                .iter()
                .any(|r| r.targets.is_empty() || r.targets.iter().any(|t| t == target))
    }

    pub fn has_request_rules(&self, target: &str, identity: &WorkloadIdentity) -> bool {
        self.any_rule(Direction::Request, target, identity, |_| true)
    }

    pub fn masks_responses(&self, target: &str, identity: &WorkloadIdentity) -> bool {
        self.any_rule(Direction::Response, target, identity, |a| a == Action::Mask)
    }

    pub fn rule(&self, i: usize) -> &bundle::Rule {
        &self.bundle.rules[i]
    }

    pub fn credential(&self, target: &str) -> Option<&Credential> {
        self.credentials.get(target)
    }

    /// Scans a request body; rules apply in bundle order, the first
    /// block/approve rule that matches decides, log rules are all recorded.
    pub fn evaluate_request(
        &self,
        target: &str,
        identity: &WorkloadIdentity,
        body: &[u8],
    ) -> Result<(Verdict, Vec<Decision>), ScanError> {
        self.evaluate_request_where(body, |i| self.rule_applies(i, target, identity))
    }

    /// `evaluate_request` for the rules `applies` selects (`policy test`
    /// chooses them offline, without a workload identity).
    pub fn evaluate_request_where(
        &self,
        body: &[u8],
        applies: impl Fn(usize) -> bool,
    ) -> Result<(Verdict, Vec<Decision>), ScanError> {
        let hits = self.request.find(body)?;
        let mut by_rule: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
        for h in hits {
            if applies(h.rule) {
                let id = self.request.pattern(h.pattern).id.clone();
                let v = by_rule.entry(h.rule).or_default();
                if !v.contains(&id) {
                    v.push(id);
                }
            }
        }
        let mut decisions = Vec::new();
        let mut verdict = Verdict::Allow;
        for (i, patterns) in by_rule {
            let r = &self.bundle.rules[i];
            let decisive = matches!(verdict, Verdict::Allow)
                && matches!(r.action, Action::Block | Action::Approve);
            if decisive || r.action == Action::Log {
                decisions.push(Decision {
                    rule: r.id.clone(),
                    action: r.action,
                    patterns,
                    detail: r.message.clone(),
                });
            }
            if decisive {
                verdict = Verdict::of(r);
            }
        }
        Ok((verdict, decisions))
    }
}

pub use crate::record::statement::SqlFacts;

/// How rows are masked for one statement: column rules by name, pattern
/// rules through the result scanner.
pub struct ResultMask {
    pub policy: Arc<CompiledPolicy>,
    /// Result rules that apply, by index.
    pub rules: Vec<usize>,
}

impl ResultMask {
    /// The rule masking a column by its name, if any.
    pub fn column_rule(&self, name: &str) -> Option<usize> {
        let name = name.to_ascii_lowercase();
        self.rules.iter().copied().find(|r| {
            self.policy
                .column_globs
                .get(r)
                .is_some_and(|g| g.iter().any(|p| p.matches(&name)))
        })
    }

    /// Whether pattern rules apply (values must be scanned).
    pub fn scans(&self) -> bool {
        !self.policy.result.is_empty()
            && self.rules.iter().any(|r| {
                let rule = self.policy.rule(*r);
                !rule.patterns.is_empty() || !rule.packs.is_empty()
            })
    }

    pub fn scanner(&self) -> &Scanner {
        &self.policy.result
    }

    /// The first applicable rule that scans values with patterns.
    pub fn scanning_rule(&self) -> Option<usize> {
        self.rules.iter().copied().find(|r| {
            let rule = self.policy.rule(*r);
            !rule.patterns.is_empty() || !rule.packs.is_empty()
        })
    }

    pub fn rule_id(&self, r: usize) -> &str {
        &self.policy.rule(r).id
    }

    /// Whether rule `r` masks columns by name.
    pub fn has_columns(&self, r: usize) -> bool {
        self.policy.column_globs.contains_key(&r)
    }
}

impl CompiledPolicy {
    /// Whether any `on: statement` rule that can block or hold applies
    /// (an unparsable statement is then refused: fail closed). `log`
    /// rules change nothing, so they refuse nothing either.
    pub fn has_statement_rules(&self, target: &str, identity: &WorkloadIdentity) -> bool {
        self.any_rule(Direction::Statement, target, identity, |a| {
            matches!(a, Action::Block | Action::Approve)
        })
    }

    /// The masking plan for results on this target, or `None`.
    pub fn result_mask(
        self: &Arc<Self>,
        target: &str,
        identity: &WorkloadIdentity,
    ) -> Option<ResultMask> {
        let rules: Vec<usize> = (0..self.bundle.rules.len())
            .filter(|&i| {
                let r = &self.bundle.rules[i];
                r.on == Direction::Result
                    && r.action == Action::Mask
                    && self.rule_applies(i, target, identity)
            })
            .collect();
        (!rules.is_empty()).then(|| ResultMask {
            policy: self.clone(),
            rules,
        })
    }

    /// Judges one statement: rules in bundle order, the first block or
    /// approve rule that matches decides, log rules are all recorded. A
    /// statement the parser refused is blocked when any blocking rule
    /// applies (its conditions cannot be evaluated: fail closed).
    pub fn evaluate_statement(
        &self,
        target: &str,
        identity: &WorkloadIdentity,
        facts: &SqlFacts,
        sql: &[u8],
    ) -> Result<(Verdict, Vec<Decision>), ScanError> {
        self.evaluate_statement_where(facts, sql, |i| self.rule_applies(i, target, identity))
    }

    /// `evaluate_statement` for the rules `applies` selects.
    pub fn evaluate_statement_where(
        &self,
        facts: &SqlFacts,
        sql: &[u8],
        applies: impl Fn(usize) -> bool,
    ) -> Result<(Verdict, Vec<Decision>), ScanError> {
        let hits = self.statement.find(sql)?;
        let mut decisions = Vec::new();
        let mut verdict = Verdict::Allow;
        for (i, r) in self.bundle.rules.iter().enumerate() {
            if r.on != Direction::Statement || !applies(i) {
                continue;
            }
            let decisive = matches!(verdict, Verdict::Allow)
                && matches!(r.action, Action::Block | Action::Approve);
            let unjudgeable = match (&facts.parse_error, &facts.dynamic) {
                (Some(e), _) => Some(format!("statement could not be parsed ({e})")),
                (None, Some(d)) => Some(format!("statement runs SQL the node cannot read ({d})")),
                (None, None) => None,
            };
            if let Some(why) = &unjudgeable {
                if decisive {
                    let message = format!("{why}; refused because blocking rules apply");
                    decisions.push(Decision {
                        rule: r.id.clone(),
                        action: Action::Block,
                        patterns: vec![],
                        detail: Some(message.clone()),
                    });
                    verdict = Verdict::Block {
                        rule: r.id.clone(),
                        message,
                    };
                }
                continue;
            }
            let patterns: Vec<String> = {
                let mut v: Vec<String> = hits
                    .iter()
                    .filter(|h| h.rule == i)
                    .map(|h| self.statement.pattern(h.pattern).id.clone())
                    .collect();
                v.dedup();
                v
            };
            let has_patterns = !r.patterns.is_empty() || !r.packs.is_empty();
            let pattern_ok = !has_patterns || !patterns.is_empty();
            let sql_ok = r.sql.as_ref().is_none_or(|m| {
                (m.classes.is_empty() || facts.class.is_some_and(|c| m.classes.contains(&c)))
                    && (m.shapes.is_empty() || m.shapes.iter().any(|s| facts.shapes.contains(s)))
                    && (m.tables.is_empty()
                        || self.table_globs.get(&i).is_some_and(|globs| {
                            facts.tables.iter().chain(&facts.resolved).any(|t| {
                                let bare = t.rsplit('.').next().unwrap_or(t);
                                // `*.t`: a table in a schema only known when
                                // it runs; the glob's table part decides.
                                let any_schema = t.strip_prefix("*.");
                                globs.iter().any(|g| {
                                    g.matches(t)
                                        || g.matches(bare)
                                        || any_schema.is_some_and(|b| {
                                            let part = g.as_str().rsplit('.').next().unwrap_or("");
                                            glob::Pattern::new(part).is_ok_and(|p| p.matches(b))
                                        })
                                })
                            })
                        }))
            });
            if !(pattern_ok && sql_ok) || !(decisive || r.action == Action::Log) {
                continue;
            }
            decisions.push(Decision {
                rule: r.id.clone(),
                action: match r.action {
                    Action::Block | Action::Approve => r.action,
                    _ => Action::Log,
                },
                patterns,
                detail: r.message.clone(),
            });
            if decisive {
                verdict = Verdict::of(r);
            }
        }
        Ok((verdict, decisions))
    }
}

impl AsRef<Scanner> for CompiledPolicy {
    /// The response scanner: what stream maskers hold on to.
    fn as_ref(&self) -> &Scanner {
        &self.response
    }
}

/// What `sluice policy show` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct PolicySummary {
    pub version: u64,
    pub name: String,
    pub signer: String,
    pub digest: String,
    pub rules: Vec<String>,
    pub credentials_for: Vec<String>,
    pub response_window_bytes: usize,
    /// Target names when the bundle replaces the configuration's list.
    #[serde(default)]
    pub targets_from_bundle: Option<Vec<String>>,
    /// The bundle's expiry, if any, and whether it has passed (the node
    /// keeps enforcing it, audits `policy.expired`, and will not start on
    /// it again).
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub expired: bool,
    /// Highest bundle version this node has accepted (persisted apart
    /// from the bundle): nothing older is accepted again.
    #[serde(default)]
    pub floor: u64,
}

/// Receives bundles' target lists (implemented by the daemon).
pub trait TargetSink: Send + Sync {
    /// Whether this node can serve these targets; the reason if not.
    fn check(&self, targets: &[crate::config::Target]) -> Result<(), String>;
    /// Installs them (`None`: back to the node configuration's).
    fn install(&self, targets: Option<Vec<crate::config::Target>>);
}

pub struct PolicyEngine {
    target_sink: RwLock<Option<Arc<dyn TargetSink>>>,
    current: RwLock<Arc<CompiledPolicy>>,
    trusted: Vec<TrustedKey>,
    dir: PathBuf,
    store: Arc<RecordStore>,
    max_window: usize,
    /// Serialises pushes so version checks cannot race.
    apply_lock: std::sync::Mutex<()>,
    /// The policy floor, kept in the record store (sled tree
    /// `policy_floor`), apart from the bundle file.
    floor_tree: sled::Tree,
    floor: RwLock<Option<Floor>>,
    watch_dir: Option<PathBuf>,
}

fn current_path(dir: &Path) -> PathBuf {
    dir.join("current.jws")
}

/// The highest bundle version accepted, and which bundle that was.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Floor {
    version: u64,
    digest: String,
    at_ms: u64,
}

const FLOOR_KEY: &[u8] = b"floor";

fn read_floor(tree: &sled::Tree) -> Result<Option<Floor>, PolicyError> {
    match tree.get(FLOOR_KEY) {
        Ok(None) => Ok(None),
        Ok(Some(v)) => serde_json::from_slice(&v)
            .map(Some)
            // Fail closed: an unreadable floor is not "no floor".
            .map_err(|e| PolicyError::Floor(format!("unreadable floor record: {e}"))),
        Err(e) => Err(PolicyError::Floor(e.to_string())),
    }
}

fn write_floor(tree: &sled::Tree, p: &CompiledPolicy) -> Result<Floor, PolicyError> {
    let f = Floor {
        version: p.version,
        digest: p.digest.clone(),
        at_ms: crate::record::now_ms(),
    };
    let bytes = serde_json::to_vec(&f).map_err(|e| PolicyError::Floor(e.to_string()))?;
    tree.insert(FLOOR_KEY, bytes)
        .and_then(|_| tree.flush())
        .map_err(|e| PolicyError::Floor(e.to_string()))?;
    Ok(f)
}

/// A bundle below the floor, or at it but not the bundle accepted then,
/// is refused.
fn check_floor(p: &CompiledPolicy, floor: Option<&Floor>) -> Result<(), PolicyError> {
    match floor {
        Some(f) if p.version < f.version => Err(PolicyError::BelowFloor {
            version: p.version,
            floor: f.version,
        }),
        Some(f) if p.version == f.version && p.digest != f.digest => {
            Err(PolicyError::FloorDigest {
                version: p.version,
                digest: p.digest.clone(),
            })
        }
        _ => Ok(()),
    }
}

impl PolicyEngine {
    /// Loads the policy in force. Fail closed: a stored bundle that no
    /// longer verifies, compiles, has expired or is below the floor stops
    /// the node from starting; so does a missing one once a bundle has
    /// been accepted (unless the watch directory holds a valid bundle at
    /// or above the floor). Only a node that never accepted a bundle runs
    /// the embedded example.
    pub fn load(
        trusted_keys: &[PathBuf],
        state_dir: &Path,
        store: Arc<RecordStore>,
        max_window: usize,
        watch_dir: Option<&Path>,
    ) -> Result<Self, PolicyError> {
        let trusted = trusted_keys
            .iter()
            .map(|p| sign::load_trusted(p))
            .collect::<Result<Vec<_>, _>>()?;
        let dir = state_dir.join("policy");
        std::fs::create_dir_all(&dir).map_err(|source| PolicyError::Io {
            path: dir.clone(),
            source,
        })?;
        let floor_tree = store
            .tree("policy_floor")
            .map_err(|e| PolicyError::Floor(e.to_string()))?;
        let mut floor = read_floor(&floor_tree)?;
        let floor_version = floor.as_ref().map_or(0, |f| f.version);
        let path = current_path(&dir);
        let verified = |jws: &str| -> Result<CompiledPolicy, PolicyError> {
            let (claims, kid) = sign::verify(jws, &trusted)?;
            let p = CompiledPolicy::compile(&claims.bundle, &kid, max_window)?;
            if p.version != claims.version {
                return Err(PolicyError::VersionMismatch {
                    claimed: claims.version,
                    actual: p.version,
                });
            }
            p.check_expiry()?;
            check_floor(&p, floor.as_ref())?;
            Ok(p)
        };
        let current = match std::fs::read_to_string(&path) {
            Ok(jws) => verified(&jws).map_err(|e| PolicyError::StoredInvalid {
                path: path.clone(),
                reason: e.to_string(),
                floor: floor_version,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match &floor {
                None => CompiledPolicy::compile(bundle::EMBEDDED_DEFAULT, "embedded", max_window)?,
                Some(f) => {
                    // Recovery: the newest valid bundle in the watch dir.
                    let mut best: Option<(CompiledPolicy, String)> = None;
                    for file in watch_dir.map(jws_files).unwrap_or_default() {
                        let Ok(jws) = std::fs::read_to_string(&file) else {
                            continue;
                        };
                        match verified(&jws) {
                            Ok(p) if best.as_ref().is_none_or(|(b, _)| p.version > b.version) => {
                                best = Some((p, jws))
                            }
                            Ok(_) => {}
                            Err(e) => {
                                warn!(file = %file.display(), error = %e, "not usable to restore the policy")
                            }
                        }
                    }
                    let Some((p, jws)) = best else {
                        return Err(PolicyError::StoredMissing {
                            path,
                            floor: f.version,
                        });
                    };
                    write_atomic(&path, &jws)?;
                    warn!(
                        version = p.version,
                        "stored policy was missing; restored from the watch directory"
                    );
                    if let Err(e) = store.audit(
                        "policy.restored",
                        &serde_json::json!({"version": p.version, "digest": p.digest, "floor": f.version}),
                    ) {
                        warn!(error = %e, "cannot record policy audit event");
                    }
                    p
                }
            },
            Err(source) => return Err(PolicyError::Io { path, source }),
        };
        // A node upgraded from before the floor existed: its stored bundle
        // sets it.
        if current.signer != "embedded" && current.version > floor_version {
            floor = Some(write_floor(&floor_tree, &current)?);
        }
        info!(version = current.version, name = %current.name, signer = %current.signer, floor = floor.as_ref().map_or(0, |f| f.version), "policy in force");
        Ok(Self {
            target_sink: RwLock::new(None),
            current: RwLock::new(Arc::new(current)),
            trusted,
            dir,
            store,
            max_window,
            apply_lock: std::sync::Mutex::new(()),
            floor_tree,
            floor: RwLock::new(floor),
            watch_dir: watch_dir.map(Path::to_owned),
        })
    }

    /// Highest version accepted so far (0: none).
    pub fn floor(&self) -> u64 {
        self.floor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, |f| f.version)
    }

    /// Watches the policy in force for expiry: when it passes, a
    /// `policy.expired` audit event (once) and an error in the log. The
    /// node keeps enforcing the expired bundle (nothing better is at hand;
    /// dropping it would weaken enforcement), `policy show` and the audit
    /// stream say so, and the node will not start on it again.
    pub async fn watch_expiry(self: Arc<Self>) {
        let mut reported: Option<String> = None;
        loop {
            let p = self.current();
            if p.expired_at(SystemTime::now()) && reported.as_deref() != Some(p.digest.as_str()) {
                error!(version = p.version, expires_at = ?p.bundle.expires_at, "policy bundle in force has expired; push a fresh one (the node will refuse to start on this one)");
                if let Err(e) = self.store.audit(
                    "policy.expired",
                    &serde_json::json!({"version": p.version, "digest": p.digest, "expires_at": p.bundle.expires_at}),
                ) {
                    warn!(error = %e, "cannot record policy audit event");
                }
                reported = Some(p.digest.clone());
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    pub fn set_target_sink(&self, sink: Arc<dyn TargetSink>) {
        *self.target_sink.write().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    pub fn current(&self) -> Arc<CompiledPolicy> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn summary(&self) -> PolicySummary {
        let p = self.current();
        PolicySummary {
            version: p.version,
            name: p.name.clone(),
            signer: p.signer.clone(),
            digest: p.digest.clone(),
            rules: p
                .bundle
                .rules
                .iter()
                .map(|r| {
                    format!(
                        "{} on {:?} {:?} targets {:?} workloads {:?}",
                        r.id, r.on, r.action, r.targets, r.workloads
                    )
                })
                .collect(),
            credentials_for: p.credentials.keys().cloned().collect(),
            targets_from_bundle: p
                .bundle
                .targets
                .as_ref()
                .map(|t| t.iter().map(|t| t.name.clone()).collect()),
            response_window_bytes: p.response.window,
            expires_at: p.bundle.expires_at.clone(),
            expired: p.expired_at(SystemTime::now()),
            floor: self.floor(),
        }
    }

    /// Verifies, compiles and installs a signed bundle; on any error the
    /// policy in force is unchanged. Every attempt is on the audit chain.
    pub fn apply(&self, jws: &str, via: &str) -> Result<Arc<CompiledPolicy>, PolicyError> {
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.try_apply(jws);
        let audit = match &result {
            Ok(p) => {
                serde_json::json!({"via": via, "accepted": true, "version": p.version, "name": p.name, "signer": p.signer, "digest": p.digest})
            }
            Err(e) => serde_json::json!({"via": via, "accepted": false, "reason": e.to_string()}),
        };
        if let Err(e) = self.store.audit(
            if result.is_ok() {
                "policy.applied"
            } else {
                "policy.refused"
            },
            &audit,
        ) {
            warn!(error = %e, "cannot record policy audit event");
        }
        match &result {
            Ok(p) => {
                info!(version = p.version, name = %p.name, signer = %p.signer, via, "policy applied")
            }
            Err(e) => warn!(error = %e, via, "policy bundle refused"),
        }
        result
    }

    fn try_apply(&self, jws: &str) -> Result<Arc<CompiledPolicy>, PolicyError> {
        let (claims, kid) = sign::verify(jws, &self.trusted)?;
        let compiled = CompiledPolicy::compile(&claims.bundle, &kid, self.max_window)?;
        if compiled.version != claims.version {
            return Err(PolicyError::VersionMismatch {
                claimed: claims.version,
                actual: compiled.version,
            });
        }
        compiled.check_expiry()?;
        let current = self.current().version;
        if compiled.version <= current {
            return Err(PolicyError::Stale {
                version: compiled.version,
                current,
            });
        }
        // Also above the floor (in force and floor differ when the stored
        // bundle was removed under a running node, or after a restore).
        let floor = self.floor();
        if compiled.version <= floor {
            return Err(PolicyError::BelowFloor {
                version: compiled.version,
                floor,
            });
        }
        let sink = self
            .target_sink
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let (Some(targets), Some(sink)) = (&compiled.bundle.targets, &sink) {
            sink.check(targets).map_err(PolicyError::Targets)?;
        }
        // The bundle first, then the floor: a crash in between leaves a
        // newer bundle over an older floor, which the next start repairs
        // (the other order would leave the node unable to start).
        write_atomic(&current_path(&self.dir), jws)?;
        let floor = write_floor(&self.floor_tree, &compiled)?;
        *self.floor.write().unwrap_or_else(|e| e.into_inner()) = Some(floor);
        let compiled = Arc::new(compiled);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = compiled.clone();
        if let Some(sink) = sink {
            sink.install(compiled.bundle.targets.clone());
        }
        Ok(compiled)
    }

    /// Where the watch directory is, if any.
    pub fn watch_dir(&self) -> Option<&Path> {
        self.watch_dir.as_deref()
    }

    /// Applies new `*.jws` files dropped into `dir` (a second way in).
    pub async fn watch(self: Arc<Self>, dir: PathBuf) {
        let mut seen: HashSet<String> = HashSet::new();
        loop {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                let mut files: Vec<_> = entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "jws"))
                    .collect();
                files.sort();
                for f in files {
                    let Ok(text) = std::fs::read_to_string(&f) else {
                        continue;
                    };
                    let digest = hex::encode(Sha256::digest(text.as_bytes()));
                    if seen.insert(digest) {
                        let _ = self.apply(&text, &format!("watch:{}", f.display()));
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
}

fn write_atomic(path: &Path, jws: &str) -> Result<(), PolicyError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, jws.trim())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|source| PolicyError::Io {
            path: path.to_owned(),
            source,
        })
}

/// `*.jws` files of a directory, sorted.
fn jws_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "jws"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[cfg(test)]
mod tool_rule_tests {
    use super::*;

    #[test]
    fn log_only_tool_rules_do_not_engage_the_guard() {
        let log =
            "version: 1\nname: t\nrules:\n  - {id: l, on: tool_call, tools: ['*'], action: log}\n";
        let p = CompiledPolicy::compile(log, "t", 4096).unwrap();
        assert!(!p.has_tool_rules("any", &WorkloadIdentity::default()));
        let block = log.replace("action: log", "action: block");
        let p = CompiledPolicy::compile(&block, "t", 4096).unwrap();
        assert!(p.has_tool_rules("any", &WorkloadIdentity::default()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SQL_BUNDLE: &str = r#"
version: 1
name: sql
rules:
  - id: no-destructive
    on: statement
    targets: [db]
    sql:
      shapes: [drop, delete_without_where]
    action: block
  - id: payroll
    on: statement
    targets: [db]
    sql:
      tables: ["hr.*"]
    action: approve
  - id: grants
    on: statement
    targets: [db]
    sql:
      classes: [dcl]
    patterns:
      - id: superuser
        regex: '(?i)superuser'
    action: block
  - id: ddl-seen
    on: statement
    targets: [db]
    sql:
      classes: [ddl]
    action: log
  - id: mask-email
    on: result
    targets: [db]
    columns: ["*email*"]
    action: mask
"#;

    fn judge(p: &CompiledPolicy, sql: &str) -> (String, Vec<String>) {
        let facts = crate::postgres::classify::classify(sql);
        let (v, d) = p
            .evaluate_statement("db", &WorkloadIdentity::default(), &facts, sql.as_bytes())
            .unwrap();
        let verdict = match v {
            Verdict::Allow => "allow".to_owned(),
            Verdict::Block { rule, .. } => format!("block {rule}"),
            Verdict::Approve { rule, .. } => format!("approve {rule}"),
        };
        (
            verdict,
            d.into_iter()
                .map(|d| format!("{} {}", d.action, d.rule))
                .collect(),
        )
    }

    #[test]
    fn statement_rules_match_the_parse_tree() {
        let p = CompiledPolicy::compile(SQL_BUNDLE, "t", 8192).unwrap();
        assert_eq!(judge(&p, "DELETE FROM users").0, "block no-destructive");
        assert_eq!(judge(&p, "DELETE FROM users WHERE id = 1").0, "allow");
        assert_eq!(judge(&p, "drop table t").0, "block no-destructive");
        // A table glob matches the schema-qualified name.
        assert_eq!(judge(&p, "SELECT * FROM hr.salaries").0, "approve payroll");
        assert_eq!(judge(&p, "SELECT * FROM salaries").0, "allow");
        // Class and pattern must both match.
        assert_eq!(judge(&p, "ALTER ROLE ci SUPERUSER").0, "block grants");
        assert_eq!(judge(&p, "GRANT SELECT ON t TO ci").0, "allow");
        assert_eq!(judge(&p, "SELECT 'superuser'").0, "allow");
        let (v, d) = judge(&p, "CREATE TABLE t (a int)");
        assert_eq!((v.as_str(), d), ("allow", vec!["log ddl-seen".to_owned()]));
        // Fail closed: what the parser refuses is blocked under blocking rules.
        assert_eq!(judge(&p, "DELETE FORM users").0, "block no-destructive");
        // Other targets: no statement rules.
        let facts = crate::postgres::classify::classify("DROP TABLE t");
        let (v, _) = p
            .evaluate_statement(
                "other",
                &WorkloadIdentity::default(),
                &facts,
                b"DROP TABLE t",
            )
            .unwrap();
        assert!(matches!(v, Verdict::Allow));
        assert!(p.has_statement_rules("db", &WorkloadIdentity::default()));
        assert!(!p.has_statement_rules("other", &WorkloadIdentity::default()));
        // Log rules alone cannot refuse anything.
        let log_only = CompiledPolicy::compile(
            "version: 1\nname: x\nrules:\n  - id: audit\n    on: statement\n    targets: [db]\n    sql:\n      classes: [ddl]\n    action: log\n",
            "t",
            8192,
        )
        .unwrap();
        assert!(!log_only.has_statement_rules("db", &WorkloadIdentity::default()));
    }

    #[test]
    fn statement_and_result_rules_are_checked_at_compile() {
        let bad = |rules: &str| {
            CompiledPolicy::compile(&format!("version: 1\nname: x\nrules:\n{rules}"), "t", 8192)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(
            bad("  - id: a\n    on: result\n    columns: [x]\n    action: block\n")
                .contains("block and approve act on")
        );
        assert!(
            bad("  - id: a\n    on: statement\n    sql: {shapes: [drop]}\n    action: mask\n")
                .contains("mask acts on")
        );
        assert!(
            bad("  - id: a\n    on: request\n    sql: {shapes: [drop]}\n    action: block\n")
                .contains("only `on: statement`")
        );
        assert!(bad(
            "  - id: a\n    on: statement\n    sql: {shapes: [explode]}\n    action: block\n"
        )
        .contains("explode"));
        assert!(
            bad("  - id: a\n    on: response\n    columns: [x]\n    action: mask\n")
                .contains("only `on: result`")
        );
        let p = Arc::new(CompiledPolicy::compile(SQL_BUNDLE, "t", 8192).unwrap());
        let m = p.result_mask("db", &WorkloadIdentity::default()).unwrap();
        assert_eq!(
            m.column_rule("User_Email").map(|r| m.rule_id(r)),
            Some("mask-email")
        );
        assert_eq!(m.column_rule("name"), None);
        assert!(!m.scans());
        assert!(p
            .result_mask("other", &WorkloadIdentity::default())
            .is_none());
    }

    #[test]
    fn expiry_parses_and_is_checked() {
        let p = CompiledPolicy::compile(
            "version: 3\nname: x\nexpires_at: 2001-01-01T00:00:00Z\n",
            "t",
            8192,
        )
        .unwrap();
        assert!(p.expired_at(SystemTime::now()));
        assert!(matches!(p.check_expiry(), Err(PolicyError::Expired { .. })));
        let p = CompiledPolicy::compile(
            "version: 3\nname: x\nexpires_at: 2999-01-01T00:00:00Z\n",
            "t",
            8192,
        )
        .unwrap();
        assert!(p.check_expiry().is_ok());
        let e = CompiledPolicy::compile("version: 3\nname: x\nexpires_at: tomorrow\n", "t", 8192)
            .err()
            .unwrap();
        assert!(e.to_string().contains("expires_at"), "{e}");
    }

    #[test]
    fn floor_refuses_older_and_same_version_other_bundle() {
        let p = CompiledPolicy::compile("version: 5\nname: x\n", "t", 8192).unwrap();
        let f = Floor {
            version: 6,
            digest: "d".into(),
            at_ms: 0,
        };
        assert!(matches!(
            check_floor(&p, Some(&f)),
            Err(PolicyError::BelowFloor { .. })
        ));
        let same = Floor {
            version: 5,
            digest: "other".into(),
            at_ms: 0,
        };
        assert!(matches!(
            check_floor(&p, Some(&same)),
            Err(PolicyError::FloorDigest { .. })
        ));
        let ok = Floor {
            version: 5,
            digest: p.digest.clone(),
            at_ms: 0,
        };
        assert!(check_floor(&p, Some(&ok)).is_ok() && check_floor(&p, None).is_ok());
    }

    #[test]
    fn embedded_default_compiles_with_bounded_window() {
        let p = CompiledPolicy::compile(bundle::EMBEDDED_DEFAULT, "embedded", 8192).unwrap();
        assert!(p.response.window > 0 && p.response.window <= 8192);
        let id = WorkloadIdentity::default();
        assert!(p.masks_responses("cursor-api", &id));
        assert!(!p.masks_responses("other", &id));
        let (v, d) = p
            .evaluate_request(
                "cursor-api",
                &id,
                b"here is the PRODUCTION password: hunter2",
            )
            .unwrap();
        assert!(matches!(v, Verdict::Block { .. }));
        assert_eq!(d[0].rule, "block-production-credentials-in-prompts");
    }

    #[test]
    fn invalid_bundles_name_the_problem() {
        let e = CompiledPolicy::compile("version: 1\nname: x\nrules:\n  - id: a\n    on: response\n    action: block\n    packs: [secrets]\n", "t", 8192)
            .err().unwrap();
        assert!(e.to_string().contains("rules[0].action"), "{e}");
        let e = CompiledPolicy::compile("version: 1\nname: x\nrules:\n  - id: a\n    on: request\n    action: block\n    packs: [nope]\n", "t", 8192)
            .err().unwrap();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = CompiledPolicy::compile("version: 1\nname: x\nrules:\n  - id: a\n    on: request\n    action: log\n    patterns: [{id: p, regex: 'a.*'}]\n", "t", 8192)
            .err().unwrap();
        assert!(e.to_string().contains("unbounded"), "{e}");
        let e = CompiledPolicy::compile("version: [\n", "t", 8192)
            .err()
            .unwrap();
        assert!(e.to_string().contains("does not parse"), "{e}");
    }
}
