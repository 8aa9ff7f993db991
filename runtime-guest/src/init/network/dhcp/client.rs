//! The DHCPv4 client state machine (RFC 2131), without sockets or clocks: it
//! is fed received packets and the time, and answers with packets to send,
//! lease events, and the next time it wants to be woken. The caller drains
//! `poll_transmit` and `poll_event` after every input, then sleeps until
//! `poll_timeout`.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use super::wire::{BOOT_REPLY, BOOT_REQUEST, Message, MessageType, code};
use crate::init::network::spec::MacAddr;

/// The first retransmission interval; it doubles up to `MAX_BACKOFF`. Shorter
/// than RFC 2131's 4 s: a VM's network answers at once or not at all.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(16);
/// REQUESTs sent for one offer before starting over with DISCOVER.
const REQUEST_TRIES: u32 = 4;
/// The shortest wait between retransmissions while renewing or rebinding.
const MIN_RENEW_RETRY: Duration = Duration::from_secs(1);

/// What the server granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Our address (`yiaddr`).
    pub address: Ipv4Addr,
    /// From the subnet mask option (classful default without one).
    pub prefix_len: u8,
    /// The server that granted it (renewals go there).
    pub server: Ipv4Addr,
    /// Routers, in the server's order of preference.
    pub routers: Vec<Ipv4Addr>,
    /// DNS servers, for `resolv.conf` when the config gives none.
    pub dns: Vec<Ipv4Addr>,
    /// The domain name option, a `search` candidate.
    pub domain: Option<String>,
    /// None: an infinite lease.
    pub lease_time: Option<Duration>,
    /// When to renew, after `start` (None with an infinite lease).
    pub t1: Option<Duration>,
    /// When to rebind, after `start`.
    pub t2: Option<Duration>,
    /// When the exchange that granted it started (lease times count from here).
    pub start: Instant,
}

impl Lease {
    fn at(&self, after: Option<Duration>) -> Option<Instant> {
        after.map(|d| self.start + d)
    }
    /// When the lease runs out, unless renewed.
    pub fn expiry(&self) -> Option<Instant> {
        self.at(self.lease_time)
    }
}

/// A packet to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// To 255.255.255.255:67.
    Broadcast(Vec<u8>),
    /// To the server at this address, port 67.
    Unicast(Ipv4Addr, Vec<u8>),
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new lease: apply the address, router and DNS servers.
    Bound(Lease),
    /// The same address again with new times: refresh its lifetime.
    Renewed(Lease),
    /// The lease is gone (expired, or the server said no): remove the address.
    Lost(Lease),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Selecting {
        xid: u32,
        started: Instant,
        next: Instant,
        backoff: Duration,
    },
    Requesting {
        xid: u32,
        started: Instant,
        offer: Box<Offer>,
        next: Instant,
        tries: u32,
    },
    Bound,
    Renewing {
        xid: u32,
        started: Instant,
        next: Instant,
    },
    Rebinding {
        xid: u32,
        started: Instant,
        next: Instant,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Offer {
    address: Ipv4Addr,
    server: Ipv4Addr,
}

/// A DHCPv4 client for one interface.
pub struct Client {
    mac: MacAddr,
    hostname: Option<String>,
    rng: ChaCha8Rng,
    state: State,
    lease: Option<Lease>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

impl Client {
    /// A client that starts discovering at `now`; `seed` makes transaction ids.
    pub fn new(mac: MacAddr, hostname: Option<String>, seed: u64, now: Instant) -> Self {
        let mut c = Client {
            mac,
            hostname,
            rng: ChaCha8Rng::seed_from_u64(seed),
            state: State::Bound,
            lease: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        };
        c.start_over(now);
        c
    }

    /// The current lease, if bound (or renewing).
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// The next packet to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next thing the caller must do.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must be called next (None: never).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let lease = self.lease.as_ref();
        match &self.state {
            State::Selecting { next, .. } | State::Requesting { next, .. } => Some(*next),
            State::Bound => lease.and_then(|l| l.at(l.t1)),
            State::Renewing { next, .. } => {
                let t2 = lease.and_then(|l| l.at(l.t2));
                Some(t2.map_or(*next, |t2| (*next).min(t2)))
            }
            State::Rebinding { next, .. } => {
                let end = lease.and_then(Lease::expiry);
                Some(end.map_or(*next, |e| (*next).min(e)))
            }
        }
    }

    fn start_over(&mut self, now: Instant) {
        let xid = self.rng.next_u32();
        self.state = State::Selecting {
            xid,
            started: now,
            next: now + FIRST_BACKOFF,
            backoff: FIRST_BACKOFF,
        };
        self.send_discover(xid, now, now);
    }

    /// Retransmits, or moves on to renewing, rebinding or starting over.
    pub fn handle_timeout(&mut self, now: Instant) {
        let lease = self.lease.clone();
        let t1 = lease.as_ref().and_then(|l| l.at(l.t1));
        let t2 = lease.as_ref().and_then(|l| l.at(l.t2));
        let expiry = lease.as_ref().and_then(Lease::expiry);
        match self.state.clone() {
            State::Selecting {
                xid,
                started,
                next,
                backoff,
            } if now >= next => {
                let backoff = (backoff * 2).min(MAX_BACKOFF);
                self.state = State::Selecting {
                    xid,
                    started,
                    next: now + backoff,
                    backoff,
                };
                self.send_discover(xid, started, now);
            }
            State::Requesting {
                xid,
                started,
                offer,
                next,
                tries,
            } if now >= next => {
                if tries >= REQUEST_TRIES {
                    self.start_over(now);
                    return;
                }
                let wait = (FIRST_BACKOFF * 2u32.pow(tries)).min(MAX_BACKOFF);
                self.send_request_selecting(xid, started, &offer, now);
                self.state = State::Requesting {
                    xid,
                    started,
                    offer,
                    next: now + wait,
                    tries: tries + 1,
                };
            }
            State::Bound if t1.is_some_and(|t| now >= t) => {
                let xid = self.rng.next_u32();
                self.state = State::Renewing {
                    xid,
                    started: now,
                    next: now,
                };
                self.handle_timeout(now);
            }
            State::Renewing { .. } if t2.is_some_and(|t| now >= t) => {
                let xid = self.rng.next_u32();
                self.state = State::Rebinding {
                    xid,
                    started: now,
                    next: now,
                };
                self.handle_timeout(now);
            }
            State::Renewing { xid, started, next } if now >= next => {
                let Some(l) = lease else { return };
                self.send_request_bound(xid, started, &l, Some(l.server), now);
                let wait = t2.map_or(MAX_BACKOFF, |t2| half_until(now, t2));
                self.state = State::Renewing {
                    xid,
                    started,
                    next: now + wait,
                };
            }
            State::Rebinding { .. } if expiry.is_some_and(|t| now >= t) => {
                if let Some(l) = self.lease.take() {
                    self.events.push_back(Event::Lost(l));
                }
                self.start_over(now);
            }
            State::Rebinding { xid, started, next } if now >= next => {
                let Some(l) = lease else { return };
                self.send_request_bound(xid, started, &l, None, now);
                let wait = expiry.map_or(MAX_BACKOFF, |e| half_until(now, e));
                self.state = State::Rebinding {
                    xid,
                    started,
                    next: now + wait,
                };
            }
            _ => {}
        }
    }

    /// Takes a packet received on port 68; anything not for us is ignored.
    pub fn handle_packet(&mut self, bytes: &[u8], now: Instant) {
        let Ok(msg) = Message::decode(bytes) else {
            return;
        };
        if msg.op != BOOT_REPLY || msg.chaddr[..6] != self.mac.0 {
            return;
        }
        let Some(kind) = msg.message_type() else {
            return;
        };
        match (self.state.clone(), kind) {
            (State::Selecting { xid, started, .. }, MessageType::Offer) if msg.xid == xid => {
                let Some(server) = msg.ipv4(code::SERVER_IDENTIFIER) else {
                    return; // RFC 2131: an offer must name its server
                };
                if msg.yiaddr.is_unspecified() {
                    return;
                }
                let offer = Box::new(Offer {
                    address: msg.yiaddr,
                    server,
                });
                self.send_request_selecting(xid, started, &offer, now);
                self.state = State::Requesting {
                    xid,
                    started,
                    offer,
                    next: now + FIRST_BACKOFF,
                    tries: 1,
                };
            }
            (State::Requesting { xid, started, .. }, MessageType::Ack) if msg.xid == xid => {
                if let Some(lease) = lease_from(&msg, started, None) {
                    self.lease = Some(lease.clone());
                    self.state = State::Bound;
                    self.events.push_back(Event::Bound(lease));
                }
            }
            (
                State::Renewing { xid, started, .. } | State::Rebinding { xid, started, .. },
                MessageType::Ack,
            ) if msg.xid == xid => {
                let Some(lease) = lease_from(&msg, started, self.lease.as_ref()) else {
                    return;
                };
                let old = self.lease.replace(lease.clone());
                self.state = State::Bound;
                match old {
                    Some(o) if o.address == lease.address && o.prefix_len == lease.prefix_len => {
                        self.events.push_back(Event::Renewed(lease));
                    }
                    Some(o) => {
                        self.events.push_back(Event::Lost(o));
                        self.events.push_back(Event::Bound(lease));
                    }
                    None => self.events.push_back(Event::Bound(lease)),
                }
            }
            (
                State::Requesting { xid, .. }
                | State::Renewing { xid, .. }
                | State::Rebinding { xid, .. },
                MessageType::Nak,
            ) if msg.xid == xid => {
                if let Some(l) = self.lease.take() {
                    self.events.push_back(Event::Lost(l));
                }
                self.start_over(now);
            }
            _ => {}
        }
    }

    fn base(&self, xid: u32, kind: MessageType, started: Instant, now: Instant) -> Message {
        let mut m = Message::new(BOOT_REQUEST, xid, &self.mac.0);
        let secs = now.saturating_duration_since(started).as_secs();
        m.secs = u16::try_from(secs).unwrap_or(u16::MAX);
        m.set(code::MESSAGE_TYPE, [kind as u8]);
        let mut id = vec![1u8]; // hardware type: Ethernet
        id.extend_from_slice(&self.mac.0);
        m.set(code::CLIENT_IDENTIFIER, id);
        m.set(code::MAX_MESSAGE_SIZE, 1500u16.to_be_bytes());
        m.set(
            code::PARAMETER_REQUEST_LIST,
            [
                code::SUBNET_MASK,
                code::ROUTER,
                code::DOMAIN_NAME_SERVER,
                code::DOMAIN_NAME,
                code::ADDRESS_LEASE_TIME,
                code::RENEWAL_TIME,
                code::REBINDING_TIME,
            ],
        );
        if let Some(h) = &self.hostname {
            m.set(code::HOSTNAME, h.as_bytes());
        }
        m
    }

    fn send_discover(&mut self, xid: u32, started: Instant, now: Instant) {
        let mut m = self.base(xid, MessageType::Discover, started, now);
        // Ask for broadcast replies: we cannot receive unicast before we have the address.
        m.broadcast = true;
        self.queue(Transmit::Broadcast, m);
    }

    fn send_request_selecting(&mut self, xid: u32, started: Instant, offer: &Offer, now: Instant) {
        let mut m = self.base(xid, MessageType::Request, started, now);
        m.broadcast = true;
        m.set(code::REQUESTED_IP_ADDRESS, offer.address.octets());
        m.set(code::SERVER_IDENTIFIER, offer.server.octets());
        self.queue(Transmit::Broadcast, m);
    }

    /// A renewal (unicast to `server`) or rebinding (broadcast) REQUEST.
    fn send_request_bound(
        &mut self,
        xid: u32,
        started: Instant,
        lease: &Lease,
        server: Option<Ipv4Addr>,
        now: Instant,
    ) {
        let mut m = self.base(xid, MessageType::Request, started, now);
        m.ciaddr = lease.address;
        match server {
            Some(s) => self.queue(|b| Transmit::Unicast(s, b), m),
            None => self.queue(Transmit::Broadcast, m),
        }
    }

    fn queue(&mut self, to: impl FnOnce(Vec<u8>) -> Transmit, m: Message) {
        self.transmits.push_back(to(m.encode()));
    }
}

/// Half the time left until `t`, but at least `MIN_RENEW_RETRY` (RFC 2131 4.4.5).
fn half_until(now: Instant, t: Instant) -> Duration {
    (t.saturating_duration_since(now) / 2).max(MIN_RENEW_RETRY)
}

/// The lease an ACK grants; `old` fills in what a renewal ACK may leave out.
fn lease_from(msg: &Message, start: Instant, old: Option<&Lease>) -> Option<Lease> {
    let address = msg.yiaddr;
    if address.is_unspecified() {
        return None;
    }
    let prefix_len = match msg.ipv4(code::SUBNET_MASK) {
        Some(m) => u32::from(m).leading_ones() as u8,
        _ => match old {
            Some(o) => o.prefix_len,
            // No mask: the classful default, as old clients did.
            None => match address.octets()[0] {
                0..=127 => 8,
                128..=191 => 16,
                _ => 24,
            },
        },
    };
    let server = match msg.ipv4(code::SERVER_IDENTIFIER) {
        Some(s) => s,
        None => old.map(|o| o.server).unwrap_or(msg.siaddr),
    };
    let secs = |code| msg.u32(code);
    let lease_time = match secs(code::ADDRESS_LEASE_TIME) {
        Some(u32::MAX) => None,
        Some(s) => Some(Duration::from_secs(u64::from(s))),
        None => Some(Duration::from_secs(3600)),
    };
    let (t1, t2) = match lease_time {
        None => (None, None),
        Some(l) => {
            let t1 = secs(code::RENEWAL_TIME).map(|s| Duration::from_secs(u64::from(s)));
            let t2 = secs(code::REBINDING_TIME).map(|s| Duration::from_secs(u64::from(s)));
            let t2 = t2.filter(|t| *t <= l).unwrap_or(l * 7 / 8);
            let t1 = t1.filter(|t| *t <= t2).unwrap_or((l / 2).min(t2));
            (Some(t1), Some(t2))
        }
    };
    let domain = msg
        .get(code::DOMAIN_NAME)
        .and_then(|d| std::str::from_utf8(d).ok())
        .map(|d| d.trim_end_matches('\0').to_owned());
    Some(Lease {
        address,
        prefix_len,
        server,
        routers: msg.ipv4_list(code::ROUTER),
        dns: msg.ipv4_list(code::DOMAIN_NAME_SERVER),
        domain,
        lease_time,
        t1,
        t2,
        start,
    })
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
