//! The hostile job against SNI and authority (issue 8, items 1, 2, 8):
//! domain fronting, no SNI, IP-literal SNI, ECH, misdirected Host, the
//! all-egress mode for CDN-fronted targets, and the node's limits. Each
//! test plays the job for real from the watched cgroup and checks what
//! the upstream got and what the node recorded.
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

const FIXTURE_HOSTILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/hostile_tls.py"
);

fn out_text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The fake API intercepted by name on the remote's `.2`, with a choice of
/// `unknown_sni` and extra lines per target.
fn api_target(r: &Remote, extra: &str) -> String {
    format!(
        "  - name: fake-api\n    addresses: [\"{}\"]\n    ports: [443]\n    tls: intercept\n    sni: [api.fake.test]\n{extra}",
        r.remote
    )
}

fn session_with_reason<'a>(sessions: &'a [Value], needle: &str) -> &'a Value {
    sessions
        .iter()
        .find(|s| {
            s["outcome"]["status"] == "refused"
                && s["outcome"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(needle))
        })
        .unwrap_or_else(|| {
            panic!("no refused session with reason containing {needle:?}: {sessions:#?}")
        })
}

/// Runs `sh -c cmd` in the watched cgroup.
fn job(env: &Env, cmd: &str) -> std::process::Output {
    env.cgroup.run("sh", &["-c", cmd])
}

#[test]
fn hostile_sni_is_refused_and_recorded_by_default() {
    let env = Env::https_targets(|r| api_target(r, ""), |_| String::new());
    let _trust = env.trust_node_ca();
    let ip = env.remote.remote.clone();
    let upstream_ca = env.remote.https_ca.display().to_string();

    // 1. Domain fronting: SNI other.fake.test (a name the upstream's
    //    certificate covers), Host: api.fake.test.
    let out = env.curl(
        "other.fake.test",
        443,
        "/json",
        &["-H", "Host: api.fake.test", "--cacert", &upstream_ca],
    );
    assert!(
        !out.status.success(),
        "fronting must fail: {}",
        out_text(&out)
    );
    assert!(
        !out_text(&out).contains("\"ok\""),
        "no content: {}",
        out_text(&out)
    );

    // 2. No SNI at all: openssl -noservername, and python ssl with
    //    server_hostname=None.
    let out = job(
        &env,
        &format!("printf 'GET /json HTTP/1.1\\r\\nHost: api.fake.test\\r\\nConnection: close\\r\\n\\r\\n' | timeout 10 openssl s_client -quiet -noservername -connect {ip}:443 2>&1; true"),
    );
    assert!(
        !out_text(&out).contains("\"ok\""),
        "no content: {}",
        out_text(&out)
    );
    let py = env.cgroup.run(
        "python3",
        &[FIXTURE_HOSTILE, "nosni", &ip, "443", "api.fake.test"],
    );
    let res: Value = serde_json::from_slice(&py.stdout).expect("hostile_tls.py output");
    assert_eq!(res["handshake"], false, "{res}");

    // 3. IP-literal URL (curl sends no SNI) and an IP literal as SNI.
    let out = job(
        &env,
        &format!("curl -sSk --max-time 10 -H 'Host: api.fake.test' https://{ip}/json"),
    );
    assert!(!out.status.success() && !out_text(&out).contains("\"ok\""));
    let out = job(
        &env,
        &format!("printf 'GET /json HTTP/1.1\\r\\nHost: api.fake.test\\r\\nConnection: close\\r\\n\\r\\n' | timeout 10 openssl s_client -quiet -servername {ip} -connect {ip}:443 2>&1; true"),
    );
    assert!(!out_text(&out).contains("\"ok\""), "{}", out_text(&out));

    // 4. ECH: a real ClientHello for the target name plus an
    //    encrypted_client_hello extension.
    let py = env.cgroup.run(
        "python3",
        &[FIXTURE_HOSTILE, "ech", &ip, "443", "api.fake.test"],
    );
    let res: Value = serde_json::from_slice(&py.stdout).expect("hostile_tls.py output");
    assert_eq!(res["handshake"], false, "ECH refused: {res}");

    // 5. Trailing dot and case are the same name: intercepted, 200.
    let out = job(
        &env,
        &format!("printf 'GET /json HTTP/1.1\\r\\nHost: Api.Fake.Test.:443\\r\\nConnection: close\\r\\n\\r\\n' | timeout 10 openssl s_client -quiet -servername API.Fake.Test. -connect {ip}:443 2>/dev/null; true"),
    );
    let reply = out_text(&out);
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.contains("\"ok\""),
        "{reply}"
    );
    let out = job(
        &env,
        &format!("curl -sS --max-time 10 --connect-to api.fake.test.:443:{ip}:443 https://api.fake.test./json"),
    );
    assert!(
        out_text(&out).contains("\"ok\""),
        "curl with a trailing dot: {}{}",
        out_text(&out),
        text(&out)
    );

    // Only the two legitimate requests reached the upstream.
    let seen = env.remote.https_entries();
    assert_eq!(seen.len(), 2, "{seen:#?}");

    let sessions = env.node.wait_sessions(8);
    let fronted = session_with_reason(
        &sessions,
        "SNI `other.fake.test` is not a name of target `fake-api`",
    );
    assert_eq!(fronted["tls"]["sni"], "other.fake.test");
    assert_eq!(fronted["tls"]["mode"], "refused");
    let no_sni: Vec<_> = sessions
        .iter()
        .filter(|s| {
            s["outcome"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("no SNI"))
        })
        .collect();
    assert_eq!(
        no_sni.len(),
        3,
        "openssl, python and the IP-literal URL: {sessions:#?}"
    );
    let lit = session_with_reason(&sessions, "IP-literal SNI");
    assert_eq!(lit["tls"]["sni"], ip.as_str());
    let ech = session_with_reason(&sessions, "ECH");
    assert_eq!(ech["tls"]["sni"], "api.fake.test", "outer name recorded");
    let intercepted: Vec<_> = sessions
        .iter()
        .filter(|s| s["tls"]["mode"] == "intercepted")
        .collect();
    assert_eq!(intercepted.len(), 2, "{sessions:#?}");
    assert!(env.node.cli(&["verify"]).status.success());
}

fn credential_bundle(version: u64, dir: &std::path::Path) -> String {
    format!(
        "version: {version}\nname: e2e-fronting\ncredentials:\n  - target: fake-api\n    source: \"file:{}\"\n",
        dir.join("node-cursor.key").display()
    )
}

#[test]
fn misdirected_host_gets_421_and_never_the_node_credential() {
    let p = PolicyEnv::with_policy(credential_bundle);
    let env = &p.env;
    let _trust = env.trust_node_ca();

    // SNI api.fake.test, Host other.fake.test: HTTP/1.1 and HTTP/2.
    for proto in ["--http1.1", "--http2"] {
        let out = env.curl(
            "api.fake.test",
            443,
            "/json",
            &[proto, "-H", "Host: other.fake.test", "-w", "\n%{http_code}"],
        );
        let body = out_text(&out);
        assert!(body.ends_with("\n421"), "{proto}: {body}");
        assert!(body.contains("misdirected request"), "{body}");
    }
    // The same name with a port and a trailing dot is not misdirected.
    let out = env.curl(
        "api.fake.test",
        443,
        "/json",
        &["-H", "Host: API.fake.test.:443", "-w", "\n%{http_code}"],
    );
    assert!(out_text(&out).ends_with("\n200"), "{}", out_text(&out));

    let seen = env.remote.https_entries();
    assert_eq!(
        seen.len(),
        1,
        "only the matching request went upstream: {seen:#?}"
    );
    assert_eq!(
        seen[0]["headers"]["authorization"],
        format!("Bearer {NODE_KEY}"),
        "credential injected when the authority matches"
    );

    let misdirected: Vec<Value> = exchanges(env)
        .into_iter()
        .filter(|e| e["status"] == 421)
        .collect();
    assert_eq!(misdirected.len(), 2, "both recorded");
    for ex in &misdirected {
        assert!(
            ex["injected"].is_null(),
            "no credential on a misdirected request: {ex:#}"
        );
        let d = &ex["decisions"][0];
        assert_eq!(d["rule"], "authority-mismatch");
        assert!(
            d["detail"].as_str().unwrap().contains("other.fake.test"),
            "{d}"
        );
    }
    assert!(env.node.cli(&["verify"]).status.success());
}

#[test]
fn unknown_sni_splice_is_an_explicit_opt_in() {
    let env = Env::https_targets(
        |r| api_target(r, "    unknown_sni: splice\n"),
        |_| String::new(),
    );
    let _trust = env.trust_node_ca();
    let ip = env.remote.remote.clone();
    let upstream_ca = env.remote.https_ca.display().to_string();
    // Another name: spliced, so the client sees the upstream's own
    // certificate (it needs the upstream's CA) and the node sees no content.
    let out = env.curl("other.fake.test", 443, "/json", &["--cacert", &upstream_ca]);
    assert!(
        out_text(&out).contains("\"ok\""),
        "{}{}",
        out_text(&out),
        text(&out)
    );
    // No SNI: spliced too.
    let py = env.cgroup.run(
        "python3",
        &[FIXTURE_HOSTILE, "nosni", &ip, "443", "other.fake.test"],
    );
    let res: Value = serde_json::from_slice(&py.stdout).expect("hostile_tls.py output");
    assert_eq!(res["handshake"], true, "{res}");
    // ECH stays refused: its real name could be a target's.
    let py = env.cgroup.run(
        "python3",
        &[FIXTURE_HOSTILE, "ech", &ip, "443", "other.fake.test"],
    );
    let res: Value = serde_json::from_slice(&py.stdout).expect("hostile_tls.py output");
    assert_eq!(res["handshake"], false, "{res}");
    // The target name is still intercepted.
    let out = env.curl("api.fake.test", 443, "/json", &[]);
    assert!(out_text(&out).contains("\"ok\""));

    let sessions = env.node.wait_sessions(4);
    let spliced: Vec<_> = sessions
        .iter()
        .filter(|s| s["tls"]["mode"] == "spliced")
        .collect();
    assert_eq!(spliced.len(), 2, "{sessions:#?}");
    for s in &spliced {
        assert_eq!(s["outcome"]["status"], "closed");
        assert!(s["bytes_down"].as_u64().unwrap() > 0);
        let full = env
            .node
            .cli_json(&["sessions", "show", &s["id"].to_string()]);
        assert!(
            full["exchanges"].as_array().unwrap().is_empty(),
            "no content recorded"
        );
    }
    session_with_reason(&sessions, "ECH");
}

#[test]
fn all_egress_intercepts_target_names_and_splices_everything_else() {
    let env = Env::https_targets(
        |_| {
            "  - name: saas\n    addresses: [\"0.0.0.0/0\", \"::/0\"]\n    ports: [443]\n    tls: intercept\n    unknown_sni: splice\n    sni: [api.fake.test]\n".into()
        },
        |_| String::new(),
    );
    let _trust = env.trust_node_ca();
    // `.3` is in no address list: only the catch-all sends it here.
    let other_ip = env.remote.other.clone();
    let upstream_ca = env.remote.https_ca.display().to_string();
    let status = env.node.status();
    let entries = status["target_entries"].to_string();
    assert!(
        entries.contains("saas 0.0.0.0/0 port 443") && entries.contains("saas ::/0 port 443"),
        "{entries}"
    );

    let curl = |host: &str, extra: &[&str]| {
        let mut args = vec![
            "-sS".to_string(),
            "--max-time".into(),
            "20".into(),
            "--resolve".into(),
            format!("{host}:443:{other_ip}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(format!("https://{host}/json"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.cgroup.run("curl", &args)
    };
    // The target name at an address nobody listed: intercepted.
    let out = curl("api.fake.test", &[]);
    assert!(
        out_text(&out).contains("\"ok\""),
        "{}{}",
        out_text(&out),
        text(&out)
    );
    // Another name on the same :443: spliced (upstream certificate).
    let out = curl("other.fake.test", &["--cacert", &upstream_ca]);
    assert!(
        out_text(&out).contains("\"ok\""),
        "{}{}",
        out_text(&out),
        text(&out)
    );
    // Other ports are not redirected at all, UDP to them still flows (DNS
    // and friends), and UDP to :443 (QUIC) is refused by the kernel.
    let out = job(
        &env,
        &format!("curl -sS --max-time 10 http://{other_ip}:{HTTP_PORT}/plain"),
    );
    assert!(out.status.success(), "{}", text(&out));
    let udp = env.cgroup.run(
        "python3",
        &[
            "-c",
            &format!(
                "import socket,json\nr={{}}\nfor p in ({UDP_PORT},443):\n  s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n  try:\n    s.sendto(b'x',('{other_ip}',p)); r[p]='sent'\n  except OSError as e:\n    r[p]=e.errno\nprint(json.dumps(r))"
            ),
        ],
    );
    let udp: Value = serde_json::from_slice(&udp.stdout).expect("udp probe output");
    assert_eq!(udp[UDP_PORT.to_string()], "sent", "{udp}");
    assert_eq!(udp["443"], libc::EPERM, "{udp}");

    // An IPv6 socket to the v4-mapped address (what JVMs do): redirected
    // by the same catch-all, spliced under another name.
    let mapped = env.cgroup.run(
        "python3",
        &[
            "-c",
            &format!(
                "import socket,ssl\nctx=ssl.create_default_context(); ctx.check_hostname=False; ctx.verify_mode=ssl.CERT_NONE\ns=socket.socket(socket.AF_INET6); s.settimeout(10); s.connect(('::ffff:{other_ip}',443))\nt=ctx.wrap_socket(s, server_hostname='mapped.fake.test')\nt.sendall(b'GET /json HTTP/1.1\\r\\nHost: other.fake.test\\r\\nConnection: close\\r\\n\\r\\n')\nprint(t.recv(12).decode())"
            ),
        ],
    );
    assert_eq!(
        out_text(&mapped).trim(),
        "HTTP/1.1 200",
        "{}",
        text(&mapped)
    );

    let sessions = env.node.wait_sessions(3);
    assert_eq!(
        sessions.len(),
        3,
        "only the :443 connections were redirected: {sessions:#?}"
    );
    assert_eq!(
        sessions
            .iter()
            .find(|s| s["tls"]["sni"] == "mapped.fake.test")
            .expect("v4-mapped connection recorded")["tls"]["mode"],
        "spliced"
    );
    let by_sni = |n: &str| {
        sessions
            .iter()
            .find(|s| s["tls"]["sni"] == n)
            .unwrap_or_else(|| panic!("{n} recorded: {sessions:#?}"))
    };
    let api = by_sni("api.fake.test");
    assert_eq!(api["tls"]["mode"], "intercepted");
    assert_eq!(api["target"], "saas");
    assert_eq!(api["original_dst"], format!("{other_ip}:443"));
    let other = by_sni("other.fake.test");
    assert_eq!(other["tls"]["mode"], "spliced");
    assert_eq!(other["outcome"]["status"], "closed");
    let full = env
        .node
        .cli_json(&["sessions", "show", &other["id"].to_string()]);
    assert!(full["exchanges"].as_array().unwrap().is_empty());
    let ex = wait_exchange(&env, |e| e["path"] == "/json");
    assert_eq!(ex["authority"], "api.fake.test");
}

#[test]
fn limits_cap_connections_per_identity_and_close_idle_streams() {
    let env = Env::https_targets(
        |r| {
            format!(
                "{}  - name: plain\n    addresses: [\"{}\"]\n    ports: [{HTTP_PORT}]\n",
                api_target(r, ""),
                r.remote
            )
        },
        |_| String::new(),
    );
    // The limits go in the `proxy:` block the harness writes.
    let cfg = env
        .config
        .replacen(
            "proxy:\n",
            "proxy:\n  limits:\n    max_connections_per_identity: 2\n    idle_timeout_secs: 2\n    header_read_timeout_secs: 2\n",
            1,
        );
    let mut env = env;
    env.config = cfg;
    env.restart();
    let _trust = env.trust_node_ca();
    let ip = env.remote.remote.clone();

    // Three connections held open at once from one job: the third is
    // refused. Then the two others go quiet and are closed after ~2 s.
    let script = format!(
        r#"
import socket, json, time
def conn():
    s = socket.create_connection(("{ip}", {HTTP_PORT}), timeout=10)
    return s
held = [conn(), conn()]
time.sleep(0.5)
try:
    # Refused by the node: reset at once, possibly before connect()
    # returns, or closed before any answer.
    third = conn()
    third.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
    r = third.recv(100)
    third_result = "data" if r else "closed"
except OSError as e:
    third_result = "error %d" % e.errno
t0 = time.time()
idle = []
for s in held:
    try:
        idle.append("closed" if s.recv(100) == b"" else "data")
    except OSError as e:
        idle.append("error %d" % e.errno)
print(json.dumps({{"third": third_result, "idle": idle, "idle_after": time.time() - t0}}))
"#
    );
    let out = env.cgroup.run("python3", &["-c", &script]);
    let res: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_ne!(res["third"], "data", "third connection refused: {res}");
    assert_eq!(
        res["idle"],
        serde_json::json!(["closed", "closed"]),
        "{res}"
    );
    let after = res["idle_after"].as_f64().unwrap();
    assert!((0.5..8.0).contains(&after), "idle close after ~2 s: {res}");

    // A client that trickles its header block is cut by the header timeout.
    let slow = format!(
        r#"
import socket, ssl, json, time
ctx = ssl.create_default_context()
s = ctx.wrap_socket(socket.create_connection(("{ip}", 443), timeout=30), server_hostname="api.fake.test")
s.sendall(b"GET /json HTTP/1.1\r\nHost: api")
t0 = time.time()
try:
    r = s.recv(100)
except OSError as e:
    r = repr(e).encode()
print(json.dumps({{"after": time.time() - t0, "got": r.decode("latin-1")}}))
"#
    );
    let out = env.cgroup.run("python3", &["-c", &slow]);
    let res: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let after = res["after"].as_f64().unwrap();
    assert!(
        (1.0..10.0).contains(&after),
        "header read timeout (2 s) cut the connection: {res}"
    );
    assert!(env.remote.https_entries().is_empty());

    let sessions = env.node.wait_sessions(4);
    let capped = session_with_reason(&sessions, "limit 2");
    assert!(capped["outcome"]["reason"]
        .as_str()
        .unwrap()
        .contains("connections open"));
    let idle: Vec<_> = sessions
        .iter()
        .filter(|s| {
            s["outcome"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("idle for 2s"))
        })
        .collect();
    assert_eq!(idle.len(), 2, "{sessions:#?}");
}

/// A tmpfs mounted for the node's state, removed when dropped.
struct SmallDisk(std::path::PathBuf);

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = sh(&format!("umount -l {}", self.0.display()));
        let _ = std::fs::remove_dir(&self.0);
    }
}

impl SmallDisk {
    /// A 4 MiB tmpfs.
    fn mount(name: &str) -> Self {
        let disk = SmallDisk(std::env::temp_dir().join(format!(
            "{}-{name}-{}",
            prefix(),
            std::process::id()
        )));
        std::fs::create_dir_all(&disk.0).unwrap();
        must(&format!(
            "mount -t tmpfs -o size=4m tmpfs {}",
            disk.0.display()
        ));
        disk
    }

    fn fill(&self) {
        let _ = sh(&format!(
            "dd if=/dev/zero of={}/filler bs=64k 2>/dev/null",
            self.0.display()
        ));
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

#[test]
fn full_disk_fails_closed_and_status_says_so() {
    let disk = SmallDisk::mount("full");
    let state = disk.0.clone();
    let env = Env::https_targets(
        |r| {
            format!(
                "  - name: plain\n    addresses: [\"{}\"]\n    ports: [{HTTP_PORT}]\n",
                r.remote
            )
        },
        move |dir| {
            // The node's --state-dir is DIR/state: make it the small disk.
            std::os::unix::fs::symlink(&state, dir.join("state")).unwrap();
            // A checkpoint at every commit: node state (sled) is written
            // as often as the log, so either may be the first to find the
            // disk full, and the node must recover from both.
            "records:\n  checkpoint_every_events: 1\n  checkpoint_interval_secs: 1\n".into()
        },
    );
    let ip = env.remote.remote.clone();
    let get = || {
        job(
            &env,
            &format!("curl -sS --max-time 10 http://{ip}:{HTTP_PORT}/plain"),
        )
    };
    assert!(get().status.success());
    assert_eq!(env.node.status()["recording"], "ok");

    disk.fill();
    let before = env.remote.entries().len();
    let mut forwarded_after_full = 0;
    let mut refused = false;
    for _ in 0..20 {
        if get().status.success() {
            forwarded_after_full += 1;
        } else {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        refused,
        "a full disk must stop forwarding\n{}",
        env.node.log_text()
    );
    // The filesystem may still take a few small writes after `dd` stops
    // (reserved and partial blocks): a few more exchanges are forwarded,
    // each recorded, until an append fails.
    assert!(
        forwarded_after_full <= 3,
        "{forwarded_after_full} forwarded on a full disk"
    );
    let status = env.node.status();
    let rec = status["recording"].as_str().unwrap();
    eprintln!("full disk: {forwarded_after_full} forwarded, then refused; recording: {rec}");
    assert!(
        rec.starts_with("failing since") && rec.contains("No space left"),
        "{status:#}"
    );
    let human = text(&env.node.cli(&["status"]));
    assert!(human.contains("recording:  failing"), "{human}");
    // Nothing more reached the remote once refusing started.
    for _ in 0..3 {
        assert!(!get().status.success());
    }
    assert_eq!(env.remote.entries().len(), before + forwarded_after_full);

    // Space again: the next connection's probe (a flush) succeeds and the
    // node serves again, no restart needed; what was refused was never
    // forwarded, so nothing is missing from the records.
    disk.free();
    assert!(get().status.success(), "{}", env.node.log_text());
    assert_eq!(env.node.status()["recording"], "ok");
    let verify = env.node.cli(&["verify"]);
    assert!(
        verify.status.success(),
        "{}\n{}",
        text(&verify),
        env.node.log_text()
    );
    let mut env = env;
    env.restart();
    assert_eq!(env.node.status()["recording"], "ok");
    let ip = env.remote.remote.clone();
    let out = job(
        &env,
        &format!("curl -sS --max-time 10 http://{ip}:{HTTP_PORT}/plain"),
    );
    assert!(out.status.success(), "{}", text(&out));
    let verify = env.node.cli(&["verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
}

/// A checkpoint is node state (sled) written with nothing new for the
/// log: when the disk is full at that moment, the export that asked for
/// it fails, and once space is back recording goes on without a restart
/// (sled 0.34's IO errors are sticky until it is reopened, so the node
/// must not let it meet a full disk).
#[test]
fn a_checkpoint_on_a_full_disk_does_not_stop_recording_for_good() {
    let disk = SmallDisk::mount("cp");
    let state = disk.0.clone();
    let env = Env::https_targets(
        |r| {
            format!(
                "  - name: plain\n    addresses: [\"{}\"]\n    ports: [{HTTP_PORT}]\n",
                r.remote
            )
        },
        move |dir| {
            std::os::unix::fs::symlink(&state, dir.join("state")).unwrap();
            // Checkpoints only when asked (an export): the log is synced
            // by then and has nothing left to write.
            "records:\n  checkpoint_every_events: 1000000\n  checkpoint_interval_secs: 86400\n"
                .into()
        },
    );
    let ip = env.remote.remote.clone();
    let get = || {
        job(
            &env,
            &format!("curl -sS --max-time 10 http://{ip}:{HTTP_PORT}/plain"),
        )
    };
    assert!(get().status.success());
    let id = env.node.wait_sessions(1)[0]["id"].to_string();
    // The group commit syncs the log within its interval.
    std::thread::sleep(Duration::from_millis(500));
    disk.fill();
    let export = env.node.cli(&["sessions", "export", &id]);
    assert!(
        !export.status.success(),
        "an export needs a checkpoint written: {}",
        text(&export)
    );
    assert!(text(&export).contains("No space left"), "{}", text(&export));
    disk.free();
    assert!(get().status.success(), "{}", env.node.log_text());
    let export = env.node.cli(&["sessions", "export", &id]);
    assert!(
        export.status.success(),
        "recording must work again once there is space: {}\n{}",
        text(&export),
        env.node.log_text()
    );
    assert!(text(&export).contains("ed25519"));
    assert_eq!(env.node.status()["recording"], "ok");
    let verify = env.node.cli(&["verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
}

/// A keep-alive connection that is quiet between requests for longer
/// than the header timeout is still served on the same socket (hyper's
/// own header timer runs while it waits for the next request, and cut
/// such connections after 30 s whatever `idle_timeout_secs` said); a
/// later head trickled byte by byte is still cut by the header timeout.
#[test]
fn a_quiet_keep_alive_connection_is_kept_and_a_slow_later_head_is_cut() {
    let env = Env::https("");
    let cfg = env.config.replacen(
        "proxy:\n",
        "proxy:\n  limits:\n    idle_timeout_secs: 60\n    header_read_timeout_secs: 2\n",
        1,
    );
    let mut env = env;
    env.config = cfg;
    env.restart();
    let _trust = env.trust_node_ca();
    let ip = env.remote.remote.clone();
    let script = format!(
        r#"
import socket, ssl, json, time
ctx = ssl.create_default_context()
s = ctx.wrap_socket(socket.create_connection(("{ip}", 443), timeout=30), server_hostname="api.fake.test")
def get(tag):
    s.sendall(("GET /json?tag=%s HTTP/1.1\r\nHost: api.fake.test\r\n\r\n" % tag).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return "closed"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            return "closed"
        body += chunk
    return head.split(b"\r\n")[0].decode()
out = {{"first": get("one")}}
time.sleep(5)
try:
    out["after_quiet"] = get("two")
except OSError as e:
    out["after_quiet"] = repr(e)
s.sendall(b"GET /json HTTP/1.1\r\nHost: api")
t0 = time.time()
try:
    out["slow"] = s.recv(100).decode("latin-1")
except OSError as e:
    out["slow"] = repr(e)
out["slow_after"] = time.time() - t0
print(json.dumps(out))
"#
    );
    let out = env.cgroup.run("python3", &["-c", &script]);
    let res: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(res["first"], "HTTP/1.1 200 OK", "{res}");
    assert_eq!(
        res["after_quiet"], "HTTP/1.1 200 OK",
        "the same connection serves a request after 5 s of quiet: {res}"
    );
    let after = res["slow_after"].as_f64().unwrap_or(0.0);
    assert!(
        (1.0..10.0).contains(&after) && res["slow"].as_str().is_some_and(|s| !s.contains("200 OK")),
        "a later head trickled in is cut after the header timeout (2 s): {res}"
    );
    let sessions = env.node.wait_sessions(1);
    assert_eq!(sessions.len(), 1, "one connection: {sessions:#?}");
}
