//! Fleet operations: the node's Prometheus endpoint, scraped by a real
//! Prometheus server (Debian's) on loopback.
use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::{text, Env, Nats};

struct Prometheus {
    child: Child,
    api: String,
}

impl Prometheus {
    fn start(env: &Env) -> Self {
        let dir = env.dir.path().join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: [\"{}\"]\n",
                env.metrics_addr()
            ),
        )
        .unwrap();
        let port: u16 = env
            .metrics_addr()
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap()
            + 1000;
        let api = format!("127.0.0.1:{port}");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus (installed by scripts/setup.sh)");
        Prometheus { child, api }
    }

    /// The value of an instant query's single result, if any.
    fn query(&self, q: &str) -> Option<f64> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "-G",
                &format!("http://{}/api/v1/query", self.api),
            ])
            .args(["--data-urlencode", &format!("query={q}")])
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    fn wait(&self, q: &str, want: impl Fn(f64) -> bool, env: &Env) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = self.query(q) {
                if want(v) {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus: `{q}` is {:?}\nnode log:\n{}",
                self.query(q),
                env.node.log_text()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_counters_that_move() {
    let env = Env::https("");
    let _trust = env.trust_node_ca();
    let get = |n: usize| env.get_ok(n);
    get(3);
    let prom = Prometheus::start(&env);
    prom.wait("up{job=\"sluice\"}", |v| v == 1.0, &env);
    prom.wait(
        "sum(sluice_exchanges_total{target=\"fake-api\",status=\"2xx\"})",
        |v| v == 3.0,
        &env,
    );
    prom.wait(
        "sum(sluice_connections_total{outcome=\"closed\",workload=\"e2e-jobs\"})",
        |v| v >= 3.0,
        &env,
    );
    prom.wait(
        "sum(sluice_kernel_events_total{event=\"redirected\"})",
        |v| v >= 3.0,
        &env,
    );
    prom.wait(
        "sum(sluice_bytes_total{target=\"fake-api\",direction=\"down\"})",
        |v| v > 0.0,
        &env,
    );
    // More traffic, and the counters move.
    get(2);
    prom.wait(
        "sum(sluice_exchanges_total{target=\"fake-api\"})",
        |v| v == 5.0,
        &env,
    );
    // The endpoint answers in the OpenMetrics text format.
    let body = env.metrics();
    assert!(
        body.contains("# TYPE sluice_connections counter") && body.ends_with("# EOF\n"),
        "{body}"
    );
    assert!(body.contains("sluice_policy_version 0"), "{body}");
}

#[test]
fn doctor_reports_what_the_host_gives_the_node() {
    let env = Env::https("");
    let doctor = || {
        let out = env.node.cli(&[
            "doctor",
            "--json",
            "--config",
            &env.config_path().display().to_string(),
            "--state-dir",
            &env.state_dir().display().to_string(),
        ]);
        assert!(
            out.status.success(),
            "doctor found a failure: {}",
            text(&out)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array().unwrap().clone()
    };
    let find = |checks: &[Value], name: &str| -> Value {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no `{name}` check: {checks:#?}"))
    };
    let before = doctor();
    for name in [
        "kernel",
        "privileges",
        "bpffs",
        "cgroup v2",
        "watched cgroup",
        "node CA",
    ] {
        assert_eq!(find(&before, name)["level"], "ok", "{before:#?}");
    }
    assert_eq!(find(&before, "system trust store")["level"], "warn");
    assert!(find(&before, "system trust store")["detail"]
        .as_str()
        .unwrap()
        .contains("sluice ca install"));
    let node = find(&before, "node");
    assert!(
        node["detail"].as_str().unwrap().starts_with("running (pid"),
        "{node}"
    );
    let _trust = env.trust_node_ca();
    let after = doctor();
    assert_eq!(
        find(&after, "system trust store")["level"],
        "ok",
        "{after:#?}"
    );
}

/// Purges the package if a check fails half-way.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "sluice"]).output();
    }
}

#[test]
fn the_deb_installs_and_purges_cleanly() {
    crate::harness::require_root();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/build-deb.sh"
    ))
    .arg(crate::harness::SLUICE)
    .arg(dir.path())
    .arg("0.0.0~e2e")
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let deb = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let info = Command::new("dpkg-deb")
        .args(["--info", &deb])
        .output()
        .unwrap();
    assert!(text(&info).contains("Package: sluice"), "{}", text(&info));

    let _lock = crate::harness::trust_store_lock();
    let _installed = Installed;
    let out = Command::new("dpkg").args(["-i", &deb]).output().unwrap();
    assert!(out.status.success(), "dpkg -i: {}", text(&out));
    for path in [
        "/usr/bin/sluice",
        "/lib/systemd/system/sluice.service",
        "/etc/sluice/sluice.yaml",
        "/var/lib/sluice",
    ] {
        assert!(
            std::path::Path::new(path).exists(),
            "{path} missing after install"
        );
    }
    let mode = std::fs::metadata("/var/lib/sluice").unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o700);
    let unit = std::fs::read_to_string("/lib/systemd/system/sluice.service").unwrap();
    for line in [
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/sluice",
        "CapabilityBoundingSet=CAP_BPF",
        "LimitNOFILE=",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(line), "unit lacks {line}");
    }
    let check = Command::new("/usr/bin/sluice")
        .args(["config", "check", "/etc/sluice/sluice.yaml"])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    // The node's CA, made and trusted as an operator would.
    for action in ["init", "install"] {
        let out = Command::new("/usr/bin/sluice")
            .args(["ca", action, "--config", "/etc/sluice/sluice.yaml"])
            .output()
            .unwrap();
        assert!(out.status.success(), "ca {action}: {}", text(&out));
    }
    let pem = std::fs::read_to_string("/var/lib/sluice/ca/ca.pem").unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let bundle = || {
        std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt")
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>()
    };
    assert!(
        bundle().contains(&body),
        "the CA is not in the system bundle after `ca install`"
    );

    let out = Command::new("dpkg")
        .args(["--purge", "sluice"])
        .output()
        .unwrap();
    assert!(out.status.success(), "dpkg --purge: {}", text(&out));
    for path in [
        "/usr/bin/sluice",
        "/lib/systemd/system/sluice.service",
        "/etc/sluice",
        "/var/lib/sluice",
    ] {
        assert!(
            !std::path::Path::new(path).exists(),
            "{path} left after purge"
        );
    }
    let left: Vec<_> = std::fs::read_dir("/usr/local/share/ca-certificates")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("sluice-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "CA files left: {left:?}");
    assert!(
        !bundle().contains(&body),
        "the CA is still in the system bundle after purge"
    );
}

fn local_events(env: &Env) -> u64 {
    let out = env.node.cli(&["verify"]);
    let t = text(&out);
    t.strip_prefix("ok: ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("local verify: {t}"))
}

/// `verify --stream` until it holds as many events as the node's own log.
fn wait_stream_matches(env: &Env, nats: &Nats) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The node's log only grows; re-read it each round.
        let want = local_events(env);
        let out =
            crate::harness::sluice(&["verify", "--stream", &nats.url(), "--node", "e2e-node"]);
        let t = text(&out);
        assert!(!t.contains("BROKEN"), "{t}");
        if out.status.success()
            && t.contains(&format!("ok: {want} event(s)"))
            && t.contains("(seq 0..")
        {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "stream never caught up with the node's {want} events: {t}\nstatus: {}\nnode log:\n{}",
            text(&env.node.cli(&["status"])),
            env.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn evidence_is_shipped_to_jetstream_once_in_order_through_outages_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = Nats::start(&dir.path().join("nats"));
    let url = nats.url();
    let mut env = Env::https_with(move |_| {
        format!("ship:\n  nats:\n    url: \"{url}\"\n    node: e2e-node\n")
    });
    let _trust = env.trust_node_ca();
    let get = |env: &Env, n: usize| env.get_ok(n);
    get(&env, 3);
    let t = wait_stream_matches(&env, &nats);
    assert!(t.contains(", 0 duplicate"), "{t}");
    let doctor = env.node.cli(&[
        "doctor",
        "--config",
        &env.config_path().display().to_string(),
        "--state-dir",
        &env.state_dir().display().to_string(),
    ]);
    let d = text(&doctor);
    assert!(
        d.contains("reachable") && d.contains("spool") && d.contains("writable"),
        "{d}"
    );

    // The server goes away: the node keeps serving and spooling.
    nats.down();
    get(&env, 4);
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.node.status()["shipping_connected"] == true {
        assert!(
            Instant::now() < deadline,
            "shipping still connected with the server down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(env.node.status()["spool"]
        .as_str()
        .unwrap()
        .contains("not yet acknowledged"));
    nats.up();
    let t = wait_stream_matches(&env, &nats);
    assert!(t.contains(", 0 duplicate"), "{t}");

    // kill -9 while shipping: on restart the node resumes from the last
    // acknowledged event; anything sent twice is dropped by the stream.
    get(&env, 3);
    env.node.kill9();
    env.restart();
    get(&env, 1);
    let t = wait_stream_matches(&env, &nats);
    assert!(t.contains(", 0 duplicate"), "{t}");
}

fn fleet_bundle(version: u64, _dir: &std::path::Path) -> String {
    format!(
        "version: {version}\nname: fleet-v{version}\nrules:\n  - id: fleet-block\n    on: request\n    patterns: [{{id: x, regex: 'fleet-forbidden'}}]\n    action: block\n"
    )
}

#[test]
fn a_bundle_published_to_the_fleet_reaches_a_running_node_and_bad_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(&dir.path().join("nats"));
    let p = crate::harness::PolicyEnv::with_settings(
        fleet_bundle,
        &format!(
            "ship:\n  nats:\n    url: \"{}\"\n    node: e2e-node\n",
            nats.url()
        ),
    );
    let publish = |file: &std::path::Path| {
        crate::harness::sluice(&[
            "policy",
            "publish",
            &file.display().to_string(),
            "--nats",
            &nats.url(),
        ])
    };
    let out = publish(&p.signed(11, "team"));
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.version() != 11 {
        assert!(
            Instant::now() < deadline,
            "bundle 11 never arrived:\n{}",
            p.env.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Signed by a key this node does not trust: refused here (the
    // transport is not trusted), audited, and 11 stays in force.
    let out = crate::harness::sluice(&[
        "policy",
        "keygen",
        &p.keys.join("other").display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let wait_audit = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let audit = text(&p.env.node.cli(&["audit", "--kind", "policy"]));
            if audit.contains(what) {
                return;
            }
            assert!(Instant::now() < deadline, "`{what}` not audited:\n{audit}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let out = publish(&p.signed(12, "other"));
    assert!(out.status.success(), "{}", text(&out));
    wait_audit("does not trust");
    // An older version, properly signed: not newer than the one in force.
    let out = publish(&p.signed(9, "team"));
    assert!(out.status.success(), "{}", text(&out));
    wait_audit("bundle version 9 is not newer");
    assert_eq!(p.version(), 11);
    // Not a signed bundle at all: refused by the publisher.
    let junk = dir.path().join("junk.jws");
    std::fs::write(&junk, "version: 99\n").unwrap();
    assert!(!publish(&junk).status.success());
}

#[test]
fn a_full_spool_fails_closed_or_drops_the_oldest_as_configured() {
    // Shipping to a NATS that is not there: the spool fills.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::https(&format!(
        "spool:\n  max_bytes: 16384\n  segment_bytes: 4096\nship:\n  nats:\n    url: \"nats://127.0.0.1:{port}\"\n    node: e2e-node\n"
    ));
    let _trust = env.trust_node_ca();
    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        let (code, out) = env.status_of("/json");
        if code != "200" {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "the spool never filled: {}",
            env.node.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!refused.status.success(), "{}", text(&refused));
    let status = env.node.status();
    assert!(
        status["spool"].as_str().unwrap().contains("FULL"),
        "{status:#}"
    );
    assert_eq!(status["shipping_connected"], false);
    let last = env.node.sessions();
    assert!(
        last.iter().any(|s| s["outcome"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("evidence spool full"))),
        "{last:#?}"
    );
    drop(env);

    // drop-oldest: the node keeps serving and says what it dropped.
    let env = Env::https("spool:\n  enabled: true\n  max_bytes: 16384\n  segment_bytes: 4096\n  when_full: drop-oldest\n");
    let _trust = env.trust_node_ca();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        env.get_ok(1);
        if env.node.status()["spool"]
            .as_str()
            .unwrap()
            .contains("DROPPED")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing dropped: {}",
            env.node.status()
        );
    }
    let bytes: u64 = std::fs::read_dir(env.state_dir().join("spool"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    // The bound holds even under a burst (room is made a segment at a time).
    assert!(bytes <= 16384, "spool holds {bytes} bytes");
}

#[test]
fn the_documented_alert_rules_load_in_prometheus() {
    let out = Command::new("promtool")
        .args([
            "check",
            "rules",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/alerts.yml"),
        ])
        .output()
        .expect("promtool (Debian's prometheus package)");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
}

#[test]
fn evidence_ships_over_tls_with_a_nats_user_and_strangers_read_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    crate::harness::must(&format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=nats-e2e-ca 2>/dev/null \
         && openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null \
         && printf 'subjectAltName=IP:127.0.0.1\\n' > ext.cnf \
         && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile ext.cnf 2>/dev/null"
    ));
    let password = format!("pw-{}", std::process::id());
    std::fs::write(dir.path().join("nats.pass"), format!("{password}\n")).unwrap();
    let nats = Nats::start_with(
        &dir.path().join("nats"),
        vec![
            "--tls".into(),
            "--tlscert".into(),
            format!("{d}/server.crt"),
            "--tlskey".into(),
            format!("{d}/server.key"),
            "--user".into(),
            "sluice".into(),
            "--pass".into(),
            password,
        ],
    );
    let url = nats.url();
    let cfg = format!(
        "ship:\n  nats:\n    url: \"{url}\"\n    node: e2e-node\n    tls_ca: \"{d}/ca.pem\"\n    user: sluice\n    password_file: \"{d}/nats.pass\"\n"
    );
    let env = Env::https_with(move |_| cfg.clone());
    let _trust = env.trust_node_ca();
    env.get_ok(1);
    let (ca, pass_file) = (format!("{d}/ca.pem"), format!("{d}/nats.pass"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let want = local_events(&env);
        let out = crate::harness::sluice(&[
            "verify",
            "--stream",
            &url,
            "--node",
            "e2e-node",
            "--nats-ca",
            &ca,
            "--nats-user",
            "sluice",
            "--nats-password-file",
            &pass_file,
        ]);
        let t = text(&out);
        if out.status.success() && t.contains(&format!("ok: {want} event(s)")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stream never caught up: {t}\n{}",
            env.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Without the user, or without trusting the server, nothing is read.
    let out = crate::harness::sluice(&[
        "verify",
        "--stream",
        &url,
        "--node",
        "e2e-node",
        "--nats-ca",
        &ca,
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let out = crate::harness::sluice(&[
        "verify",
        "--stream",
        &url,
        "--node",
        "e2e-node",
        "--nats-user",
        "sluice",
        "--nats-password-file",
        &pass_file,
    ]);
    assert!(!out.status.success(), "{}", text(&out));
}
