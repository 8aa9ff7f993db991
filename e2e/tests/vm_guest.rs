//! tether as a VM's PID 1, seen from inside and from tetherd: the OS its
//! config describes (names, /etc files, NICs by MAC with static addresses,
//! routes and DHCP, a labelled disk, a secret on tmpfs), orphans reaped, a bad
//! config reported on the console and the link before the VM powers off, and
//! devices hotplugged through QMP (a NIC, a disk, a CPU). Each test boots one
//! VM under TCG, so they run one at a time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e::vm::{QmpSession, VmServe, ext4_image, prerequisites, vm_of};
use e2e::{available, with_timeout};

const LIMIT: Duration = Duration::from_secs(300);

/// One VM at a time: the machine has few cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The lines of `out` that start with `key=`, without it.
fn value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn a_container_vm_is_configured_as_its_config_says() {
    let _one = serial();
    let Some(files) = available("QEMU VM tests", prerequisites()) else {
        return;
    };
    with_timeout(LIMIT, move |procs| {
        let dir = tempfile::tempdir().unwrap();
        let disk = ext4_image(
            dir.path(),
            "data",
            "tdata",
            16,
            &[("hello.txt", "from the disk\n")],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let guest = serde_json::json!({
            "hosts": [{"ip": "10.9.9.9", "names": ["db.internal"]}],
            "dns": {"nameservers": ["10.0.2.3"], "search": ["example.test"]},
            "networks": [
                {"name": "eth0", "mac": "52:54:00:aa:00:01", "addresses": ["10.0.2.15/24"],
                 "gateway": "10.0.2.2", "routes": [{"to": "10.77.0.0/16", "via": "10.0.2.1"}]},
                {"name": "eth1", "mac": "52:54:00:aa:00:02", "dhcp": true}
            ],
            "mounts": [{"source": "LABEL=tdata", "target": "/data", "fstype": "ext4"}],
            "secrets": [{"path": "/run/secrets/token", "value": "s3cret", "mode": "0400"}]
        });
        let guest_path = dir.path().join("guest.json");
        std::fs::write(&guest_path, guest.to_string()).unwrap();
        let script = r#"
            echo pid1=$(readlink /proc/1/exe) $(/init --version)
            echo host=$(hostname)
            sed 's/^/hosts=/' /etc/hosts
            sed 's/^/resolv=/' /etc/resolv.conf
            echo eth0=$(ip -4 -o addr show dev eth0 | awk '{print $4}')
            echo eth1=$(ip -4 -o addr show dev eth1 | awk '{print $4}')
            ip route | sed 's/^/route=/'
            echo data=$(grep ' /data ' /proc/mounts | awk '{print $1, $3}') $(cat /data/hello.txt)
            echo secret=$(stat -c %a /run/secrets/token) $(stat -f -c %T /run/secrets) $(cat /run/secrets/token)
            i=0; while [ $i -lt 100 ]; do sh -c 'sleep 0.3 &'; i=$((i+1)); done
            sleep 3
            echo zombies=$(grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l)
        "#;
        let serve = VmServe::start(&procs, &files, "tcg");
        let out = serve.run_cli(&[
            "run",
            "--name",
            "cfg",
            "--hostname",
            "cfgtest",
            "--nic",
            "52:54:00:aa:00:01",
            "--nic",
            "52:54:00:aa:00:02",
            "--add-disk",
            disk.to_str().unwrap(),
            "--guest-config",
            guest_path.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            script,
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let context = format!(
            "stdout:\n{stdout}\nstderr:\n{}\nconsole:\n{}",
            String::from_utf8_lossy(&out.stderr),
            serve.console("cfg")
        );
        assert_eq!(out.status.code(), Some(0), "{context}");
        let pid1 = value(&stdout, "pid1").unwrap_or_default();
        assert!(
            pid1.starts_with("/init tether "),
            "PID 1 is tether: {context}"
        );
        assert_eq!(value(&stdout, "host"), Some("cfgtest"), "{context}");
        let hosts: Vec<&str> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("hosts="))
            .collect();
        assert!(
            hosts
                .iter()
                .any(|l| l.starts_with("127.0.0.1") && l.contains("localhost")),
            "{context}"
        );
        assert!(hosts.iter().any(|l| l.contains("cfgtest")), "{context}");
        assert!(
            hosts
                .iter()
                .any(|l| l.starts_with("10.9.9.9") && l.contains("db.internal")),
            "{context}"
        );
        assert!(stdout.contains("resolv=nameserver 10.0.2.3"), "{context}");
        assert!(stdout.contains("resolv=search example.test"), "{context}");
        assert_eq!(
            value(&stdout, "eth0"),
            Some("10.0.2.15/24"),
            "static, by MAC: {context}"
        );
        assert_eq!(
            value(&stdout, "eth1"),
            Some("10.0.3.15/24"),
            "DHCP: {context}"
        );
        assert!(
            stdout.contains("route=default via 10.0.2.2 dev eth0"),
            "{context}"
        );
        assert!(
            stdout.contains("route=10.77.0.0/16 via 10.0.2.1 dev eth0"),
            "{context}"
        );
        assert_eq!(
            value(&stdout, "data"),
            Some("/dev/vda ext4 from the disk"),
            "labelled disk: {context}"
        );
        assert_eq!(
            value(&stdout, "secret"),
            Some("400 tmpfs s3cret"),
            "{context}"
        );
        assert_eq!(
            value(&stdout, "zombies"),
            Some("0"),
            "orphans reaped: {context}"
        );
        // The VM powers itself off once the exit is reported.
        let node = serve.wait_node("QEMU exits on its own", Duration::from_secs(60), |n| {
            vm_of(n, "cfg").is_some_and(|v| v["state"] == "exited")
        });
        assert_eq!(vm_of(&node, "cfg").unwrap()["exit"]["code"], 0);
    });
}

#[test]
fn a_bad_config_powers_the_vm_off_and_says_why_on_the_console_and_the_link() {
    let _one = serial();
    let Some(files) = available("QEMU VM tests", prerequisites()) else {
        return;
    };
    with_timeout(LIMIT, move |procs| {
        let serve = VmServe::start(&procs, &files, "tcg");
        let body = serde_json::json!({
            "name": "bad",
            "cmd": ["sh", "-c", "echo never"],
            "guest": {"mounts": [{"source": "tmpfs", "target": "/x", "fstype": "tmpfs", "colour": 1}]},
        });
        let (status, created) = serve.http("POST", "/v1/containers", Some(&body.to_string()));
        assert_eq!(status, 201, "{created}");
        let node = serve.wait_node("the VM powers off", Duration::from_secs(120), |n| {
            vm_of(n, "bad").is_some_and(|v| v["state"] == "exited")
        });
        assert_eq!(
            vm_of(&node, "bad").unwrap()["exit"]["code"],
            0,
            "powered off by itself, not killed"
        );
        let console = serve.console("bad");
        assert!(
            console.contains("tether: fatal: config mounts[0]") && console.contains("colour"),
            "{console}"
        );
        let log = serve.log();
        assert!(
            log.contains("the guest cannot run") && log.contains("colour"),
            "the FATAL frame reached tetherd: {log}"
        );
    });
}

#[test]
fn hotplugged_nic_disk_and_cpu_are_configured_mounted_and_online() {
    let _one = serial();
    let Some(files) = available("QEMU VM tests", prerequisites()) else {
        return;
    };
    with_timeout(LIMIT, move |procs| {
        let dir = tempfile::tempdir().unwrap();
        let disk = ext4_image(
            dir.path(),
            "hot",
            "hotdisk",
            16,
            &[("hot.txt", "hotplugged\n")],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let serve = VmServe::start(&procs, &files, "tcg");
        let body = serde_json::json!({
            "name": "hot",
            "cmd": ["sh", "-c", "sleep 1000"],
            "max_cpus": 2,
            "guest": {
                "networks": [{"name": "hot0", "mac": "52:54:00:bb:00:01", "addresses": ["10.0.2.15/24"]}],
                "mounts": [{"source": "LABEL=hotdisk", "target": "/hot", "fstype": "ext4", "timeout": "200s"}]
            },
        });
        let (status, created) = serve.http("POST", "/v1/containers", Some(&body.to_string()));
        assert_eq!(status, 201, "{created}");
        // Boot waits for the disk: add it once tether says it is waiting.
        let end = Instant::now() + Duration::from_secs(120);
        while !serve.console("hot").contains("waiting up to") {
            assert!(
                Instant::now() < end,
                "tether never waited: {}",
                serve.console("hot")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut qmp = QmpSession::connect(&serve, "hot", Duration::from_secs(10));
        qmp.execute(
            "blockdev-add",
            serde_json::json!({"node-name": "hotdisk", "driver": "raw",
                "file": {"driver": "file", "filename": disk.to_str().unwrap()}}),
        );
        qmp.execute(
            "device_add",
            serde_json::json!({"driver": "virtio-blk-pci", "id": "hotdisk0", "drive": "hotdisk"}),
        );
        qmp.execute(
            "netdev_add",
            serde_json::json!({"type": "user", "id": "hotnet", "restrict": true}),
        );
        qmp.execute(
            "device_add",
            serde_json::json!({"driver": "virtio-net-pci", "id": "hotnic0",
                "netdev": "hotnet", "mac": "52:54:00:bb:00:01"}),
        );
        let cpus = qmp.execute("query-hotpluggable-cpus", serde_json::json!({}));
        let free = cpus
            .as_array()
            .and_then(|a| a.iter().find(|c| c.get("qom-path").is_none()))
            .unwrap_or_else(|| panic!("no free CPU slot: {cpus}"))
            .clone();
        let mut cpu = free["props"].clone();
        cpu["driver"] = free["type"].clone();
        cpu["id"] = "hotcpu1".into();
        qmp.execute("device_add", cpu);
        // The container comes up once the disk is mounted; look from inside.
        let check = "echo nic=$(ip -4 -o addr show dev hot0 | awk '{print $4}'); \
                     echo disk=$(grep ' /hot ' /proc/mounts | awk '{print $3}') $(cat /hot/hot.txt); \
                     echo cpus=$(cat /sys/devices/system/cpu/online)";
        let end = Instant::now() + Duration::from_secs(120);
        let stdout = loop {
            let out = serve.run_cli(&["exec", "hot", "--", "sh", "-c", check]);
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let done = value(&stdout, "cpus") == Some("0-1")
                && value(&stdout, "nic") == Some("10.0.2.15/24");
            if done || Instant::now() > end {
                break stdout;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let context = format!("{stdout}\nconsole:\n{}", serve.console("hot"));
        assert_eq!(value(&stdout, "nic"), Some("10.0.2.15/24"), "{context}");
        assert_eq!(value(&stdout, "disk"), Some("ext4 hotplugged"), "{context}");
        assert_eq!(value(&stdout, "cpus"), Some("0-1"), "{context}");
        let (status, _) = serve.http("POST", "/v1/containers/hot/stop", None);
        assert_eq!(status, 200);
    });
}

#[test]
fn the_primary_runs_inside_a_root_filesystem_shared_over_9p() {
    let _one = serial();
    let Some(files) = available("QEMU VM tests", prerequisites()) else {
        return;
    };
    let busybox = match which("busybox") {
        Some(b) => b,
        None => {
            e2e::require_or_skip("the 9p rootfs test", "busybox is not installed");
            return;
        }
    };
    with_timeout(LIMIT, move |procs| {
        // A root filesystem of its own: busybox and a marker file.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
        for applet in ["sh", "cat", "readlink", "ls"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        std::fs::write(root.join("etc/marker"), "inside the rootfs\n").unwrap();
        let serve = VmServe::start(&procs, &files, "tcg");
        let out = serve.run_cli(&[
            "run",
            "--name",
            "rooted",
            "--rootfs",
            root.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/marker; ls /init 2>&1 | head -1; echo mounts=$(cat /proc/mounts | wc -l)",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let context = format!(
            "stdout:\n{stdout}\nstderr:\n{}\nconsole:\n{}",
            String::from_utf8_lossy(&out.stderr),
            serve.console("rooted")
        );
        assert_eq!(out.status.code(), Some(0), "{context}");
        assert!(stdout.starts_with("inside the rootfs\n"), "{context}");
        assert!(
            stdout.contains("No such file"),
            "the initramfs is out of sight: {context}"
        );
        // /proc works inside (it was moved in with /dev and /sys).
        assert!(
            value(&stdout, "mounts").is_some_and(|n| n != "0"),
            "{context}"
        );
    });
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.is_file())
}
