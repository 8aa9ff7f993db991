//! Which container ids a guest link may claim. A guest names its containers
//! itself; these rules keep a guest from serving (and so hijacking the
//! attachments of) a container that is not its own:
//!
//! - an id is 1 to 128 characters of `A-Z a-z 0-9 _ . -` (checked before it
//!   reaches a terminal or a log);
//! - with pinned host keys, a key serves exactly the ids pinned to it and
//!   their execs, `<id>-exec<N>`; a link without a host key serves nothing;
//! - an id a live link serves is not taken over by a link with another key
//!   that could not serve it itself (a guest reconnecting with its own key
//!   takes its containers back).

use std::collections::HashMap;
use std::fmt;

use proto_core::PublicKey;

/// The longest container id.
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` is a well-formed container id.
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `id` is `pinned` itself or one of its execs (`<pinned>-exec<N>`,
/// and in a fork's child `<pinned>-exec<N>-<M>`...: docs/PROTOCOL.md 4.5).
pub fn named_after(pinned: &str, id: &str) -> bool {
    let number = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    match id.strip_prefix(pinned) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix("-exec")
            .is_some_and(|n| n.split('-').all(number)),
        None => false,
    }
}

/// Whether `id` is one of `parent`'s own names: itself or `<parent>-exec<N>`
/// (a fork's child renames them, so a child link claiming one is claiming
/// its parent's container).
pub fn parents_own(parent: &str, id: &str) -> bool {
    match id.strip_prefix(parent) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix("-exec")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

/// Whether the guest with host key `key` may serve `id` under `pins`
/// (container id -> pinned key).
pub fn pinned_to(pins: &HashMap<String, PublicKey>, key: &PublicKey, id: &str) -> bool {
    pins.iter()
        .any(|(pinned, k)| k == key && named_after(pinned, id))
}

/// Why a claim was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a well-formed id.
    BadId,
    /// Pinning is on and the link has no host key.
    NoHostKey,
    /// Pinning is on and the id is not pinned to the link's key.
    NotPinned,
    /// A live link with another key serves it.
    Taken { serving: u64 },
    /// A fork's child claims its parent's own container.
    ParentsName,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadId => write!(
                f,
                "not a container id (1 to {MAX_ID_LEN} of A-Z a-z 0-9 _ . -)"
            ),
            Self::NoHostKey => write!(f, "the link has no host key and keys are pinned"),
            Self::NotPinned => write!(f, "not pinned to this guest's host key"),
            Self::Taken { serving } => {
                write!(f, "served by link {serving}, a guest with another host key")
            }
            Self::ParentsName => write!(f, "a fork's child claims its parent's container"),
        }
    }
}

/// An id for a log message: as is when well-formed, else escaped and cut short.
pub fn loggable(id: &str) -> String {
    if valid_id(id) {
        return id.to_owned();
    }
    let cut: String = id.chars().take(MAX_ID_LEN).collect();
    format!("{:?}{}", cut, if cut.len() < id.len() { "..." } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_and_plain() {
        for ok in ["web", "web-exec7", "a.b_c-1", &"x".repeat(128)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in [
            "",
            &"x".repeat(129),
            "web\x1b[2J",
            "a b",
            "a/b",
            "é",
            "web\n",
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert_eq!(loggable("web"), "web");
        assert_eq!(loggable("a\x1b[2Jb"), "\"a\\u{1b}[2Jb\"");
        assert!(loggable(&"\x07".repeat(1000)).ends_with("..."));
    }

    #[test]
    fn a_pinned_id_covers_its_execs_only() {
        assert!(named_after("web", "web"));
        assert!(named_after("web", "web-exec7"));
        assert!(named_after("web", "web-exec12"));
        assert!(named_after("web", "web-exec12-1"));
        assert!(named_after("web", "web-exec12-1-3"));
        assert!(parents_own("web", "web") && parents_own("web", "web-exec3"));
        assert!(!parents_own("web", "web-exec3-1") && !parents_own("web", "web-1"));
        for not in [
            "web-db",
            "web-exec",
            "web-exec7x",
            "web-exec-7",
            "web-exec7-",
            "web-exec7-x",
            "webx",
            "we",
            "x-web",
        ] {
            assert!(!named_after("web", not), "{not}");
        }
    }
}
