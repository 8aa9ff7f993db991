//! Hotplug: what PID 1 does with a device that appears. CPUs and memory
//! blocks are put online (the hypervisor added them to be used); a network
//! device goes to the network part; a disk needs nothing here (mounts waiting
//! for it find it in the device record).

use std::io;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::Network;
use super::uevent::Uevent;

/// What an event asks of PID 1.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Write `1` to this CPU's `online` file.
    OnlineCpu(PathBuf),
    /// Put this memory block (its sysfs directory) online.
    OnlineMemory(PathBuf),
    /// A network device appeared.
    NetDevice,
    /// Nothing to do.
    Nothing,
}

/// Decides what `event` asks for; `sys` is where sysfs is mounted.
pub fn action_for(event: &Uevent, sys: &Path) -> Action {
    if event.action != "add" {
        return Action::Nothing;
    }
    let dir = sys.join(event.devpath.trim_start_matches('/'));
    match event.subsystem.as_str() {
        "cpu" if is_numbered(&event.devpath, "/devices/system/cpu/cpu") => {
            Action::OnlineCpu(dir.join("online"))
        }
        "memory" if is_numbered(&event.devpath, "/devices/system/memory/memory") => {
            Action::OnlineMemory(dir)
        }
        "net" => Action::NetDevice,
        _ => Action::Nothing,
    }
}

fn is_numbered(devpath: &str, prefix: &str) -> bool {
    devpath
        .strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Acts on one device event.
pub fn handle(event: &Uevent, sys: &Path, network: &dyn Network) {
    match action_for(event, sys) {
        Action::OnlineCpu(file) => match online_cpu(&file) {
            Ok(true) => info!("CPU {} is online", event.devpath),
            Ok(false) => {}
            Err(e) => warn!("cannot put CPU {} online: {e}", event.devpath),
        },
        Action::OnlineMemory(dir) => match online_memory_block(&dir) {
            Ok(true) => info!("memory block {} is online", event.devpath),
            Ok(false) => {}
            Err(e) => warn!("cannot put memory block {} online: {e}", event.devpath),
        },
        Action::NetDevice => network.device_added(event),
        Action::Nothing => {}
    }
}

/// Puts every offline CPU and memory block online (ones added before the
/// listener started). Returns how many it changed.
pub fn online_present(sys: &Path) -> usize {
    let mut changed = 0;
    let cpus = sys.join("devices/system/cpu");
    for entry in numbered_dirs(&cpus, "cpu") {
        // cpu0 usually has no `online` file: it cannot go offline.
        if online_cpu(&entry.join("online")).unwrap_or(false) {
            changed += 1;
        }
    }
    let memory = sys.join("devices/system/memory");
    for entry in numbered_dirs(&memory, "memory") {
        if online_memory_block(&entry).unwrap_or(false) {
            changed += 1;
        }
    }
    changed
}

fn numbered_dirs(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name().to_str().is_some_and(|n| {
                n.strip_prefix(prefix)
                    .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        .map(|e| e.path())
        .collect()
}

/// Writes `1` to a CPU's `online` file if it reads `0`; true if it did.
fn online_cpu(online: &Path) -> io::Result<bool> {
    let now = std::fs::read_to_string(online)?;
    if now.trim() != "0" {
        return Ok(false);
    }
    std::fs::write(online, "1")?;
    Ok(true)
}

/// Puts a memory block online if its `state` reads `offline`; true if it did.
fn online_memory_block(dir: &Path) -> io::Result<bool> {
    let state = std::fs::read_to_string(dir.join("state"))?;
    if state.trim() != "offline" {
        return Ok(false);
    }
    std::fs::write(dir.join("state"), "online")?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn event(action: &str, subsystem: &str, devpath: &str) -> Uevent {
        Uevent {
            action: action.into(),
            devpath: devpath.into(),
            subsystem: subsystem.into(),
            vars: BTreeMap::new(),
        }
    }

    #[test]
    fn added_cpus_and_memory_go_online_and_nics_to_the_network() {
        let sys = Path::new("/sys");
        assert_eq!(
            action_for(&event("add", "cpu", "/devices/system/cpu/cpu3"), sys),
            Action::OnlineCpu("/sys/devices/system/cpu/cpu3/online".into())
        );
        assert_eq!(
            action_for(
                &event("add", "memory", "/devices/system/memory/memory40"),
                sys
            ),
            Action::OnlineMemory("/sys/devices/system/memory/memory40".into())
        );
        assert_eq!(
            action_for(
                &event(
                    "add",
                    "net",
                    "/devices/pci0000:00/0000:00:03.0/virtio0/net/eth0"
                ),
                sys
            ),
            Action::NetDevice
        );
        for (action, subsystem, devpath) in [
            ("remove", "cpu", "/devices/system/cpu/cpu3"),
            ("add", "block", "/devices/virtual/block/loop0"),
            ("add", "cpu", "/devices/system/cpu/cpufreq"),
            ("online", "memory", "/devices/system/memory/memory40"),
        ] {
            assert_eq!(
                action_for(&event(action, subsystem, devpath), sys),
                Action::Nothing
            );
        }
    }

    #[test]
    fn offline_cpus_and_memory_blocks_present_are_put_online() {
        let sys = tempfile::tempdir().unwrap();
        let cpu = |n: u32| sys.path().join(format!("devices/system/cpu/cpu{n}"));
        let mem = |n: u32| sys.path().join(format!("devices/system/memory/memory{n}"));
        for (dir, file, value) in [
            (cpu(0), "", ""),
            (cpu(1), "online", "1\n"),
            (cpu(2), "online", "0\n"),
            (mem(0), "state", "online\n"),
            (mem(8), "state", "offline\n"),
        ] {
            std::fs::create_dir_all(&dir).unwrap();
            if !file.is_empty() {
                std::fs::write(dir.join(file), value).unwrap();
            }
        }
        std::fs::create_dir_all(sys.path().join("devices/system/cpu/cpuidle")).unwrap();
        assert_eq!(online_present(sys.path()), 2);
        assert_eq!(std::fs::read_to_string(cpu(2).join("online")).unwrap(), "1");
        assert_eq!(
            std::fs::read_to_string(mem(8).join("state")).unwrap(),
            "online"
        );
        assert_eq!(
            std::fs::read_to_string(cpu(1).join("online")).unwrap(),
            "1\n"
        );
    }
}
