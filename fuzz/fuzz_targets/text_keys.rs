#![no_main]
//! cargo-fuzz target; the harness (input layout, invariants) is `diskless_fuzz::text_keys`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| diskless_fuzz::text_keys(data));
