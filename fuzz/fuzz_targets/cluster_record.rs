#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| slipway_fuzz::cluster_record::run(data));
