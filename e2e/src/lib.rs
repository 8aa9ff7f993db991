//! Interop support for proto-core: a small `smol` driver that runs a
//! [`proto_core::Connection`] over a TCP stream, an SSH server that runs commands
//! (pipes or a pty) for real SSH clients, an exec client for real SSH servers, and
//! the test plumbing around real peers (OpenSSH `ssh`/`sshd`, AsyncSSH).
//!
//! This is test support, not product code: children are waited for by one
//! blocking thread each, and errors are strings meant for a test failure message.

pub mod api;
pub mod client;
pub mod driver;
pub mod fixtures;
pub mod harness;
pub mod load;
pub mod peers;
pub mod process;
pub mod server;
pub mod vm;

pub use client::{Action, ExecOutcome, ExecRequest, Trigger, run_exec};
pub use driver::{Application, End, drive};
pub use harness::{Procs, available, require_or_skip, with_timeout};
pub use server::{ConnectionReport, Server, serve};

/// SHA-256 of `data`, as lowercase hex (for comparing large transfers).
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A deterministic, non-repeating-looking byte pattern of `len` bytes, so a
/// transfer that drops, duplicates or reorders a block changes its hash.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64*: cheap and good enough to make every block distinct.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}
