//! Handshake, authentication and channels between two in-memory endpoints.

mod support;

use proto_core::crypto::{CipherAlg, KexAlg};
use proto_core::kex::Preferences;
use proto_core::{ChannelRequest, DisconnectReason, Error, Event, HostKeyPolicy, PrivateKey, Role};
use support::*;

#[test]
fn client_and_server_authenticate_with_ed25519() {
    let mut pair = Pair::default_pair();
    pair.connect();
    assert_eq!(pair.client.conn.host_key(), Some(host_key().public()));
    assert_eq!(pair.client.conn.session_id(), pair.server.conn.session_id());
    assert!(pair.server.events.iter().any(|e| matches!(e, Event::Authenticated(a) if a.key == Some(*client_key().public()) && a.user == "tetherd")));
    assert_eq!(
        pair.client.conn.server_sig_algs(),
        Some(&["ssh-ed25519".to_string()][..])
    );
    let n = pair.client.conn.negotiated().unwrap();
    assert_eq!(n.kex, KexAlg::MlKem768X25519);
    assert!(n.strict);
}

#[test]
fn every_kex_and_cipher_combination_connects_and_carries_data() {
    for kex in KexAlg::ALL {
        for cipher in CipherAlg::ALL {
            let prefs = Preferences {
                kex: vec![kex],
                ciphers: vec![cipher],
            };
            let mut c = client_config();
            c.preferences = prefs.clone();
            let mut pair = Pair::new(c, server_config());
            pair.connect();
            let n = *pair.server.conn.negotiated().unwrap();
            assert_eq!((n.kex, n.cipher_c2s, n.cipher_s2c), (kex, cipher, cipher));
            let (cc, sc) = pair.open_session();
            let sent = pattern(0, 100_000);
            let mut off = 0;
            while off < sent.len() {
                off += pair
                    .client
                    .conn
                    .channel_send(cc, None, &sent[off..])
                    .unwrap();
                pair.drive();
            }
            pair.server
                .conn
                .channel_send(sc, Some(1), b"from the server")
                .unwrap();
            pair.drive();
            assert_eq!(
                data_of(&pair.server.events, sc, None),
                sent,
                "{kex:?} {cipher:?}"
            );
            assert_eq!(
                &data_of(&pair.client.events, cc, Some(1))[..],
                b"from the server"
            );
        }
    }
}

#[test]
fn an_untrusted_host_key_is_refused_with_host_key_not_verifiable() {
    let mut c = client_config();
    if let Role::Client(cc) = &mut c.role {
        cc.host_keys = HostKeyPolicy::Pinned(vec![*PrivateKey::from_seed([9; 32]).public()]);
    }
    let mut pair = Pair::new(c, server_config());
    pair.drive();
    assert!(matches!(pair.client.error, Some(Error::HostKeyRejected(_))));
    assert!(matches!(
        pair.server.error,
        Some(Error::PeerDisconnected {
            reason: DisconnectReason::HostKeyNotVerifiable,
            ..
        })
    ));
}

#[test]
fn an_unauthorized_user_key_is_refused() {
    let mut c = client_config();
    if let Role::Client(cc) = &mut c.role {
        cc.key = Some(PrivateKey::from_seed([5; 32]));
    }
    let mut pair = Pair::new(c, server_config());
    pair.drive();
    assert!(matches!(pair.client.error, Some(Error::Auth(_))));
    assert!(!pair.server.conn.is_authenticated());
    let stranger = *PrivateKey::from_seed([5; 32]).public();
    assert!(
        pair.server.events.iter().any(|e| matches!(e, Event::AuthRejected(r) if r.key == Some(stranger) && r.reason == "key not authorized")),
        "the refusal is reported for the log"
    );
}

#[test]
fn none_auth_only_when_the_server_allows_it() {
    let keyless = || {
        let mut c = client_config();
        if let Role::Client(cc) = &mut c.role {
            cc.key = None;
        }
        c
    };
    let mut pair = Pair::new(keyless(), server_config());
    pair.drive();
    assert!(matches!(pair.client.error, Some(Error::Auth(_))));

    let mut s = server_config();
    if let Role::Server(sc) = &mut s.role {
        sc.allow_none = true;
    }
    let mut pair = Pair::new(keyless(), s);
    pair.connect();
}

#[test]
fn session_requests_replies_eof_and_close() {
    let mut pair = Pair::default_pair();
    pair.connect();
    let (cc, sc) = pair.open_session();
    pair.client
        .conn
        .channel_request(
            cc,
            &ChannelRequest::Exec {
                command: "echo hi".into(),
            },
            true,
        )
        .unwrap();
    pair.client
        .conn
        .channel_request(
            cc,
            &ChannelRequest::Other {
                name: "x-unknown@example.com".into(),
                data: Default::default(),
            },
            true,
        )
        .unwrap();
    pair.drive();
    // The server app has not answered the exec yet, so the core holds back the
    // automatic refusal of the unknown request behind it.
    assert!(
        !pair
            .client
            .events
            .iter()
            .any(|e| matches!(e, Event::ChannelReply { .. }))
    );
    pair.server.conn.channel_reply(sc, true).unwrap();
    pair.drive();
    let replies: Vec<bool> = pair
        .client
        .events
        .iter()
        .filter_map(|e| match e {
            Event::ChannelReply { success, .. } => Some(*success),
            _ => None,
        })
        .collect();
    assert_eq!(replies, [true, false]);

    pair.server.conn.channel_send(sc, None, b"hi\n").unwrap();
    pair.server
        .conn
        .channel_request(sc, &ChannelRequest::ExitStatus { code: 3 }, false)
        .unwrap();
    pair.server.conn.channel_eof(sc).unwrap();
    pair.server.conn.channel_close(sc).unwrap();
    pair.drive();
    let ev = pair.client.take_events();
    assert!(ev.contains(&Event::ChannelRequest {
        channel: cc,
        request: ChannelRequest::ExitStatus { code: 3 },
        want_reply: false
    }));
    assert!(ev.contains(&Event::ChannelEof { channel: cc }));
    assert!(ev.contains(&Event::ChannelClosed { channel: cc }));
    assert!(
        pair.server
            .events
            .contains(&Event::ChannelClosed { channel: sc })
    );
    assert_eq!(pair.client.conn.channel_count(), 0);
    assert_eq!(pair.server.conn.channel_count(), 0);
}

#[test]
fn unknown_channel_types_and_global_requests_are_refused() {
    let mut pair = Pair::default_pair();
    pair.connect();
    let ch = pair.client.conn.open_channel("direct-tcpip", b"").unwrap();
    pair.client
        .conn
        .global_request("x-unknown@example.com", b"", true)
        .unwrap();
    pair.client
        .conn
        .global_request("keepalive@openssh.com", b"", true)
        .unwrap();
    pair.drive();
    let ev = pair.client.take_events();
    assert!(ev.iter().any(
        |e| matches!(e, Event::ChannelOpenFailed { channel, reason: 3, .. } if *channel == ch)
    ));
    let replies: Vec<bool> = ev
        .iter()
        .filter_map(|e| match e {
            Event::GlobalReply { success, .. } => Some(*success),
            _ => None,
        })
        .collect();
    assert_eq!(replies, [false, true]);
}

#[test]
fn a_channel_accepted_after_an_older_one_closed_keeps_its_id() {
    // Found by the tether re-attach test: the new channel's OPEN and the old
    // channel's CLOSE arrive in one read, and the accept comes after both.
    let mut pair = Pair::default_pair();
    pair.connect();
    let (old, _) = pair.open_session();
    let new = pair.client.conn.open_session().unwrap();
    pair.client.conn.channel_close(old).unwrap();
    pair.drive();
    assert!(
        pair.client
            .events
            .contains(&Event::ChannelOpened { channel: new })
    );
    pair.client
        .conn
        .channel_send(new, None, b"still here")
        .unwrap();
    pair.drive();
    assert!(pair.server.error.is_none(), "{:?}", pair.server.error);
    let server_new = pair.server.events.iter().rev().find_map(|e| match e {
        Event::ChannelOpen { channel, .. } => Some(*channel),
        _ => None,
    });
    assert_eq!(
        &data_of(&pair.server.events, server_new.unwrap(), None)[..],
        b"still here"
    );
}
