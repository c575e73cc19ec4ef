//! The redirect on the root cgroup (`watch.host`, issue 21 item 1): a job
//! that leaves its cgroup, or has a host daemon connect for it, changes
//! who the connection is attributed to (a host identity), never whether
//! it is intercepted; host processes are kept off targets with rules,
//! recorded, and the node's own connections and exempt subtrees pass.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

/// `cursor-api` (the embedded policy's rules are about it) served by the
/// fake HTTPS upstream, and the plain HTTP remote as a target without
/// rules.
fn env() -> Env {
    Env::https_targets(
        |r| {
            format!(
                "  - name: cursor-api\n    addresses: [\"{0}\"]\n    ports: [443]\n    tls: intercept\n    sni: [api.fake.test]\n  - name: plain\n    addresses: [\"{0}\"]\n    ports: [{HTTP_PORT}]\n",
                r.remote
            )
        },
        |_| String::new(),
    )
}

fn curl_args(env: &Env, tag: &str) -> Vec<String> {
    vec![
        "-sS".into(),
        "--max-time".into(),
        "10".into(),
        "--resolve".into(),
        format!("api.fake.test:443:{}", env.remote.remote),
        "-w".into(),
        "\n%{http_code}".into(),
        format!("https://api.fake.test/json?tag={tag}"),
    ]
}

/// curl's `-w "\n%{http_code}"` says 200.
fn ok200(out: &std::process::Output) -> bool {
    String::from_utf8_lossy(&out.stdout).ends_with("\n200")
}

fn upstream_saw(env: &Env, tag: &str) -> bool {
    env.remote
        .https_entries()
        .iter()
        .any(|e| e.to_string().contains(tag))
}

/// The finished session whose process command line holds `hint`.
fn session_of(env: &Env, hint: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = env.node.sessions().into_iter().find(|s| {
            s["outcome"]["status"] != "open"
                && s["process"]["cmdline"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x.as_str().unwrap_or("").contains(hint)))
        });
        if let Some(s) = found {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no finished session for {hint}:\n{}",
            env.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn leaving_the_job_changes_who_is_intercepted_never_whether() {
    let mut env = env();
    env.host_mode("");
    let _trust = env.trust_node_ca();
    let root = cgroup2_root();
    assert_eq!(env.node.status()["redirect_scope"], "host");

    // The job: intercepted as before (and the node's own upstream
    // connection, from the root cgroup too, is not sent back to itself).
    let args = curl_args(&env, "job");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = env.cgroup.run("curl", &refs);
    assert!(ok200(&out), "{}", text(&out));
    let s = session_of(&env, "tag=job");
    assert!(s["identity"].get("host").is_none(), "{s:#}");
    assert_eq!(s["tls"]["mode"], "intercepted");

    // A host process (this test) on the same target: through the node,
    // refused, recorded under a host identity; the upstream never sees it.
    let args = curl_args(&env, "host-direct");
    let out = Command::new("curl").args(&args).output().unwrap();
    assert!(!ok200(&out), "{}", text(&out));
    assert!(!upstream_saw(&env, "host-direct"));
    let s = session_of(&env, "tag=host-direct");
    assert_eq!(s["identity"]["host"], true, "{s:#}");
    assert!(s["identity"]["ci"].is_null(), "{s:#}");
    assert_eq!(s["outcome"]["status"], "refused");
    assert!(
        s["outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("host process"),
        "{s:#}"
    );

    // The job leaves its cgroup and connects at once: intercepted all
    // the same (and, without the BPF LSM, killed for leaving).
    let args = curl_args(&env, "escaped").join("' '");
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec curl '{args}'",
        root.display()
    );
    let _ = env.cgroup.run("sh", &["-c", &script]);
    assert!(!upstream_saw(&env, "escaped"), "an escaped job went direct");

    // A host daemon runs curl for the job: a host identity, refused.
    let daemon = HostDaemon::start(env.dir.path());
    // (one line to the daemon: no newline in the -w format)
    let args = curl_args(&env, "via-daemon")
        .join("' '")
        .replace("\n%{http_code}", "code=%{http_code}");
    let out = daemon.ask(&env, &format!("curl '{args}'"));
    assert!(!out.contains("code=200"), "{out}");
    assert!(!upstream_saw(&env, "via-daemon"));
    let s = session_of(&env, "tag=via-daemon");
    assert_eq!(s["identity"]["host"], true, "{s:#}");
    assert_eq!(s["outcome"]["status"], "refused");

    // A target without rules: a host process is forwarded, and recorded.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            &format!(
                "http://{}:{HTTP_PORT}/hello?tag=plain-host",
                env.remote.remote
            ),
        ])
        .output()
        .unwrap();
    assert!(text(&out).contains("world"), "{}", text(&out));
    let s = session_of(&env, "tag=plain-host");
    assert_eq!(s["identity"]["host"], true);
    assert_eq!(s["target"], "plain");
    assert_eq!(s["outcome"]["status"], "closed", "{s:#}");

    // Everything else on the host is left alone (not a target).
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{}/metrics", env.metrics_addr()),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // `sluice detach` (node stopped) removes the root cgroup's links too:
    // 8 per job cgroup, the guard's, and 7 on the root.
    let lsm = env.node.status()["containment"] == "bpf-lsm";
    env.node.stop();
    let out = env.node.detach();
    let want = if lsm { 8 + 3 + 7 } else { 8 + 1 + 7 };
    assert!(
        text(&out).contains(&format!("detached {want} link(s)")),
        "{}",
        text(&out)
    );
    // With the hooks gone, the host reaches the upstream itself.
    let args = curl_args(&env, "after-detach");
    let out = Command::new("curl").args(&args).arg("-k").output().unwrap();
    assert!(ok200(&out), "{}", text(&out));
}

#[test]
fn exempt_subtrees_pass_and_watched_cgroups_below_them_do_not() {
    let mut env = env();
    let rel = format!("{}-exempt", env.cgroup.rel);
    let exempt = Cgroup {
        path: cgroup2_root().join(&rel),
        rel,
    };
    std::fs::create_dir_all(&exempt.path).unwrap();
    env.host_mode(&format!("    exempt: [\"{}\"]\n", exempt.rel));
    let _trust = env.trust_node_ca();
    // A process in the exempt subtree reaches the upstream itself (its
    // own certificate: -k), and no session is recorded for it.
    let args = curl_args(&env, "exempt");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut with_k = refs.clone();
    with_k.push("-k");
    let out = exempt.run("curl", &with_k);
    assert!(ok200(&out), "{}", text(&out));
    assert!(upstream_saw(&env, "exempt"));
    assert!(
        env.node
            .sessions()
            .iter()
            .all(|s| !s.to_string().contains("tag=exempt")),
        "an exempt process was intercepted"
    );
    // The job is still intercepted.
    let args = curl_args(&env, "job");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = env.cgroup.run("curl", &refs);
    assert!(ok200(&out), "{}", text(&out));
    let s = session_of(&env, "tag=job");
    assert!(s["identity"].get("host").is_none(), "{s:#}");
}
