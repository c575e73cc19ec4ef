//! Containment of root jobs, userspace side, where the kernel has no BPF
//! LSM: the `Guard` that stops jobs the kernel guard caught, detects
//! processes leaving a watched cgroup and repairs tampered links and maps,
//! and the `Quarantine` the proxy consults. The kernel layout the programs
//! need is `btf.rs`.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use crate::btf::start_time;

/// Jobs stopped for what they tried against the node. A connection from
/// a quarantined cgroup (or below it) is refused and recorded: the job's
/// processes were killed, and anything that somehow outlived the kill
/// (or was placed there after) gets nothing through. Bounded; entries
/// whose cgroup is gone are dropped first.
#[derive(Default)]
pub struct Quarantine {
    /// Cgroup path relative to the cgroup2 root (`/a/b`) → why.
    jobs: std::sync::Mutex<Vec<(String, PathBuf, String)>>,
}

const QUARANTINE_CAP: usize = 4096;

impl Quarantine {
    /// Quarantines the job at `cgroup` (absolute path under `root`).
    pub fn add(&self, root: &Path, cgroup: &Path, why: &str) {
        let rel = crate::identity::cgroup_rel(root, cgroup);
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.iter().any(|(r, _, _)| *r == rel) {
            return;
        }
        if jobs.len() >= QUARANTINE_CAP {
            jobs.retain(|(_, abs, _)| abs.exists());
        }
        if jobs.len() >= QUARANTINE_CAP {
            let (old, _, _) = jobs.remove(0);
            tracing::warn!(cgroup = %old, "quarantine full: oldest entry dropped");
        }
        jobs.push((rel, cgroup.to_owned(), why.to_owned()));
    }

    /// Why a connection from `cgroup_path` (relative) is refused, if it is.
    pub fn reason_for(&self, cgroup_path: Option<&str>) -> Option<String> {
        let path = cgroup_path?;
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.iter()
            .find(|(rel, _, _)| crate::identity::path_within(path, rel))
            .map(|(_, _, why)| why.clone())
    }

    pub fn len(&self) -> usize {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The fallback where the BPF LSM is missing, on a thread of its own
/// (/proc walks and cgroup writes are blocking work). It answers:
///
/// * the kernel fallback's events (ring buffer, woken within
///   microseconds): a watched process killed for bpf(), for cloning a
///   shared file table or for pidfd_getfd() was working against the node,
///   so its whole job is stopped (`cgroup.kill`), quarantined and audited
///   (`containment.tamper`), and the links are checked at once; a packet
///   socket costs the process only (`containment.killed`);
/// * every 250 ms, processes that left a watched cgroup: killed with
///   their descendants, their job stopped and quarantined
///   (`containment.escape`);
/// * every 250 ms, every watched cgroup's links: one found detached or
///   unpinned is attached again, and the job stopped
///   (`containment.relinked`).
pub struct Guard {
    redirector: std::sync::Arc<crate::redirect::Redirector>,
    store: std::sync::Arc<crate::record::RecordStore>,
    quarantine: std::sync::Arc<Quarantine>,
    cgroup_root: PathBuf,
    events: Option<aya::maps::RingBuf<aya::maps::MapData>>,
    /// Without the BPF LSM moves out of a watched cgroup are only detected.
    detect_escapes: bool,
    /// pid → (start time in clock ticks, watched cgroup it was under).
    known: HashMap<u32, (u64, PathBuf)>,
}

const TICK: std::time::Duration = std::time::Duration::from_millis(250);

impl Guard {
    pub fn new(
        redirector: std::sync::Arc<crate::redirect::Redirector>,
        store: std::sync::Arc<crate::record::RecordStore>,
        quarantine: std::sync::Arc<Quarantine>,
        cgroup_root: PathBuf,
    ) -> Self {
        let events = redirector.take_events();
        let detect_escapes = redirector.containment != crate::redirect::Containment::Lsm;
        Self {
            detect_escapes,
            redirector,
            store,
            quarantine,
            cgroup_root,
            events,
            known: HashMap::new(),
        }
    }

    pub fn run(mut self) {
        let mut last = std::time::Instant::now();
        loop {
            self.wait_events(TICK.saturating_sub(last.elapsed()));
            self.drain_events();
            if last.elapsed() >= TICK {
                last = std::time::Instant::now();
                self.check();
            }
        }
    }

    fn wait_events(&self, timeout: std::time::Duration) {
        use std::os::fd::AsFd;
        let Some(ring) = &self.events else {
            std::thread::sleep(timeout);
            return;
        };
        let mut fds = [nix::poll::PollFd::new(
            ring.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
    }

    fn drain_events(&mut self) {
        let mut events = Vec::new();
        if let Some(ring) = &mut self.events {
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<sluice_common::ContainEvent>() {
                    // SAFETY: the kernel program writes whole ContainEvents
                    // (repr(C), integers only); read unaligned.
                    events.push(unsafe {
                        std::ptr::read_unaligned(
                            item.as_ptr() as *const sluice_common::ContainEvent
                        )
                    });
                }
            }
        }
        if events.is_empty() {
            return;
        }
        let mut tampered = false;
        for e in events {
            tampered |= self.on_event(&e);
        }
        if tampered {
            // It may have detached something before it died.
            self.check_links();
        }
    }

    /// Answers one kernel event; true when it was tampering.
    fn on_event(&mut self, e: &sluice_common::ContainEvent) -> bool {
        use sluice_common::contain_kind;
        let call = match e.kind {
            contain_kind::BPF => "bpf",
            contain_kind::SHARED_FILES => "clone-shared-files",
            contain_kind::FD_TAKE => "pidfd_getfd",
            contain_kind::PACKET_SOCKET => "packet-socket",
            _ => "unknown",
        };
        let comm = String::from_utf8_lossy(&e.comm)
            .trim_end_matches('\0')
            .to_owned();
        let job = self.cgroup_by_id(e.watched_id);
        let tamper = e.kind != contain_kind::PACKET_SOCKET;
        let stopped = match (&job, tamper) {
            (Some(job), true) => self.stop_job(job, &format!("{call}() from the job")),
            _ => Vec::new(),
        };
        tracing::error!(pid = e.tgid, %comm, call, job = ?job, stopped = ?stopped, "watched process killed by the kernel guard");
        let body = serde_json::json!({
            "call": call,
            "pid": e.tgid,
            "comm": comm,
            "cgroup_id": e.cgroup_id,
            "job": job.as_ref().map(|j| j.display().to_string()),
            "job_stopped": tamper && job.is_some(),
            "also_killed": stopped,
        });
        let kind = if tamper {
            "containment.tamper"
        } else {
            "containment.killed"
        };
        if let Err(e) = self.store.audit(kind, &body) {
            tracing::error!(error = %e, "recording the containment event failed");
        }
        tamper
    }

    /// The watched cgroup with this id (inode number), if still there.
    fn cgroup_by_id(&self, id: u64) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        self.redirector
            .cgroups()
            .into_iter()
            .find(|c| std::fs::metadata(c).is_ok_and(|m| m.ino() == id))
    }

    /// Kills every process of the job (`cgroup.kill`, the kernel's
    /// race-free way: no fork slips out) and quarantines it. Returns the
    /// pids that were there.
    fn stop_job(&self, job: &Path, why: &str) -> Vec<u32> {
        self.quarantine.add(&self.cgroup_root, job, why);
        let pids = pids_under(job);
        if let Err(e) = std::fs::write(job.join("cgroup.kill"), "1") {
            // Older kernels (< 5.14): signal them one by one.
            tracing::warn!(error = %e, job = %job.display(), "cgroup.kill failed; killing by pid");
            for &p in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        self.redirector
            .jobs_stopped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        pids
    }

    /// Links detached or unpinned, map entries deleted: repaired, and
    /// the job in that cgroup stopped.
    fn check_links(&mut self) {
        for (cgroup, wrong) in self.redirector.restore_links() {
            // The root cgroup's links (`watch.host`): no job to stop (and
            // never the whole host); put back and on the record.
            let stopped = if cgroup == self.cgroup_root {
                Vec::new()
            } else {
                self.stop_job(&cgroup, "the node's kernel hooks were tampered with")
            };
            tracing::error!(cgroup = %cgroup.display(), what = ?wrong, stopped = ?stopped, "kernel hooks of a watched cgroup were tampered with: attached again, job stopped");
            let body = serde_json::json!({
                "cgroup": cgroup.display().to_string(),
                "found": wrong,
                "job_stopped": cgroup != self.cgroup_root,
                "also_killed": stopped,
            });
            if let Err(e) = self.store.audit("containment.relinked", &body) {
                tracing::error!(error = %e, "recording the re-attachment failed");
            }
        }
    }

    /// Target entries or the proxy's address changed in the kernel's
    /// maps: put back and on the record. Only root outside every watched
    /// cgroup can write them (bpf() from a job is refused or kills it,
    /// and that job is stopped on the kernel's event), so there is no job
    /// to stop here: the record says what was found.
    fn check_maps(&mut self) {
        let wrong = self.redirector.restore_targets();
        if wrong.is_empty() {
            return;
        }
        tracing::error!(found = ?wrong, "the node's kernel maps were changed from outside: restored");
        self.redirector
            .maps_restored
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body = serde_json::json!({ "found": wrong });
        if let Err(e) = self.store.audit("containment.maps_restored", &body) {
            tracing::error!(error = %e, "recording the map repair failed");
        }
    }

    pub fn check(&mut self) {
        self.check_links();
        self.check_maps();
        if !self.detect_escapes {
            return;
        }
        let mut now: HashMap<u32, (u64, PathBuf)> = HashMap::new();
        for cg in self.redirector.cgroups() {
            for pid in pids_under(&cg) {
                if let Some(st) = start_time(pid) {
                    now.insert(pid, (st, cg.clone()));
                }
            }
        }
        let known = std::mem::take(&mut self.known);
        for (pid, (st, cg)) in &known {
            if now.contains_key(pid) || start_time(*pid) != Some(*st) {
                continue; // still inside, or gone
            }
            let to = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            // Not in the listing yet not outside: a zombie (exited tasks
            // leave `cgroup.procs` before they are reaped) or a move inside
            // the subtree while we listed. Only a live process whose
            // cgroup is now outside the job left it.
            let rel = crate::identity::cgroup_rel(&self.cgroup_root, cg);
            let now_in = to.lines().find_map(|l| l.strip_prefix("0::"));
            if is_zombie(*pid)
                || now_in.is_none_or(|p| crate::identity::path_within(p.trim(), &rel))
            {
                continue;
            }
            // It and whatever it started since (they were born outside).
            let victims = stop_tree(*pid);
            for &v in &victims {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(v as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let stopped = self.stop_job(cg, "a process left the job's cgroup");
            tracing::error!(pid, from = %cg.display(), to = %to.trim(), killed = ?victims, stopped = ?stopped, "a process LEFT its watched cgroup (no BPF LSM to refuse it): killed with its descendants, job stopped");
            self.redirector
                .escapes_detected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let body = serde_json::json!({
                "pid": pid,
                "from": cg.display().to_string(),
                "to": to.trim(),
                "killed": victims,
                "job_stopped": true,
                "also_killed": stopped,
            });
            if let Err(e) = self.store.audit("containment.escape", &body) {
                tracing::error!(error = %e, "recording the escape failed");
            }
        }
        self.known = now;
    }
}

/// Stops `pid` and everything it started (SIGSTOP, rescanning until no
/// new child appears), so that none forked while we looked is left out
/// of the kill: once the parent dies its children belong to init and
/// can no longer be found by parent. Returns them, `pid` first.
fn stop_tree(pid: u32) -> Vec<u32> {
    let stop = |p: u32| {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p as i32),
            nix::sys::signal::Signal::SIGSTOP,
        );
    };
    stop(pid);
    let mut all = vec![pid];
    // Bounded: a fork bomb is stopped generation by generation.
    for _ in 0..64 {
        let fresh: Vec<u32> = descendants(pid)
            .into_iter()
            .filter(|d| !all.contains(d))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for &d in &fresh {
            stop(d);
        }
        all.extend(fresh);
    }
    all
}

/// Every process descending from `pid` (by parent pid, from /proc).
fn descendants(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(pp) = parent_pid(p) {
                children.entry(pp).or_default().push(p);
            }
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        for c in children.get(&p).into_iter().flatten() {
            if !out.contains(c) {
                out.push(*c);
                stack.push(*c);
            }
        }
    }
    out
}

/// Field 4 of /proc/PID/stat.
fn parent_pid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every pid in `cg` and its descendants.
fn pids_under(cg: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![cg.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

/// Field 3 of /proc/PID/stat: exited, not yet reaped (or dead).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace()
                .next()
                .map(|st| st == "Z" || st == "X")
        })
        .unwrap_or(true)
}
