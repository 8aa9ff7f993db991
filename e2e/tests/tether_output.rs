//! `tether` and the appliance together: where output is. The offset an
//! attach is told includes a gap before it, a gap mid-stream is surfaced
//! where it is, and a guest whose primary exited stays until the appliance
//! has stored all of the output.

use std::time::{Duration, Instant};

use e2e::fixtures::{Fixture, Guest};
use e2e::{sha256_hex, with_timeout};
use runtime_appliance::{AttachOptions, Attachment, ExitStatus, Output};

const LIMIT: Duration = Duration::from_secs(120);
const APPEAR: Duration = Duration::from_secs(20);

/// Reads to the end: (stdout, stderr, exit).
async fn read_all(att: &mut Attachment) -> (Vec<u8>, Vec<u8>, Option<ExitStatus>) {
    let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), None);
    while let Some(o) = att.next().await {
        match o {
            Output::Stdout(b) => out.extend_from_slice(&b),
            Output::Stderr(b) => err.extend_from_slice(&b),
            Output::Exit(e) => exit = Some(e),
            Output::Gap(n) => panic!("unexpected gap of {n}"),
        }
    }
    (out, err, exit)
}

/// Replay from offset 0, waiting up to `APPEAR` for the container.
fn options() -> AttachOptions {
    AttachOptions {
        timeout: APPEAR,
        ..Default::default()
    }
}

/// `seq 1 n`, the reference output of the offset tests.
fn seq_bytes(n: u32) -> Vec<u8> {
    (1..=n)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect()
}

#[test]
fn an_attach_is_told_an_offset_that_includes_the_gap_before_it() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let mut config = fx.config("lossy", &["/bin/sh", "-c", "seq 1 100000; sleep 30"]);
        config["sessions"][0]["output_buffer"] = 4096.into();
        let _guest = Guest::start(&procs, dir.path(), &config);
        let expect = seq_bytes(100_000);
        smol::block_on(async {
            // Wait until all of it was written (and most of it dropped).
            let end = Instant::now() + APPEAR;
            while fx
                .appliance
                .get("lossy")
                .await
                .map(|v| v.output_end)
                .unwrap_or(0)
                < expect.len() as u64
            {
                assert!(Instant::now() < end, "the output never ended");
                smol::Timer::after(Duration::from_millis(50)).await;
            }
            let mut att = fx.appliance.attach("lossy", options()).await.unwrap();
            assert!(att.start > 0, "the retained output starts later");
            let start = att.start as usize;
            let mut at = start;
            while at < expect.len() {
                match att.next().await {
                    Some(Output::Stdout(b)) => {
                        assert_eq!(&expect[at..at + b.len()], &b[..], "offset {at}");
                        at += b.len();
                    }
                    other => panic!("expected output at {at} (start {start}), got {other:?}"),
                }
            }
            assert_eq!(att.offset(), expect.len() as u64);
        });
    });
}

#[test]
fn a_gap_in_the_middle_of_a_stream_is_surfaced_where_it_is() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let mut config = fx.config("behind", &["/bin/sh", "-c", "seq 1 3000000; sleep 30"]);
        config["sessions"][0]["output_buffer"] = 65536.into();
        // Started only once attached, however long the attach takes.
        config["sessions"][0]["start_gated"] = true.into();
        let _guest = Guest::start(&procs, dir.path(), &config);
        let expect = seq_bytes(3_000_000);
        smol::block_on(async {
            // Attached before the output begins.
            let mut att = fx.appliance.attach("behind", options()).await.unwrap();
            assert_eq!(att.start, 0);
            fx.appliance.start("behind").await.unwrap();
            // Fall behind: the guest's 64 KiB log drops what this reader
            // has not been sent yet.
            smol::Timer::after(Duration::from_millis(2500)).await;
            let (mut at, mut gaps) = (att.start as usize, 0);
            while at < expect.len() {
                match att.next().await {
                    Some(Output::Stdout(b)) => {
                        assert_eq!(&expect[at..at + b.len()], &b[..], "offset {at}");
                        at += b.len();
                    }
                    Some(Output::Gap(n)) => {
                        gaps += 1;
                        at += n as usize;
                    }
                    other => panic!("at {at}: {other:?}"),
                }
                assert_eq!(att.offset(), at as u64);
            }
            assert!(gaps > 0, "the reader fell behind a 64 KiB log");
        });
    });
}

#[test]
fn the_guest_stays_until_the_appliance_has_stored_all_output() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let appliance = fx.appliance_with_store(dir.path());
        let mut config = fx.config("brief", &["/bin/sh", "-c", "seq 1 500000; exit 4"]);
        config["sessions"][0]["overflow"] = "block".into();
        let mut guest = Guest::start(&procs, dir.path(), &config);
        let status = guest.wait_exit(APPEAR).expect("the guest exits");
        assert_eq!(status.code(), Some(4));
        // The guest went only after the follower had it all on disk.
        smol::block_on(async {
            let logs = runtime_appliance::LogsOptions::default();
            let mut stored = appliance.logs("brief", logs).await.unwrap();
            let (out, err, exit) = read_all(&mut stored).await;
            assert_eq!((err.len(), exit), (0, None));
            assert_eq!(sha256_hex(&out), sha256_hex(&seq_bytes(500_000)));
            let view = appliance.get("brief").await.unwrap();
            assert_eq!((view.state, view.exit_code), ("exited", Some(4)));
        });
    });
}
