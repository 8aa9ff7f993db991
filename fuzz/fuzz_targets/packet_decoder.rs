//! Arbitrary bytes, split at fuzzer-chosen points, into `packet::Opener::next`
//! under the plain, null and real ciphers; and sealed packets, maybe corrupted.
//! The harness lives in `proto_core::fuzzing`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| proto_core::fuzzing::packet_decoder(data));
