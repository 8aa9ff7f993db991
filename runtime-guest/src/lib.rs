//! `tether`, the guest runtime: PID 1 in a container VM.
//!
//! Stub: the runtime is planned (issue "tether and tetherd") and not built yet.
