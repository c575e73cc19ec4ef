//! Evidence survives crashes and truncation: `kill -9` of the node under
//! parallel keep-alive load loses no exchange a client saw, `verify` stays
//! intact across crashes, and signed checkpoints expose a truncated tail
//! and a forged checkpoint. Exports carry a checkpoint that verifies
//! offline.
use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

const CLIENTS: usize = 4;
const CYCLES: usize = 3;
/// Small checkpoint cadence so that tests see several.
const RECORDS: &str = "records:\n  checkpoint_every_events: 5\n  checkpoint_interval_secs: 1\n";

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn progress_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Every recorded exchange by the `tag=` of its path: its state.
fn recorded_tags(env: &Env) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for e in exchanges(env) {
        if let Some(tag) = e["path"].as_str().and_then(|p| p.split("tag=").nth(1)) {
            out.insert(
                tag.to_owned(),
                e["state"].as_str().unwrap_or("?").to_owned(),
            );
        }
    }
    out
}

/// A keep-alive client in the watched cgroup: Python (three of them) or
/// curl (one), each on its own connection, each writing the tags of the
/// responses it read in full.
fn start_client(env: &Env, i: usize, prefix: &str) -> (Child, std::path::PathBuf) {
    let progress = env.dir.path().join(format!("{prefix}.progress"));
    let child = if i == 0 {
        // curl: many URLs on one connection; -w prints a line per
        // finished transfer, kept only when it ended without error.
        let conf = env.dir.path().join(format!("{prefix}.curl"));
        let mut text = String::new();
        for n in 0..20_000 {
            text.push_str(&format!(
                "url = \"https://api.fake.test/json?tag={prefix}-{n}\"\noutput = \"/dev/null\"\n"
            ));
        }
        write_file(&conf, &text);
        let resolve = format!("api.fake.test:443:{}", env.remote.remote);
        let script = format!(
            "stdbuf -oL curl -sS --max-time 120 --resolve {resolve} -w '%{{exitcode}} %{{http_code}} %{{url}}\\n' -K {} | while read -r code status url; do if [ \"$code\" = 0 ] && [ \"$status\" = 200 ]; then echo \"${{url##*tag=}}\" >> {}; else exit 0; fi; done",
            conf.display(),
            progress.display()
        );
        env.cgroup
            .command("sh", &["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    } else {
        let script = format!("{FIXTURES}/evidence_client.py");
        env.cgroup
            .command(
                "python3",
                &[
                    &script,
                    "loop",
                    &env.remote.remote,
                    "api.fake.test",
                    "443",
                    prefix,
                    &progress.display().to_string(),
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    (child, progress)
}

fn verify_ok(env: &Env) -> String {
    let out = env.node.cli(&["verify"]);
    assert!(
        out.status.success(),
        "verify must report intact: {}\nnode log:\n{}",
        stdout(&out),
        env.node.log_text()
    );
    stdout(&out)
}

#[test]
fn kill_9_under_parallel_load_loses_no_exchange_and_verifies_intact() {
    let mut env = Env::https(RECORDS);
    let _trust = env.trust_node_ca();
    let mut all_completed: Vec<String> = Vec::new();
    for cycle in 0..CYCLES {
        let mut clients = Vec::new();
        for i in 0..CLIENTS {
            clients.push(start_client(&env, i, &format!("c{cycle}k{i}")));
        }
        // Everyone is in the middle of its keep-alive loop.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let counts: Vec<usize> = clients
                .iter()
                .map(|(_, p)| progress_lines(p).len())
                .collect();
            if counts.iter().all(|n| *n >= 25) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "clients stuck at {counts:?} exchanges\nnode log:\n{}",
                env.node.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        env.node.kill9();
        for (c, _) in &mut clients {
            let _ = c.wait();
        }
        let completed: Vec<String> = clients
            .iter()
            .flat_map(|(_, p)| progress_lines(p))
            .collect();
        env.restart();
        let verdict = verify_ok(&env);
        let recorded = recorded_tags(&env);
        let missing: Vec<&String> = completed
            .iter()
            .filter(|t| !recorded.contains_key(*t))
            .collect();
        assert!(
            missing.is_empty(),
            "cycle {cycle}: {} of {} exchanges the clients read in full are not in the store: {missing:?}",
            missing.len(),
            completed.len()
        );
        // One request in flight per keep-alive connection at most: what
        // the kill cut is marked, never silently dropped.
        let prefix = format!("c{cycle}k");
        let interrupted = recorded
            .iter()
            .filter(|(t, s)| t.starts_with(&prefix) && s.as_str() == "interrupted")
            .count();
        let started = recorded
            .values()
            .filter(|s| s.as_str() == "started")
            .count();
        assert_eq!(started, 0, "no exchange left `started` after a restart");
        assert!(
            interrupted <= CLIENTS,
            "cycle {cycle}: {interrupted} interrupted exchanges for {CLIENTS} connections"
        );
        eprintln!(
            "cycle {cycle}: {} completed by clients, all recorded; {interrupted} marked interrupted; {}",
            completed.len(),
            verdict.trim()
        );
        all_completed.extend(completed);
        // Connections open at the kill are marked interrupted.
        let sessions = env.node.sessions();
        assert!(
            sessions.iter().all(|s| s["outcome"]["status"] != "open"),
            "no session left open after restart"
        );
    }
    // Earlier cycles' exchanges are all still there after later crashes.
    let recorded = recorded_tags(&env);
    assert!(all_completed.iter().all(|t| recorded.contains_key(t)));
    assert!(
        all_completed
            .iter()
            .filter(|t| recorded[*t] == "complete")
            .count()
            >= all_completed.len() - CYCLES * CLIENTS,
        "all but the in-flight ones are complete"
    );
}

/// Three sessions, then a clean stop (which signs a last checkpoint) and a
/// node that is killed at once, leaving the store to the test.
fn stopped_with_checkpoint() -> Env {
    let mut env = Env::https(RECORDS);
    let _trust = env.trust_node_ca();
    for i in 0..3 {
        let out = env.curl("api.fake.test", 443, &format!("/json?n={i}"), &[]);
        assert!(out.status.success(), "{out:?}");
    }
    env.node.wait_sessions(3);
    assert!(verify_ok(&env).starts_with("ok"));
    drop(_trust);
    env.restart();
    env.node.kill9();
    env
}

fn open_store(env: &Env) -> (sled::Db, sled::Tree) {
    let db = sled::open(env.state_dir().join("records.sled")).unwrap();
    let checkpoints = db.open_tree("checkpoints").unwrap();
    (db, checkpoints)
}

fn latest_checkpoint(cps: &sled::Tree) -> (sled::IVec, Value) {
    let (k, v) = cps.last().unwrap().expect("a signed checkpoint");
    (k, serde_json::from_slice(&v).unwrap())
}

#[test]
fn truncated_tail_is_named_against_the_signed_checkpoint() {
    const K: u64 = 3;
    let mut env = stopped_with_checkpoint();
    let covered;
    {
        let (_db, cps) = open_store(&env);
        let (_, cp) = latest_checkpoint(&cps);
        let frames = log_frames(&env.state_dir());
        let last = frames.last().unwrap().seq();
        covered = cp["seq"].as_u64().unwrap();
        assert_eq!(covered, last, "the clean stop signed the head");
        cut_at(&frames[frames.len() - K as usize]);
    }
    env.restart();
    let out = env.node.cli(&["verify"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("TRUNCATED")
            && text.contains(&format!("covers events up to {covered}"))
            && text.contains(&format!("{K} event(s) removed")),
        "{text}"
    );
    // The node said so when it started, too.
    assert!(env.node.log_text().contains("RECORDS TRUNCATED"));
}

#[test]
fn forged_checkpoint_is_detected() {
    let mut env = stopped_with_checkpoint();
    {
        // An attacker without the node key cuts the tail and rewrites the
        // latest checkpoint to match the shorter chain.
        let (db, cps) = open_store(&env);
        let (k, mut cp) = latest_checkpoint(&cps);
        let frames = log_frames(&env.state_dir());
        let (last, new_last) = (&frames[frames.len() - 1], &frames[frames.len() - 2]);
        cut_at(last);
        cp["seq"] = new_last.seq().into();
        cp["head"] = new_last.hash().into();
        cps.insert(k, serde_json::to_vec(&cp).unwrap()).unwrap();
        db.flush().unwrap();
    }
    env.restart();
    let out = env.node.cli(&["verify"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("forged"), "{text}");
}

#[test]
fn export_carries_a_checkpoint_that_verifies_offline() {
    let env = Env::https(RECORDS);
    let _trust = env.trust_node_ca();
    for i in 0..2 {
        let out = env.curl("api.fake.test", 443, &format!("/json?n={i}"), &[]);
        assert!(out.status.success(), "{out:?}");
    }
    let sessions = env.node.wait_sessions(2);
    let id = sessions
        .iter()
        .find(|s| s["tls"]["mode"] == "intercepted")
        .expect("an intercepted session")["id"]
        .to_string();
    for format in ["jsonl", "har"] {
        let out = env
            .node
            .cli(&["sessions", "export", &id, "--format", format]);
        assert!(out.status.success(), "{out:?}");
        let file = env.dir.path().join(format!("export.{format}"));
        std::fs::write(&file, &out.stdout).unwrap();
        let text = stdout(&out);
        assert!(text.contains("\"checkpoint\"") && text.contains("ed25519"));
        // Offline: no node socket involved.
        let check = Command::new(SLUICE)
            .args(["verify", "--export"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{format}: {}{}",
            stdout(&check),
            String::from_utf8_lossy(&check.stderr)
        );
        assert!(stdout(&check).starts_with("ok:"), "{}", stdout(&check));
        // One changed byte in a carried body breaks it.
        let mut evidence = if format == "har" {
            serde_json::from_str::<Value>(&text).unwrap()["log"]["_evidence"].clone()
        } else {
            let line = text.lines().last().unwrap();
            serde_json::from_str::<Value>(line).unwrap()["evidence"].clone()
        };
        let link = evidence["links"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|l| l["body"].as_str().is_some_and(|b| b.contains("/json?n=")))
            .expect("the session's exchange in the proof");
        link["body"] = link["body"]
            .as_str()
            .unwrap()
            .replacen("/json?n=", "/json?m=", 1)
            .into();
        let line = serde_json::json!({ "type": "evidence", "evidence": evidence });
        std::fs::write(&file, format!("{line}\n")).unwrap();
        let check = Command::new(SLUICE)
            .args(["verify", "--export"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(check.status.code(), Some(2), "{}", stdout(&check));
    }
}
