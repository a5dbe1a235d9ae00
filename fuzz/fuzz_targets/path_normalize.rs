//! `cargo fuzz run path_normalize`: see `mfa_gate_fuzz::checks::path_normalize` for the input format and the
//! invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mfa_gate_fuzz::checks::path_normalize(data));
