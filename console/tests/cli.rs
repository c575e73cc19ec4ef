//! The console binary's edges: bad arguments and a state directory it
//! cannot use get a clear error, not a panic. (Its end-to-end test, with
//! a node, NATS and a browser, is in tests/e2e/console.rs.)
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-console");

#[test]
fn bad_arguments_and_state_dirs_are_refused_clearly() {
    let out = Command::new(BIN)
        .args(["run", "--listen", "not-an-address"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--listen"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = Command::new(BIN)
        .args(["run", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("state directory"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_store_that_cannot_be_opened_is_a_clear_error_and_keeps_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let run = |store: &str| {
        let out = Command::new(BIN)
            .args(["run", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path())
            .env("SLUICE_CONSOLE_STORE", store)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Nothing listens on loopback port 1: refused at once.
    let err = run("postgres://console:hunter2@127.0.0.1:1/console");
    assert!(err.contains("opening the store"), "{err}");
    assert!(err.contains("connect"), "{err}");
    for err in [err, run("mysql://console:hunter2@127.0.0.1/console")] {
        assert!(!err.contains("panicked"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    let out = Command::new(BIN)
        .args(["run", "--help"])
        .env(
            "SLUICE_CONSOLE_STORE",
            "postgres://console:hunter2@127.0.0.1/c",
        )
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--store"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
}
