//! `cargo fuzz run jwks_parse`: see `mfa_gate_fuzz::checks::jwks_parse` for the input format and the
//! invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mfa_gate_fuzz::checks::jwks_parse(data));
