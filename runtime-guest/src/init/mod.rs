//! PID 1 duties (the `init` work owns this module; `network` is guest networking).

pub mod network;
