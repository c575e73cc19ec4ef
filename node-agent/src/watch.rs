//! Cgroups that appear after start: `watch.patterns` are matched against
//! the cgroup2 tree, and every matching directory gets the node's programs
//! the moment inotify reports it (plus a periodic rescan, and a full one
//! when the inotify queue overflows). Containers started through a host
//! daemon (`docker run`, the runners' `container:` jobs) land in such
//! cgroups, outside the runner service's subtree.
use std::{
    collections::{HashMap, HashSet},
    os::fd::AsFd,
    path::{Component, Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use nix::{
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor},
};
use tracing::{debug, error, info, warn};

use crate::{config::CgroupPattern, redirect::Redirector};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("inotify: {0}")]
    Inotify(nix::Error),
}

/// How the patterns judge a directory `comps` levels below the root.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A full match: watch this cgroup.
    Watch,
    /// A partial match: look inside it (and watch it for new children).
    Descend,
    Ignore,
}

fn judge(patterns: &[CgroupPattern], comps: &[&str]) -> (bool, bool) {
    let mut full = false;
    let mut descend = false;
    for p in patterns {
        if p.matches_prefix(comps) {
            if comps.len() == p.parts.len() {
                full = true;
            } else {
                descend = true;
            }
        }
    }
    (full, descend)
}

fn verdicts(patterns: &[CgroupPattern], rel: &Path) -> Vec<Verdict> {
    let comps: Vec<&str> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect();
    let (full, descend) = judge(patterns, &comps);
    let mut v = Vec::new();
    if full {
        v.push(Verdict::Watch);
    }
    if descend {
        v.push(Verdict::Descend);
    }
    if v.is_empty() {
        v.push(Verdict::Ignore);
    }
    v
}

/// Existing cgroups that match (for `sluice detach`).
pub fn matching_cgroups(root: &Path, patterns: &[CgroupPattern]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let child = rel.join(e.file_name());
            for v in verdicts(patterns, &child) {
                match v {
                    Verdict::Watch => out.push(root.join(&child)),
                    Verdict::Descend => stack.push(child.clone()),
                    Verdict::Ignore => {}
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

pub struct PatternWatcher {
    root: PathBuf,
    patterns: Vec<CgroupPattern>,
    redirector: Arc<Redirector>,
    inotify: Inotify,
    /// Watched directories (relative to the root) by watch descriptor.
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// Cgroups attached by pattern, with their ids.
    attached: HashMap<PathBuf, u64>,
    /// Configured cgroups: never forgotten by the watcher.
    configured: HashSet<PathBuf>,
}

const RESCAN: Duration = Duration::from_secs(5);

impl PatternWatcher {
    pub fn new(
        root: PathBuf,
        patterns: &[String],
        configured: &[PathBuf],
        redirector: Arc<Redirector>,
    ) -> Result<Self, WatchError> {
        let patterns = patterns
            .iter()
            .filter_map(|p| CgroupPattern::parse(p).ok())
            .collect();
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .map_err(WatchError::Inotify)?;
        let mut w = Self {
            root,
            patterns,
            redirector,
            inotify,
            dirs: HashMap::new(),
            attached: HashMap::new(),
            configured: configured.iter().cloned().collect(),
        };
        w.scan(Path::new(""));
        Ok(w)
    }

    pub fn patterns(&self) -> Vec<String> {
        self.patterns.iter().map(|p| p.text.clone()).collect()
    }

    /// Watches `rel` for new children, then looks at the ones it has
    /// (in that order: a child made in between is seen either way).
    fn scan(&mut self, rel: &Path) {
        let dir = self.root.join(rel);
        if !self.dirs.values().any(|d| d == rel) {
            let flags =
                AddWatchFlags::IN_CREATE | AddWatchFlags::IN_DELETE | AddWatchFlags::IN_ONLYDIR;
            match self.inotify.add_watch(&dir, flags) {
                Ok(wd) => {
                    self.dirs.insert(wd, rel.to_owned());
                }
                Err(e) => {
                    debug!(dir = %dir.display(), error = %e, "cannot watch cgroup directory");
                    return;
                }
            }
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                self.appeared(&rel.join(e.file_name()));
            }
        }
    }

    fn appeared(&mut self, rel: &Path) {
        for v in verdicts(&self.patterns, rel) {
            match v {
                Verdict::Watch => self.attach(rel),
                Verdict::Descend => self.scan(rel),
                Verdict::Ignore => {}
            }
        }
    }

    fn attach(&mut self, rel: &Path) {
        let path = self.root.join(rel);
        if self.attached.contains_key(&path) {
            return;
        }
        let started = Instant::now();
        let id = std::fs::metadata(&path)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap_or_default();
        match self.redirector.attach_cgroup(&path) {
            Ok(()) => {
                info!(cgroup = %path.display(), micros = started.elapsed().as_micros() as u64, "new cgroup matches watch.patterns: attached");
                self.attached.insert(path, id);
            }
            // Gone already (a short-lived scope), or a real failure.
            Err(e) if path.exists() => {
                error!(cgroup = %path.display(), error = %e, "cannot attach to a cgroup matching watch.patterns: its processes are NOT intercepted")
            }
            Err(_) => {}
        }
    }

    fn removed(&mut self, rel: &Path) {
        let path = self.root.join(rel);
        if let Some(id) = self.attached.remove(&path) {
            if !self.configured.contains(&path) {
                self.redirector.forget_cgroup(&path, Some(id));
                info!(cgroup = %path.display(), "watched cgroup removed");
            }
        }
    }

    /// Runs forever (a dedicated thread).
    pub fn run(mut self) {
        let mut last_scan = Instant::now();
        loop {
            let ready = {
                let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(1000u16)).unwrap_or(0)
            };
            if ready > 0 {
                match self.inotify.read_events() {
                    Ok(events) => {
                        for ev in events {
                            if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                                warn!("inotify queue overflow: rescanning the cgroup tree");
                                self.scan(Path::new(""));
                                continue;
                            }
                            if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                                self.dirs.remove(&ev.wd);
                                continue;
                            }
                            let (Some(dir), Some(name)) = (self.dirs.get(&ev.wd), ev.name) else {
                                continue;
                            };
                            let rel = dir.join(name);
                            if ev.mask.contains(AddWatchFlags::IN_CREATE) {
                                self.appeared(&rel);
                            } else if ev.mask.contains(AddWatchFlags::IN_DELETE) {
                                self.removed(&rel);
                            }
                        }
                    }
                    Err(nix::Error::EAGAIN) => {}
                    Err(e) => {
                        error!(error = %e, "reading inotify events");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
            if last_scan.elapsed() >= RESCAN {
                last_scan = Instant::now();
                self.scan(Path::new(""));
                let gone: Vec<PathBuf> = self
                    .attached
                    .keys()
                    .filter(|p| !p.exists())
                    .cloned()
                    .collect();
                for p in gone {
                    if let Ok(rel) = p.strip_prefix(&self.root) {
                        let rel = rel.to_owned();
                        self.removed(&rel);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pats(p: &[&str]) -> Vec<CgroupPattern> {
        p.iter().map(|p| CgroupPattern::parse(p).unwrap()).collect()
    }

    #[test]
    fn patterns_match_by_component() {
        let p = pats(&["system.slice/docker-*.scope", "/ci/*/job-*"]);
        assert_eq!(verdicts(&p, Path::new("system.slice")), [Verdict::Descend]);
        assert_eq!(
            verdicts(&p, Path::new("system.slice/docker-abc.scope")),
            [Verdict::Watch]
        );
        assert_eq!(
            verdicts(&p, Path::new("system.slice/sluice.service")),
            [Verdict::Ignore]
        );
        assert_eq!(verdicts(&p, Path::new("ci/r1")), [Verdict::Descend]);
        assert_eq!(verdicts(&p, Path::new("ci/r1/job-7")), [Verdict::Watch]);
        assert_eq!(verdicts(&p, Path::new("ci/r1/job-7/x")), [Verdict::Ignore]);
        assert_eq!(verdicts(&p, Path::new("user.slice")), [Verdict::Ignore]);
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(CgroupPattern::parse("a/../b").is_err());
        assert!(CgroupPattern::parse("a/**/b").is_err());
        assert!(CgroupPattern::parse("a/[b").is_err());
        assert!(CgroupPattern::parse("/").is_err());
    }
}
