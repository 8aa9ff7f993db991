//! Both tether layers (a guest's `GuestLink` over its `Sessions`, and an
//! appliance's `ApplianceLink`) joined in memory and driven by arbitrary
//! commands, output, exits, link drops and time, with the byte stream split at
//! arbitrary points. The harness lives in `proto_core::fuzzing::links`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| proto_core::fuzzing::tether_links(data));
