//! Policy: signed bundles (`bundle`, `sign`), compiled once into scanners
//! and rule tables, swapped in atomically so live connections keep going
//! (each request reads the policy in force when it starts).
pub mod bundle;
pub mod sign;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

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

/// A decision taken on an exchange, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub rule: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

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

pub struct CompiledPolicy {
    pub version: u64,
    pub name: String,
    pub signer: String,
    pub digest: String,
    pub bundle: Bundle,
    request: Scanner,
    response: Scanner,
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

impl CompiledPolicy {
    pub fn compile(text: &str, signer: &str, max_window: usize) -> Result<Self, PolicyError> {
        let bundle: Bundle =
            serde_yaml::from_str(text).map_err(|e| PolicyError::Parse(e.to_string()))?;
        let bad = |field: String, message: String| PolicyError::Invalid { field, message };
        if bundle.name.trim().is_empty() {
            return Err(bad("name".into(), "must not be empty".into()));
        }
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
        let (mut req, mut resp) = (Vec::new(), Vec::new());
        for (i, r) in bundle.rules.iter().enumerate() {
            if !ids.insert(r.id.as_str()) {
                return Err(bad(
                    format!("rules[{i}].id"),
                    format!("`{}` is used twice", r.id),
                ));
            }
            match (r.on, r.action) {
                (Direction::Response, Action::Block | Action::Approve) => {
                    return Err(bad(
                        format!("rules[{i}].action"),
                        "block and approve act on requests (`on: request`)".into(),
                    ))
                }
                (Direction::Request, Action::Mask) => {
                    return Err(bad(
                        format!("rules[{i}].action"),
                        "mask acts on responses (`on: response`)".into(),
                    ))
                }
                _ => {}
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
                let pack = packs.get(p).ok_or_else(|| {
                    bad(format!("rules[{i}].packs"), format!("no pack named `{p}`"))
                })?;
                defs.extend(pack.iter().cloned());
            }
            if defs.is_empty() {
                return Err(bad(
                    format!("rules[{i}]"),
                    format!("rule `{}` has no patterns or packs", r.id),
                ));
            }
            let target = if r.on == Direction::Request {
                &mut req
            } else {
                &mut resp
            };
            for d in defs {
                target.push(PatternSpec {
                    id: d.id,
                    rule: i,
                    regex: d.regex,
                    caseless: d.caseless,
                    luhn: d.luhn,
                    prefilter: d.prefilter,
                    min_entropy: d.min_entropy,
                    deny: d.deny,
                });
            }
        }
        let mut bundle = bundle;
        let mut credentials = HashMap::new();
        let mut secrets = Vec::new();
        for c in &bundle.credentials {
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
            });
            resp.push(PatternSpec::new(
                "node-credential",
                rule,
                regex::escape(secret.expose()),
            ));
        }
        let request = Scanner::compile(req, max_window)?;
        let response = Scanner::compile(resp, max_window)?;
        Ok(Self {
            version: bundle.version,
            name: bundle.name.clone(),
            signer: signer.to_owned(),
            digest: hex::encode(Sha256::digest(text.as_bytes())),
            bundle,
            request,
            response,
            workloads,
            credentials,
        })
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
        let hits = self.request.find(body)?;
        let mut by_rule: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
        for h in hits {
            if self.rule_applies(h.rule, target, identity) {
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
            let action = match r.action {
                Action::Block => "block",
                Action::Approve => "approve",
                Action::Log => "log",
                Action::Mask => "mask",
            };
            let decisive = matches!(verdict, Verdict::Allow)
                && matches!(r.action, Action::Block | Action::Approve);
            if decisive || r.action == Action::Log {
                decisions.push(Decision {
                    rule: r.id.clone(),
                    action: action.into(),
                    patterns,
                    detail: r.message.clone(),
                });
            }
            if decisive {
                let message = r
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("matched policy rule {}", r.id));
                verdict = match r.action {
                    Action::Block => Verdict::Block {
                        rule: r.id.clone(),
                        message,
                    },
                    _ => Verdict::Approve {
                        rule: r.id.clone(),
                        message,
                        timeout_secs: r.timeout_secs.unwrap_or(60),
                    },
                };
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
}

fn current_path(dir: &Path) -> PathBuf {
    dir.join("current.jws")
}

impl PolicyEngine {
    pub fn load(
        trusted_keys: &[PathBuf],
        state_dir: &Path,
        store: Arc<RecordStore>,
        max_window: usize,
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
        let embedded = CompiledPolicy::compile(bundle::EMBEDDED_DEFAULT, "embedded", max_window)?;
        let mut current = embedded;
        // The last accepted bundle survives restarts, if it still verifies.
        if let Ok(jws) = std::fs::read_to_string(current_path(&dir)) {
            match sign::verify(&jws, &trusted)
                .map_err(PolicyError::from)
                .and_then(|(c, kid)| CompiledPolicy::compile(&c.bundle, &kid, max_window))
            {
                Ok(p) => current = p,
                Err(e) => {
                    warn!(error = %e, "stored policy no longer valid; using the embedded default")
                }
            }
        }
        info!(version = current.version, name = %current.name, signer = %current.signer, "policy in force");
        Ok(Self {
            target_sink: RwLock::new(None),
            current: RwLock::new(Arc::new(current)),
            trusted,
            dir,
            store,
            max_window,
            apply_lock: std::sync::Mutex::new(()),
        })
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
        let current = self.current().version;
        if compiled.version <= current {
            return Err(PolicyError::Stale {
                version: compiled.version,
                current,
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
        let path = current_path(&self.dir);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, jws.trim())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| PolicyError::Io { path, source })?;
        let compiled = Arc::new(compiled);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = compiled.clone();
        if let Some(sink) = sink {
            sink.install(compiled.bundle.targets.clone());
        }
        Ok(compiled)
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

#[cfg(test)]
mod tests {
    use super::*;

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
