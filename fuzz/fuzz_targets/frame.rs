//! Protocol frames: arbitrary bytes as a connection's stream (see tern::fuzzing::frame).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern::fuzzing::frame(data));
