//! Fuzzes `wadi_server::fuzzing::client_frame` (see there for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wadi_server::fuzzing::client_frame(data));
