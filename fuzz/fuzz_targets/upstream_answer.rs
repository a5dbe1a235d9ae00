//! `cargo fuzz run upstream_answer`: see `mfa_gate_fuzz::checks::upstream_answer` for the input
//! format and the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mfa_gate_fuzz::checks::upstream_answer(data));
