//! Claims against the registry: pinned keys, execs, taken ids and malformed
//! ids (the rules are in `claims`).

use std::sync::atomic::Ordering;

use proto_core::tether::{ContainerInfo, Kind, State};
use proto_core::{PrivateKey, PublicKey};
use rand_core::OsRng;

use super::Shared;

fn key() -> PublicKey {
    *PrivateKey::generate(&mut OsRng).public()
}

fn info(id: &str) -> ContainerInfo {
    ContainerInfo {
        id: id.into(),
        kind: Kind::Primary,
        state: State::Running,
        exit_status: 0,
        output_end: 0,
        tty: false,
    }
}

/// A live link `generation` claiming `ids` with `key`.
fn claim(shared: &Shared, generation: u64, key: Option<PublicKey>, ids: &[&str]) {
    let (tx, _rx) = async_channel::bounded(1);
    shared.link_up(generation, tx);
    shared.update(generation, key, ids.iter().map(|id| info(id)).collect());
}

/// The link serving `id`, if any.
fn served_by(shared: &Shared, id: &str) -> Option<u64> {
    shared.info(id).and_then(|(_, generation)| generation)
}

fn refused(shared: &Shared) -> u64 {
    shared.counters.claims_refused.load(Ordering::Relaxed)
}

fn pinned(pins: &[(&str, PublicKey)]) -> Shared {
    let known = pins.iter().map(|(id, k)| (id.to_string(), *k)).collect();
    Shared::new(PrivateKey::generate(&mut OsRng), Some(known))
}

#[test]
fn a_key_serves_its_pinned_ids_and_their_execs_only() {
    let (web, db) = (key(), key());
    let shared = pinned(&[("web", web), ("db", db)]);
    claim(
        &shared,
        1,
        Some(web),
        &["web", "web-exec7", "web-db", "db", "web-exec"],
    );
    assert_eq!(served_by(&shared, "web"), Some(1));
    assert_eq!(served_by(&shared, "web-exec7"), Some(1));
    for not_its_own in ["web-db", "db", "web-exec"] {
        assert_eq!(served_by(&shared, not_its_own), None, "{not_its_own}");
    }
    assert_eq!(refused(&shared), 3);
    // The same claims pushed again are not counted again.
    claim(&shared, 1, Some(web), &["web", "web-db", "db", "web-exec"]);
    assert_eq!(refused(&shared), 3);
    assert!(
        shared.views().iter().all(|v| v.id != "db"),
        "db is not listed"
    );
}

#[test]
fn a_second_key_claiming_a_pinned_id_is_refused_and_counted() {
    let (a, b) = (key(), key());
    let shared = pinned(&[("a", a), ("b", b)]);
    claim(&shared, 1, Some(a), &["a"]);
    claim(&shared, 2, Some(b), &["b", "a", "a-exec9"]);
    assert_eq!(served_by(&shared, "a"), Some(1), "the first claim stands");
    assert_eq!(served_by(&shared, "a-exec9"), None);
    assert_eq!(served_by(&shared, "b"), Some(2));
    assert_eq!(refused(&shared), 2);
    // Its own guest reconnecting takes it back.
    claim(&shared, 3, Some(a), &["a"]);
    assert_eq!(served_by(&shared, "a"), Some(3));
}

#[test]
fn runtime_pins_count_as_pins() {
    let vm = key();
    let shared = pinned(&[]);
    claim(&shared, 1, Some(vm), &["vm1"]);
    assert_eq!(served_by(&shared, "vm1"), None);
    shared.pin_guest("vm1", vm);
    claim(&shared, 2, Some(vm), &["vm1", "vm1-exec1"]);
    assert_eq!(served_by(&shared, "vm1"), Some(2));
    assert_eq!(served_by(&shared, "vm1-exec1"), Some(2));
}

#[test]
fn with_pinning_on_a_link_without_a_host_key_serves_nothing() {
    let shared = pinned(&[("web", key())]);
    claim(&shared, 1, None, &["web"]);
    assert_eq!(served_by(&shared, "web"), None);
    assert_eq!(refused(&shared), 1);
}

#[test]
fn without_pinning_a_live_claim_is_not_taken_by_another_key() {
    let shared = Shared::new(PrivateKey::generate(&mut OsRng), None);
    let (first, second) = (key(), key());
    claim(&shared, 1, Some(first), &["web"]);
    claim(&shared, 2, Some(second), &["web", "other"]);
    assert_eq!(served_by(&shared, "web"), Some(1));
    assert_eq!(served_by(&shared, "other"), Some(2));
    assert_eq!(refused(&shared), 1);
    // The same key on a new link (a reconnect) serves it from then on.
    claim(&shared, 3, Some(first), &["web"]);
    assert_eq!(served_by(&shared, "web"), Some(3));
    // Once the serving links are gone, anyone may.
    shared.link_gone(1);
    shared.link_gone(3);
    claim(&shared, 4, Some(second), &["web"]);
    assert_eq!(served_by(&shared, "web"), Some(4));
}

#[test]
fn malformed_ids_are_refused_whatever_the_key() {
    let shared = Shared::new(PrivateKey::generate(&mut OsRng), None);
    let long = "x".repeat(129);
    claim(
        &shared,
        1,
        Some(key()),
        &["ok", "evil\x1b]0;pwned\x07", "a b", "", &long],
    );
    let ids: Vec<String> = shared.views().into_iter().map(|v| v.id).collect();
    assert_eq!(ids, ["ok"]);
    assert_eq!(refused(&shared), 4);
}

#[test]
fn the_follower_is_told_only_the_ids_whose_listing_changed() {
    let shared = Shared::new(PrivateKey::generate(&mut OsRng), None);
    claim(&shared, 1, None, &["early"]);
    shared.watch_changes();
    assert!(shared.take_changes().is_empty());
    claim(&shared, 2, None, &["a", "b"]);
    let ids = |s: &Shared| s.take_changes().into_iter().collect::<Vec<_>>();
    assert_eq!(ids(&shared), ["a", "b"]);
    // The same list again (a reply to a list request) changes nothing.
    shared.update(2, None, vec![info("a"), info("b")]);
    assert!(ids(&shared).is_empty());
    // `a` exits and `b` is no longer listed.
    let mut exited = info("a");
    exited.state = State::Exited;
    shared.update(2, None, vec![exited]);
    assert_eq!(ids(&shared), ["a", "b"]);
    shared.link_gone(2);
    assert_eq!(ids(&shared), ["a"]);
    shared.note_changed("early");
    assert_eq!(ids(&shared), ["early"]);
}
