//! Harnesses for the tether layer's parsers and data structures: link-sync
//! frames in a noisy stream, the `@tether` payload decoders, and random
//! operation sequences on the output log and the connection map, each with
//! the invariants the runtimes rely on.

use std::time::{Duration, Instant};

use super::{FuzzRng, Input};
use crate::connmap::{ConnectionMap, MapEvent};
use crate::link::{FRAME_LEN, Frame, Initiator, Responder};
use crate::outlog::{OutputLog, Overflow, Read, Stream};
use crate::tether::{self, AttachRequest, ContainerInfo, Forked, Kind, State};

/// Picks one of the tether harnesses with the first byte.
pub fn tether_layer(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % 4 {
        0 => link_sync(&mut input),
        1 => payloads(&mut input),
        2 => output_log(&mut input),
        _ => connection_map(&mut input),
    }
}

/// Both link-sync ends fed arbitrary bytes in arbitrary chunks: never a panic,
/// consumption never beyond the input, and a frame is only decoded if valid.
fn link_sync(input: &mut Input<'_>) {
    let t0 = Instant::now();
    let mut guest = Responder::new(Box::new(FuzzRng::new(1)));
    let mut appliance = Initiator::new(t0, Box::new(FuzzRng::new(2)));
    let mut now = t0;
    while !input.is_empty() {
        let n = (input.u8() as usize % 64) + 1;
        let chunk = input.bytes(n);
        if chunk.len() == FRAME_LEN
            && let Some(frame) = Frame::decode(chunk.try_into().expect("frame length"))
        {
            assert_eq!(Frame::decode(&frame.encode()), Some(frame));
        }
        let used = guest.handle_input(chunk);
        assert!(used <= chunk.len());
        let used = appliance.handle_input(now, chunk);
        assert!(used <= chunk.len());
        if input.u8() & 1 == 0 {
            guest.announce();
        }
        now += Duration::from_millis(input.u8() as u64 * 10);
        appliance.handle_timeout(now);
        let _ = (guest.poll_transmit(), appliance.poll_transmit());
    }
}

/// Every `@tether` payload decoder, with round trips where the crate encodes.
fn payloads(input: &mut Input<'_>) {
    let which = input.u8() % 6;
    let data = input.bytes(usize::MAX);
    match which {
        0 => {
            if let Ok(list) = tether::decode_container_ids(data) {
                let mut enc = Vec::new();
                tether::encode_container_ids(&list, &mut enc);
                let mut sorted = list.clone();
                sorted.sort_by(|a, b| a.id.cmp(&b.id));
                assert_eq!(
                    tether::decode_container_ids(&enc).expect("re-encoded list"),
                    sorted
                );
            }
        }
        1 => {
            if let Ok(req) = AttachRequest::decode(data) {
                let mut enc = Vec::new();
                req.encode(&mut enc);
                assert_eq!(AttachRequest::decode(&enc).expect("re-encoded attach"), req);
            }
        }
        2 => {
            let _ = tether::decode_output_gap(data);
            let _ = tether::decode_offset(data);
        }
        3 => {
            if let Ok(id) = tether::decode_exec_id(data) {
                let mut enc = Vec::new();
                tether::encode_exec_id(&id, &mut enc);
                assert_eq!(tether::decode_exec_id(&enc).expect("re-encoded id"), id);
            }
        }
        4 => {
            if let Ok(f) = Forked::decode(data) {
                let mut enc = Vec::new();
                f.encode(&mut enc);
                assert_eq!(Forked::decode(&enc).expect("re-encoded forked"), f);
            }
        }
        _ => {
            let _ = tether::decode_fork(data);
            let _ = tether::decode_fork_reply(data);
        }
    }
}

/// Random pushes, reads, releases and sends on a log, checked against a
/// plain copy of everything written: reads return exactly the written bytes
/// at their offsets, gaps only under drop-oldest, and the capacity holds.
fn output_log(input: &mut Input<'_>) {
    let capacity = input.u16() as usize % 4096 + 1;
    let overflow = if input.u8() & 1 == 0 {
        Overflow::DropOldest
    } else {
        Overflow::Block
    };
    let mut log = OutputLog::new(capacity, overflow);
    let mut written: Vec<(Stream, u8)> = Vec::new();
    let mut cursor = 0u64;
    while !input.is_empty() {
        match input.u8() % 5 {
            0 | 1 => {
                let stream = if input.u8() & 1 == 0 {
                    Stream::Stdout
                } else {
                    Stream::Stderr
                };
                let mut n = input.u16() as usize % 20_000;
                if overflow == Overflow::Block {
                    n = n.min(log.space());
                }
                let data: Vec<u8> = (0..n).map(|i| (written.len() + i) as u8).collect();
                if input.u8() & 1 == 0 {
                    log.push(stream, &data);
                } else {
                    log.push_bytes(stream, data.clone().into());
                }
                written.extend(data.iter().map(|&b| (stream, b)));
            }
            2 => match log.read(cursor, input.u16() as usize + 1) {
                Read::Gap { lost, resume } => {
                    assert_eq!(overflow, Overflow::DropOldest, "block never drops");
                    assert_eq!(cursor + lost, resume);
                    cursor = resume;
                }
                Read::Data { stream, data, next } => {
                    for (i, &b) in data.iter().enumerate() {
                        assert_eq!(
                            written[cursor as usize + i],
                            (stream, b),
                            "byte {}",
                            cursor as usize + i
                        );
                    }
                    assert_eq!(next, cursor + data.len() as u64);
                    cursor = next;
                }
                Read::Pending | Read::End => assert_eq!(cursor, log.end()),
                Read::Beyond { .. } => panic!("the cursor never passes the end"),
            },
            3 => log.release(cursor.min(input.u16() as u64 + log.start())),
            _ => log.set_sent(cursor),
        }
        assert_eq!(log.end(), written.len() as u64);
        if overflow == Overflow::DropOldest {
            assert!(log.retained() <= capacity);
        }
    }
}

/// Random updates, removals and waits on the map: an id always resolves to
/// its newest live claim, and every waiter is resolved exactly once.
fn connection_map(input: &mut Input<'_>) {
    let t0 = Instant::now();
    let mut map = ConnectionMap::new();
    let mut live: Vec<(u64, Vec<String>)> = Vec::new();
    let mut waiters = 0usize;
    let mut resolved = 0usize;
    let id = |n: u8| format!("c{}", n % 6);
    let info = |id: String| ContainerInfo {
        id,
        kind: Kind::Primary,
        state: State::Running,
        exit_status: 0,
        output_end: 0,
        tty: false,
    };
    while !input.is_empty() {
        match input.u8() % 4 {
            0 => {
                let generation = input.u8() as u64 % 5;
                let count = input.u8() as usize % 4;
                let ids: Vec<String> = input.bytes(count).iter().map(|&b| id(b)).collect();
                map.update(generation, ids.iter().cloned().map(info).collect());
                live.retain(|(g, _)| *g != generation);
                live.push((generation, ids));
            }
            1 => {
                let generation = input.u8() as u64 % 5;
                map.remove_connection(generation);
                live.retain(|(g, _)| *g != generation);
            }
            2 => {
                let deadline = t0 + Duration::from_secs(input.u8() as u64);
                if map.wait(&id(input.u8()), deadline).is_err() {
                    waiters += 1;
                }
            }
            _ => map.handle_timeout(t0 + Duration::from_secs(input.u8() as u64)),
        }
        while let Some(ev) = map.poll_event() {
            if !matches!(ev, MapEvent::Conflict { .. }) {
                resolved += 1;
            }
        }
        for n in 0..6u8 {
            let want = live
                .iter()
                .filter(|(_, ids)| ids.contains(&id(n)))
                .map(|(g, _)| *g)
                .max();
            assert_eq!(map.get(&id(n)).map(|e| e.generation), want, "{}", id(n));
        }
        assert_eq!(waiters, resolved + map.waiting());
    }
}
