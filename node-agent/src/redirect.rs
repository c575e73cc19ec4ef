//! The kernel side, seen from userspace: loads the eBPF programs built from
//! `node-ebpf`, attaches them to the watched cgroups, keeps the target set
//! in the kernel maps, and answers "where did this accepted connection mean
//! to go, and who opened it?".
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSock, CgroupSockAddr, Lsm, RawTracePoint, SockOps,
    },
    Btf, Ebpf, EbpfLoader,
};
use ipnet::IpNet;
use sluice_common::{
    ClientKey, Origin, ProxyConfig, TargetKeyV4, TargetKeyV6, TargetValue, AF_INET, AF_INET6,
};
use tracing::{error, info, warn};

use crate::addr::{ClientAddr, OrigDstAddr};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf"));

const SOCK_ADDR_PROGRAMS: &[&str] = &[
    "sluice_connect4",
    "sluice_connect6",
    "sluice_sendmsg4",
    "sluice_sendmsg6",
    "sluice_getpeername4",
    "sluice_getpeername6",
];

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(
        "loading the eBPF programs failed (needs root: CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON): {0}"
    )]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program `{name}`: {source}")]
    Program {
        name: String,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map `{name}`: {source}")]
    Map {
        name: String,
        source: aya::maps::MapError,
    },
    #[error("eBPF object has no map or program `{0}`")]
    Missing(String),
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup2 file system is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("reading the network namespace cookie: {0}")]
    NetnsCookie(std::io::Error),
    #[error("pinning links in bpffs (/sys/fs/bpf): {0}")]
    Pin(String),
}

/// Cgroup programs, attached to every watched cgroup.
const SOCK_PROGRAM: &str = "sluice_sock_create";
const SOCKOPS_PROGRAM: &str = "sluice_sockops";

/// BPF LSM programs (global; they act on tasks under a watched cgroup):
/// (program, hook).
const LSM_PROGRAMS: &[(&str, &str)] = &[
    ("sluice_lsm_socket_create", "socket_create"),
    ("sluice_lsm_inode_permission", "inode_permission"),
    ("sluice_lsm_bpf", "bpf"),
];

/// What the kernel enforces against a root job beyond the redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Containment {
    /// The BPF LSM programs are attached: packet sockets, leaving the
    /// watched subtree and bpf() are refused.
    Lsm,
    /// The kernel refused the LSM programs (no BPF LSM): raw IP sockets are
    /// still refused by `cgroup/sock_create`, moves out of a watched cgroup
    /// are only detected (see `contain::EscapeDetector`).
    Degraded(String),
}

const BPFFS: &str = "/sys/fs/bpf";

/// Where a watched cgroup's links are pinned.
pub fn pin_dir(cgroup: &Path) -> PathBuf {
    use sha2::Digest;
    let h = sha2::Sha256::digest(cgroup.as_os_str().as_encoded_bytes());
    PathBuf::from(BPFFS)
        .join("sluice")
        .join(hex::encode(&h[..8]))
}

fn ensure_bpffs() -> Result<(), RedirectError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some(BPFFS) && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).map_err(|e| RedirectError::Pin(e.to_string()))?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| RedirectError::Pin(format!("mounting bpffs: {e}")))
}

fn pin_new(fd: FdLink, dir: &Path, name: &str) -> Result<(PinnedLink, PathBuf), RedirectError> {
    let final_path = dir.join(name);
    // bpffs refuses names with a dot.
    let tmp = dir.join(format!("{name}_new"));
    let _ = std::fs::remove_file(&tmp);
    let pinned = fd
        .pin(&tmp)
        .map_err(|e| RedirectError::Pin(format!("{}: {e}", tmp.display())))?;
    Ok((pinned, final_path))
}

/// Where a node's global (LSM) links are pinned: named after its
/// configured cgroups and patterns, so `sluice detach --config` finds them.
pub fn node_pin_dir(configured: &[PathBuf], patterns: &[String]) -> PathBuf {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for c in configured {
        h.update(c.as_os_str().as_encoded_bytes());
        h.update([0]);
    }
    for p in patterns {
        h.update([1]);
        h.update(p.as_bytes());
    }
    PathBuf::from(BPFFS)
        .join("sluice")
        .join(format!("node-{}", hex::encode(&h.finalize()[..8])))
}

/// Removes the pinned links of these cgroups and of the node configured
/// with `configured`: interception and containment stop. For uninstalling,
/// or `watch.fail_closed: false` at shutdown.
pub fn detach(node_dir: &Path, cgroups: &[PathBuf]) -> Result<usize, RedirectError> {
    let mut n = 0;
    let dirs = cgroups
        .iter()
        .map(|c| pin_dir(c))
        .chain(std::iter::once(node_dir.to_owned()));
    for dir in dirs {
        n += unpin_dir(&dir);
    }
    Ok(n)
}

/// Unpins every link in `dir` (by its final name: a `PinnedLink` made by
/// `pin_new` still holds the temporary name) and removes the directory.
fn unpin_dir(dir: &Path) -> usize {
    let mut n = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        if let Ok(link) = PinnedLink::from_pin(e.path()) {
            if link.unpin().is_ok() {
                n += 1;
            }
        } else {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
    n
}

/// The redirect on the root cgroup (`watch.host`): every process of the
/// host but the node's own and the exempt subtrees.
#[derive(Clone, Debug)]
pub struct HostAttach {
    /// The cgroup2 mount (the root cgroup).
    pub root: PathBuf,
    /// Exempt subtrees (absolute).
    pub exempt: Vec<PathBuf>,
}

/// The root cgroup's links are pinned in the node's directory under these
/// names (`host_` + program).
const HOST_PREFIX: &str = "host_";

/// Attaches the redirect programs (the sock_addr hooks and sockops, not
/// the job-only raw-socket refusal) to one cgroup file, pinned in `dir`
/// as `prefix` + program name (not yet renamed into place).
fn attach_redirect(
    ebpf: &mut Ebpf,
    f: &File,
    dir: &Path,
    prefix: &str,
) -> Result<Vec<(PinnedLink, PathBuf)>, RedirectError> {
    let mut fresh = Vec::new();
    // bpf_link attachments always coexist with other programs on the
    // cgroup (systemd's, another Sluice instance); the mode must be 0.
    for name in SOCK_ADDR_PROGRAMS {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        let id = prog
            .attach(f, CgroupAttachMode::Single)
            .map_err(prog_err(name))?;
        let link = prog.take_link(id).map_err(prog_err(name))?;
        fresh.push(pin_new(
            to_fd(link, name)?,
            dir,
            &format!("{prefix}{name}"),
        )?);
    }
    let prog: &mut SockOps = program(ebpf, SOCKOPS_PROGRAM)?;
    let id = prog
        .attach(f, CgroupAttachMode::Single)
        .map_err(prog_err(SOCKOPS_PROGRAM))?;
    let link = prog.take_link(id).map_err(prog_err(SOCKOPS_PROGRAM))?;
    fresh.push(pin_new(
        to_fd(link, SOCKOPS_PROGRAM)?,
        dir,
        &format!("{prefix}{SOCKOPS_PROGRAM}"),
    )?);
    Ok(fresh)
}

fn redirect_programs() -> impl Iterator<Item = &'static str> {
    SOCK_ADDR_PROGRAMS.iter().copied().chain([SOCKOPS_PROGRAM])
}

/// This process's start time, clock ticks after boot (`/proc/self/stat`
/// field 22), when USER_HZ is the 100 the kernel programs divide by.
fn own_start_ticks() -> Option<u64> {
    if nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()?? != 100 {
        return None;
    }
    crate::btf::start_time(std::process::id())
}

/// One entry of the kernel's target set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetEntry {
    pub net: IpNet,
    /// 0 = every port.
    pub port: u16,
    pub target_id: u32,
}

pub struct Redirector {
    /// The loaded programs, kept to attach cgroups that appear later.
    ebpf: Mutex<Ebpf>,
    /// Links pinned in bpffs, by cgroup: they outlive the process, so a
    /// node that dies leaves jobs redirected to a closed port (fail closed)
    /// instead of unwatched. `detach` removes them.
    links: Mutex<BTreeMap<PathBuf, Vec<PinnedLink>>>,
    _lsm_links: Vec<PinnedLink>,
    /// The redirect on the root cgroup (`watch.host`), and where its
    /// links are pinned (the node's directory).
    host: Option<HostAttach>,
    _exempt: HashMap<MapData, u64, u32>,
    host_links: Mutex<Vec<PinnedLink>>,
    node_dir: PathBuf,
    _packet_links: Vec<PinnedLink>,
    watched: Mutex<HashMap<MapData, u64, u32>>,
    pub containment: Containment,
    /// Processes seen leaving a watched cgroup (fallback detection).
    pub escapes_detected: std::sync::atomic::AtomicU64,
    /// Jobs stopped for tampering (bpf(), shared fd tables, links found
    /// detached): see `contain::Guard`.
    pub jobs_stopped: std::sync::atomic::AtomicU64,
    /// Cgroup links found detached or unpinned and attached again.
    pub links_restored: std::sync::atomic::AtomicU64,
    /// Times target entries or the proxy address were found changed in
    /// the kernel's maps and put back.
    pub maps_restored: std::sync::atomic::AtomicU64,
    /// What the kernel fallback did (`ContainEvent`s), taken by the guard.
    events: Mutex<Option<RingBuf<MapData>>>,
    targets_v4: Mutex<LpmTrie<MapData, TargetKeyV4, TargetValue>>,
    targets_v6: Mutex<LpmTrie<MapData, TargetKeyV6, TargetValue>>,
    addrs_v4: Mutex<LpmTrie<MapData, [u8; 4], TargetValue>>,
    addrs_v6: Mutex<LpmTrie<MapData, [u8; 16], TargetValue>>,
    /// Taken once: the entry is removed when the proxy reads it.
    origins: Mutex<HashMap<MapData, ClientKey, Origin>>,
    /// The proxy's address as the kernel programs read it, and what it
    /// must say (checked with the target entries: `restore_targets`).
    proxy: Mutex<Array<MapData, ProxyConfig>>,
    proxy_config: ProxyConfig,
    stats: PerCpuArray<MapData, u64>,
    installed: Mutex<BTreeSet<TargetEntry>>,
}

fn prog_err(name: &str) -> impl FnOnce(aya::programs::ProgramError) -> RedirectError {
    let name = name.to_owned();
    move |source| RedirectError::Program { name, source }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, RedirectError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| RedirectError::Missing(name.into()))?
        .try_into()
        .map_err(prog_err(name))
}

fn to_fd<L>(link: L, name: &str) -> Result<FdLink, RedirectError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    FdLink::try_from(link).map_err(|e| RedirectError::Pin(format!("{name}: {e}")))
}

/// Replaces the previous instance's pins (if any) by the fresh links.
fn retire_and_rename(fresh: Vec<(PinnedLink, PathBuf)>) -> Result<Vec<PinnedLink>, RedirectError> {
    let mut links = Vec::with_capacity(fresh.len());
    for (pinned, final_path) in fresh {
        if let Ok(old) = PinnedLink::from_pin(&final_path) {
            let _ = old.unpin();
        }
        let tmp = final_path.with_file_name(format!(
            "{}_new",
            final_path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
        ));
        std::fs::rename(&tmp, &final_path)
            .map_err(|e| RedirectError::Pin(format!("{}: {e}", final_path.display())))?;
        links.push(pinned);
    }
    Ok(links)
}

/// The raw tracepoint that kills a watched task creating a packet or XDP
/// socket (the fallback that needs no BPF LSM), pinned in `dir`.
const PACKET_GUARD: &str = "sluice_sys_enter";

fn attach_packet_guard(ebpf: &mut Ebpf, dir: &Path) -> Result<Vec<PinnedLink>, RedirectError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| RedirectError::Pin(format!("{}: {e}", dir.display())))?;
    let prog: &mut RawTracePoint = program(ebpf, PACKET_GUARD)?;
    prog.load().map_err(prog_err(PACKET_GUARD))?;
    let id = prog.attach("sys_enter").map_err(prog_err(PACKET_GUARD))?;
    let link = prog.take_link(id).map_err(prog_err(PACKET_GUARD))?;
    retire_and_rename(vec![pin_new(
        to_fd(link, PACKET_GUARD)?,
        dir,
        PACKET_GUARD,
    )?])
}

/// Loads and attaches the BPF LSM programs, pinned in `dir`. An error means
/// this kernel has no usable BPF LSM (or no BTF).
fn attach_lsm(ebpf: &mut Ebpf, dir: &Path) -> Result<Vec<PinnedLink>, RedirectError> {
    let btf = Btf::from_sys_fs().map_err(|e| RedirectError::Pin(format!("kernel BTF: {e}")))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| RedirectError::Pin(format!("{}: {e}", dir.display())))?;
    let mut fresh = Vec::new();
    for (name, hook) in LSM_PROGRAMS {
        let prog: &mut Lsm = program(ebpf, name)?;
        prog.load(hook, &btf).map_err(prog_err(name))?;
        let id = prog.attach().map_err(prog_err(name))?;
        let link = prog.take_link(id).map_err(prog_err(name))?;
        fresh.push(pin_new(to_fd(link, name)?, dir, name)?);
    }
    let links = retire_and_rename(fresh)?;
    info!(hooks = ?LSM_PROGRAMS.iter().map(|(_, h)| *h).collect::<Vec<_>>(), "BPF LSM containment attached");
    Ok(links)
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T, RedirectError> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| RedirectError::Missing(name.into()))?;
    T::try_from(map).map_err(|source| RedirectError::Map {
        name: name.into(),
        source,
    })
}

impl Redirector {
    /// Loads the programs, configures the proxy address, attaches to
    /// every watched cgroup and (where the kernel has the BPF LSM) the
    /// containment hooks. Targets are installed separately (`sync`).
    /// `node_dir` (see `node_pin_dir`) holds the global links; `lsm: false`
    /// leaves the LSM programs out (containment by detection only).
    pub fn load(
        cgroups: &[PathBuf],
        node_dir: &Path,
        lsm: bool,
        proxy_v4: Ipv4Addr,
        proxy_v6: Ipv6Addr,
        port: u16,
        host: Option<HostAttach>,
    ) -> Result<Self, RedirectError> {
        let layout = crate::btf::KernelLayout::from_sys_fs();
        let mut loader = EbpfLoader::new();
        match &layout {
            Ok(l) => {
                loader
                    .override_global("GUARD_ENABLED", &1u32, true)
                    .override_global("OFF_INODE_I_SB", &l.inode_i_sb, true)
                    .override_global("OFF_INODE_I_PRIVATE", &l.inode_i_private, true)
                    .override_global("OFF_SB_S_MAGIC", &l.sb_s_magic, true)
                    .override_global("OFF_KN_PARENT", &l.kn_parent, true)
                    .override_global("OFF_KN_ID", &l.kn_id, true);
                if let Some((leader, start)) = &l.task_start {
                    loader
                        .override_global("OFF_TASK_GROUP_LEADER", leader, true)
                        .override_global("OFF_TASK_START_BOOTTIME", start, true);
                }
                match &l.task_ti_status {
                    Some(off) => {
                        loader.override_global("OFF_TASK_TI_STATUS", off, true);
                    }
                    None => {
                        warn!("kernel has no thread_info.status: syscalls through the 32-bit entry are judged by their i386-only numbers")
                    }
                }
            }
            Err(e) => {
                error!(error = %e, "kernel struct layout unknown: a job leaving its watched cgroup will not be refused")
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let netns_cookie = own_netns_cookie().map_err(RedirectError::NetnsCookie)?;

        let mut proxy: Array<MapData, ProxyConfig> = take(&mut ebpf, "PROXY")?;
        let cfg = ProxyConfig {
            addr4: proxy_v4.octets(),
            addr6: proxy_v6.octets(),
            port: port.to_be_bytes(),
            enabled: 1,
            has_exempt: u8::from(host.as_ref().is_some_and(|h| !h.exempt.is_empty())),
            netns_cookie,
            node_tgid: std::process::id(),
            _pad2: 0,
            node_start: match &layout {
                Ok(l) if l.task_start.is_some() => own_start_ticks().unwrap_or(0),
                _ => 0,
            },
        };
        // Held for the node's life: the programs loaded below refer to it.
        let mut exempt: HashMap<MapData, u64, u32> = take(&mut ebpf, "EXEMPT")?;
        if let Some(h) = &host {
            for dir in &h.exempt {
                let id = std::fs::metadata(dir)
                    .map_err(|source| RedirectError::Cgroup {
                        path: dir.clone(),
                        source,
                    })?
                    .ino();
                exempt
                    .insert(id, 1, 0)
                    .map_err(|source| RedirectError::Map {
                        name: "EXEMPT".into(),
                        source,
                    })?;
            }
        }
        proxy.set(0, cfg, 0).map_err(|source| RedirectError::Map {
            name: "PROXY".into(),
            source,
        })?;

        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
        }
        let prog: &mut SockOps = program(&mut ebpf, SOCKOPS_PROGRAM)?;
        prog.load().map_err(prog_err(SOCKOPS_PROGRAM))?;
        let prog: &mut CgroupSock = program(&mut ebpf, SOCK_PROGRAM)?;
        prog.load().map_err(prog_err(SOCK_PROGRAM))?;

        ensure_bpffs()?;
        let watched: HashMap<MapData, u64, u32> = take(&mut ebpf, "WATCHED")?;
        let attached = if lsm {
            attach_lsm(&mut ebpf, node_dir)
        } else {
            Err(RedirectError::Pin(
                "switched off (`watch.bpf_lsm: false`)".into(),
            ))
        };
        let (containment, lsm_links) = match attached {
            Ok(links) => (Containment::Lsm, links),
            Err(e) => {
                let e = match (&layout, e) {
                    (Err(l), e) => format!("{e}; {l}"),
                    (Ok(_), e) => e.to_string(),
                };
                error!(error = %e, "BPF LSM programs not attached: raw IP sockets are still refused, but packet sockets and bpf() are not, and a job leaving its watched cgroup is only detected, not prevented");
                (Containment::Degraded(e), Vec::new())
            }
        };
        // Without the LSM, packet sockets are answered by killing the task
        // (a syscall-entry hook; with the LSM they are refused outright).
        let packet_links = if matches!(containment, Containment::Lsm) {
            Vec::new()
        } else {
            match attach_packet_guard(&mut ebpf, node_dir) {
                Ok(l) => {
                    info!("packet-socket guard attached: a watched task creating one is killed");
                    l
                }
                Err(e) => {
                    error!(error = %e, "packet-socket guard not attached");
                    Vec::new()
                }
            }
        };
        let containment = match (containment, &layout) {
            // Attached, but the cgroup guard is off without the layout.
            (Containment::Lsm, Err(e)) => Containment::Degraded(format!("cgroup guard off: {e}")),
            (c, _) => c,
        };

        let me = Self {
            links: Mutex::new(BTreeMap::new()),
            _lsm_links: lsm_links,
            host,
            _exempt: exempt,
            host_links: Mutex::new(Vec::new()),
            node_dir: node_dir.to_owned(),
            _packet_links: packet_links,
            watched: Mutex::new(watched),
            containment,
            escapes_detected: Default::default(),
            jobs_stopped: Default::default(),
            links_restored: Default::default(),
            maps_restored: Default::default(),
            events: Mutex::new(take(&mut ebpf, "CONTAIN_EVENTS").ok()),
            targets_v4: Mutex::new(take(&mut ebpf, "TARGETS_V4")?),
            targets_v6: Mutex::new(take(&mut ebpf, "TARGETS_V6")?),
            addrs_v4: Mutex::new(take(&mut ebpf, "TARGET_ADDRS_V4")?),
            addrs_v6: Mutex::new(take(&mut ebpf, "TARGET_ADDRS_V6")?),
            origins: Mutex::new(take(&mut ebpf, "ORIGIN_BY_CLIENT")?),
            proxy: Mutex::new(proxy),
            proxy_config: cfg,
            stats: take(&mut ebpf, "STATS")?,
            installed: Mutex::new(BTreeSet::new()),
            ebpf: Mutex::new(ebpf),
        };
        for c in cgroups {
            me.attach_cgroup(c)?;
        }
        if me.host.is_some() {
            me.attach_host()?;
        }
        Ok(me)
    }

    /// Attaches (again) the redirect to the root cgroup, pinned in the
    /// node's directory in place of what was there.
    fn attach_host(&self) -> Result<(), RedirectError> {
        let Some(h) = &self.host else {
            return Ok(());
        };
        let f = File::open(&h.root).map_err(|source| RedirectError::Cgroup {
            path: h.root.clone(),
            source,
        })?;
        std::fs::create_dir_all(&self.node_dir)
            .map_err(|e| RedirectError::Pin(format!("{}: {e}", self.node_dir.display())))?;
        let fresh = {
            let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
            attach_redirect(&mut ebpf, &f, &self.node_dir, HOST_PREFIX)?
        };
        let links = retire_and_rename(fresh)?;
        *self.host_links.lock().unwrap_or_else(|e| e.into_inner()) = links;
        info!(root = %h.root.display(), exempt = ?h.exempt, "redirect attached to the root cgroup: every process of the host");
        Ok(())
    }

    /// Attaches the cgroup programs to `cgroup` (pinned; a previous
    /// node's pins are retired once ours are in place) and marks it
    /// watched for the LSM programs. Attaching twice is a no-op.
    pub fn attach_cgroup(&self, cgroup: &Path) -> Result<(), RedirectError> {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if links.contains_key(cgroup) {
            return Ok(());
        }
        let fresh = self.attach_fresh(cgroup)?;
        links.insert(cgroup.to_owned(), fresh);
        Ok(())
    }

    /// Attaches a new set of links to `cgroup` and pins them in place of
    /// whatever was pinned there (a previous node's, or a set found
    /// tampered with).
    fn attach_fresh(&self, cgroup: &Path) -> Result<Vec<PinnedLink>, RedirectError> {
        let cerr = |source| RedirectError::Cgroup {
            path: cgroup.to_owned(),
            source,
        };
        let f = File::open(cgroup).map_err(cerr)?;
        let id = f.metadata().map_err(cerr)?.ino();
        let dir = pin_dir(cgroup);
        std::fs::create_dir_all(&dir)
            .map_err(|e| RedirectError::Pin(format!("{}: {e}", dir.display())))?;
        // Watched for the LSM first: a job must not slip out while the
        // redirect is being attached.
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, 1, 0)
            .map_err(|source| RedirectError::Map {
                name: "WATCHED".into(),
                source,
            })?;
        let mut fresh: Vec<(PinnedLink, PathBuf)>;
        {
            let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
            fresh = attach_redirect(&mut ebpf, &f, &dir, "")?;
            let prog: &mut CgroupSock = program(&mut ebpf, SOCK_PROGRAM)?;
            let id = prog
                .attach(&f, CgroupAttachMode::Single)
                .map_err(prog_err(SOCK_PROGRAM))?;
            let link = prog.take_link(id).map_err(prog_err(SOCK_PROGRAM))?;
            fresh.push(pin_new(to_fd(link, SOCK_PROGRAM)?, &dir, SOCK_PROGRAM)?);
        }
        // All new links are attached: now retire the previous pins (a
        // previous instance's programs redirect to a proxy that is gone)
        // and take their place in bpffs.
        retire_and_rename(fresh)
    }

    /// A watched cgroup went away: unpin its links and forget its id.
    pub fn forget_cgroup(&self, cgroup: &Path, id: Option<u64>) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if links.remove(cgroup).is_some() {
            unpin_dir(&pin_dir(cgroup));
        }
        if let Some(id) = id {
            let _ = self
                .watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }

    /// The kernel fallback's event ring (once; for `contain::Guard`).
    pub fn take_events(&self) -> Option<RingBuf<MapData>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Checks that every watched cgroup still has all of its links
    /// attached and pinned, and is still in the WATCHED map; what is not
    /// (a root job detached a link, removed a pin, deleted a map entry) is
    /// attached again. Returns the cgroups repaired, with what was wrong.
    pub fn restore_links(&self) -> Vec<(PathBuf, Vec<String>)> {
        let mut broken = Vec::new();
        if let Some(h) = &self.host {
            let mut wrong: Vec<String> = redirect_programs()
                .filter(|name| !link_attached(&self.node_dir.join(format!("{HOST_PREFIX}{name}"))))
                .map(|name| format!("root cgroup link {name} detached or unpinned"))
                .collect();
            if !wrong.is_empty() {
                match self.attach_host() {
                    Ok(()) => {
                        self.links_restored
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => wrong.push(format!("re-attaching failed: {e}")),
                }
                broken.push((h.root.clone(), wrong));
            }
        }
        for cgroup in self.cgroups() {
            let dir = pin_dir(&cgroup);
            let mut wrong: Vec<String> = cgroup_programs()
                .filter(|name| !link_attached(&dir.join(name)))
                .map(|name| format!("link {name} detached or unpinned"))
                .collect();
            if let Ok(m) = std::fs::metadata(&cgroup) {
                let watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
                if watched.get(&m.ino(), 0).is_err() {
                    wrong.push("missing from WATCHED".into());
                }
            }
            if wrong.is_empty() {
                continue;
            }
            // A fresh set first, then the old one goes (dropping a link we
            // still hold that was only unpinned detaches it): no window
            // without a redirect.
            match self.attach_fresh(&cgroup) {
                Ok(fresh) => {
                    self.links
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(cgroup.clone(), fresh);
                    self.links_restored
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => wrong.push(format!("re-attaching failed: {e}")),
            }
            broken.push((cgroup, wrong));
        }
        broken
    }

    /// Checks the kernel's copy of what the node installed: every target
    /// entry present with its target, and the proxy's address. What a
    /// root process deleted or changed (a target no longer redirected, or
    /// redirected as another target, the proxy switched off) is put back.
    /// Returns what was wrong.
    pub fn restore_targets(&self) -> Vec<String> {
        let mut wrong = Vec::new();
        {
            let mut proxy = self.proxy.lock().unwrap_or_else(|e| e.into_inner());
            if proxy.get(&0, 0).ok() != Some(self.proxy_config) {
                wrong.push("PROXY configuration changed".to_owned());
                if let Err(e) = proxy.set(0, self.proxy_config, 0) {
                    wrong.push(format!("restoring PROXY failed: {e}"));
                }
            }
        }
        let installed = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        // Entries sharing a kernel key: any of their targets is right.
        let ids_of = |net: &IpNet, port: u16| -> Vec<u32> {
            installed
                .iter()
                .filter(|o| o.net == *net && o.port == port)
                .map(|o| o.target_id)
                .collect()
        };
        for e in installed.iter() {
            let bits = u32::from(e.net.prefix_len());
            let port = e.port.to_be_bytes();
            let (entry, addr) = match e.net {
                IpNet::V4(n) => {
                    let addr = n.network().octets();
                    let t = self.targets_v4.lock().unwrap_or_else(|e| e.into_inner());
                    let a = self.addrs_v4.lock().unwrap_or_else(|e| e.into_inner());
                    (
                        t.get(&Key::new(16 + bits, TargetKeyV4 { port, addr }), 0)
                            .ok(),
                        bits == 0 || a.get(&Key::new(bits, addr), 0).is_ok(),
                    )
                }
                IpNet::V6(n) => {
                    let addr = n.network().octets();
                    let t = self.targets_v6.lock().unwrap_or_else(|e| e.into_inner());
                    let a = self.addrs_v6.lock().unwrap_or_else(|e| e.into_inner());
                    (
                        t.get(&Key::new(16 + bits, TargetKeyV6 { port, addr }), 0)
                            .ok(),
                        bits == 0 || a.get(&Key::new(bits, addr), 0).is_ok(),
                    )
                }
            };
            let right = entry.is_some_and(|v| ids_of(&e.net, e.port).contains(&v.target_id));
            if !right || !addr {
                wrong.push(format!(
                    "target entry {} port {} {}",
                    e.net,
                    e.port,
                    if entry.is_none() || !addr {
                        "deleted"
                    } else {
                        "changed"
                    }
                ));
            }
        }
        if wrong.iter().any(|w| w.starts_with("target entry")) {
            for e in installed.iter() {
                if let Err(err) = self.apply(e, true) {
                    wrong.push(format!("restoring {} failed: {err}", e.net));
                }
            }
        }
        wrong
    }

    /// Whether the redirect is on the root cgroup too (`watch.host`).
    pub fn host_scope(&self) -> bool {
        self.host.is_some()
    }

    /// The cgroups the programs are attached to now.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links.keys().cloned().collect()
    }

    /// Makes the kernel's target set equal to `wanted`: new entries are
    /// inserted before stale ones are removed, so a refresh never opens a
    /// window where a still-valid address is not intercepted.
    pub fn sync(&self, wanted: &BTreeSet<TargetEntry>) -> Result<(), RedirectError> {
        let mut installed = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        for e in wanted.difference(&installed.clone()) {
            self.apply(e, true)?;
            installed.insert(*e);
        }
        let stale: Vec<_> = installed.difference(wanted).copied().collect();
        for e in &stale {
            self.apply(e, false)?;
            installed.remove(e);
        }
        if !stale.is_empty() {
            // Entries can share a kernel key (same address, other port or
            // target): put back whatever a removal took with it.
            for e in wanted {
                self.apply(e, true)?;
            }
        }
        Ok(())
    }

    pub fn installed(&self) -> Vec<TargetEntry> {
        let installed = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        installed.iter().copied().collect()
    }

    /// The address-only tries refuse UDP to every port of a target
    /// address. An all-egress entry (`/0`) is left out of them (it would
    /// refuse all UDP, DNS included); the kernel refuses UDP to its
    /// (address, port) pairs instead, e.g. QUIC on :443.
    fn apply(&self, e: &TargetEntry, insert: bool) -> Result<(), RedirectError> {
        let value = TargetValue {
            target_id: e.target_id,
            flags: 0,
        };
        let port = e.port.to_be_bytes();
        let bits = u32::from(e.net.prefix_len());
        let map_err = |name: &str| {
            let name = name.to_owned();
            move |source| RedirectError::Map { name, source }
        };
        match e.net {
            IpNet::V4(n) => {
                let addr = n.network().octets();
                let key = Key::new(16 + bits, TargetKeyV4 { port, addr });
                let akey = Key::new(bits, addr);
                let mut t = self.targets_v4.lock().unwrap_or_else(|e| e.into_inner());
                let mut a = self.addrs_v4.lock().unwrap_or_else(|e| e.into_inner());
                if insert {
                    t.insert(&key, value, 0).map_err(map_err("TARGETS_V4"))?;
                    if bits > 0 {
                        a.insert(&akey, value, 0)
                            .map_err(map_err("TARGET_ADDRS_V4"))?;
                    }
                } else {
                    // Ignore "not found": another entry may share the key.
                    let _ = t.remove(&key);
                    let _ = a.remove(&akey);
                }
            }
            IpNet::V6(n) => {
                let addr = n.network().octets();
                let key = Key::new(16 + bits, TargetKeyV6 { port, addr });
                let akey = Key::new(bits, addr);
                let mut t = self.targets_v6.lock().unwrap_or_else(|e| e.into_inner());
                let mut a = self.addrs_v6.lock().unwrap_or_else(|e| e.into_inner());
                if insert {
                    t.insert(&key, value, 0).map_err(map_err("TARGETS_V6"))?;
                    if bits > 0 {
                        a.insert(&akey, value, 0)
                            .map_err(map_err("TARGET_ADDRS_V6"))?;
                    }
                } else {
                    let _ = t.remove(&key);
                    let _ = a.remove(&akey);
                }
            }
        }
        Ok(())
    }

    /// The origin of an accepted connection, keyed by its peer address.
    pub fn origin(&self, client: ClientAddr) -> Option<(OrigDstAddr, Origin)> {
        let peer = client.canonical();
        let mut key = ClientKey {
            addr: [0; 16],
            port: peer.port(),
            family: AF_INET,
            _pad: 0,
        };
        match peer.ip() {
            IpAddr::V4(v4) => key.addr[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => {
                key.addr = v6.octets();
                key.family = AF_INET6;
            }
        }
        // One connection, one origin: removed as it is read, so a later
        // connection from the same port (after this one closed, if the
        // close went unseen) can never be taken for this one.
        let origin = {
            let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
            let o = origins.get(&key, 0).ok()?;
            let _ = origins.remove(&key);
            o
        };
        let ip: IpAddr = if origin.family == AF_INET {
            let d = origin.dst_addr;
            Ipv4Addr::new(d[0], d[1], d[2], d[3]).into()
        } else {
            Ipv6Addr::from(origin.dst_addr).into()
        };
        Some((OrigDstAddr(SocketAddr::new(ip, origin.dst_port)), origin))
    }

    /// Kernel counters summed over CPUs, by `sluice_common::stat` index.
    pub fn kernel_stats(&self) -> Vec<u64> {
        (0..sluice_common::stat::COUNT)
            .map(|i| {
                self.stats
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// Names of the programs attached to each watched cgroup (and of their
/// pins in its `pin_dir`).
fn cgroup_programs() -> impl Iterator<Item = &'static str> {
    SOCK_ADDR_PROGRAMS
        .iter()
        .copied()
        .chain([SOCKOPS_PROGRAM, SOCK_PROGRAM])
}

/// Whether the link pinned at `pin` is still attached to its cgroup: the
/// kernel reports cgroup id 0 for a cgroup link that was detached
/// (BPF_LINK_DETACH). A missing or unreadable pin counts as detached.
/// Raw bpf(2): aya does not expose a cgroup link's cgroup.
fn link_attached(pin: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let Ok(path) = std::ffi::CString::new(pin.as_os_str().as_bytes()) else {
        return false;
    };
    // union bpf_attr, BPF_OBJ_GET: pathname (u64), bpf_fd, file_flags.
    let mut attr = [0u8; 128];
    attr[..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    // SAFETY: a zeroed bpf_attr-sized buffer whose pointer (the C string)
    // outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return false;
    }
    // SAFETY: the kernel just gave us this fd; OwnedFd closes it.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id (u32), then the union at
    // offset 16: cgroup { cgroup_id u64, attach_type u32 }.
    let mut info = [0u8; 32];
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: `info` outlives the call and its length is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_ptr(),
            attr.len(),
        )
    };
    let mut id = [0u8; 8];
    id.copy_from_slice(&info[16..24]);
    r == 0 && u64::from_ne_bytes(id) != 0
}

/// `SO_NETNS_COOKIE` of a fresh socket: the same value the kernel programs
/// get from `bpf_get_netns_cookie` for sockets in our namespace.
fn own_netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a u64 buffer of the advertised length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> Result<PathBuf, RedirectError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
        RedirectError::Cgroup {
            path: "/proc/self/mountinfo".into(),
            source,
        }
    })?;
    let mut found: Option<PathBuf> = None;
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        if let Some(mp) = pre.split_whitespace().nth(4) {
            let mp = PathBuf::from(mp);
            // Prefer the shortest mount point (the host's, not a nested one).
            if found
                .as_ref()
                .is_none_or(|f| mp.as_os_str().len() < f.as_os_str().len())
            {
                found = Some(mp);
            }
        }
    }
    found.ok_or(RedirectError::NoCgroup2)
}

/// A configured cgroup path made absolute under the cgroup2 mount.
pub fn cgroup_path(root: &Path, path: &Path) -> PathBuf {
    if path.starts_with(root) {
        path.to_owned()
    } else {
        root.join(path.strip_prefix("/").unwrap_or(path))
    }
}

/// Resolves a configured cgroup path (relative to the cgroup2 mount, or
/// absolute under it) and creates it when asked to.
pub fn watched_cgroup(root: &Path, path: &Path, create: bool) -> Result<PathBuf, RedirectError> {
    let full = cgroup_path(root, path);
    if create {
        std::fs::create_dir_all(&full).map_err(|source| RedirectError::Cgroup {
            path: full.clone(),
            source,
        })?;
    }
    if !full.is_dir() {
        return Err(RedirectError::Cgroup {
            path: full,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such cgroup (set `create: true` or start the runner service first)",
            ),
        });
    }
    Ok(full)
}
