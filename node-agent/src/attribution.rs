//! Attribution: who opened a connection. From the kernel's origin
//! record (pid, tgid, uid, cgroup id) to the cgroup path, the systemd unit
//! or container, the executable and command line, and the CI job's own
//! identity (GitHub Actions, GitLab CI).
//!
//! The job may be the adversary, and a process's environment is its own to
//! choose, so CI attributes are never taken from the connecting process.
//! They come from a process above it that the job cannot modify (see
//! [`IdentityResolver::resolve`] and the threat model in
//! docs/ARCHITECTURE.md). What the connecting process claimed is recorded
//! next to it; a claim that differs is an `anomaly` audit event.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    hash::Hash,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use sha2::{Digest, Sha256};
use sluice_common::Origin;
use tracing::warn;

use crate::{
    config::{IdentitySettings, WorkloadSelector},
    identity::{cgroup_rel, path_within, CiJob, CiSource, ProcessInfo, WorkloadIdentity},
    record::RecordStore,
};

/// A small map that forgets its oldest entries beyond `cap`.
struct Bounded<K, V> {
    cap: usize,
    map: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Clone, V: Clone> Bounded<K, V> {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&self, k: &K) -> Option<V> {
        self.map.get(k).cloned()
    }

    fn insert(&mut self, k: K, v: V) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Most processes looked at in one ancestry walk or one cgroup scan.
const MAX_DEPTH: usize = 64;
const MAX_SCAN: usize = 4096;
const CACHE_CAP: usize = 4096;

/// One process as /proc/PID/stat shows it.
#[derive(Clone, Debug)]
struct Proc {
    pid: u32,
    ppid: u32,
    comm: String,
    /// Start time in clock ticks after boot: (pid, start) names one process.
    start: u64,
}

/// Returns the cgroups the programs are attached to now.
pub type WatchedFn = Arc<dyn Fn() -> Vec<PathBuf> + Send + Sync>;

/// What one connection's attribution found.
#[derive(Clone)]
struct Attribution {
    ci: Option<CiJob>,
    source: Option<CiSource>,
    unattributed: Option<String>,
    /// Read from a configured runner job process (or what it started):
    /// the runner says which job this is, whatever came before.
    anchored: bool,
}

/// The identity first attributed in one job cgroup (a watched cgroup, by
/// id; cgroup ids are not reused): connections from it and its
/// sub-cgroups that no runner process vouches for get this one.
#[derive(Clone)]
struct Pin {
    id: String,
    att: Attribution,
}

struct Inner {
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    /// The watched cgroups now (absolute; the set grows with
    /// `watch.patterns`).
    watched: WatchedFn,
    anchors: Vec<String>,
    selectors: Vec<(String, glob::Pattern)>,
    /// cgroup id → path. Kernel cgroup ids are not reused while the
    /// system runs, so an entry cannot come to name another cgroup.
    paths: Mutex<Bounded<u64, String>>,
    /// (pid, start time) of a trusted job process → its CI job. The pair
    /// names one process for the life of the system: a later job never
    /// finds an earlier one's entry.
    jobs: Mutex<Bounded<(u32, u64), Option<CiJob>>>,
    /// (trusted id, claimed job) pairs already audited as anomalies.
    audited: Mutex<Bounded<(String, CiJob), ()>>,
    /// Anomalies audited per identity: beyond `AUDITS_PER_IDENTITY`, a
    /// job varying its claims only counts (the log says it).
    audits_by: Mutex<Bounded<String, u32>>,
    /// Job cgroup id → the identity first attributed there.
    pins: Mutex<Bounded<u64, Pin>>,
}

/// Distinct claims audited per identity (a job that keeps inventing new
/// ones must not fill the chain).
const AUDITS_PER_IDENTITY: u32 = 16;

/// Attributes connections. Cheap to clone; `/proc` is read on tokio's
/// blocking pool, never on the async workers.
#[derive(Clone)]
pub struct IdentityResolver {
    inner: Arc<Inner>,
}

impl IdentityResolver {
    /// `watched`: the watched cgroup directories now (absolute, under
    /// `cgroup_root`).
    pub fn new(
        cgroup_root: PathBuf,
        watched: WatchedFn,
        selectors: &[WorkloadSelector],
        settings: &IdentitySettings,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                proc_root: PathBuf::from("/proc"),
                cgroup_root,
                watched,
                anchors: settings.job_processes.clone(),
                // Patterns were validated with the configuration.
                selectors: selectors
                    .iter()
                    .filter_map(|s| Some((s.name.clone(), glob::Pattern::new(&s.cgroup).ok()?)))
                    .collect(),
                paths: Mutex::new(Bounded::new(CACHE_CAP)),
                jobs: Mutex::new(Bounded::new(CACHE_CAP)),
                audited: Mutex::new(Bounded::new(CACHE_CAP)),
                audits_by: Mutex::new(Bounded::new(CACHE_CAP)),
                pins: Mutex::new(Bounded::new(CACHE_CAP)),
            }),
        }
    }

    /// Resolves the identity and process of a kernel origin record, on the
    /// blocking pool. A claimed CI identity that differs from the trusted
    /// one is written to the audit chain (`anomaly.identity`), once per
    /// (identity, claim) while remembered.
    pub async fn resolve(
        &self,
        origin: Origin,
        store: &RecordStore,
        session: u64,
    ) -> (WorkloadIdentity, ProcessInfo) {
        let inner = self.inner.clone();
        let (identity, process) =
            match tokio::task::spawn_blocking(move || inner.resolve(&origin)).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(session, error = %e, "identity resolution failed");
                    let identity = WorkloadIdentity {
                        id: stable_id(None, None, origin.cgroup_id, origin.uid),
                        cgroup_id: origin.cgroup_id,
                        unattributed: Some(format!("identity resolution failed: {e}")),
                        ..Default::default()
                    };
                    (identity, ProcessInfo::default())
                }
            };
        if let Some(claim) = &process.claimed_ci {
            let fresh = {
                let mut seen = self.inner.audited.lock().unwrap_or_else(|e| e.into_inner());
                let key = (identity.id.clone(), claim.clone());
                let fresh = seen.get(&key).is_none();
                seen.insert(key, ());
                fresh
            };
            // A job inventing claim after claim is audited a bounded
            // number of times.
            let fresh = fresh && {
                let mut by = self
                    .inner
                    .audits_by
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let n = by.get(&identity.id).unwrap_or(0);
                by.insert(identity.id.clone(), n + 1);
                n < AUDITS_PER_IDENTITY
            };
            warn!(
                session,
                workload = %identity.id,
                pid = process.tgid,
                claimed = ?claim.repository,
                trusted = ?identity.ci.as_ref().and_then(|c| c.repository.as_deref()),
                "process claims a CI identity its job process does not have"
            );
            if fresh {
                let body = serde_json::json!({
                    "kind": "ci-identity-claim",
                    "session": session,
                    "identity": identity.id,
                    "trusted": identity.ci,
                    "trusted_from": identity.ci_source,
                    "claimed": claim,
                    "pid": process.tgid,
                    "comm": process.comm,
                    "exe": process.exe,
                    "cgroup_id": identity.cgroup_id,
                    "cgroup_path": identity.cgroup_path,
                });
                if let Err(e) = store.audit_soon("anomaly.identity", &body) {
                    warn!(session, error = %e, "cannot record identity anomaly");
                }
            }
        }
        (identity, process)
    }

    /// Cached job processes (for tests and status).
    pub fn cached_jobs(&self) -> usize {
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Inner {
    fn resolve(&self, origin: &Origin) -> (WorkloadIdentity, ProcessInfo) {
        let proc_dir = self.proc_root.join(origin.tgid.to_string());
        // Is /proc/<tgid> still the process that connected? It must sit in
        // the cgroup the kernel recorded at connect(), and be the same
        // process (start time) after we read it; else the pid was reused
        // or the process moved, and only the recorded cgroup counts.
        let first = read_stat(&self.proc_root, origin.tgid);
        let live_path = read_cgroup_path(&proc_dir)
            .filter(|p| cgroup_id_of(&self.cgroup_root, p) == Some(origin.cgroup_id));
        let (exe, cmdline, claimed) = match &live_path {
            Some(_) => (
                std::fs::read_link(proc_dir.join("exe"))
                    .ok()
                    .map(|p| p.display().to_string()),
                std::fs::read(proc_dir.join("cmdline"))
                    .map(|b| redact_cmdline(split_nul(&b)))
                    .unwrap_or_default(),
                // What the connecting process itself says (it chose it).
                std::fs::read(proc_dir.join("environ"))
                    .ok()
                    .and_then(|env| ci_from_environ(&env)),
            ),
            None => (None, Vec::new(), None),
        };
        let me = first.filter(|m| {
            live_path.is_some()
                && read_stat(&self.proc_root, origin.tgid).map(|n| n.start) == Some(m.start)
        });
        let (exe, cmdline, claimed) = if me.is_some() {
            (exe, cmdline, claimed)
        } else {
            (None, Vec::new(), None)
        };
        let mut process = ProcessInfo {
            pid: origin.pid,
            tgid: origin.tgid,
            uid: origin.uid,
            gid: origin.gid,
            comm: comm_str(&origin.comm),
            exe,
            cmdline,
            claimed_ci: None,
        };
        let path = match live_path.filter(|_| me.is_some()) {
            Some(p) => {
                self.paths
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(origin.cgroup_id, p.clone());
                Some(p)
            }
            None => self.cgroup_path(origin.cgroup_id),
        };
        let watched = self.watched_rel();
        let host = path
            .as_deref()
            .is_some_and(|p| !Self::in_watched(&watched, p));
        let att = match &me {
            _ if host => Attribution {
                ci: None,
                source: None,
                unattributed: None,
                anchored: false,
            },
            Some(me) => self.attribute_live(&watched, me, path.as_deref()),
            // Gone (or not the one) before we looked: only its cgroup is
            // left to go by.
            None => self.attribute_by_cgroup(
                &watched,
                path.as_deref(),
                "process exited, moved or its pid reused",
            ),
        };
        let own_id = stable_id(
            att.ci.as_ref(),
            path.as_deref(),
            origin.cgroup_id,
            origin.uid,
        );
        let job = self.job_cgroup(&watched, path.as_deref());
        let (id, att, overridden) = self.settle(job, att, own_id);
        // A claim: the connecting process's own environment, or what the
        // topmost process of a later tree said, where it differs from the
        // identity the job's cgroup has.
        let claimed = claimed.or(overridden.and_then(|o| o.ci));
        if claimed.is_some() && claimed != att.ci {
            process.claimed_ci = claimed;
        }

        let workload = path.as_deref().and_then(|p| {
            self.selectors
                .iter()
                .find(|(_, pat)| pat.matches(p))
                .map(|(n, _)| n.clone())
        });
        let identity = WorkloadIdentity {
            id,
            workload,
            cgroup_id: origin.cgroup_id,
            systemd_unit: path.as_deref().and_then(systemd_unit),
            container_id: path.as_deref().and_then(container_id),
            cgroup_path: path,
            ci: att.ci,
            ci_source: att.source,
            unattributed: att.unattributed,
            host,
        };
        (identity, process)
    }

    /// The job cgroup a connection from `path` belongs to: the deepest
    /// watched cgroup holding it, by id.
    fn job_cgroup(&self, watched: &[String], path: Option<&str>) -> Option<u64> {
        let path = path?;
        let job = watched
            .iter()
            .filter(|w| path_within(path, w))
            .max_by_key(|w| w.len())?;
        cgroup_id_of(&self.cgroup_root, job)
    }

    /// Holds the attribution to the job cgroup's first one: a runner
    /// process's word replaces it (a runner runs one job after another in
    /// its cgroup); anything else (a process with no runner above it, a
    /// detached process, one in a sub-cgroup it made) gets the identity
    /// the cgroup already has. Returns the identity id, the attribution,
    /// and the one it overrode.
    fn settle(
        &self,
        job: Option<u64>,
        att: Attribution,
        own_id: String,
    ) -> (String, Attribution, Option<Attribution>) {
        let Some(job) = job.filter(|_| att.unattributed.is_none()) else {
            return (own_id, att, None);
        };
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        if !att.anchored {
            if let Some(pin) = pins.get(&job) {
                if pin.id == own_id {
                    return (own_id, att, None);
                }
                let mut held = pin.att.clone();
                if let Some(src) = &mut held.source {
                    src.how = "job-cgroup-first".into();
                }
                return (pin.id, held, Some(att));
            }
        }
        pins.insert(
            job,
            Pin {
                id: own_id.clone(),
                att: att.clone(),
            },
        );
        (own_id, att, None)
    }

    fn cgroup_path(&self, id: u64) -> Option<String> {
        if let Some(p) = self
            .paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            return Some(p);
        }
        let found = find_cgroup_by_id(&self.cgroup_root, id)?;
        self.paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, found.clone());
        Some(found)
    }

    /// The watched cgroups as paths relative to the cgroup2 root (`/a/b`).
    fn watched_rel(&self) -> Vec<String> {
        (self.watched)()
            .iter()
            .map(|w| cgroup_rel(&self.cgroup_root, w))
            .collect()
    }

    fn in_watched(watched: &[String], path: &str) -> bool {
        watched.iter().any(|w| path_within(path, w))
    }

    fn is_anchor(&self, p: &Proc) -> bool {
        let exe = std::fs::read_link(self.proc_root.join(p.pid.to_string()).join("exe")).ok();
        self.anchors.iter().any(|a| {
            if a.contains('/') {
                // Pinned by executable path: a job cannot fake it by name.
                exe.as_deref() == Some(Path::new(a))
            } else {
                // The kernel keeps 15 bytes of the name.
                let short: String = a.chars().take(15).collect();
                p.comm == short
                    || exe
                        .as_deref()
                        .and_then(|e| e.file_name())
                        .is_some_and(|n| n == a.as_str())
            }
        })
    }

    /// The CI job in a process's environment, remembered by (pid, start).
    fn job_of(&self, p: &Proc) -> Option<CiJob> {
        let key = (p.pid, p.start);
        if let Some(j) = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return j;
        }
        let env = std::fs::read(self.proc_root.join(p.pid.to_string()).join("environ")).ok()?;
        let job = ci_from_environ(&env);
        // Still the same process after the read (no pid reuse in between)?
        if read_stat(&self.proc_root, p.pid).map(|n| n.start) != Some(p.start) {
            return None;
        }
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, job.clone());
        job
    }

    fn trusted(&self, p: &Proc, how: &str, anchored: bool) -> Attribution {
        Attribution {
            ci: self.job_of(p),
            source: Some(CiSource {
                pid: p.pid,
                comm: p.comm.clone(),
                how: how.into(),
            }),
            unattributed: None,
            anchored,
        }
    }

    /// The connecting process's ancestors, itself first, while they are in
    /// the watched cgroups. Each parent must be older than its child, so a
    /// reused pid never joins the chain.
    fn ancestry(&self, watched: &[String], me: &Proc) -> Vec<Proc> {
        let mut chain = vec![me.clone()];
        while chain.len() < MAX_DEPTH {
            let Some(child) = chain.last() else { break };
            if child.ppid == 0 {
                break;
            }
            let Some(parent) = read_stat(&self.proc_root, child.ppid) else {
                break;
            };
            if parent.start > child.start {
                break;
            }
            let dir = self.proc_root.join(parent.pid.to_string());
            if !read_cgroup_path(&dir).is_some_and(|p| Self::in_watched(watched, &p)) {
                break;
            }
            chain.push(parent);
        }
        chain
    }

    /// 1. A configured runner job process above (the topmost one, so that a
    ///    job cannot plant a fake one below the real one): its environment,
    ///    else that of the process it started on the way down.
    /// 2. No anchor above, but one runs in this cgroup: the process left
    ///    the job's tree (double fork, reparented): the cgroup's sole job.
    /// 3. Otherwise the topmost ancestor inside the watched cgroups (the
    ///    process the runner put there; possibly this process itself).
    fn attribute_live(&self, watched: &[String], me: &Proc, path: Option<&str>) -> Attribution {
        let chain = self.ancestry(watched, me);
        if let Some(i) = chain.iter().rposition(|p| self.is_anchor(p)) {
            let anchor = &chain[i];
            let from_anchor = self.trusted(anchor, "runner-anchor", true);
            if from_anchor.ci.is_some() || i == 0 {
                return from_anchor;
            }
            return self.trusted(&chain[i - 1], "anchor-child", true);
        }
        if !self.anchors.is_empty() {
            if let Some(path) = path {
                let members = self.scan(path);
                if members.iter().any(|p| self.is_anchor(p)) {
                    return self.sole_job(watched, &members, "not below the runner's job process");
                }
            }
        }
        match chain.last() {
            Some(top) => self.trusted(top, "cgroup-top", false),
            None => Attribution {
                ci: None,
                source: None,
                unattributed: None,
                anchored: false,
            },
        }
    }

    fn attribute_by_cgroup(
        &self,
        watched: &[String],
        path: Option<&str>,
        why: &str,
    ) -> Attribution {
        match path {
            Some(p) => {
                let members = self.scan(p);
                self.sole_job(watched, &members, why)
            }
            None => Attribution {
                ci: None,
                source: None,
                unattributed: Some(format!("{why}; cgroup unknown")),
                anchored: false,
            },
        }
    }

    /// The jobs running in a cgroup, from their trusted processes: anchors
    /// (or what they started) when the cgroup has any, else the processes
    /// whose parent is outside the watched cgroups (what the runner put
    /// there). One job: it. None: no CI identity. Several: unattributable
    /// (the caller refuses the connection rather than guess).
    fn sole_job(&self, watched: &[String], members: &[Proc], why: &str) -> Attribution {
        let pids: HashSet<u32> = members.iter().map(|p| p.pid).collect();
        let anchors: Vec<&Proc> = members.iter().filter(|p| self.is_anchor(p)).collect();
        let anchored = !anchors.is_empty();
        let mut candidates: Vec<(Option<CiJob>, &Proc)> = Vec::new();
        if anchors.is_empty() {
            for p in members {
                let outside = !pids.contains(&p.ppid)
                    && !read_cgroup_path(&self.proc_root.join(p.ppid.to_string()))
                        .is_some_and(|c| Self::in_watched(watched, &c));
                if outside {
                    candidates.push((self.job_of(p), p));
                }
            }
        } else {
            for a in anchors {
                match self.job_of(a) {
                    Some(j) => candidates.push((Some(j), a)),
                    None => {
                        for c in members.iter().filter(|c| c.ppid == a.pid) {
                            candidates.push((self.job_of(c), c));
                        }
                    }
                }
            }
        }
        let mut jobs: Vec<(CiJob, &Proc)> = Vec::new();
        for (job, p) in candidates {
            if let Some(j) = job {
                if !jobs.iter().any(|(k, _)| *k == j) {
                    jobs.push((j, p));
                }
            }
        }
        match jobs.len() {
            0 => Attribution {
                ci: None,
                source: None,
                unattributed: None,
                anchored: false,
            },
            1 => {
                let (job, p) = jobs.remove(0);
                Attribution {
                    ci: Some(job),
                    source: Some(CiSource {
                        pid: p.pid,
                        comm: p.comm.clone(),
                        how: "cgroup-sole-job".into(),
                    }),
                    unattributed: None,
                    anchored,
                }
            }
            n => Attribution {
                ci: None,
                source: None,
                unattributed: Some(format!("{why}, and its cgroup runs {n} CI jobs")),
                anchored: false,
            },
        }
    }

    /// The processes of one cgroup (bounded).
    fn scan(&self, path: &str) -> Vec<Proc> {
        let file = self
            .cgroup_root
            .join(path.trim_start_matches('/'))
            .join("cgroup.procs");
        let Ok(text) = std::fs::read_to_string(file) else {
            return Vec::new();
        };
        text.split_whitespace()
            .take(MAX_SCAN)
            .filter_map(|p| p.parse().ok())
            .filter_map(|pid| read_stat(&self.proc_root, pid))
            .collect()
    }
}

/// Parses /proc/PID/stat: the name sits in parentheses and may itself hold
/// spaces and parentheses, so fields are counted after the last `)`.
fn read_stat(proc_root: &Path, pid: u32) -> Option<Proc> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    parse_stat(pid, &text)
}

fn parse_stat(pid: u32, text: &str) -> Option<Proc> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); ppid is field 4, starttime field 22.
    let ppid = rest.get(1)?.parse().ok()?;
    let start = rest.get(19)?.parse().ok()?;
    Some(Proc {
        pid,
        ppid,
        comm,
        start,
    })
}

fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

fn split_nul(b: &[u8]) -> Vec<String> {
    b.split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Command lines carry credentials (`curl -H "Authorization: ..."`,
/// `--password=...`): keep the argument's shape, replace the value by a
/// fingerprint an investigator can compare.
fn redact_arg(arg: &str) -> String {
    const MARKERS: &[&str] = &[
        "authorization",
        "bearer ",
        "token",
        "password",
        "passwd",
        "secret",
        "api-key",
        "api_key",
        "apikey",
        "x-api-key",
        "cookie",
    ];
    let lower = arg.to_ascii_lowercase();
    if !MARKERS.iter().any(|m| lower.contains(m)) {
        return arg.to_owned();
    }
    let cut = match arg.find([':', '=']) {
        Some(i) => i + 1,
        // A bare flag (`--token`): its value is the next argument.
        None if arg.starts_with('-') => return arg.to_owned(),
        None => 0,
    };
    let (head, value) = arg.split_at(cut);
    if value.trim().is_empty() {
        return arg.to_owned();
    }
    let fp = hex::encode(&Sha256::digest(value.trim().as_bytes())[..8]);
    format!("{head}[redacted sha256:{fp}]")
}

fn redact_cmdline(args: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut redact_next = false;
    for a in args {
        if redact_next {
            redact_next = false;
            out.push(format!(
                "[redacted sha256:{}]",
                hex::encode(&Sha256::digest(a.as_bytes())[..8])
            ));
            continue;
        }
        let r = redact_arg(&a);
        // `--token VALUE`, `-u user:pass`: the secret is the next argument.
        redact_next = r == a
            && a.starts_with('-')
            && (matches!(a.as_str(), "-u" | "--user" | "-p")
                || redact_arg(&format!("{a}=x")) != format!("{a}=x"));
        out.push(r);
    }
    out
}

/// The cgroup v2 path of a process (`0::/path` in /proc/PID/cgroup).
fn read_cgroup_path(proc_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(proc_dir.join("cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// The id (directory inode) of the cgroup at `rel` (`/a/b`).
fn cgroup_id_of(root: &Path, rel: &str) -> Option<u64> {
    std::fs::metadata(root.join(rel.trim_start_matches('/')))
        .ok()
        .map(|m| m.ino())
}

/// On cgroup v2 a cgroup's id is its directory's inode number.
fn find_cgroup_by_id(root: &Path, id: u64) -> Option<String> {
    fn walk(root: &Path, dir: &Path, id: u64, depth: usize) -> Option<String> {
        if depth > 16 {
            return None;
        }
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let Ok(ft) = entry.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let p = entry.path();
            if entry.metadata().map(|m| m.ino()).ok() == Some(id) {
                let rel = p.strip_prefix(root).ok()?;
                return Some(format!("/{}", rel.display()));
            }
            if let Some(found) = walk(root, &p, id, depth + 1) {
                return Some(found);
            }
        }
        None
    }
    if std::fs::metadata(root).map(|m| m.ino()).ok() == Some(id) {
        return Some("/".into());
    }
    walk(root, root, id, 0)
}

fn systemd_unit(path: &str) -> Option<String> {
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

/// Docker, containerd and podman put the 64-hex container id in the path.
fn container_id(path: &str) -> Option<String> {
    path.split('/').find_map(|c| {
        let c = c.strip_suffix(".scope").unwrap_or(c);
        let id = c.rsplit(['-', ':']).next().unwrap_or(c);
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
    })
}

/// Reads the CI job's identity from a NUL-separated environment block.
pub fn ci_from_environ(env: &[u8]) -> Option<CiJob> {
    let vars: HashMap<&[u8], String> = env
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let eq = kv.iter().position(|&b| b == b'=')?;
            Some((
                &kv[..eq],
                String::from_utf8_lossy(&kv[eq + 1..]).into_owned(),
            ))
        })
        .collect();
    let get = |k: &str| vars.get(k.as_bytes()).filter(|v| !v.is_empty()).cloned();
    if get("GITHUB_ACTIONS").as_deref() == Some("true") {
        return Some(CiJob {
            system: "github-actions".into(),
            repository: get("GITHUB_REPOSITORY"),
            run_id: get("GITHUB_RUN_ID"),
            run_attempt: get("GITHUB_RUN_ATTEMPT"),
            workflow: get("GITHUB_WORKFLOW"),
            job: get("GITHUB_JOB"),
            actor: get("GITHUB_ACTOR"),
            git_ref: get("GITHUB_REF"),
            sha: get("GITHUB_SHA"),
            pipeline_id: None,
            workspace: get("GITHUB_WORKSPACE"),
        });
    }
    if get("GITLAB_CI").as_deref() == Some("true") {
        return Some(CiJob {
            system: "gitlab-ci".into(),
            repository: get("CI_PROJECT_PATH"),
            run_id: get("CI_JOB_ID"),
            run_attempt: None,
            workflow: get("CI_PIPELINE_SOURCE"),
            job: get("CI_JOB_NAME"),
            actor: get("GITLAB_USER_LOGIN"),
            git_ref: get("CI_COMMIT_REF_NAME"),
            sha: get("CI_COMMIT_SHA"),
            pipeline_id: get("CI_PIPELINE_ID"),
            workspace: get("CI_PROJECT_DIR"),
        });
    }
    None
}

/// `wl-` + 16 hex digits of SHA-256 over what names the workload: the CI
/// job (from a trusted process) when there is one, else the kernel cgroup
/// id, cgroup path and user. A CI job's id deliberately leaves the cgroup
/// out: a root job can move its own processes between cgroups of its
/// subtree, and must not step out of a suspension by doing so.
fn stable_id(ci: Option<&CiJob>, cgroup: Option<&str>, cgroup_id: u64, uid: u32) -> String {
    let mut h = Sha256::new();
    match ci {
        Some(ci) => {
            for part in [
                Some(ci.system.as_str()),
                ci.repository.as_deref(),
                ci.pipeline_id.as_deref(),
                ci.run_id.as_deref(),
                ci.run_attempt.as_deref(),
                ci.job.as_deref(),
            ] {
                h.update(part.unwrap_or("").as_bytes());
                h.update([0]);
            }
        }
        None => {
            h.update(b"cgroup\0");
            h.update(cgroup_id.to_le_bytes());
            h.update(cgroup.unwrap_or("?").as_bytes());
            h.update([0]);
            h.update(uid.to_le_bytes());
        }
    }
    format!("wl-{}", &hex::encode(h.finalize())[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[&str]) -> Vec<u8> {
        pairs.join("\0").into_bytes()
    }

    #[test]
    fn github_identity_from_environment() {
        let e = env(&[
            "PATH=/bin",
            "GITHUB_ACTIONS=true",
            "GITHUB_REPOSITORY=acme/widgets",
            "GITHUB_RUN_ID=42",
            "GITHUB_RUN_ATTEMPT=2",
            "GITHUB_JOB=build",
            "GITHUB_ACTOR=alice",
            "GITHUB_SHA=abc",
        ]);
        let ci = ci_from_environ(&e).unwrap();
        assert_eq!(ci.system, "github-actions");
        assert_eq!(ci.repository.as_deref(), Some("acme/widgets"));
        assert_eq!(ci.run_attempt.as_deref(), Some("2"));
        assert_eq!(ci.actor.as_deref(), Some("alice"));
    }

    #[test]
    fn gitlab_identity_from_environment() {
        let e = env(&[
            "GITLAB_CI=true",
            "CI_PROJECT_PATH=group/proj",
            "CI_PIPELINE_ID=7",
            "CI_JOB_ID=99",
            "GITLAB_USER_LOGIN=bob",
        ]);
        let ci = ci_from_environ(&e).unwrap();
        assert_eq!(ci.system, "gitlab-ci");
        assert_eq!(ci.pipeline_id.as_deref(), Some("7"));
        assert_eq!(ci.run_id.as_deref(), Some("99"));
        assert!(ci_from_environ(&env(&["HOME=/root"])).is_none());
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = CiJob {
            system: "github-actions".into(),
            run_id: Some("1".into()),
            ..Default::default()
        };
        let b = CiJob {
            run_id: Some("2".into()),
            ..a.clone()
        };
        assert_eq!(
            stable_id(Some(&a), None, 1, 0),
            stable_id(Some(&a), Some("/x"), 2, 5)
        );
        assert_ne!(
            stable_id(Some(&a), None, 1, 0),
            stable_id(Some(&b), None, 1, 0)
        );
        assert_ne!(
            stable_id(None, Some("/a"), 1, 0),
            stable_id(None, Some("/b"), 1, 0)
        );
        // Outside CI, a cgroup re-created under the same path is another
        // workload (a new kernel id).
        assert_ne!(
            stable_id(None, Some("/a"), 1, 0),
            stable_id(None, Some("/a"), 2, 0)
        );
        assert!(stable_id(None, None, 0, 0).starts_with("wl-"));
    }

    #[test]
    fn stat_lines_with_hostile_names_parse() {
        let p = parse_stat(
            42,
            "42 (evil) 1 2 (x) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 0 0",
        )
        .unwrap();
        assert_eq!(p.comm, "evil) 1 2 (x");
        assert_eq!((p.ppid, p.start), (7, 12345));
        assert!(parse_stat(1, "1 (x").is_none());
        assert!(parse_stat(1, "").is_none());
    }

    #[test]
    fn subtree_membership_is_component_wise() {
        assert!(path_within("/runner.service", "/runner.service"));
        assert!(path_within("/runner.service/job-1", "/runner.service"));
        assert!(!path_within("/runner.service2", "/runner.service"));
        assert!(path_within("/anything", "/"));
    }

    #[test]
    fn bounded_map_forgets_oldest() {
        let mut m = Bounded::new(2);
        m.insert(1, "a");
        m.insert(2, "b");
        m.insert(3, "c");
        assert_eq!(m.len(), 2);
        assert!(m.get(&1).is_none() && m.get(&3).is_some());
    }

    #[test]
    fn credentials_on_command_lines_are_redacted() {
        let r = redact_arg("Authorization: Bearer sk-live-123");
        assert!(
            r.starts_with("Authorization:[redacted sha256:") && !r.contains("sk-live"),
            "{r}"
        );
        let r = redact_arg("--password=hunter2");
        assert!(
            r.starts_with("--password=[redacted") && !r.contains("hunter2"),
            "{r}"
        );
        assert_eq!(
            redact_arg("https://api.example.com/v1"),
            "https://api.example.com/v1"
        );
        assert_eq!(redact_arg("--token"), "--token");
        let v = redact_cmdline(vec![
            "tool".into(),
            "--token".into(),
            "abc123".into(),
            "-u".into(),
            "me:pw".into(),
            "plain".into(),
        ]);
        assert_eq!(v[1], "--token");
        assert!(
            v[2].starts_with("[redacted") && v[4].starts_with("[redacted"),
            "{v:?}"
        );
        assert_eq!(v[5], "plain");
    }

    #[test]
    fn unit_and_container_from_path() {
        assert_eq!(
            systemd_unit("/system.slice/actions.runner.acme.r1.service").as_deref(),
            Some("actions.runner.acme.r1.service")
        );
        let id = "a".repeat(64);
        assert_eq!(
            container_id(&format!("/system.slice/docker-{id}.scope")).as_deref(),
            Some(id.as_str())
        );
        assert_eq!(container_id("/system.slice/foo.service"), None);
    }

    /// A fake /proc and cgroup tree: (pid, ppid, comm, start, cgroup, env).
    struct FakeHost {
        dir: tempfile::TempDir,
    }

    impl FakeHost {
        fn new() -> Self {
            let h = FakeHost {
                dir: tempfile::tempdir().unwrap(),
            };
            h.process(1, 0, "systemd", 1, "/init.scope", &[]);
            h
        }

        fn proc_root(&self) -> PathBuf {
            self.dir.path().join("proc")
        }

        fn cg_root(&self) -> PathBuf {
            self.dir.path().join("cg")
        }

        fn process(&self, pid: u32, ppid: u32, comm: &str, start: u64, cg: &str, env: &[&str]) {
            let d = self.proc_root().join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let fill = "0 ".repeat(17);
            std::fs::write(
                d.join("stat"),
                format!("{pid} ({comm}) S {ppid} {fill}{start} 0 0\n"),
            )
            .unwrap();
            std::fs::write(d.join("environ"), env.join("\0")).unwrap();
            std::fs::write(d.join("cgroup"), format!("0::{cg}\n")).unwrap();
            let _ = std::os::unix::fs::symlink(format!("/opt/bin/{comm}"), d.join("exe"));
            let cgd = self.cg_root().join(cg.trim_start_matches('/'));
            std::fs::create_dir_all(&cgd).unwrap();
            let procs = cgd.join("cgroup.procs");
            let mut text = std::fs::read_to_string(&procs).unwrap_or_default();
            text.push_str(&format!("{pid}\n"));
            std::fs::write(procs, text).unwrap();
        }

        fn exit(&self, pid: u32, cg: &str) {
            std::fs::remove_dir_all(self.proc_root().join(pid.to_string())).unwrap();
            let procs = self
                .cg_root()
                .join(cg.trim_start_matches('/'))
                .join("cgroup.procs");
            let text: String = std::fs::read_to_string(&procs)
                .unwrap()
                .lines()
                .filter(|l| *l != pid.to_string())
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(procs, text).unwrap();
        }

        fn resolver(&self) -> Inner {
            let r = Inner {
                proc_root: self.proc_root(),
                cgroup_root: self.cg_root(),
                watched: {
                    let w = self.cg_root().join("runner");
                    Arc::new(move || vec![w.clone()])
                },
                anchors: IdentitySettings::default().job_processes,
                selectors: vec![],
                paths: Mutex::new(Bounded::new(16)),
                jobs: Mutex::new(Bounded::new(16)),
                audited: Mutex::new(Bounded::new(16)),
                audits_by: Mutex::new(Bounded::new(16)),
                pins: Mutex::new(Bounded::new(16)),
            };
            r.paths
                .lock()
                .unwrap()
                .insert(self.runner_id(), "/runner".to_owned());
            r
        }

        /// The watched cgroup's id (its directory's inode).
        fn runner_id(&self) -> u64 {
            let d = self.cg_root().join("runner");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::metadata(d).unwrap().ino()
        }
    }

    fn origin(h: &FakeHost, tgid: u32) -> Origin {
        Origin {
            dst_addr: [0; 16],
            dst_port: 443,
            family: 2,
            target_id: 1,
            pid: tgid,
            tgid,
            uid: 0,
            gid: 0,
            cgroup_id: h.runner_id(),
            cookie: 0,
            comm: [0; 16],
        }
    }

    const JOB_A: &[&str] = &[
        "GITHUB_ACTIONS=true",
        "GITHUB_REPOSITORY=acme/a",
        "GITHUB_RUN_ID=1",
    ];
    const JOB_B: &[&str] = &[
        "GITHUB_ACTIONS=true",
        "GITHUB_REPOSITORY=acme/b",
        "GITHUB_RUN_ID=2",
    ];
    const FORGED: &[&str] = &[
        "GITHUB_ACTIONS=true",
        "GITHUB_REPOSITORY=acme/other",
        "GITHUB_RUN_ID=1",
    ];

    fn repo(id: &WorkloadIdentity) -> Option<&str> {
        id.ci.as_ref().and_then(|c| c.repository.as_deref())
    }

    #[test]
    fn trusted_identity_comes_from_the_topmost_runner_worker() {
        let h = FakeHost::new();
        h.process(10, 1, "Runner.Listener", 100, "/runner", &[]);
        h.process(20, 10, "Runner.Worker", 200, "/runner", JOB_A);
        h.process(21, 20, "bash", 210, "/runner", JOB_A);
        h.process(22, 21, "curl", 220, "/runner", FORGED);
        // A fake Runner.Worker planted by the job, below the real one.
        h.process(23, 21, "Runner.Worker", 230, "/runner", FORGED);
        h.process(24, 23, "curl", 240, "/runner", FORGED);
        let r = h.resolver();
        for pid in [22, 24] {
            let (id, p) = r.resolve(&origin(&h, pid));
            assert_eq!(repo(&id), Some("acme/a"), "pid {pid}");
            let src = id.ci_source.as_ref().unwrap();
            assert_eq!((src.pid, src.how.as_str()), (20, "runner-anchor"));
            assert_eq!(
                p.claimed_ci.and_then(|c| c.repository).as_deref(),
                Some("acme/other")
            );
        }
        // The step shell, honest: no claim recorded.
        let (id, p) = r.resolve(&origin(&h, 21));
        assert_eq!(repo(&id), Some("acme/a"));
        assert!(p.claimed_ci.is_none());
        // A parent younger than its child is a reused pid: not followed.
        h.process(30, 31, "curl", 300, "/runner", FORGED);
        h.process(31, 1, "Runner.Worker", 400, "/runner", JOB_B);
        let (id, _) = r.resolve(&origin(&h, 30));
        assert_ne!(repo(&id), Some("acme/b"));
    }

    #[test]
    fn a_later_job_in_the_same_cgroup_is_never_attributed_to_an_earlier_one() {
        let h = FakeHost::new();
        h.process(10, 1, "Runner.Listener", 100, "/runner", &[]);
        h.process(20, 10, "Runner.Worker", 200, "/runner", JOB_A);
        h.process(22, 20, "curl", 220, "/runner", JOB_A);
        let r = h.resolver();
        let (a, _) = r.resolve(&origin(&h, 22));
        assert_eq!(repo(&a), Some("acme/a"));
        // A process gone before we looked: its cgroup's only job.
        let (gone, _) = r.resolve(&origin(&h, 99));
        assert_eq!(repo(&gone), Some("acme/a"));
        assert_eq!(gone.ci_source.unwrap().how, "cgroup-sole-job");
        // Job A ends, job B starts in the same cgroup (the cache still
        // holds A's worker): a gone process now belongs to B.
        h.exit(22, "/runner");
        h.exit(20, "/runner");
        h.process(40, 10, "Runner.Worker", 500, "/runner", JOB_B);
        let (gone, _) = r.resolve(&origin(&h, 99));
        assert_eq!(repo(&gone), Some("acme/b"));
        // Two jobs at once: a gone process is not guessed, it is refused.
        h.process(50, 10, "Runner.Worker", 600, "/runner", JOB_A);
        let (gone, _) = r.resolve(&origin(&h, 99));
        assert!(gone.ci.is_none());
        assert!(gone.unattributed.unwrap().contains("2 CI jobs"));
        // A detached process (reparented to init) with a forged env in a
        // cgroup running two jobs: refused as well, never its own claim.
        h.process(60, 1, "curl", 700, "/runner", FORGED);
        let (orphan, p) = r.resolve(&origin(&h, 60));
        assert!(orphan.unattributed.is_some() && orphan.ci.is_none());
        assert_eq!(
            p.claimed_ci.and_then(|c| c.repository).as_deref(),
            Some("acme/other")
        );
    }

    #[test]
    fn without_a_runner_anchor_the_process_the_runner_put_there_is_trusted() {
        let h = FakeHost::new();
        // Entered the cgroup from outside (its parent is not watched).
        h.process(
            5,
            1,
            "containerd-shim",
            50,
            "/system.slice/containerd.service",
            &[],
        );
        h.process(10, 5, "sh", 100, "/runner", JOB_A);
        h.process(11, 10, "python3", 110, "/runner", FORGED);
        let r = h.resolver();
        let (id, p) = r.resolve(&origin(&h, 11));
        assert_eq!(repo(&id), Some("acme/a"));
        assert_eq!(id.ci_source.unwrap().how, "cgroup-top");
        assert!(p.claimed_ci.is_some());
    }

    #[test]
    fn finds_own_cgroup_by_inode() {
        // Our own cgroup's inode must map back to our cgroup path.
        let Ok(root) = crate::redirect::cgroup2_root() else {
            panic!("cgroup2 must be mounted on this machine kind")
        };
        let own = read_cgroup_path(Path::new("/proc/self")).expect("own cgroup");
        let dir = root.join(own.trim_start_matches('/'));
        let ino = std::fs::metadata(&dir).unwrap().ino();
        assert_eq!(find_cgroup_by_id(&root, ino).as_deref(), Some(own.as_str()));
    }
}
