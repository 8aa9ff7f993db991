//! Test plumbing for PID 1 code: the skip rule (print `SKIPPED`, or fail under
//! `TETHER_REQUIRE_ALL=1`, as e2e's harness does) and a private mount
//! namespace, so root-only tests mount without touching the machine's mounts.

/// Reports that `what` cannot run because of `reason`; panics when
/// `TETHER_REQUIRE_ALL=1`, so a missing prerequisite never passes silently.
pub fn skip(what: &str, reason: &str) {
    if std::env::var("TETHER_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{what} is required (TETHER_REQUIRE_ALL=1) but {reason}");
    }
    eprintln!("SKIPPED {what}: {reason} (set TETHER_REQUIRE_ALL=1 to make this a failure)");
}

/// Runs `f` on a thread of its own in a new, private mount namespace: its
/// mounts vanish with it. `None` (after [`skip`]) without the privilege.
pub fn in_private_mounts<T: Send>(what: &str, f: impl FnOnce() -> T + Send) -> Option<T> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    if !nix::unistd::geteuid().is_root() {
        skip(what, "it needs root (mount namespaces)");
        return None;
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Err(e) = unshare(CloneFlags::CLONE_NEWNS) {
                skip(what, &format!("unshare(CLONE_NEWNS) failed: {e}"));
                return None;
            }
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .expect("make mounts private");
            Some(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
