//! Moving output from session logs into attach channels, finishing channels of
//! exited sessions, returning stdin window, and pushing container-list changes.

use proto_core::event::EXTENDED_STDERR;
use proto_core::outlog::{Overflow, Read, Stream};
use proto_core::tether::{self, ContainerInfo, State};
use proto_core::{ChannelRequest, Connection};

use super::{Link, READ_CHUNK, Role, encode};

impl Link {
    /// Moves output from logs into channels, finishes channels of exited
    /// sessions, returns stdin credits and pushes container-list changes.
    pub(super) fn pump(&mut self, conn: &mut Connection) {
        let guest = self.guest.clone();
        let mut touched: Vec<String> = Vec::new();
        let generation = self.generation;
        for (&channel, role) in self.roles.iter_mut() {
            let Role::Attached(a) = role else { continue };
            if a.done || !(a.stdout || a.stderr) {
                continue;
            }
            guest.with(&a.session, |s| {
                loop {
                    let window = conn.send_window(channel).unwrap_or(0) as usize;
                    if window == 0 {
                        break;
                    }
                    match s.log.read(a.cursor, window.min(READ_CHUNK)) {
                        Read::Gap { lost, resume } => {
                            let gap = encode(|b| tether::encode_output_gap(lost, b));
                            let req = ChannelRequest::Other {
                                name: tether::OUTPUT_GAP.into(),
                                data: gap,
                            };
                            let _ = conn.channel_request(channel, &req, false);
                            a.cursor = resume;
                        }
                        Read::Data { stream, data, next } => {
                            let (wanted, ext) = match stream {
                                Stream::Stdout => (a.stdout, None),
                                Stream::Stderr => (a.stderr, Some(EXTENDED_STDERR)),
                            };
                            if !wanted {
                                a.cursor = next;
                                continue;
                            }
                            let sent = conn.channel_send(channel, ext, &data).unwrap_or(0);
                            a.cursor += sent as u64;
                            if sent < data.len() {
                                break;
                            }
                        }
                        Read::End => {
                            if let Some(exit) = &s.exit {
                                let req = match &exit.signal {
                                    Some((name, core)) => ChannelRequest::ExitSignal {
                                        name: name.clone(),
                                        core_dumped: *core,
                                        message: String::new(),
                                    },
                                    None => ChannelRequest::ExitStatus { code: exit.code },
                                };
                                let _ = conn.channel_request(channel, &req, false);
                                let _ = conn.channel_eof(channel);
                                let _ = conn.channel_close(channel);
                            }
                            a.done = true;
                            break;
                        }
                        Read::Pending | Read::Beyond { .. } => break,
                    }
                }
                if s.log.overflow() == Overflow::Block {
                    // Sent output stops counting against the log; it is freed only
                    // once the appliance acknowledged it by returning window, so
                    // bytes in flight when a link drops are replayed, never lost.
                    let unacked = conn.unacknowledged(channel).unwrap_or(0) as u64;
                    s.readers.insert(
                        (generation, channel),
                        (a.cursor, a.cursor.saturating_sub(unacked)),
                    );
                    touched.push(a.session.clone());
                }
            });
        }
        touched.sort();
        touched.dedup();
        for id in touched {
            guest.with(&id, |s| s.apply_readers());
        }
        for (credit, n) in guest.take_credits(self.generation) {
            let _ = conn.channel_consume(credit.channel, n);
        }
        if conn.is_authenticated() {
            let list = guest.container_list();
            let now = summary(&list);
            if self.pushed.as_ref() != Some(&now) {
                let data = encode(|b| tether::encode_container_ids(&list, b));
                if conn
                    .global_request(tether::CONTAINER_IDS, &data, false)
                    .is_ok()
                {
                    self.pushed = Some(now);
                }
            }
            self.note_exit_reported();
        }
    }

    /// Tells the guest once the primary's exit has reached the appliance: pushed,
    /// and every attachment to it finished.
    fn note_exit_reported(&self) {
        let primary = &self.guest.config.id;
        let pushed_exit = self.pushed.as_ref().is_some_and(|p| {
            p.iter()
                .any(|(id, st, _)| id == primary && *st == State::Exited)
        });
        let open = self.roles.values().any(|r| matches!(r, Role::Attached(a) if &a.session == primary && !a.done && (a.stdout || a.stderr)));
        if pushed_exit && !open {
            self.guest.exit_reported.set(true);
        }
    }
}

/// The parts of a container list whose change is worth a push (not output_end,
/// which moves with every byte).
pub(super) fn summary(list: &[ContainerInfo]) -> Vec<(String, State, u32)> {
    list.iter()
        .map(|c| (c.id.clone(), c.state, c.exit_status))
        .collect()
}
