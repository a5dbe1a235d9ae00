//! `cargo fuzz run token_extract`: see `mfa_gate_fuzz::checks::token_extract` for the input format and the
//! invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mfa_gate_fuzz::checks::token_extract(data));
