//! Webhook notifications through the real binary: `sluice-console run`
//! against a real nats-server (Debian's, installed by scripts/setup.sh;
//! the test fails, not skips, without it) and a JSON webhook receiver on
//! loopback. A held-request notice alerts `approval.pending` once, even
//! when the notice is repeated and heartbeats re-list the hold; evidence
//! events on the stream alert `anomaly` and `chain.gap`.
use std::{
    io::{Read, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{body::Bytes, extract::State, http::HeaderMap, routing::post, Router};
use ring::hmac;
use serde_json::{json, Value};
use sluice_evidence::chain::{content_digest, link_hash, GENESIS};
use sluice_fleet::approval::{Held, Notice};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-console");

/// Ends a child this test started.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats_server(dir: &Path) -> (Kill, u16) {
    let port = free_port();
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("nats.log")).unwrap())
        .spawn()
        .expect("start nats-server (installed by scripts/setup.sh)");
    let child = Kill(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

/// A core NATS publish over plain TCP, flushed with a PING.
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

type Got = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

async fn receiver() -> (Got, u16) {
    async fn take(State(got): State<Got>, headers: HeaderMap, body: Bytes) -> &'static str {
        got.lock().unwrap().push((headers, body.to_vec()));
        "ok"
    }
    let got = Got::default();
    let app = Router::new()
        .route("/hook", post(take))
        .with_state(got.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await });
    (got, port)
}

fn kinds(got: &Got) -> Vec<Value> {
    got.lock()
        .unwrap()
        .iter()
        .map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap())
        .collect()
}

async fn wait_for(what: &str, log: &Path, within: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !ok() {
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}; the console said:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn held(id: u64, hold: &str) -> Held {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    Held {
        node: "node-x".into(),
        id,
        hold: hold.into(),
        session: 1,
        identity: "wl-1".into(),
        ci: None,
        rule: "needs-approval".into(),
        message: "a person decides".into(),
        method: "POST".into(),
        authority: "api2.cursor.sh".into(),
        path: "/v1/chat".into(),
        preview: "the prompt".into(),
        created_ms: now,
        expires_ms: now + 300_000,
    }
}

fn heartbeat(held: Vec<Held>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "node": "node-x", "at_ms": 1, "status": {}, "durable_seq": 0,
        "suspensions_version": 0, "local_decisions": false, "held": held,
    }))
    .unwrap()
}

/// One evidence event as a node ships it.
fn event(seq: u64, prev: [u8; 32], kind: &str, body: &str) -> (Vec<u8>, [u8; 32]) {
    let hash = link_hash(&prev, seq, &content_digest(seq, 0, kind, body.as_bytes()));
    let line = format!(
        r#"{{"seq":{seq},"prev":"{}","hash":"{}","at_ms":{seq},"connection":0,"kind":"{kind}","node":"node-x","actor":"node","body":{body}}}"#,
        hex::encode(prev),
        hex::encode(hash)
    );
    (line.into_bytes(), hash)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_alerts_a_held_request_once_and_evidence_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, nats_port) = nats_server(dir.path());
    let (got, hook_port) = receiver().await;
    // Made for this test only.
    let secret = b"webhook-test-secret-0123456789";
    let secret_file = dir.path().join("webhook-secret");
    std::fs::write(&secret_file, secret).unwrap();
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let log = dir.path().join("console.log");
    let console = Command::new(BIN)
        .args(["run", "--nats", &format!("nats://127.0.0.1:{nats_port}")])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--webhook-json",
            &format!("http://127.0.0.1:{hook_port}/hook"),
        ])
        .arg("--webhook-secret-file")
        .arg(&secret_file)
        .args(["--public-url", "https://console.test"])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        // The console logs to stdout.
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("console.err")).unwrap())
        .spawn()
        .unwrap();
    let mut console = Kill(console);
    let ready = |what: &'static str| {
        let log = log.clone();
        move || std::fs::read_to_string(&log).is_ok_and(|l| l.contains(what))
    };
    let dump = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(
        "the console to follow holds",
        &log,
        Duration::from_secs(30),
        ready("following the fleet's holds"),
    )
    .await;
    wait_for(
        "the console to ingest",
        &log,
        Duration::from_secs(30),
        ready("ingesting evidence"),
    )
    .await;
    assert!(console.0.try_wait().unwrap().is_none(), "{}", dump());

    let notice = serde_json::to_vec(&Notice::Held(Box::new(held(1, "hold-1")))).unwrap();
    nats_publish(nats_port, "sluice.fleet.held.node-x", &notice);
    wait_for("approval.pending", &log, Duration::from_secs(10), || {
        !got.lock().unwrap().is_empty()
    })
    .await;

    // The same notice again, and heartbeats re-listing the hold: no new
    // alert. A hold only a heartbeat names (its notice missed) is one,
    // and tells that the heartbeats were read.
    nats_publish(nats_port, "sluice.fleet.held.node-x", &notice);
    nats_publish(
        nats_port,
        "sluice.fleet.heartbeat.node-x",
        &heartbeat(vec![held(1, "hold-1")]),
    );
    nats_publish(
        nats_port,
        "sluice.fleet.heartbeat.node-x",
        &heartbeat(vec![held(1, "hold-1"), held(2, "hold-2")]),
    );
    wait_for("the missed hold", &log, Duration::from_secs(10), || {
        got.lock().unwrap().len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = kinds(&got);
    assert_eq!(v.len(), 2, "{v:?}\n{}", dump());
    for (a, id) in v.iter().zip([1, 2]) {
        assert_eq!(a["kind"], "approval.pending");
        assert_eq!(a["node"], "node-x");
        assert_eq!(a["link"], "https://console.test/approvals");
        assert_eq!(a["detail"]["id"], id);
    }

    // Signed over `<timestamp>.<body>` with the secret, and not with
    // another.
    for (headers, body) in got.lock().unwrap().iter() {
        let ts = headers["x-sluice-timestamp"].to_str().unwrap();
        let sig = headers["x-sluice-signature"].to_str().unwrap();
        let mac = hex::decode(sig.strip_prefix("sha256=").unwrap()).unwrap();
        let mut msg = format!("{ts}.").into_bytes();
        msg.extend_from_slice(body);
        let key = |k: &[u8]| hmac::Key::new(hmac::HMAC_SHA256, k);
        assert!(hmac::verify(&key(secret), &msg, &mac).is_ok());
        assert!(hmac::verify(&key(b"another-secret-0123456789"), &msg, &mac).is_err());
    }

    // Evidence: a forged CI identity, then events missing.
    let forged = r#"{"kind":"ci-identity-claim","session":0,"identity":"wl-1","claimed":{"repository":"acme/prod"},"trusted":{"repository":"acme/app"},"pid":7,"comm":"curl"}"#;
    let (line, hash) = event(0, GENESIS, "anomaly.identity", forged);
    nats_publish(nats_port, "sluice.evidence.node", &line);
    let (line, _) = event(5, hash, "approval.decided", r#"{"by":"x"}"#);
    nats_publish(nats_port, "sluice.evidence.node", &line);
    wait_for("evidence alerts", &log, Duration::from_secs(15), || {
        got.lock().unwrap().len() >= 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = kinds(&got);
    let k: Vec<&str> = v.iter().filter_map(|a| a["kind"].as_str()).collect();
    assert_eq!(
        k,
        [
            "approval.pending",
            "approval.pending",
            "anomaly",
            "chain.gap"
        ],
        "{}",
        dump()
    );
    assert!(v[2]["summary"].as_str().unwrap().contains("acme/prod"));
    assert_eq!(v[3]["link"], "https://console.test/nodes");
    assert!(!dump().contains("panicked"));
}

#[test]
fn a_group_readable_secret_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("webhook-secret");
    std::fs::write(&secret_file, "webhook-test-secret-0123456789").unwrap();
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path())
        .args(["--webhook-json", "https://hooks.example/in"])
        .arg("--webhook-secret-file")
        .arg(&secret_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
