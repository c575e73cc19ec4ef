//! Test support: a throwaway PostgreSQL cluster (Debian's server, as CI
//! installs it with scripts/setup.sh) in a temporary directory, reached
//! only by its Unix socket there (no TCP listener at all), torn down
//! when the last test using it is done. initdb refuses to run as root,
//! so as root (CI) the server runs as the `postgres` user.
//!
//! Anything missing is a panic with the reason: the store's PostgreSQL
//! tests fail rather than skip.
use std::{
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, Weak,
    },
};

/// The newest installed server's binaries (`SLUICE_TEST_PG_BIN` to pick
/// another).
fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SLUICE_TEST_PG_BIN") {
        return PathBuf::from(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "no PostgreSQL server under /usr/lib/postgresql (install `postgresql`: scripts/setup.sh); the store's tests need one"
        ),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub struct Cluster {
    // Dropped last (after the server is stopped).
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    databases: AtomicU32,
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// A server program, as the `postgres` user when we are root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        // The server's user may not be able to enter the test's cwd.
        c.current_dir(self.dir.path());
        c
    }

    fn must(&self, what: &str, c: &mut Command) {
        let out = c
            .output()
            .unwrap_or_else(|e| panic!("test PostgreSQL: {what}: {e}"));
        assert!(
            out.status.success(),
            "test PostgreSQL: {what} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    /// initdb and start a cluster of its own (most tests share one, see
    /// [`database`]).
    pub fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("sluice-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("test PostgreSQL: temp dir: {e}"));
        let c = Cluster {
            dir,
            bin: bin_dir(),
            as_postgres: is_root(),
            databases: AtomicU32::new(0),
        };
        std::fs::create_dir(c.sock()).unwrap_or_else(|e| panic!("test PostgreSQL: {e}"));
        if c.as_postgres {
            c.must(
                "chown to postgres",
                Command::new("chown")
                    .arg("-R")
                    .arg("postgres:")
                    .arg(c.dir.path()),
            );
        }
        c.must(
            "initdb",
            c.command("initdb")
                .arg("-D")
                .arg(c.data())
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
                .args(["--locale=C", "--no-sync"]),
        );
        let conf = format!(
            "\nlisten_addresses = ''\nunix_socket_directories = '{}'\nport = 5432\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 60\n",
            c.sock().display()
        );
        let pc = c.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&pc)
            .unwrap_or_else(|e| panic!("test PostgreSQL: postgresql.conf: {e}"));
        text.push_str(&conf);
        std::fs::write(&pc, text).unwrap_or_else(|e| panic!("test PostgreSQL: {e}"));
        c.restart();
        c
    }

    /// Starts the (stopped) server and waits for it.
    pub fn restart(&self) {
        self.must(
            "start",
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.path().join("log"))
                .args(["-w", "-t", "60", "start"]),
        );
    }

    /// Stops the server at once (what a crash or restart looks like to
    /// its clients).
    pub fn stop(&self) {
        self.must(
            "stop",
            self.command("pg_ctl").arg("-D").arg(self.data()).args([
                "-m",
                "immediate",
                "-w",
                "stop",
            ]),
        );
    }

    /// A URL for `db` on the cluster's socket.
    fn url(&self, db: &str) -> String {
        let host = self.sock().display().to_string().replace('/', "%2F");
        format!("postgresql://postgres@{host}:5432/{db}")
    }

    /// A new, empty database and its URL.
    pub fn create_database(&self) -> String {
        let name = format!("t{}", self.databases.fetch_add(1, Ordering::Relaxed));
        let mut admin = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .unwrap_or_else(|e| panic!("test PostgreSQL: connect: {e:?}"));
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("test PostgreSQL: create database: {e:?}"));
        self.url(&name)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A fresh database on the shared cluster; the cluster lives while any
/// of these does.
pub struct TestDb {
    pub url: String,
    _cluster: Arc<Cluster>,
}

static SHARED: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());

pub fn database() -> TestDb {
    let cluster = {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        match shared.upgrade() {
            Some(c) => c,
            None => {
                let c = Arc::new(Cluster::start());
                *shared = Arc::downgrade(&c);
                c
            }
        }
    };
    TestDb {
        url: cluster.create_database(),
        _cluster: cluster,
    }
}
