//! Segment scanner: arbitrary bytes as a segment file (see tern::fuzzing::scan).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern::fuzzing::scan(data));
