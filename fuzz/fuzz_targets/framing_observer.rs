//! `cargo fuzz run framing_observer`: see `mfa_gate_fuzz::checks::framing_observer` for the input format and the
//! invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mfa_gate_fuzz::checks::framing_observer(data));
