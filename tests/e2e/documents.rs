//! Masking and request rules where the text is not one plain string: a
//! JSON answer's logprobs (tokens and their bytes, through the real
//! `openai` client), numbers and object keys of JSON documents, responses
//! in stacked or split encodings, compression bombs, Range requests,
//! header and trailer values; requests behind a BOM, in UTF-16/32, in
//! stacked encodings and in content parts. The fake AI API
//! (tests/fixtures/fake_ai.py) and the fake HTTPS service live in the
//! test's network namespace.
use std::path::Path;

use base64::Engine;
use serde_json::Value;

use crate::{
    harness::*,
    masking::{github_token, masked, AWS},
};

fn bundle(version: u64, _dir: &Path) -> String {
    let prefix = prefix();
    format!(
        r#"version: {version}
name: e2e-documents
workloads:
  - name: e2e
    cgroup: "/{prefix}-*"
rules:
  - id: mask-secrets
    on: response
    targets: [fake-api]
    workloads: [e2e]
    packs: [secrets, pii]
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

struct Docs {
    // Dropped first: uninstalling the node's CA needs its state dir.
    _trust: TrustGuard,
    p: PolicyEnv,
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE.encode(data)
}

impl Docs {
    fn new() -> Self {
        let mut p = PolicyEnv::with_policy(bundle);
        p.env.remote.start_ai();
        let _trust = p.env.trust_node_ca();
        Docs { _trust, p }
    }

    fn env(&self) -> &Env {
        &self.p.env
    }

    /// GET on the fake AI API from the job; headers and body.
    fn get(&self, path: &str, extra: &[&str]) -> (String, String) {
        let mut args = vec!["-D", "-"];
        args.extend_from_slice(extra);
        let out = self.env().curl("api.fake.test", 7443, path, &args);
        assert!(out.status.success(), "{path}: {}", text(&out));
        let resp = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        (head.to_ascii_lowercase(), body.to_owned())
    }

    /// POSTs `body` to the fake HTTPS service's /echo; the status code.
    fn post(&self, body: &[u8], headers: &[&str]) -> String {
        let file = self.env().dir.path().join("req.bin");
        std::fs::write(&file, body).unwrap();
        let data = format!("@{}", file.display());
        let mut args = vec!["-X", "POST", "--data-binary", data.as_str()];
        for h in headers {
            args.extend(["-H", h]);
        }
        args.extend(["-o", "/dev/null", "-w", "%{http_code}"]);
        let out = self.env().curl("api.fake.test", 443, "/echo", &args);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
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

#[test]
fn logprobs_tokens_and_their_bytes_are_masked_like_the_answer() {
    let d = Docs::new();
    let tok = github_token();
    let text = format!("Here is your token: {tok}. Keep control value keep-me-4242.");
    let expected = masked(&text, &[&tok]);
    for step in ["1", "3"] {
        let out = d.client("openai-chat", &text, &["--logprobs", "--step", step]);
        assert!(out["error"].is_null(), "{out:#}");
        assert_eq!(out["text"], expected, "message.content, step {step}");
        assert_eq!(
            out["tokens"], expected,
            "logprobs.content[].token, step {step}"
        );
        assert_eq!(
            out["token_bytes"], expected,
            "logprobs.content[].bytes, step {step}"
        );
    }
    let sent = d.env().remote.ai_entries();
    assert!(
        sent.iter()
            .any(|e| e["sent"].as_str().is_some_and(|s| s.contains(&tok))),
        "the upstream sent the token in the clear: {sent:?}"
    );
}

#[test]
fn numbers_and_keys_of_json_documents_are_masked_and_the_document_stays_json() {
    let d = Docs::new();
    let doc = serde_json::json!({
        "customer": {"card": 4111111111111111u64, "orders": 12345},
        "by_key": {AWS: "rotated"},
        "ids": [1, 2, 3],
        "note": "keep-me-4242",
    })
    .to_string();
    let (_, body) = d.get(&format!("/doc?b64={}", b64(doc.as_bytes())), &[]);
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["customer"]["card"], "*".repeat(16), "{body}");
    assert_eq!(v["customer"]["orders"], 12345, "{body}");
    assert_eq!(v["by_key"]["*".repeat(20)], "rotated", "{body}");
    assert_eq!(v["ids"], serde_json::json!([1, 2, 3]));
    assert_eq!(v["note"], "keep-me-4242");
    assert!(!body.contains("4111111111111111") && !body.contains(AWS));
}

#[test]
fn two_ranges_cannot_put_a_masked_value_back_together() {
    let d = Docs::new();
    let tok = github_token();
    let text = format!("config line one\ntoken={tok}\nlast line\n");
    let path = format!("/doc?ct=text&b64={}", b64(text.as_bytes()));
    let mut got = String::new();
    for range in ["0-27", "28-"] {
        let (head, body) = d.get(&path, &["-r", range]);
        // The node asks for the whole representation: each answer is the
        // whole text, masked; a client asking for a range may get a 200.
        assert!(
            head.starts_with("http/1.1 200") || head.starts_with("http/2 200"),
            "{head}"
        );
        assert_eq!(body, masked(&text, &[&tok]), "range {range}");
        got.push_str(&body);
    }
    assert!(!got.contains(&tok[4..20]), "{got}");
    let sent = d.env().remote.ai_entries();
    assert!(
        sent.iter()
            .filter(|e| e["path"] == "/doc")
            .all(|e| e["range"].is_null()),
        "Range reached the upstream: {sent:?}"
    );
}

#[test]
fn header_and_trailer_values_are_masked() {
    let d = Docs::new();
    let detail = format!("upstream rejected key {AWS} for this job");
    let path = format!(
        "/doc?ct=text&b64={}&hdr={}",
        b64(b"ok"),
        b64(detail.as_bytes())
    );
    let (head, body) = d.get(&path, &[]);
    assert_eq!(body, "ok");
    assert!(
        head.contains(&format!(
            "x-error-detail: {}",
            masked(&detail, &[AWS]).to_ascii_lowercase()
        )),
        "{head}"
    );
    // gRPC: the error's message travels in the `grpc-message` trailer,
    // percent-encoded; the client shows it decoded.
    let tok = github_token();
    let out = d.client("grpc", &format!("token {tok}"), &["--abort"]);
    assert_eq!(out["status"], "FAILED_PRECONDITION", "{out:#}");
    assert_eq!(
        out["details"],
        format!("upstream rejected: token {}", "*".repeat(tok.len())),
        "{out:#}"
    );
    let ex = wait_exchange(d.env(), |e| e["path"] == "/fake.Gen/Stream");
    let trailers = ex["response_trailers"].to_string();
    assert!(
        !trailers.contains(&tok[4..]),
        "the record keeps it masked too: {trailers}"
    );
}

#[test]
fn stacked_and_split_response_encodings_are_all_undone() {
    let d = Docs::new();
    let text = format!("config: aws_key={AWS} control=keep-me-4242\n");
    for query in ["enc=gzip,zstd", "enc=br,gzip", "enc=gzip&split=1"] {
        let (head, body) = d.get(
            &format!("/encoded?{query}&b64={}", b64(text.as_bytes())),
            &[],
        );
        assert!(!head.contains("content-encoding"), "{query}: {head}");
        assert_eq!(body, masked(&text, &[AWS]), "{query}");
    }
}

#[test]
fn compression_bombs_end_the_response_visibly_and_the_node_keeps_serving() {
    let d = Docs::new();
    let env = d.env();
    for enc in ["zstd", "br"] {
        let out = env.curl(
            "api.fake.test",
            7443,
            &format!("/bomb?enc={enc}"),
            &["-o", "/dev/null"],
        );
        assert!(
            !out.status.success(),
            "{enc}: curl must see the cut body as an error: {}",
            text(&out)
        );
        let ex = wait_exchange(env, |e| {
            e["path"] == format!("/bomb?enc={enc}") && e["error"].as_str().is_some()
        });
        let err = ex["error"].as_str().unwrap();
        assert!(err.contains("decompression bomb"), "{enc}: {ex:#}");
        assert!(
            ex["response_body"]["size"].as_u64().unwrap() < 64 << 20,
            "{enc}: far less than the 256 MiB it would expand to: {ex:#}"
        );
    }
    let (_, body) = d.get(&format!("/doc?ct=text&b64={}", b64(b"still fine")), &[]);
    assert_eq!(body, "still fine");
}

fn utf16(s: &str, be: bool, bom: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if bom {
        out.extend(if be { [0xFE, 0xFF] } else { [0xFF, 0xFE] });
    }
    for u in s.encode_utf16() {
        out.extend(if be { u.to_be_bytes() } else { u.to_le_bytes() });
    }
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, data).unwrap();
    z.finish().unwrap()
}

#[test]
fn requests_are_judged_as_the_upstream_reads_them() {
    let d = Docs::new();
    let json = "content-type: application/json";
    let bad = r#"{"prompt":"the production\u0020password is"}"#;
    let mut bom8 = vec![0xEF, 0xBB, 0xBF];
    bom8.extend_from_slice(bad.as_bytes());
    let mut utf32 = Vec::new();
    for c in bad.chars() {
        utf32.extend((c as u32).to_le_bytes());
    }
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("UTF-8 BOM", bom8, vec![json]),
        ("UTF-16LE BOM", utf16(bad, false, true), vec![json]),
        ("UTF-16BE", utf16(bad, true, false), vec![json]),
        ("UTF-32LE", utf32, vec![json]),
        (
            "content parts",
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"use the produc"},{"type":"text","text":"tion password"}]}]}"#.to_vec(),
            vec![json],
        ),
        (
            "identity, then gzip",
            gzip(bad.as_bytes()),
            vec![json, "content-encoding: identity", "content-encoding: gzip"],
        ),
        (
            "gzip twice",
            gzip(&gzip(bad.as_bytes())),
            vec![json, "content-encoding: gzip, gzip"],
        ),
    ];
    for (what, body, headers) in &cases {
        assert_eq!(d.post(body, headers), "403", "{what}");
    }
    // Marked as UTF-16 but not: refused, never judged as raw bytes.
    assert_eq!(d.post(&[0xFF, 0xFE, b'{'], &[json]), "415");
    // Benign text in the same shapes passes.
    let fine = r#"{"prompt":"refactor this function"}"#;
    assert_eq!(d.post(&utf16(fine, false, true), &[json]), "200");
    assert_eq!(
        d.post(
            &gzip(&gzip(fine.as_bytes())),
            &[json, "content-encoding: gzip, gzip"]
        ),
        "200"
    );
    let up = d.env().remote.https_entries();
    assert_eq!(
        up.iter().filter(|e| e["path"] == "/echo").count(),
        2,
        "only the benign requests reached the upstream: {up:?}"
    );
}
