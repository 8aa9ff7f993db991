//! A client `Connection` fed the fuzzer's byte stream, raw or (after a scripted
//! handshake) as packets, with timers and application commands mixed in.
//! The harness lives in `proto_core::fuzzing`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| proto_core::fuzzing::client_stream(data));
