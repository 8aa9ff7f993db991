//! Pair tests of the tether layer: a `GuestLink` and an `ApplianceLink` in
//! memory with a virtual clock and random input splits (the harness in
//! `fuzzing::links`), each test the scenario its name says.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::crypto::AwsLcProvider;
use crate::fuzzing::FuzzRng;
use crate::fuzzing::links::{LinkPair, PRIMARY};
use crate::outlog::{Overflow, Stream};
use crate::request::ChannelRequest;

fn connected(buffer: usize, overflow: Overflow) -> LinkPair {
    let mut pair = LinkPair::new(buffer, overflow);
    pair.split = Some(FuzzRng::new(3));
    pair.drive();
    let events = pair.take_events();
    assert!(
        events.contains(&ApplianceEvent::Authenticated),
        "{events:?}"
    );
    pair
}

fn bytes(range: std::ops::Range<u32>) -> Bytes {
    range.map(|i| i as u8).collect()
}

fn opened(pair: &LinkPair, channel: crate::ChannelId) -> Option<(Option<u64>, Option<String>)> {
    pair.events.iter().find_map(|e| match e {
        ApplianceEvent::Opened {
            channel: c,
            offset,
            exec_id,
        } if *c == channel => Some((*offset, exec_id.clone())),
        _ => None,
    })
}

#[test]
fn output_written_before_attach_is_replayed_after_a_gap_report() {
    let mut pair = connected(10, Overflow::DropOldest);
    pair.sessions.started(PRIMARY);
    pair.sessions
        .push_output(PRIMARY, Stream::Stdout, bytes(0..25));
    let ch = pair.appliance.open(LinkPair::attach(0, false)).unwrap();
    pair.drive();
    assert_eq!(opened(&pair, ch), Some((Some(0), None)));
    let (data, lost, exit) = pair.received(ch);
    assert_eq!((lost, exit), (15, None));
    assert_eq!(data, bytes(15..25));
    // The gap is reported before the data that follows it.
    let gap_at = pair
        .events
        .iter()
        .position(|e| matches!(e, ApplianceEvent::Gap { .. }));
    let data_at = pair
        .events
        .iter()
        .position(|e| matches!(e, ApplianceEvent::Data { .. }));
    assert!(gap_at < data_at);
}

#[test]
fn a_live_attach_learns_the_exact_offset_it_starts_at() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    pair.sessions.started(PRIMARY);
    pair.sessions
        .push_output(PRIMARY, Stream::Stdout, bytes(0..5));
    let ch = pair.appliance.open(LinkPair::attach(LIVE, false)).unwrap();
    pair.drive();
    assert_eq!(opened(&pair, ch), Some((Some(5), None)));
    pair.sessions
        .push_output(PRIMARY, Stream::Stderr, bytes(5..8));
    pair.drive();
    assert_eq!(pair.received(ch).0, bytes(5..8));
}

#[test]
fn an_exited_session_ends_with_its_status_after_all_output_and_the_appliance_closes() {
    for (exit, expect) in [
        (ExitStatus::Code(3), 3),
        (ExitStatus::signal(Signal::TERM, false), 143),
    ] {
        let mut pair = connected(1 << 20, Overflow::DropOldest);
        pair.sessions.started(PRIMARY);
        pair.sessions
            .push_output(PRIMARY, Stream::Stdout, Bytes::from_static(b"bye"));
        pair.sessions.finish(PRIMARY, exit.clone());
        let ch = pair.appliance.open(LinkPair::attach(0, false)).unwrap();
        pair.drive();
        let (data, _, got) = pair.received(ch);
        assert_eq!((&data[..], got.clone()), (&b"bye"[..], Some(exit)));
        assert_eq!(got.map(|e| e.code()), Some(expect));
        assert!(
            !matches!(pair.events.last(), Some(ApplianceEvent::Closed { .. })),
            "an attach channel is the appliance's to close"
        );
        pair.appliance.close(ch);
        pair.drive();
        let tail: Vec<_> = pair.events.iter().rev().take(2).collect();
        assert!(matches!(tail[0], ApplianceEvent::Closed { .. }), "{tail:?}");
        assert!(matches!(tail[1], ApplianceEvent::Exit { .. }), "{tail:?}");
    }
}

#[test]
fn a_block_log_holds_the_process_back_until_the_appliance_consumes() {
    let mut pair = connected(64 * 1024, Overflow::Block);
    pair.sessions.started(PRIMARY);
    let ch = pair.appliance.open(LinkPair::attach(0, false)).unwrap();
    pair.drive();
    let mut written = 0u32;
    // Without consuming, the process may fill the appliance's window and the
    // log, and then no more.
    for _ in 0..1000 {
        let room = pair.sessions.space(PRIMARY) as u32;
        if room == 0 {
            break;
        }
        let n = room.min(50_000);
        pair.sessions
            .push_output(PRIMARY, Stream::Stdout, bytes(written..written + n));
        written += n;
        pair.drive();
    }
    assert_eq!(pair.sessions.space(PRIMARY), 0, "the process is held back");
    let window = 2 * 1024 * 1024;
    assert!(written as usize <= window + 64 * 1024, "{written}");
    pair.consume_all(ch);
    pair.drive();
    assert!(pair.sessions.space(PRIMARY) > 0, "consuming makes room");
    assert_eq!(
        pair.received(ch).0,
        bytes(0..written),
        "nothing lost or doubled"
    );
}

#[test]
fn block_output_in_flight_when_the_link_drops_is_replayed_not_lost() {
    let mut pair = connected(1 << 20, Overflow::Block);
    pair.sessions.started(PRIMARY);
    let ch = pair.appliance.open(LinkPair::attach(0, false)).unwrap();
    pair.drive();
    pair.sessions
        .push_output(PRIMARY, Stream::Stdout, bytes(0..100_000));
    pair.drive();
    assert_eq!(pair.received(ch).0.len(), 100_000);
    // Delivered but never acknowledged (no window came back): still retained.
    pair.relink();
    pair.drive();
    let ch = pair.appliance.open(LinkPair::attach(0, false)).unwrap();
    pair.drive();
    assert_eq!(pair.received(ch), (bytes(0..100_000).to_vec(), 0, None));
}

#[test]
fn stdin_window_reopens_only_once_the_process_took_the_bytes() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    pair.sessions.started(PRIMARY);
    pair.runtime.hold_stdin = true;
    let ch = pair.appliance.open(LinkPair::attach(LIVE, true)).unwrap();
    pair.drive();
    let input = bytes(0..3_000_000);
    pair.appliance.send_stdin(ch, input.clone());
    pair.drive();
    let sent = |pair: &LinkPair| -> usize {
        pair.events
            .iter()
            .map(|e| match e {
                ApplianceEvent::StdinSent { n, .. } => *n,
                _ => 0,
            })
            .sum()
    };
    let window = 2 * 1024 * 1024;
    assert_eq!(sent(&pair), window, "the guest's window is the limit");
    assert_eq!(pair.runtime.stdin[PRIMARY].len(), window);
    pair.release_stdin();
    pair.drive();
    pair.release_stdin();
    pair.drive();
    assert_eq!(sent(&pair), input.len());
    assert_eq!(pair.runtime.stdin[PRIMARY], input);
    // EOF after the input closes a pipe's stdin.
    pair.appliance.close_stdin(ch);
    pair.drive();
    assert_eq!(pair.runtime.stdin_closed, [PRIMARY]);
}

#[test]
fn a_control_channel_carries_one_request_and_no_output() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    pair.sessions.started(PRIMARY);
    pair.sessions
        .push_output(PRIMARY, Stream::Stdout, Bytes::from_static(b"output"));
    let term = ChannelRequest::Signal {
        name: "TERM".into(),
    };
    let ch = pair.appliance.control(PRIMARY, term.clone()).unwrap();
    pair.drive();
    assert_eq!(pair.runtime.signals, [(PRIMARY.to_string(), Signal::TERM)]);
    let mine: Vec<_> = pair
        .take_events()
        .into_iter()
        .filter(|e| format!("{e:?}").contains(&format!("{ch:?}")))
        .collect();
    assert_eq!(
        mine,
        [
            ApplianceEvent::Reply {
                channel: ch,
                success: true
            },
            ApplianceEvent::Closed { channel: ch }
        ]
    );
    // A running session cannot be started again; an exited one takes no signal.
    let start = ChannelRequest::Other {
        name: START.into(),
        data: Bytes::new(),
    };
    pair.appliance.control(PRIMARY, start).unwrap();
    pair.sessions.finish(PRIMARY, ExitStatus::Code(0));
    pair.drive();
    pair.appliance.control(PRIMARY, term).unwrap();
    pair.drive();
    let replies: Vec<bool> = pair
        .events
        .iter()
        .filter_map(|e| match e {
            ApplianceEvent::Reply { success, .. } => Some(*success),
            _ => None,
        })
        .collect();
    assert_eq!(replies, [false, false]);
    assert_eq!(pair.runtime.signals.len(), 1);
}

#[test]
fn a_start_gated_session_starts_once_on_its_gate() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    let start = ChannelRequest::Other {
        name: START.into(),
        data: Bytes::new(),
    };
    pair.appliance.control(PRIMARY, start.clone()).unwrap();
    pair.appliance.control(PRIMARY, start).unwrap();
    pair.drive();
    assert_eq!(pair.sessions.state(PRIMARY), Some(State::Running));
    let replies: Vec<bool> = pair
        .events
        .iter()
        .filter_map(|e| match e {
            ApplianceEvent::Reply { success, .. } => Some(*success),
            _ => None,
        })
        .collect();
    assert_eq!(replies, [true, false]);
}

#[test]
fn an_exec_is_named_before_its_first_byte_and_attached_from_offset_zero() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    pair.sessions.started(PRIMARY);
    let exec = Open::Exec {
        command: "echo hi".into(),
        tty: None,
        env: vec![("A".into(), "1".into())],
    };
    let ch = pair.appliance.open(exec).unwrap();
    // Carry the open across, let the guest start the process, and have it
    // write before the guest pumps again.
    pair.drive();
    let id = format!("{PRIMARY}-exec1");
    assert_eq!(pair.runtime.execs, [(id.clone(), Some("echo hi".into()))]);
    pair.sessions
        .push_output(&id, Stream::Stdout, Bytes::from_static(b"hi\n"));
    pair.sessions.finish(&id, ExitStatus::Code(0));
    pair.drive();
    let first = pair
        .events
        .iter()
        .find(|e| format!("{e:?}").contains(&format!("{ch:?}")));
    assert_eq!(
        first,
        Some(&ApplianceEvent::Opened {
            channel: ch,
            offset: Some(0),
            exec_id: Some(id.clone())
        })
    );
    assert_eq!(
        pair.received(ch),
        (b"hi\n".to_vec(), 0, Some(ExitStatus::Code(0)))
    );
    let listed = pair.sessions.list();
    assert!(listed.iter().any(|c| c.id == id && c.kind == Kind::Exec));
}

#[test]
fn reattach_after_a_link_drop_resumes_at_the_exact_offset() {
    for seed in 0..20u64 {
        let mut pair = connected(1 << 22, Overflow::DropOldest);
        pair.sessions.started(PRIMARY);
        let mut cursor = Cursor::new(0, true, false, None);
        let ch = pair
            .appliance
            .open(Open::Attach(cursor.request(PRIMARY, false)))
            .unwrap();
        pair.drive();
        // Output on both streams; stderr is not wanted but counts.
        let mut total = 0u32;
        for i in 0..20u32 {
            let stream = if i % 3 == 0 {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            let n = 1000 + i * 37;
            pair.sessions
                .push_output(PRIMARY, stream, bytes(total..total + n));
            total += n;
        }
        // Only part of what the guest sent arrives before the link drops.
        pair.guest.pump(&mut pair.sessions);
        let mut wire = Vec::new();
        while let Some(t) = pair.guest.poll_transmit() {
            wire.extend_from_slice(&t);
        }
        let cut = (seed as usize * 7919) % wire.len();
        let _ = pair.appliance.handle_input(pair.now, &wire[..cut]);
        let mut stdout = Vec::new();
        let mut feed = |cursor: &mut Cursor,
                        events: Vec<ApplianceEvent>,
                        want: crate::ChannelId| {
            for e in events {
                match e {
                    ApplianceEvent::Opened {
                        channel, offset, ..
                    } if channel == want => cursor.opened(offset),
                    ApplianceEvent::Data { channel, ext, data } if channel == want => {
                        if let Delivery::Stdout(d) = cursor.data(ext, data) {
                            stdout.extend_from_slice(&d);
                        }
                    }
                    ApplianceEvent::Gap { channel, lost } if channel == want => cursor.gap(lost),
                    _ => {}
                }
            }
        };
        while let Some(e) = pair.appliance.poll_event() {
            pair.events.push(e);
        }
        feed(&mut cursor, pair.take_events(), ch);
        pair.relink();
        pair.drive();
        let ch = pair
            .appliance
            .open(Open::Attach(cursor.request(PRIMARY, false)))
            .unwrap();
        pair.drive();
        feed(&mut cursor, pair.take_events(), ch);
        assert_eq!(cursor.offset(), total as u64, "seed {seed}");
        // Exactly the stdout bytes, each once, in order.
        let mut expect = Vec::new();
        let mut at = 0u32;
        for i in 0..20u32 {
            let n = 1000 + i * 37;
            if i % 3 != 0 {
                expect.extend_from_slice(&bytes(at..at + n));
            }
            at += n;
        }
        assert!(stdout == expect, "seed {seed}: stdout differs");
    }
}

#[test]
fn container_list_changes_are_pushed_without_asking() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    let states = |pair: &mut LinkPair| -> Vec<(State, u32)> {
        pair.take_events()
            .into_iter()
            .filter_map(|e| match e {
                ApplianceEvent::Containers { list, reply: None } => {
                    Some((list[0].state, list[0].exit_status))
                }
                _ => None,
            })
            .collect()
    };
    pair.sessions.started(PRIMARY);
    pair.drive();
    assert_eq!(states(&mut pair), [(State::Running, 0)]);
    pair.sessions
        .push_output(PRIMARY, Stream::Stdout, bytes(0..10));
    pair.drive();
    assert_eq!(states(&mut pair), [], "output alone is not pushed");
    pair.sessions.finish(PRIMARY, ExitStatus::Code(7));
    pair.drive();
    assert_eq!(states(&mut pair), [(State::Exited, 7)]);
    let id = pair.appliance.list().unwrap();
    pair.drive();
    assert!(matches!(
        &pair.events[..],
        [ApplianceEvent::Containers { reply: Some(r), list }] if *r == id && list[0].output_end == 10
    ));
}

#[test]
fn the_primary_exit_counts_as_reported_once_every_attachment_has_its_output_and_closed() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    pair.sessions.started(PRIMARY);
    let ch = pair.appliance.open(LinkPair::attach(0, false)).unwrap();
    pair.drive();
    pair.sessions
        .push_output(PRIMARY, Stream::Stdout, bytes(0..100));
    pair.sessions.finish(PRIMARY, ExitStatus::Code(0));
    assert!(!pair.sessions.exit_reported());
    pair.drive();
    assert_eq!(pair.received(ch).2, Some(ExitStatus::Code(0)));
    assert!(
        !pair.sessions.exit_reported(),
        "the appliance has the exit but has not said it holds the output"
    );
    pair.appliance.close(ch);
    pair.drive();
    assert!(pair.sessions.exit_reported());
}

#[test]
fn a_bad_attach_is_refused_with_the_reason() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    let unknown = Open::Attach(AttachRequest {
        id: "nope".into(),
        stdin: false,
        stdout: true,
        stderr: true,
        from: 0,
    });
    let a = pair.appliance.open(unknown).unwrap();
    let b = pair.appliance.open(LinkPair::attach(99, false)).unwrap();
    pair.drive();
    let reasons: Vec<(crate::ChannelId, String)> = pair
        .events
        .iter()
        .filter_map(|e| match e {
            ApplianceEvent::OpenFailed { channel, reason } => Some((*channel, reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        [
            (a, "unknown session nope".to_string()),
            (b, "offset 99 is beyond the end of output (0)".to_string())
        ]
    );
}

#[test]
fn any_split_of_the_link_gives_the_same_events_with_real_crypto() {
    let run = |split: Option<u64>| {
        let mut pair =
            LinkPair::with_provider(Arc::new(AwsLcProvider), 1 << 20, Overflow::DropOldest, 9);
        pair.split = split.map(FuzzRng::new);
        pair.drive();
        pair.sessions.started(PRIMARY);
        pair.sessions
            .push_output(PRIMARY, Stream::Stdout, bytes(0..70_000));
        let ch = pair.appliance.open(LinkPair::attach(0, true)).unwrap();
        pair.appliance.send_stdin(ch, bytes(0..1000));
        pair.advance(Duration::from_secs(1));
        pair.sessions.finish(PRIMARY, ExitStatus::Code(1));
        pair.advance(Duration::from_secs(1));
        (pair.events, pair.runtime.stdin)
    };
    let whole = run(None);
    assert!(
        whole
            .0
            .iter()
            .any(|e| matches!(e, ApplianceEvent::Exit { .. }))
    );
    for seed in 1..4 {
        assert!(run(Some(seed)) == whole, "split {seed} differs");
    }
}

#[test]
fn the_fuzz_target_runs_on_sample_inputs() {
    let mut rng = FuzzRng::new(5);
    for len in [0usize, 1, 16, 200, 2000] {
        let mut data = vec![0u8; len];
        rand_core::RngCore::fill_bytes(&mut rng, &mut data);
        crate::fuzzing::tether_links(&data);
    }
}

#[test]
fn stdin_right_behind_an_exec_reaches_its_process() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    pair.sessions.started(PRIMARY);
    let exec = Open::Exec {
        command: "wc -c".into(),
        tty: None,
        env: Vec::new(),
    };
    let ch = pair.appliance.open(exec).unwrap();
    // Queued before the channel is even confirmed: it goes out right behind
    // the `exec` request, and the guest reads both in one go.
    pair.appliance.send_stdin(ch, bytes(0..1000));
    pair.appliance.close_stdin(ch);
    pair.split = None;
    pair.drive();
    let id = format!("{PRIMARY}-exec1");
    assert_eq!(pair.runtime.stdin.get(&id), Some(&bytes(0..1000).to_vec()));
    assert_eq!(pair.runtime.stdin_closed, [id]);
}

#[test]
fn a_primary_that_exits_before_anyone_attached_waits_for_an_attachment() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    pair.sessions.started(PRIMARY);
    pair.sessions
        .push_output(PRIMARY, Stream::Stdout, Bytes::from_static(b"early"));
    pair.sessions.finish(PRIMARY, ExitStatus::Code(0));
    pair.drive();
    assert!(
        !pair.sessions.exit_reported(),
        "the exit was pushed, but nobody has the output yet"
    );
    let ch = pair.appliance.open(LinkPair::attach(0, false)).unwrap();
    pair.drive();
    assert_eq!(pair.received(ch).0, b"early");
    pair.appliance.close(ch);
    pair.drive();
    assert!(pair.sessions.exit_reported());
}

fn exec(command: &str) -> Open {
    Open::Exec {
        command: command.into(),
        tty: None,
        env: Vec::new(),
    }
}

fn open_failed(pair: &LinkPair, channel: crate::ChannelId) -> Option<String> {
    pair.events.iter().find_map(|e| match e {
        ApplianceEvent::OpenFailed { channel: c, reason } if *c == channel => Some(reason.clone()),
        _ => None,
    })
}

/// docs/PROTOCOL.md 4.5: quiesce (requests behind it wait; new sessions and
/// attachments to stopped ones are refused), the reply with the generation,
/// DISCONNECT; then on the next link, resume.
#[test]
fn quiesce_replies_with_the_generation_disconnects_and_resume_reopens() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    pair.sessions.started(PRIMARY);
    pair.sessions
        .push_output(PRIMARY, Stream::Stdout, bytes(0..10));
    let attach = pair.appliance.open(LinkPair::attach(0, false)).unwrap();
    pair.drive();
    pair.appliance.fork(ForkMode::Quiesce).unwrap();
    let list = pair.appliance.list().unwrap();
    pair.drive();
    assert_eq!(pair.runtime.forks, [ForkMode::Quiesce]);
    // The runtime quiesces: sessions refused from now on, output drained.
    pair.sessions.set_quiesced(true);
    pair.sessions
        .push_output(PRIMARY, Stream::Stdout, bytes(10..20));
    let refused_exec = pair.appliance.open(exec("true")).unwrap();
    let refused_attach = pair.appliance.open(LinkPair::attach(0, false)).unwrap();
    pair.drive();
    assert_eq!(
        open_failed(&pair, refused_exec).as_deref(),
        Some("quiesced for fork")
    );
    assert_eq!(
        open_failed(&pair, refused_attach).as_deref(),
        Some("quiesced for fork")
    );
    assert!(
        !pair.events.iter().any(|e| matches!(
            e,
            ApplianceEvent::Fork { .. } | ApplianceEvent::Containers { reply: Some(_), .. }
        )),
        "nothing is answered before the quiesce is done"
    );
    pair.guest.fork_done(&mut pair.sessions, Some(7));
    pair.drive();
    // All output up to the quiesce arrived, then the reply, then the list.
    assert_eq!(pair.received(attach).0, bytes(0..20));
    let fork_at = pair.events.iter().position(|e| {
        *e == ApplianceEvent::Fork {
            mode: ForkMode::Quiesce,
            success: true,
            generation: Some(7),
        }
    });
    let list_at = pair
        .events
        .iter()
        .position(|e| matches!(e, ApplianceEvent::Containers { reply: Some(r), .. } if *r == list));
    assert!(fork_at.is_some() && fork_at < list_at, "{:?}", pair.events);
    match pair
        .appliance_error
        .as_ref()
        .or(pair.appliance.close_reason())
    {
        Some(crate::Error::PeerDisconnected {
            reason,
            description,
        }) => {
            assert_eq!(*reason, crate::DisconnectReason::ByApplication);
            assert_eq!(description, "tether: quiesced for fork");
        }
        other => panic!("expected the quiesce DISCONNECT, got {other:?}"),
    }

    // The parent's next link: still refusing, until resumed.
    pair.relink();
    pair.drive();
    let refused = pair.appliance.open(exec("true")).unwrap();
    pair.appliance.fork(ForkMode::Resume).unwrap();
    pair.drive();
    assert!(open_failed(&pair, refused).is_some());
    assert_eq!(pair.runtime.forks, [ForkMode::Quiesce, ForkMode::Resume]);
    pair.sessions.set_quiesced(false);
    pair.guest.fork_done(&mut pair.sessions, Some(7));
    pair.drive();
    assert!(pair.events.contains(&ApplianceEvent::Fork {
        mode: ForkMode::Resume,
        success: true,
        generation: None,
    }));
    assert!(!pair.appliance.is_closed(), "a resume keeps the link");
    let ch = pair.appliance.open(exec("true")).unwrap();
    pair.drive();
    assert!(opened(&pair, ch).is_some(), "{:?}", pair.events);
}

#[test]
fn a_guest_that_cannot_fork_refuses_and_keeps_the_link() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    pair.appliance.fork(ForkMode::Quiesce).unwrap();
    pair.drive();
    pair.guest.fork_done(&mut pair.sessions, None);
    pair.drive();
    assert!(pair.events.contains(&ApplianceEvent::Fork {
        mode: ForkMode::Quiesce,
        success: false,
        generation: None,
    }));
    assert!(!pair.appliance.is_closed());
    assert!(!pair.sessions.quiesced());
}

/// Child 2 of `web`, as it announces itself.
fn web_2() -> Forked {
    Forked {
        parent_id: "web".into(),
        new_id: "web-2".into(),
        generation: 9,
        failure: String::new(),
        recovery_us: 1234,
    }
}

/// Asserts that the appliance saw `forked` and then a container list;
/// returns the list.
fn announced_then_listed(events: &[ApplianceEvent], forked: &Forked) -> Vec<ContainerInfo> {
    let forked_at = events
        .iter()
        .position(|e| *e == ApplianceEvent::Forked(forked.clone()));
    let pushed_at = events
        .iter()
        .position(|e| matches!(e, ApplianceEvent::Containers { .. }));
    assert!(forked_at.is_some(), "{events:?}");
    assert!(forked_at < pushed_at, "{events:?}");
    let Some(ApplianceEvent::Containers { list, .. }) = events.get(pushed_at.unwrap()) else {
        unreachable!()
    };
    list.clone()
}

/// A child's `forked@tether` goes first after authentication on each link
/// until an appliance answered it; the appliance surfaces it as an event.
#[test]
fn a_child_announces_itself_on_each_link_until_answered() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    pair.sessions.started(PRIMARY);
    let renamed = pair.sessions.rename_for_child("web-2", 2).unwrap();
    assert_eq!(renamed, [("web".to_string(), "web-2".to_string())]);
    let forked = web_2();
    pair.sessions.announce_fork(forked.clone());
    // The child drops its link (the parent's) and makes a new one.
    pair.relink();
    pair.drive();
    let list = announced_then_listed(&pair.events, &forked);
    assert_eq!(pair.runtime.forked_answers, [true]);
    assert!(pair.sessions.pending_fork().is_none());
    assert_eq!(list[0].id, "web-2");
    assert_eq!(list[0].kind, Kind::Primary);
    // Answered: the next link does not announce again.
    pair.relink();
    pair.drive();
    assert!(
        !pair
            .events
            .iter()
            .any(|e| matches!(e, ApplianceEvent::Forked(_)))
    );
}

/// A recovering child's link syncs and authenticates while the child
/// recovers, but says nothing (no container list under its parent's names)
/// until the child announces itself; then `forked@tether` goes first.
#[test]
fn a_recovering_childs_link_waits_for_the_announcement() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    pair.sessions.started(PRIMARY);
    pair.sessions.begin_fork_recovery();
    pair.relink();
    pair.drive();
    assert!(
        pair.events.contains(&ApplianceEvent::Authenticated),
        "{:?}",
        pair.events
    );
    assert!(
        !pair.events.iter().any(|e| matches!(
            e,
            ApplianceEvent::Containers { .. } | ApplianceEvent::Forked(_)
        )),
        "{:?}",
        pair.events
    );
    pair.sessions.rename_for_child("web-2", 2).unwrap();
    let forked = web_2();
    pair.sessions.announce_fork(forked.clone());
    assert!(!pair.sessions.recovering());
    pair.drive();
    let list = announced_then_listed(&pair.events, &forked);
    assert_eq!(list[0].id, "web-2");
}

/// The appliance asks for the list right after authentication; a guest
/// that handles that request before its runtime pumps must still send its
/// `forked@tether` first, or the appliance would read a failed child's
/// names (its parent's) as a claim of the parent.
#[test]
fn a_child_announces_itself_before_answering_a_list_request() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    pair.sessions.started(PRIMARY);
    let forked = web_2();
    pair.sessions.announce_fork(forked.clone());
    pair.relink();
    pair.drive_lazily();
    let list = announced_then_listed(&pair.events, &forked);
    // The recovery failed before the names step: the parent's name.
    assert_eq!(list[0].id, "web");
}

#[test]
fn a_child_renames_its_execs_and_names_new_ones_after_itself() {
    let mut pair = connected(1 << 20, Overflow::DropOldest);
    let ch = pair.appliance.open(exec("true")).unwrap();
    pair.drive();
    let (_, exec_id) = opened(&pair, ch).unwrap();
    assert_eq!(exec_id.as_deref(), Some("web-exec1"));
    let mut renamed = pair.sessions.rename_for_child("copy", 3).unwrap();
    renamed.sort();
    assert_eq!(
        renamed,
        [
            ("web".to_string(), "copy".to_string()),
            ("web-exec1".to_string(), "web-exec1-3".to_string())
        ]
    );
    assert_eq!(pair.sessions.primary(), "copy");
    pair.relink();
    pair.drive();
    let ch = pair.appliance.open(exec("true")).unwrap();
    pair.drive();
    assert_eq!(opened(&pair, ch).unwrap().1.as_deref(), Some("copy-exec2"));
    // A rename that would give two sessions one id changes nothing.
    assert!(pair.sessions.rename_for_child("copy-exec2-1", 1).is_err());
    assert_eq!(pair.sessions.primary(), "copy");
}
