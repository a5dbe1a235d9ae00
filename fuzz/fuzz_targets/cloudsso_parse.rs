//! `cargo fuzz run cloudsso_parse --features iam-parsers`: see `mfa_gate_fuzz::checks_iam::cloudsso_parse` for the
//! input format and the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mfa_gate_fuzz::checks_iam::cloudsso_parse(data));
