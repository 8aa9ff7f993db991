//! Every standalone decoder (KEXINIT, channel requests, keys, authorized_keys,
//! the wire reader), chosen by the first byte, with round-trip checks.
//! The harness lives in `proto_core::fuzzing`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| proto_core::fuzzing::message_decoders(data));
