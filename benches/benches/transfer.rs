//! End-to-end channel throughput: 64 MiB from a client to a server through two
//! `Connection`s in memory, with the real aws-lc-rs provider and the default
//! algorithms (first preference: mlkem768x25519-sha256, aes256-gcm@openssh.com).
//! The receiver returns window with `channel_consume` as data arrives, as an
//! application must. The handshake happens outside the timed part.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use proto_core::{
    ChannelId, ClientConfig, Config, Connection, Event, HostKeyPolicy, PrivateKey, ServerConfig,
};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

const TOTAL: usize = 64 * 1024 * 1024;

struct Pair {
    client: Connection,
    server: Connection,
    now: Instant,
    channel: ChannelId,
}

/// Moves everything `from` has to send into `to`.
fn deliver(from: &mut Connection, to: &mut Connection, now: Instant) -> bool {
    let mut moved = false;
    while let Some(bytes) = from.poll_transmit() {
        to.handle_input(now, &bytes)
            .expect("the peer accepts our bytes");
        moved = true;
    }
    moved
}

/// A client and server, authenticated, with one open session channel.
fn connect() -> Pair {
    let now = Instant::now();
    let (host, user) = (
        PrivateKey::from_seed([2; 32]),
        PrivateKey::from_seed([1; 32]),
    );
    let client = Config::client(ClientConfig {
        user: "bench".into(),
        key: Some(user.clone()),
        host_keys: HostKeyPolicy::Pinned(vec![*host.public()]),
    });
    let server = Config::server(ServerConfig::new(host, vec![*user.public()]));
    let mut client = Connection::new(client, now, Box::new(ChaCha8Rng::seed_from_u64(1)));
    let mut server = Connection::new(server, now, Box::new(ChaCha8Rng::seed_from_u64(2)));
    let mut channel = None;
    let mut opened = false;
    while !opened {
        let a = deliver(&mut client, &mut server, now);
        let b = deliver(&mut server, &mut client, now);
        while let Some(e) = server.poll_event() {
            if let Event::ChannelOpen { channel, .. } = e {
                server.accept_channel(channel).unwrap();
            }
        }
        while let Some(e) = client.poll_event() {
            opened |= matches!(e, Event::ChannelOpened { .. });
        }
        if client.is_authenticated() && channel.is_none() {
            channel = Some(client.open_session().unwrap());
        }
        assert!(
            a || b || opened || channel.is_some(),
            "the handshake stalled"
        );
    }
    Pair {
        client,
        server,
        now,
        channel: channel.expect("opened"),
    }
}

/// Sends `total` bytes client to server; returns what the server received.
fn transfer(p: &mut Pair, total: usize) -> usize {
    let chunk = vec![0xa5u8; 256 * 1024];
    let (mut sent, mut received) = (0, 0);
    while received < total {
        if sent < total {
            let n = (total - sent).min(chunk.len());
            sent += p.client.channel_send(p.channel, None, &chunk[..n]).unwrap();
        }
        deliver(&mut p.client, &mut p.server, p.now);
        while let Some(e) = p.server.poll_event() {
            if let Event::ChannelData { channel, data, .. } = e {
                received += black_box(&data).len();
                p.server.channel_consume(channel, data.len()).unwrap();
            }
        }
        deliver(&mut p.server, &mut p.client, p.now);
        while p.client.poll_event().is_some() {}
    }
    received
}

fn channel_transfer(c: &mut Criterion) {
    let mut group = c.benchmark_group("transfer");
    group.throughput(Throughput::Bytes(TOTAL as u64));
    group.sample_size(10);
    group.bench_function("client_to_server_64MiB", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let mut pair = connect();
                let start = Instant::now();
                assert_eq!(transfer(&mut pair, TOTAL), TOTAL);
                spent += start.elapsed();
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, channel_transfer);
criterion_main!(benches);
