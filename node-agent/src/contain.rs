//! Containment of root jobs, userspace side: the struct layout the kernel
//! programs need (read from the running kernel's BTF, a hand-rolled
//! "CO-RE" for the few fields the cgroup guard reads), and the fallback
//! where the kernel has no BPF LSM: the `Guard` that stops jobs the kernel
//! guard caught, detects processes leaving a watched cgroup and repairs
//! tampered links, and the `Quarantine` the proxy consults.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum ContainError {
    #[error("reading kernel BTF {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no field `{0}`")]
    NoField(String),
}

/// Byte offsets of the kernel struct fields the cgroup guard reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLayout {
    pub inode_i_sb: u64,
    pub inode_i_private: u64,
    pub sb_s_magic: u64,
    pub kn_parent: u64,
    pub kn_id: u64,
    /// `task_struct.thread_info.status` (x86: TS_COMPAT there marks a
    /// syscall made through the 32-bit entry), where the kernel has it.
    pub task_ti_status: Option<u64>,
    /// `task_struct.group_leader` and `.start_boottime`: the node's own
    /// process is told by pid *and* start time.
    pub task_start: Option<(u64, u64)>,
}

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

impl KernelLayout {
    pub fn from_sys_fs() -> Result<Self, ContainError> {
        let path = Path::new(VMLINUX_BTF);
        let data = std::fs::read(path).map_err(|source| ContainError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_btf(&data)
    }

    pub fn from_btf(data: &[u8]) -> Result<Self, ContainError> {
        let btf = Btf::parse(data)?;
        let off = |st: &str, fields: &[&str]| -> Result<u64, ContainError> {
            fields
                .iter()
                .find_map(|f| btf.member_offset(st, f))
                .ok_or_else(|| ContainError::NoField(format!("{st}.{}", fields.join("|"))))
        };
        Ok(Self {
            inode_i_sb: off("inode", &["i_sb"])?,
            inode_i_private: off("inode", &["i_private"])?,
            sb_s_magic: off("super_block", &["s_magic"])?,
            // Renamed `__parent` in 6.15 (RCU-protected).
            kn_parent: off("kernfs_node", &["__parent", "parent"])?,
            kn_id: off("kernfs_node", &["id"])?,
            task_ti_status: btf
                .member_offset("task_struct", "thread_info")
                .zip(btf.member_offset("thread_info", "status"))
                .map(|(a, b)| a + b),
            task_start: btf.member_offset("task_struct", "group_leader").zip(
                btf.member_offset("task_struct", "start_boottime")
                    .or_else(|| btf.member_offset("task_struct", "real_start_time")),
            ),
        })
    }
}

/// The BTF type id of kernel function `name` (e.g. `bpf_lsm_socket_create`,
/// what an LSM program's `attach_btf_id` names).
pub fn vmlinux_func_id(name: &str) -> Result<u32, ContainError> {
    let path = Path::new(VMLINUX_BTF);
    let data = std::fs::read(path).map_err(|source| ContainError::Read {
        path: path.to_owned(),
        source,
    })?;
    let btf = Btf::parse(&data)?;
    btf.types
        .iter()
        .position(|t| t.kind == KIND_FUNC && btf.name(t.name) == name.as_bytes())
        .map(|i| i as u32)
        .ok_or_else(|| ContainError::NoField(name.to_owned()))
}

const KIND_FUNC: u32 = 12;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

struct Member {
    name: u32,
    ty: u32,
    /// Bit offset within the struct.
    bits: u32,
}

struct Type {
    kind: u32,
    name: u32,
    /// Referenced type (typedef, const...).
    ty: u32,
    members: Vec<Member>,
}

/// The part of the BTF format needed to find struct member offsets.
struct Btf<'a> {
    strings: &'a [u8],
    /// Index = type id (0 = void).
    types: Vec<Type>,
    by_name: HashMap<&'a [u8], Vec<u32>>,
}

fn u32_at(d: &[u8], at: usize) -> Result<u32, ContainError> {
    d.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(ContainError::Malformed("truncated"))
}

impl<'a> Btf<'a> {
    fn parse(d: &'a [u8]) -> Result<Self, ContainError> {
        if d.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err(ContainError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(d, 4)? as usize;
        let type_off = u32_at(d, 8)? as usize;
        let type_len = u32_at(d, 12)? as usize;
        let str_off = u32_at(d, 16)? as usize;
        let str_len = u32_at(d, 20)? as usize;
        let types_data = d
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(ContainError::Malformed("type section out of bounds"))?;
        let strings = d
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(ContainError::Malformed("string section out of bounds"))?;
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            ty: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < types_data.len() {
            let name = u32_at(types_data, at)?;
            let info = u32_at(types_data, at + 4)?;
            let ty = u32_at(types_data, at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,          // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let raw = u32_at(types_data, m + 8)?;
                        members.push(Member {
                            name: u32_at(types_data, m)?,
                            ty: u32_at(types_data, m + 4)?,
                            bits: if kind_flag { raw & 0x00ff_ffff } else { raw },
                        });
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,   // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12, // DATASEC, ENUM64
                _ => 0,
            };
            at += extra;
            types.push(Type {
                kind,
                name,
                ty,
                members,
            });
        }
        let mut btf = Btf {
            strings,
            types,
            by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name != 0 {
                let n = btf.name(t.name);
                btf.by_name.entry(n).or_default().push(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &'a [u8] {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
        &s[..end]
    }

    /// Byte offset of `field` in `struct st`, looking into anonymous
    /// structs and unions.
    fn member_offset(&self, st: &str, field: &str) -> Option<u64> {
        self.by_name
            .get(st.as_bytes())?
            .iter()
            .find_map(|id| self.find(*id, field.as_bytes(), 0))
            .map(|bits| bits / 8)
    }

    fn find(&self, id: u32, field: &[u8], depth: u32) -> Option<u64> {
        if depth > 8 {
            return None;
        }
        let t = self.types.get(id as usize)?;
        for m in &t.members {
            if m.name != 0 {
                if self.name(m.name) == field {
                    return Some(u64::from(m.bits));
                }
                continue;
            }
            let inner = self.resolve(m.ty);
            if let Some(o) = self.find(inner, field, depth + 1) {
                return Some(o + u64::from(m.bits));
            }
        }
        None
    }

    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.ty
                }
                _ => break,
            }
        }
        id
    }
}

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

/// Field 22 of /proc/PID/stat (after the parenthesised comm).
/// Field 22 of /proc/PID/stat: the start time, clock ticks after boot.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_kernel_layout_is_found() {
        // Every supported host has BTF (the LSM programs need it too).
        let l = KernelLayout::from_sys_fs().expect("kernel BTF");
        assert!(
            l.inode_i_sb > 0 && l.inode_i_private > l.inode_i_sb,
            "{l:?}"
        );
        assert!(l.kn_id > l.kn_parent, "{l:?}");
        // What tells the node's own process from one that got its pid.
        assert!(l.task_start.is_some(), "{l:?}");
        assert!(start_time(std::process::id()).is_some_and(|t| t > 0));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(KernelLayout::from_btf(b"").is_err());
        assert!(KernelLayout::from_btf(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 255, 255]).is_err());
        let mut hdr = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        hdr.extend_from_slice(&[0, 0, 0, 0, 12, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0]);
        hdr.extend_from_slice(&[1, 0, 0, 0, 5, 0, 0, 4]);
        assert!(KernelLayout::from_btf(&hdr).is_err());
    }
}
