//! Local control API: newline-delimited JSON over a Unix socket. The socket
//! is mode 0600 and each caller is checked with SO_PEERCRED: root only, and
//! never a process inside a watched cgroup (a root build job must not
//! approve its own held request or lift its own suspension).
use std::{
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{info, warn};

use sluice_common::stat;

use crate::{
    approvals::{self, Pending},
    decision::{Deciders, DecisionRefused},
    policy::PolicySummary,
    proxy::Proxy,
    record::{ConnectionRecord, Exchange, Filter},
    redirect::Containment,
    suspend::Suspension,
};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach the node at {path} (is `sluice run` running?): {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Remote(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    SessionsList {
        filter: Filter,
    },
    SessionsShow {
        id: u64,
    },
    Verify {
        session: Option<u64>,
    },
    PolicyPush {
        jws: String,
    },
    PolicyShow,
    ApprovalsList,
    ApprovalDecide {
        id: u64,
        approve: bool,
        reason: Option<String>,
        /// The decision, signed by a key the node trusts (`decision.rs`):
        /// it must name this node, this hold, and the same verdict.
        #[serde(default)]
        signed: Option<String>,
    },
    IdentitySuspend {
        identity: String,
        reason: String,
    },
    IdentityResume {
        identity: String,
        /// A signed `sluice_fleet::suspension::Resume` for it.
        #[serde(default)]
        signed: Option<String>,
    },
    IdentitiesList,
    Audit {
        kind: String,
    },
    /// The signed checkpoint covering a session and the chain links to
    /// it, for exports.
    SessionEvidence {
        id: u64,
    },
}

impl Request {
    fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::SessionsList { .. } => "sessions_list",
            Request::SessionsShow { .. } => "sessions_show",
            Request::Verify { .. } => "verify",
            Request::PolicyPush { .. } => "policy_push",
            Request::PolicyShow => "policy_show",
            Request::ApprovalsList => "approvals_list",
            Request::ApprovalDecide { .. } => "approval_decide",
            Request::IdentitySuspend { .. } => "identity_suspend",
            Request::IdentityResume { .. } => "identity_resume",
            Request::IdentitiesList => "identities_list",
            Request::Audit { .. } => "audit",
            Request::SessionEvidence { .. } => "session_evidence",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    Sessions {
        sessions: Vec<ConnectionRecord>,
    },
    Session {
        session: Box<ConnectionRecord>,
        exchanges: Vec<Exchange>,
        #[serde(default)]
        statements: Vec<crate::record::Statement>,
    },
    Verified {
        events: u64,
    },
    Policy(PolicySummary),
    Approvals {
        pending: Vec<Pending>,
    },
    Decided {
        approval: Pending,
    },
    Suspended {
        suspension: Suspension,
        denied_held: usize,
    },
    Resumed {
        identity: String,
        was_suspended: bool,
    },
    Identities {
        suspended: Vec<Suspension>,
        recent: Vec<RecentIdentity>,
    },
    Audit {
        events: Vec<crate::record::Event>,
    },
    Broken {
        first_break: String,
    },
    Evidence {
        evidence: Box<crate::record::Evidence>,
    },
    Error {
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_in_watched_cgroups_are_refused() {
        let proc_root = tempfile::tempdir().unwrap();
        let dir = proc_root.path().join("77");
        std::fs::create_dir_all(&dir).unwrap();
        let root = Path::new("/sys/fs/cgroup");
        let watched = vec![root.join("runner.service")];
        for (cg, refused) in [
            ("/runner.service", true),
            ("/runner.service/job/step", true),
            ("/runner.service2", false),
            ("/user.slice/session-1.scope", false),
        ] {
            std::fs::write(dir.join("cgroup"), format!("0::{cg}\n")).unwrap();
            let r = refuse_watched_caller(Some(77), proc_root.path(), root, &watched);
            assert_eq!(r.is_err(), refused, "{cg}: {r:?}");
            if let Err((m, _)) = r {
                assert!(m.contains("watched cgroup"), "{m}");
            }
        }
        // A caller that cannot be placed is refused too.
        assert!(refuse_watched_caller(Some(78), proc_root.path(), root, &watched).is_err());
        assert!(refuse_watched_caller(None, proc_root.path(), root, &watched).is_err());
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RecentIdentity {
    pub id: String,
    pub description: String,
    pub sessions: usize,
    pub last_seen_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// The name signed decisions must carry (`ship.nats.node`, else the
    /// host name).
    #[serde(default)]
    pub node: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub watched_cgroups: Vec<String>,
    pub listen: Vec<String>,
    pub target_entries: Vec<String>,
    pub connections_accepted: u64,
    pub connections_forwarded: u64,
    pub connections_refused: u64,
    pub connections_active: u64,
    pub upstream_failures: u64,
    pub record_errors: u64,
    pub records_stored: usize,
    pub kernel_redirected: u64,
    pub kernel_udp_refused: u64,
    pub kernel_foreign_netns_refused: u64,
    /// Origins re-keyed by client address at TCP_CONNECT_CB.
    pub kernel_rekeyed: u64,
    /// Origin records removed when the client socket closed.
    pub kernel_closed: u64,
    #[serde(default)]
    pub policy_version: u64,
    /// Highest bundle version accepted (persisted apart from the bundle).
    #[serde(default)]
    pub policy_floor: u64,
    /// The bundle in force has passed its `expires_at`.
    #[serde(default)]
    pub policy_expired: bool,
    /// `bpf-lsm`, or `degraded: <why>` (escapes detected, not prevented).
    #[serde(default)]
    pub containment: String,
    #[serde(default)]
    pub kernel_raw_sockets_refused: u64,
    #[serde(default)]
    pub kernel_packet_sockets_refused: u64,
    #[serde(default)]
    pub kernel_cgroup_escapes_refused: u64,
    #[serde(default)]
    pub kernel_bpf_refused: u64,
    /// Watched tasks killed for creating a packet socket (kprobe).
    #[serde(default)]
    pub kernel_packet_sockets_killed: u64,
    /// Watched tasks killed for calling bpf() (no BPF LSM).
    #[serde(default)]
    pub kernel_bpf_killed: u64,
    /// Processes seen leaving a watched cgroup (degraded mode) and killed.
    #[serde(default)]
    pub escapes_detected: u64,
    /// Watched root tasks killed for cloning a shared file table, and
    /// tasks killed for pidfd_getfd() (no BPF LSM).
    #[serde(default)]
    pub kernel_shared_files_killed: u64,
    #[serde(default)]
    pub kernel_fd_take_killed: u64,
    /// Jobs stopped (all processes killed, connections refused) for
    /// working against the node.
    #[serde(default)]
    pub jobs_stopped: u64,
    #[serde(default)]
    pub jobs_quarantined: u64,
    /// Watched cgroups whose links were found detached and re-attached.
    #[serde(default)]
    pub links_restored: u64,
    /// Times the kernel's target entries or proxy address were found
    /// changed and put back.
    #[serde(default)]
    pub maps_restored: u64,
    /// Connects straight to the proxy's port from a hooked cgroup.
    #[serde(default)]
    pub kernel_proxy_direct_refused: u64,
    /// `host` (the redirect also on the root cgroup: every process of the
    /// host) or `jobs` (the watched cgroups only).
    #[serde(default)]
    pub redirect_scope: String,
    /// `ok`, or `failing since <time>: <error>`: new connections are refused
    /// while the store does not take writes.
    #[serde(default)]
    pub recording: String,
    /// The evidence spool and shipping (`off` when neither is on).
    #[serde(default)]
    pub spool: String,
    #[serde(default)]
    pub shipping_connected: bool,
}

pub struct ControlServer {
    pub proxy: Arc<Proxy>,
    pub started: Instant,
    /// The cgroup2 mount, to place callers relative to the watched cgroups.
    pub cgroup_root: PathBuf,
    /// Whether the deciding calls (approve, deny, resume, push) are taken
    /// here: off when the node follows a console, whose decisions come
    /// signed (`console.local_decisions`).
    pub local_decisions: bool,
    /// Whose signed decisions are applied here.
    pub deciders: Arc<Deciders>,
    /// Whether the node follows a console (its keys also sign decisions).
    pub console: bool,
}

/// Longest request line read from a caller that is about to be refused.
const REFUSED_LINE_CAP: u64 = 64 * 1024;

/// Why a caller, by its pid from SO_PEERCRED, may not use the control API:
/// it runs inside a watched cgroup (or its subtree), or cannot be placed.
fn refuse_watched_caller(
    pid: Option<i32>,
    proc_root: &Path,
    cgroup_root: &Path,
    watched: &[PathBuf],
) -> Result<(), (String, Option<String>)> {
    let Some(pid) = pid.filter(|p| *p > 0) else {
        return Err((
            "permission denied: the caller's pid is unknown".into(),
            None,
        ));
    };
    let text =
        std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).map_err(|e| {
            (
                format!("permission denied: cannot read the cgroup of caller pid {pid}: {e}"),
                None,
            )
        })?;
    let Some(rel) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Err((
            format!("permission denied: caller pid {pid} has no cgroup v2 membership"),
            None,
        ));
    };
    let full = cgroup_root.join(rel.trim_start_matches('/'));
    if watched.iter().any(|w| full.starts_with(w)) {
        return Err((
            format!(
                "permission denied: the caller (pid {pid}) runs in the watched cgroup {rel}; build jobs cannot use the control API"
            ),
            Some(rel.to_owned()),
        ));
    }
    Ok(())
}

/// Binds the socket with mode 0600, replacing a stale one.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    // Create it private from the start: no window with a wider mode.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    listener.map_err(err)
}

impl ControlServer {
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let this = self.clone();
                    tokio::spawn(async move { this.handle(stream).await });
                }
                Err(e) => {
                    warn!(error = %e, "control accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(self: Arc<Self>, stream: UnixStream) {
        let (uid, pid) = match stream.peer_cred() {
            Ok(c) => (c.uid(), c.pid()),
            Err(e) => {
                warn!(error = %e, "control caller credentials unavailable; closing");
                return;
            }
        };
        let (r, mut w) = stream.into_split();
        if uid == 0 {
            let (root, watched) = (self.cgroup_root.clone(), self.proxy.redirector.cgroups());
            let placed = tokio::task::spawn_blocking(move || {
                refuse_watched_caller(pid, Path::new("/proc"), &root, &watched)
            })
            .await
            .unwrap_or_else(|e| Err((format!("permission denied: {e}"), None)));
            if let Err((message, cgroup)) = placed {
                // Note what it tried (first line, bounded) for the record.
                let mut first = String::new();
                let mut limited =
                    BufReader::new(tokio::io::AsyncReadExt::take(r, REFUSED_LINE_CAP));
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    limited.read_line(&mut first),
                )
                .await;
                let op = serde_json::from_str::<Request>(&first)
                    .map(|r| r.name().to_owned())
                    .unwrap_or_else(|_| "unknown".into());
                warn!(uid, ?pid, op, %message, "control request from a watched cgroup refused");
                let store = self.proxy.store.clone();
                let body = serde_json::json!({"uid": uid, "pid": pid, "cgroup": cgroup, "op": op, "reason": message});
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = store.audit("control.refused", &body) {
                        warn!(error = %e, "cannot record control refusal");
                    }
                })
                .await;
                let _ = write(&mut w, &Response::Error { message }).await;
                return;
            }
        }
        let mut lines = BufReader::new(r).lines();
        if uid != 0 {
            warn!(uid, "control request from non-root caller refused");
            let _ = write(
                &mut w,
                &Response::Error {
                    message: format!("permission denied: uid {uid} is not root"),
                },
            )
            .await;
            return;
        }
        while let Ok(Some(line)) = lines.next_line().await {
            let resp = match serde_json::from_str::<Request>(&line) {
                Ok(req) => {
                    info!(uid, op = req.name(), "control request");
                    // Off the data path's runtime: verify, audit scans and
                    // every fsync-waited write block.
                    let this = self.clone();
                    tokio::task::spawn_blocking(move || this.dispatch(req, uid))
                        .await
                        .unwrap_or_else(|e| Response::Error {
                            message: format!("control call failed: {e}"),
                        })
                }
                Err(e) => Response::Error {
                    message: format!("malformed request: {e}"),
                },
            };
            if write(&mut w, &resp).await.is_err() {
                return;
            }
        }
    }

    /// What `sluice status` shows (and heartbeats carry).
    pub fn status(&self) -> Status {
        let p = &self.proxy;
        let k = p.redirector.kernel_stats();
        let at = |i: u32| k.get(i as usize).copied().unwrap_or_default();
        let c = &p.counters;
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            node: self.deciders.node.clone(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            watched_cgroups: p
                .redirector
                .cgroups()
                .iter()
                .map(|c| c.display().to_string())
                .collect(),
            listen: p.listen.iter().map(|l| l.to_string()).collect(),
            target_entries: p
                .redirector
                .installed()
                .iter()
                .map(|e| {
                    let table = p.targets.current();
                    let name = table.name(e.target_id).unwrap_or("?");
                    let port = if e.port == 0 {
                        "*".to_string()
                    } else {
                        e.port.to_string()
                    };
                    format!("{name} {} port {port}", e.net)
                })
                .collect(),
            connections_accepted: c.accepted.load(Ordering::Relaxed),
            connections_forwarded: c.forwarded.load(Ordering::Relaxed),
            connections_refused: c.refused.load(Ordering::Relaxed),
            connections_active: c.active.load(Ordering::Relaxed),
            upstream_failures: c.upstream_failed.load(Ordering::Relaxed),
            record_errors: c.record_errors.load(Ordering::Relaxed),
            recording: p.health.describe(),
            spool: p
                .spool
                .as_ref()
                .map_or_else(|| "off".into(), |s| s.describe()),
            shipping_connected: p
                .spool
                .as_ref()
                .is_some_and(|s| s.connected.load(Ordering::Relaxed)),
            records_stored: p.store.count(),
            policy_version: p.policy.current().version,
            policy_floor: p.policy.floor(),
            policy_expired: p.policy.current().expired_at(std::time::SystemTime::now()),
            kernel_redirected: at(stat::REDIRECTED),
            kernel_udp_refused: at(stat::UDP_REFUSED),
            kernel_foreign_netns_refused: at(stat::FOREIGN_NETNS_REFUSED),
            kernel_rekeyed: at(stat::REKEYED),
            kernel_closed: at(stat::CLOSED),
            containment: match &p.redirector.containment {
                Containment::Lsm => "bpf-lsm".into(),
                Containment::Degraded(why) => format!("degraded: {why}"),
            },
            kernel_raw_sockets_refused: at(stat::RAW_SOCKET_REFUSED),
            kernel_packet_sockets_refused: at(stat::PACKET_SOCKET_REFUSED),
            kernel_cgroup_escapes_refused: at(stat::CGROUP_ESCAPE_REFUSED),
            kernel_bpf_refused: at(stat::BPF_REFUSED),
            kernel_packet_sockets_killed: at(stat::PACKET_SOCKET_KILLED),
            kernel_bpf_killed: at(stat::BPF_KILLED),
            escapes_detected: p.redirector.escapes_detected.load(Ordering::Relaxed),
            kernel_shared_files_killed: at(stat::SHARED_FILES_KILLED),
            kernel_fd_take_killed: at(stat::FD_TAKE_KILLED),
            jobs_stopped: p.redirector.jobs_stopped.load(Ordering::Relaxed),
            jobs_quarantined: p.quarantine.len() as u64,
            links_restored: p.redirector.links_restored.load(Ordering::Relaxed),
            maps_restored: p.redirector.maps_restored.load(Ordering::Relaxed),
            kernel_proxy_direct_refused: at(stat::PROXY_DIRECT_REFUSED),
            redirect_scope: if p.redirector.host_scope() {
                "host".into()
            } else {
                "jobs".into()
            },
        }
    }

    fn unsigned(&self, op: &'static str) -> DecisionRefused {
        DecisionRefused::Unsigned {
            op,
            console: if self.console {
                ", or the console's"
            } else {
                ""
            },
        }
    }

    /// A signed approve or deny that matches what the caller asked.
    fn signed_approval(
        &self,
        id: u64,
        approve: bool,
        signed: Option<&str>,
    ) -> Result<(approvals::Outcome, String), DecisionRefused> {
        let token = signed.ok_or_else(|| self.unsigned("approval_decide"))?;
        let (d, outcome, _) = self.deciders.approval(&self.proxy.approvals, token)?;
        if d.id != id {
            return Err(DecisionRefused::OtherRequest {
                signed: d.id,
                asked: id,
            });
        }
        if matches!(outcome, approvals::Outcome::Approved { .. }) != approve {
            return Err(DecisionRefused::OtherVerdict {
                signed: outcome.word().into(),
                asked: if approve { "approve" } else { "deny" }.into(),
            });
        }
        Ok((outcome, d.by))
    }

    /// A deciding call without a decision the node applies: refused, and
    /// on the audit chain (who tried what, and why it did not count).
    fn refuse_decision(&self, op: &str, uid: u32, e: &DecisionRefused) -> Response {
        warn!(uid, op, error = %e, "decision refused");
        if let Err(err) = self.proxy.store.audit(
            "control.refused",
            &serde_json::json!({"uid": uid, "op": op, "reason": e.to_string()}),
        ) {
            warn!(error = %err, "cannot record control refusal");
        }
        Response::Error {
            message: e.to_string(),
        }
    }

    fn dispatch(&self, req: Request, uid: u32) -> Response {
        let p = &self.proxy;
        if !self.local_decisions
            && matches!(
                req,
                Request::ApprovalDecide { .. }
                    | Request::IdentityResume { .. }
                    | Request::PolicyPush { .. }
            )
        {
            let op = req.name();
            warn!(
                uid,
                op, "deciding control call refused: this node follows a console"
            );
            if let Err(e) = p.store.audit(
                "control.refused",
                &serde_json::json!({"uid": uid, "op": op, "reason": "decisions come signed from the console"}),
            ) {
                warn!(error = %e, "cannot record control refusal");
            }
            return Response::Error {
                message: format!(
                    "{op} is off on this node: it follows a console, and decisions come signed from there (the node configuration's `console.local_decisions: true` allows it here)"
                ),
            };
        }
        match req {
            Request::Status => Response::Status(self.status()),
            Request::SessionsList { filter } => match p.store.list(&filter) {
                Ok(sessions) => Response::Sessions { sessions },
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Request::SessionsShow { id } => match (
                p.store.get(id),
                p.store.exchanges(id),
                p.store.statements(id),
            ) {
                (Ok(s), Ok(exchanges), Ok(statements)) => Response::Session {
                    session: Box::new(s),
                    exchanges,
                    statements,
                },
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Response::Error {
                    message: e.to_string(),
                },
            },
            Request::PolicyPush { jws } => {
                match p.policy.apply(&jws, &format!("push by uid {uid}")) {
                    Ok(_) => Response::Policy(p.policy.summary()),
                    Err(e) => Response::Error {
                        message: format!("policy refused: {e}"),
                    },
                }
            }
            Request::PolicyShow => Response::Policy(p.policy.summary()),
            Request::ApprovalsList => Response::Approvals {
                pending: p.approvals.list(),
            },
            Request::ApprovalDecide {
                id,
                approve,
                reason: _,
                signed,
            } => match self.signed_approval(id, approve, signed.as_deref()) {
                Ok((mut outcome, by)) => {
                    // Who signed it, and who handed it in.
                    if let approvals::Outcome::Approved { by_uid, .. }
                    | approvals::Outcome::Denied { by_uid, .. } = &mut outcome
                    {
                        *by_uid = Some(uid);
                    }
                    let audit = serde_json::json!({"approval": id, "outcome": outcome, "via": "control", "by_uid": uid});
                    match p.approvals.decide(id, outcome) {
                        Some(approval) => {
                            if let Err(e) = p.store.audit("approval.decided", &audit) {
                                warn!(error = %e, "cannot record approval decision");
                            }
                            info!(approval = id, %by, uid, session = approval.session, workload = %approval.workload, "signed decision applied");
                            Response::Decided { approval }
                        }
                        None => Response::Error {
                            message: DecisionRefused::NotHeld(id).to_string(),
                        },
                    }
                }
                Err(e) => self.refuse_decision("approval_decide", uid, &e),
            },
            Request::IdentitySuspend { identity, .. }
                if identity.is_empty() || identity.contains('\0') =>
            {
                Response::Error {
                    message: "an identity id is neither empty nor holds NUL".into(),
                }
            }
            Request::IdentitySuspend { identity, reason } => {
                match p.suspensions.suspend(&p.store, &identity, &reason, uid) {
                    Ok(suspension) => {
                        let denied_held = p
                            .approvals
                            .deny_workload(&identity, &format!("identity suspended: {reason}"));
                        warn!(%identity, %reason, uid, "identity suspended");
                        Response::Suspended {
                            suspension,
                            denied_held,
                        }
                    }
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::IdentityResume { identity, signed } => {
                let verified = match signed.as_deref() {
                    None => Err(self.unsigned("identity_resume")),
                    Some(t) => self.deciders.resume(&p.suspensions, t),
                };
                match verified {
                    Ok((r, _)) if r.identity != identity => self.refuse_decision(
                        "identity_resume",
                        uid,
                        &DecisionRefused::NotSuspended(identity),
                    ),
                    Ok((_, by)) => match p.suspensions.resume(&p.store, &identity, uid, &by) {
                        Ok(was_suspended) => {
                            info!(%identity, by = %by.by, signer = %by.signer, uid, "suspension lifted");
                            Response::Resumed {
                                identity,
                                was_suspended,
                            }
                        }
                        Err(e) => Response::Error {
                            message: e.to_string(),
                        },
                    },
                    Err(e) => self.refuse_decision("identity_resume", uid, &e),
                }
            }
            Request::Audit { kind } => match p.store.audit_events(&kind) {
                Ok(events) => Response::Audit { events },
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Request::IdentitiesList => {
                let mut recent: std::collections::BTreeMap<String, RecentIdentity> =
                    Default::default();
                if let Ok(sessions) = p.store.list(&Filter {
                    limit: Some(10_000),
                    ..Default::default()
                }) {
                    for s in sessions {
                        if s.identity.id.is_empty() {
                            continue;
                        }
                        let e =
                            recent
                                .entry(s.identity.id.clone())
                                .or_insert_with(|| RecentIdentity {
                                    id: s.identity.id.clone(),
                                    description: s
                                        .identity
                                        .ci
                                        .as_ref()
                                        .map(|c| {
                                            format!(
                                                "{} {} run {}",
                                                c.system,
                                                c.repository.as_deref().unwrap_or("?"),
                                                c.run_id.as_deref().unwrap_or("?")
                                            )
                                        })
                                        .or_else(|| s.identity.cgroup_path.clone())
                                        .unwrap_or_default(),
                                    sessions: 0,
                                    last_seen_ms: 0,
                                });
                        e.sessions += 1;
                        e.last_seen_ms = e.last_seen_ms.max(s.started_at_ms);
                    }
                }
                Response::Identities {
                    suspended: p.suspensions.list(),
                    recent: recent.into_values().collect(),
                }
            }
            Request::SessionEvidence { id } => {
                // A checkpoint that covers the session's latest events.
                match p.store.seal_blocking().and_then(|_| p.store.evidence(id)) {
                    Ok(evidence) => Response::Evidence {
                        evidence: Box::new(evidence),
                    },
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::Verify { session } => match p.store.verify(session) {
                Ok(Ok(events)) => Response::Verified { events },
                Ok(Err(first_break)) => Response::Broken { first_break },
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
        }
    }
}

async fn write(w: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

/// One request, one response: what the CLI does.
pub async fn call(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line)
        .await
        .map_err(|e| ControlError::Protocol(e.to_string()))?;
    let mut lines = BufReader::new(r).lines();
    let reply = lines
        .next_line()
        .await
        .map_err(|e| ControlError::Protocol(e.to_string()))?
        .ok_or_else(|| ControlError::Protocol("node closed the connection".into()))?;
    let resp: Response =
        serde_json::from_str(&reply).map_err(|e| ControlError::Protocol(e.to_string()))?;
    if let Response::Error { message } = resp {
        return Err(ControlError::Remote(message));
    }
    Ok(resp)
}
