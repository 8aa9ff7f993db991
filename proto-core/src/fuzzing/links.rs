//! Both tether layers in memory: a guest (`GuestLink` over `Sessions`) and an
//! appliance (`ApplianceLink`) joined by a virtual wire with a virtual clock
//! and input split at chosen points, plus a stand-in runtime that carries out
//! the guest's events. The tether layer's pair tests and its fuzz target
//! (`tether_links`) drive the same harness.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::{FuzzRng, Input};
use crate::crypto::CryptoProvider;
use crate::crypto::null::NullProvider;
use crate::error::Error;
use crate::keys::PrivateKey;
use crate::outlog::{Overflow, Stream};
use crate::request::ChannelRequest;
use crate::tether::{
    ApplianceEvent, ApplianceLink, AttachRequest, Credit, ExitStatus, GuestEvent, GuestLink, Kind,
    LIVE, Open, SessionSpec, Sessions, Signal,
};
use crate::{ChannelId, ClientConfig, Config, HostKeyPolicy, ServerConfig};

/// The container id of the harness guest.
pub const PRIMARY: &str = "web";

/// What the stand-in runtime did with the guest's events.
#[derive(Debug, Default)]
pub struct Runtime {
    /// Stdin bytes per session, in the order they were written.
    pub stdin: BTreeMap<String, Vec<u8>>,
    /// Sessions whose stdin was closed.
    pub stdin_closed: Vec<String>,
    pub signals: Vec<(String, Signal)>,
    pub resizes: Vec<(String, u16, u16)>,
    /// Execs started: (session, command).
    pub execs: Vec<(String, Option<String>)>,
    /// `fork@tether` requests the guest asked the runtime to carry out.
    pub forks: Vec<crate::tether::ForkMode>,
    /// Answers the appliance gave to `forked@tether`.
    pub forked_answers: Vec<bool>,
    /// Hold stdin credits instead of returning them at once.
    pub hold_stdin: bool,
    pub held: Vec<(Credit, usize)>,
}

/// A guest and an appliance on one in-memory link.
pub struct LinkPair {
    pub now: Instant,
    pub sessions: Sessions,
    pub guest: GuestLink,
    pub appliance: ApplianceLink,
    pub runtime: Runtime,
    /// Events the appliance reported, in order.
    pub events: Vec<ApplianceEvent>,
    pub guest_error: Option<Error>,
    pub appliance_error: Option<Error>,
    /// Splits every transmit at random points when set.
    pub split: Option<FuzzRng>,
    provider: Arc<dyn CryptoProvider>,
    seed: u64,
}

fn configs(provider: &Arc<dyn CryptoProvider>) -> (Config, Config) {
    let client_key = PrivateKey::from_seed([1; 32]);
    let host_key = PrivateKey::from_seed([2; 32]);
    let mut server = Config::server(ServerConfig::new(
        host_key.clone(),
        vec![*client_key.public()],
    ));
    let mut client = Config::client(ClientConfig {
        user: "tetherd".into(),
        key: Some(client_key),
        host_keys: HostKeyPolicy::Pinned(vec![*host_key.public()]),
    });
    server.provider = provider.clone();
    client.provider = provider.clone();
    (client, server)
}

impl LinkPair {
    /// A pair under the null provider (fast, for fuzzing) with a primary
    /// session that has `buffer` bytes of log under `overflow`.
    pub fn new(buffer: usize, overflow: Overflow) -> Self {
        Self::with_provider(Arc::new(NullProvider), buffer, overflow, 1)
    }

    /// A pair with a chosen crypto provider and RNG seed.
    pub fn with_provider(
        provider: Arc<dyn CryptoProvider>,
        buffer: usize,
        overflow: Overflow,
        seed: u64,
    ) -> Self {
        let now = Instant::now();
        let mut sessions = Sessions::new(PRIMARY, 1 << 20);
        sessions.add(SessionSpec {
            id: PRIMARY.into(),
            kind: Kind::Primary,
            tty: false,
            stdin: true,
            output_buffer: buffer,
            overflow,
        });
        let (client, server) = configs(&provider);
        let guest = GuestLink::new(server, now, Box::new(FuzzRng::new(seed)), &mut sessions);
        let appliance = ApplianceLink::new(client, now, Box::new(FuzzRng::new(seed + 1)));
        Self {
            now,
            sessions,
            guest,
            appliance,
            runtime: Runtime::default(),
            events: Vec::new(),
            guest_error: None,
            appliance_error: None,
            split: None,
            provider,
            seed,
        }
    }

    /// The link drops and a new one comes up over the same sessions (the
    /// guest's processes and logs live on). The old link's events are dropped:
    /// the new link reuses channel numbers.
    pub fn relink(&mut self) {
        self.events.clear();
        self.seed += 2;
        let (client, server) = configs(&self.provider);
        let guest = GuestLink::new(
            server,
            self.now,
            Box::new(FuzzRng::new(self.seed)),
            &mut self.sessions,
        );
        std::mem::replace(&mut self.guest, guest).end(&mut self.sessions);
        self.appliance =
            ApplianceLink::new(client, self.now, Box::new(FuzzRng::new(self.seed + 1)));
        self.guest_error = None;
        self.appliance_error = None;
    }

    /// Runs both sides until nothing moves.
    pub fn drive(&mut self) {
        self.run_until_quiet(true);
    }

    /// Like [`LinkPair::drive`], with a guest runtime slow to pump: the
    /// guest pumps only once nothing else moves, so what arrives meanwhile is
    /// handled before anything the pump would send.
    pub fn drive_lazily(&mut self) {
        self.run_until_quiet(false);
    }

    /// Carries bytes and events both ways until nothing moves; the guest
    /// pumps every round (`eager`) or only when nothing else moved.
    fn run_until_quiet(&mut self, eager: bool) {
        for _ in 0..100_000 {
            if eager {
                self.guest.pump(&mut self.sessions);
            }
            let to_appliance = self.carry_to_appliance();
            let to_guest = self.carry_to_guest();
            let events = self.collect();
            if !(to_appliance || to_guest || events) {
                if eager {
                    return;
                }
                self.guest.pump(&mut self.sessions);
                if !self.carry_to_appliance() {
                    return;
                }
            }
        }
        panic!("the pair never went quiet");
    }

    /// Moves the clock and fires due timers, then drives.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        if self.guest.poll_timeout().is_some_and(|t| t <= self.now) {
            let r = self.guest.handle_timeout(&mut self.sessions, self.now);
            self.guest_error = self.guest_error.take().or(r.err());
        }
        if self.appliance.poll_timeout().is_some_and(|t| t <= self.now) {
            let r = self.appliance.handle_timeout(self.now);
            self.appliance_error = self.appliance_error.take().or(r.err());
        }
        self.drive();
    }

    fn pieces(&mut self, data: Bytes) -> Vec<Bytes> {
        let Some(rng) = &mut self.split else {
            return vec![data];
        };
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let n = (rand_core::RngCore::next_u32(rng) as usize % 300 + 1).min(rest.len());
            out.push(rest.split_to(n));
        }
        out
    }

    fn carry_to_appliance(&mut self) -> bool {
        let mut moved = false;
        while let Some(out) = self.guest.poll_transmit() {
            moved = true;
            for piece in self.pieces(out) {
                if self.appliance_error.is_none()
                    && let Err(e) = self.appliance.handle_input(self.now, &piece)
                {
                    self.appliance_error = Some(e);
                }
            }
        }
        moved
    }

    fn carry_to_guest(&mut self) -> bool {
        let mut moved = false;
        while let Some(out) = self.appliance.poll_transmit() {
            moved = true;
            for piece in self.pieces(out) {
                if self.guest_error.is_none()
                    && let Err(e) = self.guest.handle_input_bytes(
                        &mut self.sessions,
                        self.now,
                        BytesMut::from(&piece[..]),
                    )
                {
                    self.guest_error = Some(e);
                }
            }
        }
        moved
    }

    /// Carries out the guest's events as a runtime would; records the
    /// appliance's. True if there were any.
    fn collect(&mut self) -> bool {
        let mut any = false;
        while let Some(event) = self.guest.poll_event() {
            any = true;
            self.run(event);
        }
        while let Some(event) = self.appliance.poll_event() {
            any = true;
            self.events.push(event);
        }
        while self.sessions.poll_event().is_some() {}
        any
    }

    fn run(&mut self, event: GuestEvent) {
        let rt = &mut self.runtime;
        match event {
            GuestEvent::Stdin {
                session,
                data,
                credit,
            } => {
                rt.stdin
                    .entry(session)
                    .or_default()
                    .extend_from_slice(&data);
                if rt.hold_stdin {
                    rt.held.push((credit, data.len()));
                } else {
                    self.sessions.stdin_written(credit, data.len());
                }
            }
            GuestEvent::CloseStdin { session } => rt.stdin_closed.push(session),
            GuestEvent::Signal { session, signal } => rt.signals.push((session, signal)),
            GuestEvent::Resize {
                session,
                cols,
                rows,
            } => rt.resizes.push((session, cols, rows)),
            GuestEvent::Start { session } => self.sessions.started(&session),
            GuestEvent::Exec {
                session, command, ..
            } => {
                self.sessions.started(&session);
                rt.execs.push((session, command));
            }
            GuestEvent::Fork { mode } => rt.forks.push(mode),
            GuestEvent::ForkedAnswered { accepted } => rt.forked_answers.push(accepted),
            _ => {}
        }
    }

    /// Returns the stdin credits held so far.
    pub fn release_stdin(&mut self) {
        for (credit, n) in std::mem::take(&mut self.runtime.held) {
            self.sessions.stdin_written(credit, n);
        }
    }

    /// Takes the appliance's events so far.
    pub fn take_events(&mut self) -> Vec<ApplianceEvent> {
        std::mem::take(&mut self.events)
    }

    /// Output delivered on `channel` (both streams, in order), its gaps
    /// summed, and whether the channel saw its exit.
    pub fn received(&self, channel: ChannelId) -> (Vec<u8>, u64, Option<ExitStatus>) {
        let mut data = Vec::new();
        let (mut lost, mut exit) = (0, None);
        for e in &self.events {
            match e {
                ApplianceEvent::Data {
                    channel: c,
                    data: d,
                    ..
                } if *c == channel => data.extend_from_slice(d),
                ApplianceEvent::Gap {
                    channel: c,
                    lost: l,
                } if *c == channel => lost += l,
                ApplianceEvent::Exit { channel: c, status } if *c == channel => {
                    exit = Some(status.clone())
                }
                _ => {}
            }
        }
        (data, lost, exit)
    }

    /// Hands back the window of everything delivered on `channel`.
    pub fn consume_all(&mut self, channel: ChannelId) {
        let n: usize = self
            .events
            .iter()
            .map(|e| match e {
                ApplianceEvent::Data {
                    channel: c, data, ..
                } if *c == channel => data.len(),
                _ => 0,
            })
            .sum();
        self.appliance.consumed(channel, n);
    }

    /// An attach request for the primary.
    pub fn attach(from: u64, stdin: bool) -> Open {
        Open::Attach(AttachRequest {
            id: PRIMARY.into(),
            stdin,
            stdout: true,
            stderr: true,
            from,
        })
    }
}

/// The `tether_links` fuzz target: both layers driven by arbitrary commands
/// (attach, exec, stdin, signals, output, exits, link drops, forks, time) with input
/// split at fuzzer-chosen points. Invariants: no panic; every attach channel
/// that reports output reports it in offset order with no byte twice.
pub fn tether_links(data: &[u8]) {
    let mut input = Input::new(data);
    let overflow = if input.u8() & 1 == 0 {
        Overflow::DropOldest
    } else {
        Overflow::Block
    };
    let buffer = (input.u16() as usize % 4096) + 1;
    let mut pair = LinkPair::new(buffer, overflow);
    pair.split = Some(FuzzRng::new(input.u8() as u64));
    pair.runtime.hold_stdin = input.u8() & 1 == 1;
    pair.drive();
    let mut channels: Vec<ChannelId> = Vec::new();
    let mut written = 0u64;
    while !input.is_empty() {
        let pick = |input: &mut Input<'_>, channels: &[ChannelId]| {
            let i = input.u8() as usize;
            channels.get(i % channels.len().max(1)).copied()
        };
        match input.u8() % 15 {
            0 => {
                let from = if input.u8() & 1 == 0 {
                    LIVE
                } else {
                    input.u16() as u64
                };
                if let Ok(c) = pair.appliance.open(LinkPair::attach(from, true)) {
                    channels.push(c);
                }
            }
            1 => {
                let exec = Open::Exec {
                    command: "true".into(),
                    tty: (input.u8() & 1 == 1).then_some((80, 24)),
                    env: vec![("A".into(), "b".into())],
                };
                if let Ok(c) = pair.appliance.open(exec) {
                    channels.push(c);
                }
            }
            2 => {
                let n = input_len(&mut input);
                let data = Bytes::from(input.filled(n));
                if let Some(c) = pick(&mut input, &channels) {
                    pair.appliance.send_stdin(c, data);
                }
            }
            3 => {
                let n = input_len(&mut input);
                let stream = if input.u8() & 1 == 0 {
                    Stream::Stdout
                } else {
                    Stream::Stderr
                };
                let room = match overflow {
                    Overflow::Block => pair.sessions.space(PRIMARY).min(n),
                    Overflow::DropOldest => n,
                };
                let bytes: Vec<u8> = (0..room).map(|i| (written + i as u64) as u8).collect();
                written += room as u64;
                pair.sessions
                    .push_output(PRIMARY, stream, Bytes::from(bytes));
            }
            4 => pair.sessions.started(PRIMARY),
            5 => pair
                .sessions
                .finish(PRIMARY, ExitStatus::Code(input.u8() as u32)),
            6 => {
                if let Some(c) = pick(&mut input, &channels) {
                    let _ = pair.appliance.request(
                        c,
                        &ChannelRequest::Signal {
                            name: "TERM".into(),
                        },
                        true,
                    );
                }
            }
            7 => {
                let request = ChannelRequest::Other {
                    name: crate::tether::START.into(),
                    data: Bytes::new(),
                };
                let _ = pair.appliance.control(PRIMARY, request);
            }
            8 => {
                if let Some(c) = pick(&mut input, &channels) {
                    pair.consume_all(c);
                }
            }
            9 => {
                if let Some(c) = pick(&mut input, &channels) {
                    pair.appliance.close(c);
                }
            }
            10 => {
                if let Some(c) = pick(&mut input, &channels) {
                    pair.appliance.close_stdin(c);
                }
            }
            11 => pair.release_stdin(),
            12 => {
                pair.relink();
                channels.clear();
            }
            13 => {
                let _ = pair.appliance.list();
            }
            _ => {
                // A fork asked and answered at once, either way; a quiesce
                // that succeeds ends the link.
                use crate::tether::ForkMode;
                let mode = match input.u8() & 1 {
                    0 => ForkMode::Quiesce,
                    _ => ForkMode::Resume,
                };
                let _ = pair.appliance.fork(mode);
                pair.drive();
                let ok = input.u8() & 1 == 0;
                pair.sessions.set_quiesced(ok && mode == ForkMode::Quiesce);
                pair.guest.fork_done(&mut pair.sessions, ok.then_some(1));
            }
        }
        pair.advance(Duration::from_millis(input.u8() as u64 * 50));
        check_output_order(&pair);
    }
}

fn input_len(input: &mut Input<'_>) -> usize {
    (input.u16() as usize) % 70_000
}

/// Output on each channel arrives in offset order: byte `k` of the session
/// carries `k as u8`, so consecutive bytes must count up, with jumps only
/// where a gap was reported.
fn check_output_order(pair: &LinkPair) {
    let mut next: BTreeMap<ChannelId, Option<u64>> = BTreeMap::new();
    for e in &pair.events {
        match e {
            ApplianceEvent::Opened {
                channel,
                offset,
                exec_id: None,
            } => {
                next.insert(*channel, *offset);
            }
            ApplianceEvent::Gap { channel, lost } => {
                if let Some(Some(at)) = next.get_mut(channel) {
                    *at += lost;
                }
            }
            ApplianceEvent::Data { channel, data, .. } => {
                if let Some(Some(at)) = next.get_mut(channel) {
                    for (i, &b) in data.iter().enumerate() {
                        assert_eq!(b, (*at + i as u64) as u8, "output out of order");
                    }
                    *at += data.len() as u64;
                }
            }
            _ => {}
        }
    }
}
