//! Criterion benches of the serial I/O hot path live in `benches/benches/`;
//! `scripts/bench` (the `tether-bench` binary) measures the CLI against
//! OpenSSH. This library holds what both share.

pub mod measure;
pub mod stack;
