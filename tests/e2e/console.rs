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

use base64::Engine;
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
    // And a connection of another repository (the next job its runner
    // runs in this cgroup), which the search must leave out.
    let resolve = format!("api.fake.test:443:{}", env.remote.remote);
    let out = env
        .cgroup
        .under_runner(
            "Runner.Worker",
            env.dir.path(),
            "curl",
            &[
                "-sS",
                "--max-time",
                "30",
                "--resolve",
                &resolve,
                "https://api.fake.test:443/json",
            ],
        )
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_REPOSITORY", "acme/other")
        .env("GITHUB_RUN_ID", "5151")
        .env("GITHUB_ACTOR", "carol")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

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

/// A request and its reply over the plain client protocol (the reply
/// subject is the caller's own inbox).
fn nats_request(port: u16, subject: &str, payload: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 65536];
    let _ = s.read(&mut buf).unwrap(); // INFO
    let inbox = "_INBOX.e2e-forger";
    let mut msg = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {inbox} 1\r\nPUB {subject} {inbox} {}\r\n",
        payload.len()
    )
    .into_bytes();
    msg.extend_from_slice(payload);
    msg.extend_from_slice(b"\r\n");
    s.write_all(&msg).unwrap();
    let mut got = Vec::new();
    loop {
        let n = s.read(&mut buf).expect("a reply from the node");
        assert!(n > 0, "nats closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(at) = text.find(&format!("MSG {inbox} 1 ")) {
            let head_end = at + text[at..].find("\r\n").unwrap_or(0);
            if head_end == at {
                continue;
            }
            let len: usize = text[at..head_end]
                .rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let body_at = head_end + 2;
            if got.len() >= body_at + len {
                return got[body_at..body_at + len].to_vec();
            }
        }
        if text.contains("PING\r\n") {
            s.write_all(b"PONG\r\n").unwrap();
        }
    }
}

fn fleet_bundle(version: u64, _dir: &Path) -> String {
    format!(
        r#"version: {version}
name: e2e-console-fleet
workloads:
  - name: e2e
    cgroup: "/{}-*"
rules:
  - id: approve-deploys
    on: request
    targets: [fake-api]
    patterns:
      - id: deploy
        regex: 'DEPLOY-TO-PROD'
    action: approve
    timeout_secs: 90
"#,
        prefix()
    )
}

/// A node following the console: ships to NATS as `name`, trusts the
/// console's key, the fleet bundle in force (dropped into its watch
/// directory: pushing over the control socket is off).
fn fleet_node(nats: &Nats, name: &str, console_pub: &Path) -> PolicyEnv {
    let p = PolicyEnv::with_settings(
        fleet_bundle,
        &format!(
            "ship:\n  nats:\n    url: \"{}\"\n    node: {name}\nconsole:\n  keys: [\"{}\"]\n",
            nats.url(),
            console_pub.display()
        ),
    );
    let jws = p.signed(10, "team");
    let pushed = p.push(&jws);
    assert!(
        !pushed.status.success() && text(&pushed).contains("follows a console"),
        "a push over the control socket is refused when following a console: {}",
        text(&pushed)
    );
    std::fs::copy(&jws, p.env.dir.path().join("policy.d/fleet.jws")).unwrap();
    wait_for("the bundle from the watch directory", || p.version() == 10);
    p
}

/// A job of acme/widgets on `env` (as GitHub Actions runs it): POSTs
/// `body` to the fake API's echo; returns the status code and the body.
fn widgets_job(env: &Env, body: &str) -> (u16, String) {
    let resolve = format!("api.fake.test:443:{}", env.remote.remote);
    let out = env
        .cgroup
        .command(
            "curl",
            &[
                "-sS",
                "--max-time",
                "100",
                "--resolve",
                &resolve,
                "-w",
                "\n%{http_code}",
                "-X",
                "POST",
                "--data-binary",
                body,
                "https://api.fake.test:443/echo",
            ],
        )
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_REPOSITORY", "acme/widgets")
        .env("GITHUB_RUN_ID", "777")
        .env("GITHUB_JOB", "deploy")
        .env("GITHUB_ACTOR", "alice")
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = t.rsplit_once('\n').unwrap_or(("", "0"));
    let code = code.trim().parse().unwrap_or(0);
    if code == 0 {
        // No answer: say what curl saw.
        return (
            0,
            format!("{body}\ncurl: {}", String::from_utf8_lossy(&out.stderr)),
        );
    }
    (code, body.to_owned())
}

fn held_on(console: &Console, node: &str, env: &Env) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !console.api("/api/approvals")["held"]
        .as_array()
        .is_some_and(|h| h.iter().any(|h| h["node"] == node))
    {
        assert!(
            Instant::now() < deadline,
            "nothing held on {node}; its log:\n{}",
            env.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    console.api("/api/approvals")["held"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["node"] == node)
        .unwrap()
        .clone()
}

#[test]
fn the_console_approves_a_held_request_and_suspends_a_repository_on_another_node_signed() {
    let dir = tempfile::tempdir().unwrap();
    let console_dir = dir.path().join("console");
    // The console's key, made on first use, as an admin lists it in
    // every node's configuration.
    let key = Command::new(console_bin())
        .args(["key", "--state-dir"])
        .arg(&console_dir)
        .output()
        .unwrap();
    assert!(key.status.success(), "{}", text(&key));
    let console_pub = dir.path().join("console.pub");
    std::fs::write(&console_pub, &key.stdout).unwrap();

    let nats = Nats::start(&dir.path().join("nats"));
    let console = Console::start(&console_dir, &nats.url());
    let a = fleet_node(&nats, "node-a", &console_pub);
    let b = fleet_node(&nats, "node-b", &console_pub);
    // An admin enrolls node A's checkpoint key (its node-signing.pub);
    // node B's is pinned on first sight.
    let enrolled = Command::new(console_bin())
        .args(["enroll", "--node", "node-a", "--key"])
        .arg(a.env.state_dir().join("node-signing.pub"))
        .arg("--state-dir")
        .arg(&console_dir)
        .output()
        .unwrap();
    assert!(enrolled.status.success(), "{}", text(&enrolled));
    let _ta = a.env.trust_node_ca();
    let _tb = b.env.trust_node_ca();

    // Both nodes beat: the bundle in force, and decisions signed only.
    let nodes = console.wait_api("/api/nodes", |v| {
        ["node-a", "node-b"]
            .iter()
            .all(|n| v["heartbeats"][n]["heartbeat"]["status"]["policy_version"] == 10)
    });
    for n in ["node-a", "node-b"] {
        let hb = &nodes["heartbeats"][n]["heartbeat"];
        assert_eq!(hb["local_decisions"], false, "{hb:#}");
        assert_eq!(hb["status"]["version"], env!("CARGO_PKG_VERSION"), "{hb:#}");
    }

    std::thread::scope(|sc| {
        // A job on node A asks for a production deploy: held.
        let held_at = Instant::now();
        let job = sc.spawn(|| widgets_job(&a.env, "DEPLOY-TO-PROD v1.2"));
        let h = held_on(&console, "node-a", &a.env);
        eprintln!("hold → listed by the console: {:?}", held_at.elapsed());
        assert_eq!(h["rule"], "approve-deploys", "{h:#}");
        // An operator anywhere sees it from the CLI, through the console.
        let listed = crate::harness::sluice(&["--console", &console.base, "approvals", "list"]);
        let t = text(&listed);
        assert!(
            listed.status.success()
                && t.contains("node-a")
                && t.contains("acme/widgets")
                && t.contains("approve-deploys"),
            "{t}"
        );
        assert_eq!(h["ci"]["repository"], "acme/widgets", "{h:#}");
        assert!(h["preview"].as_str().unwrap().contains("DEPLOY-TO-PROD"));
        let id = h["id"].as_u64().unwrap();
        let first_session = h["session"].as_u64().unwrap();

        // The job's root reaching the node's socket (through a host daemon)
        // cannot approve its own request.
        let own = a.env.node.cli(&["approvals", "approve", &id.to_string()]);
        assert!(
            !own.status.success() && text(&own).contains("follows a console"),
            "{}",
            text(&own)
        );
        // Forged decisions on NATS: another key; the console's key for
        // another hold; the console's key for another node. Each is refused
        // by the node, and the request stays held.
        let forger =
            sluice_fleet::signed::Signer::load_or_create(&dir.path().join("forger")).unwrap();
        let console_key =
            sluice_fleet::signed::Signer::load(&console_dir.join("console-signing.key")).unwrap();
        let decision = |node: &str, hold: &str| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            sluice_fleet::approval::Decision {
                node: node.into(),
                id,
                hold: hold.into(),
                verdict: sluice_fleet::approval::Verdict::Approve,
                by: "mallory".into(),
                reason: "forged".into(),
                iat: now,
                exp: now + 60,
            }
        };
        let hold = h["hold"].as_str().unwrap();
        for (token, says) in [
            (
                forger
                    .sign(
                        sluice_fleet::approval::DECISION_TYP,
                        &decision("node-a", hold),
                    )
                    .unwrap(),
                "does not trust",
            ),
            (
                console_key
                    .sign(
                        sluice_fleet::approval::DECISION_TYP,
                        &decision("node-a", "0000"),
                    )
                    .unwrap(),
                "no request",
            ),
            (
                console_key
                    .sign(
                        sluice_fleet::approval::DECISION_TYP,
                        &decision("node-b", hold),
                    )
                    .unwrap(),
                "not this one",
            ),
            (
                // A bundle-kind message under the console's key.
                console_key
                    .sign("sluice-suspensions+jwt", &decision("node-a", hold))
                    .unwrap(),
                "where a sluice-decision+jwt was expected",
            ),
        ] {
            let reply = nats_request(nats.port, "sluice.fleet.decide.node-a", token.as_bytes());
            let reply: Value = serde_json::from_slice(&reply).unwrap();
            assert_eq!(reply["accepted"], false, "{reply:#}");
            assert!(
                reply["message"].as_str().unwrap().contains(says),
                "{says}: {reply:#}"
            );
        }
        assert!(!job.is_finished(), "a forged decision released the request");
        assert_eq!(held_on(&console, "node-a", &a.env)["hold"], h["hold"]);

        // The approver, in the browser: the page lists the hold live, and
        // approving it releases the job's request.
        let decided_at = Instant::now();
        let states = browser(&[
            format!("open:{}/approvals", console.base),
            "wait:div.held[data-node=node-a]".into(),
            "shot:approvals".into(),
            "fill:div.held[data-node=node-a] input[name=reason]|change CHG-1234".into(),
            "click:div.held[data-node=node-a] button[value=approve]".into(),
            "shot:approved".into(),
        ]);
        let after = states.last().unwrap()["text"].as_str().unwrap().to_owned();
        assert!(
            after.contains(&format!("node-a: request {id} approved")),
            "{after}"
        );
        assert!(
            after.contains("change CHG-1234"),
            "the decision is in the history: {after}"
        );
        let (code, body) = job.join().unwrap();
        eprintln!(
            "approve click → request released: {:?}",
            decided_at.elapsed()
        );
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("DEPLOY-TO-PROD v1.2"), "{body}");
        // The node recorded who decided, and with which key.
        let decided = a.env.node.cli(&["audit", "--kind", "approval.decided"]);
        let d = String::from_utf8_lossy(&decided.stdout).into_owned();
        assert!(
            d.contains("\"by\":\"local\"") && d.contains(&console_key.kid),
            "{d}"
        );
        let refused = a.env.node.cli(&["audit", "--kind", "decision.refused"]);
        let r = String::from_utf8_lossy(&refused.stdout).into_owned();
        assert!(r.contains("does not trust"), "{r}");

        // Node B runs the same repository's job, allowed; then the
        // repository is suspended from the console, and B refuses it within
        // seconds. A request of the repository held on A is denied.
        let (code, _) = widgets_job(&b.env, "hello");
        assert_eq!(code, 200);
        // The approvals page, open before the request is held, shows it
        // without anyone reloading (its script follows the API).
        let opened = dir.path().join("approvals-open");
        let steps = [
            format!("open:{}/approvals", console.base),
            format!("touch:{}", opened.display()),
            "wait:div.held[data-node=node-a]".into(),
            "shot:approvals-live".into(),
        ];
        let live = sc.spawn(move || browser(&steps));
        wait_for("the approvals page to open", || opened.exists());
        let held_job = sc.spawn(|| widgets_job(&a.env, "DEPLOY-TO-PROD v2"));
        held_on(&console, "node-a", &a.env);
        let states = live.join().unwrap();
        assert!(
            states[0]["text"]
                .as_str()
                .unwrap()
                .contains("No request is waiting"),
            "{:#}",
            states[0]
        );
        assert!(
            states[1]["text"]
                .as_str()
                .unwrap()
                .contains("DEPLOY-TO-PROD v2"),
            "{:#}",
            states[1]
        );
        let suspended_at = Instant::now();
        let states = browser(&[
            format!("open:{}/identities", console.base),
            "fill:#suspend input[name=value]|acme/widgets".into(),
            "fill:#suspend input[name=reason]|INC-42 leaked token".into(),
            "click:#suspend button".into(),
            "shot:suspended".into(),
        ]);
        let t = states.last().unwrap()["text"].as_str().unwrap().to_owned();
        assert!(
            t.contains("repository acme/widgets suspended on every node"),
            "{t}"
        );
        assert!(t.contains("INC-42 leaked token"), "{t}");
        let refused_b = loop {
            let (code, body) = widgets_job(&b.env, "hello");
            if code == 403 {
                break body;
            }
            assert!(
                suspended_at.elapsed() < Duration::from_secs(20),
                "node B still serves the suspended repository: {code} {body}\n{}",
                b.env.node.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        eprintln!(
            "suspend click → node B refuses: {:?}",
            suspended_at.elapsed()
        );
        assert!(refused_b.contains("INC-42 leaked token"), "{refused_b}");
        let (code, body) = held_job.join().unwrap();
        assert_eq!(
            code, 403,
            "the held request of the suspended repository: {body}"
        );
        assert!(body.contains("suspended"), "{body}");
        // The job's root cannot lift it through the node's socket.
        let lift = b
            .env
            .node
            .cli(&["identities", "resume", "repository:acme/widgets"]);
        assert!(
            !lift.status.success() && text(&lift).contains("follows a console"),
            "{}",
            text(&lift)
        );
        // A genuinely signed but older list, empty, republished into the
        // bucket (anyone on NATS can publish one) does not lift it either:
        // the node keeps the newest it applied.
        let now = console.wait_api("/api/suspensions", |v| {
            v["entries"].as_array().is_some_and(|e| e.len() == 1)
        });
        let old = console_key
            .sign(
                sluice_fleet::suspension::LIST_TYP,
                &sluice_fleet::suspension::List {
                    version: now["version"].as_u64().unwrap() - 1,
                    entries: Vec::new(),
                    iat: 0,
                },
            )
            .unwrap();
        nats_publish(nats.port, "$KV.SLUICE_SUSPENSIONS.list", old.as_bytes());
        std::thread::sleep(Duration::from_secs(3));
        let (code, body) = widgets_job(&b.env, "hello");
        assert_eq!(
            code,
            403,
            "a replayed older list lifted the suspension: {body}\n{}",
            b.env.node.log_text()
        );

        // Resumed from the console (admin), B serves the repository again.
        let states = browser(&[
            format!("open:{}/identities", console.base),
            "click:table#suspended button".into(),
            "shot:resumed".into(),
        ]);
        assert!(
            states.last().unwrap()["text"]
                .as_str()
                .unwrap()
                .contains("repository acme/widgets resumed"),
            "{:#}",
            states.last().unwrap()
        );
        wait_for("node B to serve the resumed repository", || {
            widgets_job(&b.env, "hello").0 == 200
        });
        wait_for("node A to serve the resumed repository", || {
            widgets_job(&a.env, "hello").0 == 200
        });
        // Denied from the CLI through the console: the job gets the reason.
        let denied_job = sc.spawn(|| widgets_job(&a.env, "DEPLOY-TO-PROD v3"));
        let h = held_on(&console, "node-a", &a.env);
        let id = h["id"].as_u64().unwrap().to_string();
        let out = crate::harness::sluice(&[
            "--console",
            &console.base,
            "approvals",
            "deny",
            &id,
            "--node",
            "node-a",
            "--reason",
            "no change ticket",
        ]);
        assert!(
            out.status.success() && text(&out).contains("denied"),
            "{}",
            text(&out)
        );
        let (code, body) = denied_job.join().unwrap();
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("no change ticket"), "{body}");
        // A decision on what is no longer held is refused with the reason.
        let again = crate::harness::sluice(&[
            "--console",
            &console.base,
            "approvals",
            "approve",
            &id,
            "--node",
            "node-a",
        ]);
        assert!(
            !again.status.success() && text(&again).contains("no request"),
            "{}",
            text(&again)
        );
        let states = browser(&[
            format!("open:{}/nodes", console.base),
            "shot:nodes-fleet".into(),
        ]);
        let t = states[0]["text"].as_str().unwrap();
        assert!(
            t.contains("node-a") && t.contains("node-b") && t.contains("signed only"),
            "{t}"
        );

        // Signed checkpoints travel in the stream: the console pins each
        // node's key on first sight and checks every checkpoint against
        // it and the event it covers; `verify --stream` checks them too.
        let nodes = console.wait_api("/api/nodes", |v| {
            v["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 2 && n.iter().all(|n| n["checkpoint_n"].is_u64()))
        });
        for n in nodes["nodes"].as_array().unwrap() {
            assert_eq!(n["chain_state"], "verified", "{n:#}");
            let want = if n["name"] == "node-a" {
                "enrolled"
            } else {
                "first-sight"
            };
            assert_eq!(n["key_source"], want, "{n:#}");
        }
        // The approved request's session, exported from the console alone
        // with its proof, checks offline against node A's signed chain;
        // altered, it does not.
        let export = dir.path().join("export.jsonl");
        let proof_at = Instant::now();
        loop {
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "10", "-o"])
                .arg(&export)
                .arg(format!(
                    "{}/api/sessions/node-a/{}/export.jsonl",
                    console.base, first_session
                ))
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", text(&out));
            let t = std::fs::read_to_string(&export).unwrap();
            if t.contains("\"checkpoint\":{") {
                assert!(t.contains("DEPLOY-TO-PROD v1.2"), "{t}");
                break;
            }
            assert!(
                proof_at.elapsed() < Duration::from_secs(60),
                "no proof yet: {t}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let ok = crate::harness::sluice(&["verify", "--export", &export.display().to_string()]);
        assert!(
            ok.status.success() && text(&ok).contains("lead to signed checkpoint"),
            "{}",
            text(&ok)
        );
        assert!(
            text(&ok).contains("record(s) the file shows are the proven events"),
            "{}",
            text(&ok)
        );
        // The same session as HAR (what browser dev tools open), with the
        // same proof: it checks; one entry edited (its proof left alone)
        // does not.
        let har_file = dir.path().join("export.har");
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10", "-o"])
            .arg(&har_file)
            .arg(format!(
                "{}/api/sessions/node-a/{}/export.har",
                console.base, first_session
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let har: Value = serde_json::from_slice(&std::fs::read(&har_file).unwrap()).unwrap();
        assert_eq!(har["log"]["version"], "1.2", "{har:#}");
        let entry = &har["log"]["entries"][0];
        assert_eq!(entry["request"]["method"], "POST", "{har:#}");
        assert!(
            entry["request"]["postData"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("DEPLOY-TO-PROD v1.2")),
            "{har:#}"
        );
        let ok = crate::harness::sluice(&["verify", "--export", &har_file.display().to_string()]);
        assert!(
            ok.status.success() && text(&ok).contains("are the proven events"),
            "{}",
            text(&ok)
        );
        let mut edited = har.clone();
        edited["log"]["entries"][0]["response"]["status"] = serde_json::json!(599);
        std::fs::write(&har_file, edited.to_string()).unwrap();
        let bad = crate::harness::sluice(&["verify", "--export", &har_file.display().to_string()]);
        assert!(
            !bad.status.success() && text(&bad).contains("BROKEN: HAR entry 0 differs"),
            "{}",
            text(&bad)
        );
        let altered = std::fs::read_to_string(&export)
            .unwrap()
            .replace("DEPLOY-TO-PROD v1.2", "DEPLOY-TO-PROD v1.3");
        std::fs::write(&export, altered).unwrap();
        let bad = crate::harness::sluice(&["verify", "--export", &export.display().to_string()]);
        assert!(
            !bad.status.success() && text(&bad).contains("BROKEN"),
            "{}",
            text(&bad)
        );
        let out = crate::harness::sluice(&["verify", "--stream", &nats.url(), "--node", "node-a"]);
        let t = text(&out);
        assert!(
            out.status.success() && !t.contains(" 0 signed checkpoint"),
            "{t}"
        );
        // A checkpoint for node B under another key, as anyone on NATS
        // could publish it: node B's chain is flagged, node A's is not.
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        use ring::signature::KeyPair;
        let raw = pair.public_key().as_ref().to_vec();
        let kid = sluice_fleet::keys::kid_of(&raw);
        let head = [7u8; 32];
        let cp = sluice_evidence::checkpoint::Checkpoint {
            n: 999,
            seq: 0,
            head: hex::encode(head),
            at_ms: 1,
            kid: kid.clone(),
            sig: base64::engine::general_purpose::STANDARD.encode(
                pair.sign(&sluice_evidence::checkpoint::message(999, 0, &head, 1))
                    .as_ref(),
            ),
        };
        let forged = sluice_evidence::checkpoint::Shipped {
            node: "node-b".into(),
            checkpoint: cp,
            node_key: sluice_evidence::checkpoint::PublicKey {
                kid: kid.clone(),
                alg: "Ed25519".into(),
                ed25519: base64::engine::general_purpose::STANDARD.encode(&raw),
            },
        };
        nats_publish(
            nats.port,
            "sluice.evidence.node-b.$checkpoint",
            serde_json::to_string(&forged).unwrap().as_bytes(),
        );
        let nodes = console.wait_api("/api/nodes", |v| {
            v["nodes"].as_array().is_some_and(|n| {
                n.iter()
                    .any(|n| n["name"] == "node-b" && n["chain_state"] == "broken")
            })
        });
        let b_row = nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "node-b")
            .unwrap();
        assert!(
            b_row["chain_detail"].as_str().unwrap().contains(&format!(
                "signed by key {kid}, not the node's first-sight key"
            )),
            "{b_row:#}"
        );
        let a_row = nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "node-a")
            .unwrap();
        assert_eq!(a_row["chain_state"], "verified", "{a_row:#}");
        let out = crate::harness::sluice(&["verify", "--stream", &nats.url(), "--node", "node-b"]);
        assert!(
            !out.status.success() && text(&out).contains("forged"),
            "{}",
            text(&out)
        );
        // A bundle published from the console (pushing over a node's
        // socket is off): node A applies it (signed by a key it trusts),
        // node B, whose team key is another, refuses it.
        let jws = std::fs::read_to_string(a.signed(11, "team")).unwrap();
        let states = browser(&[
            format!("open:{}/policy", console.base),
            format!("fill:#publish textarea[name=jws]|{}", jws.trim()),
            "click:#publish button".into(),
            "shot:policy".into(),
        ]);
        let t = states.last().unwrap()["text"].as_str().unwrap().to_owned();
        assert!(t.contains("version 11") && t.contains("published"), "{t}");
        console.wait_api("/api/policy", |v| {
            v["nodes"]["node-a"]["policy_version"] == 11
        });
        wait_for("node B to refuse the bundle signed by A's team key", || {
            b.env
                .node
                .log_text()
                .contains("bundle from the fleet refused")
        });
        assert_eq!(b.version(), 10);
        let states = browser(&[
            format!("open:{}/nodes", console.base),
            "shot:nodes-checkpoints".into(),
        ]);
        assert!(states[0]["text"].as_str().unwrap().contains("first-sight"));
    });
}
