//! `sluice doctor`: what a node needs and whether this host has it — the
//! kernel features the data path uses, the configuration, the watched
//! cgroups and targets, the node CA and how common runtimes will (or will
//! not) trust it, and the running node. Read-only: nothing is changed,
//! nothing is sent anywhere but DNS lookups of the configured target
//! names and the local control socket.
use std::{net::ToSocketAddrs, path::Path};

use serde::Serialize;

use crate::config::Config;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Works, with less protection or a step left to do.
    Warn,
    /// The node cannot do its job here.
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub level: Level,
    pub name: String,
    pub detail: String,
}

fn check(level: Level, name: &str, detail: impl Into<String>) -> Check {
    Check {
        level,
        name: name.into(),
        detail: detail.into(),
    }
}

/// Runs every check (the node's own status is added by the caller, which
/// owns the control socket client).
pub fn run(cfg: &Config, state_dir: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    kernel(&mut out);
    cgroups(cfg, &mut out);
    targets(cfg, &mut out);
    ca(state_dir, &mut out);
    fleet(cfg, state_dir, &mut out);
    out
}

/// NATS reachable (a TCP connection to the configured server), the spool
/// directory writable and how far it is behind.
fn fleet(cfg: &Config, state_dir: &Path, out: &mut Vec<Check>) {
    let Some(n) = &cfg.ship.nats else {
        out.push(check(
            Level::Ok,
            "NATS",
            "evidence shipping not configured (ship.nats)",
        ));
        return;
    };
    let hostport = n
        .url
        .split(',')
        .next()
        .unwrap_or_default()
        .trim_start_matches("nats://")
        .trim_start_matches("tls://")
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .to_owned();
    let hostport = if hostport.contains(':') {
        hostport
    } else {
        format!("{hostport}:4222")
    };
    let reach = hostport
        .to_socket_addrs()
        .map_err(|e| e.to_string())
        .and_then(|mut a| a.next().ok_or_else(|| "no address".to_owned()))
        .and_then(|a| {
            std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(3))
                .map_err(|e| e.to_string())
        });
    out.push(match reach {
        Ok(_) => check(Level::Ok, "NATS", format!("{} reachable", n.url)),
        Err(e) => check(
            Level::Warn,
            "NATS",
            format!(
                "{} not reachable ({e}): evidence waits in the spool, the bundle in force stays",
                n.url
            ),
        ),
    });
    let dir = cfg
        .spool
        .dir
        .clone()
        .unwrap_or_else(|| state_dir.join("spool"));
    let probe = dir.join(".doctor");
    let writable = std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::write(&probe, b"x"))
        .and_then(|_| std::fs::remove_file(&probe));
    out.push(match writable {
        Ok(()) => {
            let bytes: u64 = crate::spool::segments(&dir)
                .unwrap_or_default()
                .iter()
                .filter_map(|(_, p)| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum();
            let pct = bytes * 100 / cfg.spool.max_bytes.max(1);
            check(
                if pct >= 80 { Level::Warn } else { Level::Ok },
                "spool",
                format!(
                    "{} writable, {bytes} bytes ({pct}% of spool.max_bytes, when full: {:?})",
                    dir.display(),
                    cfg.spool.when_full
                ),
            )
        }
        Err(e) => check(
            Level::Fail,
            "spool",
            format!("{} not writable: {e}", dir.display()),
        ),
    });
}

fn kernel(out: &mut Vec<Check>) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let (major, minor) = release
        .split(['.', '-'])
        .take(2)
        .map(|p| p.parse::<u32>().unwrap_or(0))
        .fold((0, 0), |(a, _), n| if a == 0 { (n, 0) } else { (a, n) });
    // bpf_link for cgroup programs and the ring buffer: 5.8.
    out.push(check(
        if (major, minor) >= (5, 8) {
            Level::Ok
        } else {
            Level::Fail
        },
        "kernel",
        format!("{release} (needs 5.8 or later: cgroup bpf_link, ring buffer)"),
    ));
    out.push(match unsafe { libc::geteuid() } {
        0 => check(Level::Ok, "privileges", "running as root"),
        uid => check(
            Level::Fail,
            "privileges",
            format!("uid {uid}: loading eBPF programs and attaching to cgroups needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"),
        ),
    });
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    out.push(
        if mounts
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
        {
            check(
                Level::Ok,
                "bpffs",
                "mounted (links are pinned there: fail closed when the node stops)",
            )
        } else {
            check(
                Level::Fail,
                "bpffs",
                "not mounted: `mount -t bpf bpf /sys/fs/bpf`",
            )
        },
    );
    out.push(if Path::new("/sys/kernel/btf/vmlinux").exists() {
        check(Level::Ok, "BTF", "/sys/kernel/btf/vmlinux present")
    } else {
        check(
            Level::Warn,
            "BTF",
            "no /sys/kernel/btf/vmlinux: the BPF LSM containment programs cannot load",
        )
    });
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    out.push(if lsm.split(',').any(|l| l.trim() == "bpf") {
        check(
            Level::Ok,
            "BPF LSM",
            format!(
                "in the kernel's LSM list ({}); whether this host lets the node load LSM programs shows in the node's containment",
                lsm.trim()
            ),
        )
    } else {
        check(
            Level::Warn,
            "BPF LSM",
            format!(
                "not active (lsm={}): leaving a watched cgroup, packet sockets and bpf() are detected and the job stopped, not prevented; add `lsm=...,bpf` to the kernel command line",
                if lsm.trim().is_empty() { "unreadable" } else { lsm.trim() }
            ),
        )
    });
}

fn cgroups(cfg: &Config, out: &mut Vec<Check>) {
    let root = match crate::redirect::cgroup2_root() {
        Ok(r) => {
            out.push(check(
                Level::Ok,
                "cgroup v2",
                format!("mounted at {}", r.display()),
            ));
            r
        }
        Err(e) => {
            out.push(check(Level::Fail, "cgroup v2", e.to_string()));
            return;
        }
    };
    for c in &cfg.watch.cgroups {
        let path = crate::redirect::cgroup_path(&root, &c.path);
        out.push(if path.is_dir() {
            check(
                Level::Ok,
                "watched cgroup",
                format!("{} present", path.display()),
            )
        } else if c.create {
            check(
                Level::Ok,
                "watched cgroup",
                format!(
                    "{} missing; the node creates it (create: true)",
                    path.display()
                ),
            )
        } else {
            check(
                Level::Fail,
                "watched cgroup",
                format!(
                    "{} missing: the node will not start (create it, or set create: true)",
                    path.display()
                ),
            )
        });
    }
    if cfg.watch.cgroups.is_empty() && cfg.watch.patterns.is_empty() {
        out.push(check(
            Level::Warn,
            "watched cgroup",
            "none configured: nothing is intercepted",
        ));
    }
}

fn targets(cfg: &Config, out: &mut Vec<Check>) {
    if cfg.targets.is_empty() {
        out.push(check(
            Level::Warn,
            "targets",
            "none configured (a pushed bundle may bring them)",
        ));
    }
    for t in &cfg.targets {
        for h in &t.hosts {
            let port = t.ports.first().copied().unwrap_or(443);
            out.push(match (h.as_str(), port).to_socket_addrs() {
                Ok(a) => {
                    let n = a.count();
                    check(
                        Level::Ok,
                        "target name",
                        format!("{} ({}): resolves to {n} address(es)", h, t.name),
                    )
                }
                Err(e) => check(
                    Level::Warn,
                    "target name",
                    format!(
                        "{} ({}): does not resolve now ({e}); retried every dns.refresh_secs",
                        h, t.name
                    ),
                ),
            });
        }
    }
}

fn ca(state_dir: &Path, out: &mut Vec<Check>) {
    let dir = state_dir.join("ca");
    let cert = crate::tls::ca::cert_path(&dir);
    let pem = match std::fs::read_to_string(&cert) {
        Ok(p) => p,
        Err(_) => {
            out.push(check(
                Level::Warn,
                "node CA",
                format!(
                    "{} not created yet (the node creates it at start; `sluice ca init`)",
                    cert.display()
                ),
            ));
            return;
        }
    };
    out.push(check(Level::Ok, "node CA", cert.display().to_string()));
    // The base64 body identifies the certificate in any PEM bundle.
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    let in_bundle = |path: &str| {
        std::fs::read_to_string(path)
            .map(|b| {
                b.lines()
                    .filter(|l| !l.starts_with("-----"))
                    .collect::<String>()
                    .contains(&body)
            })
            .unwrap_or(false)
    };
    let system = "/etc/ssl/certs/ca-certificates.crt";
    out.push(if in_bundle(system) {
        check(Level::Ok, "system trust store", format!("the node CA is in {system}: OpenSSL, curl, libpq (sslrootcert=system), Go, Python's ssl default context trust it"))
    } else {
        check(Level::Warn, "system trust store", format!("the node CA is not in {system}: jobs' TLS clients will refuse the node; `sluice ca install`"))
    });
    // Python: requests/httpx use certifi's own bundle, not the system's.
    let certifi = std::process::Command::new("python3")
        .args(["-c", "import certifi; print(certifi.where())"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    out.push(match certifi {
        Some(path) if in_bundle(&path) => check(Level::Ok, "Python certifi", format!("{path} holds the node CA")),
        Some(path) => check(
            Level::Warn,
            "Python certifi",
            format!("{path} does not hold the node CA: requests/httpx/openai trust it only with REQUESTS_CA_BUNDLE or SSL_CERT_FILE={system} in the job's environment"),
        ),
        None => check(Level::Ok, "Python certifi", "not installed (Python's ssl uses the system store)"),
    });
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok();
    out.push(check(
        if node { Level::Warn } else { Level::Ok },
        "Node.js",
        if node {
            format!("Node.js uses its own CA list: set NODE_EXTRA_CA_CERTS={} (or --use-openssl-ca) for jobs", cert.display())
        } else {
            "not installed".into()
        },
    ));
    let java = Path::new("/etc/ssl/certs/java/cacerts").exists();
    out.push(check(
        if java { Level::Warn } else { Level::Ok },
        "Java",
        if java {
            "Java reads /etc/ssl/certs/java/cacerts: `update-ca-certificates` (after `sluice ca install`) refreshes it when ca-certificates-java is installed; check with keytool -list".into()
        } else {
            "no Java trust store on this host".to_string()
        },
    ));
}
