//! `cargo fuzz run framing_differential`: see `mfa_gate_fuzz::checks_hyper` for the input
//! format and the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mfa_gate_fuzz::checks_hyper::framing_differential(data));
