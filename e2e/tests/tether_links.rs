//! Links that break: cut mid-stream, corrupted, noisy, or silently dead. The
//! guest dials the appliance through a proxy that does the damage.

use std::time::{Duration, Instant};

use e2e::fixtures::{Dir, Fixture, Guest, Proxy};
use e2e::{sha256_hex, with_timeout};
use proto_core::link::{Frame, FrameKind};
use runtime_appliance::{AttachOptions, Attachment, ExitStatus, Output};

const LIMIT: Duration = Duration::from_secs(120);

/// Attaches to `id` with replay from 0, waiting up to 20 s for it to appear.
async fn attach(fx: &Fixture, id: &str) -> Attachment {
    let options = AttachOptions {
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    fx.appliance.attach(id, options).await.unwrap()
}

/// `seq 1 N` output, the reference stream of these tests.
fn seq(n: u32) -> Vec<u8> {
    (1..=n)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect()
}

#[test]
fn a_link_cut_mid_stream_resumes_at_the_recorded_offset_byte_exact() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let proxy = Proxy::start(fx.addr);
        let mut config = fx.config(
            "cut",
            &[
                "/bin/sh",
                "-c",
                "sleep 0.5; seq 1 3000000; sleep 0.5; exit 9",
            ],
        );
        config["link"] = format!("tcp:{}", proxy.addr).into();
        config["sessions"][0]["overflow"] = "block".into();
        let _guest = Guest::start(&procs, dir.path(), &config);
        smol::block_on(async {
            let mut att = attach(&fx, "cut").await;
            let mut out = Vec::new();
            let mut cuts = 0;
            let exit = loop {
                match att.next().await {
                    Some(Output::Stdout(b)) => {
                        out.extend_from_slice(&b);
                        // Cut the link twice while output is flowing.
                        if (cuts == 0 && out.len() > 2_000_000)
                            || (cuts == 1 && out.len() > 9_000_000)
                        {
                            proxy.cut();
                            cuts += 1;
                        }
                    }
                    Some(Output::Exit(e)) => break e,
                    other => panic!("unexpected {other:?}"),
                }
            };
            assert_eq!(cuts, 2);
            assert!(
                proxy.accepted() >= 3,
                "the guest reconnected after each cut"
            );
            assert_eq!(exit, ExitStatus::Code(9));
            let expect = seq(3_000_000);
            assert_eq!(
                out.len(),
                expect.len(),
                "bytes lost or duplicated across link drops"
            );
            assert_eq!(sha256_hex(&out), sha256_hex(&expect));
        });
    });
}

#[test]
fn noise_and_stale_frames_before_and_between_syncs_are_skipped() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let proxy = Proxy::start(fx.addr);
        // What a serial line carries before a guest talks: firmware text, escape
        // sequences, frames of an earlier connection, half a frame.
        let mut noise = b"Booting from ROM...\x1bc\x1b[?7l\x1b[2J".to_vec();
        noise.extend(
            Frame {
                kind: FrameKind::HelloAck,
                nonce_a: 42,
                nonce_b: 43,
            }
            .encode(),
        );
        noise.extend(
            Frame {
                kind: FrameKind::Ready,
                nonce_a: 42,
                nonce_b: 43,
            }
            .encode(),
        );
        noise.extend(
            &Frame {
                kind: FrameKind::Hello,
                nonce_a: 1,
                nonce_b: 0,
            }
            .encode()[..9],
        );
        noise.extend(b"SSH-2.0-stale\r\n");
        proxy.inject(Dir::ToAppliance, &noise);
        proxy.inject(Dir::ToGuest, &noise);
        let mut config = fx.config("noisy", &["/bin/sh", "-c", "echo through; sleep 30"]);
        config["link"] = format!("tcp:{}", proxy.addr).into();
        let _guest = Guest::start(&procs, dir.path(), &config);
        smol::block_on(async {
            let mut att = attach(&fx, "noisy").await;
            assert_eq!(att.next().await, Some(Output::Stdout("through\n".into())));
            // Between syncs: cut, and greet the next connection with noise again.
            proxy.inject(Dir::ToAppliance, &noise);
            proxy.inject(Dir::ToGuest, &noise);
            proxy.cut();
            let listed = wait_for_link(&fx, "noisy", 2).await;
            assert!(listed, "the guest came back through a noisy second sync");
        });
    });
}

/// Waits until the appliance has accepted `links` links and serves `id`.
async fn wait_for_link(fx: &Fixture, id: &str, links: u64) -> bool {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        let m = fx.appliance.metrics();
        let accepted = m
            .lines()
            .find(|l| l.starts_with("tetherd_links_accepted_total"))
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if accepted >= links
            && fx.appliance.links() >= 1
            && fx
                .appliance
                .get(id)
                .await
                .is_ok_and(|v| v.connection.is_some())
        {
            return true;
        }
        smol::Timer::after(Duration::from_millis(50)).await;
    }
    false
}

#[test]
fn a_bit_flip_in_the_ssh_stream_ends_that_connection_and_the_next_sync_recovers() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let proxy = Proxy::start(fx.addr);
        let mut config = fx.config("flip", &["/bin/sh", "-c", "seq 1 2000000; sleep 30"]);
        config["link"] = format!("tcp:{}", proxy.addr).into();
        config["sessions"][0]["output_buffer"] = (32 << 20).into();
        let _guest = Guest::start(&procs, dir.path(), &config);
        smol::block_on(async {
            let mut att = attach(&fx, "flip").await;
            let mut out = Vec::new();
            while out.len() < 100_000 {
                if let Some(Output::Stdout(b)) = att.next().await {
                    out.extend_from_slice(&b);
                }
            }
            // Corrupt one byte a little further into this connection's stream.
            proxy.flip_after(Dir::ToAppliance, 50_000);
            let expect = seq(2_000_000);
            while out.len() < expect.len() {
                match att.next().await {
                    Some(Output::Stdout(b)) => out.extend_from_slice(&b),
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(
                sha256_hex(&out),
                sha256_hex(&expect),
                "the re-attach resumed exactly"
            );
            assert!(
                proxy.accepted() >= 2,
                "the corrupted connection was replaced"
            );
        });
    });
}

#[test]
fn a_silently_dead_link_is_detected_within_15_seconds() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let proxy = Proxy::start(fx.addr);
        let mut config = fx.config("quiet", &["/bin/sh", "-c", "sleep 60"]);
        config["link"] = format!("tcp:{}", proxy.addr).into();
        let _guest = Guest::start(&procs, dir.path(), &config);
        smol::block_on(async {
            assert!(wait_for_link(&fx, "quiet", 1).await);
            proxy.stall(true);
            let stalled = Instant::now();
            while fx.appliance.links() > 0 {
                assert!(
                    stalled.elapsed() < Duration::from_secs(15),
                    "the dead link was not noticed in time"
                );
                smol::Timer::after(Duration::from_millis(100)).await;
            }
            let took = stalled.elapsed();
            assert!(
                took >= Duration::from_secs(4),
                "noticed suspiciously early: {took:?}"
            );
            eprintln!("dead link detected after {took:?}");
            assert!(
                fx.appliance.get("quiet").await.is_err(),
                "its containers left the map"
            );
            proxy.stall(false);
        });
    });
}

/// Link drops for `block_output_survives_link_drops_exactly_once`:
/// `TETHER_DROPS`, default 60 (about 15 s; run 1000 by hand).
fn drops() -> u32 {
    std::env::var("TETHER_DROPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
}

/// A small xorshift, seeded from the clock (the seed is printed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Checks that a stream carries `expect` byte for byte, no more.
struct Exact<'a> {
    what: &'static str,
    expect: &'a [u8],
    at: usize,
}

impl Exact<'_> {
    fn take(&mut self, out: Option<Output>) -> Option<ExitStatus> {
        match out {
            Some(Output::Stdout(b)) => {
                let end = self.at + b.len();
                assert!(
                    end <= self.expect.len(),
                    "{}: more bytes than written",
                    self.what
                );
                assert!(
                    self.expect[self.at..end] == b[..],
                    "{}: wrong bytes at offset {} (lost or duplicated): {:?}...",
                    self.what,
                    self.at,
                    String::from_utf8_lossy(&b[..b.len().min(40)])
                );
                self.at = end;
                None
            }
            Some(Output::Exit(e)) => Some(e),
            other => panic!("{}: unexpected {other:?} at offset {}", self.what, self.at),
        }
    }
}

#[test]
fn block_output_survives_link_drops_exactly_once_on_disk_and_in_an_attach() {
    const SIZE: usize = 100 << 20;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("TETHER_TEST_LOG"))
        .with_writer(std::io::stderr)
        .try_init();
    let limit = Duration::from_secs(120 + u64::from(drops()) / 2);
    with_timeout(limit, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let appliance = fx.appliance_with_store(dir.path());
        let proxy = Proxy::start(fx.addr);
        let mut config = fx.config(
            "drops",
            &[
                "/bin/sh",
                "-c",
                "seq 1 20000000 | head -c 104857600; exit 7",
            ],
        );
        config["link"] = format!("tcp:{}", proxy.addr).into();
        config["sessions"][0]["overflow"] = "block".into();
        let mut expect = seq(20_000_000);
        expect.truncate(SIZE);
        let _guest = Guest::start(&procs, dir.path(), &config);
        // The fault injector: once per connection, a cut at a random byte
        // of what the guest sends (up to SIZE / drops() bytes in), until
        // `drops()` cuts were made or the test is done.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("drop seed {seed:#x}, {} drops", drops());
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cutter = {
            let (proxy, done) = (proxy.clone(), done.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(seed | 1);
                let started = Instant::now();
                let spacing = (SIZE as u64 / u64::from(drops().max(1))).max(1);
                while proxy.cuts() < drops() && !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if proxy.accepted() > proxy.cuts() {
                        proxy.cut_after(Dir::ToAppliance, rng.below(spacing));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                started.elapsed()
            })
        };
        smol::block_on(async {
            let options = AttachOptions {
                timeout: Duration::from_secs(30),
                ..Default::default()
            };
            // The link may drop while the attach opens: then try again.
            let mut att = loop {
                match appliance.attach("drops", options.clone()).await {
                    Ok(att) => break att,
                    Err(runtime_appliance::ApiError::LinkDown(why)) => eprintln!("attach: {why}"),
                    Err(e) => panic!("attach: {e}"),
                }
                smol::Timer::after(Duration::from_millis(20)).await;
            };
            assert_eq!(att.start, 0);
            let mut live = Exact {
                what: "attach",
                expect: &expect,
                at: 0,
            };
            let exit = loop {
                if let Some(e) = live.take(att.next().await) {
                    break e;
                }
            };
            assert_eq!((exit, live.at), (ExitStatus::Code(7), SIZE));
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let took = cutter.join().unwrap();
            eprintln!(
                "{} link drops in {took:?} ({} connections) while 100 MiB went through",
                proxy.cuts(),
                proxy.accepted()
            );
            assert_eq!(
                proxy.cuts(),
                drops(),
                "the output ended before every drop was made"
            );
            let logs = runtime_appliance::LogsOptions {
                follow: true,
                ..Default::default()
            };
            let mut stored = appliance.logs("drops", logs).await.unwrap();
            assert_eq!(stored.start, 0, "the stored log starts at the first byte");
            let mut disk = Exact {
                what: "stored log",
                expect: &expect,
                at: 0,
            };
            let exit = loop {
                if let Some(e) = disk.take(stored.next().await) {
                    break e;
                }
            };
            assert_eq!((exit, disk.at), (ExitStatus::Code(7), SIZE));
        });
    });
}

/// The next output of `att`; `None` after 20 s without.
async fn next_within(att: &mut Attachment) -> Option<Output> {
    futures_lite::future::or(async { att.next().await }, async {
        smol::Timer::after(Duration::from_secs(20)).await;
        None
    })
    .await
}

/// The next output of `att` (within 20 s), which must be stdout.
async fn next_stdout(att: &mut Attachment) -> Vec<u8> {
    match next_within(att).await {
        Some(Output::Stdout(b)) => b.to_vec(),
        other => panic!("expected output, got {other:?}"),
    }
}

/// An exec with a store is followed on its own channel, which also carries
/// its client's input. A link drop longer than the listing follower's own
/// wait (2 s) must not end that input: the follower holding the exec waits
/// as long as its client does, and input written after the guest is back
/// reaches the process.
#[test]
fn an_execs_input_survives_a_link_drop_longer_than_the_followers_wait() {
    with_timeout(Duration::from_secs(60), |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let appliance = fx.appliance_with_store(dir.path());
        let proxy = Proxy::start(fx.addr);
        let mut config = fx.config("web", &["/bin/sh", "-c", "exec sleep 60"]);
        config["link"] = format!("tcp:{}", proxy.addr).into();
        let _guest = Guest::start(&procs, dir.path(), &config);
        smol::block_on(async {
            let options = runtime_appliance::ExecOptions {
                command: vec!["cat".into()],
                stdin: true,
                timeout: Duration::from_secs(30),
                ..Default::default()
            };
            let mut att = appliance.exec("web", options).await.unwrap();
            att.write_stdin(bytes::Bytes::from_static(b"one\n"))
                .await
                .unwrap();
            assert_eq!(next_stdout(&mut att).await, b"one\n");
            // The link goes, and no new one gets through for 4 s.
            proxy.stall(true);
            proxy.cut();
            smol::Timer::after(Duration::from_secs(4)).await;
            proxy.stall(false);
            att.write_stdin(bytes::Bytes::from_static(b"two\n"))
                .await
                .expect("the exec's input ended with the link");
            assert_eq!(next_stdout(&mut att).await, b"two\n");
            att.close_stdin().await.unwrap();
            assert!(
                matches!(
                    next_within(&mut att).await,
                    Some(Output::Exit(ExitStatus::Code(0)))
                ),
                "cat ended with its stdin"
            );
        });
    });
}
