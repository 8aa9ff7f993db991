use super::*;
use crate::init::testing::in_private_mounts;

fn entry(ip: &str, names: &[&str]) -> HostEntry {
    HostEntry {
        ip: ip.into(),
        names: names.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn etc_hosts_has_localhost_then_the_host_name_then_the_entries() {
    let text = render_hosts(
        Some("web.example.com"),
        &[entry("10.0.2.9", &["db", "db.internal"])],
    );
    assert_eq!(
        text,
        "127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         127.0.1.1\tweb.example.com web\n\
         10.0.2.9\tdb db.internal\n"
    );
    // An entry that names the host wins over 127.0.1.1.
    let text = render_hosts(Some("web"), &[entry("10.0.2.15", &["web"])]);
    assert!(!text.contains("127.0.1.1"));
    assert!(text.ends_with("10.0.2.15\tweb\n"));
    assert_eq!(render_hosts(None, &[]).lines().count(), 2);
}

#[test]
fn resolv_conf_lists_nameservers_search_and_options() {
    let dns = Dns {
        nameservers: vec!["10.0.2.3".into(), "fd00::3".into()],
        search: vec!["example.com".into(), "corp".into()],
        options: vec!["ndots:2".into(), "edns0".into()],
    };
    assert_eq!(
        render_resolv_conf(&dns),
        "nameserver 10.0.2.3\nnameserver fd00::3\nsearch example.com corp\noptions ndots:2 edns0\n"
    );
}

#[test]
fn names_hosts_and_dns_are_validated_naming_the_field() {
    assert_eq!(
        validate_name("hostname", Some("web-1.example".into()))
            .unwrap()
            .as_deref(),
        Some("web-1.example")
    );
    for bad in ["", "-web", "we b", "a..b", &"x".repeat(65)] {
        assert_eq!(
            validate_name("hostname", Some(bad.into()))
                .unwrap_err()
                .path,
            "hostname"
        );
    }
    assert_eq!(
        validate_name("domainname", Some("a b".into()))
            .unwrap_err()
            .path,
        "domainname"
    );
    assert_eq!(
        validate_hosts(vec![entry("10.0.0.300", &["x"])])
            .unwrap_err()
            .path,
        "hosts[0].ip"
    );
    assert_eq!(
        validate_hosts(vec![entry("::1", &[])]).unwrap_err().path,
        "hosts[0].names"
    );
    assert_eq!(
        validate_hosts(vec![entry("::1", &["ok", "not ok"])])
            .unwrap_err()
            .path,
        "hosts[0].names[1]"
    );
    let dns = |n: &str, s: &str| Dns {
        nameservers: vec![n.into()],
        search: vec![s.into()],
        options: vec![],
    };
    assert_eq!(
        validate_dns(Some(dns("dns.google", "a"))).unwrap_err().path,
        "dns.nameservers[0]"
    );
    assert_eq!(
        validate_dns(Some(dns("8.8.8.8", "a b"))).unwrap_err().path,
        "dns.search[0]"
    );
}

#[test]
fn ulimits_and_sysctls_are_validated_naming_the_field() {
    let limits = |name: &str, soft: RawLimit, hard: RawLimit| {
        validate_ulimits(BTreeMap::from([(name.to_owned(), [soft, hard])]))
    };
    let ok = limits(
        "nofile",
        RawLimit::Number(4096),
        RawLimit::Word("unlimited".into()),
    )
    .unwrap();
    assert_eq!(
        ok[0],
        Ulimit {
            resource: Resource::RLIMIT_NOFILE,
            soft: 4096,
            hard: RLIM_INFINITY
        }
    );
    assert_eq!(
        limits("files", RawLimit::Number(1), RawLimit::Number(1))
            .unwrap_err()
            .path,
        "ulimits.files"
    );
    assert_eq!(
        limits("core", RawLimit::Number(2), RawLimit::Number(1))
            .unwrap_err()
            .path,
        "ulimits.core"
    );
    assert_eq!(
        limits("stack", RawLimit::Word("lots".into()), RawLimit::Number(1))
            .unwrap_err()
            .path,
        "ulimits.stack"
    );

    let sysctls = validate_sysctls(BTreeMap::from([
        ("net.ipv4.ip_forward".to_owned(), SysctlValue::Number(1)),
        (
            "net/ipv4/conf/eth0.1/rp_filter".to_owned(),
            SysctlValue::Text("2".into()),
        ),
        (
            "net.ipv4.ip_local_port_range".to_owned(),
            SysctlValue::Text("32768\t60999".into()),
        ),
    ]))
    .unwrap();
    let files: Vec<_> = sysctls
        .iter()
        .map(|s| (s.file.to_str().unwrap(), s.value.as_str()))
        .collect();
    assert!(files.contains(&("/proc/sys/net/ipv4/ip_forward", "1")));
    assert!(files.contains(&("/proc/sys/net/ipv4/conf/eth0.1/rp_filter", "2")));
    for bad in ["net..x", "../../etc/passwd", "net/../x", ""] {
        let e = validate_sysctls(BTreeMap::from([(bad.to_owned(), SysctlValue::Number(1))]));
        assert_eq!(e.unwrap_err().path, format!("sysctls.{bad}"));
    }
    let e = validate_sysctls(BTreeMap::from([(
        "kernel.x".to_owned(),
        SysctlValue::Text("1\n2".into()),
    )]));
    assert_eq!(e.unwrap_err().path, "sysctls.kernel.x");
}

#[test]
fn etc_files_are_bind_mounted_over_the_images_own() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(root.path().join("etc/hosts"), "image's own\n").unwrap();
    std::fs::create_dir_all(root.path().join("run")).unwrap();
    let root_path = root.path().to_path_buf();
    let seen = in_private_mounts("bind-mounting /etc files", move || {
        provide_etc_file(&root_path, "hosts", "127.0.0.1\tlocalhost\n").unwrap();
        provide_etc_file(&root_path, "resolv.conf", "nameserver 10.0.2.3\n").unwrap();
        (
            std::fs::read_to_string(root_path.join("etc/hosts")).unwrap(),
            std::fs::read_to_string(root_path.join("etc/resolv.conf")).unwrap(),
        )
    });
    let Some((hosts, resolv)) = seen else { return };
    assert_eq!(hosts, "127.0.0.1\tlocalhost\n");
    assert_eq!(resolv, "nameserver 10.0.2.3\n");
    // Outside the namespace the image's file is untouched.
    assert_eq!(
        std::fs::read_to_string(root.path().join("etc/hosts")).unwrap(),
        "image's own\n"
    );
}
