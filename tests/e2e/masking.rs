//! Masking and request rules on real AI traffic: the `openai` library
//! streaming and not, Anthropic- and Responses-shaped event streams, a
//! generic JSON stream, gRPC (grpcio client and server, plain and gzip
//! messages), compressed responses, compressed and escaped requests, and
//! WebSocket upgrades. The fake AI API (tests/fixtures/fake_ai.py) lives in
//! the test's network namespace and streams a few characters per event.
use std::path::Path;

use serde_json::Value;

use crate::harness::*;

fn bundle(version: u64, _dir: &Path) -> String {
    let prefix = prefix();
    format!(
        r#"version: {version}
name: e2e-masking
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

/// A fresh GitHub-token-shaped secret (never a real one).
pub(crate) fn github_token() -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    let tail: String = (0..36)
        .map(|i| alphabet[(seed / (i + 1) + i * 7) % alphabet.len()] as char)
        .collect();
    format!("ghp_{tail}")
}

pub(crate) const AWS: &str = "AKIAQ5TESTKEYSLUICE7";

struct Ai {
    // Dropped first: uninstalling the node's CA needs its state dir, which
    // goes with the environment.
    _trust: TrustGuard,
    p: PolicyEnv,
}

impl Ai {
    fn new() -> Self {
        let mut p = PolicyEnv::with_policy(bundle);
        p.env.remote.start_ai();
        let _trust = p.env.trust_node_ca();
        Ai { _trust, p }
    }

    fn env(&self) -> &Env {
        &self.p.env
    }

    fn client(&self, mode: &str, text: &str, extra: &[&str]) -> Value {
        let script = format!("{FIXTURES}/ai_client.py");
        let ip = self.env().remote.remote.clone();
        let mut args = vec![script.as_str(), "--ip", ip.as_str(), mode, text];
        args.extend_from_slice(extra);
        let out = self.env().cgroup.run("python3", &args);
        parse_json_output(&out, &self.env().node)
    }
}

pub(crate) fn masked(text: &str, secrets: &[&str]) -> String {
    let mut t = text.to_owned();
    for s in secrets {
        t = t.replace(s, &"*".repeat(s.len()));
    }
    t
}

fn assert_masked(out: &Value, expected: &str, secrets: &[&str]) {
    assert!(out["error"].is_null(), "client error: {out:#}");
    let got = out["text"].as_str().unwrap_or_default();
    for s in secrets {
        assert!(!got.contains(&s[..12]), "secret reached the client: {got}");
    }
    assert_eq!(got, expected, "{out:#}");
}

#[test]
fn openai_client_streamed_and_plain_completions_are_masked() {
    let ai = Ai::new();
    let tok = github_token();
    let text = format!("Here is your token: {tok}. Keep control value keep-me-4242 intact.");
    let expected = masked(&text, &[&tok]);
    for step in ["1", "3", "7"] {
        let out = ai.client("openai-chat", &text, &["--stream", "--step", step]);
        assert_masked(&out, &expected, &[&tok]);
        assert!(out["events"].as_u64().unwrap() > 5, "{out:#}");
    }
    let out = ai.client("openai-chat", &text, &[]);
    assert_masked(&out, &expected, &[&tok]);

    // The API really sent the token in the clear; the node masked it.
    let sent = ai.env().remote.ai_entries();
    assert!(
        sent.iter().any(|e| e["sent"].as_str() == Some(&text)),
        "{sent:?}"
    );
    let ex = wait_exchange(ai.env(), |e| e["path"] == "/v1/chat/completions");
    assert!(
        ex["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["rule"] == "mask-secrets"
                && d["patterns"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p == "github-pat")),
        "{ex:#}"
    );
    for e in exchanges(ai.env()) {
        let body = e["response_body"]["text"].as_str().unwrap_or_default();
        assert!(
            !body.contains(&tok[4..16]),
            "record holds the secret: {body}"
        );
    }
    // The replay an investigator reads names the decision.
    let replay = ai
        .env()
        .node
        .cli(&["sessions", "replay", &ex["session"].to_string()]);
    let replay = String::from_utf8_lossy(&replay.stdout).to_string();
    assert!(
        replay.contains("decision: mask mask-secrets [github-pat]"),
        "{replay}"
    );
    assert!(!replay.contains(&tok[4..16]), "{replay}");
}

#[test]
fn responses_anthropic_and_generic_event_streams_are_masked() {
    let ai = Ai::new();
    let tok = github_token();
    let text = format!("keys: {AWS} and {tok} end");
    let expected = masked(&text, &[AWS, &tok]);
    let out = ai.client("openai-responses", &text, &["--step", "2"]);
    assert_masked(&out, &expected, &[AWS, &tok]);
    // The final `done` event carries the whole text: masked as well.
    assert_eq!(
        out["done_text"].as_str(),
        Some(expected.as_str()),
        "{out:#}"
    );
    for mode in ["anthropic", "generic"] {
        let out = ai.client(mode, &text, &["--step", "3"]);
        assert_masked(&out, &expected, &[AWS, &tok]);
    }
    // Benign text arrives unchanged, escapes and all.
    let benign = "fn main() { println!(\"hi\\n\\t\"); } // déjà vu 😀 \"quoted\"";
    for mode in ["anthropic", "generic", "openai-responses"] {
        let out = ai.client(mode, benign, &["--step", "2"]);
        assert!(out["error"].is_null(), "{out:#}");
        assert_eq!(out["text"].as_str(), Some(benign), "{mode}: {out:#}");
    }
}

#[test]
fn grpc_stream_with_a_token_split_across_messages_is_masked_plain_and_gzip() {
    let ai = Ai::new();
    let tok = github_token();
    let text = format!("token {tok} ok");
    let expected = masked(&text, &[&tok]);
    for extra in [&[][..], &["--gzip"][..]] {
        let out = ai.client("grpc", &text, extra);
        assert_masked(&out, &expected, &[&tok]);
        assert!(out["events"].as_u64().unwrap() >= 10, "{out:#}");
    }
    let sent = ai.env().remote.ai_entries();
    assert!(
        sent.iter()
            .any(|e| e["path"] == "/fake.Gen/Stream" && e["gzip"] == true),
        "{sent:?}"
    );
    let ex = wait_exchange(ai.env(), |e| e["path"] == "/fake.Gen/Stream");
    assert_eq!(ex["http_version"], "HTTP/2.0");
    assert!(
        ex["response_trailers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "grpc-status" && t["value"] == "0"),
        "{ex:#}"
    );
}

#[test]
fn compressed_responses_are_decoded_masked_and_sent_as_identity() {
    use base64::Engine;
    let ai = Ai::new();
    let text = format!("config: aws_key={AWS} control=keep-me-4242\n");
    let b64 = base64::engine::general_purpose::URL_SAFE.encode(&text);
    for enc in ["gzip", "deflate", "br", "zstd"] {
        let out = ai.env().curl(
            "api.fake.test",
            7443,
            &format!("/encoded?enc={enc}&b64={b64}"),
            &["--compressed", "-D", "-"],
        );
        assert!(out.status.success(), "{enc}: {}", text_of(&out));
        let resp = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        assert!(
            !head.to_ascii_lowercase().contains("content-encoding"),
            "{head}"
        );
        assert_eq!(body, masked(&text, &[AWS]), "{enc}");
    }
    let sent = ai.env().remote.ai_entries();
    assert!(sent
        .iter()
        .all(|e| e["path"] != "/encoded" || e["accept_encoding"] == "identity"));
}

fn text_of(o: &std::process::Output) -> String {
    text(o)
}

#[test]
fn request_rules_see_decoded_bodies_unescaped_json_and_the_url() {
    let ai = Ai::new();
    let env = ai.env();
    let post = |body: &[u8], extra: &[&str], path: &str| {
        let file = env.dir.path().join("req.bin");
        std::fs::write(&file, body).unwrap();
        let data = format!("@{}", file.display());
        let mut args = vec![
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
            data.as_str(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ];
        args.extend_from_slice(extra);
        let out = env.curl("api.fake.test", 443, path, &args);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // JSON escapes hide nothing.
    assert_eq!(
        post(
            br#"{"prompt":"the production\u0020password is"}"#,
            &[],
            "/echo"
        ),
        "403"
    );
    // Nor does compression.
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, br#"{"prompt":"use the production password"}"#).unwrap();
    let gz = z.finish().unwrap();
    assert_eq!(post(&gz, &["-H", "content-encoding: gzip"], "/echo"), "403");
    // Nor the URL.
    assert_eq!(post(b"{}", &[], "/echo?q=production%20password"), "403");
    // A body that claims an encoding it does not have is refused, not passed.
    assert_eq!(
        post(b"plain", &["-H", "content-encoding: gzip"], "/echo"),
        "415"
    );
    // Benign requests pass, compressed or not.
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, br#"{"prompt":"refactor this function"}"#).unwrap();
    assert_eq!(
        post(
            &z.finish().unwrap(),
            &["-H", "content-encoding: gzip"],
            "/echo"
        ),
        "200"
    );
    let up = env.remote.https_entries();
    assert_eq!(
        up.iter().filter(|e| e["path"] == "/echo").count(),
        1,
        "only the benign request reached the upstream: {up:?}"
    );
}

/// A WebSocket client in the watched cgroup (the `websockets` library):
/// sends each message, prints what came back or how the connection ended.
const WS_CLIENT: &str = r#"
import asyncio, json, os, socket, ssl, sys
import websockets
ip, port = sys.argv[1], sys.argv[2]
real = socket.getaddrinfo
socket.getaddrinfo = lambda h, *a, **k: real(ip if h == "api.fake.test" else h, *a, **k)
async def main():
    ctx = ssl.create_default_context(cafile="/etc/ssl/certs/ca-certificates.crt")
    out = {"connected": False, "replies": []}
    try:
        async with websockets.connect(f"wss://api.fake.test:{port}/ws", ssl=ctx) as ws:
            out["connected"] = True
            for m in sys.argv[3:]:
                if m.startswith("wait:"):
                    # Hold the socket open until the test says go.
                    while not os.path.exists(m[5:]):
                        await asyncio.sleep(0.05)
                    continue
                await ws.send(m)
                if m.startswith("say:"):
                    out["replies"].append(await ws.recv())
            await ws.send("bye")
            try:
                await asyncio.wait_for(ws.recv(), 3)
            except asyncio.TimeoutError:
                out["open_after"] = True
    except websockets.exceptions.ConnectionClosed as e:
        out["closed"] = {"code": e.rcvd.code if e.rcvd else None, "reason": e.rcvd.reason if e.rcvd else None}
    except Exception as e:
        resp = getattr(e, "response", None)
        out["status"] = getattr(resp, "status_code", None)
        out["body"] = (getattr(resp, "body", b"") or b"").decode(errors="replace")
        out["error"] = repr(e)
    print(json.dumps(out))
asyncio.run(main())
"#;

/// `/metrics` counts a denial of this kind (`sluice_denials_total`).
fn assert_denial_counted(env: &Env, kind: &str) {
    let metrics = env.metrics();
    let label = format!("kind=\"{kind}\"");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sluice_denials_total{") && l.contains(&label)),
        "{metrics}"
    );
}

fn ws_client(env: &Env, port: &str, messages: &[&str]) -> Value {
    let mut args = vec!["-c", WS_CLIENT, env.remote.remote.as_str(), port];
    args.extend_from_slice(messages);
    let out = env.cgroup.run("python3", &args);
    parse_json_output(&out, &env.node)
}

/// The verdict stages run per WebSocket message as per request: a
/// suspension made while the socket is open ends it at the next message,
/// which never reaches the upstream.
#[test]
fn a_suspension_ends_an_open_websocket_at_its_next_message() {
    let ai = Ai::new();
    let env = ai.env();
    let go = env.dir.path().join("go");
    let wait = format!("wait:{}", go.display());
    let child = env
        .cgroup
        .command(
            "python3",
            &[
                "-c",
                WS_CLIENT,
                env.remote.remote.as_str(),
                "5443",
                "before the incident",
                &wait,
                "after the suspension",
            ],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the first message at the upstream", || {
        env.remote
            .ai_entries()
            .iter()
            .any(|e| e["received"] == "before the incident")
    });
    let id = env.node.wait_sessions(1)[0]["identity"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = env
        .node
        .cli(&["identities", "suspend", &id, "--reason", "incident 17"]);
    assert!(out.status.success(), "{}", text_of(&out));
    std::fs::write(&go, "").unwrap();
    let out = child.wait_with_output().unwrap();
    let v = parse_json_output(&out, &env.node);
    assert_eq!(v["closed"]["code"], 1008, "{v:#}");
    assert_eq!(v["closed"]["reason"], "identity suspended", "{v:#}");
    let got = env.remote.ai_entries();
    assert!(
        !got.iter().any(|e| e["received"] == "after the suspension"),
        "a suspended identity's message reached the upstream: {got:?}"
    );
    let ex = wait_exchange(env, |e| {
        e["path"] == "/ws"
            && e["decisions"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["rule"] == "identity-suspended"))
    });
    assert!(
        ex["error"].as_str().unwrap_or("").contains("incident 17"),
        "{ex:#}"
    );
    // Counted by the denial's kind, for alerting.
    assert_denial_counted(env, "suspended");
}

#[test]
fn websocket_frames_are_masked_and_judged_or_the_upgrade_refused() {
    use base64::Engine;
    let ai = Ai::new();
    let env = ai.env();
    let tok = github_token();
    let text = format!("here: {tok} done");
    let say = format!(
        "say:{}",
        base64::engine::general_purpose::STANDARD.encode(&text)
    );
    // The answer comes back as one message in frames of 4 characters.
    let v = ws_client(env, "5443", &[&say, "hello"]);
    assert_eq!(v["connected"], true, "{v:#}");
    assert_eq!(
        v["replies"][0].as_str(),
        Some(masked(&text, &[&tok]).as_str()),
        "{v:#}\n{}",
        env.node.log_text()
    );
    let sent = env.remote.ai_entries();
    assert!(
        sent.iter()
            .any(|e| e["sent"].as_str() == Some(text.as_str())),
        "{sent:?}"
    );
    // A prompt that a request rule blocks is not forwarded: 1008 closes it.
    let v = ws_client(
        env,
        "5443",
        &["fine message", "use the production password now"],
    );
    assert_eq!(v["closed"]["code"], 1008, "{v:#}");
    let got = env.remote.ai_entries();
    assert!(
        got.iter().any(|e| e["received"] == "fine message"),
        "{got:?}"
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
    assert_denial_counted(env, "blocked");
    let ex = wait_exchange(env, |e| {
        e["path"] == "/ws"
            && e["decisions"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["rule"] == "mask-secrets"))
    });
    assert!(ex["response_body"]["size"].as_u64().unwrap() > 0, "{ex:#}");

    // With `policy.websocket: refuse` the upgrade itself is refused.
    let mut p = PolicyEnv::with_settings(bundle, "  websocket: refuse\n");
    let out = p.push(&p.signed(10, "team"));
    assert!(out.status.success(), "{}", text_of(&out));
    p.env.remote.start_ai();
    let _trust = p.env.trust_node_ca();
    let v = ws_client(&p.env, "5443", &["hello"]);
    assert_eq!(v["connected"], false, "{v:#}");
    assert_eq!(v["status"], 403, "{v:#}");
    assert!(
        v["body"].as_str().unwrap().contains("upgrade refused"),
        "{v:#}"
    );
    let ex = wait_exchange(&p.env, |e| e["path"] == "/ws");
    assert!(
        ex["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["rule"] == "upgrade-not-inspectable"),
        "{ex:#}"
    );
}

#[test]
fn a_stream_that_cannot_be_scanned_ends_in_an_error_the_client_sees() {
    let ai = Ai::new();
    let env = ai.env();
    for http in ["--http1.1", "--http2"] {
        let out = env.curl(
            "api.fake.test",
            443,
            "/huge-event",
            &[http, "-N", "-o", "/dev/null"],
        );
        assert!(
            !out.status.success(),
            "{http}: curl must see the cut stream as an error: {}",
            text(&out)
        );
    }
    let ex = wait_exchange(env, |e| {
        e["path"] == "/huge-event" && e["error"].as_str().is_some()
    });
    assert!(
        ex["error"].as_str().unwrap().contains("larger than"),
        "{ex:#}"
    );
    // The node keeps serving.
    let out = ai.client("generic", "still fine", &[]);
    assert_eq!(out["text"], "still fine", "{out:#}");
}

#[test]
fn every_pack_sample_is_masked_through_the_proxy_plain_and_streamed() {
    use crate::samples::{expand, samples, Rng};
    let ai = Ai::new();
    // Every positive sample of the secrets pack, each on its own line
    // between benign markers that must arrive unchanged.
    let mut text = String::new();
    let mut secrets = Vec::new();
    for (id, s) in samples() {
        for (n, template) in s.positive.iter().enumerate() {
            let mut rng = Rng::new(&format!("e2e:{id}:{n}"));
            let (sample, span) = expand(template, &mut rng);
            secrets.push((id.clone(), sample[span].to_owned()));
            // Each sample on lines of its own (some rules anchor at `^`).
            text.push_str(&format!("sample {id} #{n}:\n{sample}\n:end-{n}\n"));
        }
    }
    assert!(secrets.len() >= 300, "{} samples", secrets.len());
    let file = ai.env().dir.path().join("samples.txt");
    std::fs::write(&file, &text).unwrap();
    let file = file.display().to_string();
    for (how, extra) in [
        ("non-streamed JSON", &["--delay", "0"][..]),
        (
            "streamed, 5 characters per event",
            &["--stream", "--step", "5", "--delay", "0"][..],
        ),
        (
            "streamed, 2 characters per event",
            &["--stream", "--step", "2", "--delay", "0"][..],
        ),
    ] {
        let mut args = vec!["--text-file"];
        args.extend_from_slice(extra);
        let out = ai.client("openai-chat", &file, &args);
        assert!(out["error"].is_null(), "{how}: {out:#}");
        let got = out["text"].as_str().unwrap();
        let leaked: Vec<&str> = secrets
            .iter()
            .filter(|(_, s)| got.contains(s.as_str()))
            .map(|(id, _)| id.as_str())
            .collect();
        assert!(
            leaked.is_empty(),
            "{how}: {} of {} samples leaked: {leaked:?}",
            leaked.len(),
            secrets.len()
        );
        // Same text otherwise: markers intact; streamed JSON keeps the
        // number of characters (a masked escape is one `*`).
        if how.starts_with("streamed") {
            assert_eq!(got.chars().count(), text.chars().count(), "{how}");
        }
        // `sluice policy test` offline gives exactly what the client got.
        let (shape, delta) = match extra {
            [.., "--step", n, "--delay", _] => ("sse", *n),
            _ => ("plain", "1"),
        };
        if shape == "sse" {
            let bundle_file = ai.env().dir.path().join("bundle.yaml");
            std::fs::write(&bundle_file, bundle(1, ai.env().dir.path())).unwrap();
            let offline = std::process::Command::new(SLUICE)
                .args([
                    "policy", "test", "--json", "--shape", shape, "--delta", delta,
                ])
                .arg(&bundle_file)
                .arg(&file)
                .output()
                .unwrap();
            assert!(offline.status.success(), "{}", text_of(&offline));
            let v: Value = serde_json::from_slice(&offline.stdout).unwrap();
            assert!(
                v[0]["output"].as_str() == Some(got),
                "{how}: `policy test` differs from the node"
            );
        }
        for (id, _) in &secrets {
            let marker = format!("sample {id} #0:\n");
            assert!(
                got.contains(&marker),
                "{how}: marker for {id} changed; the answer begins {:?}",
                &got.chars().take(400).collect::<String>()
            );
        }
    }
}

#[test]
fn a_quiet_stream_gets_its_held_words_without_waiting_for_the_end() {
    // An SSE event ending in a word that could begin a key ("AK"), then
    // silence until the client acts (a session waiting for its client):
    // the held word goes out once the stream is quiet, scanned as it
    // stands, instead of holding the client hostage.
    let ai = Ai::new();
    let out = ai.client("idle", "", &[]);
    assert!(out["error"].is_null(), "{out:#}");
    assert_eq!(out["before_release"], true, "{out:#}");
    assert_eq!(out["text"], "the key starts AK", "{out:#}");
    assert_eq!(out["events"], 2, "{out:#}");
}
