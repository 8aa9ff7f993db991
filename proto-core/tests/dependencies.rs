//! proto-core stays sans-IO: no async runtime and no I/O event crate among its
//! normal dependencies, checked with `cargo tree` on every test run.

use std::process::Command;

#[test]
fn proto_core_pulls_in_no_async_runtime_or_io_reactor() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "proto-core",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(names.contains(&"proto-core"), "{tree}");
    for banned in [
        "tokio",
        "smol",
        "async-io",
        "async-std",
        "mio",
        "polling",
        "async-executor",
        "futures-lite",
    ] {
        assert!(
            !names.contains(&banned),
            "proto-core depends on {banned}:\n{tree}"
        );
    }
}
