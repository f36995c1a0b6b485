//! Running the `cots` binary from the integration tests.

use std::process::{Command, Output};

/// `cots --quiet --device cpu <args>`.
pub fn cots(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cots"))
        .args(["--quiet", "--device", "cpu"])
        .args(args)
        .output()
        .unwrap()
}

/// Runs `cots`, which must succeed; its standard output.
pub fn ok(args: &[&str]) -> String {
    let out = cots(args);
    assert!(
        out.status.success(),
        "cots {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cots`, which must fail; its standard error.
#[allow(dead_code)] // not every test file checks a refusal this way
pub fn fails(args: &[&str]) -> String {
    let out = cots(args);
    assert!(!out.status.success(), "cots {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}
