//! VM fork end to end (docs/PROTOCOL.md 4.5, docs/API.md "Fork"): `tetherd
//! serve` boots a container VM whose primary prints a counter every 100 ms,
//! `tetherd fork` makes children of it under QEMU (copy-on-write RAM,
//! `x-ignore-shared`), and each child comes back as a container of its own
//! with its own host name, MAC, address, randomness and clock, its counter
//! running on. Timings are printed (not asserted): from each child's `cont`
//! to its `forked@tether`, the guest's recovery time, and from `tetherd fork`
//! to all children listed.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::vm::{VmServe, prerequisites, vm_of};
use e2e::{available, with_timeout};

const LIMIT: Duration = Duration::from_secs(240);
/// How long a VM may take to boot and link under TCG on a busy machine.
const BOOT: Duration = Duration::from_secs(90);
/// The parent's primary: a counter, one line every 100 ms.
const COUNTER: &str = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.1; done";

/// One VM test at a time: the machine has few cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Boots the counter as container `name` and waits until it has counted.
fn boot_counter(serve: &VmServe, name: &str) {
    let body = serde_json::json!({
        "name": name,
        "cmd": ["sh", "-c", COUNTER],
        "memory_mib": 192,
        "net": "user",
        "stdin": true,
    });
    let (status, created) = serve.http("POST", "/v1/containers", Some(&body.to_string()));
    assert_eq!(status, 201, "{created}");
    serve.wait_node("the parent runs", BOOT, |n| {
        vm_of(n, name).is_some_and(|v| v["state"] == "running")
    });
    wait_for(serve, "the counter counts", Duration::from_secs(30), || {
        counter(&text(&serve.run_cli(&["logs", name]))).len() > 5
    });
}

/// Polls `check` every 100 ms for up to `limit`, or fails naming `what`.
fn wait_for(serve: &VmServe, what: &str, limit: Duration, check: impl Fn() -> bool) {
    let end = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < end,
            "{what}: not within {limit:?}\ntetherd:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The counter's numbers in `output`.
fn counter(output: &str) -> Vec<u64> {
    output
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Fails unless `numbers` count up by one from their first.
fn assert_no_gaps(what: &str, numbers: &[u64]) {
    for pair in numbers.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "{what}: a gap or a repeat in {numbers:?}"
        );
    }
}

/// What a VM says about itself.
#[derive(Debug)]
struct Facts {
    hostname: String,
    mac: String,
    address: String,
    random: String,
    /// The guest's wall clock, and the host's before and after asking.
    clock: f64,
    host_before: f64,
    host_after: f64,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn facts(serve: &VmServe, id: &str) -> Facts {
    // busybox's date has no %N: adjtimex reads the clock to the microsecond.
    let script = "hostname; cat /sys/class/net/eth0/address; \
                  ip -4 addr show eth0 | awk '/inet /{print $2; exit}'; \
                  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                  adjtimex | awk '/tv_sec/{s=$2} /tv_usec/{u=$2} END{printf \"%d.%06d\\n\", s, u}'";
    let host_before = now();
    let out = serve.run_cli(&["exec", id, "--", "sh", "-c", script]);
    let host_after = now();
    let stdout = text(&out);
    assert!(
        out.status.success(),
        "exec in {id}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "exec in {id} said {stdout:?}");
    Facts {
        hostname: lines[0].into(),
        mac: lines[1].into(),
        address: lines[2].into(),
        random: lines[3].into(),
        clock: lines[4]
            .parse()
            .unwrap_or_else(|e| panic!("date {:?}: {e}", lines[4])),
        host_before,
        host_after,
    }
}

/// Follows `id`'s output (`tetherd attach`) for `time`; the counter numbers seen.
fn attach_for(serve: &VmServe, procs: &e2e::Procs, id: &str, time: Duration) -> Vec<u64> {
    let mut cmd = serve.cli();
    cmd.args(["attach", id, "--no-stdin"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut attach = procs.spawn(&mut cmd).expect("tetherd attach");
    std::thread::sleep(time);
    let _ = attach.child().kill();
    counter(&text(&attach.wait_with_output().expect("attach output")))
}

#[test]
fn a_vm_forks_into_two_children_that_are_containers_of_their_own() {
    let _one = serial();
    let Some(files) = available("QEMU VM tests", prerequisites()) else {
        return;
    };
    with_timeout(LIMIT, move |procs| {
        let serve = VmServe::start(&procs, &files, "tcg");
        boot_counter(&serve, "ctr");
        let parent_facts = facts(&serve, "ctr");

        // An attachment streaming the parent's output across the fork.
        let mut streaming = serve.cli();
        streaming
            .args(["attach", "ctr", "--no-stdin"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let streaming = procs.spawn(&mut streaming).unwrap();
        // Input in flight to the parent while it forks: bytes of the
        // parent's serial connection that the children find in their UART.
        let mut feeder = serve.cli();
        feeder
            .args(["exec", "-i", "ctr", "--", "sh", "-c", "cat > /dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut feeder = procs.spawn(&mut feeder).unwrap();
        let mut input = feeder.child().stdin.take().unwrap();
        let feeding = std::sync::Arc::new(AtomicBool::new(true));
        let feed = {
            let feeding = feeding.clone();
            std::thread::spawn(move || {
                let chunk = [b'x'; 512];
                while feeding.load(Ordering::Relaxed) && input.write_all(&chunk).is_ok() {
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(1500));
        let before_fork = *counter(&text(&serve.run_cli(&["logs", "ctr"])))
            .last()
            .unwrap();

        let asked = Instant::now();
        let forked = serve.run_cli(&["fork", "ctr", "--children", "2"]);
        let fork_took = asked.elapsed();
        let report = String::from_utf8_lossy(&forked.stderr).into_owned();
        feeding.store(false, Ordering::Relaxed);
        assert!(
            forked.status.success(),
            "tetherd fork: {report}\ntetherd:\n{}\nconsole ctr-1:\n{}",
            serve.log(),
            serve.console("ctr-1")
        );
        // Each child's id on stdout as it connected.
        let announced: BTreeSet<String> = text(&forked).lines().map(str::to_owned).collect();
        assert_eq!(
            announced,
            BTreeSet::from(["ctr-1".to_owned(), "ctr-2".to_owned()]),
            "{report}"
        );
        // Parent and children are listed, each its own running container.
        wait_for(&serve, "all three listed", Duration::from_secs(20), || {
            let ls = text(&serve.run_cli(&["ls"]));
            ["ctr ", "ctr-1 ", "ctr-2 "].iter().all(|id| {
                ls.lines()
                    .any(|l| l.starts_with(id) && l.contains(" running "))
            })
        });
        let listed = asked.elapsed();
        let ls = text(&serve.run_cli(&["ls"]));
        for child in ["ctr-1", "ctr-2"] {
            let row = ls
                .lines()
                .find(|l| l.starts_with(&format!("{child} ")))
                .unwrap();
            assert!(row.contains("forked from ctr"), "{ls}");
        }
        eprintln!(
            "fork measurements:\n{report}tetherd fork returned after {:.0} ms; all children listed after {:.0} ms",
            fork_took.as_secs_f64() * 1000.0,
            listed.as_secs_f64() * 1000.0
        );
        // The RAM template is gone once the children mapped it.
        let shm: Vec<String> = std::fs::read_dir(&serve.shm)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            shm.iter().all(|f| !f.contains("template")) && shm.len() == 1,
            "shm holds {shm:?}"
        );

        // Distinct names, MACs, addresses and randomness; clocks on time.
        let all = [
            ("ctr", parent_facts),
            ("ctr-1", facts(&serve, "ctr-1")),
            ("ctr-2", facts(&serve, "ctr-2")),
        ];
        for (id, f) in &all {
            assert_eq!(&f.hostname, id, "{f:?}");
            assert!(
                f.clock > f.host_before - 1.0 && f.clock < f.host_after + 1.0,
                "{id}'s clock is off: {f:?}"
            );
        }
        let distinct = |field: fn(&Facts) -> &str| {
            all.iter()
                .map(|(_, f)| field(f))
                .collect::<BTreeSet<_>>()
                .len()
                == all.len()
        };
        assert!(distinct(|f| &f.mac), "{all:?}");
        assert!(distinct(|f| &f.address), "{all:?}");
        assert!(distinct(|f| &f.random), "{all:?}");
        assert_eq!(all[1].1.address, "10.0.2.16/24", "{all:?}");

        // Each counter runs on and is attachable.
        for id in ["ctr", "ctr-1", "ctr-2"] {
            let seen = attach_for(&serve, &procs, id, Duration::from_millis(2500));
            assert!(seen.len() > 10, "{id}: {seen:?}");
            let before = counter(&text(&serve.run_cli(&["logs", id])));
            std::thread::sleep(Duration::from_millis(600));
            let after = counter(&text(&serve.run_cli(&["logs", id])));
            assert!(
                after.last() > before.last(),
                "{id}'s counter stopped at {:?}",
                before.last()
            );
            assert_no_gaps(id, &after);
        }

        // The attachment that streamed across the fork lost nothing.
        let mut streaming = streaming;
        let _ = streaming.child().kill();
        let streamed = counter(&text(&streaming.wait_with_output().unwrap()));
        assert_eq!(streamed.first(), Some(&0), "replayed from the start");
        assert_no_gaps("the attachment across the fork", &streamed);
        assert!(
            streamed.last().is_some_and(|&n| n > before_fork + 10),
            "the attachment did not go on after the fork (at {before_fork}): {streamed:?}"
        );
        drop(feeder);
        let _ = feed.join();
    });
}

#[test]
fn a_child_whose_recovery_fails_is_reported_failed_and_the_parent_forks_again_at_once() {
    let _one = serial();
    let Some(files) = available("QEMU VM tests", prerequisites()) else {
        return;
    };
    with_timeout(LIMIT, move |procs| {
        let serve = VmServe::start(&procs, &files, "tcg");
        boot_counter(&serve, "db");
        // A valid DNS name (RFC 1123) that Linux refuses: host names are at
        // most 64 bytes there, so the child's `names` step fails.
        let long = format!("{}.{}", "a".repeat(40), "b".repeat(40));
        let forked = serve.run_cli(&[
            "fork",
            "db",
            "--children",
            "1",
            "--name",
            "db-bad",
            "--hostname",
            &long,
            "--timeout",
            "30s",
        ]);
        let report = String::from_utf8_lossy(&forked.stderr).into_owned();
        assert_eq!(forked.status.code(), Some(1), "{report}\n{}", serve.log());
        assert!(text(&forked).is_empty(), "no child connected: {report}");
        assert!(
            report.contains("db-bad failed") && report.contains("sethostname"),
            "{report}"
        );
        // Forked again at once: the parent resumed a moment ago and its clock
        // refinement may still be waiting for the RTC's update (it held
        // /dev/rtc0, which admits one opener, and children failed `clock:
        // Device or resource busy`).
        let again = serve.run_cli(&["fork", "db", "--children", "1", "--name", "db-again"]);
        let report = String::from_utf8_lossy(&again.stderr).into_owned();
        let console = |id: &str| {
            std::fs::read_to_string(serve.state.join(format!("vms/{id}/console.log")))
                .unwrap_or_default()
        };
        assert!(
            again.status.success(),
            "{report}\n{}\ndb's console:\n{}\ndb-bad's console:\n{}",
            serve.log(),
            console("db"),
            console("db-bad")
        );
        assert_eq!(text(&again).trim(), "db-again", "{report}");
        let (_, child) = serve.http("GET", "/v1/containers/db-again", None);
        assert_eq!(child["state"], "running", "{child}");
        // Listed and recorded with the reason; not running half-configured.
        let (status, view) = serve.http("GET", "/v1/containers/db-bad", None);
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["forked_from"], "db", "{view}");
        assert_ne!(view["state"], "running", "{view}");
        assert!(
            view["fork_failure"]
                .as_str()
                .unwrap_or("")
                .starts_with("names: "),
            "{view}"
        );
        let ls = text(&serve.run_cli(&["ls"]));
        assert!(ls.contains("fork of db failed: names:"), "{ls}");
        let record = std::fs::read_to_string(serve.state.join("containers/db-bad/record.json"))
            .expect("the failed child's record");
        assert!(record.contains("\"fork_failure\": \"names: "), "{record}");
        // The parent is untouched by its child's failure: still its own,
        // still counting.
        let before = counter(&text(&serve.run_cli(&["logs", "db"])));
        std::thread::sleep(Duration::from_millis(600));
        let after = counter(&text(&serve.run_cli(&["logs", "db"])));
        assert!(after.last() > before.last(), "db stopped counting");
        assert_no_gaps("db", &after);
        let (_, parent) = serve.http("GET", "/v1/containers/db", None);
        assert_eq!(parent["state"], "running", "{parent}");
        assert!(parent.get("forked_from").is_none(), "{parent}");
        // The failed child's VM is a VM like any other: rm -f removes it.
        let out = serve.run_cli(&["rm", "-f", "db-bad", "db-again"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}
