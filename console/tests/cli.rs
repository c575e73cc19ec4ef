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
