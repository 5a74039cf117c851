//! Log records: arbitrary bytes as one record (see tern::fuzzing::record).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern::fuzzing::record(data));
