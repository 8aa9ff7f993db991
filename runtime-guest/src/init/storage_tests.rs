use super::*;
use crate::init::testing::{in_private_mounts, skip};
use crate::init::uevent::Uevent;

fn raw(source: &str, target: &str) -> RawMount {
    RawMount {
        source: source.into(),
        target: target.into(),
        fstype: None,
        options: Vec::new(),
        timeout: None,
    }
}

fn block_device(name: &str) -> Uevent {
    Uevent::present(
        &format!("/devices/virtual/block/{name}"),
        "block",
        &format!("DEVNAME={name}\nDEVTYPE=disk\n"),
    )
}

/// An ext4 superblock with this label, as the first bytes of a "device".
fn ext4_with_label(label: &str) -> Vec<u8> {
    let mut head = vec![0u8; 4096];
    head[1024 + 0x38..1024 + 0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
    head[1024 + 0x68] = 0xab;
    head[1024 + 0x78..1024 + 0x78 + label.len()].copy_from_slice(label.as_bytes());
    head
}

#[test]
fn sources_parse_and_bad_ones_name_the_field() {
    assert_eq!(
        parse_source("/dev/vdb"),
        Ok(Source::Device("/dev/vdb".into()))
    );
    assert_eq!(parse_source("LABEL=data"), Ok(Source::Label("data".into())));
    assert_eq!(
        parse_source("UUID=1B4E28BA-2FA1-11D2-883F-0016D3CC427E"),
        Ok(Source::Uuid("1b4e28ba-2fa1-11d2-883f-0016d3cc427e".into()))
    );
    assert_eq!(
        parse_source("9p:rootfs"),
        Ok(Source::NineP("rootfs".into()))
    );
    assert_eq!(parse_source("tmpfs"), Ok(Source::Tmpfs));
    let cases = [
        (raw("/etc/passwd", "/data"), "mounts[0].source"),
        (raw("/dev/../etc", "/data"), "mounts[0].source"),
        (raw("LABEL=", "/data"), "mounts[0].source"),
        (raw("nfs://host/x", "/data"), "mounts[0].source"),
        (raw("tmpfs", "data"), "mounts[0].target"),
        (raw("tmpfs", "/"), "mounts[0].target"),
        (raw("tmpfs", "/a/../b"), "mounts[0].target"),
        (
            RawMount {
                options: vec!["ro,noatime".into()],
                ..raw("tmpfs", "/x")
            },
            "mounts[0].options[0]",
        ),
        (
            RawMount {
                timeout: Some("soon".into()),
                ..raw("tmpfs", "/x")
            },
            "mounts[0].timeout",
        ),
        (
            RawMount {
                fstype: Some("ext4".into()),
                ..raw("9p:share", "/x")
            },
            "mounts[0].fstype",
        ),
    ];
    for (m, field) in cases {
        let e = validate_mounts(vec![m]).unwrap_err();
        assert_eq!(e.path, field, "{e}");
    }
    let root = RawRootfs {
        source: "tmpfs".into(),
        fstype: None,
        options: vec![],
        timeout: None,
    };
    assert_eq!(
        validate_rootfs(Some(root)).unwrap_err().path,
        "rootfs.source"
    );
}

#[test]
fn options_split_into_flags_and_data_and_9p_gets_its_transport() {
    let opts: Vec<String> = ["ro", "noatime", "size=64m", "defaults", "mode=0700"]
        .map(String::from)
        .into();
    let (flags, data) = split_options(&opts);
    assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NOATIME);
    assert_eq!(data, "size=64m,mode=0700");

    let m = validate_mounts(vec![RawMount {
        options: vec!["msize=65536".into(), "cache=loose".into()],
        ..raw("9p:share", "/share")
    }])
    .unwrap();
    assert_eq!(m[0].fstype.as_deref(), Some("9p"));
    assert_eq!(
        m[0].data,
        "trans=virtio,version=9p2000.L,msize=65536,cache=loose"
    );
    assert_eq!(m[0].timeout, DEFAULT_TIMEOUT);
}

#[test]
fn parents_are_mounted_before_their_children() {
    let m = validate_mounts(vec![
        raw("tmpfs", "/data/cache/x"),
        raw("LABEL=data", "/data"),
        raw("tmpfs", "/scratch"),
    ])
    .unwrap();
    let order: Vec<_> = m.iter().map(|m| m.field.as_str()).collect();
    assert_eq!(order, ["mounts[1]", "mounts[2]", "mounts[0]"]);
}

#[test]
fn a_label_is_found_on_a_device_that_arrives_after_the_wait_began() {
    let dev = tempfile::tempdir().unwrap();
    std::fs::write(dev.path().join("vdb"), vec![0u8; 4096]).unwrap();
    std::fs::write(dev.path().join("vdc"), ext4_with_label("data")).unwrap();
    let roots = Roots {
        sys: dev.path().join("no-sys"),
        dev: dev.path().to_path_buf(),
    };
    let spec = &validate_mounts(vec![raw("LABEL=data", "/data")]).unwrap()[0];
    let devices = Devices::new();
    devices.apply(block_device("vdb"));
    let ex = smol::LocalExecutor::new();
    let resolved = smol::block_on(ex.run(async {
        let d = devices.clone();
        ex.spawn(async move {
            smol::Timer::after(Duration::from_millis(20)).await;
            d.apply(block_device("vdc"));
        })
        .detach();
        resolve(spec, &devices, &roots).await
    }))
    .unwrap();
    assert_eq!(
        resolved.source,
        dev.path().join("vdc").display().to_string()
    );
    assert_eq!(resolved.identity.unwrap().fstype, "ext4");
}

#[test]
fn a_device_that_never_comes_is_an_error_after_the_timeout() {
    let dev = tempfile::tempdir().unwrap();
    let roots = Roots {
        sys: dev.path().to_path_buf(),
        dev: dev.path().to_path_buf(),
    };
    let specs = validate_mounts(vec![
        RawMount {
            timeout: Some("30ms".into()),
            ..raw("UUID=0000-1111", "/data")
        },
        RawMount {
            timeout: Some("30ms".into()),
            ..raw("9p:share", "/share")
        },
    ])
    .unwrap();
    let devices = Devices::new();
    for spec in &specs {
        let e = smol::block_on(resolve(spec, &devices, &roots)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("config {}: no device", spec.field)),
            "{text}"
        );
        assert!(text.contains("30ms"), "{text}");
    }
}

#[test]
fn a_9p_share_is_found_by_its_mount_tag() {
    let sys = tempfile::tempdir().unwrap();
    let bound = sys.path().join("bus/virtio/drivers/9pnet_virtio/virtio1");
    std::fs::create_dir_all(&bound).unwrap();
    std::fs::write(bound.join("mount_tag"), b"rootfs\0").unwrap();
    assert!(has_9p_tag(sys.path(), "rootfs"));
    assert!(!has_9p_tag(sys.path(), "root"));
}

#[test]
fn a_tmpfs_mount_is_made_with_its_options() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("scratch/deep");
    let spec = validate_mounts(vec![RawMount {
        options: vec!["nosuid".into(), "size=1m".into(), "mode=0750".into()],
        ..raw("tmpfs", target.to_str().unwrap())
    }])
    .unwrap()
    .remove(0);
    let seen = in_private_mounts("mounting a tmpfs", || {
        smol::block_on(mount_one(&spec, &Devices::new(), &Roots::default())).unwrap();
        let table = mount::mount_points().unwrap();
        let m = table.iter().find(|m| m.target == target).cloned();
        let mode = std::fs::metadata(&target).map(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.permissions().mode() & 0o7777
        });
        (m, mode.ok(), mount::is_in_memory(&target).ok())
    });
    let Some((m, mode, in_memory)) = seen else {
        return;
    };
    assert_eq!(m.map(|m| m.fstype), Some("tmpfs".into()));
    assert_eq!(mode, Some(0o750));
    assert_eq!(in_memory, Some(true));
    assert!(!target.exists() || std::fs::read_dir(&target).unwrap().next().is_none());
}

/// A real ext4 image on a loop device, found by its label the way PID 1 finds
/// a disk: no udev, no /dev/disk/by-label, only the device record and the
/// superblock.
#[test]
fn an_ext4_disk_is_mounted_by_its_label() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    if !std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "tetherlabel"])
        .arg(&img)
        .status()
        .is_ok_and(|s| s.success())
    {
        skip("mount by LABEL", "mkfs.ext4 is not installed (e2fsprogs)");
        return;
    }
    let target = dir.path().join("data");
    let spec = validate_mounts(vec![RawMount {
        options: vec!["noatime".into()],
        ..raw("LABEL=tetherlabel", target.to_str().unwrap())
    }])
    .unwrap()
    .remove(0);
    let result = in_private_mounts("mount by LABEL", || {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img)
            .output();
        let loop_dev = out
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())?;
        let name = loop_dev.trim_start_matches("/dev/").to_owned();
        let devices = Devices::new();
        devices.apply(block_device("loop-not-this-one"));
        devices.apply(block_device(&name));
        let mounted = smol::block_on(mount_one(&spec, &devices, &Roots::default()));
        let fstype = mount::mount_points()
            .unwrap()
            .into_iter()
            .find(|m| m.target == target)
            .map(|m| (m.fstype, m.source));
        let lost_found = target.join("lost+found").exists();
        let _ = mount::unmount(&target);
        let _ = std::process::Command::new("losetup")
            .args(["-d", &loop_dev])
            .status();
        Some((
            mounted.map_err(|e| e.to_string()),
            fstype,
            lost_found,
            loop_dev,
        ))
    });
    match result {
        None => {}
        Some(None) => skip(
            "mount by LABEL",
            "no loop device could be attached (losetup)",
        ),
        Some(Some((mounted, fstype, lost_found, loop_dev))) => {
            mounted.unwrap();
            assert_eq!(fstype, Some(("ext4".into(), loop_dev)));
            assert!(lost_found, "the filesystem's own root is visible");
        }
    }
}

#[test]
fn filesystem_modules_are_loaded_only_for_what_is_mounted() {
    let with = |source: &str, fstype: Option<&str>| RawMount {
        fstype: fstype.map(str::to_owned),
        ..raw(source, "/m")
    };
    let mounts = |raws: Vec<RawMount>| validate_mounts(raws).unwrap();
    assert!(modules_for(&mounts(vec![raw("tmpfs", "/t")])).is_empty());
    let both = mounts(vec![
        with("LABEL=data", None),
        with("9p:share", Some("9p")),
        with("/dev/vdb", Some("ext4")),
        with("/dev/vdc", Some("xfs")),
    ]);
    assert_eq!(
        modules_for(&both),
        ["crc32c_generic", "ext4", "9pnet_virtio", "9p", "xfs"]
    );
}
