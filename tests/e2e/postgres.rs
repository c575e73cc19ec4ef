//! The Postgres protocol path with a real server (Debian's PostgreSQL in
//! the test's namespace) and real clients (psql, psycopg 3, pgbench) in
//! the watched cgroup: TLS on both sides, the node's own SCRAM-PLUS login,
//! statements recorded, judged and refused without breaking the session,
//! and personal data and secrets masked in rows.
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{
    harness::text,
    pg::{bundle, PgEnv, APP_ROLE, PG_BIN, READER_PASSWORD, READER_ROLE},
};

/// An AWS-access-key-shaped value, made up per run (never committed).
fn fake_aws_key() -> String {
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut b = [0u8; 16];
    let f = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut &f, &mut b).unwrap();
    let tail: String = b
        .iter()
        .map(|x| ALPHA[(*x as usize) % 32] as char)
        .collect();
    format!("AKIA{tail}")
}

fn ok(out: &std::process::Output, what: &str, p: &PgEnv) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\nnode log:\n{}",
        text(out),
        p.env.node.log_text()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn verify_full(p: &PgEnv, user: &str) -> String {
    p.conninfo(
        user,
        &format!("sslmode=verify-full sslrootcert={}", p.node_ca().display()),
    )
}

#[test]
fn psql_statements_are_recorded_refused_and_masked() {
    let p = PgEnv::new();
    let ci = verify_full(&p, APP_ROLE);
    let key = fake_aws_key();
    // The job holds no password: the node logs in for it.
    ok(
        &p.psql(&ci, &["-c", &format!(
            "INSERT INTO users (name, email, ssn, note) VALUES ('ada', 'ada@example.com', '123-45-6789', 'deploy key {key}')"
        )]),
        "insert",
        &p,
    );
    let rows = ok(
        &p.psql(&ci, &["-c", "SELECT name, email, ssn, note FROM users"]),
        "select",
        &p,
    );
    assert!(
        !rows.contains("ada@example.com") && !rows.contains("123-45-6789") && !rows.contains(&key),
        "{rows}"
    );
    assert_eq!(
        rows.trim(),
        format!(
            "ada|{}|{}|deploy key {}",
            "*".repeat(15),
            "*".repeat(11),
            "*".repeat(20)
        )
    );

    // Destructive statements are refused and the session goes on.
    let script = p.env.dir.path().join("script.sql");
    std::fs::write(
        &script,
        "DELETE FROM users;\nSELECT count(*) FROM users;\nDROP TABLE users;\nSELECT 'still-usable';\nBEGIN;\nSELECT 2;\nCOMMIT;\n\
         UPDATE users SET note = 'a' WHERE name = 'nobody';\n\
         UPDATE users SET note = 'b' WHERE name = 'no one';\n\
         WITH d AS (DELETE FROM users RETURNING *) SELECT count(*) FROM d;\n\
         SELECT 'after-cte';\n",
    )
    .unwrap();
    let out = p.psql(&ci, &["-f", &script.display().to_string()]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec!["1", "still-usable", "2", "after-cte"],
        "{stderr}"
    );
    // DELETE, DROP, and the DELETE inside a WITH (it runs as surely as a
    // top-level one); the UPDATEs with a WHERE ran, the second judged by
    // the first's shape.
    assert_eq!(
        stderr
            .matches("sluice: statement refused by policy rule `no-destructive-sql`")
            .count(),
        3,
        "{stderr}"
    );
    assert!(
        stderr.contains("Destructive statements need a change ticket"),
        "{stderr}"
    );
    // A query string with one refused statement runs none of it.
    let out = p.psql(
        &ci,
        &[
            "-c",
            "INSERT INTO users (name) VALUES ('eve'); TRUNCATE users",
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    // The server's own view: nothing was deleted, dropped or inserted.
    assert_eq!(p.pg.admin("SELECT count(*) FROM users", "shop").trim(), "1");

    // psql -f sends each statement as written, `;` included.
    let delete = p.wait_statement(|s| s["db_query"] == "DELETE FROM users;");
    assert_eq!(delete["class"], "write");
    assert_eq!(
        delete["shapes"],
        serde_json::json!(["delete_without_where"])
    );
    assert_eq!(delete["sqlstate"], "42501");
    assert_eq!(delete["decisions"][0]["rule"], "no-destructive-sql");
    assert_eq!(delete["decisions"][0]["action"], "block");
    assert_eq!(delete["db_user"], APP_ROLE);
    assert_eq!(delete["db_name"], "shop");
    let cte = p.wait_statement(|s| {
        s["db_query"]
            .as_str()
            .is_some_and(|q| q.starts_with("WITH d AS (DELETE"))
    });
    assert_eq!(
        (&cte["class"], &cte["shapes"], &cte["sqlstate"]),
        (
            &serde_json::json!("write"),
            &serde_json::json!(["delete_without_where"]),
            &serde_json::json!("42501")
        ),
        "{cte:#}"
    );
    let second = p.wait_statement(|s| {
        s["db_query"]
            .as_str()
            .is_some_and(|q| q.contains("'no one'"))
    });
    assert_eq!(second["command_tag"], "UPDATE 0", "{second:#}");
    assert_eq!(second["tables"], serde_json::json!(["users"]));
    let eve = p.wait_statement(|s| s["db_query"].as_str().is_some_and(|q| q.contains("'eve'")));
    assert!(
        eve["error"].as_str().unwrap().contains("not run"),
        "{eve:#}"
    );
    let select = p.wait_statement(|s| s["db_query"] == "SELECT name, email, ssn, note FROM users");
    assert_eq!(select["class"], "read");
    assert_eq!(select["command_tag"], "SELECT 1");
    assert_eq!(select["rows_returned"], 1);
    assert_eq!(select["tables"], serde_json::json!(["users"]));
    let rules: Vec<&str> = select["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["rule"].as_str().unwrap())
        .collect();
    assert!(
        rules.contains(&"mask-personal-data") && rules.contains(&"mask-secrets-in-rows"),
        "{select:#}"
    );
    let insert = p.wait_statement(|s| {
        s["db_query"]
            .as_str()
            .is_some_and(|q| q.starts_with("INSERT INTO users (name, email"))
    });
    assert_eq!(insert["command_tag"], "INSERT 0 1");
    // A credential in a literal is not kept in the record.
    assert!(!insert.to_string().contains(&key), "{insert:#}");
    assert_eq!(insert["rows_affected"], 1);

    // The connection record: TLS intercepted, the node's SCRAM-PLUS login.
    let sessions = p.env.node.sessions();
    let s = sessions
        .iter()
        .find(|s| s["database"].is_object())
        .unwrap_or_else(|| panic!("no database session: {sessions:#?}"));
    assert_eq!(s["database"]["login"], "node-credential");
    assert_eq!(s["database"]["method"], "SCRAM-SHA-256-PLUS");
    assert_eq!(s["tls"]["mode"], "intercepted");
    let id = delete["session"].to_string();
    let replay = text(&p.env.node.cli(&["sessions", "replay", &id]));
    assert!(
        replay.contains("SQL (write, simple): DELETE FROM users;"),
        "{replay}"
    );
    assert!(
        replay.contains("decision: block no-destructive-sql"),
        "{replay}"
    );
    let export = text(&p.env.node.cli(&["sessions", "export", &id]));
    assert!(export.contains(r#""type":"statement""#), "{export}");
    // And the node's metrics count them by rule and class.
    let metrics = p.env.metrics();
    assert!(
        metrics.contains(r#"sluice_policy_decisions_total{target="shop-db",rule="no-destructive-sql",action="block"} 4"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sluice_statements_total{target="shop-db",workload="e2e-jobs",class="write",outcome="refused"} 2"#),
        "{metrics}"
    );
}

#[test]
fn sslmodes_and_channel_binding() {
    let p = PgEnv::new();
    let select = |ci: &str| p.psql(ci, &["-c", "SELECT current_user"]);
    for mode in ["sslmode=disable", "sslmode=prefer", "sslmode=require"] {
        let ci = p.conninfo(APP_ROLE, mode);
        assert_eq!(ok(&select(&ci), mode, &p).trim(), APP_ROLE);
    }
    assert_eq!(
        ok(&select(&verify_full(&p, APP_ROLE)), "verify-full", &p).trim(),
        APP_ROLE
    );
    // A replication connection would stream rows past every rule: refused.
    let out = p.psql(
        &format!("{} replication=database", verify_full(&p, APP_ROLE)),
        &["-c", "IDENTIFY_SYSTEM"],
    );
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("replication connections"),
        "{t}"
    );
    // Without the node's CA, verify-full refuses the node (nothing else
    // vouches for `db.fake.test`).
    let out = select(&p.conninfo(
        APP_ROLE,
        "sslmode=verify-full sslrootcert=/etc/ssl/certs/ca-certificates.crt",
    ));
    assert!(!out.status.success());
    // The job cannot demand channel binding to the real server: it never
    // talks to it. libpq says so.
    let out = select(&format!(
        "{} channel_binding=require",
        verify_full(&p, APP_ROLE)
    ));
    assert!(text(&out).contains("channel binding"), "{}", text(&out));

    // PG17 direct TLS negotiation (libpq 17 in psycopg): a ClientHello
    // first, ALPN `postgresql`, no SSLRequest.
    let direct = format!("{} sslnegotiation=direct", verify_full(&p, APP_ROLE));
    let out = p.env.cgroup.run(
        "python3",
        &["-c", "import psycopg, sys; c = psycopg.connect(sys.argv[1]); print(c.execute('select current_user').fetchone()[0], c.pgconn.ssl_in_use)", &direct],
    );
    let t = ok(&out, "direct TLS", &p);
    // libpq does not fall back from direct negotiation: TLS it is.
    assert_eq!(t.trim(), "app True");

    // A role without a node credential: the job's own SCRAM is relayed
    // when it connects in plaintext to the node...
    let relay = format!(
        "{} password={READER_PASSWORD}",
        p.conninfo(READER_ROLE, "sslmode=disable")
    );
    assert_eq!(ok(&select(&relay), "relay", &p).trim(), READER_ROLE);
    let wrong = p.conninfo(READER_ROLE, "sslmode=disable password=wrong");
    assert!(text(&select(&wrong)).contains("password authentication failed"));
    // ...and over TLS to the node the server's SCRAM-PLUS cannot be
    // relayed: a clear error names the reason and the fix.
    let tls_relay = format!(
        "{} password={READER_PASSWORD}",
        p.conninfo(READER_ROLE, "sslmode=require")
    );
    let t = text(&select(&tls_relay));
    assert!(
        t.contains("channel binding") && t.contains("node-held credential"),
        "{t}"
    );

    let sessions = p.env.node.sessions();
    let logins: Vec<(String, String)> = sessions
        .iter()
        .filter(|s| s["database"].is_object())
        .map(|s| {
            (
                s["database"]["login"].as_str().unwrap().to_owned(),
                s["database"]["method"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        logins.contains(&("relay".into(), "SCRAM-SHA-256".into())),
        "{logins:?}"
    );
    assert!(
        logins.contains(&("node-credential".into(), "SCRAM-SHA-256-PLUS".into())),
        "{logins:?}"
    );
}

#[test]
fn psycopg_extended_protocol_pipeline_copy_cursor_and_cancel() {
    let p = PgEnv::new();
    let key = fake_aws_key();
    let ci = verify_full(&p, APP_ROLE);
    let out = p.python("pg_client.py", &[&ci, &key]);
    let stdout = ok(&out, "pg_client.py", &p);
    assert!(
        !stdout.contains("@example") && !stdout.contains(&key) && !stdout.contains("987-65"),
        "{stdout}"
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(
        v["prepared"],
        serde_json::json!([["bob", "*".repeat(15), format!("key {}", "*".repeat(20))]])
    );
    // Binary values under a masking rule are never sent as they are.
    assert_eq!(v["binary"], serde_json::json!([["bob", null]]));
    assert_eq!(v["pipeline_first"], 1);
    assert_eq!(v["pipeline_after"], "after-refusal");
    assert!(
        v["pipeline_errors"]
            .to_string()
            .contains("no-destructive-sql"),
        "{v:#}"
    );
    assert_eq!(v["usable"], "usable");
    let copy = v["copy_out"].to_string();
    assert!(
        copy.contains("\"copied ") && copy.contains(&"*".repeat(20)),
        "{copy}"
    );
    assert!(
        v["named_cursor"].as_array().unwrap().iter().all(|e| e
            .as_str()
            .unwrap()
            .chars()
            .all(|c| c == '*')),
        "{v:#}"
    );
    assert_eq!(v["cancel"], "cancelled", "{v:#}");
    assert!(v["cancel_secs"].as_f64().unwrap() < 10.0, "{v:#}");
    // The server kept everything but the refused DELETE.
    assert_eq!(p.pg.admin("SELECT count(*) FROM users", "shop").trim(), "2");

    // Per Execute: the named statement three times, with its parameters.
    let st = p.statements();
    let prepared: Vec<&Value> = st
        .iter()
        .filter(|s| s["db_query"] == "SELECT name, email, note FROM users WHERE name = $1")
        .collect();
    assert_eq!(prepared.len(), 3, "{st:#?}");
    assert!(prepared
        .iter()
        .all(|s| s["protocol"] == "extended"
            && s["db_query_parameters"] == serde_json::json!(["bob"])));
    let insert = p.wait_statement(|s| {
        s["db_query"]
            .as_str()
            .is_some_and(|q| q.starts_with("INSERT INTO users"))
    });
    // The secret-looking parameter is kept as a fingerprint only.
    let params = insert["db_query_parameters"].to_string();
    assert!(
        !params.contains(&key) && params.contains("bob@example.org"),
        "{params}"
    );
    let copy_in = p.wait_statement(|s| {
        s["db_query"]
            .as_str()
            .is_some_and(|q| q.starts_with("COPY users"))
    });
    assert_eq!(copy_in["class"], "copy");
    assert_eq!(copy_in["command_tag"], "COPY 1");
    let cancelled = p.wait_statement(|s| s["db_query"] == "SELECT pg_sleep(20)");
    assert_eq!(cancelled["sqlstate"], "57014");
}

#[test]
fn approvals_and_suspension_apply_to_statements() {
    let p = PgEnv::new();
    let ci = verify_full(&p, APP_ROLE);
    // Held until a human decides.
    let held = p
        .env
        .cgroup
        .command(
            &format!("{PG_BIN}/psql"),
            &["-X", "-q", "-At", &ci, "-c", "SELECT salary FROM payroll"],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pending = first_pending(&p, "SELECT salary FROM payroll");
    assert_eq!(pending["rule"], "payroll-needs-approval");
    assert_eq!(pending["method"], "SQL");
    assert!(pending["preview"].as_str().unwrap().contains("payroll"));
    let out = p
        .env
        .node
        .cli(&["approvals", "approve", &pending["id"].to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = held.wait_with_output().unwrap();
    assert_eq!(ok(&out, "held select", &p).trim(), "100");
    let metrics = p.env.metrics();
    assert!(
        metrics.contains(r#"sluice_approvals_decided_total{target="shop-db",rule="payroll-needs-approval",decision="approved"} 1"#),
        "{metrics}"
    );

    // Suspended: the open session's next statement is refused, and new
    // sessions are not let in.
    let id = p.wait_statement(|s| s["db_query"] == "SELECT salary FROM payroll")["workload"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = p
        .env
        .node
        .cli(&["identities", "suspend", &id, "--reason", "incident 7"]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&p.psql(&ci, &["-c", "SELECT 1"]));
    assert!(
        t.contains("identity suspended") && t.contains("incident 7"),
        "{t}"
    );
    let out = p.env.node.cli(&["identities", "resume", &id]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        ok(&p.psql(&ci, &["-c", "SELECT 1"]), "after resume", &p).trim(),
        "1"
    );
}

#[test]
fn pgbench_select_only_and_tpcb_through_the_node() {
    let p = PgEnv::new();
    // Initialised directly (pgbench -i drops and truncates its tables).
    let out = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{PG_BIN}/pgbench"))
        .args(["-i", "-q", "-s", "1", "-h"])
        .arg(&p.pg.sock)
        .arg("shop")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    p.pg.admin("GRANT ALL ON ALL TABLES IN SCHEMA public TO app", "shop");
    let ci = verify_full(&p, APP_ROLE);
    for args in [
        vec!["-S", "-M", "prepared"],
        vec!["-M", "extended"],
        vec!["-M", "simple"],
    ] {
        let mut full = vec!["-n", "-c", "2", "-t", "50"];
        full.extend(args.iter().copied());
        full.push(&ci);
        let out = p.env.cgroup.run(&format!("{PG_BIN}/pgbench"), &full);
        let t = ok(&out, "pgbench", &p);
        assert!(
            t.contains("number of transactions actually processed: 100/100"),
            "{t}"
        );
        assert!(t.contains("number of failed transactions: 0"), "{t}");
    }
    // Every statement is on record: 100 select-only transactions of one
    // statement, 200 TPC-B transactions of seven.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = p.statements();
        let done = st.iter().filter(|s| s["state"] == "complete").count();
        if done >= 100 + 200 * 7 {
            break;
        }
        assert!(Instant::now() < deadline, "only {done} statements recorded");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A hostile job's bytes: a bogus startup length, a message whose length
/// is below its own header, one claiming 2 GiB, a DataRow-sized lie
/// mid-login. Each connection ends with a clear error on record; the node
/// keeps serving.
#[test]
fn malformed_postgres_bytes_are_refused_and_the_node_keeps_serving() {
    let p = PgEnv::new();
    let script = r#"
import socket, struct, sys
host = sys.argv[1]
def startup():
    body = struct.pack('!I', 196608) + b'user\0app\0database\0shop\0\0'
    return struct.pack('!I', len(body) + 4) + body
cases = {
    'bogus-startup-length': struct.pack('!II', 0xffffffff, 196608),
    'unknown-protocol': struct.pack('!II', 8, 0x00090000),
    'short-message': startup() + b'Q' + struct.pack('!I', 2),
    'huge-message': startup() + b'Q' + struct.pack('!I', 0x7fffffff),
    'truncated-bind': startup() + b'B' + struct.pack('!I', 9) + b'\0\0\xff\xff\x00',
}
# Kerberos encryption is declined (`N`), and the session goes on in the clear.
s = socket.create_connection((host, 5432), timeout=10)
s.sendall(struct.pack('!II', 8, 80877104))
print('gssenc', s.recv(1))
s.sendall(startup())
print('after-gssenc', s.recv(1))
s.close()
for name, data in cases.items():
    s = socket.create_connection((host, 5432), timeout=10)
    s.sendall(data)
    got = b''
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    print(name, len(got))
"#;
    let out = p
        .env
        .cgroup
        .run("python3", &["-c", script, &p.env.remote.remote]);
    let t = ok(&out, "hostile client", &p);
    assert_eq!(t.lines().count(), 7, "{t}");
    assert!(
        t.contains("gssenc b'N'") && t.contains("after-gssenc b'R'"),
        "{t}"
    );
    // Still serving, and the server is untouched.
    let ci = verify_full(&p, APP_ROLE);
    assert_eq!(
        ok(&p.psql(&ci, &["-c", "SELECT 'fine'"]), "after", &p).trim(),
        "fine"
    );
    let sessions = p.env.node.wait_sessions(7);
    let errors: Vec<String> = sessions
        .iter()
        .filter(|s| s["outcome"]["status"] == "failed")
        .map(|s| {
            s["outcome"]["error"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    // The five hostile ones (the GSSENC client hanging up mid-login may
    // add a sixth).
    assert!(errors.len() >= 5, "{sessions:#?}");
    for want in [
        "startup packet length",
        "unsupported protocol version",
        "length 2 (< 4)",
        "exceeds the node's limit",
        "message too short",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "no `{want}` in {errors:?}"
        );
    }
}

/// The server's certificate is verified (fail closed, with the reason for
/// the job); plaintext to the server is an explicit per-target choice.
#[test]
fn the_server_is_verified_and_plaintext_upstream_is_opt_in() {
    let p = PgEnv::custom(false, "", |_| String::new());
    let out = p.psql(
        &p.conninfo(APP_ROLE, "sslmode=require"),
        &["-c", "SELECT 1"],
    );
    let t = text(&out);
    assert!(!out.status.success());
    assert!(
        t.contains("sluice: server: TLS with the server as `db.fake.test`")
            && t.contains("certificate"),
        "{t}"
    );
    let s = p.env.node.wait_sessions(1);
    assert_eq!(s[0]["outcome"]["status"], "upstream_failed", "{s:#?}");
    drop(p);

    let p = PgEnv::custom(
        false,
        "    postgres:\n      upstream_tls: disable\n",
        |_| String::new(),
    );
    let out = p.psql(
        &verify_full(&p, APP_ROLE),
        &["-c", "SELECT 'plain upstream'"],
    );
    assert_eq!(ok(&out, "plaintext upstream", &p).trim(), "plain upstream");
    let s = p.env.node.wait_sessions(1);
    // No TLS to the server: no channel binding either.
    assert_eq!(s[0]["database"]["method"], "SCRAM-SHA-256", "{s:#?}");
}

/// What the server itself says: is `users` still there?
fn users_table_exists(p: &PgEnv) -> bool {
    p.pg.admin(
        "SELECT count(*) FROM pg_tables WHERE tablename = 'users'",
        "shop",
    )
    .trim()
        == "1"
}

#[test]
fn backslash_escapes_cannot_hide_a_statement_from_the_node() {
    let p = PgEnv::new();
    let ci = verify_full(&p, APP_ROLE);
    // With standard strings a backslash is an ordinary character: nothing
    // changes for the session.
    let out = ok(
        &p.psql(&ci, &["-c", r"SELECT 'a\b'"]),
        "standard strings",
        &p,
    );
    assert_eq!(out.trim(), r"a\b");

    // The job makes the server read backslashes as escapes, then sends one
    // query string that the node's parser reads as a SELECT of two
    // strings, and such a server as a SELECT and a DROP.
    let trick = r"SELECT '\', 'x; DROP TABLE users; --'";
    let out = p.psql(
        &ci,
        &["-c", "SET standard_conforming_strings = off", "-c", trick],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stderr.contains("sluice: statement refused by policy rule `no-destructive-sql`")
            && stderr.contains("standard_conforming_strings is off"),
        "{stderr}"
    );
    assert!(users_table_exists(&p), "the table survived");
    let refused = p.wait_statement(|s| s["db_query"] == trick);
    assert_eq!(refused["sqlstate"], "42501", "{refused:#}");

    // A setting the session starts with (the client's `options`) counts
    // the same, and a statement without a backslash still runs.
    let ci_off = format!("{ci} options='-c standard_conforming_strings=off'");
    let out = p.psql(&ci_off, &["-c", "SELECT 'plain'", "-c", trick]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "plain",
        "{stderr}"
    );
    assert!(
        stderr.contains("standard_conforming_strings is off"),
        "{stderr}"
    );

    // Pipelined: the setting is changed by a statement still in flight
    // when the trick arrives (extended protocol, no Sync between). The
    // node waits for the server's answer before judging. To the node's
    // parser this trick selects two strings; to the server it reads
    // `payroll`, a table under an approval rule.
    let out = p.python(
        "pg_escapes.py",
        &[&ci, r"SELECT '\', ' , (SELECT salary FROM payroll) --'"],
    );
    let said = ok(&out, "pipelined escapes", &p);
    assert!(said.contains("refused"), "{said}");
    assert!(
        said.contains("standard_conforming_strings is off"),
        "{said}"
    );

    // The same trick through the client encoding: in GBK, 0xBF 0x5C is one
    // character, so the server sees the E-string end at the next quote
    // and a DROP after it; undecodable to the node, it is refused.
    let out = p.python(
        "pg_encoding.py",
        &[&ci, "SELECT E'\u{bf}\\' ; DROP TABLE users; --'"],
    );
    let said = ok(&out, "GBK escapes", &p);
    assert!(
        said.contains("refused") && said.contains("not UTF-8"),
        "{said}"
    );
    assert!(users_table_exists(&p), "the table survived");
}

/// The first held approval, waited for (`sql` names it in the failure).
fn first_pending(p: &PgEnv, sql: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = p.env.node.cli_json(&["approvals", "list", "--json"]);
        if let Some(a) = list.as_array().and_then(|a| a.first()).cloned() {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "`{sql}` was not held:\n{}",
            p.env.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `sql` from the job, waits for it to be held by `rule` and
/// denies it; returns what psql said.
fn held_then_denied(p: &PgEnv, ci: &str, sql: &str, rule: &str) -> String {
    let held = p
        .env
        .cgroup
        .command(
            &format!("{PG_BIN}/psql"),
            &["-X", "-q", "-At", ci, "-c", sql],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pending = first_pending(p, sql);
    assert_eq!(pending["rule"], rule, "{sql}: {pending}");
    let out = p.env.node.cli(&[
        "approvals",
        "deny",
        &pending["id"].to_string(),
        "--reason",
        "not this way",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    text(&held.wait_with_output().unwrap())
}

/// The SQL of issue 21 against the example rules: what runs inside a DO
/// block, a function created and called in one string, a WHERE that
/// filters nothing, SQL handed to a function, and a search path changed
/// before an unqualified name. Each is refused (or held) and its table
/// is intact; ordinary statements of the same kinds still run.
#[test]
fn sql_rules_see_what_runs_inside_blocks_functions_and_the_search_path() {
    let p = PgEnv::new();
    let ci = verify_full(&p, APP_ROLE);
    p.pg.admin(
        "CREATE TABLE t1 (x int); CREATE TABLE t2 (x int); CREATE TABLE t3 (x int); \
         CREATE TABLE t4 (x int); \
         INSERT INTO t1 VALUES (1), (2); INSERT INTO t2 VALUES (1), (2); \
         INSERT INTO t3 VALUES (1), (2); INSERT INTO t4 VALUES (1), (2); \
         ALTER TABLE t1 OWNER TO app; ALTER TABLE t2 OWNER TO app; \
         ALTER TABLE t3 OWNER TO app; ALTER TABLE t4 OWNER TO app; \
         CREATE SCHEMA hr; CREATE TABLE hr.salaries (who text, amount int); \
         INSERT INTO hr.salaries VALUES ('ceo', 1000000); \
         GRANT USAGE ON SCHEMA hr TO app; GRANT SELECT ON hr.salaries TO app; \
         GRANT CREATE ON SCHEMA public TO app;",
        "shop",
    );
    let count = |t: &str| p.pg.admin(&format!("SELECT count(*) FROM {t}"), "shop");
    for (sql, table) in [
        ("DO $x$ BEGIN EXECUTE 'TRUNCATE t1'; END $x$", "t1"),
        (
            "CREATE FUNCTION wipe() RETURNS void LANGUAGE plpgsql AS $$ BEGIN TRUNCATE t2; END $$; SELECT wipe()",
            "t2",
        ),
        ("DELETE FROM t3 WHERE true", "t3"),
        ("DELETE FROM t3 WHERE 1=1", "t3"),
        ("DO $$ BEGIN EXECUTE 'TRUNC' || 'ATE t4'; END $$", "t4"),
        // Built at run time: cannot be judged, refused under blocking rules.
        ("DO $$ BEGIN EXECUTE format('TRUNCATE %I', 't4'); END $$", "t4"),
        (
            "CREATE FUNCTION wipe2() RETURNS void LANGUAGE sql AS 'DELETE FROM t4'; SELECT wipe2()",
            "t4",
        ),
    ] {
        let out = p.psql(&ci, &["-c", sql]);
        let said = text(&out);
        assert!(!out.status.success(), "`{sql}` ran: {said}");
        assert!(
            said.contains("sluice: statement refused by policy rule `no-destructive-sql`"),
            "`{sql}`: {said}"
        );
        assert!(count(table).contains('2'), "{table} intact after `{sql}`");
    }
    let refused = p.wait_statement(|s| {
        s["db_query"] == "DO $$ BEGIN EXECUTE format('TRUNCATE %I', 't4'); END $$"
    });
    assert!(
        refused["decisions"][0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("built at run time")),
        "{refused:#}"
    );

    // Tables read through a function or an unqualified name on a changed
    // path are held by the table rule (and denied here).
    for sql in [
        "SELECT query_to_xml('select * from payroll', true, true, '')",
        "SELECT table_to_xml('payroll', true, true, '')",
        "SET search_path = hr; SELECT * FROM salaries",
        "SELECT set_config('search_path', 'hr', false); SELECT amount FROM salaries",
    ] {
        let said = held_then_denied(&p, &ci, sql, "payroll-needs-approval");
        assert!(
            !said.contains("1000000") && !said.contains("<salary>100"),
            "`{sql}`: {said}"
        );
        assert!(
            said.contains("denied") || said.contains("refused"),
            "`{sql}`: {said}"
        );
    }

    // Ordinary statements of the same kinds still run.
    for (sql, want) in [
        ("DO $$ BEGIN PERFORM 1; END $$", ""),
        ("DELETE FROM t3 WHERE x = 1", ""),
        ("SELECT count(*) FROM t3", "1"),
        (
            "SELECT query_to_xml('select 42 as n', true, true, '') IS NOT NULL",
            "t",
        ),
        ("SET search_path = public; SELECT count(*) FROM t1", "2"),
    ] {
        let out = ok(&p.psql(&ci, &["-c", sql]), sql, &p);
        assert_eq!(out.trim(), want, "{sql}");
    }
}

#[test]
fn the_node_credential_is_not_sent_to_a_server_asking_for_it_in_clear() {
    let p = PgEnv::new();
    let ci = verify_full(&p, APP_ROLE);
    ok(&p.psql(&ci, &["-c", "SELECT 1"]), "SCRAM login", &p);
    // The server (a CIDR target's, or one reached with upstream TLS off)
    // now asks for the password itself.
    p.pg.hba_first("host all all 0.0.0.0/0 password");
    let out = p.psql(&ci, &["-c", "SELECT 1"]);
    assert!(!out.status.success(), "login must fail: {}", text(&out));
    assert!(
        text(&out).contains("cleartext password") && text(&out).contains("weak_auth"),
        "the job is told why: {}",
        text(&out)
    );
    // Allowed by the bundle, the same server gets it.
    let yaml = bundle(11, p.env.dir.path()).replace(
        &format!("    user: {APP_ROLE}\n"),
        &format!("    user: {APP_ROLE}\n    weak_auth: true\n"),
    );
    assert!(yaml.contains("weak_auth: true"));
    p.push_yaml(11, &yaml);
    assert_eq!(
        ok(&p.psql(&ci, &["-c", "SELECT 1"]), "cleartext allowed", &p).trim(),
        "1"
    );
}
