//! Test environment: a network namespace with a fake remote service, a
//! watched cgroup, and a running node. Everything is removed on drop.
use std::{
    io::Write,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
pub const HTTP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;

static NEXT: AtomicU32 = AtomicU32::new(1);
static CLEAN: Once = Once::new();

/// Which isolated slot this run uses (`SLUICE_E2E_SLOT`, 0-3): two checkouts
/// can run the suite at once without touching each other's namespaces,
/// links, cgroups, subnets or ports.
pub fn slot() -> u32 {
    std::env::var("SLUICE_E2E_SLOT")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &u32| *s < 4)
        .unwrap_or(0)
}

/// Name prefix of everything this run creates (`se2e`, `se2eb`, ...).
pub fn prefix() -> String {
    format!("se2e{}", ["", "b", "c", "d"][slot() as usize])
}

/// Panics (never skips) when the test cannot do its job for real.
pub fn require_root() {
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the end-to-end tests need root (eBPF, cgroups, network namespaces); run them as root, e.g. via `cargo xtask test`"
    );
}

pub fn sh(cmd: &str) -> Output {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    out
}

pub fn must(cmd: &str) {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn cgroup2_root() -> PathBuf {
    node_agent::redirect::cgroup2_root().expect("cgroup2 must be mounted")
}

/// Removes what a crashed earlier run may have left behind.
fn clean_stale() {
    CLEAN.call_once(|| {
        let p = prefix();
        let _ = sh(&format!("for n in $(ip netns list | awk '/^{p}-/{{print $1}}'); do ip netns del $n; done"));
        let _ = sh(&format!("for l in $(ip -o link | awk -F': ' '$2 ~ /^{p}[0-9]/{{print $2}}' | cut -d@ -f1); do ip link del $l; done"));
        let root = cgroup2_root();
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&format!("{p}-")) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    });
}

/// A network namespace standing in for a remote host, reachable over a
/// veth pair: `remote` (a target) and `other` (never a target) both live in
/// it and serve the same fake service.
pub struct Remote {
    pub ns: String,
    pub host_if: String,
    pub host_ip: String,
    pub remote: String,
    pub other: String,
    pub log: PathBuf,
    server: Child,
    https: Option<Child>,
    ai: Option<Child>,
    /// The fake HTTPS service's own CA (PEM) and request log.
    pub https_ca: PathBuf,
    pub https_log: PathBuf,
}

impl Remote {
    pub fn new(idx: u32, dir: &Path) -> Self {
        let p = prefix();
        let ns = format!("{p}-{idx}");
        let host_if = format!("{p}{idx}h");
        let peer_if = format!("{p}{idx}r");
        let net = format!("10.{}.{idx}", 210 + slot());
        must(&format!("ip netns add {ns}"));
        must(&format!(
            "ip link add {host_if} type veth peer name {peer_if}"
        ));
        must(&format!("ip link set {peer_if} netns {ns}"));
        must(&format!(
            "ip addr add {net}.1/24 dev {host_if} && ip link set {host_if} up"
        ));
        must(&format!(
            "ip netns exec {ns} sh -c 'ip link set lo up && ip addr add {net}.2/24 dev {peer_if} && ip addr add {net}.3/24 dev {peer_if} && ip link set {peer_if} up'"
        ));
        let log = dir.join("remote.log");
        std::fs::write(&log, "").unwrap();
        let server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3"])
            .arg(format!("{FIXTURES}/fake_remote.py"))
            .args(["--bind", &format!("{net}.2"), "--bind", &format!("{net}.3")])
            .args([
                "--port",
                &HTTP_PORT.to_string(),
                "--udp-port",
                &UDP_PORT.to_string(),
            ])
            .arg("--log")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start fake remote");
        let r = Remote {
            ns,
            host_if,
            host_ip: format!("{net}.1"),
            remote: format!("{net}.2"),
            other: format!("{net}.3"),
            log,
            server,
            https: None,
            ai: None,
            https_ca: dir.join("upstream-ca.pem"),
            https_log: dir.join("https.log"),
        };
        wait_for(&format!("fake remote on {}:{HTTP_PORT}", r.remote), || {
            TcpStream::connect((r.remote.as_str(), HTTP_PORT)).is_ok()
                && TcpStream::connect((r.other.as_str(), HTTP_PORT)).is_ok()
        });
        // Those readiness probes are not part of any test's evidence.
        std::fs::write(&r.log, "").unwrap();
        r
    }

    /// Starts the fake HTTPS service (tests/fixtures/fake_upstream.rs).
    pub fn start_https(&mut self) {
        let bin = Path::new(SLUICE)
            .parent()
            .unwrap()
            .join("examples/fake_upstream");
        assert!(
            bin.exists(),
            "{} not built (cargo test builds examples)",
            bin.display()
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&bin)
            .args(["--bind", &self.remote, "--bind", &self.other])
            .arg("--ca-out")
            .arg(&self.https_ca)
            .arg("--leaf-out")
            .arg(self.https_ca.parent().unwrap())
            .arg("--log")
            .arg(&self.https_log)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start fake https upstream");
        self.https = Some(child);
        let (ca, ip) = (self.https_ca.clone(), self.remote.clone());
        wait_for("fake HTTPS upstream", || {
            ca.exists()
                && [443u16, 8443, 9443]
                    .iter()
                    .all(|p| TcpStream::connect((ip.as_str(), *p)).is_ok())
        });
        std::fs::write(&self.https_log, "").unwrap();
    }

    /// Starts the fake AI API (:7443) and gRPC service (:6443) from
    /// tests/fixtures/fake_ai.py, with the fake upstream's identity.
    pub fn start_ai(&mut self) {
        let dir = self.https_ca.parent().unwrap().to_owned();
        let log = dir.join("ai.log");
        std::fs::write(&log, "").unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "python3"])
            .arg(format!("{FIXTURES}/fake_ai.py"))
            .args(["--bind", &self.remote])
            .arg("--cert")
            .arg(dir.join("api.crt"))
            .arg("--key")
            .arg(dir.join("api.key"))
            .arg("--log")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start fake AI API");
        self.ai = Some(child);
        let ip = self.remote.clone();
        wait_for("fake AI API and gRPC service", || {
            [7443u16, 6443, 5443]
                .iter()
                .all(|p| TcpStream::connect((ip.as_str(), *p)).is_ok())
        });
    }

    /// What the fake AI API logged it sent.
    pub fn ai_entries(&self) -> Vec<Value> {
        let log = self.https_ca.parent().unwrap().join("ai.log");
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Requests the fake HTTPS service received.
    pub fn https_entries(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.https_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Lines the fake remote logged (requests and UDP datagrams).
    pub fn entries(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        for h in [self.https.as_mut(), self.ai.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = h.kill();
            let _ = h.wait();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = sh(&format!("ip netns del {}", self.ns));
        let _ = sh(&format!("ip link del {} 2>/dev/null", self.host_if));
    }
}

/// A cgroup watched by the node under test.
pub struct Cgroup {
    pub rel: String,
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(idx: u32) -> Self {
        let rel = format!("{}-{idx}", prefix());
        let path = cgroup2_root().join(&rel);
        std::fs::create_dir_all(&path).expect("create cgroup");
        Cgroup { rel, path }
    }

    /// Runs `program args` inside the cgroup (the shell moves itself in,
    /// then execs, so the program and its children start there).
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && echo \"PID=$$\" >&2 && exec \"$@\"",
                self.path.display()
            ))
            .arg("sh")
            .arg(program)
            .args(args);
        c
    }

    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program, args).output().expect("run in cgroup")
    }

    /// `program args` started in the cgroup by a stand-in runner job
    /// process named `runner` (a copy of the shell under that name, kept
    /// in `dir`, staying above the program): what the node trusts as the
    /// job's word, one job after another in the same cgroup.
    pub fn under_runner(&self, runner: &str, dir: &Path, program: &str, args: &[&str]) -> Command {
        let bin = dir.join("runner-bin");
        std::fs::create_dir_all(&bin).unwrap();
        let copy = bin.join(runner);
        if !copy.exists() {
            std::fs::copy("/bin/sh", &copy).unwrap();
        }
        let mut full = vec!["-c", "\"$@\"; true", runner, program];
        full.extend_from_slice(args);
        self.command(copy.to_str().unwrap(), &full)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = sh(&format!("kill -9 {pid}"));
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A running `sluice run`.
pub struct Node {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    child: Child,
}

/// The tests' node configuration keeps the redirect to the watched
/// cgroups (`Env::host_mode` puts it on the root cgroup too).
pub const HOST_OFF: &str = "  host:\n    enabled: false\n";

/// The test operator's private key in `dir` (made on first use; its
/// `.pub` is what the node's `decisions.keys` lists).
pub fn operator_key(dir: &Path) -> PathBuf {
    let prefix = dir.join("operator");
    let key = prefix.with_extension("key");
    if !key.exists() {
        node_agent::keys::keygen(&prefix).expect("operator keygen");
    }
    key
}

impl Node {
    pub fn start(dir: &Path, config: &str) -> Self {
        let cfg_path = dir.join("sluice.yaml");
        // The operator's key signs approvals and resumes (`cli` passes it);
        // it lives in the test's directory, as on an operator's laptop.
        let operator = operator_key(dir);
        let config = if config.contains("\ndecisions:") || config.starts_with("decisions:") {
            config.to_owned()
        } else {
            format!(
                "decisions:\n  keys: [\"{}\"]\n{config}",
                operator.with_extension("pub").display()
            )
        };
        std::fs::write(&cfg_path, &config).unwrap();
        let socket = dir.join("control.sock");
        let log = dir.join("sluice.log");
        let port = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("port: "))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(15001);
        let child = Command::new(SLUICE)
            .arg("--socket")
            .arg(&socket)
            .arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("SLUICE_LOG", "info,sluice=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start sluice");
        let mut node = Node {
            config: cfg_path,
            socket,
            log,
            port,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = node.child.try_wait() {
                panic!("sluice exited early ({status}):\n{}", node.log_text());
            }
            if node.cli(&["status"]).status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sluice not ready in 30s:\n{}",
                node.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        node
    }

    /// Stand-in while a node is being replaced.
    fn placeholder() -> Self {
        let child = Command::new("true").spawn().expect("spawn true");
        Node {
            config: PathBuf::new(),
            socket: PathBuf::new(),
            log: PathBuf::new(),
            port: 0,
            child,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(SLUICE);
        if let Some(dir) = self.config.parent().filter(|d| !d.as_os_str().is_empty()) {
            cmd.env("SLUICE_OPERATOR_KEY", operator_key(dir));
        }
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run sluice cli")
    }

    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "sluice {args:?} failed: {}\nnode log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        serde_json::from_slice(&out.stdout).expect("json from sluice cli")
    }

    pub fn sessions(&self) -> Vec<Value> {
        match self.cli_json(&["sessions", "list", "--json", "--limit", "100000"]) {
            Value::Array(a) => a,
            other => panic!("sessions list is not an array: {other}"),
        }
    }

    pub fn status(&self) -> Value {
        self.cli_json(&["status", "--json"])
    }

    /// Waits until `n` sessions are closed (records are written at close).
    pub fn wait_sessions(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.sessions();
            let done = s
                .iter()
                .filter(|s| s["outcome"]["status"] != "open")
                .count();
            if done >= n {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} finished sessions, have {done}: {s:#?}\nnode log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Node {
    /// `kill -9`: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// `sluice detach`: remove the pinned programs (fail-closed default).
    pub fn detach(&self) -> Output {
        Command::new(SLUICE)
            .arg("detach")
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run sluice detach")
    }

    /// SIGTERM, then SIGKILL after 5 s. The hooks stay pinned.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        // Programs stay pinned after the node exits (fail closed): the
        // test removes them so nothing outlives it.
        if !self.config.as_os_str().is_empty() {
            let _ = self.detach();
        }
    }
}

/// Everything one test needs. Field order is drop order: the node goes
/// first (detaching its programs), then the cgroup, then the remote.
pub struct Env {
    pub node: Node,
    pub cgroup: Cgroup,
    pub remote: Remote,
    pub config: String,
    /// The node's state directory lives here for the test's duration.
    pub dir: tempfile::TempDir,
}

impl Env {
    /// Target: the remote's `.2` address on the HTTP port.
    pub fn new() -> Self {
        Self::with_targets(|r| {
            format!(
                "  - name: fake-remote\n    addresses: [\"{}\"]\n    ports: [{HTTP_PORT}]\n",
                r.remote
            )
        })
    }

    pub fn with_targets(targets: impl Fn(&Remote) -> String) -> Self {
        Self::build(targets, |_, _| String::new(), false)
    }

    /// A fake HTTPS service in the namespace, intercepted by name.
    pub fn https(extra: &str) -> Self {
        let extra = extra.to_owned();
        Self::https_with(move |_| extra.clone())
    }

    /// As `https`, with extra configuration computed from the test's
    /// directory (created before the node starts).
    pub fn https_with(extra: impl Fn(&Path) -> String) -> Self {
        Self::https_targets(
            |r| {
                format!(
                    "  - name: fake-api\n    addresses: [\"{}\"]\n    ports: [443, 8443, 9443, 7443, 6443, 5443, 4443]\n    tls: intercept\n    sni: [api.fake.test, h2only.fake.test, untrusted.fake.test]\n",
                    r.remote
                )
            },
            extra,
        )
    }

    /// The fake HTTPS service with the test's own target list (YAML list
    /// items) and extra configuration computed from the test's directory.
    pub fn https_targets(
        targets: impl Fn(&Remote) -> String,
        extra: impl Fn(&Path) -> String,
    ) -> Self {
        Self::build(
            targets,
            move |r, dir| {
                format!(
                    "tls:\n  extra_upstream_roots: [\"{}\"]\n{}",
                    r.https_ca.display(),
                    extra(dir)
                )
            },
            true,
        )
    }

    pub fn build(
        targets: impl Fn(&Remote) -> String,
        extra: impl Fn(&Remote, &Path) -> String,
        https: bool,
    ) -> Self {
        require_root();
        clean_stale();
        let idx = NEXT.fetch_add(1, Ordering::Relaxed) + 10;
        assert!(idx < 250, "too many test environments");
        let dir = tempfile::tempdir().unwrap();
        let mut remote = Remote::new(idx, dir.path());
        if https {
            remote.start_https();
        }
        let cgroup = Cgroup::new(idx);
        // Each node its own metrics port (beside its proxy port).
        let config = format!(
            "proxy:\n  port: {}\nmetrics:\n  listen: \"127.0.0.1:{}\"\nwatch:\n{HOST_OFF}  cgroups:\n    - path: {}\ntargets:\n{}workloads:\n  - name: e2e-jobs\n    cgroup: \"/{}-*\"\n{}",
            16000 + 300 * slot() + idx,
            18000 + 300 * slot() + idx,
            cgroup.rel,
            targets(&remote),
            prefix(),
            extra(&remote, dir.path())
        );
        let node = Node::start(dir.path(), &config);
        Env {
            node,
            cgroup,
            remote,
            config,
            dir,
        }
    }

    /// Restarts the node with the redirect on the root cgroup as well
    /// (`watch.host`, the default outside the tests: here every other test
    /// reaches the fake remotes straight from the test process).
    pub fn host_mode(&mut self, extra: &str) {
        self.config =
            self.config
                .replacen(HOST_OFF, &format!("  host:\n    enabled: true\n{extra}"), 1);
        self.restart();
    }

    /// Starts a new node on the same state directory.
    pub fn restart(&mut self) {
        // The old node must be gone before the new one binds its port.
        let old = std::mem::replace(&mut self.node, Node::placeholder());
        drop(old);
        self.node = Node::start(self.dir.path(), &self.config);
    }

    /// The node's `/metrics` page, as a scraper gets it.
    pub fn metrics(&self) -> String {
        let out = Command::new("curl")
            .args(["-sS", &format!("http://{}/metrics", self.metrics_addr())])
            .output()
            .expect("curl");
        assert!(out.status.success(), "scraping /metrics: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Where this node serves `/metrics`.
    pub fn metrics_addr(&self) -> String {
        let port = self
            .config
            .lines()
            .find_map(|l| l.trim().strip_prefix("listen: \"127.0.0.1:"))
            .and_then(|p| p.trim_end_matches('"').parse::<u16>().ok())
            .expect("metrics port in the test config");
        format!("127.0.0.1:{port}")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sluice.yaml")
    }

    /// Installs this node's CA into the system trust store until dropped.
    pub fn trust_node_ca(&self) -> TrustGuard {
        TrustGuard::install(self.config_path(), self.state_dir())
    }

    /// Runs the Python HTTPS client in the watched cgroup.
    pub fn https_client(&self, args: &[&str]) -> Value {
        let script = format!("{FIXTURES}/https_client.py");
        let mut full = vec![script.as_str()];
        full.extend_from_slice(args);
        let out = self.cgroup.run("python3", &full);
        parse_json_output(&out, &self.node)
    }

    /// curl in the watched cgroup, resolving `host` to the remote.
    /// GET `path` on the fake API from the job: the status code curl saw
    /// (`000` when it got none) and the whole output.
    pub fn status_of(&self, path: &str) -> (String, Output) {
        let out = self.curl(
            "api.fake.test",
            443,
            path,
            &["-o", "/dev/null", "-w", "%{http_code}"],
        );
        (String::from_utf8_lossy(&out.stdout).into_owned(), out)
    }

    /// `n` GETs of `/json` from the job, each answered 200.
    pub fn get_ok(&self, n: usize) {
        for _ in 0..n {
            let (code, out) = self.status_of("/json");
            assert_eq!(code, "200", "{}", text(&out));
        }
    }

    pub fn curl(&self, host: &str, port: u16, path: &str, extra: &[&str]) -> Output {
        let url = format!("https://{host}:{port}{path}");
        let resolve = format!("{host}:{port}:{}", self.remote.remote);
        let mut args = vec!["-sS", "--max-time", "30", "--resolve", &resolve];
        args.extend_from_slice(extra);
        args.push(&url);
        self.cgroup.run("curl", &args)
    }
}

/// Serialises changes to the system trust store across parallel tests.
static TRUST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `update-ca-certificates` is not safe to run concurrently (two runs
/// rewrite the bundle from different directory listings): serialise it
/// across threads and across processes (other checkouts' suites).
pub fn trust_store_lock() -> (std::sync::MutexGuard<'static, ()>, std::fs::File) {
    use std::os::fd::AsRawFd;
    let guard = TRUST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/lock/sluice-e2e-trust.lock")
        .expect("open trust-store lock");
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock trust-store lock");
    (guard, f)
}

pub struct TrustGuard {
    config: PathBuf,
    state: PathBuf,
}

impl TrustGuard {
    fn install(config: PathBuf, state: PathBuf) -> Self {
        let _l = trust_store_lock();
        let out = Command::new(SLUICE)
            .args(["ca", "install", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sluice ca install: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TrustGuard { config, state }
    }
}

impl Drop for TrustGuard {
    fn drop(&mut self) {
        let _l = trust_store_lock();
        let _ = Command::new(SLUICE)
            .args(["ca", "uninstall", "--config"])
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state)
            .output();
    }
}

impl Env {
    /// Runs the Python test client in the watched cgroup; returns its JSON.
    pub fn client(&self, args: &[&str]) -> Value {
        let script = format!("{FIXTURES}/client.py");
        let mut full = vec![script.as_str()];
        full.extend_from_slice(args);
        let out = self.cgroup.run("python3", &full);
        parse_json_output(&out, &self.node)
    }
}

pub fn parse_json_output(out: &Output, node: &Node) -> Value {
    assert!(
        out.status.success(),
        "client failed: {}\n{}\nnode log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.log_text()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The `PID=` line the cgroup wrapper prints before exec.
pub fn wrapper_pid(out: &Output) -> u32 {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("PID="))
        .and_then(|p| p.trim().parse().ok())
        .expect("wrapper printed its pid")
}

pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn write_file(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

pub fn sluice(args: &[&str]) -> std::process::Output {
    Command::new(SLUICE).args(args).output().unwrap()
}

pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The node-held credential that policy environments give the node.
pub const NODE_KEY: &str = "node-held-secret-7f3a";

/// An HTTPS environment whose node trusts a freshly generated team key and
/// takes signed bundles made from `bundle(version, dir)`.
pub struct PolicyEnv {
    pub env: Env,
    pub keys: PathBuf,
    bundle: fn(u64, &Path) -> String,
}

impl PolicyEnv {
    pub fn new(bundle: fn(u64, &Path) -> String) -> Self {
        Self::with_settings(bundle, "")
    }

    /// As `new`, with extra lines for the node's `policy:` section.
    pub fn with_settings(bundle: fn(u64, &Path) -> String, settings: &str) -> Self {
        let settings = settings.to_owned();
        let env = Env::https_with(move |dir| {
            let keys = dir.join("keys");
            std::fs::create_dir_all(&keys).unwrap();
            let out = sluice(&["policy", "keygen", &keys.join("team").display().to_string()]);
            assert!(out.status.success(), "{}", text(&out));
            std::fs::write(dir.join("node-cursor.key"), format!("{NODE_KEY}\n")).unwrap();
            format!(
                "policy:\n  trusted_keys: [\"{}\"]\n  watch_dir: \"{}\"\n{settings}",
                keys.join("team.pub").display(),
                dir.join("policy.d").display()
            )
        });
        let keys = env.dir.path().join("keys");
        PolicyEnv { env, keys, bundle }
    }

    /// Writes and signs bundle `version`; returns the .jws path.
    pub fn signed(&self, version: u64, key: &str) -> PathBuf {
        let dir = self.env.dir.path();
        let yaml = dir.join(format!("bundle-v{version}-{key}.yaml"));
        std::fs::write(&yaml, (self.bundle)(version, dir)).unwrap();
        let out = sluice(&[
            "policy",
            "sign",
            &yaml.display().to_string(),
            "--key",
            &self.keys.join(format!("{key}.key")).display().to_string(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        yaml.with_extension("jws")
    }

    pub fn push(&self, file: &Path) -> std::process::Output {
        self.env
            .node
            .cli(&["policy", "push", &file.display().to_string()])
    }

    pub fn version(&self) -> u64 {
        self.env.node.cli_json(&["policy", "show", "--json"])["version"]
            .as_u64()
            .unwrap()
    }

    /// Pushes the standard bundle (version 10).
    pub fn with_policy(bundle: fn(u64, &Path) -> String) -> Self {
        let p = Self::new(bundle);
        let out = p.push(&p.signed(10, "team"));
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(p.version(), 10);
        p
    }
}

/// Every recorded exchange of every session.
pub fn exchanges(env: &Env) -> Vec<Value> {
    let mut out = Vec::new();
    for s in env.node.sessions() {
        let full = env
            .node
            .cli_json(&["sessions", "show", &s["id"].to_string()]);
        out.extend(full["exchanges"].as_array().cloned().unwrap_or_default());
    }
    out
}

/// The first exchange matching `pred` whose record is final (exchanges are
/// recorded when started, before forwarding, and completed when the
/// response ends: a test must not read one half-way).
pub fn wait_exchange(env: &Env, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(e) = exchanges(env)
            .into_iter()
            .find(|e| e["state"] != "started" && pred(e))
        {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "exchange not recorded:\n{}",
            env.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Env {
    /// Stops the node; it stays stopped until `restart`.
    pub fn stop_node(&mut self) {
        drop(std::mem::replace(&mut self.node, Node::placeholder()));
    }
}

/// One event in the record log: its segment file, frame offset and
/// stored bytes (`[1][seq 8][at 8][conn 8][prev 32][hash 32]...`).
pub struct Frame {
    pub path: std::path::PathBuf,
    pub offset: u64,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn seq(&self) -> u64 {
        u64::from_be_bytes(self.payload[1..9].try_into().unwrap())
    }
    pub fn hash(&self) -> String {
        hex::encode(&self.payload[57..89])
    }
}

/// The log's frames, read as an attacker with the disk would.
pub fn log_frames(state_dir: &Path) -> Vec<Frame> {
    let dir = state_dir.join("records.log");
    let mut segs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    let mut out = Vec::new();
    for path in segs {
        let bytes = std::fs::read(&path).unwrap();
        let mut at = 0usize;
        while at + 4 <= bytes.len() {
            let n = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            out.push(Frame {
                path: path.clone(),
                offset: at as u64,
                payload: bytes[at + 4..at + 4 + n].to_vec(),
            });
            at += 4 + n;
        }
    }
    out
}

/// Cuts the log just before `f`.
pub fn cut_at(f: &Frame) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f.path)
        .unwrap()
        .set_len(f.offset)
        .unwrap();
}

/// Rewrites the frame's segment with `edit` applied to the frame's
/// bytes (header included); an empty result removes the frame.
pub fn edit_frame(f: &Frame, edit: impl FnOnce(&mut Vec<u8>)) {
    let bytes = std::fs::read(&f.path).unwrap();
    let start = f.offset as usize;
    let end = start + 4 + f.payload.len();
    let mut frame = bytes[start..end].to_vec();
    edit(&mut frame);
    let mut out = bytes[..start].to_vec();
    out.extend_from_slice(&frame);
    out.extend_from_slice(&bytes[end..]);
    std::fs::write(&f.path, out).unwrap();
}

/// A JetStream-enabled nats-server on loopback, its store in the test's
/// directory (kept across restarts).
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    dir: std::path::PathBuf,
    args: Vec<String>,
}

impl Nats {
    pub fn start(dir: &std::path::Path) -> Self {
        Self::start_with(dir, Vec::new())
    }

    pub fn start_with(dir: &std::path::Path, args: Vec<String>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut n = Nats {
            child: None,
            port,
            dir: dir.to_owned(),
            args,
        };
        n.up();
        n
    }

    pub fn up(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("nats.log")).unwrap())
            .spawn()
            .expect("start nats-server (installed by scripts/setup.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.down();
    }
}

/// `tests/fixtures/host_daemon.py serve`, outside the watched cgroups.
pub struct HostDaemon {
    child: std::process::Child,
    socket: PathBuf,
}

impl HostDaemon {
    pub fn start(dir: &Path) -> Self {
        let socket = dir.join("hostd.sock");
        let mut child = Command::new("python3")
            .arg(format!("{FIXTURES}/host_daemon.py"))
            .args(["serve", socket.to_str().unwrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready");
        HostDaemon { child, socket }
    }

    /// The job (in its cgroup) has the daemon run `cmd`: its output.
    pub fn ask(&self, env: &Env, cmd: &str) -> String {
        let out = env.cgroup.run(
            "python3",
            &[
                &format!("{FIXTURES}/host_daemon.py"),
                "ask",
                self.socket.to_str().unwrap(),
                cmd,
            ],
        );
        text(&out)
    }
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
