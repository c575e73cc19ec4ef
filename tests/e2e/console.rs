//! The console: a node ships its evidence to a real nats-server with
//! JetStream; `sluice-console` ingests it into its embedded store,
//! verifies the node's chain, and serves the pages, which a real browser
//! (Debian's Chromium, headless, over WebDriver) reads: the sessions of a
//! repository, one session's replay with its masked span, the node's
//! chain badge. Hostile: a recorded XSS payload stays text and never
//! runs; a re-written tail published on the node's subject is flagged as
//! broken; a message that is not an event is kept aside.
use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

/// The console binary, built beside `sluice` (`cargo test` builds every
/// workspace binary that has tests; `sluice-console` has).
fn console_bin() -> PathBuf {
    let bin = Path::new(SLUICE).with_file_name("sluice-console");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p sluice-console`",
        bin.display()
    );
    bin
}

struct Console {
    child: Child,
    base: String,
    dir: PathBuf,
}

impl Console {
    fn start(dir: &Path, nats: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new(console_bin())
            .args(["run", "--nats", nats, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("console.log")).unwrap())
            .spawn()
            .expect("start sluice-console");
        let c = Console {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir: dir.to_owned(),
        };
        wait_for("the console to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    fn api(&self, path: &str) -> Value {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .arg(format!("{}{path}", self.base))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Polls `path` until `ok` holds (ingest is asynchronous).
    fn wait_api(&self, path: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.api(path);
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "console {path}: {v:#}\nconsole log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Debian's Chromium through `tests/fixtures/browser.py`; one state per
/// step. Screenshots go to target/e2e-artifacts/console/.
fn browser(steps: &[String]) -> Vec<Value> {
    let shots = Path::new(SLUICE)
        .parent()
        .unwrap()
        .join("../e2e-artifacts/console");
    let out = Command::new("python3")
        .arg(format!("{FIXTURES}/browser.py"))
        .arg("--shots")
        .arg(&shots)
        .args(steps)
        .output()
        .expect(
            "run the browser (chromium, chromium-driver and selenium come from scripts/setup.sh)",
        );
    assert!(out.status.success(), "browser: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// One message on a NATS subject, over the plain client protocol (what
/// any process that can reach the server can do).
fn nats_publish(port: u16, subject: &str, payload: &[u8]) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let _ = s.read(&mut buf).unwrap(); // INFO
    let mut msg = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nPUB {subject} {}\r\n",
        payload.len()
    )
    .into_bytes();
    msg.extend_from_slice(payload);
    msg.extend_from_slice(b"\r\nPING\r\n");
    s.write_all(&msg).unwrap();
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"PONG") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "nats closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

const AWS_KEY: &str = "AKIAQ5TESTKEYSLUICE7";

fn bundle(version: u64, _dir: &Path) -> String {
    format!(
        r#"version: {version}
name: e2e-console
workloads:
  - name: e2e
    cgroup: "/{}-*"
rules:
  - id: mask-secrets
    on: response
    targets: [fake-api]
    workloads: [e2e]
    packs: [secrets]
    action: mask
"#,
        prefix()
    )
}

const XSS: &str = r#"<script>window.__pwned=true;document.title='pwned'</script><img src=x onerror="window.__pwned=true;alert('pwned')">"#;

#[test]
fn a_nodes_sessions_are_searched_replayed_and_verified_in_the_console_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(&dir.path().join("nats"));
    let p = PolicyEnv::with_settings(
        bundle,
        &format!(
            "ship:\n  nats:\n    url: \"{}\"\n    node: e2e-node\n",
            nats.url()
        ),
    );
    let out = p.push(&p.signed(10, "team"));
    assert!(out.status.success(), "{}", text(&out));
    let env = &p.env;
    let _trust = env.trust_node_ca();
    // A CI job of acme/widgets makes a request and posts a payload that
    // would run as script if a page rendered it as markup.
    let job = |args: &[&str]| {
        let mut full = vec![
            "-sS",
            "--max-time",
            "30",
            "--resolve",
            &format!("api.fake.test:443:{}", env.remote.remote),
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        full.extend(args.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let out = env
            .cgroup
            .command("curl", &refs)
            .env("GITHUB_ACTIONS", "true")
            .env("GITHUB_REPOSITORY", "acme/widgets")
            .env("GITHUB_RUN_ID", "4242")
            .env("GITHUB_JOB", "build")
            .env("GITHUB_ACTOR", "alice")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    };
    job(&["https://api.fake.test:443/json"]);
    // The upstream echoes the body: the answer the job gets (and the
    // record) has the key masked.
    let posted_body = format!("{XSS} key={AWS_KEY}");
    job(&[
        "-X",
        "POST",
        "--data-binary",
        &posted_body,
        "https://api.fake.test:443/echo",
    ]);
    // And a connection of another repository, which the search must leave out.
    env.get_ok(1);

    let console = Console::start(&dir.path().join("console"), &nats.url());
    let sessions = console.wait_api("/api/sessions?repository=acme/widgets", |v| {
        v["sessions"].as_array().is_some_and(|s| {
            s.len() >= 2
                && s.iter().all(|s| s["ended_at_ms"].is_u64())
                && s.iter()
                    .map(|s| s["exchanges"].as_u64().unwrap_or(0))
                    .sum::<u64>()
                    >= 2
        })
    });
    let rows = sessions["sessions"].as_array().unwrap();
    assert!(rows.iter().all(|s| s["repository"] == "acme/widgets"
        && s["actor"] == "alice"
        && s["run_id"] == "4242"
        && s["node"] == "e2e-node"));
    // The other connection is there, only filtered out.
    let n = rows.len();
    console.wait_api("/api/sessions?node=e2e-node", |v| {
        v["sessions"].as_array().is_some_and(|s| s.len() > n)
    });
    let nodes = console.wait_api("/api/nodes", |v| v["nodes"][0]["chain_state"] == "verified");
    assert_eq!(nodes["nodes"][0]["name"], "e2e-node", "{nodes:#}");

    // The browser: search by repository, open the session with the
    // payload, see it as text with the chain verified.
    let posted = rows
        .iter()
        .find(|s| {
            let d = console.api(&format!("/api/sessions/e2e-node/{}", s["id"]));
            d["exchanges"][0]["summary"]
                .as_str()
                .is_some_and(|x| x.starts_with("POST"))
        })
        .expect("the POST session");
    let replay = format!("{}/sessions/e2e-node/{}", console.base, posted["id"]);
    let states = browser(&[
        format!("open:{}/sessions", console.base),
        "fill:input[name=repository]|acme/widgets".into(),
        "click:button[type=submit]".into(),
        "shot:sessions".into(),
        format!("open:{replay}"),
        "shot:replay".into(),
        format!("open:{}/nodes", console.base),
        "shot:nodes".into(),
    ]);
    let search = &states[2];
    assert_eq!(
        search["links"].as_array().unwrap().len(),
        rows.len(),
        "one row per session of the repository: {search:#}"
    );
    assert!(search["text"].as_str().unwrap().contains("acme/widgets"));
    let page = &states[3];
    assert_eq!(page["badges"], serde_json::json!(["verified"]), "{page:#}");
    let t = page["text"].as_str().unwrap();
    assert!(
        t.contains("POST api.fake.test/echo") && t.contains(XSS),
        "{t}"
    );
    assert_eq!(
        page["marks"],
        serde_json::json!(["*".repeat(AWS_KEY.len())]),
        "the masked span in the recorded response is marked: {page:#}"
    );
    assert!(t.contains("mask by rule mask-secrets"), "{t}");
    assert_eq!(page["script_ran"], false, "{page:#}");
    assert!(
        page["alert"].is_null() && page["title"] != "pwned",
        "{page:#}"
    );
    assert!(states[4]["text"].as_str().unwrap().contains("e2e-node"));

    // A message that is not an event, then a re-written tail: event 1
    // again, self-consistent, with other content.
    nats_publish(nats.port, "sluice.evidence.e2e-node.node", b"not an event");
    let body = br#"{"forged":true}"#;
    let prev = [0u8; 32];
    let hash = sluice_evidence::chain::link_hash(
        &prev,
        1,
        &sluice_evidence::chain::content_digest(1, 0, "audit.forged", body),
    );
    let forged = serde_json::json!({
        "seq": 1, "prev": hex::encode(prev), "hash": hex::encode(hash), "at_ms": 1,
        "connection": 0, "kind": "audit.forged", "node": "e2e-node", "actor": "node",
        "body": {"forged": true},
    });
    nats_publish(
        nats.port,
        "sluice.evidence.e2e-node.node",
        forged.to_string().as_bytes(),
    );
    let nodes = console.wait_api("/api/nodes", |v| v["nodes"][0]["chain_state"] == "broken");
    assert!(
        nodes["nodes"][0]["chain_detail"]
            .as_str()
            .unwrap()
            .contains("published again with other content"),
        "{nodes:#}"
    );
    let states = browser(&[format!("open:{replay}"), "shot:replay-broken".into()]);
    assert_eq!(states[0]["badges"], serde_json::json!(["broken"]));
    // The evidence already held is not replaced by the forgery.
    let d = console.api(&format!("/api/sessions/e2e-node/{}", posted["id"]));
    assert!(d["exchanges"][0]["summary"]
        .as_str()
        .unwrap()
        .starts_with("POST"));

    // Restarted, the console resumes from its durable consumer and store:
    // nothing is counted twice.
    let events = nodes["nodes"][0]["events"].as_u64().unwrap();
    drop(console);
    let console = Console::start(&dir.path().join("console"), &nats.url());
    env.get_ok(1);
    let again = console.wait_api("/api/nodes", |v| {
        v["nodes"][0]["events"].as_u64().unwrap_or(0) > events
    });
    assert_eq!(
        again["nodes"][0]["chain_state"], "broken",
        "a break stays flagged"
    );
}
