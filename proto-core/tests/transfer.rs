//! Bulk transfer, rekeying under load, and input split independence.

mod support;

use std::time::Duration;

use proto_core::crypto::KexAlg;
use proto_core::kex::Preferences;
use proto_core::{ChannelId, Event};
use support::*;

/// Sends `total` pattern bytes client -> server, checking each byte as it lands.
/// Returns the number of rekeys the server saw.
fn transfer(pair: &mut Pair, cc: ChannelId, sc: ChannelId, total: u64) -> usize {
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut rekeys = 0;
    let mut chunk = Vec::new();
    while received < total {
        if sent < total {
            let n = (total - sent).min(256 * 1024) as usize;
            chunk.clear();
            chunk.extend_from_slice(&pattern(sent, n));
            sent += pair.client.conn.channel_send(cc, None, &chunk).unwrap() as u64;
        }
        pair.drive();
        assert!(
            pair.client.error.is_none() && pair.server.error.is_none(),
            "{:?} {:?}",
            pair.client.error,
            pair.server.error
        );
        for ev in pair.server.take_events() {
            match ev {
                Event::ChannelData {
                    channel,
                    data,
                    ext: None,
                } if channel == sc => {
                    assert_eq!(
                        data[..],
                        pattern(received, data.len())[..],
                        "byte {received} lost or reordered"
                    );
                    received += data.len() as u64;
                }
                Event::KexComplete { rekey: true, .. } => rekeys += 1,
                _ => {}
            }
        }
        pair.client.take_events();
    }
    assert_eq!(received, total);
    rekeys
}

#[test]
fn sixty_four_mib_with_rekeys_every_mib_loses_and_reorders_nothing() {
    let mut c = client_config();
    c.rekey_bytes = 1 << 20;
    let mut s = server_config();
    s.rekey_bytes = 1 << 20;
    let mut pair = Pair::new(c, s);
    pair.client.record = false;
    pair.server.record = false;
    pair.connect();
    let (cc, sc) = pair.open_session();
    let rekeys = transfer(&mut pair, cc, sc, 64 << 20);
    assert!(
        rekeys >= 60,
        "only {rekeys} rekeys in 64 MiB with a 1 MiB limit"
    );
}

#[test]
fn rekey_on_demand_by_either_side_keeps_queued_data() {
    let mut pair = Pair::default_pair();
    pair.connect();
    let (cc, sc) = pair.open_session();
    // Start a rekey and, before the peer answers, queue data: it must wait for
    // the new keys, not vanish or go out under the old ones.
    pair.client.conn.rekey();
    let n = pair
        .client
        .conn
        .channel_send(cc, None, &pattern(0, 300_000))
        .unwrap();
    pair.server.conn.rekey();
    pair.server
        .conn
        .channel_send(sc, None, b"both ways")
        .unwrap();
    pair.drive();
    assert_eq!(
        data_of(&pair.server.events, sc, None)[..],
        pattern(0, n)[..]
    );
    assert_eq!(&data_of(&pair.client.events, cc, None)[..], b"both ways");
    assert_eq!(pair.client.conn.kex_count(), 2);
    assert_eq!(pair.server.conn.kex_count(), 2);
}

#[test]
fn time_based_rekey_fires_from_the_virtual_clock() {
    let mut c = client_config();
    c.rekey_interval = Duration::from_secs(60);
    let mut pair = Pair::new(c, server_config());
    pair.connect();
    assert_eq!(pair.client.conn.kex_count(), 1);
    pair.now += Duration::from_secs(61);
    let now = pair.now;
    pair.client.conn.handle_timeout(now).unwrap();
    pair.drive();
    assert_eq!(pair.client.conn.kex_count(), 2);
    assert_eq!(pair.server.conn.kex_count(), 2);
}

/// Runs a scenario with a given chunking; returns both sides' events and bytes.
fn scenario(chunking: Chunking) -> (Vec<Event>, Vec<Event>, Vec<u8>, Vec<u8>) {
    let prefs = Preferences {
        kex: vec![KexAlg::Curve25519],
        ..Preferences::default()
    };
    let mut c = client_config();
    c.preferences = prefs;
    c.rekey_bytes = 64 * 1024;
    let mut pair = Pair::new(c, server_config());
    pair.chunking = chunking;
    pair.connect();
    let (cc, sc) = pair.open_session();
    pair.client
        .conn
        .channel_send(cc, None, &pattern(0, 200_000))
        .unwrap();
    pair.server
        .conn
        .channel_send(sc, Some(1), b"stderr bytes")
        .unwrap();
    pair.drive();
    pair.client.conn.channel_eof(cc).unwrap();
    pair.client.conn.channel_close(cc).unwrap();
    pair.drive();
    (
        pair.client.events,
        pair.server.events,
        pair.client.sent,
        pair.server.sent,
    )
}

#[test]
fn one_byte_at_a_time_gives_the_same_events_and_bytes_as_whole_input() {
    // Events follow packets, not reads, so every split must give identical
    // events and identical bytes on the wire.
    let whole = scenario(Chunking::Whole);
    assert_eq!(scenario(Chunking::OneByte), whole);
    assert_eq!(scenario(Chunking::Random(99)), whole);
    assert_eq!(scenario(Chunking::RandomOwned(99)), whole);
}

#[test]
fn a_finished_rekey_leaves_no_kex_deadline_and_a_long_one_fires_none_early() {
    let mut pair = Pair::default_pair();
    pair.connect();
    pair.client.conn.rekey();
    pair.drive();
    assert_eq!(pair.client.conn.kex_count(), 2);
    // Only the time-based rekey (an hour away) is left, on both sides.
    for side in [&pair.client, &pair.server] {
        let next = side.conn.poll_timeout().expect("the rekey timer");
        assert!(next >= pair.now + Duration::from_secs(3599));
    }
    // Virtual hours pass with rekeys in between: no kex deadline fires.
    pair.client.conn.rekey();
    pair.drive_with_time(Duration::from_secs(4 * 3600));
    assert!(pair.client.error.is_none() && pair.server.error.is_none());
    assert!(pair.client.conn.kex_count() >= 5);
}
