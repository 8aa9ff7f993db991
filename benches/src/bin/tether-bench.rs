//! `scripts/bench`: Tether's CLI beside OpenSSH, in one run on one machine,
//! each figure printed with its OpenSSH baseline and their ratio.
//!
//! - attach: `tetherd attach` of a process writing SIZE bytes of zeros
//!   (process -> tether -> loopback TCP link -> tetherd and its store ->
//!   WebSocket -> the CLI's stdout), against `ssh host head -c SIZE /dev/zero`.
//! - exec: `tetherd exec ID -- head -c SIZE /dev/zero`, against the same ssh.
//! - keystroke: one byte typed into `tetherd attach` of a tty session running
//!   `cat` until its echo comes back, against `ssh -tt host cat`.
//!
//! Both use aes256-gcm@openssh.com; runs of the stacks alternate, and the
//! terminals take turns key by key, so a busy moment of a shared machine falls
//! on both. Beside each rate: the CPU time per GB of every process on the path
//! (the guest or sshd's session with the writer, tetherd, the CLI or ssh),
//! which depends much less on what else the machine does. Usage:
//! `tether-bench [--quick] [--size BYTES] [--runs N] [--keys N] [--api tcp|unix]`.

use std::process::ExitCode;
use std::time::Duration;

use benches::measure::{
    DescendantCpu, Terminal, Transfer, interleaved_keystrokes, quantile, reaped_children_cpu,
    transfer,
};
use benches::stack::{CIPHER, OpenSsh, Tether};
use e2e::api::ApiEndpoint;
use e2e::harness::Procs;

struct Options {
    size: u64,
    runs: usize,
    keys: usize,
    tcp_api: bool,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let mut o = Self {
            size: 1 << 30,
            runs: 3,
            keys: 1000,
            tcp_api: true,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = |what: &str| args.next().ok_or_else(|| format!("{arg} needs {what}"));
            let number = |v: String| {
                v.parse::<u64>()
                    .map_err(|_| format!("{arg} {v:?}: expected a whole number"))
            };
            match arg.as_str() {
                "--quick" => (o.size, o.runs, o.keys) = (16 << 20, 1, 50),
                "--size" => o.size = number(value("a byte count")?)?,
                "--runs" => o.runs = number(value("a count")?)?.max(1) as usize,
                "--keys" => o.keys = number(value("a count")?)?.max(1) as usize,
                "--api" => {
                    o.tcp_api = match value("tcp or unix")?.as_str() {
                        "tcp" => true,
                        "unix" => false,
                        v => return Err(format!("--api {v:?}: expected tcp or unix")),
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown argument {arg:?}; usage: tether-bench [--quick] [--size BYTES] \
                         [--runs N] [--keys N] [--api tcp|unix]"
                    ));
                }
            }
        }
        Ok(o)
    }
}

/// The guest's sessions: one gated writer per attach run (the attach starts
/// it), the idle primary (its id is the guest's) for the execs, and a terminal running `cat`.
fn sessions(o: &Options) -> serde_json::Value {
    let mut list: Vec<serde_json::Value> = (0..o.runs)
        .map(|i| {
            serde_json::json!({
                "id": format!("out{i}"),
                "cmd": ["head", "-c", o.size.to_string(), "/dev/zero"],
                "stdin": false,
                "overflow": "block",
                "start_gated": true,
                "start_gate_timeout": "1h",
            })
        })
        .collect();
    // The exec target runs until its tether goes (killed at the end, tether
    // leaves its sessions behind).
    let until_tether_goes = "while kill -0 $PPID 2>/dev/null; do sleep 1; done";
    list.push(serde_json::json!({"id": "bench", "cmd": ["sh", "-c", until_tether_goes]}));
    list.push(serde_json::json!({"id": "keys", "cmd": ["cat"], "tty": true}));
    serde_json::Value::Array(list)
}

fn median_rate(runs: &[Transfer]) -> f64 {
    let mut rates: Vec<f64> = runs.iter().map(Transfer::mb_per_s).collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn print_rates(name: &str, ours: &[Transfer], base: Option<&[Transfer]>) {
    let list = |r: &[Transfer]| {
        r.iter()
            .map(|t| format!("{:.0}", t.mb_per_s()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let m = median_rate(ours);
    match base {
        Some(b) => {
            let bm = median_rate(b);
            println!(
                "{name:<10} tether {m:>7.0} MB/s   openssh {bm:>7.0} MB/s   ratio {:.2}x   (runs: {} | {})",
                m / bm,
                list(ours),
                list(b)
            );
        }
        None => println!("{name:<10} tether {m:>7.0} MB/s   (runs: {})", list(ours)),
    }
}

/// A reading of CPU time taken after a moment: sshd reaps a session, and the
/// guest a writer, just after the client saw the end of the stream.
fn settled<T>(read: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::thread::sleep(Duration::from_millis(300));
    read()
}

/// Adds what each process used between two readings.
fn add_cpu(sum: &mut [Duration; 3], before: [Duration; 3], after: [Duration; 3]) {
    for ((s, b), a) in sum.iter_mut().zip(before).zip(after) {
        *s += a.saturating_sub(b);
    }
}

/// CPU seconds per GB moved, by process, beside OpenSSH's: unlike the rates,
/// this hardly depends on what else the machine is doing.
fn print_cpu(name: &str, ours: [Duration; 3], base: Option<[Duration; 3]>, gb: f64) {
    let per = |d: Duration| d.as_secs_f64() / gb;
    let total: f64 = ours.iter().copied().map(per).sum();
    let line = format!(
        "{name:<10} cpu/GB tether {total:.2} s (guest {:.2}, tetherd {:.2}, cli {:.2})",
        per(ours[0]),
        per(ours[1]),
        per(ours[2])
    );
    match base {
        Some(b) => {
            let theirs: f64 = b.iter().copied().map(per).sum();
            println!(
                "{line}   openssh {theirs:.2} s (sshd {:.2}, ssh {:.2})   ratio {:.2}x",
                per(b[0]),
                per(b[1]),
                theirs / total
            );
        }
        None => println!("{line}"),
    }
}

fn print_keys(name: &str, ours: &mut [Duration], base: Option<&mut [Duration]>) {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (m, p) = (us(quantile(ours, 0.5)), us(quantile(ours, 0.99)));
    match base {
        Some(b) => {
            let (bm, bp) = (us(quantile(b, 0.5)), us(quantile(b, 0.99)));
            println!(
                "{name:<10} tether median {m:>6.0} µs p99 {p:>6.0} µs   openssh median {bm:>6.0} µs p99 {bp:>6.0} µs   ratio median {:.2}x p99 {:.2}x   ({} keys)",
                m / bm,
                p / bp,
                ours.len()
            );
        }
        None => println!(
            "{name:<10} tether median {m:>6.0} µs p99 {p:>6.0} µs   ({} keys)",
            ours.len()
        ),
    }
}

fn bench(o: &Options, procs: &Procs) -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .disable_cleanup(std::env::var_os("TETHER_BENCH_KEEP").is_some())
        .prefix("tether-bench")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let api = if o.tcp_api {
        ApiEndpoint::tcp(dir.path())
    } else {
        ApiEndpoint::unix(dir.path())
    };
    let t = Tether::start(procs, dir.path(), api, sessions(o))?;
    let ssh = match OpenSsh::start(procs, dir.path()) {
        Ok(s) => Some(s),
        // CI (TETHER_REQUIRE_ALL=1) has every peer: a missing one is a failure.
        Err(e) if std::env::var_os("TETHER_REQUIRE_ALL").is_some_and(|v| v == "1") => {
            return Err(format!("no OpenSSH baseline: {e}"));
        }
        Err(e) => {
            eprintln!("no OpenSSH baseline: {e}");
            None
        }
    };
    println!(
        "tether-bench: {} MB per transfer, {} runs, {} keystrokes, API over {}, cipher {CIPHER}",
        o.size / 1_000_000,
        o.runs,
        o.keys,
        if o.tcp_api { "TCP" } else { "a unix socket" }
    );
    let zeros = ["head", "-c", &o.size.to_string(), "/dev/zero"].join(" ");
    let (mut attach, mut exec, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let (mut attach_cpu, mut exec_cpu, mut base_cpu) = (
        [Duration::ZERO; 3],
        [Duration::ZERO; 3],
        [Duration::ZERO; 3],
    );
    // CPU by process: [guest, tetherd serve, the CLI] or [sshd's session, ssh, -].
    let ours = || -> Result<[Duration; 3], String> {
        let (serve, guest) = t.cpu()?;
        Ok([guest, serve, reaped_children_cpu()])
    };
    for i in 0..o.runs {
        let id = format!("out{i}");
        // The writer starts once the attach is in place (an attach that
        // joined late would replay the head of the stream from the store).
        let release = || {
            std::thread::sleep(Duration::from_millis(300));
            match t
                .api
                .http("POST", &format!("/v1/containers/{id}/start"), &[], "")
            {
                (200, _) => Ok(()),
                (code, body) => Err(format!("start {id}: {code} {body}")),
            }
        };
        let attach_cmd = &mut t.cli(&["attach", "--no-stdin", &id]);
        let before = ours()?;
        attach.push(transfer(procs, attach_cmd, o.size, release)?);
        add_cpu(&mut attach_cpu, before, settled(ours)?);
        let mut exec_cmd = t.cli(&["exec", "bench", "--"]);
        exec_cmd.args(zeros.split(' '));
        let before = ours()?;
        exec.push(transfer(procs, &mut exec_cmd, o.size, || Ok(()))?);
        add_cpu(&mut exec_cpu, before, settled(ours)?);
        if let Some(s) = &ssh {
            // sshd's sessions are watched while they run: their time never
            // reaches the listener's counters.
            let (client, sessions) = (reaped_children_cpu(), DescendantCpu::watch(s.pid()));
            base.push(transfer(procs, s.ssh().arg(&zeros), o.size, || Ok(()))?);
            let sessions = sessions.stop();
            let client = settled(|| Ok(reaped_children_cpu()))? - client;
            add_cpu(
                &mut base_cpu,
                [Duration::ZERO; 3],
                [sessions, client, Duration::ZERO],
            );
        }
    }
    let base = ssh.as_ref().map(|_| base.as_slice());
    print_rates("attach", &attach, base);
    print_rates("exec", &exec, base);
    let gb = (o.size * o.runs as u64) as f64 / 1e9;
    let base_cpu = ssh.as_ref().map(|_| base_cpu);
    print_cpu("attach", attach_cpu, base_cpu, gb);
    print_cpu("exec", exec_cpu, base_cpu, gb);
    let warmup = (o.keys / 10).max(5);
    // The three terminals take turns key by key (see interleaved_keystrokes).
    let mut attach_term = Terminal::start(procs, &mut t.cli(&["attach", "keys"]))?;
    let mut exec_term = Terminal::start(
        procs,
        &mut t.cli(&["exec", "-t", "-i", "bench", "--", "cat"]),
    )?;
    let mut ssh_term = match &ssh {
        Some(s) => Some(Terminal::start(procs, s.ssh().arg("-tt").arg("cat"))?),
        None => None,
    };
    let mut terms: Vec<&mut Terminal> = vec![&mut attach_term, &mut exec_term];
    if let Some(s) = ssh_term.as_mut() {
        terms.push(s);
    }
    let mut rtts = interleaved_keystrokes(&mut terms, warmup, o.keys)?.into_iter();
    let (mut ours, mut exec) = (
        rtts.next().unwrap_or_default(),
        rtts.next().unwrap_or_default(),
    );
    let mut theirs = rtts.next();
    print_keys("keystroke", &mut ours, theirs.as_deref_mut());
    print_keys("key exec", &mut exec, theirs.as_deref_mut());
    Ok(())
}

fn main() -> ExitCode {
    let options = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("tether-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let procs = Procs::default();
    let result = bench(&options, &procs);
    procs.kill_all();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
