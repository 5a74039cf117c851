//! Store recovery: arbitrary files in a store directory, then LogStore::open (see tern::fuzzing::recovery).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern::fuzzing::recovery(data));
