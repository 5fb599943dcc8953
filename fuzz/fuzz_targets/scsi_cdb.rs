#![no_main]
//! cargo-fuzz target; the harness (input layout, invariants) is `diskless_fuzz::scsi_cdb`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| diskless_fuzz::scsi_cdb(data));
