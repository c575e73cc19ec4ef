//! Workload identity, the type: who opened a connection (the cgroup, the
//! systemd unit or container, the process, the CI job), as records keep
//! it and policy matches it. How a connection is attributed to one is
//! `attribution.rs`; this module imports nothing of the node's.
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The CI job a process belongs to, from its environment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// The job's checkout (`GITHUB_WORKSPACE`, `CI_PROJECT_DIR`): where
    /// its agents' file tools belong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
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
    /// The CI identity in the connecting process's own environment, when
    /// it differs from the trusted one (`identity.ci`): what it claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_ci: Option<CiJob>,
}

/// Which process the CI attributes were read from, and why it is trusted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiSource {
    pub pid: u32,
    pub comm: String,
    /// `runner-anchor` (a configured runner job process above the
    /// connecting one), `anchor-child` (the process that anchor started),
    /// `cgroup-top` (the topmost ancestor inside the watched cgroups: the
    /// process the runner put there), `cgroup-sole-job` (the connecting
    /// process has no trusted ancestor; the only job running in its cgroup),
    /// `job-cgroup-first` (no runner process vouches for this one: the
    /// identity its job cgroup was first attributed, from that process).
    pub how: String,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_source: Option<CiSource>,
    /// Set when the connection cannot be attributed to one job (its process
    /// is gone or detached and its cgroup runs several jobs): the proxy
    /// refuses such connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unattributed: Option<String>,
    /// Outside every watched job cgroup (`watch.host`): a host process —
    /// a unit, a container, a daemon, or a job that left its cgroup. No
    /// CI identity is read for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host: bool,
}

/// A cgroup directory as `/proc/PID/cgroup` names it: relative to the
/// cgroup2 mount (`root`), with a leading `/`.
pub fn cgroup_rel(root: &Path, cgroup: &Path) -> String {
    match cgroup.strip_prefix(root) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => cgroup.display().to_string(),
    }
}

/// `path` is `base` or below it (component-wise).
pub fn path_within(path: &str, base: &str) -> bool {
    let base = base.trim_end_matches('/');
    base.is_empty()
        || path == base
        || path
            .strip_prefix(base)
            .is_some_and(|rest| rest.starts_with('/'))
}
