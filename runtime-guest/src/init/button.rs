//! The ACPI power button: a hypervisor's "shut down" (QEMU's
//! `system_powerdown`, which `tetherd stop` presses when the guest is not
//! linked) stops the container as SIGTERM to tether would, so the primary
//! gets its stop signal and the VM powers off when it exits. The button is
//! an input device (`button` and `evdev` modules) that reports KEY_POWER.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use futures_lite::AsyncReadExt;
use proto_core::tether::Signal;
use smol::Async;
use tracing::{info, warn};

use crate::guest::Guest;

/// The name the kernel gives the ACPI power button's input device.
const POWER_BUTTON: &str = "Power Button";
/// `struct input_event` on 64-bit Linux: a timeval, type, code, value.
const EVENT_LEN: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

/// The event devices of power buttons under `sys`, as paths under `dev`.
pub fn find(sys: &Path, dev: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(sys.join("class/input")) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("device/name"))
                .is_ok_and(|name| name.trim() == POWER_BUTTON)
        })
        .map(|e| dev.join("input").join(e.file_name()))
        .collect();
    found.sort();
    found
}

/// Whether one `input_event` is the power key going down.
pub fn is_power_press(event: &[u8; EVENT_LEN]) -> bool {
    let kind = u16::from_ne_bytes([event[16], event[17]]);
    let code = u16::from_ne_bytes([event[18], event[19]]);
    let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

/// Watches every power button for a press; each press forwards SIGTERM to
/// the primary session.
pub fn watch(guest: &Rc<Guest>, sys: &Path, dev: &Path) {
    for path in find(sys, dev) {
        let g = guest.clone();
        guest.spawn(async move {
            if let Err(e) = watch_one(&g, &path).await {
                warn!("power button {}: {e}", path.display());
            }
        });
    }
}

async fn watch_one(guest: &Guest, path: &Path) -> io::Result<()> {
    let mut device = Async::new(File::open(path)?)?;
    let mut event = [0u8; EVENT_LEN];
    loop {
        device.read_exact(&mut event).await?;
        if is_power_press(&event) {
            info!("the power button was pressed: stopping the container");
            guest.forward_to_primary(Signal::TERM);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> [u8; EVENT_LEN] {
        let mut e = [0u8; EVENT_LEN];
        e[16..18].copy_from_slice(&kind.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_the_power_key_going_down_counts() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(EV_KEY, 30, 1)), "another key");
        assert!(!is_power_press(&event(0, 0, 0)), "a sync event");
    }

    #[test]
    fn power_buttons_are_found_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        for (event, name) in [("event0", "Power Button\n"), ("event1", "AT Keyboard\n")] {
            let d = sys.join("class/input").join(event).join("device");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), name).unwrap();
        }
        let found = find(&sys, Path::new("/dev"));
        assert_eq!(found, [PathBuf::from("/dev/input/event0")]);
    }
}
