//! The tether layer: link-sync frames in noise, the `@tether` payload decoders,
//! and operation sequences on the output log and the connection map, with
//! their invariants. The harness lives in `proto_core::fuzzing`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| proto_core::fuzzing::tether_layer(data));
