//! `cargo fuzz run jwt_verify`: see `mfa_gate_fuzz::checks::jwt_verify` for the input format and the
//! invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mfa_gate_fuzz::checks::jwt_verify(data));
