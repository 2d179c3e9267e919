#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| slipway_fuzz::socks::run(data));
