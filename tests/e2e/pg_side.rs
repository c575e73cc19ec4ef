//! What a job reads from Postgres besides rows, and how the node reaches
//! the server: errors, notices and notifications masked like rows; COPY
//! read in the statement's own format; large objects (fast-path calls)
//! under a log-only bundle; a target without interception; a self-signed
//! server pinned by its fingerprint. Real server, psql in the cgroup.
use std::process::Command;

use crate::{
    harness::text,
    pg::{
        log_only_bundle, openssl_fingerprint, PgEnv, PgOptions, APP_ROLE, DB_NAME, PG_BIN,
        READER_PASSWORD, READER_ROLE,
    },
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

fn verify_full(p: &PgEnv) -> String {
    p.conninfo(
        APP_ROLE,
        &format!("sslmode=verify-full sslrootcert={}", p.node_ca().display()),
    )
}

fn script(p: &PgEnv, name: &str, sql: &str) -> String {
    let path = p.env.dir.path().join(name);
    std::fs::write(&path, sql).unwrap();
    path.display().to_string()
}

#[test]
fn errors_notices_and_notifications_are_masked_in_the_stream_and_the_record() {
    let p = PgEnv::new();
    let ci = verify_full(&p);
    let key = fake_aws_key();
    let stars = "*".repeat(key.len());
    p.pg.admin(
        &format!("INSERT INTO users (name, note) VALUES ('ada', 'deploy key {key}')"),
        "shop",
    );
    // The server quotes the value in its error.
    let out = p.psql(&ci, &["-c", "SELECT note::int FROM users"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "invalid input syntax for type integer: \"deploy key {stars}\""
        )),
        "{t}"
    );
    assert!(!t.contains(&key), "{t}");

    // RAISE NOTICE, an exception's detail and hint, and a notification
    // to the session's own LISTEN.
    let f = script(
        &p,
        "side.sql",
        "DO $$ BEGIN RAISE NOTICE 'note is %', (SELECT note FROM users LIMIT 1); END $$;\n\
         LISTEN ch;\n\
         SELECT pg_notify('ch', (SELECT note FROM users LIMIT 1));\n\
         DO $$ DECLARE n text := (SELECT note FROM users LIMIT 1); BEGIN RAISE EXCEPTION 'failing' USING DETAIL = n, HINT = n; END $$;\n",
    );
    let out = p.psql(&ci, &["-f", &f]);
    let t = text(&out);
    for want in [
        format!("NOTICE:  note is deploy key {stars}"),
        format!("with payload \"deploy key {stars}\""),
        format!("DETAIL:  deploy key {stars}"),
        format!("HINT:  deploy key {stars}"),
    ] {
        assert!(t.contains(&want), "`{want}` not in:\n{t}");
    }
    assert!(!t.contains(&key), "{t}");

    // The record keeps what the job saw, and says it was masked.
    let st = p.wait_statement(|s| s["db_query"] == "SELECT note::int FROM users");
    assert_eq!(st["sqlstate"], "22P02");
    assert_eq!(
        st["error"],
        format!("invalid input syntax for type integer: \"deploy key {stars}\"")
    );
    assert!(
        st["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["rule"] == "mask-secrets-in-rows" && d["action"] == "mask"),
        "{st:#}"
    );
    let all = serde_json::to_string(&p.statements()).unwrap();
    assert!(!all.contains(&key), "the record holds the key: {all}");
}

#[test]
fn copy_is_read_in_the_statements_own_format() {
    let p = PgEnv::new();
    let ci = verify_full(&p);
    p.pg.admin(
        "INSERT INTO users (name, email, ssn, note) VALUES ('ada', 'ada@example.com', '123-45-6789', 'plain'); \
         CREATE TABLE contacts (id int, handle text GENERATED ALWAYS AS (email || '!') STORED, junk int, email text); \
         ALTER TABLE contacts DROP COLUMN junk; INSERT INTO contacts (id, email) VALUES (1, 'bob@example.com'); \
         ALTER TABLE contacts OWNER TO app;",
        "shop",
    );
    let (email, ssn) = ("*".repeat(15), "*".repeat(11));
    let copy = |sql: &str| ok(&p.psql(&ci, &["-c", sql]), sql, &p);
    // Another delimiter: the masked column is the second field, not the
    // whole line's first.
    assert_eq!(
        copy("COPY users (name, email) TO STDOUT (DELIMITER ',')"),
        format!("ada,{email}\n")
    );
    // CSV with a header: the header as it was.
    assert_eq!(
        copy("COPY users (name, email, ssn) TO STDOUT (FORMAT csv, HEADER)"),
        format!("name,email,ssn\nada,{email},{ssn}\n")
    );
    // No column list: the columns from the header, or from the catalog.
    assert_eq!(
        copy("COPY users TO STDOUT (FORMAT csv, HEADER, DELIMITER '|')"),
        format!("id|name|email|ssn|note\n1|ada|{email}|{ssn}|plain\n")
    );
    assert_eq!(
        copy("COPY users TO STDOUT"),
        format!("1\tada\t{email}\t{ssn}\tplain\n")
    );
    // Dropped and generated columns are not in a COPY's rows.
    assert_eq!(copy("COPY contacts TO STDOUT"), format!("1\t{email}\n"));
    // psql's \copy is COPY ... TO STDOUT too.
    assert_eq!(
        copy("\\copy users (ssn, name) to stdout with (format csv)"),
        format!("{ssn},ada\n")
    );
    // Binary rows are not rewritten: refused where a column rule applies.
    let out = p.psql(&ci, &["-c", "COPY users (email) TO STDOUT (FORMAT binary)"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("statement refused by policy rule `binary-copy-masked`"),
        "{}",
        text(&out)
    );
    let out = p.psql(
        &ci,
        &["-c", "COPY users (id, name) TO STDOUT (FORMAT binary)"],
    );
    assert!(
        out.stdout.starts_with(b"PGCOPY\n\xff\r\n\0"),
        "{}",
        text(&out)
    );

    // A column rule that matches no column of the COPY: as it was.
    p.push_yaml(
        11,
        &log_only_bundle(
            11,
            p.env.dir.path(),
            "  - id: mask-nothing\n    on: result\n    targets: [shop-db]\n    columns: [\"no_such_column_*\"]\n    action: mask\n",
        ),
    );
    for sql in [
        "COPY users TO STDOUT",
        "COPY users TO STDOUT (FORMAT csv, HEADER)",
        "COPY (SELECT * FROM users) TO STDOUT (FORMAT csv)",
    ] {
        assert_eq!(copy(sql), p.pg.admin(sql, "shop"), "{sql}");
    }
}

#[test]
fn large_objects_follow_the_rules_that_can_block() {
    let p = PgEnv::new();
    let ci = verify_full(&p);
    let blob = p.env.dir.path().join("blob.txt");
    std::fs::write(&blob, "a large object through the node\n").unwrap();
    let back = p.env.dir.path().join("back.txt");
    let f = script(
        &p,
        "lo.sql",
        &format!(
            "\\lo_import {}\nSELECT convert_from(lo_get(:LASTOID), 'UTF8');\n\\lo_export :LASTOID {}\n",
            blob.display(),
            back.display()
        ),
    );
    // Blocking rules apply: a call the node cannot read is refused, and
    // the session goes on.
    let out = p.psql(&ci, &["-f", &f]);
    assert!(
        text(&out).contains("statement refused by policy rule `function-call`"),
        "{}",
        text(&out)
    );
    assert_eq!(
        p.pg.admin("SELECT count(*) FROM pg_largeobject_metadata", "shop")
            .trim(),
        "0"
    );

    // Only a log rule: nothing is refused, the object goes both ways.
    p.push_yaml(11, &log_only_bundle(11, p.env.dir.path(), ""));
    let out = p.psql(&ci, &["-v", "ON_ERROR_STOP=1", "-f", &f]);
    assert_eq!(
        ok(&out, "large object", &p),
        "a large object through the node\n\n"
    );
    assert_eq!(
        std::fs::read_to_string(&back).unwrap(),
        "a large object through the node\n"
    );
    // Each call is recorded, the refused one and those that ran.
    let calls: Vec<_> = p
        .statements()
        .into_iter()
        .filter(|s| s["protocol"] == "function-call")
        .collect();
    assert!(
        calls.iter().any(|s| s["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("refused by `function-call`")))
            && calls
                .iter()
                .filter(|s| s["command_tag"] == "FUNCTION CALL")
                .count()
                >= 2,
        "{calls:#?}"
    );
}

/// `tls: none` on a Postgres target (nothing intercepted anywhere in the
/// configuration): the job speaks plaintext to the node, the node still
/// verifies the server, or speaks plaintext to it when told to.
#[test]
fn a_target_without_interception_still_verifies_its_server() {
    let ssl_of_own_backend = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let p = PgEnv::build(
        PgOptions {
            tls: "none",
            ..PgOptions::default()
        },
        |_| String::new(),
    );
    let plain = p.conninfo(APP_ROLE, "sslmode=disable");
    let out = p.psql(&plain, &["-c", ssl_of_own_backend]);
    assert_eq!(ok(&out, "tls: none, verified upstream", &p).trim(), "t");
    let s = p.env.node.wait_sessions(1);
    assert_eq!(s[0]["database"]["login"], "node-credential", "{s:#?}");
    // The node does not terminate TLS for this target: a job that wants
    // TLS to its database is told so by libpq.
    let out = p.psql(
        &p.conninfo(APP_ROLE, "sslmode=require"),
        &["-c", "SELECT 1"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("server does not support SSL"),
        "{}",
        text(&out)
    );
    drop(p);

    // Not trusted: refused, and told which options would accept it.
    let p = PgEnv::build(
        PgOptions {
            tls: "none",
            trust_server: false,
            ..PgOptions::default()
        },
        |_| String::new(),
    );
    let out = p.psql(
        &p.conninfo(APP_ROLE, "sslmode=disable"),
        &["-c", "SELECT 1"],
    );
    let t = text(&out);
    assert!(!out.status.success());
    assert!(
        t.contains("TLS with the server as `db.fake.test`")
            && t.contains("tls.extra_upstream_roots")
            && t.contains("postgres.server_cert_sha256 of target `shop-db`"),
        "{t}"
    );
    drop(p);

    let p = PgEnv::build(
        PgOptions {
            tls: "none",
            trust_server: false,
            target_extra: "    postgres:\n      upstream_tls: disable\n".into(),
            ..PgOptions::default()
        },
        |_| String::new(),
    );
    let out = p.psql(
        &p.conninfo(APP_ROLE, "sslmode=disable"),
        &["-c", ssl_of_own_backend],
    );
    assert_eq!(ok(&out, "plaintext both sides", &p).trim(), "f");
}

/// A self-signed server (`openssl req -x509`, `CA:TRUE`): libpq's
/// verify-full accepts it as its own root, the roots' verification does
/// not; pinned by its fingerprint it is accepted, and a wrong pin is
/// refused with the option named.
#[test]
fn a_self_signed_server_is_pinned_by_its_fingerprint() {
    let p = PgEnv::build(
        PgOptions {
            self_signed: true,
            ..PgOptions::default()
        },
        |_| String::new(),
    );
    let cert = p.certs.path().join("server.crt");
    let fingerprint = openssl_fingerprint(&cert);
    let hex = fingerprint
        .trim_start_matches("sha256 Fingerprint=")
        .to_owned();
    // libpq straight to the server, the certificate as its root: accepted.
    let direct = Command::new(format!("{PG_BIN}/psql"))
        .args(["-X", "-At", "-c", "SELECT 'direct'"])
        .arg(format!(
            "host={DB_NAME} hostaddr={} port=5432 dbname=shop user={READER_ROLE} password={READER_PASSWORD} sslmode=verify-full sslrootcert={}",
            p.env.remote.remote,
            cert.display()
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&direct.stdout).trim(),
        "direct",
        "{}",
        text(&direct)
    );
    // Through the node, the same certificate as an extra root: refused,
    // with what would accept it.
    let out = p.psql(&verify_full(&p), &["-c", "SELECT 1"]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(
        t.contains("CaUsedAsEndEntity")
            && t.contains(&hex)
            && t.contains("postgres.server_cert_sha256 of target `shop-db`"),
        "{t}"
    );
    drop(p);

    // Pinned, as openssl prints it: accepted (no roots needed).
    let p = PgEnv::build(
        PgOptions {
            self_signed: true,
            trust_server: false,
            pin: Some(String::new()),
            ..PgOptions::default()
        },
        |_| String::new(),
    );
    let out = p.psql(&verify_full(&p), &["-c", "SELECT 'pinned'"]);
    assert_eq!(ok(&out, "pinned server", &p).trim(), "pinned");
    drop(p);

    // Another certificate than the pinned one: refused, the option named.
    let p = PgEnv::build(
        PgOptions {
            self_signed: true,
            trust_server: true,
            pin: Some("00:".repeat(31) + "00"),
            ..PgOptions::default()
        },
        |_| String::new(),
    );
    let out = p.psql(&verify_full(&p), &["-c", "SELECT 1"]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(
        t.contains("is not one pinned by postgres.server_cert_sha256 of target `shop-db`"),
        "{t}"
    );
    let s = p.env.node.wait_sessions(1);
    assert_eq!(s[0]["outcome"]["status"], "upstream_failed", "{s:#?}");
}
