//! The job as the adversary (issue 8, items 3, 5 and 7): it forges its CI
//! identity, calls the control socket as root from inside its cgroup, and
//! the node's stored policy is tampered with, deleted or left to expire.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The real job's environment, as the runner set it.
const JOB_ENV: &[(&str, &str)] = &[
    ("GITHUB_ACTIONS", "true"),
    ("GITHUB_REPOSITORY", "acme/widgets"),
    ("GITHUB_RUN_ID", "4242"),
    ("GITHUB_RUN_ATTEMPT", "1"),
    ("GITHUB_JOB", "build"),
    ("GITHUB_ACTOR", "alice"),
];

/// What a process in the job sets in its own environment.
const FORGED: &str = "GITHUB_REPOSITORY=acme/other GITHUB_RUN_ID=1 GITHUB_ACTOR=mallory";

fn with_job_env(mut c: Command) -> Command {
    for (k, v) in JOB_ENV {
        c.env(k, v);
    }
    c
}

fn url(env: &Env, tag: &str) -> String {
    format!("http://{}:{HTTP_PORT}/hello?tag={tag}", env.remote.remote)
}

fn session_with_tag(env: &Env, pid_hint: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = env.node.sessions();
        if let Some(found) = s.iter().find(|s| {
            s["outcome"]["status"] != "open"
                && s["process"]["cmdline"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|x| x.as_str().unwrap_or("").contains(pid_hint))
                })
        }) {
            return found.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no finished session for {pid_hint}: {s:#?}\n{}",
            env.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn remote_saw(env: &Env, tag: &str) -> bool {
    env.remote
        .entries()
        .iter()
        .any(|e| e.to_string().contains(tag))
}

#[test]
fn forged_ci_identity_is_ignored_recorded_audited_and_stays_suspended() {
    let env = Env::new();
    // The job's shell (the process the runner put in the cgroup) carries
    // the real job environment; a command in it runs curl normally.
    let out = with_job_env(env.cgroup.command(
        "sh",
        &[
            "-c",
            &format!("curl -sS --max-time 10 '{}'; true", url(&env, "legit")),
        ],
    ))
    .output()
    .unwrap();
    assert!(text(&out).contains("world"), "{}", text(&out));
    let legit = session_with_tag(&env, "tag=legit");
    let id = legit["identity"]["id"].as_str().unwrap().to_owned();
    assert_eq!(legit["identity"]["ci"]["repository"], "acme/widgets");
    assert_eq!(legit["identity"]["ci_source"]["how"], "cgroup-top");
    assert_eq!(legit["identity"]["ci_source"]["comm"], "sh");
    assert!(legit["process"].get("claimed_ci").is_none(), "{legit:#}");

    // Before the suspension: the forging process gets through, but under
    // the job's trusted identity, its claim recorded, an anomaly audited.
    let forge = |tag: &str| {
        with_job_env(env.cgroup.command(
            "sh",
            &[
                "-c",
                &format!(
                    "{FORGED} curl -sS --max-time 10 '{}'; echo rc=$?",
                    url(&env, tag)
                ),
            ],
        ))
        .output()
        .unwrap()
    };
    let out = forge("forged-before");
    assert!(text(&out).contains("rc=0"), "{}", text(&out));
    let s = session_with_tag(&env, "tag=forged-before");
    assert_eq!(s["identity"]["id"], id, "same job, same identity: {s:#}");
    assert_eq!(s["identity"]["ci"]["repository"], "acme/widgets");
    assert_eq!(s["identity"]["ci"]["actor"], "alice");
    assert_eq!(s["process"]["claimed_ci"]["repository"], "acme/other");
    assert_eq!(s["process"]["claimed_ci"]["actor"], "mallory");
    let audit = text(&env.node.cli(&["audit", "--kind", "anomaly"]));
    assert!(
        audit.contains("anomaly.identity")
            && audit.contains("acme/other")
            && audit.contains("acme/widgets")
            && audit.contains(&id),
        "{audit}"
    );
    // Filtering by the forged repository finds nothing.
    let other = env
        .node
        .cli_json(&["sessions", "list", "--json", "--identity", "acme/other"]);
    assert_eq!(other.as_array().unwrap().len(), 0, "{other:#}");

    // The operator suspends the job: the forged identity does not escape.
    let out = env
        .node
        .cli(&["identities", "suspend", &id, "--reason", "incident 8"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = forge("forged-after");
    assert!(
        !text(&out).contains("rc=0"),
        "must be refused: {}",
        text(&out)
    );
    assert!(!remote_saw(&env, "forged-after"), "reached the remote");
    let s = session_with_tag(&env, "tag=forged-after");
    assert_eq!(s["identity"]["id"], id);
    assert_eq!(s["outcome"]["status"], "refused", "{s:#}");
    assert!(
        s["outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("incident 8"),
        "{s:#}"
    );
    assert_eq!(s["process"]["claimed_ci"]["repository"], "acme/other");
    let v = env.node.cli(&["verify"]);
    assert!(v.status.success(), "{}", text(&v));
}

#[test]
fn runner_worker_ancestor_is_trusted_over_planted_fakes_and_orphans() {
    let env = Env::new();
    // A stand-in for GitHub's Runner.Worker: a copy of the shell under
    // that name (the kernel's comm and /proc/PID/exe both say so), started
    // with the real job environment.
    let bin = env.dir.path().join("runner-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let worker = bin.join("Runner.Worker");
    std::fs::copy("/bin/sh", &worker).unwrap();
    let fake_dir = env.dir.path().join("job-tmp");
    std::fs::create_dir_all(&fake_dir).unwrap();
    let script = format!(
        r#"
# 1. a step's command with a forged environment
{FORGED} curl -sS --max-time 10 '{direct}' >/dev/null
# 2. a fake Runner.Worker planted by the job, below the real one
cp /bin/sh {fake}/Runner.Worker
{FORGED} {fake}/Runner.Worker -c "curl -sS --max-time 10 '{planted}' >/dev/null; true"
# 3. a detached (double-forked) process: reparented out of the job's tree
( {FORGED} curl -sS --max-time 10 '{orphan}' >/dev/null & )
sleep 3
echo done
"#,
        direct = url(&env, "direct"),
        planted = url(&env, "planted"),
        orphan = url(&env, "orphan"),
        fake = fake_dir.display(),
    );
    let out = with_job_env(
        env.cgroup
            .command(worker.to_str().unwrap(), &["-c", &script]),
    )
    .output()
    .unwrap();
    assert!(text(&out).contains("done"), "{}", text(&out));
    for tag in ["direct", "planted", "orphan"] {
        let s = session_with_tag(&env, &format!("tag={tag}"));
        assert_eq!(s["outcome"]["status"], "closed", "{tag}: {s:#}");
        assert_eq!(
            s["identity"]["ci"]["repository"], "acme/widgets",
            "{tag}: {s:#}"
        );
        assert_eq!(s["identity"]["ci"]["run_id"], "4242", "{tag}");
        assert_eq!(s["identity"]["ci_source"]["comm"], "Runner.Worker", "{tag}");
        let how = s["identity"]["ci_source"]["how"].as_str().unwrap();
        let want = if tag == "orphan" {
            "cgroup-sole-job"
        } else {
            "runner-anchor"
        };
        assert_eq!(how, want, "{tag}: {s:#}");
        assert_eq!(
            s["process"]["claimed_ci"]["repository"], "acme/other",
            "{tag}: {s:#}"
        );
    }
    let audit = text(&env.node.cli(&["audit", "--kind", "anomaly"]));
    assert!(audit.contains("acme/other"), "{audit}");
}

#[test]
fn a_detached_process_in_a_sub_cgroup_gets_the_jobs_identity_not_its_own_claim() {
    let env = Env::new();
    // No runner process: the job's shell (put there by a CI system the
    // node has no anchor for) connects first, with the real environment.
    let out = with_job_env(env.cgroup.command(
        "sh",
        &[
            "-c",
            &format!("curl -sS --max-time 10 '{}'; true", url(&env, "first")),
        ],
    ))
    .output()
    .unwrap();
    assert!(text(&out).contains("world"), "{}", text(&out));
    let first = session_with_tag(&env, "tag=first");
    let id = first["identity"]["id"].as_str().unwrap().to_owned();
    assert_eq!(first["identity"]["ci"]["repository"], "acme/widgets");
    let out = env
        .node
        .cli(&["identities", "suspend", &id, "--reason", "incident 21"]);
    assert!(out.status.success(), "{}", text(&out));

    // The job makes a sub-cgroup, and a process there detaches (double
    // fork: its parent is PID 1, outside the watched cgroups) with a
    // forged environment, so nothing above it vouches for anything.
    let sub = env.cgroup.path.join("detached");
    std::fs::create_dir_all(&sub).unwrap();
    let script = format!(
        "echo $$ > {sub}/cgroup.procs; ( env -i PATH=$PATH GITHUB_ACTIONS=true GITHUB_REPOSITORY=acme/other GITHUB_RUN_ID=1 GITHUB_ACTOR=mallory setsid sh -c \"curl -sS --max-time 10 '{u}'; echo rc=\\$? > {out}\" & ); sleep 3",
        sub = sub.display(),
        u = url(&env, "detached"),
        out = env.dir.path().join("detached.rc").display(),
    );
    let _ = with_job_env(env.cgroup.command("sh", &["-c", &script]))
        .output()
        .unwrap();
    let rc = std::fs::read_to_string(env.dir.path().join("detached.rc")).unwrap_or_default();
    assert!(!rc.contains("rc=0"), "the suspension must hold: {rc}");
    assert!(!remote_saw(&env, "detached"), "reached the remote");
    let s = session_with_tag(&env, "tag=detached");
    assert_eq!(s["identity"]["id"], id, "the job's identity: {s:#}");
    assert_eq!(
        s["identity"]["ci_source"]["how"], "job-cgroup-first",
        "{s:#}"
    );
    assert_eq!(s["outcome"]["status"], "refused", "{s:#}");
    assert_eq!(s["process"]["claimed_ci"]["repository"], "acme/other");
    let audit = text(&env.node.cli(&["audit", "--kind", "anomaly"]));
    assert!(
        audit.contains("acme/other") && audit.contains(&id),
        "{audit}"
    );
    let _ = std::fs::remove_dir(&sub);
}

// ---- the control socket ------------------------------------------------

const NODE_KEY: &str = "node-held-secret-hostile";

fn bundle(version: u64, dir: &Path, expires_at: Option<&str>) -> String {
    let prefix = prefix();
    format!(
        r#"version: {version}
name: hostile-e2e
{expiry}workloads:
  - name: e2e
    cgroup: "/{prefix}-*"
rules:
  - id: approve-deploys
    on: request
    targets: [fake-api]
    patterns:
      - id: deploy
        regex: 'DEPLOY-TO-PROD'
    action: approve
    timeout_secs: 30
credentials:
  - target: fake-api
    source: "file:{}"
"#,
        dir.join("node-cursor.key").display(),
        expiry = expires_at
            .map(|t| format!("expires_at: \"{t}\"\n"))
            .unwrap_or_default(),
    )
}

struct Signed {
    env: Env,
    keys: PathBuf,
}

impl Signed {
    fn new() -> Self {
        let env = Env::https_with(|dir| {
            let keys = dir.join("keys");
            std::fs::create_dir_all(&keys).unwrap();
            let out = Command::new(SLUICE)
                .args(["policy", "keygen"])
                .arg(keys.join("team"))
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", text(&out));
            std::fs::write(dir.join("node-cursor.key"), format!("{NODE_KEY}\n")).unwrap();
            std::fs::create_dir_all(dir.join("policy.d")).unwrap();
            format!(
                "policy:\n  trusted_keys: [\"{}\"]\n  watch_dir: \"{}\"\n",
                keys.join("team.pub").display(),
                dir.join("policy.d").display()
            )
        });
        let keys = env.dir.path().join("keys");
        Signed { env, keys }
    }

    fn signed(&self, version: u64, expires_at: Option<&str>) -> PathBuf {
        let dir = self.env.dir.path();
        let yaml = dir.join(format!("bundle-v{version}.yaml"));
        std::fs::write(&yaml, bundle(version, dir, expires_at)).unwrap();
        let out = Command::new(SLUICE)
            .args(["policy", "sign"])
            .arg(&yaml)
            .arg("--key")
            .arg(self.keys.join("team.key"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        yaml.with_extension("jws")
    }

    fn push(&self, file: &Path) -> Output {
        self.env
            .node
            .cli(&["policy", "push", &file.display().to_string()])
    }

    fn policy(&self) -> Value {
        self.env.node.cli_json(&["policy", "show", "--json"])
    }

    /// `sluice run` on this state directory, expected to refuse to start.
    fn start_fails(&self) -> String {
        let mut child = Command::new(SLUICE)
            .arg("--socket")
            .arg(self.env.dir.path().join("refused.sock"))
            .arg("run")
            .arg("--config")
            .arg(self.env.config_path())
            .arg("--state-dir")
            .arg(self.env.state_dir())
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let out = child.wait_with_output().unwrap();
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                assert!(!status.success(), "the node must refuse to start: {err}");
                // It exited: nothing of it may stay attached.
                let _ = Command::new(SLUICE)
                    .arg("detach")
                    .arg("--config")
                    .arg(self.env.config_path())
                    .output();
                return err;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = Command::new(SLUICE)
                    .arg("detach")
                    .arg("--config")
                    .arg(self.env.config_path())
                    .output();
                panic!("the node started although it must refuse to");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn pending(env: &Env) -> Vec<Value> {
    env.node
        .cli_json(&["approvals", "list", "--json"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn root_job_cannot_approve_its_own_request_or_lift_its_own_suspension() {
    let p = Signed::new();
    let out = p.push(&p.signed(10, None));
    assert!(out.status.success(), "{}", text(&out));
    let env = &p.env;
    let _trust = env.trust_node_ca();
    let resolve = format!("api.fake.test:443:{}", env.remote.remote);
    let held = env
        .cgroup
        .command(
            "curl",
            &[
                "-sS",
                "--max-time",
                "40",
                "--resolve",
                &resolve,
                "-X",
                "POST",
                "-d",
                "{\"prompt\":\"DEPLOY-TO-PROD hostile\"}",
                "-w",
                "\n%{http_code}",
                "https://api.fake.test/json",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let approval = loop {
        if let Some(a) = pending(env).into_iter().next() {
            break a;
        }
        assert!(Instant::now() < deadline, "no held request");
        std::thread::sleep(Duration::from_millis(50));
    };
    let aid = approval["id"].to_string();
    let identity = approval["workload"].as_str().unwrap().to_owned();
    let sock = env.node.socket.display().to_string();
    // The worst case: the operator's private key was left on the runner.
    let key = operator_key(env.dir.path());

    // Root, inside the watched cgroup, key in hand: the socket refuses it,
    // and the request stays held.
    let me = env
        .cgroup
        .command(SLUICE, &["--socket", &sock, "approvals", "approve", &aid])
        .env("SLUICE_OPERATOR_KEY", &key)
        .output()
        .unwrap();
    assert!(!me.status.success(), "approve from the job must fail");
    assert!(
        text(&me).contains("watched cgroup"),
        "clear error: {}",
        text(&me)
    );
    assert_eq!(pending(env).len(), 1, "still held");
    // A sub-cgroup of the watched one is the watched subtree too.
    let sub = env.cgroup.path.join("step");
    std::fs::create_dir_all(&sub).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {SLUICE} --socket {sock} approvals approve {aid}",
            sub.display()
        ))
        .env("SLUICE_OPERATOR_KEY", &key)
        .output()
        .unwrap();
    assert!(
        !out.status.success() && text(&out).contains("watched cgroup"),
        "{}",
        text(&out)
    );
    let _ = std::fs::remove_dir(&sub);

    // A host daemon outside the watched cgroups runs commands for anyone
    // who asks (here, the job): its calls pass the cgroup check, but an
    // approve needs a decision signed by an operator key the node trusts.
    let daemon = HostDaemon::start(env.dir.path());
    let raw = |json: String| {
        daemon.ask(
            env,
            &format!("python3 {FIXTURES}/host_daemon.py raw {sock} '{json}'"),
        )
    };
    let out = raw(format!(
        r#"{{"op":"approval_decide","id":{aid},"approve":true}}"#
    ));
    assert!(
        out.contains("needs a decision signed by an operator key"),
        "{out}"
    );
    let out = daemon.ask(
        env,
        &format!("{SLUICE} --socket {sock} approvals approve {aid}"),
    );
    assert!(
        out.contains("needs a decision signed") && out.contains("exit 1"),
        "{out}"
    );
    // The job makes a key of its own and signs with it: not trusted.
    let mallory = env.dir.path().join("mallory");
    let out = env
        .cgroup
        .run(SLUICE, &["operator", "keygen", mallory.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = daemon.ask(
        env,
        &format!(
            "{SLUICE} --socket {sock} approvals approve {aid} --key {}",
            mallory.with_extension("key").display()
        ),
    );
    assert!(out.contains("does not trust"), "{out}");
    assert_eq!(pending(env).len(), 1, "still held");

    // The operator, with their key, denies it.
    let out = env
        .node
        .cli(&["approvals", "deny", &aid, "--reason", "not from the job"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = held.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).ends_with("\n403"),
        "{}",
        text(&out)
    );

    // Suspended by the operator; the job cannot resume itself, not from
    // its cgroup and not through the daemon.
    let out = env
        .node
        .cli(&["identities", "suspend", &identity, "--reason", "incident"]);
    assert!(out.status.success(), "{}", text(&out));
    let me = env
        .cgroup
        .command(
            SLUICE,
            &["--socket", &sock, "identities", "resume", &identity],
        )
        .env("SLUICE_OPERATOR_KEY", &key)
        .output()
        .unwrap();
    assert!(
        !me.status.success() && text(&me).contains("watched cgroup"),
        "{}",
        text(&me)
    );
    let out = raw(format!(
        r#"{{"op":"identity_resume","identity":"{identity}"}}"#
    ));
    assert!(out.contains("needs a decision signed"), "{out}");
    let out = daemon.ask(
        env,
        &format!(
            "{SLUICE} --socket {sock} identities resume {identity} --key {}",
            mallory.with_extension("key").display()
        ),
    );
    assert!(out.contains("does not trust"), "{out}");
    let listed = env.node.cli_json(&["identities", "list", "--json"]);
    assert_eq!(listed["suspended"][0]["identity"], identity);
    // Read-only calls are refused from the job as well: records are
    // evidence.
    let me = env.cgroup.run(SLUICE, &["--socket", &sock, "status"]);
    assert!(!me.status.success(), "{}", text(&me));

    // The operator's signed resume lifts it, and the record names them.
    let out = env
        .node
        .cli(&["identities", "resume", &identity, "--by", "alice"]);
    assert!(out.status.success(), "{}", text(&out));
    let listed = env.node.cli_json(&["identities", "list", "--json"]);
    assert_eq!(listed["suspended"], serde_json::json!([]));

    let audit = text(&env.node.cli(&["audit", "--kind", "control"]));
    assert!(
        audit.matches("control.refused").count() >= 8
            && audit.contains("approval_decide")
            && audit.contains("identity_resume")
            && audit.contains("does not trust"),
        "{audit}"
    );
    let audit = text(&env.node.cli(&["audit", "--kind", "identity.resumed"]));
    assert!(audit.contains("\"by\":\"alice\""), "{audit}");
}

// ---- the policy floor ---------------------------------------------------

#[test]
fn policy_floor_survives_tampering_deletion_and_expiry() {
    let mut p = Signed::new();
    let v10 = p.signed(10, Some("2999-01-01T00:00:00Z"));
    let v9 = p.signed(9, None);
    let out = p.push(&v10);
    assert!(out.status.success(), "{}", text(&out));
    let shown = p.policy();
    assert_eq!(shown["version"], 10);
    assert_eq!(shown["floor"], 10);
    assert_eq!(shown["expired"], false);

    // An expired bundle is refused at push.
    let expired = p.signed(11, Some("2001-01-01T00:00:00Z"));
    let out = p.push(&expired);
    assert!(
        !out.status.success() && text(&out).contains("expired"),
        "{}",
        text(&out)
    );
    assert_eq!(p.policy()["version"], 10);

    let stored = p.env.state_dir().join("policy/current.jws");
    let good = std::fs::read_to_string(&stored).unwrap();

    // Tampered stored bundle: the node refuses to start (no fallback to
    // the embedded example).
    p.env.stop_node();
    let mut parts: Vec<String> = good.trim().split('.').map(str::to_owned).collect();
    let mut c = parts[1].clone().into_bytes();
    c[40] = if c[40] == b'A' { b'B' } else { b'A' };
    parts[1] = String::from_utf8(c).unwrap();
    std::fs::write(&stored, parts.join(".")).unwrap();
    let err = p.start_fails();
    assert!(
        err.contains("no longer verifies or compiles") && err.contains("signature"),
        "{err}"
    );
    // An older, validly signed bundle in its place: refused as well.
    std::fs::copy(&v9, &stored).unwrap();
    let err = p.start_fails();
    assert!(err.contains("below the policy floor 10"), "{err}");

    // Deleted stored bundle: still refuses to start; an older bundle in
    // the watch directory does not satisfy it.
    std::fs::remove_file(&stored).unwrap();
    let err = p.start_fails();
    assert!(
        err.contains("missing") && err.contains("version 10"),
        "{err}"
    );
    let watch = p.env.dir.path().join("policy.d");
    std::fs::copy(&v9, watch.join("v9.jws")).unwrap();
    let err = p.start_fails();
    assert!(err.contains("missing"), "{err}");
    // The accepted bundle, dropped in the watch directory, restores it.
    std::fs::copy(&v10, watch.join("v10.jws")).unwrap();
    p.env.restart();
    assert_eq!(p.policy()["version"], 10);
    let out = p.push(&v9);
    assert!(
        !out.status.success() && text(&out).contains("not newer"),
        "{}",
        text(&out)
    );
    // Deleted under a running node: an older bundle is still refused.
    std::fs::remove_file(&stored).unwrap();
    let out = p.push(&v9);
    assert!(!out.status.success(), "{}", text(&out));
    std::fs::copy(&v10, &stored).unwrap();

    // A bundle that expires while in force: status says so, audited, and
    // the node will not start on it again.
    let soon =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(4))
            .to_string();
    let v12 = p.signed(12, Some(&soon));
    let out = p.push(&v12);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("the bundle to expire", || p.policy()["expired"] == true);
    wait_for("policy.expired audit event", || {
        text(&p.env.node.cli(&["audit", "--kind", "policy.expired"])).contains("policy.expired")
    });
    let st = p.env.node.status();
    assert_eq!(st["policy_expired"], true, "{st:#}");
    assert_eq!(st["policy_floor"], 12, "{st:#}");
    p.env.stop_node();
    let err = p.start_fails();
    assert!(err.contains("expired"), "{err}");
}

/// A job that fires held requests and hangs up must not keep their slots:
/// each hold ends when its client goes away (issue 21: 32 per identity,
/// then every approve rule would deny at once).
#[test]
fn a_held_request_whose_client_hangs_up_gives_its_slot_back() {
    let p = Signed::new();
    let out = p.push(&p.signed(10, None));
    assert!(out.status.success(), "{}", text(&out));
    let env = &p.env;
    let _trust = env.trust_node_ca();
    let resolve = format!("api.fake.test:443:{}", env.remote.remote);
    // curl gives up after 3 s, long before the rule's 30 s timeout.
    let out = env.cgroup.run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "3",
            "--resolve",
            &resolve,
            "-X",
            "POST",
            "-d",
            "{\"prompt\":\"DEPLOY-TO-PROD and hang up\"}",
            "https://api.fake.test/json",
        ],
    );
    assert!(
        !out.status.success(),
        "the request was held, so curl timed out"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pending(env).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the hold outlived its client: {:?}",
            pending(env)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
