//! `tetherd`, the appliance runtime: accepts links from many container VMs, keeps
//! the map of which container lives where, and exposes attach, exec, logs,
//! resize and signals over HTTP/WebSocket and a CLI. It also boots a VM per
//! container (`vm`, `node`) for `tetherd run`.

pub mod api_types;
pub mod appliance;
mod attachment;
mod claims;
pub mod cli;
mod delivery;
mod follower;
pub mod forks;
mod guestlink;
pub mod limits;
mod logs;
mod registry;
mod remembered;
mod stdin;
pub mod store;
mod stored;

pub use api_types::*;
pub use appliance::{Appliance, Attachment, shell_quote};
pub mod client;
mod demo;
pub mod http;
pub mod node;
pub mod server_commands;
pub mod vm;
