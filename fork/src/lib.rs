//! VM fork (VMware Instant Clone / VMfork, and a QEMU snapshot-and-clone stand-in):
//! trigger, quiesce, detect, recover.
//!
//! Stub: this crate is planned in ARCHITECTURE.md and not built yet.
