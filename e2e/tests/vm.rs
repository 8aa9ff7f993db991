//! Containers in real VMs: `tetherd serve` boots QEMU with Debian's kernel
//! and tether's initramfs, the guest links back over its serial port, and
//! `tetherd run`, the API, `stop` and `rm` work on it. Each boot takes
//! seconds under TCG, so the tests are few and run one at a time.

use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e::vm::{VmServe, prerequisites, vm_of};
use e2e::{available, with_timeout};

const LIMIT: Duration = Duration::from_secs(240);
/// How long a VM may take to boot and link under TCG on a busy machine.
const BOOT: Duration = Duration::from_secs(90);

/// One VM test at a time: the machine has few cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn tetherd_run_boots_a_vm_and_exits_with_the_commands_code() {
    let _one = serial();
    let Some(files) = available("QEMU VM tests", prerequisites()) else {
        return;
    };
    with_timeout(LIMIT, move |procs| {
        // `auto` probes KVM for real (it falls back to TCG where KVM is broken).
        let serve = VmServe::start(&procs, &files, "auto");
        let started = Instant::now();
        let out = serve.run_cli(&[
            "run",
            "--name",
            "hello",
            "--timing",
            "--",
            "sh",
            "-c",
            "echo hello; exit 7",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello\n",
            "stderr: {stderr}\nconsole:\n{}\ntetherd:\n{}",
            serve.console("hello"),
            serve.log()
        );
        assert_eq!(out.status.code(), Some(7), "stderr: {stderr}");
        assert!(stderr.contains("hello booted in"), "{stderr}");
        eprintln!(
            "tetherd run took {:.1} s in all",
            started.elapsed().as_secs_f64()
        );
        // The guest powers off by itself once the primary's exit is reported.
        let node = serve.wait_node("QEMU exits on its own", Duration::from_secs(30), |n| {
            vm_of(n, "hello").is_some_and(|v| v["state"] == "exited")
        });
        let vm = vm_of(&node, "hello").unwrap();
        assert_eq!(vm["exit"]["code"], 0, "QEMU was not killed: {vm}");
        assert!(node["accel"] == "kvm" || node["accel"] == "tcg", "{node}");
        let (status, view) = serve.http("GET", "/v1/containers/hello", None);
        assert_eq!((status, &view["exit_code"]), (200, &serde_json::json!(7)));
    });
}

#[test]
fn the_node_reports_a_running_vm_and_a_term_through_the_api_reaches_its_trap() {
    let _one = serial();
    let Some(files) = available("QEMU VM tests", prerequisites()) else {
        return;
    };
    with_timeout(LIMIT, move |procs| {
        let serve = VmServe::start(&procs, &files, "tcg");
        let body = serde_json::json!({
            "name": "trap",
            "cmd": ["sh", "-c", "trap 'echo got-term; exit 143' TERM; echo ready; sleep 1000 & wait"],
            "cpus": 1,
            "memory_mib": 192,
            "net": "user",
        });
        let (status, created) = serve.http("POST", "/v1/containers", Some(&body.to_string()));
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["id"], "trap");
        let node = serve.wait_node("the VM runs", BOOT, |n| {
            vm_of(n, "trap").is_some_and(|v| v["state"] == "running")
        });
        assert_eq!(node["vms_running"], 1, "{node}");
        assert_eq!(
            (&node["vm_cpus"], &node["vm_memory_mib"]),
            (&1.into(), &192.into())
        );
        assert!(
            node["cpus"].as_u64().unwrap() >= 1
                && node["memory_available_mib"].as_u64().unwrap() > 0
        );
        assert_eq!(node["accel"], "tcg");
        // An attachment from the first byte; the guest stays up until it has
        // delivered the exit.
        let mut attach = serve.cli();
        attach
            .args(["attach", "trap", "--no-stdin"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let attach = procs.spawn(&mut attach).unwrap();
        let end = Instant::now() + Duration::from_secs(30);
        while !String::from_utf8_lossy(&serve.run_cli(&["logs", "trap"]).stdout).contains("ready") {
            assert!(
                Instant::now() < end,
                "no \"ready\"; console:\n{}",
                serve.console("trap")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let (status, sent) = serve.http("POST", "/v1/containers/trap/signal?signal=TERM", None);
        assert_eq!(status, 200, "{sent}");
        let (status, waited) = serve.http("GET", "/v1/containers/trap/wait", None);
        assert_eq!(
            (status, &waited["exit_code"]),
            (200, &serde_json::json!(143)),
            "{waited}"
        );
        let attached = attach.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&attached.stdout),
            "ready\ngot-term\n"
        );
        assert_eq!(
            attached.status.code(),
            Some(143),
            "{}",
            String::from_utf8_lossy(&attached.stderr)
        );
        serve.wait_node("QEMU exits on its own", Duration::from_secs(30), |n| {
            vm_of(n, "trap").is_some_and(|v| v["state"] == "exited" && v["exit"]["code"] == 0)
        });
    });
}

#[test]
fn stop_powers_a_vm_down_and_rm_removes_it() {
    let _one = serial();
    let Some(files) = available("QEMU VM tests", prerequisites()) else {
        return;
    };
    with_timeout(LIMIT, move |procs| {
        let serve = VmServe::start(&procs, &files, "tcg");
        // Requests that name what is wrong, before anything boots.
        for (body, needle) in [
            (r#"{"cmd": []}"#, "field `cmd`"),
            (r#"{"cmd": ["sh"], "cpus": 0}"#, "field `cpus`"),
            (r#"{"cmd": ["sh"], "net": "bridge"}"#, "field `net`"),
            (r#"{"cmd": ["sh"], "name": "a/b"}"#, "field `name`"),
        ] {
            let (status, err) = serve.http("POST", "/v1/containers", Some(body));
            assert_eq!(status, 400, "{body}: {err}");
            assert!(
                err["error"].as_str().unwrap_or("").contains(needle),
                "{body}: {err}"
            );
        }
        let out = serve.run_cli(&["run", "-d", "--name", "sleeper", "--", "sleep", "1000"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "sleeper",
            "{out:?}"
        );
        let (status, err) = serve.http(
            "POST",
            "/v1/containers",
            Some(r#"{"name": "sleeper", "cmd": ["true"]}"#),
        );
        assert_eq!(status, 409, "{err}");
        serve.wait_node("the VM runs", BOOT, |n| {
            vm_of(n, "sleeper").is_some_and(|v| v["state"] == "running")
        });
        let rm = serve.run_cli(&["rm", "sleeper"]);
        assert!(
            !rm.status.success(),
            "a running VM is not removed without -f"
        );
        assert!(
            String::from_utf8_lossy(&rm.stderr).contains("stop it first"),
            "{rm:?}"
        );
        let (status, stopped) = serve.http("POST", "/v1/containers/sleeper/stop?grace=30s", None);
        assert_eq!(status, 200, "{stopped}");
        assert_eq!(
            stopped["killed"],
            false,
            "the guest powers off on the ACPI power button: {stopped}\nconsole:\n{}",
            serve.console("sleeper")
        );
        let (_, view) = serve.http("GET", "/v1/containers/sleeper", None);
        assert_eq!(view["exit_code"], 143, "the primary got SIGTERM: {view}");
        let rm = serve.run_cli(&["rm", "sleeper"]);
        assert!(rm.status.success(), "{rm:?}");
        assert!(!serve.state.join("vms/sleeper").exists());
        let (_, node) = serve.http("GET", "/v1/node", None);
        assert!(vm_of(&node, "sleeper").is_none(), "{node}");
        let (status, _) = serve.http("GET", "/v1/containers/sleeper", None);
        assert_eq!(status, 404, "rm forgets the container");
    });
}
