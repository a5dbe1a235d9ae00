//! `cargo fuzz run own_h1_parse`: see `mfa_gate_fuzz::checks_own_h1` for the input format and
//! the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mfa_gate_fuzz::checks_own_h1::own_h1_parse(data));
