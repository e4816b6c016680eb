//! Shared by the command-line tests: read what a run of `mqota` printed.
#![allow(dead_code)]

use std::process::Output;

/// Stdout of a run that must have succeeded.
pub fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "mqota failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The one-line error of a run that must have failed: `error: ...`, never a
/// panic.
pub fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "mqota should have failed");
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("error: "), "{err:?}");
    assert!(!err.contains("panicked"), "{err:?}");
    err
}
