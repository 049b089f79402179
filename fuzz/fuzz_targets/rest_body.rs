//! Fuzzes `wadi_server::fuzzing::rest_body` (see there for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wadi_server::fuzzing::rest_body(data));
