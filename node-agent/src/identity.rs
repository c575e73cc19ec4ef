//! Workload identity: who opened a connection. From the kernel's origin
//! record (pid, tgid, uid, cgroup id) to the cgroup path, the systemd unit
//! or container, the executable and command line, and the CI job's own
//! identity read from the process environment (GitHub Actions, GitLab CI).
//! CI identity is cached per cgroup so that a process that has already
//! exited (a short `curl` in a build step) is still attributed.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_common::Origin;

use crate::config::WorkloadSelector;

/// The CI job a process belongs to, from its environment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiJob {
    /// `github-actions` or `gitlab-ci`.
    pub system: String,
    /// GitHub `owner/repo`, GitLab project path.
    pub repository: Option<String>,
    pub run_id: Option<String>,
    pub run_attempt: Option<String>,
    pub workflow: Option<String>,
    pub job: Option<String>,
    pub actor: Option<String>,
    pub git_ref: Option<String>,
    pub sha: Option<String>,
    /// GitLab pipeline id.
    pub pipeline_id: Option<String>,
}

/// The process that called `connect()`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Kernel thread id that connected.
    pub pid: u32,
    /// Process id (thread group).
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
}

/// Who a connection belongs to. `id` is stable for one CI job (or, outside
/// CI, one cgroup and user) and is what records and policy refer to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadIdentity {
    pub id: String,
    /// Name of the first configured workload selector that matched.
    pub workload: Option<String>,
    pub cgroup_id: u64,
    pub cgroup_path: Option<String>,
    pub systemd_unit: Option<String>,
    pub container_id: Option<String>,
    pub ci: Option<CiJob>,
}

#[derive(Clone, Default)]
struct CgroupEntry {
    path: Option<String>,
    ci: Option<CiJob>,
}

pub struct IdentityResolver {
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    selectors: Vec<(String, glob::Pattern)>,
    cache: Mutex<HashMap<u64, CgroupEntry>>,
}

impl IdentityResolver {
    pub fn new(cgroup_root: PathBuf, selectors: &[WorkloadSelector]) -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            cgroup_root,
            // Patterns were validated with the configuration.
            selectors: selectors
                .iter()
                .filter_map(|s| Some((s.name.clone(), glob::Pattern::new(&s.cgroup).ok()?)))
                .collect(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Resolves the identity and process of a kernel origin record.
    pub fn resolve(&self, origin: &Origin) -> (WorkloadIdentity, ProcessInfo) {
        let proc_dir = self.proc_root.join(origin.tgid.to_string());
        let process = ProcessInfo {
            pid: origin.pid,
            tgid: origin.tgid,
            uid: origin.uid,
            gid: origin.gid,
            comm: comm_str(&origin.comm),
            exe: std::fs::read_link(proc_dir.join("exe"))
                .ok()
                .map(|p| p.display().to_string()),
            cmdline: std::fs::read(proc_dir.join("cmdline"))
                .map(|b| redact_cmdline(split_nul(&b)))
                .unwrap_or_default(),
        };

        // The process may be gone; the cgroup cache remembers its job.
        let live_path = read_cgroup_path(&proc_dir);
        let live_ci = std::fs::read(proc_dir.join("environ"))
            .ok()
            .and_then(|env| ci_from_environ(&env));

        let entry = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let entry = cache.entry(origin.cgroup_id).or_default();
            if live_path.is_some() {
                entry.path = live_path;
            }
            if live_ci.is_some() {
                entry.ci = live_ci;
            }
            entry.clone()
        };
        let path = match entry.path {
            Some(p) => Some(p),
            None => {
                let found = find_cgroup_by_id(&self.cgroup_root, origin.cgroup_id);
                if let Some(p) = &found {
                    let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                    cache.entry(origin.cgroup_id).or_default().path = Some(p.clone());
                }
                found
            }
        };

        let workload = path.as_deref().and_then(|p| {
            self.selectors
                .iter()
                .find(|(_, pat)| pat.matches(p))
                .map(|(n, _)| n.clone())
        });
        let id = stable_id(entry.ci.as_ref(), path.as_deref(), origin.uid);
        let identity = WorkloadIdentity {
            id,
            workload,
            cgroup_id: origin.cgroup_id,
            systemd_unit: path.as_deref().and_then(systemd_unit),
            container_id: path.as_deref().and_then(container_id),
            cgroup_path: path,
            ci: entry.ci,
        };
        (identity, process)
    }
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
        });
    }
    None
}

/// `wl-` + 16 hex digits of SHA-256 over what names the workload: the CI
/// job when there is one, else the cgroup and user.
fn stable_id(ci: Option<&CiJob>, cgroup: Option<&str>, uid: u32) -> String {
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
            stable_id(Some(&a), None, 0),
            stable_id(Some(&a), Some("/x"), 5)
        );
        assert_ne!(stable_id(Some(&a), None, 0), stable_id(Some(&b), None, 0));
        assert_ne!(
            stable_id(None, Some("/a"), 0),
            stable_id(None, Some("/b"), 0)
        );
        assert!(stable_id(None, None, 0).starts_with("wl-"));
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
