//! Project automation. `cargo xtask <command>`:
//!
//! * `setup`  install what building and testing need (idempotent)
//! * `build`  setup, then a release build of the node
//! * `test`   setup, then fmt check, clippy, and every test (needs root)
//! * `run`    setup, build, and run the node on its embedded defaults
//! * `demo`   setup, build, and show the main job on this machine alone:
//!   a fake AI API in a network namespace, a job streaming through the
//!   node with the `openai` library, the masked answer, replay and verify
//!   (needs root)
//! * `bench [passthrough|all-egress|https|pg|scan|stream|record|console|all]`  setup, build, and benchmarks
//! * `console` setup, build, and run the console on this machine: a local
//!   nats-server with JetStream (loopback, `.sluice-console/nats`) and the
//!   embedded store (`.sluice-console/`), UI on http://127.0.0.1:8470
//! * `deb`    setup, release build, and `target/debian/sluice_VERSION_ARCH.deb`
//!   (passthrough and https need root)
//!
//! Std only, so that it builds in seconds on a fresh machine.
use std::{
    env,
    path::{Path, PathBuf},
    process::{exit, Command},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn run(cmd: &mut Command) {
    eprintln!("xtask: {cmd:?}");
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => {
            eprintln!("xtask: command failed ({s})");
            exit(s.code().unwrap_or(1));
        }
        Err(e) => {
            eprintln!("xtask: cannot run command: {e}");
            exit(1);
        }
    }
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn setup() {
    run(Command::new("bash").arg(root().join("scripts/setup.sh")));
}

/// Set-up plus the benchmarks' upstream and load tools (nginx, wrk, h2load).
fn setup_bench() {
    run(Command::new("bash")
        .arg(root().join("scripts/setup.sh"))
        .arg("bench"));
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let rest = &args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("build") => {
            setup();
            run(cargo().args(["build", "--release"]));
        }
        Some("test") => {
            if !is_root() {
                eprintln!("xtask test: the end-to-end suite needs root (eBPF, cgroups, netns); run as root");
                exit(1);
            }
            setup();
            run(cargo().args(["fmt", "--all", "--check"]));
            run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]));
            run(cargo().args(["test"]).args(rest.iter()));
        }
        Some("run") => {
            setup();
            run(cargo().args(["build", "--release"]));
            let mut c = Command::new(root().join("target/release/sluice"));
            c.arg("run")
                .arg("--state-dir")
                .arg(root().join(".sluice-state"));
            c.args(rest.iter());
            run(&mut c);
        }
        Some("demo") => {
            if !is_root() {
                eprintln!("xtask demo: needs root (eBPF, cgroups, a network namespace)");
                exit(1);
            }
            setup();
            run(cargo().args(["build", "--release", "-p", "node-agent", "--bin", "sluice"]));
            run(cargo().args(["build", "--release", "-p", "sluice-console"]));
            run(Command::new("python3")
                .arg(root().join("xtask/demo.py"))
                .arg("--sluice")
                .arg(root().join("target/release/sluice"))
                .arg("--console")
                .arg(root().join("target/release/sluice-console")));
        }
        Some("console") => {
            setup();
            run(cargo().args(["build", "--release", "-p", "sluice-console"]));
            let state = root().join(".sluice-console");
            let nats_dir = state.join("nats");
            if let Err(e) = std::fs::create_dir_all(&nats_dir) {
                eprintln!("xtask: {}: {e}", nats_dir.display());
                exit(1);
            }
            // The nodes of this machine ship to nats://127.0.0.1:4222
            // (`ship.nats.url`); nothing listens beyond loopback.
            let mut nats = match Command::new("nats-server")
                .args(["-js", "-a", "127.0.0.1", "-p", "4222", "-sd"])
                .arg(&nats_dir)
                .spawn()
            {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("xtask: cannot start nats-server: {e}");
                    exit(1);
                }
            };
            let status = Command::new(root().join("target/release/sluice-console"))
                .args(["run", "--nats", "nats://127.0.0.1:4222", "--state-dir"])
                .arg(&state)
                .args(rest.iter())
                .status();
            let _ = nats.kill();
            let _ = nats.wait();
            match status {
                Ok(s) if s.success() => {}
                Ok(s) => exit(s.code().unwrap_or(1)),
                Err(e) => {
                    eprintln!("xtask: cannot run sluice-console: {e}");
                    exit(1);
                }
            }
        }
        Some("deb") => {
            // target/debian/sluice_VERSION_ARCH.deb from the release binary.
            setup();
            run(cargo().args(["build", "--release", "-p", "node-agent", "--bin", "sluice"]));
            run(Command::new(root().join("packaging/build-deb.sh"))
                .arg(root().join("target/release/sluice"))
                .arg(root().join("target/debian"))
                .arg(env!("CARGO_PKG_VERSION")));
        }
        Some("bench") => {
            setup_bench();
            run(cargo().args([
                "build",
                "--release",
                "-p",
                "node-agent",
                "--bins",
                "--examples",
            ]));
            let which = rest.first().map(String::as_str).unwrap_or("all");
            let target = root().join("target/release");
            if matches!(which, "passthrough" | "all") {
                run(Command::new("python3")
                    .arg(root().join("xtask/bench/passthrough.py"))
                    .arg("--sluice")
                    .arg(target.join("sluice")));
            }
            if matches!(which, "all-egress" | "all") {
                run(Command::new("python3")
                    .arg(root().join("xtask/bench/passthrough.py"))
                    .arg("--all-egress")
                    .arg("--sluice")
                    .arg(target.join("sluice")));
            }
            if matches!(which, "host" | "all") {
                for extra in [&[][..], &["--all-egress"][..]] {
                    run(Command::new("python3")
                        .arg(root().join("xtask/bench/passthrough.py"))
                        .arg("--host-cost")
                        .args(extra)
                        .arg("--sluice")
                        .arg(target.join("sluice")));
                }
            }
            if matches!(which, "scan" | "all") {
                run(Command::new(target.join("examples/scan_bench")).arg("100"));
            }
            if matches!(which, "record" | "all") {
                run(Command::new(target.join("examples/record_bench")).arg("20000"));
            }
            if matches!(which, "stream" | "all") {
                run(&mut Command::new(target.join("examples/stream_bench")));
            }
            if matches!(which, "pg" | "all") {
                run(Command::new("python3")
                    .arg(root().join("xtask/bench/pg.py"))
                    .arg("--sluice")
                    .arg(target.join("sluice"))
                    .args(rest.iter().skip(1)));
            }
            if matches!(which, "console" | "all") {
                run(cargo().args(["build", "--release", "-p", "sluice-console"]));
                run(Command::new("python3")
                    .arg(root().join("xtask/bench/console.py"))
                    .arg("--console")
                    .arg(target.join("sluice-console"))
                    .args(rest.iter().skip(1)));
            }
            if matches!(which, "https" | "all") {
                run(Command::new("python3")
                    .arg(root().join("xtask/bench/https.py"))
                    .arg("--sluice")
                    .arg(target.join("sluice"))
                    .arg("--bench")
                    .arg(target.join("examples/https_bench"))
                    .arg("--upstream")
                    .arg(target.join("examples/fake_upstream"))
                    .args(rest.iter().skip(1)));
            }
        }
        _ => {
            eprintln!("usage: cargo xtask <setup|build|test|run|console|demo|bench|deb> [args]");
            exit(2);
        }
    }
}
