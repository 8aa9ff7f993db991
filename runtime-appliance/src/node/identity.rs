//! What makes each VM tetherd starts its own (docs/PROTOCOL.md 4.5): the
//! identity handed over through fw_cfg `opt/tether/identity` (a generation
//! unique to the VM, its container id, host name, a random nonce, its NICs),
//! and a fresh vmgenid GUID. A booted VM's NICs take DHCP; a fork's child
//! gets a static address of its own, because QEMU user networking restores
//! the parent's DHCP server state and would lease every child the parent's.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use fork::{Addressing, Identity, Nic, Role};
use rand_core::{OsRng, RngCore};

use super::guest_config::is_hostname;
use super::state::write_private;
use crate::api_types::ApiError;

/// The highest child number: a child's address on each user network is
/// `.15 + n`, below QEMU's DNS-free top of the /24.
pub const MAX_CHILD: u32 = 200;

/// A generation no other VM has (random, never 0).
pub fn generation() -> u64 {
    OsRng.next_u64().max(1)
}

/// A random version-4 UUID for `-device vmgenid,guid=`.
pub fn vmgenid() -> String {
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    uuid::Builder::from_random_bytes(b)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// `52:54:00:12:34:56` as bytes (the request checks vetted the form).
fn mac_bytes(mac: &str) -> Result<[u8; 6], ApiError> {
    let parts: Vec<u8> = mac
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| ApiError::Internal(format!("{mac:?} is not a MAC address")))?;
    parts
        .try_into()
        .map_err(|_| ApiError::Internal(format!("{mac:?} is not a MAC address")))
}

/// A host name for container `id`: the id, or its letters, digits and
/// dashes when it has other characters.
pub fn hostname_for(id: &str) -> String {
    if is_hostname(id) {
        return id.to_owned();
    }
    let cleaned: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let trimmed = cleaned.trim_matches('-');
    if trimmed.is_empty() {
        "container".into()
    } else {
        trimmed.to_owned()
    }
}

/// The static address of child `n` on the `i`-th user network (10.0.(2+i).0/24,
/// router .2) and that network's gateway.
pub fn child_address(i: usize, n: u32) -> (IpAddr, IpAddr) {
    let net = (2 + i).min(254) as u8;
    let host = (15 + n.min(MAX_CHILD)) as u8;
    (
        IpAddr::V4(Ipv4Addr::new(10, 0, net, host)),
        IpAddr::V4(Ipv4Addr::new(10, 0, net, 2)),
    )
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    OsRng.fill_bytes(&mut n);
    n
}

/// A booted VM's identity: its NICs take DHCP.
pub fn booted(id: &str, hostname: &str, macs: &[String]) -> Result<Identity, ApiError> {
    Ok(Identity {
        generation: generation(),
        role: Role::Booted,
        id: Some(id.to_owned()),
        hostname: Some(hostname.to_owned()),
        nonce: Some(nonce()),
        nics: macs
            .iter()
            .map(|m| {
                Ok(Nic {
                    mac: mac_bytes(m)?,
                    addressing: Addressing::Dhcp,
                })
            })
            .collect::<Result<_, ApiError>>()?,
    })
}

/// Child `n` of `parent`: container `id`, a static address per NIC.
pub fn child(
    parent: &str,
    id: &str,
    n: u32,
    hostname: &str,
    macs: &[String],
) -> Result<Identity, ApiError> {
    Ok(Identity {
        generation: generation(),
        role: Role::Child {
            parent: parent.to_owned(),
            n,
        },
        id: Some(id.to_owned()),
        hostname: Some(hostname.to_owned()),
        nonce: Some(nonce()),
        nics: macs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let (address, gateway) = child_address(i, n);
                Ok(Nic {
                    mac: mac_bytes(m)?,
                    addressing: Addressing::Static {
                        address,
                        prefix: 24,
                        gateway: Some(gateway),
                    },
                })
            })
            .collect::<Result<_, ApiError>>()?,
    })
}

/// Writes `identity` to `path` as the guest reads it: padded to 1024 bytes.
pub fn write(path: &Path, identity: &Identity) -> Result<(), ApiError> {
    let bytes = identity.to_padded().ok_or_else(|| {
        ApiError::BadRequest(format!(
            "the VM identity of {} does not fit in {} bytes (too many NICs or too long a name)",
            identity.id.as_deref().unwrap_or("?"),
            fork::IDENTITY_SIZE
        ))
    })?;
    write_private(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_follow_the_contract_and_parse_back() {
        let macs = vec![
            "52:54:00:12:34:56".to_owned(),
            "52:54:00:ab:cd:ef".to_owned(),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity");
        let booted = booted("web", "web", &macs).unwrap();
        write(&path, &booted).unwrap();
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(raw.len(), 1024);
        let back = Identity::parse(&raw).unwrap();
        assert_eq!(back, booted);
        assert!(back.nics.iter().all(|n| n.addressing == Addressing::Dhcp));

        let child = child("web", "web-2", 2, "web-2", &macs).unwrap();
        write(&path, &child).unwrap();
        let back = Identity::parse(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            back.role,
            Role::Child {
                parent: "web".into(),
                n: 2
            }
        );
        assert_ne!(back.generation, booted.generation);
        assert_ne!(back.nonce, booted.nonce);
        assert_eq!(back.hostname.as_deref(), Some("web-2"));
        assert_eq!(
            back.nics[1].addressing,
            Addressing::Static {
                address: "10.0.3.17".parse().unwrap(),
                prefix: 24,
                gateway: Some("10.0.3.2".parse().unwrap()),
            }
        );
        assert_eq!(back.nics[0].mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    }

    #[test]
    fn vmgenids_are_fresh_uuids_and_hostnames_are_clean() {
        let (a, b) = (vmgenid(), vmgenid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_eq!(hostname_for("web_1.a"), "web-1-a");
        assert_eq!(hostname_for("..."), "container");
        assert_eq!(hostname_for("db-3"), "db-3");
    }

    #[test]
    fn too_many_nics_is_a_clear_error() {
        let macs = vec!["52:54:00:12:34:56".to_owned(); 40];
        let identity = child("web", "web-1", 1, "web-1", &macs).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = write(&dir.path().join("i"), &identity).unwrap_err();
        assert!(err.to_string().contains("1024 bytes"), "{err}");
    }
}
