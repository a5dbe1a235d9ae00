//! Fuzz inputs replayed on every `cargo test`: each file under `fuzz/regressions/<target>/` (an
//! input that once made a fuzz target fail, minimised) and under `fuzz/corpus/<target>/` (the
//! committed seeds) goes through the same invariant checks the fuzz target applies
//! (`fuzz/src/checks.rs`), without a fuzzer. See `fuzz/README.md` for how an input gets here.
//!
//! The regression directories may be empty (git keeps none of them then); the seed corpora never
//! are, so each test always checks something.

#[path = "../../fuzz/src/checks.rs"]
mod checks;

// The IAM answer parsers (`#[doc(hidden)] pub` in `src/iam/huawei.rs` and `src/iam/alibaba.rs`
// for this, fuzz/README.md "IAM answer parsers").
#[path = "../../fuzz/src/checks_iam.rs"]
mod checks_iam;

// The hyper differential of the framing observer (`httparse`, a dependency of the gateway).
#[path = "../../fuzz/src/checks_hyper.rs"]
mod checks_hyper;

// The gateway's own HTTP/1.1 request parser against `httparse`.
#[path = "../../fuzz/src/checks_own_h1.rs"]
mod checks_own_h1;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `fuzz/<kind>/<target>/`, sorted; none when the directory does not exist.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.is_file())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.') && name != "README.md"
        })
        .collect();
    files.sort();
    files
}

/// Runs every regression input and seed of `target` through `check`, and fails listing every
/// input that violated an invariant (not just the first).
fn replay(target: &str, check: checks::Check) {
    let regressions = inputs("regressions", target);
    let seeds = inputs("corpus", target);
    assert!(
        !seeds.is_empty(),
        "fuzz/corpus/{target}/ has no seed inputs"
    );
    let mut failures = Vec::new();
    for path in regressions.iter().chain(&seeds) {
        let data = std::fs::read(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failures.push(path.display().to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{target}: {} of {} inputs violate the fuzz invariants (panic messages above):\n{}",
        failures.len(),
        regressions.len() + seeds.len(),
        failures.join("\n")
    );
}

#[test]
fn every_fuzz_target_has_seeds() {
    for (target, _) in checks::TARGETS {
        assert!(
            !inputs("corpus", target).is_empty(),
            "fuzz/corpus/{target}/ has no seed inputs"
        );
    }
}

#[test]
fn path_normalize() {
    replay("path_normalize", checks::path_normalize);
}

#[test]
fn token_extract() {
    replay("token_extract", checks::token_extract);
}

#[test]
fn framing_observer() {
    replay("framing_observer", checks::framing_observer);
}

/// `framing_differential` inputs also get the split check of `framing_observer`, with `3`
/// (head limit 8 KiB) as its control byte.
#[test]
fn framing_differential() {
    replay("framing_differential", |stream| {
        let mut input = vec![b'3'];
        input.extend_from_slice(stream);
        checks::framing_observer(&input);
    });
}

#[test]
fn jwks_parse() {
    replay("jwks_parse", checks::jwks_parse);
}

#[test]
fn jwt_verify() {
    replay("jwt_verify", checks::jwt_verify);
}

#[test]
fn upstream_answer() {
    replay("upstream_answer", checks::upstream_answer);
}

#[test]
fn huawei_parse() {
    replay("huawei_parse", checks_iam::huawei_parse);
}

#[test]
fn cloudsso_parse() {
    replay("cloudsso_parse", checks_iam::cloudsso_parse);
}

#[test]
fn own_h1_parse() {
    replay("own_h1_parse", checks_own_h1::own_h1_parse);
}

#[test]
fn framing_differential_against_hyper() {
    replay("framing_differential", checks_hyper::framing_differential);
}
