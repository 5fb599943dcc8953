#![no_main]
//! cargo-fuzz target; the harness (input layout, invariants) is `diskless_fuzz::dhcp_packet`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| diskless_fuzz::dhcp_packet(data));
