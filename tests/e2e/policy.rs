//! Signed policy bundles and enforcement, through the real path:
//! eBPF redirect → Sluice (TLS interception) → the fake upstream.
use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

fn bundle(version: u64, dir: &Path) -> String {
    let prefix = prefix();
    format!(
        r#"version: {version}
name: e2e-policy
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
  - id: approve-deploys
    on: request
    targets: [fake-api]
    patterns:
      - id: deploy
        regex: 'DEPLOY-TO-PROD'
    action: approve
    timeout_secs: 3
credentials:
  - target: fake-api
    source: "file:{}"
"#,
        dir.join("node-cursor.key").display()
    )
}

fn curl_post(env: &Env, path: &str, body: &str) -> std::process::Output {
    env.curl(
        "api.fake.test",
        443,
        path,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            body,
            "-w",
            "\n%{http_code}",
        ],
    )
}

#[test]
fn secrets_split_across_chunks_and_sse_events_are_masked() {
    let p = PolicyEnv::with_policy(bundle);
    let env = &p.env;
    let _trust = env.trust_node_ca();

    let out = env.curl("api.fake.test", 443, "/chunked-secret", &["-D", "-"]);
    let resp = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let cl: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("content-length kept");
    assert_eq!(body.len(), cl, "length preserved");
    assert_eq!(
        body,
        format!(
            "generated config: key={} region=us-east-1 control=keep-me-4242\n",
            "*".repeat(20)
        )
    );

    let out = env.curl("api.fake.test", 443, "/sse-secret", &["-N"]);
    let sse = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !sse.contains("AKIA") && !sse.contains("KEYSLUICE7"),
        "{sse}"
    );
    assert!(
        sse.contains("data: here is your key **********\n\n"),
        "{sse}"
    );
    assert!(
        sse.contains("data: ********** and a control value keep-me-4242"),
        "{sse}"
    );

    let ex = wait_exchange(env, |e| e["path"] == "/chunked-secret");
    let d = ex["decisions"].as_array().unwrap();
    assert!(
        d.iter().any(|d| d["rule"] == "mask-secrets"
            && d["action"] == "mask"
            && d["patterns"][0] == "aws-access-key-id"),
        "{ex:#}"
    );
    assert!(
        !ex["response_body"]["text"]
            .as_str()
            .unwrap()
            .contains("AKIA"),
        "the record holds the masked body"
    );
    // The upstream asked for an uncompressed body.
    let up = env.remote.https_entries();
    let e = up.iter().find(|e| e["path"] == "/chunked-secret").unwrap();
    assert_eq!(e["headers"]["accept-encoding"], "identity");
}

#[test]
fn blocked_prompt_gets_403_and_never_reaches_the_upstream() {
    let p = PolicyEnv::with_policy(bundle);
    let env = &p.env;
    let _trust = env.trust_node_ca();
    let out = curl_post(
        env,
        "/json",
        r#"{"prompt":"connect with the Production password hunter2"}"#,
    );
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = t.rsplit_once('\n').unwrap();
    assert_eq!(code, "403");
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["rule"], "block-prod-creds");
    assert_eq!(body["message"], "No production credentials in prompts.");
    // An allowed prompt goes through, proving the path works.
    let out = curl_post(env, "/json", r#"{"prompt":"write a unit test"}"#);
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("\n200"));
    let seen = env.remote.https_entries();
    assert!(seen
        .iter()
        .any(|e| e["body"].as_str().unwrap().contains("unit test")));
    assert!(
        !seen
            .iter()
            .any(|e| e["body"].as_str().unwrap().contains("hunter2")),
        "the blocked prompt reached the upstream: {seen:?}"
    );
    let ex = wait_exchange(env, |e| e["status"] == 403);
    assert_eq!(ex["decisions"][0]["rule"], "block-prod-creds");
    assert_eq!(ex["decisions"][0]["action"], "block");
}

fn spawn_held(env: &Env, tag: &str) -> std::process::Child {
    let resolve = format!("api.fake.test:443:{}", env.remote.remote);
    env.cgroup
        .command(
            "curl",
            &[
                "-sS",
                "--max-time",
                "30",
                "--resolve",
                &resolve,
                "-X",
                "POST",
                "-d",
                &format!("{{\"prompt\":\"DEPLOY-TO-PROD {tag}\"}}"),
                "-w",
                "\n%{http_code}",
                "https://api.fake.test/json",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn pending(env: &Env) -> Vec<Value> {
    env.node
        .cli_json(&["approvals", "list", "--json"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn wait_pending(env: &Env, tag: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(a) = pending(env)
            .into_iter()
            .find(|a| a["preview"].as_str().unwrap().contains(tag))
        {
            return a;
        }
        assert!(Instant::now() < deadline, "no pending approval for {tag}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finish(child: std::process::Child) -> (String, String) {
    let out = child.wait_with_output().unwrap();
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    let (b, c) = t.rsplit_once('\n').unwrap_or(("", &t));
    (b.to_owned(), c.to_owned())
}

#[test]
fn approvals_approve_deny_and_timeout() {
    let p = PolicyEnv::with_policy(bundle);
    let env = &p.env;
    let _trust = env.trust_node_ca();

    let held = spawn_held(env, "one");
    let a = wait_pending(env, "one");
    assert_eq!(a["rule"], "approve-deploys");
    assert!(env.remote.https_entries().is_empty(), "held, not forwarded");
    let out = env
        .node
        .cli(&["approvals", "approve", &a["id"].to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let (_, code) = finish(held);
    assert_eq!(code, "200");

    let held = spawn_held(env, "two");
    let a = wait_pending(env, "two");
    let out = env.node.cli(&[
        "approvals",
        "deny",
        &a["id"].to_string(),
        "--reason",
        "not during the freeze",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let (body, code) = finish(held);
    assert_eq!(code, "403");
    assert!(body.contains("not during the freeze"), "{body}");

    let held = spawn_held(env, "three");
    wait_pending(env, "three");
    let (body, code) = finish(held);
    assert_eq!(code, "403");
    assert!(body.contains("no approval within 3s"), "{body}");

    // Only the approved request reached the upstream.
    let bodies: Vec<String> = env
        .remote
        .https_entries()
        .iter()
        .map(|e| e["body"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert!(bodies[0].contains("one"));

    // The record keeps the approver and the decisions.
    let ex = wait_exchange(env, |e| {
        e["request_body"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("DEPLOY-TO-PROD one"))
    });
    let detail = ex["decisions"][0]["detail"].as_str().unwrap();
    // Signed by the operator's key, handed in by root.
    assert!(
        detail.contains("approved")
            && detail.contains("\"by_uid\":0")
            && detail.contains("\"signer\":"),
        "{detail}"
    );
    let ex = wait_exchange(env, |e| {
        e["request_body"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("DEPLOY-TO-PROD two"))
    });
    assert!(ex["decisions"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("denied"));
    let ex = wait_exchange(env, |e| {
        e["request_body"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("DEPLOY-TO-PROD three"))
    });
    assert!(ex["decisions"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("timed_out"));
    let audit = text(&env.node.cli(&["audit", "--kind", "approval"]));
    assert!(audit.contains("approval.decided"), "{audit}");
}

#[test]
fn node_credential_is_injected_and_the_jobs_key_only_fingerprinted() {
    let p = PolicyEnv::with_policy(bundle);
    let env = &p.env;
    let _trust = env.trust_node_ca();
    let job_key = "Bearer offboarded-contractor-key-123";
    let out = env.curl(
        "api.fake.test",
        443,
        "/json",
        &["-H", &format!("Authorization: {job_key}")],
    );
    let body: Value = serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    // The fake upstream echoes the header it got; the node masks its own
    // key on the way back, so the job learns nothing from the echo.
    assert_eq!(
        body["headers"]["authorization"],
        format!("Bearer {}", "*".repeat(NODE_KEY.len()))
    );
    let up = env.remote.https_entries();
    let got = up.iter().find(|e| e["path"] == "/json").unwrap();
    assert_eq!(
        got["headers"]["authorization"],
        format!("Bearer {NODE_KEY}"),
        "upstream sees only the node's key"
    );
    assert!(!up
        .iter()
        .any(|e| e.to_string().contains("offboarded-contractor")));

    let ex = wait_exchange(env, |e| e["path"] == "/json");
    let fp = node_agent::record::fingerprint(job_key.as_bytes());
    assert_eq!(ex["injected"]["header"], "authorization");
    assert_eq!(
        ex["injected"]["client_presented"][0]["value"],
        format!("sha256:{fp}")
    );
    let all = env.node.cli(&[
        "sessions",
        "show",
        &env.node.sessions()[0]["id"].to_string(),
    ]);
    let dump = text(&all);
    assert!(
        !dump.contains(NODE_KEY) && !dump.contains("offboarded-contractor"),
        "no key in records: {dump}"
    );
    assert!(!env.node.log_text().contains(NODE_KEY), "never logged");
}

#[test]
fn suspended_identity_is_denied_including_held_requests_and_resumes() {
    let p = PolicyEnv::with_policy(bundle);
    let env = &p.env;
    let _trust = env.trust_node_ca();
    let out = env.curl("api.fake.test", 443, "/json", &["-w", "\n%{http_code}"]);
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("\n200"));
    let id = env.node.wait_sessions(1)[0]["identity"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let held = spawn_held(env, "held-before-suspend");
    wait_pending(env, "held-before-suspend");
    let out = env
        .node
        .cli(&["identities", "suspend", &id, "--reason", "incident 42"]);
    assert!(
        text(&out).contains("1 held request(s) denied"),
        "{}",
        text(&out)
    );
    let (body, code) = finish(held);
    assert_eq!(code, "403");
    assert!(body.contains("incident 42"), "{body}");

    let out = env.curl("api.fake.test", 443, "/json", &["-w", "\n%{http_code}"]);
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        t.ends_with("\n403") && t.contains("identity suspended") && t.contains("incident 42"),
        "{t}"
    );
    // A client still uploading when the refusal comes reads the refusal
    // (HTTP/2 and HTTP/1.1), not a reset stream: its body arrives only
    // after the node has answered.
    for version in ["--http2", "--http1.1"] {
        let (code, body) = late_upload(env, version);
        assert_eq!(code, 403, "{version}: {body}");
        assert!(body.contains("identity suspended"), "{version}: {body}");
    }
    let listed = env.node.cli_json(&["identities", "list", "--json"]);
    assert_eq!(listed["suspended"][0]["identity"], id);

    let out = env.node.cli(&["identities", "resume", &id]);
    assert!(out.status.success());
    let out = env.curl("api.fake.test", 443, "/json", &["-w", "\n%{http_code}"]);
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("\n200"));
    let audit = text(&env.node.cli(&["audit", "--kind", "identity"]));
    assert!(
        audit.contains("identity.suspended") && audit.contains("identity.resumed"),
        "{audit}"
    );
}

/// A POST whose body curl reads from stdin and sends half a second after
/// the request's head (so the node answers while it is still uploading).
fn late_upload(env: &Env, version: &str) -> (u16, String) {
    use std::io::Write;
    let resolve = format!("api.fake.test:443:{}", env.remote.remote);
    let mut child = env
        .cgroup
        .command(
            "curl",
            &[
                "-sS",
                version,
                "--max-time",
                "30",
                "--resolve",
                &resolve,
                "-w",
                "\n%{http_code}",
                "-X",
                "POST",
                "-T",
                "-",
                "https://api.fake.test:443/echo",
            ],
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // The node may have closed its side already; the answer is what counts.
    let _ = stdin.write_all(&vec![b'x'; 64 * 1024]);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = t.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        format!("{body}\ncurl: {}", String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn bad_bundles_are_refused_and_the_policy_in_force_stays() {
    let p = PolicyEnv::with_policy(bundle);
    let dir = p.env.dir.path().to_owned();
    let refused = |file: &Path, needle: &str| {
        let out = p.push(file);
        assert!(!out.status.success(), "{} must be refused", file.display());
        assert!(
            text(&out).contains(needle),
            "`{needle}` not in: {}",
            text(&out)
        );
        assert_eq!(p.version(), 10, "policy in force unchanged");
    };
    // Unsigned: the plain YAML.
    let yaml = dir.join("unsigned.yaml");
    std::fs::write(&yaml, bundle(11, &dir)).unwrap();
    refused(&yaml, "not a signed bundle");
    // Tampered: a signed bundle with one character of its payload changed.
    let good = std::fs::read_to_string(p.signed(12, "team")).unwrap();
    let mut parts: Vec<String> = good.trim().split('.').map(str::to_owned).collect();
    let mut c = parts[1].clone().into_bytes();
    c[40] = if c[40] == b'A' { b'B' } else { b'A' };
    parts[1] = String::from_utf8(c).unwrap();
    let tampered = dir.join("tampered.jws");
    std::fs::write(&tampered, parts.join(".")).unwrap();
    refused(&tampered, "signature does not verify");
    // Wrongly signed: a key the node does not trust.
    let out = sluice(&[
        "policy",
        "keygen",
        &p.keys.join("rogue").display().to_string(),
    ]);
    assert!(out.status.success());
    refused(&p.signed(13, "rogue"), "does not trust");
    // Malformed: correctly signed, but not a valid bundle.
    let bad_yaml = dir.join("malformed.yaml");
    std::fs::write(&bad_yaml, "version: 14\nname: x\nrules:\n  - id: r\n    on: request\n    action: mask\n    packs: [secrets]\n").unwrap();
    let out = sluice(&[
        "policy",
        "sign",
        &bad_yaml.display().to_string(),
        "--key",
        &p.keys.join("team.key").display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    refused(&bad_yaml.with_extension("jws"), "rules[0].action");
    // Older than the one in force.
    refused(&p.signed(9, "team"), "not newer");
    // The watched directory is a second way in.
    let newer = p.signed(15, "team");
    std::fs::copy(&newer, dir.join("policy.d/v15.jws")).unwrap();
    wait_for("the watched bundle to apply", || p.version() == 15);
    let audit = text(&p.env.node.cli(&["audit", "--kind", "policy"]));
    assert!(audit.matches("policy.refused").count() >= 5, "{audit}");
}

#[test]
fn bundle_pushed_with_100_requests_in_flight_loses_none() {
    let p = PolicyEnv::with_policy(bundle);
    let env = &p.env;
    let _trust = env.trust_node_ca();
    let script = format!("{FIXTURES}/https_client.py");
    let client = env
        .cgroup
        .command(
            "python3",
            &[
                &script,
                "parallel",
                &env.remote.remote,
                "api.fake.test",
                "443",
                "100",
                "/slow?ms=2500",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("100 requests in flight at the upstream", || {
        env.remote
            .https_entries()
            .iter()
            .filter(|e| e["path"] == "/slow")
            .count()
            >= 100
    });
    let out = p.push(&p.signed(11, "team"));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(p.version(), 11);
    let out = client.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    let statuses = r["statuses"].as_array().unwrap();
    assert_eq!(statuses.len(), 100);
    assert!(
        statuses.iter().all(|s| s == 200),
        "lost requests: {statuses:?}"
    );
}

#[test]
fn bundle_targets_replace_the_configured_ones_live() {
    let p = PolicyEnv::new(bundle);
    let env = &p.env;
    let dir = env.dir.path();
    let targets = |version: u64, extra: &str| {
        format!(
            "version: {version}\nname: targets\ntargets:\n  - name: fake-api\n    addresses: [\"{}\"]\n    ports: [443]\n    tls: passthrough\n  - name: plain-other\n    addresses: [\"{}\"]\n    ports: [{HTTP_PORT}]\n{extra}",
            env.remote.remote, env.remote.other
        )
    };
    let sign = |name: &str, body: &str| {
        let yaml = dir.join(format!("{name}.yaml"));
        std::fs::write(&yaml, body).unwrap();
        let out = sluice(&[
            "policy",
            "sign",
            &yaml.display().to_string(),
            "--key",
            &p.keys.join("team.key").display().to_string(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        yaml.with_extension("jws")
    };
    let out = p.push(&sign("t20", &targets(20, "")));
    assert!(out.status.success(), "{}", text(&out));
    let shown = env.node.cli_json(&["policy", "show", "--json"]);
    assert_eq!(
        shown["targets_from_bundle"],
        serde_json::json!(["fake-api", "plain-other"])
    );

    // fake-api is now spliced: the client sees the upstream's own certificate.
    let ca = env.remote.https_ca.display().to_string();
    let out = env.curl("api.fake.test", 443, "/json", &["--cacert", &ca]);
    assert!(out.status.success(), "{}", text(&out));
    // plain-other was not a target before; now it is intercepted.
    let r = env.client(&["peer", &env.remote.other, &HTTP_PORT.to_string()]);
    assert_eq!(r["status"], 200);
    let sessions = env.node.wait_sessions(2);
    let spliced = sessions
        .iter()
        .find(|s| s["target"] == "fake-api")
        .expect("fake-api session");
    assert_eq!(spliced["tls"]["mode"], "spliced");
    assert!(
        sessions.iter().any(|s| s["target"] == "plain-other"),
        "{sessions:#?}"
    );
    let st = env.node.status();
    assert!(
        st["target_entries"].to_string().contains("plain-other"),
        "{st:#}"
    );

    // A bundle that would intercept a name outside the node CA is refused.
    let evil = targets(
        21,
        "  - name: evil\n    hosts: [login.example.org]\n    ports: [443]\n    tls: intercept\n",
    );
    let out = p.push(&sign("t21", &evil));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("outside this node's CA name constraints"),
        "{}",
        text(&out)
    );
    assert_eq!(p.version(), 20);
}

/// `sluice policy test` and `lint` on files and stdin, with no node: what a
/// security team runs in its own CI before a bundle reaches the fleet.
const OFFLINE_BUNDLE: &str = r#"version: 3
name: offline
workloads:
  - name: ci
    cgroup: "/ci-*"
rules:
  - id: mask-secrets
    on: response
    targets: [ai]
    packs: [secrets, pii/iban]
    action: mask
    examples:
      hit: ["key AKIAIOSFODNN7EXAMPLE"]
      clean: ["golang.org/x/sys v0.0.0-20220319035150-800ac71e25c2"]
  - id: block-prod
    on: request
    patterns: [{id: prod, regex: '(?i)production password'}]
    action: block
    message: No production passwords.
    examples:
      hit: ["the production password is x"]
      clean: ["staging password"]
  - id: hold-deploys
    on: request
    workloads: [ci]
    patterns: [{id: deploy, regex: 'deploy to prod'}]
    action: approve
    examples:
      hit: ["please deploy to prod"]
  - id: no-deletes
    on: statement
    sql: {shapes: [delete_without_where]}
    action: block
    examples:
      hit: ["DELETE FROM users"]
      clean: ["DELETE FROM users WHERE id = 1"]
"#;

fn sluice_in(dir: &Path, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(SLUICE)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn policy_test_and_lint_judge_a_bundle_offline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("b.yaml"), OFFLINE_BUNDLE).unwrap();
    // A key and an IBAN in a streamed answer, 3 characters per delta.
    let key = "AKIAQ5TESTKEYSLUICE7";
    std::fs::write(
        d.join("answer.txt"),
        format!("use {key} and pay DE89 3704 0044 0532 0130 00 today\n"),
    )
    .unwrap();
    let (code, out, err) = sluice_in(
        d,
        &[
            "policy",
            "test",
            "b.yaml",
            "answer.txt",
            "--shape",
            "sse",
            "--delta",
            "3",
            "--expect-masked",
        ],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("hit   mask-secrets/aws-access-key-id"),
        "{out}"
    );
    assert!(out.contains("hit   mask-secrets/iban"), "{out}");
    assert!(
        out.contains("use ******************** and pay *************************** today"),
        "{out}"
    );
    assert!(
        !out.contains(key) && !out.contains("3704"),
        "a secret printed: {out}"
    );
    // The same answer is not clean; another target's rules do not apply.
    let (code, _, err) = sluice_in(
        d,
        &["policy", "test", "b.yaml", "answer.txt", "--expect-clean"],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("expectation failed: answer.txt: a rule acted on it"),
        "{err}"
    );
    let (code, out, err) = sluice_in(
        d,
        &[
            "policy",
            "test",
            "b.yaml",
            "answer.txt",
            "--target",
            "other",
            "--expect-clean",
        ],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");

    // Requests from stdin, as JSON: blocked; held only for the workload.
    let (code, out, err) = sluice_in(
        d,
        &[
            "policy",
            "test",
            "b.yaml",
            "--on",
            "request",
            "--json",
            "--expect-blocked",
        ],
        Some("what is the production password?"),
    );
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["verdict"], "block");
    assert_eq!(v[0]["rule"], "block-prod");
    assert_eq!(v[0]["message"], "No production passwords.");
    for (workload, code_want) in [("ci", 0), ("other", 1)] {
        let (code, out, err) = sluice_in(
            d,
            &[
                "policy",
                "test",
                "b.yaml",
                "-",
                "--on",
                "request",
                "--workload",
                workload,
                "--expect-held",
            ],
            Some("deploy to prod now"),
        );
        assert_eq!(code, code_want, "{workload}: {out}{err}");
    }
    // SQL through the real Postgres parser.
    let (code, out, err) = sluice_in(
        d,
        &[
            "policy",
            "test",
            "b.yaml",
            "--on",
            "statement",
            "--expect-blocked",
        ],
        Some("SELECT 1; DELETE FROM users"),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verdict: block by rule `no-deletes`"), "{out}");

    // A tool call, judged by the default policy's agent rule.
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default-policy.yaml");
    let (code, out, err) = sluice_in(
        d,
        &[
            "policy",
            "test",
            default.to_str().unwrap(),
            "--on",
            "tool-call",
            "--expect-blocked",
        ],
        Some(r#"{"name": "Bash", "arguments": {"command": "sudo rm -rf --no-preserve-root /"}}"#),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("block-dangerous-tool-calls"), "{out}");

    // Unreadable input or bundle: exit 2, said clearly.
    let (code, _, err) = sluice_in(d, &["policy", "test", "b.yaml", "missing.txt"], None);
    assert_eq!(code, 2);
    assert!(err.contains("missing.txt"), "{err}");
    std::fs::write(
        d.join("bad.yaml"),
        "version: 1\nname: x\nrules:\n  - {id: r, on: request, packs: [nope], action: block}\n",
    )
    .unwrap();
    let (code, _, err) = sluice_in(d, &["policy", "test", "bad.yaml"], Some("x"));
    assert_eq!(code, 2);
    assert!(err.contains("no pack named `nope`"), "{err}");

    // Lint: this bundle is clean; the shipped default too.
    let (code, out, err) = sluice_in(d, &["policy", "lint", "b.yaml", "--strict"], None);
    assert_eq!(code, 0, "{out}{err}");
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default-policy.yaml");
    let (code, out, err) = sluice_in(
        d,
        &["policy", "lint", default.to_str().unwrap(), "--strict"],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    // A rule that misses its example is an error; one an earlier block
    // always decides first is a warning (an error with --strict); an
    // empty-matching pattern and an unknown pack are refused, named.
    let broken = OFFLINE_BUNDLE
        .replace("the production password is x", "prod pw")
        .replace(
            "  - id: no-deletes",
            "  - id: block-prod-again\n    on: request\n    patterns: [{id: p2, regex: 'production'}]\n    action: block\n    examples:\n      hit: [\"production password\"]\n  - id: no-deletes",
        );
    std::fs::write(d.join("broken.yaml"), &broken).unwrap();
    let (code, out, _) = sluice_in(d, &["policy", "lint", "broken.yaml"], None);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("error: rules[1] block-prod: misses its own example \"prod pw\""),
        "{out}"
    );
    let warned = OFFLINE_BUNDLE.replace(
        "  - id: no-deletes",
        "  - id: block-prod-again\n    on: request\n    patterns: [{id: p2, regex: 'production'}]\n    action: block\n    examples:\n      hit: [\"production password\"]\n  - id: no-deletes",
    );
    std::fs::write(d.join("warned.yaml"), &warned).unwrap();
    let (code, out, _) = sluice_in(d, &["policy", "lint", "warned.yaml", "--json"], None);
    assert_eq!(code, 0, "{out}");
    let f: Value = serde_json::from_str(&out).unwrap();
    assert!(
        f.as_array()
            .unwrap()
            .iter()
            .any(|x| x["severity"] == "warning"
                && x["message"]
                    .as_str()
                    .unwrap()
                    .contains("decided first by rules[1] block-prod")),
        "{out}"
    );
    let (code, _, _) = sluice_in(d, &["policy", "lint", "warned.yaml", "--strict"], None);
    assert_eq!(code, 1);
    std::fs::write(d.join("empty.yaml"), "version: 1\nname: x\nrules:\n  - {id: r, on: request, patterns: [{id: maybe-a, regex: 'a{0,3}'}], action: block}\n").unwrap();
    let (code, out, _) = sluice_in(d, &["policy", "lint", "empty.yaml"], None);
    assert_eq!(code, 1);
    assert!(
        out.contains("maybe-a") && out.contains("empty string"),
        "{out}"
    );
}
