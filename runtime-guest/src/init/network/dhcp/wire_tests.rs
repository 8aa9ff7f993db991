use super::*;
use proptest::prelude::*;

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];

#[test]
fn encodes_the_header_cookie_options_and_padding() {
    let mut m = Message::new(BOOT_REQUEST, 0x0102_0304, &MAC);
    m.secs = 3;
    m.broadcast = true;
    m.ciaddr = Ipv4Addr::new(10, 0, 0, 9);
    m.set(code::MESSAGE_TYPE, [MessageType::Request as u8]);
    m.set(code::HOSTNAME, *b"box");
    let b = m.encode();
    assert_eq!(b.len(), 300);
    assert_eq!(&b[..4], &[1, 1, 6, 0]);
    assert_eq!(&b[4..8], &[1, 2, 3, 4]);
    assert_eq!(&b[8..12], &[0, 3, 0x80, 0]);
    assert_eq!(&b[12..16], &[10, 0, 0, 9]);
    assert_eq!(&b[28..34], &MAC);
    assert_eq!(&b[236..240], &[99, 130, 83, 99]);
    assert_eq!(
        &b[240..251],
        &[53, 1, 3, 12, 3, b'b', b'o', b'x', 255, 0, 0]
    );
    assert_eq!(Message::decode(&b), Ok(m));
}

#[test]
fn typed_getters_check_lengths() {
    let mut m = Message::new(BOOT_REPLY, 1, &MAC);
    m.set(code::SUBNET_MASK, [255, 255, 255, 0]);
    m.set(code::ROUTER, [10, 0, 0, 1, 10, 0, 0, 2]);
    m.set(code::ADDRESS_LEASE_TIME, 3600u32.to_be_bytes());
    m.set(code::DOMAIN_NAME_SERVER, [1, 2, 3]);
    m.set(code::MESSAGE_TYPE, [MessageType::Ack as u8]);
    assert_eq!(
        m.ipv4(code::SUBNET_MASK),
        Some(Ipv4Addr::new(255, 255, 255, 0))
    );
    assert_eq!(m.ipv4(code::ROUTER), None);
    assert_eq!(
        m.ipv4_list(code::ROUTER),
        [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
    );
    assert!(m.ipv4_list(code::DOMAIN_NAME_SERVER).is_empty());
    assert_eq!(m.u32(code::ADDRESS_LEASE_TIME), Some(3600));
    assert_eq!(m.u32(code::RENEWAL_TIME), None);
    assert_eq!(m.message_type(), Some(MessageType::Ack));
    m.set(code::MESSAGE_TYPE, [9]);
    assert_eq!(m.message_type(), None);
}

#[test]
fn long_options_are_split_and_joined() {
    let mut m = Message::new(BOOT_REQUEST, 1, &MAC);
    m.set(code::HOSTNAME, vec![b'h'; 300]);
    let b = m.encode();
    assert_eq!(&b[240..242], &[12, 255]);
    assert_eq!(&b[240 + 257..240 + 259], &[12, 45]);
    assert_eq!(
        Message::decode(&b)
            .unwrap()
            .get(code::HOSTNAME)
            .unwrap()
            .len(),
        300
    );
}

#[test]
fn bad_packets_are_errors() {
    let good = Message::new(BOOT_REPLY, 1, &MAC).encode();
    assert_eq!(Message::decode(&good[..239]), Err(DecodeError::Short(239)));
    let mut no_cookie = good.clone();
    no_cookie[236] = 0;
    assert_eq!(Message::decode(&no_cookie), Err(DecodeError::NoCookie));
    let mut truncated = good[..240].to_vec();
    truncated.extend_from_slice(&[54, 4, 10, 0]);
    assert_eq!(
        Message::decode(&truncated),
        Err(DecodeError::TruncatedOption(54))
    );
    // Without an END the options simply run to the end of the packet.
    truncated.extend_from_slice(&[0, 1]);
    assert_eq!(
        Message::decode(&truncated).unwrap().ipv4(54),
        Some(Ipv4Addr::new(10, 0, 0, 1))
    );
}

proptest! {
    #[test]
    fn decoding_any_bytes_does_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Message::decode(&bytes);
        let mut with_cookie = vec![0u8; 236];
        with_cookie.extend_from_slice(&[99, 130, 83, 99]);
        with_cookie.extend_from_slice(&bytes);
        let _ = Message::decode(&with_cookie);
    }

    #[test]
    fn messages_round_trip(
        xid in any::<u32>(),
        secs in any::<u16>(),
        broadcast in any::<bool>(),
        yiaddr in any::<[u8; 4]>(),
        options in proptest::collection::btree_map(1u8..255, proptest::collection::vec(any::<u8>(), 0..400), 0..8),
    ) {
        let mut m = Message::new(BOOT_REPLY, xid, &MAC);
        m.secs = secs;
        m.broadcast = broadcast;
        m.yiaddr = Ipv4Addr::from(yiaddr);
        for (c, v) in options {
            m.set(c, v);
        }
        prop_assert_eq!(Message::decode(&m.encode()), Ok(m));
    }
}
