//! Invariant checks of the fuzz targets (`fuzz_targets/`). `checks`, `checks_iam` and
//! `checks_hyper` are also compiled into the gateway's test suite by
//! `tests/it/fuzz_regressions.rs`, which replays the seeds and regression inputs through them.

pub mod checks;
pub mod checks_hyper;
pub mod checks_own_h1;

#[cfg(feature = "iam-parsers")]
pub mod checks_iam;
