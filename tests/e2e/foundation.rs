//! The foundation: transparent redirect, attribution, records, and the
//! ways around them that must not work.
use std::{collections::HashMap, process::Command};

use serde_json::Value;

use crate::harness::*;

fn session_for_local<'a>(sessions: &'a [Value], local: &str) -> &'a Value {
    sessions
        .iter()
        .find(|s| s["client"] == local)
        .unwrap_or_else(|| panic!("no session for client {local}: {sessions:#?}"))
}

#[test]
fn curl_in_watched_cgroup_is_intercepted_attributed_and_recorded() {
    let env = Env::new();
    let url = format!("http://{}:{HTTP_PORT}/hello?tag=gh", env.remote.remote);
    let out = env
        .cgroup
        .command(
            "curl",
            &["-sS", "--max-time", "10", "-w", "\n%{local_port}", &url],
        )
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_REPOSITORY", "acme/widgets")
        .env("GITHUB_RUN_ID", "4242")
        .env("GITHUB_RUN_ATTEMPT", "3")
        .env("GITHUB_WORKFLOW", "ci")
        .env("GITHUB_JOB", "build")
        .env("GITHUB_ACTOR", "alice")
        .env("GITHUB_REF", "refs/heads/main")
        .env("GITHUB_SHA", "0123abcd")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = wrapper_pid(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, local_port) = stdout.rsplit_once('\n').unwrap();
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["hello"], "world", "the right answer came back");
    // The remote saw Sluice's upstream connection, not the client's socket.
    assert_ne!(
        body["peer"].as_str().unwrap().rsplit(':').next().unwrap(),
        local_port,
        "the remote must see the proxy's connection"
    );

    let sessions = env.node.wait_sessions(1);
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    let s = &sessions[0];
    assert_eq!(s["client"], format!("127.0.0.1:{local_port}"));
    assert_eq!(
        s["original_dst"],
        format!("{}:{HTTP_PORT}", env.remote.remote)
    );
    assert_eq!(s["target"], "fake-remote");
    assert_eq!(s["outcome"]["status"], "closed");
    assert_eq!(s["process"]["tgid"], pid);
    assert_eq!(
        s["process"]["pid"], pid,
        "single-threaded curl: thread id = pid"
    );
    assert_eq!(s["process"]["comm"], "curl");
    assert_eq!(s["process"]["exe"], Value::from(which("curl")));
    assert_eq!(s["process"]["uid"], 0);
    let id = &s["identity"];
    assert_eq!(id["cgroup_path"], format!("/{}", env.cgroup.rel));
    assert_eq!(id["workload"], "e2e-jobs");
    assert_eq!(id["ci"]["system"], "github-actions");
    assert_eq!(id["ci"]["repository"], "acme/widgets");
    assert_eq!(id["ci"]["run_id"], "4242");
    assert_eq!(id["ci"]["run_attempt"], "3");
    assert_eq!(id["ci"]["workflow"], "ci");
    assert_eq!(id["ci"]["job"], "build");
    assert_eq!(id["ci"]["actor"], "alice");
    assert_eq!(id["ci"]["git_ref"], "refs/heads/main");
    assert_eq!(id["ci"]["sha"], "0123abcd");
    assert!(id["id"].as_str().unwrap().starts_with("wl-"));
    assert!(
        s["bytes_up"].as_u64().unwrap() > 50,
        "request bytes counted"
    );
    assert!(
        s["bytes_down"].as_u64().unwrap() > 50,
        "response bytes counted"
    );
    assert!(s["ended_at_ms"].as_u64().unwrap() >= s["started_at_ms"].as_u64().unwrap());

    // `sessions show` and the identity filter agree with the list.
    let shown = env
        .node
        .cli_json(&["sessions", "show", &s["id"].to_string()]);
    assert_eq!(shown["identity"], *id);
    let filtered = env
        .node
        .cli_json(&["sessions", "list", "--json", "--identity", "acme/widgets"]);
    assert_eq!(filtered.as_array().unwrap().len(), 1);
    let none = env
        .node
        .cli_json(&["sessions", "list", "--json", "--identity", "other/repo"]);
    assert_eq!(none.as_array().unwrap().len(), 0);

    // A GitLab job run next in the same cgroup by its runner gets its own
    // identity (without a runner process it would be the cgroup's first
    // job's: hostile.rs).
    let out = env
        .cgroup
        .under_runner(
            "gitlab-runner",
            env.dir.path(),
            "curl",
            &["-sS", "--max-time", "10", &url],
        )
        .env("GITLAB_CI", "true")
        .env("CI_PROJECT_PATH", "group/project")
        .env("CI_PIPELINE_ID", "777")
        .env("CI_JOB_ID", "888")
        .env("CI_JOB_NAME", "test")
        .env("GITLAB_USER_LOGIN", "bob")
        .output()
        .unwrap();
    assert!(out.status.success());
    let sessions = env.node.wait_sessions(2);
    let gl = sessions
        .iter()
        .find(|s| s["identity"]["ci"]["system"] == "gitlab-ci")
        .expect("gitlab session");
    assert_eq!(gl["identity"]["ci"]["repository"], "group/project");
    assert_eq!(gl["identity"]["ci"]["pipeline_id"], "777");
    assert_eq!(gl["identity"]["ci"]["run_id"], "888");
    assert_eq!(gl["identity"]["ci"]["actor"], "bob");
    assert_ne!(
        gl["identity"]["id"],
        *id["id"].as_str().unwrap(),
        "distinct jobs, distinct ids"
    );

    // The store's hash chain is intact.
    let v = env.node.cli(&["verify"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

fn which(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("readlink -f $(command -v {cmd})"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn client_sees_original_peer_and_sluice_upstream_is_not_redirected() {
    let env = Env::new();
    let r = env.client(&["peer", &env.remote.remote, &HTTP_PORT.to_string()]);
    assert_eq!(r["status"], 200);
    assert_eq!(
        r["peername"],
        format!("{}:{HTTP_PORT}", env.remote.remote),
        "getpeername() must show the original destination"
    );
    let sessions = env.node.wait_sessions(1);
    let s = session_for_local(&sessions, r["local"].as_str().unwrap());
    assert_eq!(s["process"]["comm"], "python3");
    assert_eq!(s["process"]["tgid"], r["pid"]);
    // Exactly one redirect: Sluice's own upstream connect was not sent back
    // to itself (it would have been a second redirect and a loop).
    let st = env.node.status();
    assert_eq!(st["kernel_redirected"], 1, "{st:#}");
    assert_eq!(st["connections_accepted"], 1, "{st:#}");
    assert_eq!(st["connections_forwarded"], 1, "{st:#}");
    assert_eq!(st["kernel_rekeyed"], 1, "{st:#}");
    // The client closed: its origin records are gone from the kernel maps.
    wait_for("the close callback to clean up", || {
        env.node.status()["kernel_closed"] == 1
    });
    // And the remote saw one request, from the host side of the veth.
    let seen = env.remote.entries();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0]["peer"]
        .as_str()
        .unwrap()
        .starts_with(&env.remote.host_ip));
}

#[test]
fn child_process_and_second_thread_are_intercepted() {
    let env = Env::new();
    let port = HTTP_PORT.to_string();
    let t = env.client(&["thread", &env.remote.remote, &port]);
    let c = env.client(&["child", &env.remote.remote, &port]);
    let sessions = env.node.wait_sessions(2);

    let tr = &t["result"];
    assert_eq!(tr["status"], 200);
    let ts = session_for_local(&sessions, tr["local"].as_str().unwrap());
    assert_eq!(
        ts["process"]["tgid"], t["main_pid"],
        "thread belongs to the process"
    );
    assert_eq!(
        ts["process"]["pid"], tr["tid"],
        "the connecting thread is recorded"
    );
    assert_ne!(tr["tid"], t["main_pid"], "it really was a second thread");

    let cr = &c["result"];
    assert_eq!(cr["status"], 200);
    let cs = session_for_local(&sessions, cr["local"].as_str().unwrap());
    assert_eq!(
        cs["process"]["tgid"], cr["pid"],
        "the child is recorded as itself"
    );
    assert_ne!(cr["pid"], c["parent_pid"]);
    assert_eq!(
        cs["identity"]["cgroup_path"],
        format!("/{}", env.cgroup.rel)
    );
}

#[test]
fn ipv6_socket_to_v4_mapped_target_is_intercepted() {
    let env = Env::new();
    let r = env.client(&["v6mapped", &env.remote.remote, &HTTP_PORT.to_string()]);
    assert_eq!(r["status"], 200);
    assert_eq!(
        r["peername"],
        format!("::ffff:{}:{HTTP_PORT}", env.remote.remote)
    );
    let sessions = env.node.wait_sessions(1);
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(
        s["original_dst"],
        format!("{}:{HTTP_PORT}", env.remote.remote)
    );
    assert_eq!(s["process"]["tgid"], r["pid"]);
    assert!(r["local"].as_str().unwrap().starts_with("::ffff:127.0.0.1"));
}

#[test]
fn udp_to_target_address_is_refused_and_elsewhere_allowed() {
    let env = Env::new();
    let port = UDP_PORT.to_string();
    let refused = env.client(&["udp", &env.remote.remote, &port, "to-target"]);
    assert_eq!(
        refused["sent"], false,
        "UDP (QUIC) to a target must be refused: {refused}"
    );
    assert_eq!(refused["errno"], libc::EPERM);
    let allowed = env.client(&["udp", &env.remote.other, &port, "to-other"]);
    assert_eq!(allowed["sent"], true, "{allowed}");
    wait_for("the datagram to the non-target address", || {
        env.remote.entries().iter().any(|e| e["udp"] == "to-other")
    });
    assert!(
        !env.remote.entries().iter().any(|e| e["udp"] == "to-target"),
        "nothing may reach the target over UDP"
    );
    assert!(env.node.status()["kernel_udp_refused"].as_u64().unwrap() >= 1);
}

#[test]
fn outside_cgroup_and_non_target_destinations_are_not_intercepted() {
    let env = Env::new();
    // Outside the watched cgroup: the test process itself.
    let url = format!("http://{}:{HTTP_PORT}/hello", env.remote.remote);
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{local_port}", &url])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, local_port) = text.rsplit_once('\n').unwrap();
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        body["peer"].as_str().unwrap(),
        format!("{}:{local_port}", env.remote.host_ip),
        "direct connection: the remote sees curl's own socket"
    );

    // Inside the cgroup, to an address not in the target set.
    let r = env.client(&["peer", &env.remote.other, &HTTP_PORT.to_string()]);
    assert_eq!(r["status"], 200);
    let local_port = r["local"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        r["body"]["peer"],
        format!("{}:{local_port}", env.remote.host_ip),
        "non-target address goes direct"
    );

    // Inside the cgroup, to the target address on a port not in the set:
    // refused by the remote (nothing listens), but not by Sluice.
    let out = env.cgroup.run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            &format!("http://{}:8081/", env.remote.remote),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl: couldn't connect (RST from the remote)"
    );

    let st = env.node.status();
    assert_eq!(st["kernel_redirected"], 0, "{st:#}");
    assert_eq!(st["connections_accepted"], 0, "{st:#}");
    assert!(env.node.sessions().is_empty());
}

#[test]
fn connection_without_redirect_origin_is_refused_not_forwarded() {
    let env = Env::new();
    // Straight to the proxy port from outside the cgroup: no origin.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{}/hello", env.node.port),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "must not be answered");
    let sessions = env.node.wait_sessions(1);
    assert_eq!(sessions[0]["outcome"]["status"], "refused", "{sessions:#?}");
    assert!(sessions[0]["original_dst"].is_null());
    assert!(env.remote.entries().is_empty(), "nothing was forwarded");
    assert!(env.node.log_text().contains("no redirect origin"));
}

#[test]
fn watched_process_in_another_network_namespace_cannot_bypass() {
    let env = Env::new();
    // A build job that unshares its network namespace and connects to the
    // target from there: rewriting it would point at its own loopback, so
    // the kernel refuses it outright.
    let out = env.cgroup.run(
        "ip",
        &[
            "netns",
            "exec",
            &env.remote.ns,
            "python3",
            &format!("{FIXTURES}/client.py"),
            "peer",
            &env.remote.remote,
            &HTTP_PORT.to_string(),
        ],
    );
    assert!(
        !out.status.success(),
        "must be refused: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(env.remote.entries().is_empty());
    assert_eq!(env.node.status()["kernel_foreign_netns_refused"], 1);
}

#[test]
fn bad_configuration_is_refused_with_the_field_named() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("watch:\n  cgroups: []\n", "watch.cgroups"),
        (
            "watch:\n  cgroups: [{path: x}]\ntargets:\n  - name: a\n    addresses: [\"10.0.0.300\"]\n",
            "targets[0].addresses",
        ),
        (
            "watch:\n  cgroups: [{path: x}]\ntargets:\n  - name: a\n    hosts: [\"not a host\"]\n",
            "targets[0].hosts[0]",
        ),
        ("watch:\n  cgroups: [{path: x}]\nproxy:\n  prot: 1\n", "prot"),
        ("watch: [\n", "invalid configuration"),
        (
            "watch:\n  cgroups: [{path: does-not-exist-e2e}]\n",
            "does-not-exist-e2e",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.yaml"));
        write_file(&path, text);
        let out = Command::new(SLUICE)
            .args(["--socket", &dir.path().join("s.sock").display().to_string()])
            .arg("run")
            .arg("--config")
            .arg(&path)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} must fail");
        assert!(err.contains(needle), "case {i}: `{needle}` not in: {err}");
    }
    let out = Command::new(SLUICE)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert!(out.status.success(), "the embedded default is valid");
}

#[test]
fn two_hundred_parallel_connections_are_all_attributed_and_recorded() {
    let env = Env::new();
    let r = env.client(&[
        "load",
        &env.remote.remote,
        &HTTP_PORT.to_string(),
        "10",
        "20",
    ]);
    let results = r.as_array().unwrap();
    assert_eq!(results.len(), 200);
    let failures: Vec<_> = results.iter().filter(|r| r["status"] != 200).collect();
    assert!(failures.is_empty(), "failed requests: {failures:#?}");

    let sessions = env.node.wait_sessions(200);
    assert_eq!(sessions.len(), 200);
    let by_client: HashMap<&str, &Value> = sessions
        .iter()
        .map(|s| (s["client"].as_str().unwrap(), s))
        .collect();
    for res in results {
        let s = by_client
            .get(res["local"].as_str().unwrap())
            .unwrap_or_else(|| panic!("no record for {res}"));
        assert_eq!(
            s["process"]["tgid"], res["pid"],
            "process mixed up: {res} vs {s}"
        );
        assert_eq!(
            s["process"]["pid"], res["tid"],
            "thread mixed up: {res} vs {s}"
        );
        assert_eq!(s["outcome"]["status"], "closed");
        assert_eq!(s["target"], "fake-remote");
    }
    let pids: std::collections::HashSet<_> = results.iter().map(|r| r["pid"].clone()).collect();
    assert_eq!(pids.len(), 10, "ten client processes");
    let v = env.node.cli(&["verify"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

#[test]
fn cidr_targets_with_any_port_are_intercepted() {
    let env = Env::with_targets(|r| {
        let net = r.remote.rsplit_once('.').unwrap().0.to_owned();
        format!("  - name: whole-subnet\n    addresses: [\"{net}.0/30\"]\n")
    });
    // .2 and .3 are both inside .0/30; any port.
    for host in [&env.remote.remote, &env.remote.other] {
        let r = env.client(&["peer", host, &HTTP_PORT.to_string()]);
        assert_eq!(r["status"], 200);
    }
    let sessions = env.node.wait_sessions(2);
    assert!(sessions.iter().all(|s| s["target"] == "whole-subnet"));
}

#[test]
fn a_dead_node_fails_closed_and_a_new_one_takes_over() {
    let mut env = Env::new();
    let port = HTTP_PORT.to_string();
    let r = env.client(&["peer", &env.remote.remote, &port]);
    assert_eq!(r["status"], 200);
    let pins = node_agent::redirect::pin_dir(&env.cgroup.path);
    let count = |d: &std::path::Path| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    assert_eq!(
        count(&pins),
        8,
        "six cgroup hooks, sockops and sock_create pinned"
    );

    // kill -9: the hooks stay, so the job is sent to a closed port rather
    // than straight to the target.
    env.node.kill9();
    let script = format!("{FIXTURES}/client.py");
    let out = env
        .cgroup
        .run("python3", &[&script, "peer", &env.remote.remote, &port]);
    assert!(
        !out.status.success(),
        "must not get through: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Connection refused"));
    assert_eq!(
        env.remote.entries().len(),
        1,
        "nothing reached the remote unwatched"
    );

    // A new node replaces the dead one's pinned hooks and serves again.
    let new = Node::start(env.dir.path(), &env.config);
    let mut old = std::mem::replace(&mut env.node, new);
    old.config = std::path::PathBuf::new(); // its drop must not detach the new node
    drop(old);
    let r = env.client(&["peer", &env.remote.remote, &port]);
    assert_eq!(r["status"], 200);
    assert_eq!(count(&pins), 8, "replaced, not added to");

    // `sluice detach` is the explicit way out once the node is stopped (a
    // running node puts back links it finds unpinned): 8 per cgroup, plus
    // the 3 global BPF LSM links where the kernel takes them, else the one
    // packet-socket guard on `sys_enter`.
    let lsm = env.node.status()["containment"] == "bpf-lsm";
    env.node.stop();
    assert_eq!(
        count(&pins),
        8,
        "a stopped node leaves its hooks (fail closed)"
    );
    let out = env.node.detach();
    let want = if lsm { 11 } else { 9 };
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("detached {want} link(s)")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(count(&pins), 0);
}
