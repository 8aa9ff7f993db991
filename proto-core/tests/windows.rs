//! Flow control under random chunking, random window sizes and a slow reader.

mod support;

use proptest::prelude::*;
use proto_core::Event;
use support::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn window_accounting_holds_under_random_chunking(
        sends in prop::collection::vec(1usize..150_000, 1..12),
        seed in any::<u64>(),
        window in 1024u32..300_000,
        max_packet in 256u32..40_000,
        reader_lag in 0usize..4,
    ) {
        let mut s = server_config();
        s.window = window;
        s.max_packet = max_packet;
        let mut pair = Pair::with_seed(client_config(), s, seed);
        pair.chunking = Chunking::Random(seed);
        pair.auto_consume = false;
        pair.connect();
        let (cc, sc) = pair.open_session();
        let total: usize = sends.iter().sum();
        let mut offered = 0usize;
        let mut received = 0usize;
        let mut backlog: Vec<usize> = Vec::new();
        let mut queue = sends.clone();
        queue.reverse();
        let mut pending = 0usize;
        for _ in 0..20_000 {
            if pending == 0
                && let Some(n) = queue.pop()
            {
                pending = n;
            }
            if pending > 0 {
                let n = pair.client.conn.channel_send(cc, None, &pattern(offered as u64, pending)).unwrap();
                prop_assert!(n <= window as usize);
                offered += n;
                pending -= n;
            }
            pair.drive();
            prop_assert!(pair.client.error.is_none() && pair.server.error.is_none(),
                "{:?} {:?}", pair.client.error, pair.server.error);
            let before = received;
            for ev in pair.server.take_events() {
                if let Event::ChannelData { channel, data, .. } = ev {
                    prop_assert_eq!(channel, sc);
                    prop_assert_eq!(&data[..], &pattern(received as u64, data.len())[..]);
                    received += data.len();
                    backlog.push(data.len());
                }
            }
            // A slow reader: it holds the newest `reader_lag` chunks back, but
            // catches up whenever nothing new arrives (it waits on time, not data).
            let idle = received == before;
            while backlog.len() > reader_lag || (idle && !backlog.is_empty()) {
                let n = backlog.remove(0);
                pair.server.conn.channel_consume(sc, n).unwrap();
            }
            pair.client.take_events();
            if received == total {
                break;
            }
        }
        prop_assert_eq!(received, total);
        for n in backlog {
            pair.server.conn.channel_consume(sc, n).unwrap();
        }
        pair.drive();
        let w = pair.client.conn.send_window(cc).unwrap();
        prop_assert!(w <= window && w >= window / 2, "window {} of {} after everything was read", w, window);
    }
}
