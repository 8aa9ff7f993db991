//! The guest config of a VM's container (what tether reads from fw_cfg), and
//! the names a VM gets: a generated id, a stable MAC.

use proto_core::{PrivateKey, PublicKey};
use rand_core::{OsRng, RngCore};

use super::request::{CreateRequest, NetMode};

/// How long a VM's guest keeps serving after its primary exited (tether's
/// `exit_linger`; the default 30 s would keep an exited VM's memory that long).
const EXIT_LINGER: &str = "5s";

/// A generated container id: `c` and 10 hex digits.
pub fn generated_id() -> String {
    format!("c{:010x}", OsRng.next_u64() & 0xff_ffff_ffff)
}

/// The MAC of the VM's `n`-th extra NIC (`nics[n]`) when the request gives none.
pub fn extra_mac(id: &str, n: usize) -> String {
    mac_for(&format!("{id}/nic{n}"))
}

/// A locally administered MAC in QEMU's range, stable for an id.
pub fn mac_for(id: &str) -> String {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[5], b[6], b[7])
}

/// The guest config of a VM's container: a fresh host key, the appliance's
/// key authorized, the link on ttyS0, one primary session.
pub fn guest_config(
    id: &str,
    appliance: &PublicKey,
    host_key: &PrivateKey,
    request: &CreateRequest,
    mac: &str,
) -> serde_json::Value {
    let mut config = crate::server_commands::guest_config_json(
        id,
        appliance,
        host_key,
        "serial:/dev/ttyS0",
        request.tty,
        &request.cmd,
    );
    // The VM powers off once tether exits: linger only briefly for late
    // readers of the output (an attached `run` has read it by then).
    config["exit_linger"] = EXIT_LINGER.into();
    let session = &mut config["sessions"][0];
    session["stdin"] = request.stdin.into();
    if request.start_gated {
        session["start_gated"] = true.into();
        session["start_gate_timeout"] = super::request::START_GATE_TIMEOUT.into();
    }
    if !request.env.is_empty() {
        session["env"] = serde_json::json!(request.env);
    }
    if is_hostname(id) {
        config["hostname"] = id.into();
    }
    if request.net == NetMode::User {
        // QEMU user networking's fixed addresses: no DHCP round trip at boot.
        config["networks"] = serde_json::json!([{
            "name": "eth0",
            "mac": mac,
            "addresses": ["10.0.2.15/24"],
            "gateway": "10.0.2.2",
        }]);
    }
    // The request's OS configuration goes in as written; the guest checks it.
    for (key, value) in request.guest.iter().flatten() {
        config[key] = value.clone();
    }
    if request.rootfs.is_some() {
        config["rootfs"] = serde_json::json!({
            "source": "9p:rootfs",
            "fstype": "9p",
            "options": ["trans=virtio", "version=9p2000.L", "msize=262144"],
        });
    } else if request.disk.is_some() {
        config["rootfs"] = serde_json::json!({
            "source": "/dev/vda",
            "fstype": "ext4",
            "options": [],
        });
    }
    config
}

pub fn is_hostname(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}
