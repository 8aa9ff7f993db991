//! Many guests on one appliance.

use std::time::{Duration, Instant};

use e2e::fixtures::{Fixture, Guest};
use e2e::with_timeout;
use runtime_appliance::{AttachOptions, Output};

const GUESTS: usize = 200;

#[test]
fn two_hundred_guests_are_all_listed_and_each_attached_once() {
    with_timeout(Duration::from_secs(300), |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let started = Instant::now();
        let guests: Vec<Guest> = (0..GUESTS)
            .map(|i| {
                let id = format!("vm{i:03}");
                let cmd = format!("echo hello-{id}; exec sleep 240");
                Guest::start(
                    &procs,
                    dir.path(),
                    &fx.config(&id, &["/bin/sh", "-c", &cmd]),
                )
            })
            .collect();
        smol::block_on(async {
            loop {
                let list = fx.appliance.list().await;
                let running = list
                    .iter()
                    .filter(|c| c.state == "running" && c.connection.is_some())
                    .count();
                if running == GUESTS {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "only {running} of {GUESTS} guests listed"
                );
                smol::Timer::after(Duration::from_millis(100)).await;
            }
            eprintln!(
                "{GUESTS} guests connected and listed after {:?}",
                started.elapsed()
            );
            assert_eq!(fx.appliance.links(), GUESTS);
            let attaching = Instant::now();
            for i in 0..GUESTS {
                let id = format!("vm{i:03}");
                let mut att = fx
                    .appliance
                    .attach(
                        &id,
                        AttachOptions {
                            timeout: Duration::from_secs(10),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                let want = format!("hello-{id}\n");
                let mut got = Vec::new();
                while got.len() < want.len() {
                    match att.next().await {
                        Some(Output::Stdout(b)) => got.extend_from_slice(&b),
                        other => panic!("{id}: unexpected {other:?}"),
                    }
                }
                assert_eq!(String::from_utf8_lossy(&got), want);
            }
            eprintln!(
                "attached to each of {GUESTS} guests in {:?}",
                attaching.elapsed()
            );
        });
        // The guest's resident memory while idle, for the record.
        let mut guests = guests;
        let pid = guests[0].child_pid();
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let rss = status
                .lines()
                .find(|l| l.starts_with("VmRSS"))
                .unwrap_or("VmRSS: ?");
            eprintln!("idle tether {rss}");
        }
    });
}
