//! The serial link as a VM has it: `tether` opens a serial device (here the
//! slave of a pty pair) and the appliance's end is a TCP connection to its sync
//! listener carrying the line's bytes (here a bridge thread, as QEMU's
//! `-serial tcp:` is), made before the guest opened the line.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use e2e::fixtures::{Fixture, Guest};
use e2e::{sha256_hex, with_timeout};
use runtime_appliance::{AttachOptions, ExitStatus, Output};

const LIMIT: Duration = Duration::from_secs(120);

/// Copies bytes one way until either end closes.
fn pump(mut from: impl Read + Send + 'static, mut to: impl Write + Send + 'static) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

#[test]
fn a_guest_on_a_serial_line_syncs_and_serves_ssh() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let pty = nix::pty::openpty(None, None).unwrap();
        let device = nix::unistd::ttyname(&pty.slave).unwrap();
        // The appliance hears the line from the start: its HELLOs go into a
        // line nobody reads yet (and come back as echo), as with a VM that is
        // still booting.
        let master = std::fs::File::from(pty.master);
        let tcp = TcpStream::connect(fx.addr).unwrap();
        pump(master.try_clone().unwrap(), tcp.try_clone().unwrap());
        pump(tcp, master);

        let mut config = fx.config(
            "serial",
            &["/bin/sh", "-c", "echo over the line; seq 1 200000; exit 3"],
        );
        config["link"] = format!("serial:{}", device.display()).into();
        // Everything, however slowly the line drains, and the tail too: the
        // guest may not exit while its output is still queued for the line.
        config["sessions"][0]["overflow"] = "block".into();
        let guest = Guest::start(&procs, dir.path(), &config);
        smol::block_on(async {
            let options = AttachOptions {
                timeout: Duration::from_secs(20),
                ..Default::default()
            };
            let mut att = fx.appliance.attach("serial", options).await.unwrap();
            let mut out = Vec::new();
            let exit = loop {
                match att.next().await {
                    Some(Output::Stdout(b)) => out.extend_from_slice(&b),
                    Some(Output::Exit(e)) => break e,
                    other => panic!("unexpected {other:?}; guest log:\n{}", guest.log_text()),
                }
            };
            let mut expect = b"over the line\n".to_vec();
            expect.extend((1..=200_000).flat_map(|i| format!("{i}\n").into_bytes()));
            assert_eq!(sha256_hex(&out), sha256_hex(&expect));
            assert_eq!(exit, ExitStatus::Code(3));
        });
        let log = guest.log_text();
        assert!(log.contains("link open"), "{log}");
        // Keep the slave open until the end, so the master never sees a hangup.
        drop(pty.slave);
    });
}
