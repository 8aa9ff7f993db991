//! `tether-load`: many guest links on one `tetherd serve`, from one process.
//!
//! Starts `tetherd serve` (the binary next to this one, or `--tetherd`) with
//! a fresh state directory, connects `--links` simulated guests to it
//! (`e2e::load`: proto-core's `GuestLink` over TCP with link sync and the
//! full SSH handshake; no guest processes), and measures what one appliance
//! does with them all: handshakes per second, tetherd's resident memory per
//! idle link, `GET /v1/containers` with every container listed, and one
//! attach's latency (first output byte, stdin round trips) while all the
//! links are up. The generator shares the machine with tetherd, so its own
//! CPU time is reported too. It exits non-zero when a guest failed or an
//! answer was wrong; it asserts no speed. See the README for the figures.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message;
use clap::Parser;
use e2e::api::{ApiEndpoint, TEST_TOKEN};
use e2e::load::{GuestSpec, run_guest};
use e2e::peers::free_port;
use futures_lite::StreamExt;
use proto_core::PrivateKey;
use runtime_appliance::client::api::Api;
use runtime_appliance::client::ws;
use runtime_appliance::http::k8s;

/// Many guest links on one tetherd: handshakes/s, memory per idle link,
/// list time and attach latency.
#[derive(Debug, Parser)]
#[command(name = "tether-load")]
struct Args {
    /// Guest links to connect.
    #[arg(long, default_value_t = 10_000)]
    links: usize,
    /// A quick run for CI (200 links, short pauses): checks that everything
    /// works; its figures mean little.
    #[arg(long)]
    quick: bool,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Generator threads (each runs a share of the guests).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The tetherd binary (default: the one next to this program).
    #[arg(long)]
    tetherd: Option<PathBuf>,
    /// One more argument for `tetherd serve` (repeatable), e.g.
    /// `--tetherd-arg=--max-links=20000`.
    #[arg(long = "tetherd-arg", value_name = "ARG", allow_hyphen_values = true)]
    tetherd_args: Vec<String>,
    /// Stdin round trips timed on the attach.
    #[arg(long, default_value_t = 200)]
    round_trips: usize,
    /// Keep every link up this long after measuring (to profile tetherd:
    /// its pid is printed).
    #[arg(long, value_parser = humantime::parse_duration)]
    hold: Option<Duration>,
}

/// What the guest threads report.
#[derive(Default)]
struct Progress {
    /// Handshake times (connect to authenticated), in completion order.
    handshakes: Vec<Duration>,
    /// When the last handshake finished.
    last: Option<Instant>,
    failures: Vec<String>,
}

fn main() {
    let mut args = Args::parse();
    if args.quick {
        args.links = args.links.min(200);
        args.round_trips = args.round_trips.min(20);
    }
    watchdog(&args);
    if let Err(e) = run(&args) {
        eprintln!("tether-load: {e}");
        std::process::exit(1);
    }
}

/// What the run is doing, for the watchdog's message.
static PHASE: Mutex<&str> = Mutex::new("starting tetherd");

fn phase(now: &'static str) {
    *PHASE.lock().unwrap() = now;
}

/// Ends the run with an error if it takes far longer than it should (a
/// tetherd that stopped answering must fail CI, not hang it).
fn watchdog(args: &Args) {
    let limit = Duration::from_secs(120) + Duration::from_millis(30 * args.links as u64);
    let hold = args.hold.unwrap_or_default();
    std::thread::spawn(move || {
        std::thread::sleep(limit + hold);
        eprintln!(
            "tether-load: gave up after {:?} while {}",
            limit + hold,
            PHASE.lock().unwrap()
        );
        std::process::exit(1);
    });
}

fn run(args: &Args) -> Result<(), String> {
    let (_, fds) = runtime_appliance::limits::raise_fd_limit().map_err(|e| e.to_string())?;
    if fds < args.links as u64 + 64 {
        return Err(format!(
            "{} links need that many file descriptors; the limit is {fds}",
            args.links
        ));
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let appliance_key = PrivateKey::from_seed([200; 32]);
    let tetherd = Tetherd::start(args, dir.path(), &appliance_key)?;
    println!(
        "tether-load: {} guest links to one tetherd (pid {}), {} generator thread(s), {} handshakes in flight",
        args.links,
        tetherd.pid(),
        args.threads,
        args.concurrency
    );
    let settle = if args.quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(3)
    };
    std::thread::sleep(settle);
    let rss_before = rss_kib(tetherd.pid())?;
    let own_before = own_rss_kib();
    let cpu_before = (cpu_time(tetherd.pid())?, own_cpu());

    phase("connecting the guests");
    let progress = Arc::new(Mutex::new(Progress::default()));
    let started = Instant::now();
    spawn_guests(args, tetherd.guests, &appliance_key, progress.clone());
    let limit = Duration::from_secs(60) + Duration::from_millis(20 * args.links as u64);
    loop {
        let p = progress.lock().unwrap();
        if p.handshakes.len() + p.failures.len() >= args.links {
            break;
        }
        drop(p);
        if started.elapsed() > limit {
            return Err(format!("not every guest connected within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (mut times, last, failures) = {
        let p = progress.lock().unwrap();
        (p.handshakes.clone(), p.last, p.failures.clone())
    };
    if !failures.is_empty() {
        return Err(format!(
            "{} of {} guests failed; the first: {}",
            failures.len(),
            args.links,
            failures[0]
        ));
    }
    let connecting = last.unwrap_or_else(Instant::now) - started;
    let cpu_connected = (cpu_time(tetherd.pid())?, own_cpu());
    times.sort();
    println!(
        "handshakes      {} in {:.2} s: {:.0}/s (each, connect to authenticated: p50 {}, p99 {})",
        times.len(),
        connecting.as_secs_f64(),
        times.len() as f64 / connecting.as_secs_f64(),
        ms(percentile(&times, 50)),
        ms(percentile(&times, 99)),
    );
    print_cpu("while connecting", cpu_before, cpu_connected, connecting);

    phase("waiting for every container to be listed");
    let api = &tetherd.api;
    loop {
        let (_, running, _) = list(api, args.links)?;
        if running == args.links {
            break;
        }
        if started.elapsed() > limit {
            return Err(format!(
                "only {running} of {} containers listed as running",
                args.links
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "listed          all {} running after {:.2} s",
        args.links,
        started.elapsed().as_secs_f64()
    );

    phase("measuring idle links");
    std::thread::sleep(settle);
    let idle_from = (cpu_time(tetherd.pid())?, own_cpu(), Instant::now());
    std::thread::sleep(settle * 2);
    let idle_to = (cpu_time(tetherd.pid())?, own_cpu());
    print_cpu(
        "idle",
        (idle_from.0, idle_from.1),
        idle_to,
        idle_from.2.elapsed(),
    );
    let rss_after = rss_kib(tetherd.pid())?;
    println!(
        "tetherd RSS     {:.1} MiB before, {:.1} MiB with {} idle links: {:.1} KiB per link",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        args.links,
        rss_after.saturating_sub(rss_before) as f64 / args.links as f64
    );
    println!(
        "generator RSS   {:.1} KiB per link",
        own_rss_kib().saturating_sub(own_before) as f64 / args.links as f64
    );

    phase("timing GET /v1/containers");
    let mut list_times = Vec::new();
    let mut size = 0;
    for _ in 0..5 {
        let (body, running, took) = list(api, args.links)?;
        list_times.push(took);
        size = body;
        if running != args.links {
            return Err(format!("{running} of {} listed as running", args.links));
        }
    }
    list_times.sort();
    println!(
        "GET /v1/containers  {} containers, {} KiB: median {}, min {}",
        args.links,
        size / 1024,
        ms(list_times[2]),
        ms(list_times[0])
    );

    phase("attaching");
    attach(&tetherd, args)?;

    phase("holding the links");
    if let Some(hold) = args.hold {
        println!(
            "holding {} links for {hold:?} (tetherd pid {})",
            args.links,
            tetherd.pid()
        );
        std::thread::sleep(hold);
    }
    Ok(())
}

/// The greeting guest `i` wrote before its link came up.
fn greeting(id: &str) -> String {
    format!("hello from {id}\n")
}

fn guest_id(i: usize) -> String {
    format!("load{i:05}")
}

/// Starts the guest threads; each connects its share of the guests, at
/// most `concurrency` handshakes in flight overall.
fn spawn_guests(
    args: &Args,
    addr: SocketAddr,
    appliance: &PrivateKey,
    progress: Arc<Mutex<Progress>>,
) {
    let (tokens, slots) = async_channel::bounded::<()>(args.concurrency.max(1));
    let next = Arc::new(AtomicUsize::new(0));
    for _ in 0..args.threads.max(1) {
        let (tokens, slots, next, progress) = (
            tokens.clone(),
            slots.clone(),
            next.clone(),
            progress.clone(),
        );
        let (links, appliance) = (args.links, *appliance.public());
        std::thread::spawn(move || {
            let ex = smol::LocalExecutor::new();
            smol::block_on(ex.run(async {
                loop {
                    // Take the next guest once a handshake slot is free.
                    tokens.send(()).await.expect("slots stay open");
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= links {
                        let _ = slots.try_recv();
                        break;
                    }
                    let id = guest_id(i);
                    let spec = GuestSpec {
                        greeting: greeting(&id).into(),
                        host_key: PrivateKey::from_seed(seed(i)),
                        appliance,
                        keepalive: Duration::from_secs(4),
                        id,
                    };
                    let (slots, progress) = (slots.clone(), progress.clone());
                    let begun = Instant::now();
                    ex.spawn(async move {
                        let authenticated = std::rc::Rc::new(std::cell::Cell::new(false));
                        let done = {
                            let (slots, progress, authenticated) =
                                (slots.clone(), progress.clone(), authenticated.clone());
                            move |at: Instant| {
                                authenticated.set(true);
                                let _ = slots.try_recv();
                                let mut p = progress.lock().unwrap();
                                p.handshakes.push(at - begun);
                                p.last = Some(at);
                            }
                        };
                        let end = run_guest(addr, spec, done).await;
                        let why = match end {
                            Ok(end) => format!("link ended: {end}"),
                            Err(e) => format!("link failed: {e}"),
                        };
                        if !authenticated.get() {
                            let _ = slots.try_recv();
                        }
                        progress.lock().unwrap().failures.push(why);
                    })
                    .detach();
                }
                // Keep serving the links.
                futures_lite::future::pending::<()>().await
            }))
        });
    }
}

fn seed(i: usize) -> [u8; 32] {
    let mut seed = [7u8; 32];
    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
    seed
}

/// One attach to a container in the middle, while every link is up: time
/// to its first output byte, then stdin round trips (the guest echoes).
fn attach(tetherd: &Tetherd, args: &Args) -> Result<(), String> {
    let id = guest_id(args.links / 2);
    let api = Api::parse(&tetherd.api.url())
        .map_err(|e| e.to_string())?
        .with_token(Some(TEST_TOKEN.into()));
    smol::block_on(async {
        let t = Instant::now();
        let path = format!("/v1/containers/{id}/attach?stdin=1&stdout=1&stderr=1");
        let mut conn = ws::connect(&api, &path)
            .await
            .map_err(|e| format!("attach {id}: {e}"))?;
        let want = greeting(&id);
        let mut got = Vec::new();
        let mut first = None;
        while got.len() < want.len() {
            got.extend_from_slice(&stdout(&mut conn.ws).await?);
            first.get_or_insert_with(|| t.elapsed());
        }
        if got != want.as_bytes() {
            return Err(format!(
                "attach {id}: got {:?}, want {want:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        let mut trips = Vec::new();
        for n in 0..args.round_trips {
            let byte = [b'a' + (n % 26) as u8];
            let t = Instant::now();
            conn.ws
                .send(Message::Binary(k8s::frame(k8s::STDIN, &byte)))
                .await
                .map_err(|e| format!("attach {id}: sending stdin: {e}"))?;
            let echo = stdout(&mut conn.ws).await?;
            trips.push(t.elapsed());
            if echo.as_ref() != byte {
                return Err(format!("attach {id}: echo {echo:?}, want {byte:?}"));
            }
        }
        trips.sort();
        println!(
            "attach          first output byte after {}; stdin round trip p50 {}, p99 {} ({} trips)",
            ms(first.unwrap_or_default()),
            ms(percentile(&trips, 50)),
            ms(percentile(&trips, 99)),
            trips.len()
        );
        let _ = conn.ws.close(None).await;
        Ok(())
    })
}

/// The next stdout bytes of an attach.
async fn stdout<S>(ws: &mut S) -> Result<bytes::Bytes, String>
where
    S: futures_lite::Stream<Item = Result<Message, async_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b.first() == Some(&k8s::STDOUT) => {
                return Ok(b.slice(1..));
            }
            Some(Ok(Message::Binary(b))) => {
                return Err(format!(
                    "attach: unexpected frame on channel {:?}",
                    b.first()
                ));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("attach: {e}")),
            None => return Err("attach: the stream ended".into()),
        }
    }
}

/// `GET /v1/containers`: the body's size, how many are running on a live
/// link, and how long the request took (not counting parsing the answer).
fn list(api: &ApiEndpoint, expected: usize) -> Result<(usize, usize, Duration), String> {
    let t = Instant::now();
    let (status, body) = api.http("GET", "/v1/containers", &[], "");
    let took = t.elapsed();
    if status != 200 {
        return Err(format!("GET /v1/containers: {status} {body}"));
    }
    let views: Vec<serde_json::Value> =
        serde_json::from_str(&body).map_err(|e| format!("GET /v1/containers: {e}"))?;
    let running = views
        .iter()
        .filter(|v| v["state"] == "running" && !v["connection"].is_null())
        .count();
    if views.len() > expected {
        return Err(format!(
            "{} containers listed, {expected} expected",
            views.len()
        ));
    }
    Ok((body.len(), running, took))
}

/// The `tetherd serve` under load, killed on drop.
struct Tetherd {
    child: Child,
    guests: SocketAddr,
    api: ApiEndpoint,
}

impl Tetherd {
    fn start(args: &Args, dir: &Path, key: &PrivateKey) -> Result<Self, String> {
        let binary = match &args.tetherd {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .map_err(|e| e.to_string())?
                .with_file_name("tetherd"),
        };
        let key_file = dir.join("appliance.key");
        fs::write(&key_file, key.to_openssh("tetherd")).map_err(|e| e.to_string())?;
        let api = ApiEndpoint::tcp(dir);
        let guests = SocketAddr::from(([127, 0, 0, 1], free_port().map_err(|e| e.to_string())?));
        let log = fs::File::create(dir.join("tetherd.log")).map_err(|e| e.to_string())?;
        let child = Command::new(&binary)
            .arg("serve")
            .arg("--listen")
            .arg(guests.to_string())
            .args(api.serve_args())
            .arg("--accept-any-host-key")
            .arg("--key")
            .arg(&key_file)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(&args.tetherd_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let tetherd = Self { child, guests, api };
        tetherd.api.wait_ready();
        Ok(tetherd)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Tetherd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process's resident memory (VmRSS), in KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("tetherd (pid {pid}) is gone: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

fn own_rss_kib() -> u64 {
    rss_kib(std::process::id()).unwrap_or(0)
}

/// A process's CPU time so far (user and system).
fn cpu_time(pid: u32) -> Result<Duration, String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("tetherd (pid {pid}) is gone: {e}"))?;
    // Fields after the command name (which may hold spaces) start at state.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after state.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Ok(Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz))
}

fn own_cpu() -> Duration {
    cpu_time(std::process::id()).unwrap_or_default()
}

fn print_cpu(phase: &str, from: (Duration, Duration), to: (Duration, Duration), wall: Duration) {
    let share = |d: Duration| 100.0 * d.as_secs_f64() / wall.as_secs_f64().max(1e-9);
    let (tetherd, own) = (to.0 - from.0, to.1 - from.1);
    println!(
        "CPU {phase:<12} tetherd {:.2} s ({:.0}% of a core), generator {:.2} s ({:.0}%) over {:.2} s",
        tetherd.as_secs_f64(),
        share(tetherd),
        own.as_secs_f64(),
        share(own),
        wall.as_secs_f64()
    );
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) * p / 100).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }
}
