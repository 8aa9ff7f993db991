//! The client driven by a scripted server and a virtual clock: no sockets,
//! no sleeping.

use super::*;
use crate::init::network::dhcp::wire::code;

const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const OURS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

fn decode(t: &Transmit) -> Message {
    let bytes = match t {
        Transmit::Broadcast(b) | Transmit::Unicast(_, b) => b,
    };
    Message::decode(bytes).unwrap()
}

/// A server's reply of `kind` to `req`, granting `OURS` for `lease` seconds.
fn reply(req: &Message, kind: MessageType, lease: u32) -> Vec<u8> {
    let mut m = Message::new(BOOT_REPLY, req.xid, &MAC.0);
    m.yiaddr = OURS;
    m.siaddr = SERVER;
    m.set(code::MESSAGE_TYPE, [kind as u8]);
    m.set(code::SERVER_IDENTIFIER, SERVER.octets());
    m.set(code::SUBNET_MASK, [255, 255, 255, 0]);
    m.set(code::ROUTER, SERVER.octets());
    m.set(code::DOMAIN_NAME_SERVER, [10, 0, 2, 3]);
    m.set(code::ADDRESS_LEASE_TIME, lease.to_be_bytes());
    m.encode()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Runs DISCOVER/OFFER/REQUEST/ACK at `t0` and returns the bound client.
fn bound(t0: Instant, lease: u32) -> Client {
    let mut c = Client::new(MAC, Some("box".into()), 7, t0);
    let discover = decode(&c.poll_transmit().expect("a DISCOVER at once"));
    assert_eq!(discover.message_type(), Some(MessageType::Discover));
    assert!(discover.broadcast, "replies must be broadcast");
    c.handle_packet(&reply(&discover, MessageType::Offer, lease), t0);
    let request = decode(&c.poll_transmit().expect("a REQUEST"));
    assert_eq!(request.message_type(), Some(MessageType::Request));
    assert_eq!(request.xid, discover.xid);
    assert_eq!(request.ipv4(code::REQUESTED_IP_ADDRESS), Some(OURS));
    c.handle_packet(&reply(&request, MessageType::Ack, lease), t0);
    c
}

#[test]
fn discover_offer_request_ack_binds_the_lease() {
    let t0 = Instant::now();
    let mut c = bound(t0, 600);
    let Some(Event::Bound(l)) = c.poll_event() else {
        panic!("bound")
    };
    assert_eq!(
        (l.address, l.prefix_len, l.server, l.routers.clone()),
        (OURS, 24, SERVER, vec![SERVER])
    );
    assert_eq!(l.dns, vec![Ipv4Addr::new(10, 0, 2, 3)]);
    assert_eq!((l.t1, l.t2), (Some(secs(300)), Some(secs(525))));
    assert_eq!(c.poll_timeout(), Some(t0 + secs(300)), "sleeps until T1");
    assert_eq!(c.poll_transmit(), None);
}

#[test]
fn a_missing_server_means_discovers_with_growing_backoff() {
    let t0 = Instant::now();
    let mut c = Client::new(MAC, None, 1, t0);
    assert!(c.poll_transmit().is_some());
    let mut gaps = Vec::new();
    let mut now = t0;
    for _ in 0..7 {
        let next = c.poll_timeout().unwrap();
        gaps.push((next - now).as_secs());
        now = next;
        c.handle_timeout(now);
        assert!(matches!(c.poll_transmit(), Some(Transmit::Broadcast(_))));
    }
    assert_eq!(gaps, [1, 2, 4, 8, 16, 16, 16]);
    assert_eq!(c.poll_event(), None);
}

#[test]
fn replies_for_another_transaction_or_client_are_ignored() {
    let t0 = Instant::now();
    let mut c = Client::new(MAC, None, 1, t0);
    let discover = decode(&c.poll_transmit().unwrap());
    let mut other = discover.clone();
    other.xid = discover.xid.wrapping_add(1);
    c.handle_packet(&reply(&other, MessageType::Offer, 60), t0);
    c.handle_packet(b"not dhcp at all", t0);
    assert_eq!(c.poll_transmit(), None);
}

#[test]
fn renewal_at_t1_is_unicast_to_the_server_and_refreshes_the_lease() {
    let t0 = Instant::now();
    let mut c = bound(t0, 20);
    assert!(matches!(c.poll_event(), Some(Event::Bound(_))));
    assert_eq!(c.poll_timeout(), Some(t0 + secs(10)));
    c.handle_timeout(t0 + secs(10));
    let Some(Transmit::Unicast(to, bytes)) = c.poll_transmit() else {
        panic!("a unicast REQUEST at T1")
    };
    assert_eq!(to, SERVER);
    let req = Message::decode(&bytes).unwrap();
    assert_eq!(req.ciaddr, OURS);
    assert!(req.get(code::REQUESTED_IP_ADDRESS).is_none());
    c.handle_packet(&reply(&req, MessageType::Ack, 20), t0 + secs(11));
    let Some(Event::Renewed(l)) = c.poll_event() else {
        panic!("renewed")
    };
    assert_eq!(l.start, t0 + secs(10), "times count from the REQUEST");
    assert_eq!(c.poll_timeout(), Some(t0 + secs(20)), "the next T1");
}

#[test]
fn silence_while_renewing_leads_to_rebinding_then_loss_and_rediscovery() {
    let t0 = Instant::now();
    let mut c = bound(t0, 80); // T1 40 s, T2 70 s, expiry 80 s
    c.poll_event();
    let mut sent = Vec::new();
    let mut now = t0;
    while now < t0 + secs(81) {
        let Some(next) = c.poll_timeout() else { break };
        now = next;
        c.handle_timeout(now);
        while let Some(t) = c.poll_transmit() {
            let kind = match &t {
                Transmit::Unicast(..) => "renew",
                Transmit::Broadcast(_) => match decode(&t).message_type() {
                    Some(MessageType::Discover) => "discover",
                    _ => "rebind",
                },
            };
            sent.push(((now - t0).as_secs(), kind));
        }
        if let Some(Event::Lost(l)) = c.poll_event() {
            assert_eq!(l.address, OURS);
            assert_eq!(now, t0 + secs(80));
            break;
        }
    }
    assert_eq!(
        sent,
        [
            (40, "renew"),
            (55, "renew"),
            (62, "renew"),
            (66, "renew"),
            (68, "renew"),
            (69, "renew"),
            (70, "rebind"),
            (75, "rebind"),
            (77, "rebind"),
            (78, "rebind"),
            (79, "rebind"),
            (80, "discover"),
        ]
    );
    assert!(c.lease().is_none());
}

#[test]
fn a_nak_while_renewing_drops_the_lease_and_starts_over() {
    let t0 = Instant::now();
    let mut c = bound(t0, 20);
    c.poll_event();
    c.handle_timeout(t0 + secs(10));
    let req = decode(&c.poll_transmit().unwrap());
    c.handle_packet(&reply(&req, MessageType::Nak, 0), t0 + secs(10));
    assert!(matches!(c.poll_event(), Some(Event::Lost(_))));
    let next = decode(&c.poll_transmit().expect("a new DISCOVER"));
    assert_eq!(next.message_type(), Some(MessageType::Discover));
}

#[test]
fn an_unanswered_request_goes_back_to_discover() {
    let t0 = Instant::now();
    let mut c = Client::new(MAC, None, 3, t0);
    let discover = decode(&c.poll_transmit().unwrap());
    c.handle_packet(&reply(&discover, MessageType::Offer, 60), t0);
    let mut kinds = Vec::new();
    for _ in 0..5 {
        while let Some(t) = c.poll_transmit() {
            kinds.push(decode(&t).message_type().unwrap());
        }
        let now = c.poll_timeout().unwrap();
        c.handle_timeout(now);
    }
    while let Some(t) = c.poll_transmit() {
        kinds.push(decode(&t).message_type().unwrap());
    }
    use MessageType::{Discover, Request};
    assert_eq!(
        kinds,
        [Request, Request, Request, Request, Discover, Discover]
    );
}

#[test]
fn an_infinite_lease_is_never_renewed() {
    let t0 = Instant::now();
    let mut c = bound(t0, u32::MAX);
    let Some(Event::Bound(l)) = c.poll_event() else {
        panic!()
    };
    assert_eq!((l.lease_time, l.expiry()), (None, None));
    assert_eq!(c.poll_timeout(), None);
}
