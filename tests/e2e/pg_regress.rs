//! The invisibility suite: PostgreSQL 15's own regression SQL (Debian's
//! `postgresql-15` source package, fetched by scripts/setup.sh into
//! /var/cache/sluice-test; never in this repository) run with psql as
//! pg_regress runs it, straight to the server and then through the node,
//! (a) under a bundle whose only rule logs every statement and (b) with a
//! column masking rule that matches no column. Every output file must be
//! byte-identical to the direct run's.
//!
//! The schedule (`parallel_schedule`) runs in order, each group's files at
//! once, as pg_regress does; each run gets a fresh `regression` database
//! and a cluster with nothing left over from the run before (databases,
//! roles and tablespaces the suite made are dropped). Two servers: the
//! direct run and then the masking bundle's on the first, the log-only
//! bundle's on the second at the same time (136 s for the test on a shared
//! 2-core machine, node in a debug build: 116 s of runs, against 197 s
//! one after the other). No output is
//! normalised: none needs it (no file of the suite prints a pid, a time
//! or a path that differs between two runs set up like this).
//! `regress.so` (the suite's C helpers) is not built: the files that load
//! it fail the same way on every run.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use crate::pg::{log_only_bundle, PgEnv, PgOptions, PgServer, PG_BIN};

const SUITE: &str = "/var/cache/sluice-test/pg-regress/regress";

/// The schedule's groups, in order (`test: a b c` lines; `ignore:` lines
/// only tell pg_regress how to report a file, which this suite does not).
fn schedule(suite: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(suite.join("parallel_schedule")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("test:"))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// Removes what a run left in the cluster beyond its own database:
/// databases, tablespaces and roles other than the test's own.
fn reset_cluster(server: &PgServer) {
    for sql in [
        "SELECT format('DROP DATABASE %I WITH (FORCE)', datname) FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1', 'shop')",
        "SELECT format('DROP TABLESPACE %I', spcname) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')",
        "SELECT format('DROP OWNED BY %I CASCADE', rolname) FROM pg_roles WHERE rolname NOT IN ('postgres', 'app', 'reader') AND rolname NOT LIKE 'pg\\_%'",
        "SELECT format('DROP ROLE %I', rolname) FROM pg_roles WHERE rolname NOT IN ('postgres', 'app', 'reader') AND rolname NOT LIKE 'pg\\_%'",
    ] {
        for db in ["postgres", "shop"] {
            let stmts = server.admin(sql, db);
            for s in stmts.lines().filter(|s| !s.is_empty()) {
                // Roles are dropped once (from the first database).
                if db == "shop" && !s.starts_with("DROP OWNED") {
                    continue;
                }
                server.admin(s, db);
            }
        }
    }
    server.admin("CREATE DATABASE regression TEMPLATE=template0", "postgres");
    server.admin(
        "ALTER DATABASE regression SET lc_messages TO 'C'; ALTER DATABASE regression SET lc_monetary TO 'C'; \
         ALTER DATABASE regression SET lc_numeric TO 'C'; ALTER DATABASE regression SET lc_time TO 'C'; \
         ALTER DATABASE regression SET bytea_output TO 'hex'; ALTER DATABASE regression SET timezone_abbreviations TO 'Default';",
        "postgres",
    );
}

/// Runs the whole schedule; each file's output (stdout and stderr, as
/// pg_regress collects them) lands in `out/<file>.out`.
fn run(
    p: &PgEnv,
    server: &PgServer,
    suite: &Path,
    build: &Path,
    out: &Path,
    through_node: bool,
) -> std::time::Duration {
    let started = Instant::now();
    reset_cluster(server);
    let results = build.join("results");
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results).unwrap();
    std::fs::create_dir_all(out).unwrap();
    crate::harness::must(&format!("chown -R postgres {}", build.display()));
    for group in schedule(suite) {
        let children: Vec<(String, Child)> = group
            .iter()
            .map(|t| {
                let cmd = format!(
                    "exec {PG_BIN}/psql -X -a -q -h {host} -p {port} -U postgres -d regression < {sql} > {out} 2>&1",
                    host = p.env.remote.remote,
                    port = server.port,
                    sql = suite.join("sql").join(format!("{t}.sql")).display(),
                    out = out.join(format!("{t}.out")).display(),
                );
                let mut c = if through_node {
                    p.env.cgroup.command("sh", &["-c", &cmd])
                } else {
                    let mut c = Command::new("sh");
                    c.args(["-c", &cmd]);
                    c
                };
                // pg_regress's environment for its psql.
                for v in [
                    "LANGUAGE", "LC_ALL", "LANG", "LC_COLLATE", "LC_CTYPE", "LC_MONETARY",
                    "LC_NUMERIC", "LC_TIME", "PGCLIENTENCODING", "PGDATABASE", "PGPASSWORD",
                    "PGSSLMODE", "PGSERVICE", "PGHOST", "PGPORT", "PGUSER",
                ] {
                    c.env_remove(v);
                }
                c.env("LC_MESSAGES", "C")
                    .env("PGAPPNAME", "pg_regress")
                    .env("PGTZ", "America/Los_Angeles")
                    .env("PGDATESTYLE", "Postgres, MDY")
                    .env("PGOPTIONS", "-c intervalstyle=postgres_verbose")
                    .env("PG_ABS_SRCDIR", suite)
                    .env("PG_ABS_BUILDDIR", build)
                    .env("PG_LIBDIR", suite)
                    .env("PG_DLSUFFIX", ".so")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                (t.clone(), c.spawn().expect("start psql"))
            })
            .collect();
        for (t, mut c) in children {
            let status = c.wait().unwrap();
            // psql exits 0 through errors in a file (no ON_ERROR_STOP);
            // anything else is the harness's failure, not a difference:
            // say what psql printed last and what the node recorded of
            // the connections that did not end cleanly.
            if !(status.success() || status.code() == Some(3)) {
                let printed =
                    std::fs::read_to_string(out.join(format!("{t}.out"))).unwrap_or_default();
                let tail: Vec<&str> = printed.lines().rev().take(15).collect();
                let (unclean, log): (Vec<String>, String) = if through_node {
                    let node = &p.env.node;
                    let log = node.log_text();
                    let warnings: Vec<&str> = log
                        .lines()
                        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                        .collect();
                    (
                        node.sessions()
                            .into_iter()
                            .filter(|s| s["outcome"]["status"] != "closed")
                            .map(|s| s["outcome"].to_string())
                            .collect(),
                        warnings[warnings.len().saturating_sub(30)..].join("\n"),
                    )
                } else {
                    Default::default()
                };
                panic!(
                    "psql for `{t}` exited with {status}; its last lines:\n{}\nsessions not closed cleanly: {unclean:#?}\nthe node's last warnings:\n{log}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
    started.elapsed()
}

/// The files whose outputs differ, with the start of each diff.
fn compare(files: &[String], direct: &Path, through: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for f in files {
        let a = std::fs::read(direct.join(format!("{f}.out"))).unwrap_or_default();
        let b = std::fs::read(through.join(format!("{f}.out"))).unwrap_or_default();
        if a != b || a.is_empty() {
            let d = Command::new("diff")
                .arg("-u")
                .arg(direct.join(format!("{f}.out")))
                .arg(through.join(format!("{f}.out")))
                .output()
                .unwrap();
            let diff: String = String::from_utf8_lossy(&d.stdout)
                .lines()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n");
            out.push((f.clone(), diff));
        }
    }
    out
}

#[test]
fn postgres_regression_suite_is_byte_identical_through_the_node() {
    let suite = PathBuf::from(SUITE);
    assert!(
        suite.join("parallel_schedule").is_file() && suite.join("sql/test_setup.sql").is_file(),
        "PostgreSQL 15's regression suite is not in {SUITE}: run scripts/setup.sh (it fetches Debian's postgresql-15 source package)"
    );
    let files: Vec<String> = schedule(&suite).into_iter().flatten().collect();
    assert!(
        files.len() > 200,
        "only {} files in the schedule",
        files.len()
    );
    // Postgres targets and nothing intercepted anywhere: plaintext from
    // psql to the node (sslmode=prefer is declined), TLS verified to the
    // server, as the direct run has it. Two servers, so that the two
    // bundles' runs go at once (a cluster's roles and tablespaces are
    // shared by its databases: one run at a time per cluster).
    let p = PgEnv::build(
        PgOptions {
            tls: "none",
            trust_tcp: true,
            second_server: true,
            ..PgOptions::default()
        },
        |_| String::new(),
    );
    let pg2 = p.pg2.as_ref().unwrap();
    let dir = p.env.dir.path().to_owned();
    let (direct, logged, masked) = (
        dir.join("direct"),
        dir.join("log-only"),
        dir.join("mask-nothing"),
    );
    // One bundle: every statement logged on both targets, and on
    // `shop-db` a column rule that matches no column.
    p.push_yaml(
        11,
        &log_only_bundle(
            11,
            &dir,
            "  - id: mask-nothing\n    on: result\n    targets: [shop-db]\n    columns: [\"sluice_no_such_column_*\"]\n    action: mask\n",
        )
        .replace("targets: [shop-db]\n    sql:", "targets: [shop-db, shop-db-2]\n    sql:"),
    );

    let t0 = Instant::now();
    let ((t_direct, t_masked), t_logged) = std::thread::scope(|s| {
        // Each server its own build directory (the files the suite
        // writes with COPY TO and reads back; psql -a echoes the lines
        // that name them before substitution, so the path is in no
        // output).
        let a = s.spawn(|| {
            let d = run(&p, &p.pg, &suite, &dir.join("build-1"), &direct, false);
            let m = run(&p, &p.pg, &suite, &dir.join("build-1"), &masked, true);
            (d, m)
        });
        let l = run(&p, pg2, &suite, &dir.join("build-2"), &logged, true);
        (a.join().unwrap(), l)
    });
    eprintln!(
        "pg_regress invisibility: {} files in {:.1}s; direct {:.1}s then mask-nothing {:.1}s (server 1), log-only {:.1}s (server 2)",
        files.len(),
        t0.elapsed().as_secs_f64(),
        t_direct.as_secs_f64(),
        t_masked.as_secs_f64(),
        t_logged.as_secs_f64()
    );

    // The node saw the suite (it was not bypassed): its statements are
    // recorded, in the regression database.
    let sessions = p.env.node.sessions();
    assert!(
        sessions.len() >= 2 * files.len(),
        "{} sessions",
        sessions.len()
    );

    let mut report = String::new();
    for (name, dir) in [("log-only", &logged), ("mask-nothing", &masked)] {
        let diffs = compare(&files, &direct, dir);
        if !diffs.is_empty() {
            report.push_str(&format!(
                "\n{name}: {} of {} files differ: {}\n",
                diffs.len(),
                files.len(),
                diffs
                    .iter()
                    .map(|(f, _)| f.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
            for (_, d) in diffs.iter().take(6) {
                report.push_str(d);
                report.push('\n');
            }
        }
    }
    assert!(
        report.is_empty(),
        "outputs through the node differ from the direct run's:{report}\nnode log (tail):\n{}",
        text_tail(&p.env.node.log_text())
    );
}

fn text_tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
