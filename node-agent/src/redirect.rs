//! The kernel side, seen from userspace: loads the eBPF programs built from
//! `node-ebpf`, attaches them to the watched cgroups, keeps the target set
//! in the kernel maps, and answers "where did this accepted connection mean
//! to go, and who opened it?".
use std::{
    collections::BTreeSet,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, SockOps,
    },
    Ebpf,
};
use ipnet::IpNet;
use sluice_common::{
    ClientKey, Origin, ProxyConfig, TargetKeyV4, TargetKeyV6, TargetValue, AF_INET, AF_INET6,
};

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

/// Removes the pinned links of these cgroups: interception stops. For
/// uninstalling, or `watch.fail_closed: false` at shutdown.
pub fn detach(cgroups: &[PathBuf]) -> Result<usize, RedirectError> {
    let mut n = 0;
    for c in cgroups {
        let dir = pin_dir(c);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
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
        let _ = std::fs::remove_dir(&dir);
    }
    Ok(n)
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
    _ebpf: Ebpf,
    /// Links pinned in bpffs: they outlive the process, so a node that
    /// dies leaves jobs redirected to a closed port (fail closed) instead
    /// of unwatched. `detach` removes them.
    _links: Vec<PinnedLink>,
    targets_v4: Mutex<LpmTrie<MapData, TargetKeyV4, TargetValue>>,
    targets_v6: Mutex<LpmTrie<MapData, TargetKeyV6, TargetValue>>,
    addrs_v4: Mutex<LpmTrie<MapData, [u8; 4], TargetValue>>,
    addrs_v6: Mutex<LpmTrie<MapData, [u8; 16], TargetValue>>,
    origins: HashMap<MapData, ClientKey, Origin>,
    stats: PerCpuArray<MapData, u64>,
    installed: Mutex<BTreeSet<TargetEntry>>,
    pub cgroups: Vec<PathBuf>,
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
    /// Loads the programs, configures the proxy address and attaches to
    /// every watched cgroup. Targets are installed separately (`sync`).
    pub fn load(
        cgroups: &[PathBuf],
        proxy_v4: Ipv4Addr,
        proxy_v6: Ipv6Addr,
        port: u16,
    ) -> Result<Self, RedirectError> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
        let netns_cookie = own_netns_cookie().map_err(RedirectError::NetnsCookie)?;

        let mut proxy: Array<MapData, ProxyConfig> = take(&mut ebpf, "PROXY")?;
        let cfg = ProxyConfig {
            addr4: proxy_v4.octets(),
            addr6: proxy_v6.octets(),
            port: port.to_be_bytes(),
            enabled: 1,
            _pad: 0,
            netns_cookie,
        };
        proxy.set(0, cfg, 0).map_err(|source| RedirectError::Map {
            name: "PROXY".into(),
            source,
        })?;

        let files = cgroups
            .iter()
            .map(|p| {
                File::open(p).map_err(|source| RedirectError::Cgroup {
                    path: p.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        ensure_bpffs()?;
        let pin_dirs = cgroups
            .iter()
            .map(|c| {
                let d = pin_dir(c);
                std::fs::create_dir_all(&d)
                    .map_err(|e| RedirectError::Pin(format!("{}: {e}", d.display())))?;
                Ok(d)
            })
            .collect::<Result<Vec<_>, RedirectError>>()?;
        let mut fresh: Vec<(PinnedLink, PathBuf)> = Vec::new();
        let prog_err = |name: &str| {
            let name = name.to_owned();
            move |source| RedirectError::Program { name, source }
        };
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| RedirectError::Missing((*name).into()))?
                .try_into()
                .map_err(prog_err(name))?;
            prog.load().map_err(prog_err(name))?;
            for (f, dir) in files.iter().zip(&pin_dirs) {
                // bpf_link attachments always coexist with other programs on the
                // cgroup (systemd's, another Sluice instance); the mode must be 0.
                let id = prog
                    .attach(f, CgroupAttachMode::Single)
                    .map_err(prog_err(name))?;
                let link = prog.take_link(id).map_err(prog_err(name))?;
                let fd = FdLink::try_from(link)
                    .map_err(|e| RedirectError::Pin(format!("{name}: {e}")))?;
                fresh.push(pin_new(fd, dir, name)?);
            }
        }
        let name = "sluice_sockops";
        let prog: &mut SockOps = ebpf
            .program_mut(name)
            .ok_or_else(|| RedirectError::Missing(name.into()))?
            .try_into()
            .map_err(prog_err(name))?;
        prog.load().map_err(prog_err(name))?;
        for (f, dir) in files.iter().zip(&pin_dirs) {
            let id = prog
                .attach(f, CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            let link = prog.take_link(id).map_err(prog_err(name))?;
            let fd =
                FdLink::try_from(link).map_err(|e| RedirectError::Pin(format!("{name}: {e}")))?;
            fresh.push(pin_new(fd, dir, name)?);
        }
        // All new links are attached: now retire the previous instance's
        // (its programs redirect to a proxy that is gone) and take their
        // place in bpffs.
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

        Ok(Self {
            _links: links,
            targets_v4: Mutex::new(take(&mut ebpf, "TARGETS_V4")?),
            targets_v6: Mutex::new(take(&mut ebpf, "TARGETS_V6")?),
            addrs_v4: Mutex::new(take(&mut ebpf, "TARGET_ADDRS_V4")?),
            addrs_v6: Mutex::new(take(&mut ebpf, "TARGET_ADDRS_V6")?),
            origins: take(&mut ebpf, "ORIGIN_BY_CLIENT")?,
            stats: take(&mut ebpf, "STATS")?,
            installed: Mutex::new(BTreeSet::new()),
            cgroups: cgroups.to_vec(),
            _ebpf: ebpf,
        })
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
                    a.insert(&akey, value, 0)
                        .map_err(map_err("TARGET_ADDRS_V4"))?;
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
                    a.insert(&akey, value, 0)
                        .map_err(map_err("TARGET_ADDRS_V6"))?;
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
        let origin = self.origins.get(&key, 0).ok()?;
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
