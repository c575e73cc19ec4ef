//! Streams that carry a reply a few characters per message, with real
//! implementations on both ends:
//! * Connect-RPC, the protocol family of Cursor's API: connect-node client
//!   and server (tests/fixtures/connect), server streaming and unary, over
//!   the Connect, gRPC and gRPC-Web protocols, HTTP/1.1 and HTTP/2, JSON and
//!   protobuf codecs, identity and gzip messages, 1 and 7 characters per
//!   message, in a top-level and in a nested message field;
//! * WebSocket: a Realtime-API-style server (the `websockets` library,
//!   tests/fixtures/fake_ai.py) sending one JSON message per delta, and a
//!   client whose JSON messages are judged on their decoded strings.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use base64::Engine;
use serde_json::Value;

use crate::harness::*;

fn bundle(version: u64, _dir: &Path) -> String {
    let prefix = prefix();
    format!(
        r#"version: {version}
name: e2e-connect
workloads:
  - name: e2e
    cgroup: "/{prefix}-*"
rules:
  - id: mask-secrets
    on: response
    targets: [fake-api]
    workloads: [e2e]
    packs: [secrets]
    action: mask
  - id: block-prod-creds
    on: request
    targets: [fake-api]
    patterns:
      - id: prod-credential
        regex: '(?i)production (?:password|credential)s?'
    action: block
    message: No production credentials in prompts.
"#
    )
}

/// A pseudo-random string over `alphabet` with one character doubled
/// (`…NN…`): sent one character per message, a doubled character is a
/// value that repeats from one message to the next.
fn secret(prefix: &str, alphabet: &[u8], len: usize, salt: usize) -> String {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize
        ^ salt;
    let mut tail: Vec<u8> = (0..len)
        .map(|i| alphabet[(seed / (i + 1) + i * 7 + salt) % alphabet.len()])
        .collect();
    tail[len / 2] = tail[len / 2 - 1];
    format!("{prefix}{}", String::from_utf8(tail).unwrap())
}

fn github_token() -> String {
    secret(
        "ghp_",
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
        36,
        1,
    )
}

fn aws_key_id() -> String {
    secret("AKIA", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16, 2)
}

fn masked(text: &str, secrets: &[&str]) -> String {
    let mut t = text.to_owned();
    for s in secrets {
        t = t.replace(s, &"*".repeat(s.chars().count()));
    }
    t
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The connect-node server in the test's namespace, on the remote's :6443
/// (the fake AI API, which would use it for grpcio, is not started here).
struct ConnectServer {
    child: Child,
    log: PathBuf,
}

impl ConnectServer {
    const PORT: u16 = 6443;

    fn start(env: &Env) -> Self {
        let dir = env.dir.path();
        let log = dir.join("connect.log");
        std::fs::write(&log, "").unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &env.remote.ns, "node"])
            .arg(format!("{FIXTURES}/connect/server.cjs"))
            .args(["--bind", &env.remote.remote])
            .args(["--port", &Self::PORT.to_string()])
            .arg("--cert")
            .arg(dir.join("api.crt"))
            .arg("--key")
            .arg(dir.join("api.key"))
            .arg("--log")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect(
                "start the connect-node server (scripts/setup.sh installs node and connect-node)",
            );
        let ip = env.remote.remote.clone();
        wait_for("connect-node server", || {
            std::net::TcpStream::connect((ip.as_str(), Self::PORT)).is_ok()
        });
        ConnectServer { child, log }
    }

    fn sent(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for ConnectServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line per call that went wrong, for a readable failure.
fn describe(r: &Value) -> String {
    format!(
        "{} h{} {} gzip={} {} step={} nested={}: {:?} (content-type {}, encoding {}, {} messages, error {})",
        r["protocol"].as_str().unwrap_or("?"),
        r["http"].as_str().unwrap_or("?"),
        r["codec"].as_str().unwrap_or("?"),
        r["gzip"],
        r["method"].as_str().unwrap_or("?"),
        r["step"],
        r["nested"],
        r["text"].as_str().unwrap_or(""),
        r["contentType"],
        r["encoding"],
        r["messages"],
        r["error"],
    )
}

#[test]
fn connect_grpc_and_grpc_web_in_both_codecs_are_masked_across_messages() {
    let p = PolicyEnv::with_policy(bundle);
    let env = &p.env;
    let _trust = env.trust_node_ca();
    let server = ConnectServer::start(env);
    let (aws, tok) = (aws_key_id(), github_token());
    let text = format!("Keys: {aws} and {tok}. Keep control value keep-me-4242 intact.");
    let expected = masked(&text, &[&aws, &tok]);

    let script = format!("{FIXTURES}/connect/client.cjs");
    let port = ConnectServer::PORT.to_string();
    let b = b64(&text);
    let started = std::time::Instant::now();
    let out = env.cgroup.run(
        "node",
        &[
            &script,
            "--ip",
            &env.remote.remote,
            "--host",
            "api.fake.test",
            "--port",
            &port,
            "--b64",
            &b,
        ],
    );
    let results = parse_json_output(&out, &env.node);
    let results = results.as_array().expect("an array of results");
    eprintln!("{} calls in {:?}", results.len(), started.elapsed());
    // connect h1+h2, grpc h2, grpc-web h1+h2; json and binary; identity
    // and gzip; per config: Stream at 1 and 7 characters and Say, each
    // with a top-level and a nested field.
    assert_eq!(results.len(), 5 * 2 * 2 * 6, "{results:#?}");

    let mut wrong = Vec::new();
    for r in results {
        let got = r["text"].as_str().unwrap_or_default();
        let json = r["codec"] == "json";
        let ct = r["contentType"].as_str().unwrap_or_default();
        let ok = r["error"].is_null()
            && got == expected
            // The call really used the codec and compression it names
            // (unary Connect compresses the body, Content-Encoding: the
            // node asks the upstream for identity and undoes any other).
            && ct.contains(if json { "json" } else { "proto" })
            && (r["gzip"] == false
                || r["encoding"] == "gzip"
                || (r["protocol"] == "connect" && r["method"] == "Say"))
            && (r["method"] != "Stream" || r["messages"].as_u64().unwrap_or(0) >= 9);
        if !ok {
            wrong.push(describe(r));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} calls not as expected (want {expected:?}):\n{}\nnode log:\n{}",
        wrong.len(),
        results.len(),
        wrong.join("\n"),
        env.node.log_text()
    );

    // The server really sent the secrets in the clear, once per call.
    let sent = server.sent();
    assert_eq!(
        sent.iter().filter(|e| e["sent"] == text.as_str()).count(),
        results.len(),
        "{sent:?}"
    );
    // And the record says what was masked.
    let ex = wait_exchange(env, |e| {
        e["path"] == "/fake.v1.Gen/Stream"
            && e["decisions"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["rule"] == "mask-secrets"))
    });
    assert!(ex["response_body"]["size"].as_u64().unwrap() > 0, "{ex:#}");
}

/// A Realtime-API-style WebSocket client in the watched cgroup (the
/// `websockets` library): asks for `deltas:STEP:B64`, joins the `delta`
/// of every JSON message until `response.done` (each message must parse),
/// then sends each further argument as a message; prints what happened.
const WS_CLIENT: &str = r#"
import asyncio, json, socket, ssl, sys
import websockets
ip, ask = sys.argv[1], sys.argv[2]
real = socket.getaddrinfo
socket.getaddrinfo = lambda h, *a, **k: real(ip if h == "api.fake.test" else h, *a, **k)
async def main():
    ctx = ssl.create_default_context(cafile="/etc/ssl/certs/ca-certificates.crt")
    out = {"text": "", "messages": 0}
    try:
        async with websockets.connect("wss://api.fake.test:5443/ws", ssl=ctx) as ws:
            await ws.send(ask)
            while True:
                m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                out["messages"] += 1
                if m["type"] == "response.done":
                    break
                out["text"] += m["delta"]
            for m in sys.argv[3:]:
                await ws.send(m)
            await ws.send("bye")
            try:
                await asyncio.wait_for(ws.recv(), 3)
            except asyncio.TimeoutError:
                out["open_after"] = True
    except websockets.exceptions.ConnectionClosed as e:
        out["closed"] = {"code": e.rcvd.code if e.rcvd else None, "reason": e.rcvd.reason if e.rcvd else None}
    except Exception as e:
        out["error"] = repr(e)
    print(json.dumps(out))
asyncio.run(main())
"#;

#[test]
fn websocket_json_deltas_are_joined_and_client_json_is_judged_decoded() {
    let mut p = PolicyEnv::with_policy(bundle);
    p.env.remote.start_ai();
    let env = &p.env;
    let _trust = env.trust_node_ca();
    let tok = github_token();
    let text = format!("Your token is {tok}, keep control value keep-me-4242 intact.");
    let expected = masked(&text, &[&tok]);
    let run = |args: &[&str]| {
        let mut full = vec!["-c", WS_CLIENT, env.remote.remote.as_str()];
        full.extend_from_slice(args);
        let out = env.cgroup.run("python3", &full);
        parse_json_output(&out, &env.node)
    };
    // A client message is judged on its decoded JSON strings: the escaped
    // space reads `production password` to the upstream's JSON parser.
    let fine = r#"{"type":"conversation.item.create","item":{"content":[{"type":"input_text","text":"refactor this"}]}}"#;
    let ask = format!("deltas:4:{}", b64("ok"));
    let bad = r#"{"type":"conversation.item.create","item":{"content":[{"type":"input_text","text":"use the production\u0020password now"}]}}"#;
    let v = run(&[&ask, fine, bad]);
    assert_eq!(v["closed"]["code"], 1008, "{v:#}\n{}", env.node.log_text());
    let got = env.remote.ai_entries();
    assert!(
        got.iter().any(|e| e["received"] == fine),
        "a fine message went through: {got:?}"
    );
    assert!(
        !got.iter().any(|e| e["received"]
            .as_str()
            .is_some_and(|m| m.contains("production"))),
        "the blocked message never reached the upstream: {got:?}"
    );
    let ex = wait_exchange(env, |e| {
        e["path"] == "/ws"
            && e["decisions"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["rule"] == "block-prod-creds"))
    });
    assert_eq!(ex["upgrade"], "websocket", "{ex:#}");

    for step in ["4", "1"] {
        let ask = format!("deltas:{step}:{}", b64(&text));
        let v = run(&[&ask, fine]);
        assert!(v["error"].is_null(), "{v:#}\n{}", env.node.log_text());
        assert_eq!(
            v["text"].as_str(),
            Some(expected.as_str()),
            "step {step}: {v:#}\n{}",
            env.node.log_text()
        );
        assert_eq!(v["open_after"], true, "{v:#}");
    }
    let sent = env.remote.ai_entries();
    assert!(
        sent.iter()
            .any(|e| e["sent"].as_str() == Some(text.as_str())),
        "the server sent the token in the clear: {sent:?}"
    );
    // A reply that ends in what could begin a token (`gh`) is held back
    // until the server goes quiet, then sent: `response.done` behind it
    // arrives (the client gives up after 10 s).
    let tail = "The next one starts with gh";
    let started = std::time::Instant::now();
    let v = run(&[&format!("deltas:4:{}", b64(tail))]);
    assert_eq!(
        v["text"].as_str(),
        Some(tail),
        "{v:#}\n{}",
        env.node.log_text()
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "{v:#}"
    );
}
