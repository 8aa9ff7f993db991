//! Filesystem identity from a device's superblock: type, label and UUID, read
//! the way blkid does but only for the filesystems a container disk uses
//! (ext2/3/4, XFS, btrfs). There is no udev in the VM, so no
//! `/dev/disk/by-label`: `LABEL=` and `UUID=` mounts are resolved with this.

use std::io::{self, Read};
use std::path::Path;

/// What a superblock says about its filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The type to mount it as (`ext4` also mounts ext2 and ext3).
    pub fstype: &'static str,
    pub label: Option<String>,
    /// Lower-case `8-4-4-4-12` hex.
    pub uuid: Option<String>,
}

/// Bytes read from the start of a device: enough for every superblock here
/// (btrfs keeps its own at 64 KiB).
const PROBE_LEN: usize = BTRFS_AT + 0x1000;
const EXT_AT: usize = 1024;
const BTRFS_AT: usize = 0x10000;

/// Reads a device's (or an image file's) superblock.
pub fn probe_path(path: &Path) -> io::Result<Option<Identity>> {
    let mut head = Vec::with_capacity(PROBE_LEN);
    std::fs::File::open(path)?
        .take(PROBE_LEN as u64)
        .read_to_end(&mut head)?;
    Ok(identify(&head))
}

/// Identifies a filesystem from the first bytes of its device.
pub fn identify(head: &[u8]) -> Option<Identity> {
    ext(head).or_else(|| xfs(head)).or_else(|| btrfs(head))
}

fn ext(head: &[u8]) -> Option<Identity> {
    let sb = head.get(EXT_AT..EXT_AT + 1024)?;
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return None;
    }
    Some(Identity {
        fstype: "ext4",
        label: text(&sb[0x78..0x88]),
        uuid: uuid(&sb[0x68..0x78]),
    })
}

fn xfs(head: &[u8]) -> Option<Identity> {
    let sb = head.get(..512)?;
    if &sb[..4] != b"XFSB" {
        return None;
    }
    Some(Identity {
        fstype: "xfs",
        label: text(&sb[108..120]),
        uuid: uuid(&sb[32..48]),
    })
}

fn btrfs(head: &[u8]) -> Option<Identity> {
    let sb = head.get(BTRFS_AT..BTRFS_AT + 0x1000)?;
    if &sb[0x40..0x48] != b"_BHRfS_M" {
        return None;
    }
    Some(Identity {
        fstype: "btrfs",
        label: text(&sb[0x12b..0x12b + 256]),
        uuid: uuid(&sb[0x20..0x30]),
    })
}

/// A NUL-padded label; none when empty.
fn text(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let s = String::from_utf8_lossy(&bytes[..end]).into_owned();
    (!s.is_empty()).then_some(s)
}

/// A 16-byte UUID as text; none when all zero.
fn uuid(bytes: &[u8]) -> Option<String> {
    let id = uuid::Uuid::from_slice(bytes).ok()?;
    (!id.is_nil()).then(|| id.hyphenated().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: [u8; 16] = [
        0x1b, 0x4e, 0x28, 0xba, 0x2f, 0xa1, 0x11, 0xd2, 0x88, 0x3f, 0x00, 0x16, 0xd3, 0xcc, 0x42,
        0x7e,
    ];

    #[test]
    fn an_ext4_superblock_gives_label_and_uuid() {
        let mut head = vec![0u8; 4096];
        head[1024 + 0x38..1024 + 0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        head[1024 + 0x68..1024 + 0x78].copy_from_slice(&UUID);
        head[1024 + 0x78..1024 + 0x7c].copy_from_slice(b"data");
        assert_eq!(
            identify(&head),
            Some(Identity {
                fstype: "ext4",
                label: Some("data".into()),
                uuid: Some("1b4e28ba-2fa1-11d2-883f-0016d3cc427e".into()),
            })
        );
    }

    #[test]
    fn xfs_and_btrfs_are_recognised() {
        let mut head = vec![0u8; PROBE_LEN];
        head[..4].copy_from_slice(b"XFSB");
        head[32..48].copy_from_slice(&UUID);
        head[108..112].copy_from_slice(b"logs");
        let x = identify(&head).unwrap();
        assert_eq!((x.fstype, x.label.as_deref()), ("xfs", Some("logs")));

        let mut head = vec![0u8; PROBE_LEN];
        head[BTRFS_AT + 0x40..BTRFS_AT + 0x48].copy_from_slice(b"_BHRfS_M");
        head[BTRFS_AT + 0x20..BTRFS_AT + 0x30].copy_from_slice(&UUID);
        head[BTRFS_AT + 0x12b..BTRFS_AT + 0x12b + 5].copy_from_slice(b"store");
        let b = identify(&head).unwrap();
        assert_eq!((b.fstype, b.label.as_deref()), ("btrfs", Some("store")));
        assert_eq!(
            b.uuid.as_deref(),
            Some("1b4e28ba-2fa1-11d2-883f-0016d3cc427e")
        );
    }

    #[test]
    fn unknown_short_and_blank_devices_have_no_identity() {
        assert_eq!(identify(&[]), None);
        assert_eq!(identify(&[0u8; 2048]), None);
        let mut head = vec![0u8; 2048];
        head[1024 + 0x38..1024 + 0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        let blank = identify(&head).unwrap();
        assert_eq!((blank.label, blank.uuid), (None, None));
    }

    /// A real filesystem made by mkfs.ext4 (no root needed: it is a file).
    #[test]
    fn an_image_made_by_mkfs_ext4_is_identified() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let made = std::process::Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-L",
                "tether-data",
                "-U",
                "1b4e28ba-2fa1-11d2-883f-0016d3cc427e",
            ])
            .arg(&img)
            .status();
        if !made.is_ok_and(|s| s.success()) {
            crate::init::testing::skip("mkfs.ext4 image", "mkfs.ext4 is not installed (e2fsprogs)");
            return;
        }
        let id = probe_path(&img).unwrap().unwrap();
        assert_eq!(id.fstype, "ext4");
        assert_eq!(id.label.as_deref(), Some("tether-data"));
        assert_eq!(
            id.uuid.as_deref(),
            Some("1b4e28ba-2fa1-11d2-883f-0016d3cc427e")
        );
    }
}
