//! Webhook notifications: what needs a person now (a held request, a
//! broken chain, a suspended identity still trying, an anomaly or a
//! containment event) sent to Slack-compatible incoming webhooks and to
//! generic JSON receivers (signed with HMAC-SHA256).
//!
//! Each hook has its own bounded queue and one worker. `alert` only
//! `try_send`s: a full queue drops the alert and counts it, so neither
//! ingest nor a web handler ever waits on a receiver, and a receiver
//! that hangs fills only its own queue. Each delivery is retried a few
//! times with backoff, each attempt bounded in time. Outbound HTTP is the
//! console's own client (`auth::fetch`: https, or http to loopback).
//!
//! A hook's URL is treated as a secret (a Slack URL is its credential):
//! logs name a hook by scheme and host only.
use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::http::Method;
use ring::hmac;
use serde_json::{json, Value};
use sluice_evidence::{
    follow::{ChainState, Head},
    line::Line,
};
use sluice_fleet::approval::Held;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::auth::fetch;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("{0}")]
    Config(String),
}

/// The `run` options of notifications.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct NotifyArgs {
    /// Slack-compatible incoming webhook (https, or http to loopback),
    /// repeatable. Also SLUICE_CONSOLE_WEBHOOK_SLACK, one URL a line. The
    /// URL is its credential: it is never logged.
    #[arg(long = "webhook-slack", value_name = "URL")]
    pub webhook_slack: Vec<String>,
    /// Generic JSON webhook (https, or http to loopback), repeatable;
    /// each POST is signed (`X-Sluice-Signature`, see
    /// --webhook-secret-file). Also SLUICE_CONSOLE_WEBHOOK_JSON, one URL
    /// a line.
    #[arg(long = "webhook-json", value_name = "URL")]
    pub webhook_json: Vec<String>,
    /// File holding the HMAC-SHA256 secret the JSON webhooks are signed
    /// with (at least 16 bytes); must not be readable by group or others.
    #[arg(long, env = "SLUICE_CONSOLE_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// The console's external base URL, for links in notifications
    /// (default `http://<--listen>`).
    #[arg(long, env = "SLUICE_CONSOLE_PUBLIC_URL")]
    pub public_url: Option<String>,
}

/// What is worth a notification.
#[derive(Clone, Debug)]
pub enum Alert {
    /// A request held on a node for a person's decision.
    ApprovalPending(Box<Held>),
    /// A node's chain went to `broken` or `gap`.
    Chain {
        node: String,
        state: ChainState,
        seq: u64,
        detail: String,
    },
    /// A suspended identity's connection, request or statement refused.
    SuspendedTrying {
        node: String,
        identity: String,
        repository: Option<String>,
        session: u64,
        at_ms: u64,
        event_kind: String,
        reason: String,
    },
    /// An `anomaly.*` or `containment*` evidence event.
    Anomaly {
        node: String,
        seq: u64,
        session: u64,
        at_ms: u64,
        event_kind: String,
        body: Value,
    },
}

/// How long a suspended identity's further tries stay quiet.
const SUSPENDED_QUIET: Duration = Duration::from_secs(300);
/// How long a hold (or an event) is remembered as alerted: far longer
/// than any hold lives.
const ONCE: Duration = Duration::from_secs(24 * 3600);
/// Remembered alerts beyond which the expired ones are forgotten.
const SEEN_MAX: usize = 50_000;

impl Alert {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ApprovalPending(_) => "approval.pending",
            Self::Chain {
                state: ChainState::Broken,
                ..
            } => "chain.broken",
            Self::Chain { .. } => "chain.gap",
            Self::SuspendedTrying { .. } => "identity.suspended_trying",
            Self::Anomaly { .. } => "anomaly",
        }
    }

    pub fn node(&self) -> &str {
        match self {
            Self::ApprovalPending(h) => &h.node,
            Self::Chain { node, .. }
            | Self::SuspendedTrying { node, .. }
            | Self::Anomaly { node, .. } => node,
        }
    }

    fn at_ms(&self) -> u64 {
        match self {
            Self::ApprovalPending(h) => h.created_ms,
            Self::Chain { .. } => crate::fleet::now_ms(),
            Self::SuspendedTrying { at_ms, .. } | Self::Anomaly { at_ms, .. } => *at_ms,
        }
    }

    /// What makes two alerts the same one, and for how long the second
    /// is not sent (`None`: every one is sent; chain alerts are sent per
    /// transition, which the store's head already makes unique).
    fn once(&self) -> Option<(String, Duration)> {
        match self {
            Self::ApprovalPending(h) => {
                Some((format!("held {} {} {}", h.node, h.id, h.hold), ONCE))
            }
            Self::Chain { .. } => None,
            Self::SuspendedTrying { node, identity, .. } => {
                Some((format!("suspended {node} {identity}"), SUSPENDED_QUIET))
            }
            Self::Anomaly { node, seq, .. } => Some((format!("event {node} {seq}"), ONCE)),
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::ApprovalPending(_) => "Approval needed",
            Self::Chain {
                state: ChainState::Broken,
                ..
            } => "Evidence chain broken",
            Self::Chain { .. } => "Evidence missing from a node's chain",
            Self::SuspendedTrying { .. } => "Suspended identity still trying",
            Self::Anomaly { event_kind, .. } if event_kind.starts_with("containment") => {
                "Containment"
            }
            Self::Anomaly { .. } => "Anomaly",
        }
    }

    /// One line for a person.
    pub fn summary(&self) -> String {
        let s = match self {
            Self::ApprovalPending(h) => {
                let who =
                    h.ci.as_ref()
                        .and_then(|c| c.repository.clone())
                        .unwrap_or_else(|| h.identity.clone());
                let secs = h.expires_ms.saturating_sub(h.created_ms) / 1000;
                format!(
                    "{} {}{} from {who} held on {} by rule {} (denied in {secs}s without an answer)",
                    h.method, h.authority, h.path, h.node, h.rule
                )
            }
            Self::Chain {
                node,
                state,
                detail,
                ..
            } => format!("node {node}: chain {}: {detail}", state.as_str()),
            Self::SuspendedTrying {
                node,
                identity,
                repository,
                event_kind,
                reason,
                ..
            } => {
                let who = match repository {
                    Some(r) => format!("{identity} ({r})"),
                    None => identity.clone(),
                };
                let what = event_kind.split('.').next().unwrap_or("event");
                format!("{who} on {node}: {what} refused ({reason})")
            }
            Self::Anomaly {
                node,
                event_kind,
                body,
                ..
            } => anomaly_summary(node, event_kind, body),
        };
        clip(&s, 400)
    }

    /// The console page it concerns.
    fn path(&self) -> String {
        match self {
            Self::ApprovalPending(_) => "/approvals".into(),
            Self::Chain { .. } => "/nodes".into(),
            Self::SuspendedTrying { node, session, .. } | Self::Anomaly { node, session, .. }
                if *session != 0 =>
            {
                format!("/sessions/{}/{session}", path_segment(node))
            }
            Self::SuspendedTrying { .. } => "/identities".into(),
            Self::Anomaly { .. } => "/nodes".into(),
        }
    }

    fn detail(&self) -> Value {
        match self {
            Self::ApprovalPending(h) => {
                // The body's preview stays in the console: a receiver
                // (a chat, a ticket) learns that something waits, not
                // what the job sent.
                json!({
                    "node": h.node, "id": h.id, "hold": h.hold, "session": h.session,
                    "identity": h.identity, "ci": h.ci, "rule": h.rule, "message": h.message,
                    "method": h.method, "authority": h.authority, "path": h.path,
                    "created_ms": h.created_ms, "expires_ms": h.expires_ms,
                })
            }
            Self::Chain {
                state, seq, detail, ..
            } => json!({"state": state.as_str(), "seq": seq, "detail": detail}),
            Self::SuspendedTrying {
                identity,
                repository,
                session,
                event_kind,
                reason,
                ..
            } => json!({
                "identity": identity, "repository": repository, "session": session,
                "event_kind": event_kind, "reason": reason,
            }),
            Self::Anomaly {
                seq,
                session,
                event_kind,
                body,
                ..
            } => json!({"event_kind": event_kind, "seq": seq, "session": session, "event": body}),
        }
    }

    /// The chain alert for a head that moved from `before` to `after`:
    /// only a change into `broken` or `gap` is one.
    pub fn chain(node: &str, before: ChainState, after: &Head) -> Option<Self> {
        if after.state == before || !matches!(after.state, ChainState::Broken | ChainState::Gap) {
            return None;
        }
        Some(Self::Chain {
            node: node.into(),
            state: after.state,
            seq: after.seq,
            detail: after.detail.clone().unwrap_or_default(),
        })
    }

    /// The alert an evidence event is, if any.
    pub fn from_line(line: &Line) -> Option<Self> {
        if line.kind.starts_with("anomaly.") || line.kind.starts_with("containment") {
            let body = serde_json::from_slice::<Value>(&line.body).unwrap_or(Value::Null);
            let session = body["session"].as_u64().unwrap_or(line.connection);
            return Some(Self::Anomaly {
                node: line.node.clone(),
                seq: line.seq,
                session,
                at_ms: line.at_ms,
                event_kind: line.kind.clone(),
                body,
            });
        }
        let family = line.kind.split('.').next().unwrap_or("");
        if !matches!(family, "connection" | "exchange" | "statement") {
            return None;
        }
        // Cheap pre-filter: most events are not refusals of a suspended
        // identity, and ingest is the hot path.
        let text = std::str::from_utf8(&line.body).ok()?;
        if !text.contains("suspended") {
            return None;
        }
        let body = serde_json::from_str::<Value>(text).ok()?;
        // A connection refused outright (`outcome.reason` as the store
        // projects it), or a request or statement the node blocked with
        // its own `identity-suspended` decision.
        let reason = if family == "connection" {
            let o = &body["outcome"];
            let r = o["reason"].as_str()?;
            // By its kind where the node says it (`outcome.kind`), by
            // its words for records of nodes that do not.
            let suspended = match o["kind"].as_str() {
                Some(kind) => kind == "suspended",
                None => r.starts_with("identity suspended"),
            };
            (o["status"].as_str() == Some("refused") && suspended).then(|| r.to_owned())?
        } else {
            let d = body["decisions"]
                .as_array()?
                .iter()
                .find(|d| d["rule"].as_str() == Some("identity-suspended"))?;
            match d["detail"].as_str() {
                Some(r) => format!("identity suspended: {r}"),
                None => "identity suspended".into(),
            }
        };
        let session = if family == "connection" {
            body["id"].as_u64()
        } else {
            body["session"].as_u64()
        }
        .unwrap_or(line.connection);
        Some(Self::SuspendedTrying {
            node: line.node.clone(),
            identity: body["identity"]["id"]
                .as_str()
                .unwrap_or(&line.actor)
                .to_owned(),
            repository: body["identity"]["ci"]["repository"]
                .as_str()
                .map(str::to_owned),
            session,
            at_ms: line.at_ms,
            event_kind: line.kind.clone(),
            reason: clip(&reason, 200),
        })
    }
}

fn anomaly_summary(node: &str, kind: &str, b: &Value) -> String {
    let s = |v: &Value| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    match kind {
        "anomaly.identity" => format!(
            "forged CI identity on {node}: {} (pid {}) claims {}, its job is {}",
            s(&b["comm"]),
            s(&b["pid"]),
            s(&b["claimed"]["repository"]),
            s(&b["trusted"]["repository"]),
        ),
        "containment.escape" => format!(
            "process {} left its watched cgroup on {node}: killed, job stopped",
            s(&b["pid"])
        ),
        "containment.relinked" => format!(
            "the node's kernel hooks were tampered with on {node} ({}): attached again, job stopped",
            s(&b["cgroup"])
        ),
        k if k.starts_with("containment") && b["call"].is_string() => format!(
            "{k} on {node}: {}() by {} (pid {})",
            s(&b["call"]),
            s(&b["comm"]),
            s(&b["pid"])
        ),
        k => format!("{k} on {node}"),
    }
}

/// At most `n` characters.
fn clip(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// One URL path segment, percent-encoded.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Text for Slack's mrkdwn: what the node reports (a repository name, a
/// process name) cannot become a link or a mention.
fn mrkdwn(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Slack,
    Json,
}

#[derive(Clone)]
struct Hook {
    url: String,
    /// Scheme and host: what logs may say.
    label: String,
    format: Format,
}

/// Queue size, retries and timeouts.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Alerts waiting per hook before new ones are dropped.
    pub queue: usize,
    /// Attempts per delivery (the first and its retries).
    pub attempts: u32,
    /// Wait before the first retry, doubled for each next one.
    pub backoff: Duration,
    /// Bound on each attempt.
    pub timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            queue: 256,
            attempts: 4,
            backoff: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The checked configuration.
pub struct Config {
    hooks: Vec<Hook>,
    key: Option<hmac::Key>,
    base: String,
    pub tuning: Tuning,
}

impl Config {
    pub fn from_args(args: NotifyArgs, listen: &std::net::SocketAddr) -> Result<Self, NotifyError> {
        let cfg = |s: String| NotifyError::Config(s);
        let from_env = |v: Vec<String>, var: &str| -> Vec<String> {
            if !v.is_empty() {
                return v;
            }
            std::env::var(var)
                .map(|s| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let slack = from_env(args.webhook_slack, "SLUICE_CONSOLE_WEBHOOK_SLACK");
        let jsons = from_env(args.webhook_json, "SLUICE_CONSOLE_WEBHOOK_JSON");
        let mut hooks = Vec::new();
        for (urls, format, flag) in [
            (slack, Format::Slack, "--webhook-slack"),
            (jsons, Format::Json, "--webhook-json"),
        ] {
            for url in urls {
                hooks.push(Hook::new(url, format).map_err(|e| cfg(format!("{flag}: {e}")))?);
            }
        }
        let key = match &args.webhook_secret_file {
            Some(p) => Some(load_secret(p)?),
            None if hooks.iter().any(|h| h.format == Format::Json) => {
                return Err(cfg(
                    "--webhook-json needs --webhook-secret-file (its payloads are signed)".into(),
                ))
            }
            None => None,
        };
        let base = match args.public_url {
            Some(u) => {
                let uri: axum::http::Uri = u
                    .parse()
                    .map_err(|e| cfg(format!("--public-url {u}: {e}")))?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return Err(cfg(format!("--public-url {u}: not an http(s) URL")));
                }
                u.trim_end_matches('/').to_owned()
            }
            None => format!("http://{listen}"),
        };
        Ok(Self {
            hooks,
            key,
            base,
            tuning: Tuning::default(),
        })
    }
}

impl Hook {
    fn new(url: String, format: Format) -> Result<Self, String> {
        // check_url's error names the URL: say only which hook it is.
        let uri = fetch::check_url(&url)
            .map_err(|_| format!("{}: not https, nor http to loopback", redact(&url)))?;
        let label = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("?"),
            uri.authority().map(|a| a.as_str()).unwrap_or("?")
        );
        Ok(Self { url, label, format })
    }
}

/// A URL with its path and query left out.
fn redact(url: &str) -> String {
    match url.parse::<axum::http::Uri>() {
        Ok(u) if u.host().is_some() => format!(
            "{}://{}/…",
            u.scheme_str().unwrap_or("?"),
            u.authority().map(|a| a.as_str()).unwrap_or("?")
        ),
        _ => "(an unparsable URL)".into(),
    }
}

fn load_secret(path: &Path) -> Result<hmac::Key, NotifyError> {
    let bad = |why: String| {
        NotifyError::Config(format!("--webhook-secret-file {}: {why}", path.display()))
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(bad(format!(
            "readable or writable by group or others (mode {:o}); chmod 600 it",
            meta.permissions().mode() & 0o777
        )));
    }
    let raw = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    // A trailing newline from `echo` or an editor is not part of it.
    let secret = raw.trim_ascii();
    if secret.len() < 16 {
        return Err(bad("the secret is shorter than 16 bytes".into()));
    }
    Ok(hmac::Key::new(hmac::HMAC_SHA256, secret))
}

/// `sha256=<hex>` over `<timestamp>.<body>`: what `X-Sluice-Signature`
/// carries. The timestamp is inside the MAC so a captured delivery
/// cannot be replayed later under a fresh `X-Sluice-Timestamp`.
pub fn signature(key: &hmac::Key, timestamp: u64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

/// Counts since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Deliveries a hook accepted (2xx).
    pub delivered: u64,
    /// Deliveries given up on after their attempts.
    pub failed: u64,
    /// Alerts dropped because a hook's queue was full.
    pub dropped: u64,
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// An alert as queued: rendered parts shared by every hook.
struct Note {
    id: String,
    alert: Alert,
    link: String,
}

struct Queue {
    label: String,
    tx: mpsc::Sender<Arc<Note>>,
}

struct Inner {
    queues: Vec<Queue>,
    base: String,
    seen: Mutex<HashMap<String, Instant>>,
    counts: Arc<Counters>,
}

/// The handle ingest and the fleet alert through (cheap to clone).
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

impl Notifier {
    /// No hooks: every alert is ignored.
    pub fn disabled() -> Self {
        Self {
            inner: Arc::new(Inner {
                queues: Vec::new(),
                base: String::new(),
                seen: Mutex::default(),
                counts: Arc::default(),
            }),
        }
    }

    /// Starts one worker per hook (on the current runtime).
    pub fn start(cfg: Config) -> Self {
        let key = cfg.key.map(Arc::new);
        let counts = Arc::new(Counters::default());
        let mut queues = Vec::new();
        for hook in cfg.hooks {
            let (tx, rx) = mpsc::channel(cfg.tuning.queue.max(1));
            info!(hook = %hook.label, format = ?hook.format, "webhook notifications on");
            queues.push(Queue {
                label: hook.label.clone(),
                tx,
            });
            tokio::spawn(worker(hook, rx, key.clone(), cfg.tuning, counts.clone()));
        }
        Self {
            inner: Arc::new(Inner {
                queues,
                base: cfg.base,
                seen: Mutex::default(),
                counts,
            }),
        }
    }

    pub fn stats(&self) -> Stats {
        let c = &self.inner.counts;
        Stats {
            delivered: c.delivered.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }

    /// Queues `alert` for every hook; never waits.
    pub fn alert(&self, alert: Alert) {
        let inner = &self.inner;
        if inner.queues.is_empty() || !self.first(&alert) {
            return;
        }
        let note = Arc::new(Note {
            id: delivery_id(),
            link: format!("{}{}", inner.base, alert.path()),
            alert,
        });
        for q in &inner.queues {
            if q.tx.try_send(note.clone()).is_err() {
                let n = inner.counts.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // A flood would otherwise log once per alert.
                if n.is_power_of_two() {
                    warn!(hook = %q.label, kind = note.alert.kind(), dropped = n, "webhook queue full: alert dropped");
                }
            }
        }
    }

    /// What one ingested event means for notifications: its chain
    /// moving from `before` to `after`, and the event itself when it was
    /// stored.
    pub fn ingested(&self, line: &Line, before: ChainState, after: &Head, stored: bool) {
        if self.inner.queues.is_empty() {
            return;
        }
        if let Some(a) = Alert::chain(&line.node, before, after) {
            self.alert(a);
        }
        if let Some(a) = stored.then(|| Alert::from_line(line)).flatten() {
            self.alert(a);
        }
    }

    /// Whether `alert` is not the same as one sent recently.
    fn first(&self, alert: &Alert) -> bool {
        let Some((key, quiet)) = alert.once() else {
            return true;
        };
        let now = Instant::now();
        let mut seen = self.inner.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get(&key).is_some_and(|until| *until > now) {
            return false;
        }
        if seen.len() >= SEEN_MAX {
            seen.retain(|_, until| *until > now);
        }
        // Still full of live entries: forgetting them risks a repeat,
        // growing without bound risks the console.
        if seen.len() >= SEEN_MAX {
            seen.clear();
        }
        seen.insert(key, now + quiet);
        true
    }
}

fn delivery_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 12];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    hex::encode(b)
}

fn now_secs() -> u64 {
    crate::fleet::now_ms() / 1000
}

/// The Slack-compatible body: a fallback `text` and blocks.
fn slack_body(n: &Note) -> Value {
    let a = &n.alert;
    let summary = mrkdwn(&a.summary());
    json!({
        "text": format!("{}: {summary} <{}|Open in the Sluice console>", a.title(), n.link),
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn",
                "text": format!("*{}*\n{summary}", a.title())}},
            {"type": "context", "elements": [{"type": "mrkdwn",
                "text": format!("`{}` · node `{}` · <{}|Open in the Sluice console>",
                    a.kind(), mrkdwn(a.node()).replace('`', "'"), n.link)}]},
        ],
    })
}

fn json_body(n: &Note) -> Value {
    let a = &n.alert;
    json!({
        "id": n.id,
        "kind": a.kind(),
        "at_ms": a.at_ms(),
        "node": a.node(),
        "summary": a.summary(),
        "link": n.link,
        "detail": a.detail(),
    })
}

async fn worker(
    hook: Hook,
    mut rx: mpsc::Receiver<Arc<Note>>,
    key: Option<Arc<hmac::Key>>,
    tuning: Tuning,
    counts: Arc<Counters>,
) {
    while let Some(note) = rx.recv().await {
        let body = match hook.format {
            Format::Slack => slack_body(&note),
            Format::Json => json_body(&note),
        };
        let body = serde_json::to_vec(&body).unwrap_or_default();
        if deliver(&hook, &note, &body, key.as_deref(), tuning).await {
            counts.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            counts.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One delivery with its retries; whether the hook accepted it.
async fn deliver(
    hook: &Hook,
    note: &Note,
    body: &[u8],
    key: Option<&hmac::Key>,
    tuning: Tuning,
) -> bool {
    let kind = note.alert.kind();
    let mut wait = tuning.backoff;
    for attempt in 1..=tuning.attempts.max(1) {
        let mut headers = vec![
            ("x-sluice-event", kind.to_owned()),
            ("x-sluice-delivery", note.id.clone()),
        ];
        if let (Format::Json, Some(key)) = (hook.format, key) {
            // Signed per attempt: a retry carries a fresh timestamp.
            let ts = now_secs();
            headers.push(("x-sluice-timestamp", ts.to_string()));
            headers.push(("x-sluice-signature", signature(key, ts, body)));
        }
        let out = fetch::Outgoing {
            method: Method::POST,
            content_type: Some("application/json"),
            body: body.to_vec(),
            headers,
        };
        let why = match fetch::send_to(&hook.url, out, tuning.timeout).await {
            Ok(r) if (200..300).contains(&r.status) => return true,
            Ok(r) if r.status == 408 || r.status == 429 || r.status >= 500 => {
                format!("answered {}", r.status)
            }
            Ok(r) => {
                // The hook refuses this payload (gone, unauthorised):
                // retrying gives the same answer.
                warn!(hook = %hook.label, kind, status = r.status, "webhook refused the notification");
                return false;
            }
            Err(e) => e,
        };
        if attempt == tuning.attempts.max(1) {
            warn!(hook = %hook.label, kind, attempt, error = %why, "webhook notification given up");
            return false;
        }
        warn!(hook = %hook.label, kind, attempt, error = %why, "webhook notification failed; retrying");
        tokio::time::sleep(wait).await;
        wait = wait.saturating_mul(2);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{
        body::Bytes,
        extract::{Path as UrlPath, State},
        http::{HeaderMap, StatusCode},
        routing::post,
        Router,
    };
    use sluice_fleet::approval::Ci;

    const SECRET: &[u8] = b"test-secret-made-for-this-test-0123";
    const BASE: &str = "https://console.example";

    #[derive(Clone, Debug)]
    struct Got {
        path: String,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    #[derive(Clone, Default)]
    struct Receiver {
        got: Arc<Mutex<Vec<Got>>>,
        flaky: Arc<AtomicU64>,
    }

    impl Receiver {
        fn got(&self) -> Vec<Got> {
            self.got.lock().unwrap().clone()
        }

        async fn wait(&self, path: &str, n: usize, within: Duration) -> Vec<Got> {
            let end = Instant::now() + within;
            loop {
                let g: Vec<Got> = self.got().into_iter().filter(|g| g.path == path).collect();
                if g.len() >= n || Instant::now() > end {
                    return g;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// A Slack hook (`/slack`), a JSON hook (`/json`) and one that
    /// fails twice before it takes anything (`/flaky`), on loopback.
    async fn receiver() -> (Receiver, String) {
        async fn take(
            State(r): State<Receiver>,
            UrlPath(path): UrlPath<String>,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            let path = format!("/{path}");
            let status = if path == "/flaky" && r.flaky.fetch_add(1, Ordering::SeqCst) < 2 {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            r.got.lock().unwrap().push(Got {
                path,
                headers,
                body: body.to_vec(),
            });
            status
        }
        let r = Receiver::default();
        let app = Router::new()
            .route("/{*path}", post(take))
            .with_state(r.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        (r, format!("http://{addr}"))
    }

    /// Accepts connections and never answers.
    async fn silent() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        format!("http://{addr}/never")
    }

    fn notifier(hooks: &[(&str, Format)], tuning: Tuning) -> Notifier {
        Notifier::start(Config {
            hooks: hooks
                .iter()
                .map(|(u, f)| Hook::new((*u).into(), *f).unwrap())
                .collect(),
            key: Some(hmac::Key::new(hmac::HMAC_SHA256, SECRET)),
            base: BASE.into(),
            tuning,
        })
    }

    fn fast() -> Tuning {
        Tuning {
            queue: 64,
            attempts: 4,
            backoff: Duration::from_millis(20),
            timeout: Duration::from_millis(500),
        }
    }

    fn held(id: u64, hold: &str) -> Held {
        Held {
            node: "node-x".into(),
            id,
            hold: hold.into(),
            session: 7,
            identity: "wl-1".into(),
            ci: Some(Ci {
                system: "github".into(),
                repository: Some("acme/app".into()),
                ..Default::default()
            }),
            rule: "prod-deploy".into(),
            message: "needs a person".into(),
            method: "POST".into(),
            authority: "api2.cursor.sh".into(),
            path: "/v1/chat".into(),
            preview: "SECRET-PROMPT-TEXT".into(),
            created_ms: 1_000,
            expires_ms: 61_000,
        }
    }

    fn line(seq: u64, connection: u64, kind: &str, body: &str) -> Line {
        Line {
            seq,
            prev: [0; 32],
            hash: [0; 32],
            at_ms: 5_000 + seq,
            connection,
            kind: kind.into(),
            node: "node-x".into(),
            actor: "wl-1".into(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn head(state: ChainState, detail: &str) -> Head {
        Head {
            seq: 9,
            hash: [0; 32],
            state,
            detail: Some(detail.into()),
        }
    }

    const REFUSED: &str = r#"{"id":3,"identity":{"id":"wl-1","ci":{"repository":"acme/app"}},"outcome":{"status":"refused","reason":"identity suspended: incident 42"}}"#;
    const FORGED: &str = r#"{"kind":"ci-identity-claim","session":4,"identity":"wl-1","trusted":{"repository":"acme/app"},"claimed":{"repository":"acme/prod"},"pid":99,"comm":"curl"}"#;
    const TAMPER: &str = r#"{"call":"bpf","pid":98,"comm":"evil","job_stopped":true}"#;

    fn every_kind() -> Vec<Alert> {
        vec![
            Alert::ApprovalPending(Box::new(held(1, "h-1"))),
            Alert::chain(
                "node-x",
                ChainState::Verified,
                &head(ChainState::Broken, "altered"),
            )
            .unwrap(),
            Alert::chain(
                "node-y",
                ChainState::Verified,
                &head(ChainState::Gap, "events 3..4 are missing"),
            )
            .unwrap(),
            Alert::from_line(&line(1, 3, "connection.refused", REFUSED)).unwrap(),
            Alert::from_line(&line(2, 0, "anomaly.identity", FORGED)).unwrap(),
            Alert::from_line(&line(3, 0, "containment.tamper", TAMPER)).unwrap(),
        ]
    }

    fn verify(key: &[u8], g: &Got) -> bool {
        let ts = g.headers["x-sluice-timestamp"].to_str().unwrap();
        let sig = g.headers["x-sluice-signature"].to_str().unwrap();
        let Some(mac) = sig
            .strip_prefix("sha256=")
            .and_then(|h| hex::decode(h).ok())
        else {
            return false;
        };
        let mut msg = format!("{ts}.").into_bytes();
        msg.extend_from_slice(&g.body);
        hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, key), &msg, &mac).is_ok()
    }

    #[tokio::test]
    async fn every_kind_reaches_a_slack_and_a_signed_json_hook() {
        let (r, url) = receiver().await;
        let n = notifier(
            &[
                (&format!("{url}/slack"), Format::Slack),
                (&format!("{url}/json"), Format::Json),
            ],
            fast(),
        );
        let alerts = every_kind();
        let kinds: Vec<&str> = alerts.iter().map(Alert::kind).collect();
        assert_eq!(
            kinds,
            [
                "approval.pending",
                "chain.broken",
                "chain.gap",
                "identity.suspended_trying",
                "anomaly",
                "anomaly"
            ]
        );
        for a in alerts {
            n.alert(a);
        }
        let slack = r.wait("/slack", 6, Duration::from_secs(10)).await;
        let json = r.wait("/json", 6, Duration::from_secs(10)).await;
        assert_eq!((slack.len(), json.len()), (6, 6));

        for g in &slack {
            let v: Value = serde_json::from_slice(&g.body).unwrap();
            let text = v["text"].as_str().unwrap();
            assert!(text.contains(BASE), "{text}");
            assert!(v["blocks"].as_array().is_some_and(|b| !b.is_empty()), "{v}");
            assert!(!g.headers.contains_key("x-sluice-signature"));
        }
        let slack_text: Vec<String> = slack
            .iter()
            .map(|g| serde_json::from_slice::<Value>(&g.body).unwrap()["text"].to_string())
            .collect();
        assert!(slack_text.iter().any(|t| t.contains("/approvals")));
        // The held body's preview stays in the console.
        assert!(!slack_text.iter().any(|t| t.contains("SECRET-PROMPT")));

        let mut got_kinds = Vec::new();
        for g in &json {
            assert!(verify(SECRET, g), "signature does not verify");
            assert!(!verify(b"another-secret-entirely-0123456", g));
            let v: Value = serde_json::from_slice(&g.body).unwrap();
            for f in ["kind", "at_ms", "node", "summary", "link", "detail"] {
                assert!(!v[f].is_null(), "{f} missing: {v}");
            }
            assert!(v["link"].as_str().unwrap().starts_with(BASE));
            assert_eq!(g.headers["x-sluice-event"], v["kind"].as_str().unwrap());
            assert!(!v.to_string().contains("SECRET-PROMPT"), "{v}");
            got_kinds.push(v["kind"].as_str().unwrap().to_owned());
            match v["kind"].as_str().unwrap() {
                "approval.pending" => {
                    assert_eq!(v["link"], format!("{BASE}/approvals"));
                    assert_eq!(v["detail"]["rule"], "prod-deploy");
                }
                "chain.broken" | "chain.gap" => assert_eq!(v["link"], format!("{BASE}/nodes")),
                "identity.suspended_trying" => {
                    assert_eq!(v["link"], format!("{BASE}/sessions/node-x/3"));
                    assert_eq!(v["detail"]["identity"], "wl-1");
                    assert!(v["summary"].as_str().unwrap().contains("incident 42"));
                }
                "anomaly" => assert!(v["detail"]["event_kind"]
                    .as_str()
                    .unwrap()
                    .starts_with(['a', 'c'])),
                k => panic!("unexpected kind {k}"),
            }
        }
        got_kinds.sort();
        assert_eq!(
            got_kinds,
            [
                "anomaly",
                "anomaly",
                "approval.pending",
                "chain.broken",
                "chain.gap",
                "identity.suspended_trying"
            ]
        );
        // A body altered in transit no longer verifies.
        let mut forged = json[0].clone();
        forged.body.extend_from_slice(b" ");
        assert!(!verify(SECRET, &forged));
        // Counted once the worker has the answer, just after the receiver.
        let end = Instant::now() + Duration::from_secs(5);
        while n.stats().delivered < 12 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(n.stats().delivered, 12);
    }

    #[tokio::test]
    async fn a_failing_hook_is_retried_until_it_takes_the_alert_once() {
        let (r, url) = receiver().await;
        let n = notifier(&[(&format!("{url}/flaky"), Format::Json)], fast());
        n.alert(Alert::ApprovalPending(Box::new(held(1, "h-1"))));
        let got = r.wait("/flaky", 3, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 3, "500, 500, then 200");
        // The same delivery each time, each attempt signed afresh.
        assert!(got.iter().all(|g| verify(SECRET, g)));
        assert!(got
            .iter()
            .all(|g| g.headers["x-sluice-delivery"] == got[0].headers["x-sluice-delivery"]));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(r.got().len(), 3, "nothing after the 200");
        assert_eq!(
            n.stats(),
            Stats {
                delivered: 1,
                failed: 0,
                dropped: 0
            }
        );
    }

    #[tokio::test]
    async fn a_hook_that_never_answers_does_not_hold_up_the_others() {
        let (r, url) = receiver().await;
        let dead = silent().await;
        let n = notifier(
            &[
                (&dead, Format::Json),
                (&format!("{url}/json"), Format::Json),
            ],
            Tuning {
                attempts: 2,
                timeout: Duration::from_millis(300),
                ..fast()
            },
        );
        let start = Instant::now();
        n.alert(Alert::from_line(&line(2, 0, "anomaly.identity", FORGED)).unwrap());
        n.alert(Alert::from_line(&line(3, 0, "containment.tamper", TAMPER)).unwrap());
        let got = r.wait("/json", 2, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 2);
        assert!(
            start.elapsed() < Duration::from_millis(300),
            "waited on the dead hook"
        );
        // The dead hook's attempts time out and are given up.
        let end = Instant::now() + Duration::from_secs(5);
        while n.stats().failed < 2 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(n.stats().failed, 2);
        assert_eq!(n.stats().delivered, 2);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_never_blocks() {
        let dead = silent().await;
        let n = notifier(
            &[(&dead, Format::Slack)],
            Tuning {
                queue: 4,
                timeout: Duration::from_secs(30),
                ..fast()
            },
        );
        let start = Instant::now();
        for seq in 0..2_000 {
            n.alert(Alert::from_line(&line(seq, 0, "anomaly.identity", FORGED)).unwrap());
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        let s = n.stats();
        // One in flight at most, four waiting: the rest dropped.
        assert!(s.dropped >= 2_000 - 5, "{s:?}");
        assert_eq!(s.delivered + s.failed, 0);
    }

    #[tokio::test]
    async fn a_hold_alerts_once_and_a_suspended_identity_once_per_quiet_period() {
        let (r, url) = receiver().await;
        let n = notifier(&[(&format!("{url}/json"), Format::Json)], fast());
        for _ in 0..3 {
            n.alert(Alert::ApprovalPending(Box::new(held(1, "h-1"))));
        }
        // Another hold (a new request with the same number after a
        // node restart) is another alert.
        n.alert(Alert::ApprovalPending(Box::new(held(1, "h-2"))));
        for seq in 0..5 {
            n.alert(Alert::from_line(&line(seq, 3, "connection.refused", REFUSED)).unwrap());
        }
        let other = REFUSED.replace("\"id\":\"wl-1\"", "\"id\":\"wl-2\"");
        n.alert(Alert::from_line(&line(9, 3, "connection.refused", &other)).unwrap());
        let got = r.wait("/json", 4, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let kinds: Vec<String> = r
            .got()
            .iter()
            .map(|g| serde_json::from_slice::<Value>(&g.body).unwrap()["kind"].to_string())
            .collect();
        assert_eq!(got.len(), 4, "{kinds:?}");
        assert_eq!(r.got().len(), 4, "{kinds:?}");
    }

    #[test]
    fn chain_alerts_are_transitions_into_broken_or_gap() {
        let gap = head(ChainState::Gap, "missing");
        let broken = head(ChainState::Broken, "altered");
        let partial = head(ChainState::Partial, "joined late");
        assert_eq!(
            Alert::chain("n", ChainState::Verified, &gap).map(|a| a.kind()),
            Some("chain.gap")
        );
        assert!(Alert::chain("n", ChainState::Gap, &gap).is_none());
        assert_eq!(
            Alert::chain("n", ChainState::Gap, &broken).map(|a| a.kind()),
            Some("chain.broken")
        );
        assert!(Alert::chain("n", ChainState::Broken, &broken).is_none());
        assert!(Alert::chain("n", ChainState::Verified, &partial).is_none());
    }

    #[test]
    fn which_events_are_alerts() {
        let kind = |k: &str, body: &str| Alert::from_line(&line(1, 2, k, body)).map(|a| a.kind());
        assert_eq!(
            kind("connection.refused", REFUSED),
            Some("identity.suspended_trying")
        );
        // Intercepted HTTP and SQL: the node's own decision on the request.
        let ex = r#"{"session":2,"seq":1,"method":"POST","decisions":[{"rule":"identity-suspended","action":"block","detail":"incident 42"}]}"#;
        assert_eq!(
            kind("exchange.completed", ex),
            Some("identity.suspended_trying")
        );
        assert_eq!(
            kind("statement.completed", ex),
            Some("identity.suspended_trying")
        );
        // Refused for another reason, or a rule merely named "suspended".
        let other = r#"{"id":3,"outcome":{"status":"refused","reason":"identity has 9 connections open (limit 8)"}}"#;
        assert_eq!(kind("connection.refused", other), None);
        let ex2 = r#"{"session":2,"decisions":[{"rule":"suspended-words","action":"block"}]}"#;
        assert_eq!(kind("exchange.completed", ex2), None);
        assert_eq!(kind("connection.open", r#"{"id":1}"#), None);
        assert_eq!(kind("approval.decided", r#"{"by":"x"}"#), None);
        assert_eq!(kind("anomaly.identity", FORGED), Some("anomaly"));
        assert_eq!(kind("containment.escape", "not json"), Some("anomaly"));

        let a = Alert::from_line(&line(1, 0, "anomaly.identity", FORGED)).unwrap();
        assert_eq!(a.path(), "/sessions/node-x/4");
        let s = a.summary();
        assert!(s.contains("acme/prod") && s.contains("curl"), "{s}");
        let a = Alert::from_line(&line(1, 0, "containment.tamper", TAMPER)).unwrap();
        assert_eq!(a.path(), "/nodes");
    }

    #[test]
    fn slack_text_cannot_carry_links_from_the_node() {
        let mut h = held(1, "h");
        h.ci = Some(Ci {
            system: "github".into(),
            repository: Some("<https://evil.example|click> <!channel>".into()),
            ..Default::default()
        });
        let note = Note {
            id: "x".into(),
            link: format!("{BASE}/approvals"),
            alert: Alert::ApprovalPending(Box::new(h)),
        };
        let v = slack_body(&note).to_string();
        assert!(!v.contains("<https://evil"), "{v}");
        assert!(!v.contains("<!channel>"), "{v}");
        assert!(v.contains("&lt;!channel&gt;"), "{v}");
    }

    #[test]
    fn configuration_is_checked_at_start() {
        let listen: std::net::SocketAddr = "127.0.0.1:8470".parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let args = |json: &[&str], file: Option<&Path>| NotifyArgs {
            webhook_json: json.iter().map(|s| (*s).into()).collect(),
            webhook_secret_file: file.map(Path::to_path_buf),
            ..Default::default()
        };
        let err = |a| Config::from_args(a, &listen).err().unwrap().to_string();

        let e = err(args(&["https://hooks.example/x"], Some(&secret)));
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c =
            Config::from_args(args(&["https://hooks.example/x"], Some(&secret)), &listen).unwrap();
        assert_eq!(c.base, "http://127.0.0.1:8470");
        assert_eq!(c.hooks[0].label, "https://hooks.example");

        let e = err(args(&["https://hooks.example/x"], None));
        assert!(e.contains("--webhook-secret-file"), "{e}");
        // Plain http off loopback: refused, and the URL's path (a Slack
        // hook's credential) is not repeated.
        let e = err(NotifyArgs {
            webhook_slack: vec!["http://hooks.example/services/T0/B0/XYZSECRET".into()],
            ..Default::default()
        });
        assert!(e.contains("loopback") && !e.contains("XYZSECRET"), "{e}");

        std::fs::write(&secret, "short\n").unwrap();
        let e = err(args(&["https://hooks.example/x"], Some(&secret)));
        assert!(e.contains("16 bytes"), "{e}");

        let c = Config::from_args(
            NotifyArgs {
                public_url: Some("https://console.corp.example/".into()),
                ..Default::default()
            },
            &listen,
        )
        .unwrap();
        assert_eq!(c.base, "https://console.corp.example");
        assert!(Config::from_args(
            NotifyArgs {
                public_url: Some("console.corp".into()),
                ..Default::default()
            },
            &listen,
        )
        .is_err());
    }
}
