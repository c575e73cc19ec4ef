//! A real PostgreSQL server (Debian's) in the test's network namespace,
//! with TLS from its own throwaway CA and SCRAM logins, behind a node
//! whose target `shop-db` is the Postgres protocol, intercepted by name.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::{must, sh, sluice, text, Env, Remote};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const DB_NAME: &str = "db.fake.test";
/// The role the node logs in as with its own credential.
pub const APP_ROLE: &str = "app";
/// A role without a node credential: the job answers SCRAM itself.
pub const READER_ROLE: &str = "reader";
pub const READER_PASSWORD: &str = "reader-pw-e2e";

pub struct PgServer {
    child: Child,
    pub sock: PathBuf,
    pub port: u16,
}

impl PgServer {
    /// initdb as the `postgres` user, TLS on, SCRAM for TCP logins,
    /// listening on the namespace's target address.
    fn start(
        remote: &Remote,
        certs: &Path,
        dir: &Path,
        app_password: &str,
        trust_tcp: bool,
        port: u16,
    ) -> Self {
        let pg = dir.join(if port == 5432 {
            "pg".to_owned()
        } else {
            format!("pg-{port}")
        });
        let data = pg.join("data");
        let sock = pg.join("sock");
        std::fs::create_dir_all(&sock).unwrap();
        for f in ["server.crt", "server.key"] {
            std::fs::copy(certs.join(f), pg.join(f)).unwrap();
        }
        // The test's directory is root's: the server needs to reach its own.
        must(&format!("chmod 755 {}", dir.display()));
        must(&format!(
            "chown -R postgres:postgres {} && chmod 600 {}/server.key",
            pg.display(),
            pg.display()
        ));
        must(&format!(
            "runuser -u postgres -- {PG_BIN}/initdb -D {} -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-sync >/dev/null",
            data.display()
        ));
        let conf = format!(
            "listen_addresses = '{addr}'\nport = {port}\nunix_socket_directories = '{sock}'\nssl = on\nssl_cert_file = '{pg}/server.crt'\nssl_key_file = '{pg}/server.key'\nfsync = off\nsynchronous_commit = off\nmax_connections = 120\npassword_encryption = 'scram-sha-256'\n",
            addr = remote.remote,
            sock = sock.display(),
            pg = pg.display()
        );
        let mut pc = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        pc.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), pc).unwrap();
        let mut hba = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap();
        if trust_tcp {
            // What pg_regress's own clusters do: no passwords in the way.
            hba.insert_str(0, "host all all 0.0.0.0/0 trust\n");
        }
        hba.push_str("host all all 0.0.0.0/0 scram-sha-256\n");
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        let child = Command::new("ip")
            .args([
                "netns", "exec", &remote.ns, "runuser", "-u", "postgres", "--",
            ])
            .arg(format!("{PG_BIN}/postgres"))
            .arg("-D")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(pg.join("postgres.log")).unwrap())
            .spawn()
            .expect("start postgres");
        let server = PgServer { child, sock, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sh(&format!(
            "{PG_BIN}/pg_isready -q -h {} -p {port}",
            server.sock.display()
        ))
        .status
        .success()
        {
            assert!(
                Instant::now() < deadline,
                "postgres did not start:\n{}",
                std::fs::read_to_string(pg.join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server.admin(&format!(
            "CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{app_password}'; CREATE ROLE {READER_ROLE} LOGIN PASSWORD '{READER_PASSWORD}';"
        ), "postgres");
        server.admin(
            &format!("CREATE DATABASE shop OWNER {APP_ROLE}"),
            "postgres",
        );
        server
    }

    /// Puts `line` first in pg_hba.conf and reloads: how the server asks
    /// TCP clients to authenticate from now on.
    pub fn hba_first(&self, line: &str) {
        let hba = self
            .sock
            .parent()
            .expect("server directory")
            .join("data/pg_hba.conf");
        let text = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(&hba, format!("{line}\n{text}")).unwrap();
        self.admin("SELECT pg_reload_conf()", "postgres");
        // The postmaster rereads it on SIGHUP, asynchronously.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Runs SQL as the superuser over the server's own socket (not
    /// through the node): the test's view of the truth.
    pub fn admin(&self, sql: &str, db: &str) -> String {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{PG_BIN}/psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.sock)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-d", db, "-c", sql])
            .output()
            .expect("run admin psql");
        assert!(
            out.status.success(),
            "admin SQL `{sql}` failed: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // SIGINT: fast shutdown (the namespace goes right after).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = sh(&format!(
            "pkill -9 -f 'postgres -D {}'",
            self.sock.parent().unwrap().join("data").display()
        ));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway CA and a server certificate for `db.fake.test`.
fn make_certs(dir: &Path) {
    let d = dir.display();
    must(&format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=sluice-e2e-db-ca 2>/dev/null \
         && openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key -out server.csr -subj /CN={DB_NAME} 2>/dev/null \
         && printf 'subjectAltName=DNS:{DB_NAME}\\nbasicConstraints=CA:FALSE\\nkeyUsage=digitalSignature\\nextendedKeyUsage=serverAuth\\n' > ext.cnf \
         && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile ext.cnf 2>/dev/null"
    ));
}

/// A self-signed server certificate as `openssl req -x509` makes it
/// (`CA:TRUE`, its own issuer), with the target's name.
fn make_self_signed(dir: &Path) {
    let d = dir.display();
    must(&format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key -out server.crt -days 2 -subj /CN={DB_NAME} -addext subjectAltName=DNS:{DB_NAME} 2>/dev/null \
         && cp server.crt ca.pem"
    ));
}

/// The SHA-256 fingerprint `openssl x509 -fingerprint` prints for a
/// certificate file (`sha256 Fingerprint=AB:CD:...`).
pub fn openssl_fingerprint(cert: &Path) -> String {
    let out = sh(&format!(
        "openssl x509 -noout -fingerprint -sha256 -in {}",
        cert.display()
    ));
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// How a test's Postgres node and server are set up.
pub struct PgOptions {
    /// Whether the node is told the server's CA (`tls.extra_upstream_roots`).
    pub trust_server: bool,
    /// The target's `tls`: `intercept` or `none` (the job speaks plaintext
    /// to the node; the node still verifies the server).
    pub tls: &'static str,
    /// The server's certificate is self-signed (`CA:TRUE`).
    pub self_signed: bool,
    /// Pin the server's certificate (`postgres.server_cert_sha256`) by
    /// this fingerprint, or by the real one with `Some("")`.
    pub pin: Option<String>,
    /// More YAML lines for the `shop-db` target.
    pub target_extra: String,
    /// TCP logins need no password (the regression suite's setting).
    pub trust_tcp: bool,
    /// A second server on port 5433, target `shop-db-2` (same address,
    /// same `tls`, no other settings).
    pub second_server: bool,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            trust_server: true,
            tls: "intercept",
            self_signed: false,
            pin: None,
            target_extra: String::new(),
            trust_tcp: false,
            second_server: false,
        }
    }
}

/// A node, a watched cgroup, a Postgres server and a signed bundle.
pub struct PgEnv {
    pub pg: PgServer,
    /// `PgOptions::second_server`.
    pub pg2: Option<PgServer>,
    pub env: Env,
    pub keys: PathBuf,
    /// The server's certificate and key (`server.crt`), and its CA
    /// (`ca.pem`: the certificate itself when self-signed).
    pub certs: tempfile::TempDir,
}

/// The standard statement and result rules (bundle `version`).
pub fn bundle(version: u64, dir: &Path) -> String {
    format!(
        r#"version: {version}
name: pg-e2e
workloads:
  - name: jobs
    cgroup: "/se2e*"
credentials:
  - target: shop-db
    source: file:{dir}/db.pass
    user: {APP_ROLE}
rules:
  - id: no-destructive-sql
    on: statement
    targets: [shop-db]
    sql:
      shapes: [drop, truncate, delete_without_where, update_without_where, copy_program, alter_system]
    action: block
    message: Destructive statements need a change ticket.
  - id: payroll-needs-approval
    on: statement
    targets: [shop-db]
    sql:
      tables: [payroll, "hr.*"]
    action: approve
    timeout_secs: 30
  - id: log-ddl
    on: statement
    targets: [shop-db]
    sql:
      classes: [ddl]
    action: log
  - id: mask-personal-data
    on: result
    targets: [shop-db]
    columns: ["*email*", ssn]
    action: mask
  - id: mask-secrets-in-rows
    on: result
    targets: [shop-db]
    packs: [secrets]
    action: mask
"#,
        dir = dir.display()
    )
}

impl PgEnv {
    pub fn new() -> Self {
        Self::with(|_| String::new())
    }

    /// With extra node configuration.
    pub fn with(extra: impl Fn(&Path) -> String) -> Self {
        Self::custom(true, "", extra)
    }

    /// `trust_server`: whether the node is told the server's CA;
    /// `target_extra`: more YAML lines for the `shop-db` target.
    pub fn custom(trust_server: bool, target_extra: &str, extra: impl Fn(&Path) -> String) -> Self {
        Self::build(
            PgOptions {
                trust_server,
                target_extra: target_extra.to_owned(),
                ..PgOptions::default()
            },
            extra,
        )
    }

    pub fn build(o: PgOptions, extra: impl Fn(&Path) -> String) -> Self {
        let certs = tempfile::tempdir().unwrap();
        if o.self_signed {
            make_self_signed(certs.path());
        } else {
            make_certs(certs.path());
        }
        let mut target_extra = o.target_extra.clone();
        if let Some(pin) = &o.pin {
            let pin = if pin.is_empty() {
                openssl_fingerprint(&certs.path().join("server.crt"))
            } else {
                pin.clone()
            };
            target_extra.push_str(&format!(
                "    postgres:\n      server_cert_sha256: [\"{pin}\"]\n"
            ));
        }
        let trust_server = o.trust_server;
        let tls = o.tls;
        let second = o.second_server;
        let ca = certs.path().join("ca.pem");
        let app_password = format!("app-{:016x}", rand_u64());
        let pw = app_password.clone();
        let env = Env::build(
            |r| {
                let mut t = format!(
                    "  - name: shop-db\n    addresses: [\"{}\"]\n    ports: [5432]\n    tls: {tls}\n    sni: [{DB_NAME}]\n{target_extra}",
                    r.remote
                );
                if second {
                    t.push_str(&format!(
                        "  - name: shop-db-2\n    addresses: [\"{}\"]\n    ports: [5433]\n    protocol: postgres\n    tls: {tls}\n    sni: [{DB_NAME}]\n",
                        r.remote
                    ));
                }
                t
            },
            move |_, dir| {
                let keys = dir.join("keys");
                std::fs::create_dir_all(&keys).unwrap();
                let out = sluice(&["policy", "keygen", &keys.join("team").display().to_string()]);
                assert!(out.status.success(), "{}", text(&out));
                std::fs::write(dir.join("db.pass"), format!("{pw}\n")).unwrap();
                let roots = if trust_server {
                    format!("tls:\n  extra_upstream_roots: [\"{}\"]\n", ca.display())
                } else {
                    String::new()
                };
                format!(
                    "{roots}policy:\n  trusted_keys: [\"{}\"]\n  watch_dir: \"{}\"\n{}",
                    keys.join("team.pub").display(),
                    dir.join("policy.d").display(),
                    extra(dir)
                )
            },
            false,
        );
        let pg = PgServer::start(
            &env.remote,
            certs.path(),
            env.dir.path(),
            &app_password,
            o.trust_tcp,
            5432,
        );
        let pg2 = second.then(|| {
            PgServer::start(
                &env.remote,
                certs.path(),
                env.dir.path(),
                &app_password,
                o.trust_tcp,
                5433,
            )
        });
        let keys = env.dir.path().join("keys");
        let p = PgEnv {
            pg,
            pg2,
            env,
            keys,
            certs,
        };
        p.push_bundle(10);
        p.pg.admin(
            "CREATE TABLE users (id serial PRIMARY KEY, name text, email text, ssn text, note text); \
             CREATE TABLE payroll (id int, salary int); INSERT INTO payroll VALUES (1, 100); \
             GRANT SELECT ON users TO reader;",
            "shop",
        );
        p.pg.admin(
            "ALTER TABLE users OWNER TO app; ALTER TABLE payroll OWNER TO app;",
            "shop",
        );
        p
    }

    pub fn push_bundle(&self, version: u64) {
        self.push_yaml(version, &bundle(version, self.env.dir.path()));
    }

    /// Signs and pushes a bundle of the test's own (`version` in its name).
    pub fn push_yaml(&self, version: u64, yaml_text: &str) {
        let dir = self.env.dir.path();
        let yaml = dir.join(format!("pg-bundle-v{version}.yaml"));
        std::fs::write(&yaml, yaml_text).unwrap();
        let out = sluice(&[
            "policy",
            "sign",
            &yaml.display().to_string(),
            "--key",
            &self.keys.join("team.key").display().to_string(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let out = self.env.node.cli(&[
            "policy",
            "push",
            &yaml.with_extension("jws").display().to_string(),
        ]);
        assert!(out.status.success(), "policy push: {}", text(&out));
    }

    /// The node's CA (what `sslrootcert` points at for verify-full).
    pub fn node_ca(&self) -> PathBuf {
        self.env.state_dir().join("ca/ca.pem")
    }

    /// A libpq connection string from the job's side.
    pub fn conninfo(&self, user: &str, extra: &str) -> String {
        format!(
            "host={DB_NAME} hostaddr={} port=5432 dbname=shop user={user} connect_timeout=10 {extra}",
            self.env.remote.remote
        )
    }

    /// psql in the watched cgroup.
    pub fn psql(&self, conninfo: &str, args: &[&str]) -> Output {
        let mut full = vec!["-X", "-q", "-At", conninfo];
        full.extend_from_slice(args);
        self.env.cgroup.run(&format!("{PG_BIN}/psql"), &full)
    }

    /// A Python script (tests/fixtures) in the watched cgroup.
    pub fn python(&self, script: &str, args: &[&str]) -> Output {
        let path = format!("{}/{script}", crate::harness::FIXTURES);
        let mut full = vec![path.as_str()];
        full.extend_from_slice(args);
        self.env.cgroup.run("python3", &full)
    }

    /// Every statement of every session.
    pub fn statements(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for s in self.env.node.sessions() {
            let full = self
                .env
                .node
                .cli_json(&["sessions", "show", &s["id"].to_string()]);
            out.extend(full["statements"].as_array().cloned().unwrap_or_default());
        }
        out
    }

    /// Waits for a completed statement matching `pred`.
    pub fn wait_statement(&self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self
                .statements()
                .into_iter()
                .find(|s| s["state"] != "started" && pred(s))
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "statement not recorded; have {:#?}\nnode log:\n{}",
                self.statements(),
                self.env.node.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A bundle whose only statement rule logs (every class), with the
/// node-held credential and `result_rules` (YAML list items, or nothing).
pub fn log_only_bundle(version: u64, dir: &Path, result_rules: &str) -> String {
    format!(
        r#"version: {version}
name: pg-log-only
workloads:
  - name: jobs
    cgroup: "/se2e*"
credentials:
  - target: shop-db
    source: file:{dir}/db.pass
    user: {APP_ROLE}
rules:
  - id: audit-statements
    on: statement
    targets: [shop-db]
    sql:
      classes: [read, write, ddl, dcl, copy, transaction, session, admin, procedure, other]
    action: log
{result_rules}"#,
        dir = dir.display()
    )
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    let f = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut &f, &mut b).unwrap();
    u64::from_le_bytes(b)
}
