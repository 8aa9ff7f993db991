//! Tether's protocol core: a deterministic, sans-IO implementation of SSH
//! (transport, authentication, channels) and the tether extensions.
//!
//! Nothing here performs I/O, reads a clock or draws randomness of its own: the
//! caller feeds bytes and `Instant`s in, takes bytes and events out, and injects
//! the RNG. One [`Connection`] type plays either role, chosen by [`config::Role`];
//! the roles share transport and channel logic and differ only in key exchange
//! direction and authentication. See `docs/PROTOCOL.md` for the wire contract.

// One audited exception: crypto/mlkem.rs calls aws-lc directly for the ML-KEM
// encapsulation aws-lc-rs does not offer with given randomness.
#![deny(unsafe_code)]

mod auth;
mod channel;
pub mod config;
mod connection;
pub mod connmap;
pub mod crypto;
pub mod error;
pub mod event;
pub mod kex;
pub mod keys;
pub mod link;
pub mod linkspec;
pub mod outbox;
pub mod outlog;
pub mod packet;
pub mod request;
pub mod tether;
mod transport;
mod wire;

pub use auth::{Authenticated, Rejected};
pub use config::{ClientConfig, Config, HostKeyPolicy, Role, ServerConfig};
pub use connection::Connection;
pub use error::{DisconnectReason, Error, Result};
pub use event::{ChannelId, EXTENDED_STDERR, Event};
pub use keys::{PrivateKey, PublicKey};
pub use request::{ChannelRequest, PtyRequest};

/// Fuzzing harnesses for `fuzz/` (also built in unit tests, which check them).
#[cfg(any(test, fuzzing))]
pub mod fuzzing;

#[cfg(test)]
mod tests;
