//! What the node costs in memory while holding 1,000 intercepted
//! keep-alive connections, and that it gives it back when they close (no
//! per-connection leak). Memory, not time: nothing here depends on how
//! loaded the machine is.
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use serde_json::Value;

use crate::harness::*;

const CONNS: usize = 1000;
/// Heap and stacks: what the node allocates. The file-backed part (the
/// binary's pages; far larger for this debug build than for a release
/// one) is left to the benchmark, which reports the whole RSS of the
/// release binary.
const FIELD: &str = "RssAnon:";
/// Per held connection (job side and upstream: two TLS sessions, HTTP
/// state, the session's task).
const PER_CONN_MAX_KIB: u64 = 100;
/// A second round of connections may not leave more behind than this.
const LEAK_SLACK_MIB: u64 = 4;

fn rss_mib(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("node status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(FIELD))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon");
    kb / 1024
}

/// Opens CONNS connections from the job (one GET each), measures the
/// node while they are held, closes them, waits until the node has let
/// them go and handed the memory back (its trimmer runs every 5 s), and
/// measures again. Returns (held, after) in MiB.
/// The job's side: `https_client.py hold`, `n` keep-alive connections to
/// the fake API, driven through its stdin and stdout.
fn spawn_holder(
    env: &Env,
    n: usize,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let script = format!("{FIXTURES}/https_client.py");
    let mut holder = env
        .cgroup
        .command(
            "python3",
            &[
                &script,
                "hold",
                &env.remote.remote,
                "api.fake.test",
                "443",
                &n.to_string(),
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the holder");
    let out = BufReader::new(holder.stdout.take().expect("stdout"));
    (holder, out)
}

fn round(env: &Env, pid: u64) -> (u64, u64) {
    let (mut holder, mut out) = spawn_holder(env, CONNS);
    let mut line = String::new();
    out.read_line(&mut line).expect("holder output");
    let held: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| {
        let _ = holder.kill();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(holder.stderr.as_mut().unwrap(), &mut err);
        panic!("holder said {line:?} ({e}): {err}\n{}", env.node.log_text())
    });
    assert_eq!(held["held"], CONNS, "{held}");
    assert_eq!(held["ok"], CONNS, "every connection got its answer: {held}");
    let s = env.node.status();
    assert!(
        s["connections_active"].as_u64().unwrap_or(0) >= CONNS as u64,
        "the node holds them all: {s:#}"
    );
    let with_conns = rss_mib(pid);
    holder
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"close\n")
        .expect("tell the holder to close");
    line.clear();
    out.read_line(&mut line).expect("holder output");
    assert!(line.contains("closed"), "{line}");
    let _ = holder.wait();
    wait_for("the node to see the connections close", || {
        env.node.status()["connections_active"].as_u64() == Some(0)
    });
    std::thread::sleep(std::time::Duration::from_secs(7));
    (with_conns, rss_mib(pid))
}

#[test]
fn a_thousand_intercepted_connections_fit_the_memory_budget_and_are_given_back() {
    let env = Env::https("");
    let cfg = env.config.replacen(
        "proxy:\n",
        &format!(
            "proxy:\n  limits:\n    max_connections_per_identity: {}\n    idle_timeout_secs: 600\n",
            CONNS + 10
        ),
        1,
    );
    let mut env = env;
    env.config = cfg;
    env.restart();
    let _trust = env.trust_node_ca();
    let pid = env.node.status()["pid"].as_u64().expect("node pid");
    let idle = rss_mib(pid);
    // The first round warms what is sized by use, not by connections:
    // scanner caches, the leaf for the name, worker threads.
    let (held1, warm) = round(&env, pid);
    let (held2, after) = round(&env, pid);
    let per_conn_kib = held2.saturating_sub(warm) * 1024 / CONNS as u64;
    eprintln!(
        "node RssAnon: idle {idle} MiB; {CONNS} connections {held1} MiB; after close {warm} MiB; \
         again {held2} MiB ({per_conn_kib} KiB per connection); after close {after} MiB"
    );
    assert!(
        per_conn_kib <= PER_CONN_MAX_KIB,
        "{per_conn_kib} KiB per held connection > {PER_CONN_MAX_KIB} KiB"
    );
    assert!(
        after <= warm + LEAK_SLACK_MIB,
        "memory kept per connection: {warm} MiB after the first {CONNS}, {after} MiB after the second"
    );
    // Every connection and exchange is in the records.
    let s = env.node.status();
    assert!(
        s["records_stored"].as_u64().unwrap_or(0) >= 2 * CONNS as u64,
        "{s:#}"
    );
}

/// An idle keep-alive connection lets its upstream connection go
/// (`limits.upstream_idle_secs`) and gets a new, verified one with its
/// next request; the job's connection is never touched.
#[test]
fn idle_keep_alive_connections_let_their_upstream_go_and_get_a_new_one() {
    const N: usize = 5;
    let mut env = Env::https("");
    env.config = env.config.replacen(
        "proxy:\n",
        "proxy:\n  limits:\n    upstream_idle_secs: 2\n",
        1,
    );
    env.restart();
    let _trust = env.trust_node_ca();
    let (mut holder, mut out) = spawn_holder(&env, N);
    let mut stdin = holder.stdin.take().expect("stdin");
    let mut said = |line: &str| -> Value {
        stdin.write_all(line.as_bytes()).expect("tell the holder");
        let mut answer = String::new();
        out.read_line(&mut answer).expect("holder output");
        serde_json::from_str(answer.trim())
            .unwrap_or_else(|e| panic!("holder said {answer:?} ({e})\n{}", env.node.log_text()))
    };
    let held = said("");
    assert_eq!(held["ok"], N, "{held}");
    // At once: the same upstream connections.
    assert_eq!(said("again\n")["ok"], N);
    // Idle past the limit: the upstream side is let go; the next request
    // opens a new one.
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert_eq!(said("again\n")["ok"], N);
    let _ = said("close\n");
    let _ = holder.wait();

    let entries = env.remote.https_entries();
    let port = |tag: &str| -> u64 {
        entries
            .iter()
            .find(|e| e["query"].as_str() == Some(&format!("tag={tag}")))
            .and_then(|e| e["peer_port"].as_u64())
            .unwrap_or_else(|| panic!("no request {tag} upstream: {entries:#?}"))
    };
    for i in 0..N {
        let (first, kept, after_idle) = (
            port(&format!("hold-{i}")),
            port(&format!("again1-{i}")),
            port(&format!("again2-{i}")),
        );
        assert_eq!(first, kept, "connection {i}: kept while in use");
        assert_ne!(
            first, after_idle,
            "connection {i}: a new upstream after idling"
        );
    }
    // The job's connections were never closed: N accepted, all intercepted.
    let s = env.node.status();
    assert_eq!(s["connections_accepted"], N as u64, "{s:#}");

    // A response that streams for longer than the limit is not idle: the
    // upstream stays until its last event.
    let out = env.cgroup.run(
        "python3",
        &[
            &format!("{FIXTURES}/https_client.py"),
            "sse",
            &env.remote.remote,
            "api.fake.test",
            "443",
            "/sse?n=8&ms=600",
        ],
    );
    let seen: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("sse client ({e}): {}", text(&out)));
    assert_eq!(
        seen["events"].as_array().map(Vec::len),
        Some(8),
        "{seen}\n{}",
        env.node.log_text()
    );
}
