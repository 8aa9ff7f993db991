//! The tether layer (docs/PROTOCOL.md section 4): the `@tether` messages, and
//! the rules both ends follow on top of an SSH [`Connection`](crate::Connection).
//!
//! - [`GuestLink`] and [`Sessions`]: the guest's side. `Sessions` holds every
//!   session's state and output log; each link borrows it.
//! - [`ApplianceLink`] and [`Cursor`]: the appliance's side, and an
//!   attachment's exact position across channels and link drops.
//! - [`Signal`]: the one table of signal names.

mod appliance;
mod cursor;
mod guest;
mod messages;
mod sessions;
mod signal;

pub use appliance::{ApplianceEvent, ApplianceLink, ListId, Open};
pub use cursor::{Cursor, Delivery};
pub use guest::{GuestEvent, GuestLink};
pub use messages::*;
pub use sessions::{Credit, KEEP_EXITED_EXECS, LinkId, SessionEvent, SessionSpec, Sessions};
pub use signal::Signal;

#[cfg(test)]
mod tests;
