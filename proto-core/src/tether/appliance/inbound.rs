//! What the guest sends an `ApplianceLink`: container lists, channel
//! confirmations and refusals, output, gaps, exits, replies; and the
//! requests that follow a confirmation (an exec's env, pty-req and exec, a
//! control channel's one request).

use bytes::Bytes;

use super::{
    ApplianceEvent, ApplianceLink, Chan, GlobalWaiter, Kind, ListId, Open, Pending, Phase, Waiter,
};
use crate::event::{ChannelId, Event, open_failure};
use crate::request::{ChannelRequest, PtyRequest};
use crate::tether::messages::{self as m, ExitStatus};

impl ApplianceLink {
    pub(super) fn handle_events(&mut self) {
        while let Some(event) = self.conn.poll_event() {
            self.handle_event(event);
        }
    }

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::Authenticated(_) => {
                self.events.push_back(ApplianceEvent::Authenticated);
                if self
                    .conn
                    .global_request(m::CONTAINER_IDS, &[], true)
                    .is_ok()
                {
                    self.globals.push_back(GlobalWaiter::List(None));
                }
            }
            Event::GlobalReply { success, data } => match self.globals.pop_front() {
                Some(GlobalWaiter::Fork(mode)) => {
                    let generation = match mode {
                        m::ForkMode::Quiesce if success => m::decode_fork_reply(&data).ok(),
                        _ => None,
                    };
                    self.events.push_back(ApplianceEvent::Fork {
                        mode,
                        success,
                        generation,
                    });
                }
                Some(GlobalWaiter::List(reply)) => {
                    self.events.push_back(if success {
                        list_event(&data, reply)
                    } else {
                        ApplianceEvent::ListFailed {
                            reply,
                            reason: "the guest refused to list its containers".into(),
                        }
                    });
                }
                None => {}
            },
            Event::GlobalRequest {
                name,
                data,
                want_reply,
            } => {
                let known = match name.as_str() {
                    m::CONTAINER_IDS => {
                        self.events.push_back(list_event(&data, None));
                        true
                    }
                    // A malformed announcement is refused: the child runs on.
                    m::FORKED => match m::Forked::decode(&data) {
                        Ok(forked) => {
                            self.events.push_back(ApplianceEvent::Forked(forked));
                            true
                        }
                        Err(_) => false,
                    },
                    _ => false,
                };
                if want_reply {
                    let _ = self.conn.global_reply(known, Bytes::new());
                }
            }
            Event::ChannelOpened { channel } => self.confirmed(channel),
            Event::ChannelOpenFailed {
                channel,
                description,
                ..
            } => {
                if let Some(chan) = self.chans.remove(&channel) {
                    self.drop_stdin(channel, chan);
                    let reason = description;
                    self.events
                        .push_back(ApplianceEvent::OpenFailed { channel, reason });
                }
            }
            Event::ChannelData { channel, ext, data } => {
                if self.chans.contains_key(&channel) {
                    self.report_open(channel);
                    self.events
                        .push_back(ApplianceEvent::Data { channel, ext, data });
                } else {
                    let _ = self.conn.channel_consume(channel, data.len());
                }
            }
            Event::ChannelRequest {
                channel,
                request,
                want_reply,
            } => {
                self.channel_request(channel, request);
                if want_reply {
                    let _ = self.conn.channel_reply(channel, false);
                }
            }
            Event::ChannelReply { channel, success } => self.reply(channel, success),
            Event::ChannelWritable { channel } => self.flush_stdin(channel),
            Event::ChannelClosed { channel } => {
                if let Some(chan) = self.chans.remove(&channel) {
                    let event = match (chan.kind, chan.phase) {
                        (_, Phase::Failed) => None,
                        (Kind::Control, _) | (_, Phase::Open) => {
                            Some(ApplianceEvent::Closed { channel })
                        }
                        _ => Some(ApplianceEvent::OpenFailed {
                            channel,
                            reason: "the guest closed the channel".into(),
                        }),
                    };
                    self.events.extend(event);
                    self.drop_stdin(channel, chan);
                }
            }
            Event::ChannelOpen { channel, .. } => {
                let _ = self.conn.reject_channel(
                    channel,
                    open_failure::ADMINISTRATIVELY_PROHIBITED,
                    "the appliance accepts no channels",
                );
            }
            _ => {}
        }
    }

    fn drop_stdin(&mut self, channel: ChannelId, chan: Chan) {
        let n: usize = chan.stdin.iter().map(Bytes::len).sum();
        if n > 0 {
            self.events
                .push_back(ApplianceEvent::StdinSent { channel, n });
        }
    }

    /// The guest confirmed a channel we opened.
    fn confirmed(&mut self, channel: ChannelId) {
        let Some(chan) = self.chans.get_mut(&channel) else {
            return;
        };
        chan.phase = Phase::Confirmed;
        match chan.pending.take() {
            None => {}
            Some(Pending::Control(request)) => {
                let sent = self.conn.channel_request(channel, &request, true);
                if sent.is_ok() {
                    chan.waiters.push_back(Waiter::Control);
                }
            }
            Some(Pending::Exec(Open::Exec { command, tty, env })) => {
                for (name, value) in env {
                    let value = Bytes::from(value.into_bytes());
                    let env = ChannelRequest::Env { name, value };
                    let _ = self.conn.channel_request(channel, &env, false);
                }
                if let Some((cols, rows)) = tty {
                    let pty = PtyRequest {
                        term: "xterm".into(),
                        cols,
                        rows,
                        width_px: 0,
                        height_px: 0,
                        modes: Bytes::from_static(&[0]),
                    };
                    let _ = self
                        .conn
                        .channel_request(channel, &ChannelRequest::Pty(pty), false);
                }
                let exec = ChannelRequest::Exec {
                    command: command.into(),
                };
                if self.conn.channel_request(channel, &exec, true).is_ok() {
                    chan.waiters.push_back(Waiter::Exec);
                }
            }
            Some(Pending::Exec(Open::Attach(_))) => {}
        }
        self.flush_stdin(channel);
    }

    /// Reports `Opened` for an attach whose offset did not come first (a
    /// guest that skips `offset@tether`): the position is then unknown.
    fn report_open(&mut self, channel: ChannelId) {
        if let Some(chan) = self.chans.get_mut(&channel)
            && chan.kind == Kind::Attach
            && chan.phase == Phase::Confirmed
        {
            chan.phase = Phase::Open;
            self.events.push_back(ApplianceEvent::Opened {
                channel,
                offset: None,
                exec_id: None,
            });
        }
    }

    fn channel_request(&mut self, channel: ChannelId, request: ChannelRequest) {
        let Some(chan) = self.chans.get_mut(&channel) else {
            return;
        };
        match request {
            // Only first on an attach channel does it say where output starts.
            ChannelRequest::Other { name, data }
                if name == m::OFFSET
                    && chan.kind == Kind::Attach
                    && chan.phase == Phase::Confirmed =>
            {
                chan.phase = Phase::Open;
                let offset = m::decode_offset(&data).ok();
                self.events.push_back(ApplianceEvent::Opened {
                    channel,
                    offset,
                    exec_id: None,
                });
            }
            ChannelRequest::Other { name, data } if name == m::EXEC_ID => {
                chan.exec_id = m::decode_exec_id(&data).ok();
            }
            ChannelRequest::Other { name, data } if name == m::OUTPUT_GAP => {
                if let Ok(lost) = m::decode_output_gap(&data) {
                    self.report_open(channel);
                    self.events.push_back(ApplianceEvent::Gap { channel, lost });
                }
            }
            ChannelRequest::ExitStatus { code } => {
                self.report_open(channel);
                let status = ExitStatus::Code(code);
                self.events
                    .push_back(ApplianceEvent::Exit { channel, status });
            }
            ChannelRequest::ExitSignal {
                name, core_dumped, ..
            } => {
                self.report_open(channel);
                let status = ExitStatus::Signal { name, core_dumped };
                self.events
                    .push_back(ApplianceEvent::Exit { channel, status });
            }
            _ => {}
        }
    }

    fn reply(&mut self, channel: ChannelId, success: bool) {
        let Some(chan) = self.chans.get_mut(&channel) else {
            return;
        };
        match chan.waiters.pop_front() {
            Some(Waiter::Caller) => {
                self.events
                    .push_back(ApplianceEvent::Reply { channel, success });
            }
            Some(Waiter::Control) => {
                self.events
                    .push_back(ApplianceEvent::Reply { channel, success });
                let _ = self.conn.channel_close(channel);
            }
            Some(Waiter::Exec) => match chan.exec_id.clone() {
                Some(exec_id) if success => {
                    chan.phase = Phase::Open;
                    self.events.push_back(ApplianceEvent::Opened {
                        channel,
                        offset: Some(0),
                        exec_id: Some(exec_id),
                    });
                }
                _ => {
                    let reason = if success {
                        "the guest did not name the exec"
                    } else {
                        "the guest refused the exec"
                    };
                    chan.phase = Phase::Failed;
                    self.events.push_back(ApplianceEvent::OpenFailed {
                        channel,
                        reason: reason.into(),
                    });
                    let _ = self.conn.channel_close(channel);
                }
            },
            None => {}
        }
    }
}

fn list_event(data: &[u8], reply: Option<ListId>) -> ApplianceEvent {
    match m::decode_container_ids(data) {
        Ok(list) => ApplianceEvent::Containers { list, reply },
        Err(e) => ApplianceEvent::ListFailed {
            reply,
            reason: format!("bad container list: {e}"),
        },
    }
}
