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
            (o["status"].as_str() == Some("refused") && r.starts_with("identity suspended"))
                .then(|| r.to_owned())?
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
