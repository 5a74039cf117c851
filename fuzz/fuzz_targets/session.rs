//! The session layer of a simulated server driven by steps (see tern::fuzzing::session).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern::fuzzing::session(data));
