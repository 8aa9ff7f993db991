//! Guest networking against the real kernel, without a VM: each test makes
//! its own network namespaces (named after the test and the pid, deleted on
//! drop), veth pairs with known MACs inside them, and runs the configurator on
//! a thread that has entered the guest namespace. Needs root and `ip netns`;
//! skips otherwise (fails under `TETHER_REQUIRE_ALL=1`). No packet leaves the
//! namespaces.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{Procs, available, with_timeout};
use nix::libc;
use runtime_guest::init::network::dhcp::{self, Event};
use runtime_guest::init::network::{Network, NicSpec, RawNetwork, validate};
use serde_json::{Value, json};

/// A network namespace that exists until drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Result<Self, String> {
        let name = format!("tether-{}-{tag}", std::process::id());
        ip(&["netns", "add", &name])?;
        Ok(Netns(name))
    }

    /// Runs `ip -n NS ARGS`.
    fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// `ip -n NS -j ARGS`, parsed.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ip(&all).unwrap()).unwrap()
    }

    /// Runs `f` on a thread inside this namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("the namespace file");
            // SAFETY: setns on a descriptor we own; it affects only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Root and working `ip netns`, or why not.
fn netns_available(tag: &str) -> Result<Netns, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root".into());
    }
    Netns::new(tag).map_err(|e| format!("network namespaces unavailable: {e}"))
}

fn specs(v: Value) -> Vec<NicSpec> {
    let raw: Vec<RawNetwork> = serde_json::from_value(v).unwrap();
    validate(&raw).unwrap()
}

/// A veth pair: `guest_if` (MAC `guest_mac`) in `guest`, `peer_if` up in `peer`.
fn veth(guest: &Netns, guest_if: &str, guest_mac: &str, peer: &Netns, peer_if: &str) {
    guest
        .ip(&[
            "link", "add", guest_if, "address", guest_mac, "type", "veth", "peer", "name", peer_if,
            "netns", &peer.0,
        ])
        .unwrap();
    peer.ip(&["link", "set", peer_if, "up"]).unwrap();
}

fn has(list: &Value, pred: impl Fn(&Value) -> bool) -> bool {
    list.as_array().unwrap().iter().any(pred)
}

#[test]
fn a_static_config_names_the_nic_and_sets_addresses_routes_and_neighbours_idempotently() {
    let Some(guest) = available("netns configurator test", netns_available("static")) else {
        return;
    };
    let peer = Netns::new("static-peer").unwrap();
    veth(&guest, "vguest0", "52:54:00:aa:00:01", &peer, "vpeer0");
    let config = specs(json!([
        {"name": "eth0", "mac": "52:54:00:aa:00:01", "mtu": 1400,
         "addresses": ["10.200.0.15/24", "fd00:200::15/64"], "gateway": "10.200.0.1",
         "routes": [{"to": "10.201.0.0/16", "via": "10.200.0.2"}, {"to": "10.202.0.0/24"}],
         "neighbours": [{"ip": "10.200.0.9", "mac": "52:54:00:00:00:09"}]},
        {"name": "eth1", "mac": "52:54:00:aa:00:03", "addresses": ["10.210.0.15/24"]}
    ]));

    for round in 0..2 {
        let c = config.clone();
        let (results, pending) = guest.run(move || {
            let mut net = Network::new(c);
            let results = net.configure_present();
            (results, net.pending().map(|s| s.index).collect::<Vec<_>>())
        });
        assert_eq!(results.len(), 1, "round {round}: only the present NIC");
        let configured = results.into_iter().next().unwrap().unwrap();
        assert_eq!(
            (configured.ifname.as_str(), configured.dhcp),
            ("eth0", None)
        );
        assert_eq!(pending, [1], "round {round}: the absent NIC waits");
    }

    let link = guest.json(&["link", "show", "eth0"]);
    assert_eq!(link[0]["mtu"], 1400);
    assert_eq!(link[0]["address"], "52:54:00:aa:00:01");
    assert!(has(&link[0]["flags"], |f| f == "UP"));
    let addrs = &guest.json(&["addr", "show", "dev", "eth0"])[0]["addr_info"];
    for (a, len) in [("10.200.0.15", 24), ("fd00:200::15", 64)] {
        assert!(
            has(addrs, |x| x["local"] == a && x["prefixlen"] == len),
            "{a}/{len} in {addrs}"
        );
    }
    let routes = guest.json(&["route", "show"]);
    assert!(has(&routes, |r| r["dst"] == "default"
        && r["gateway"] == "10.200.0.1"
        && r["dev"] == "eth0"));
    assert!(has(&routes, |r| r["dst"] == "10.201.0.0/16"
        && r["gateway"] == "10.200.0.2"));
    assert!(has(&routes, |r| r["dst"] == "10.202.0.0/24"
        && r["scope"] == "link"));
    let neigh = guest.json(&["neigh", "show", "dev", "eth0"]);
    assert!(
        has(&neigh, |n| n["dst"] == "10.200.0.9"
            && n["lladdr"] == "52:54:00:00:00:09"
            && has(&n["state"], |s| s == "PERMANENT")),
        "{neigh}"
    );

    // The second NIC is hot-plugged later, under the kernel's name.
    let mut net = guest.run(move || {
        let mut net = Network::new(config);
        net.configure_present();
        net
    });
    let peer2 = Netns::new("static-peer2").unwrap();
    veth(&guest, "vlate0", "52:54:00:aa:00:03", &peer2, "vpeer1");
    let (unknown, late) =
        guest.run(move || (net.link_added("lo").is_none(), net.link_added("vlate0")));
    assert!(unknown, "lo is no configured NIC");
    assert_eq!(late.unwrap().unwrap().ifname, "eth1");
    let addrs = &guest.json(&["addr", "show", "dev", "eth1"])[0]["addr_info"];
    assert!(has(addrs, |x| x["local"] == "10.210.0.15"));
}

#[test]
fn a_nic_holding_the_wanted_name_is_moved_aside() {
    let Some(guest) = available("netns configurator test", netns_available("swap")) else {
        return;
    };
    let peer = Netns::new("swap-peer").unwrap();
    veth(&guest, "eth0", "52:54:00:ab:00:01", &peer, "vpeer0");
    veth(&guest, "vguest1", "52:54:00:ab:00:02", &peer, "vpeer1");
    guest.ip(&["link", "set", "eth0", "up"]).unwrap();
    let config = specs(json!([
        {"name": "eth0", "mac": "52:54:00:ab:00:02"},
        {"name": "eth1", "mac": "52:54:00:ab:00:01"}
    ]));
    let results = guest.run(move || Network::new(config).configure_present());
    let names: Vec<String> = results.into_iter().map(|r| r.unwrap().ifname).collect();
    assert_eq!(names, ["eth0", "eth1"]);
    let link = |n: &str| guest.json(&["link", "show", n])[0].clone();
    assert_eq!(link("eth0")["address"], "52:54:00:ab:00:02");
    assert_eq!(link("eth1")["address"], "52:54:00:ab:00:01");
    assert!(has(&link("eth1")["flags"], |f| f == "UP"));
}

#[test]
fn an_unreachable_gateway_is_an_error_naming_the_nic_and_route() {
    let Some(guest) = available("netns configurator test", netns_available("badgw")) else {
        return;
    };
    let peer = Netns::new("badgw-peer").unwrap();
    veth(&guest, "vguest0", "52:54:00:bb:00:01", &peer, "vpeer0");
    let config = specs(
        json!([{"mac": "52:54:00:bb:00:01", "addresses": ["10.220.0.15/24"],
                               "gateway": "10.99.0.1"}]),
    );
    let results = guest.run(move || Network::new(config).configure_present());
    let e = results.into_iter().next().unwrap().unwrap_err().to_string();
    assert_eq!(
        e,
        "networks[0] (mac 52:54:00:bb:00:01): on vguest0: \
         route to 0.0.0.0/0 via 10.99.0.1: ENETUNREACH: Network is unreachable"
    );
}

/// Waits up to `limit`, on a packet socket in `ns`, for a frame of `ethertype`
/// whose payload `want` accepts, and returns that payload. The socket is open
/// when this returns.
fn capture(
    ns: &Netns,
    ethertype: u16,
    limit: Duration,
    want: fn(&[u8]) -> bool,
) -> std::thread::JoinHandle<Option<Vec<u8>>> {
    let path = format!("/run/netns/{}", ns.0);
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let ns = File::open(path).unwrap();
        // SAFETY: setns and socket calls on descriptors this thread owns.
        unsafe {
            assert_eq!(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET), 0);
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                i32::from(ethertype.to_be()),
            );
            assert!(fd >= 0);
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            let _ = ready_tx.send(());
            let end = Instant::now() + limit;
            let mut buf = [0u8; 1500];
            let mut got = None;
            while Instant::now() < end {
                let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                if n > 0 && want(&buf[..n as usize]) {
                    got = Some(buf[..n as usize].to_vec());
                    break;
                }
            }
            libc::close(fd);
            got
        }
    });
    ready.recv().unwrap();
    handle
}

#[test]
fn new_addresses_are_announced_by_gratuitous_arp_and_neighbour_advertisement() {
    let Some(guest) = available("netns ARP test", netns_available("garp")) else {
        return;
    };
    let peer = Netns::new("garp-peer").unwrap();
    veth(&guest, "vguest0", "52:54:00:cc:00:01", &peer, "vpeer0");
    let limit = Duration::from_secs(5);
    let arp = capture(&peer, 0x0806, limit, |_| true);
    let na = capture(&peer, 0x86dd, limit, |p| {
        p.len() >= 72 && p[6] == 58 && p[40] == 136
    });
    let config = specs(json!([{"mac": "52:54:00:cc:00:01",
                               "addresses": ["10.230.0.15/24", "fd00:230::15/64"]}]));
    let results = guest.run(move || Network::new(config).configure_present());
    assert!(results[0].is_ok(), "{:?}", results[0]);

    let arp = arp.join().unwrap().expect("an ARP frame on the peer");
    assert_eq!(&arp[6..8], &[0, 1], "a request");
    assert_eq!(&arp[8..14], &[0x52, 0x54, 0, 0xcc, 0, 1], "from our MAC");
    assert_eq!(&arp[14..18], &[10, 230, 0, 15], "sender: our address");
    assert_eq!(&arp[24..28], &[10, 230, 0, 15], "target: our address");

    let na = na
        .join()
        .unwrap()
        .expect("a neighbour advertisement on the peer");
    let ours: std::net::Ipv6Addr = "fd00:230::15".parse().unwrap();
    assert_eq!(&na[8..24], &ours.octets(), "from our address");
    assert_eq!(&na[48..64], &ours.octets(), "for our address");
    assert_eq!(na[44] & 0x20, 0x20, "override set");
    assert_eq!(&na[66..72], &[0x52, 0x54, 0, 0xcc, 0, 1], "at our MAC");
}

/// `busybox udhcpd` serving 10.240.0.100-150 on `ifname` in `ns`, 20 s leases.
fn udhcpd(
    procs: &Procs,
    ns: &Netns,
    ifname: &str,
    dir: &std::path::Path,
) -> e2e::harness::ChildGuard {
    let conf = dir.join("udhcpd.conf");
    let leases = dir.join("leases");
    std::fs::write(&leases, b"").unwrap();
    std::fs::write(
        &conf,
        format!(
            "start 10.240.0.100\nend 10.240.0.150\ninterface {ifname}\nmax_leases 10\n\
             option subnet 255.255.255.0\noption router 10.240.0.1\noption dns 10.240.0.53\n\
             option lease 20\nlease_file {}\npidfile {}\n",
            leases.display(),
            dir.join("pid").display()
        ),
    )
    .unwrap();
    procs
        .spawn(
            Command::new("ip")
                .args(["netns", "exec", &ns.0, "busybox", "udhcpd", "-f"])
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("start udhcpd")
}

#[test]
fn dhcp_binds_a_lease_before_the_nic_has_an_address_and_renews_it() {
    let Some(guest) = available("netns DHCP test", netns_available("dhcp")) else {
        return;
    };
    if Command::new("busybox")
        .arg("udhcpd")
        .arg("--help")
        .output()
        .is_err()
    {
        e2e::require_or_skip("netns DHCP test", "busybox (udhcpd) is not installed");
        return;
    }
    with_timeout(Duration::from_secs(60), move |procs| {
        let server = Netns::new("dhcp-srv").unwrap();
        veth(&guest, "vguest0", "52:54:00:dd:00:01", &server, "vsrv0");
        server
            .ip(&["addr", "add", "10.240.0.1/24", "dev", "vsrv0"])
            .unwrap();
        // Reverse-path filtering would hide the OFFER from a UDP socket.
        let ns = guest.0.clone();
        ip(&[
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.rp_filter=1",
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let _server = udhcpd(&procs, &server, "vsrv0", dir.path());

        let config = specs(json!([{"name": "eth0", "mac": "52:54:00:dd:00:01", "dhcp": true}]));
        let started = Instant::now();
        let (lease, renewed) = guest.run(move || {
            let mut net = Network::new(config);
            let c = net.configure_present().remove(0).unwrap();
            let nic = c.dhcp.expect("a DHCP NIC");
            assert!(nic.use_router);
            let (client, handle) = dhcp::client(nic, Some("guest".into()));
            let ex = smol::LocalExecutor::new();
            ex.spawn(client).detach();
            smol::block_on(ex.run(async {
                let lease = handle.first_lease(Duration::from_secs(20)).await.unwrap();
                // The next event: the renewal at T1 (10 s into a 20 s lease).
                match handle.next_event().await {
                    Some(Ok(Event::Renewed(l))) => (lease, l),
                    Some(Ok(other)) => panic!("unexpected {other:?}"),
                    Some(Err(e)) => panic!("{e}"),
                    None => panic!("the client ended"),
                }
            }))
        });
        eprintln!("DHCP bound and renewed in {:?}", started.elapsed());
        let octets = lease.address.octets();
        assert_eq!(&octets[..3], &[10, 240, 0]);
        assert!((100..=150).contains(&octets[3]));
        assert_eq!(lease.prefix_len, 24);
        assert_eq!(lease.routers, [Ipv4Addr::new(10, 240, 0, 1)]);
        assert_eq!(lease.dns, [Ipv4Addr::new(10, 240, 0, 53)]);
        assert_eq!(lease.lease_time, Some(Duration::from_secs(20)));
        assert_eq!(renewed.address, lease.address);
        assert!(
            renewed.start >= lease.start + Duration::from_secs(10),
            "renewed at T1"
        );

        let addrs = &guest.json(&["addr", "show", "dev", "eth0"])[0]["addr_info"];
        let a = lease.address.to_string();
        assert!(
            has(addrs, |x| x["local"] == a.as_str()
                && x["valid_life_time"].as_u64().is_some_and(|v| v <= 20)),
            "{addrs}"
        );
        let routes = guest.json(&["route", "show"]);
        assert!(has(&routes, |r| r["dst"] == "default"
            && r["gateway"] == "10.240.0.1"));
    });
}

#[test]
fn a_missing_dhcp_server_fails_boot_within_the_timeout() {
    let Some(guest) = available("netns DHCP test", netns_available("nodhcp")) else {
        return;
    };
    let peer = Netns::new("nodhcp-peer").unwrap();
    veth(&guest, "vguest0", "52:54:00:ee:00:01", &peer, "vpeer0");
    let config = specs(json!([{"mac": "52:54:00:ee:00:01", "dhcp": true}]));
    let (elapsed, err) = guest.run(move || {
        let nic = Network::new(config)
            .configure_present()
            .remove(0)
            .unwrap()
            .dhcp
            .unwrap();
        let (client, handle) = dhcp::client(nic, None);
        let ex = smol::LocalExecutor::new();
        ex.spawn(client).detach();
        let t = Instant::now();
        let r = smol::block_on(ex.run(handle.first_lease(Duration::from_secs(3))));
        (t.elapsed(), r.unwrap_err().to_string())
    });
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    assert!(
        err.starts_with("networks[0] (mac 52:54:00:ee:00:01): DHCP: no lease after 3s"),
        "{err}"
    );
}

/// A forked child's network steps (docs/PROTOCOL.md 4.5, step 3) on a NIC
/// that still has its parent's MAC, address and neighbours: the clone's MAC,
/// learnt neighbours gone (configured ones kept), the clone's static address
/// in place of the parent's with its gateway, and a gratuitous ARP for it
/// from the new MAC.
#[test]
fn a_forked_child_takes_its_mac_forgets_neighbours_readdresses_and_announces() {
    use runtime_guest::fork::net;
    use runtime_guest::init::network::rtnl::Rtnl;
    use runtime_guest::init::network::spec::MacAddr;
    let Some(guest) = available("netns fork test", netns_available("fork")) else {
        return;
    };
    let peer = Netns::new("fork-peer").unwrap();
    veth(&guest, "vguest0", "52:54:00:ad:00:01", &peer, "vpeer0");
    let neigh = |ip: &str, mac: &str, nud: &str| {
        guest
            .ip(&[
                "neigh", "add", ip, "lladdr", mac, "dev", "vguest0", "nud", nud,
            ])
            .unwrap();
    };
    guest.ip(&["link", "set", "vguest0", "up"]).unwrap();
    guest
        .ip(&["addr", "add", "10.220.0.15/24", "dev", "vguest0"])
        .unwrap();
    let mac = MacAddr([0x52, 0x54, 0, 0xad, 0, 2]);
    guest.run(move || {
        let mut rtnl = Rtnl::open().unwrap();
        let link = net::nic(&mut rtnl, 0).unwrap();
        net::set_mac(&mut rtnl, &link, mac).unwrap();
    });
    // (The kernel forgets every neighbour of a NIC whose MAC changed, even
    // permanent ones.) Learnt since (IPv4 and IPv6): the flush takes them;
    // a configured (permanent) one stays.
    neigh("10.220.0.9", "52:54:00:00:00:09", "permanent");
    neigh("10.220.0.7", "52:54:00:00:00:07", "reachable");
    neigh("fd00:220::7", "52:54:00:00:00:08", "reachable");
    let arp = capture(&peer, 0x0806, Duration::from_secs(5), |p| {
        p.len() >= 28 && p[14..18] == [10, 220, 0, 16]
    });
    let (name, flushed, announced) = guest.run(move || {
        let mut rtnl = Rtnl::open().unwrap();
        let link = net::nic(&mut rtnl, 0).unwrap();
        let name = link.name.clone();
        let flushed = net::flush_neighbours(&mut rtnl, link.index).unwrap();
        let new: ipnet::IpNet = "10.220.0.16/24".parse().unwrap();
        let gw: std::net::IpAddr = "10.220.0.1".parse().unwrap();
        net::set_static(&mut rtnl, &link, &new, Some(&gw)).unwrap();
        let announced = net::announce(&mut rtnl, link.index, mac).unwrap();
        assert!(net::nic(&mut rtnl, 1).is_err(), "one NIC only");
        (name, flushed, announced)
    });
    assert_eq!(name, "vguest0");
    assert_eq!(flushed, 2, "the learnt neighbours only");
    assert!(announced >= 1);
    let link = guest.json(&["link", "show", "vguest0"]);
    assert_eq!(link[0]["address"], "52:54:00:ad:00:02");
    let neigh = guest.json(&["neigh", "show", "dev", "vguest0"]);
    assert!(!has(&neigh, |n| n["dst"] == "10.220.0.7"), "{neigh}");
    let neigh6 = guest.json(&["-6", "neigh", "show", "dev", "vguest0"]);
    assert!(!has(&neigh6, |n| n["dst"] == "fd00:220::7"), "{neigh6}");
    assert!(has(&neigh, |n| n["dst"] == "10.220.0.9"), "{neigh}");
    let addrs = &guest.json(&["addr", "show", "dev", "vguest0"])[0]["addr_info"];
    assert!(has(addrs, |x| x["local"] == "10.220.0.16"), "{addrs}");
    assert!(!has(addrs, |x| x["local"] == "10.220.0.15"), "{addrs}");
    let routes = guest.json(&["route", "show"]);
    assert!(has(&routes, |r| r["dst"] == "default"
        && r["gateway"] == "10.220.0.1"));
    let arp = arp.join().unwrap().expect("a gratuitous ARP on the peer");
    assert_eq!(
        &arp[8..14],
        &[0x52, 0x54, 0, 0xad, 0, 2],
        "from the new MAC"
    );
}
