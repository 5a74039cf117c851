//! MQTT packets: arbitrary bytes as a client's stream (see tern::fuzzing::mqtt).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern::fuzzing::mqtt(data));
