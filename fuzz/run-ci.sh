#!/usr/bin/env bash
# Short coverage-guided fuzz run, for CI: builds every fuzz target with libFuzzer (through
# libfuzzer-sys, no cargo-fuzz needed: stable rustc, no sanitizer), then fuzzes each one from its
# committed seed corpus for a fixed time, FUZZ_TOTAL_SECONDS (default 110) shared among the
# targets, so the fuzzing itself stays under two minutes. Fails on any crash, timeout or OOM, and
# prints where the crashing input is and how to turn it into a regression test.
#
#   bash fuzz/run-ci.sh                        # what CI runs
#   FUZZ_TOTAL_SECONDS=600 bash fuzz/run-ci.sh # longer, same targets
#   FUZZ_TARGETS="path_normalize" bash fuzz/run-ci.sh
#   FUZZ_FEATURES= bash fuzz/run-ci.sh         # without the IAM answer parsers (default: with)
#
# Environment: CARGO_TARGET_DIR (default fuzz/target), FUZZ_JOBS (cargo -j, default: cargo's),
# FUZZ_ARTIFACTS (default fuzz/artifacts).
set -euo pipefail
cd "$(dirname "$0")"
fuzz_dir=$PWD

total_seconds=${FUZZ_TOTAL_SECONDS:-110}
# Unset: the IAM answer parser targets too; set (even empty): exactly these features.
features=${FUZZ_FEATURES-iam-parsers}
artifacts=${FUZZ_ARTIFACTS:-$fuzz_dir/artifacts}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$fuzz_dir/target}
triple=$(rustc -vV | sed -n 's/^host: //p')

targets=(path_normalize token_extract framing_observer framing_differential jwks_parse jwt_verify upstream_answer own_h1_parse)
if [[ ",$features," == *",iam-parsers,"* ]]; then
  targets+=(huawei_parse cloudsso_parse)
fi
if [[ -n "${FUZZ_TARGETS:-}" ]]; then
  read -r -a targets <<<"$FUZZ_TARGETS"
fi

# What `cargo fuzz build -s none` passes, minus what needs a nightly compiler: SanitizerCoverage
# with inline 8-bit counters, PC tables and comparison tracing for libFuzzer, and `cfg(fuzzing)`.
# `--target` keeps these flags away from build scripts and proc macros. The profile in
# fuzz/Cargo.toml (opt-level 1, debug assertions and overflow checks on) applies to --release.
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing"

# The gateway's own lock file, so that the fuzzed dependencies are the versions it ships with;
# cargo adds the fuzz-only crates (libfuzzer-sys, httparse's entry) to it. Not committed: it
# would go stale with every change to the gateway's dependencies.
cp ../Cargo.lock Cargo.lock

build_args=(build --release --target "$triple" --bins)
[[ -n "$features" ]] && build_args+=(--features "$features")
[[ -n "${FUZZ_JOBS:-}" ]] && build_args+=(-j "$FUZZ_JOBS")

echo "== fuzz: building ${#targets[@]} targets (${features:-no extra features})"
build_start=$SECONDS
cargo "${build_args[@]}"
echo "== fuzz: build took $((SECONDS - build_start)) s"

per_target=$((total_seconds / ${#targets[@]}))
if ((per_target < 1)); then
  per_target=1
fi
bin_dir=$CARGO_TARGET_DIR/$triple/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

max_len_for() {
  case $1 in
    token_extract) echo 20000 ;;     # room for a 16 KiB token and some more
    framing_differential) echo 16384 ;;
    framing_observer) echo 16384 ;;  # chunk lines past 1 KiB, heads past the small limits
    jwks_parse) echo 16384 ;;        # a few RSA keys
    *) echo 4096 ;;
  esac
}

dict_for() {
  case $1 in
    path_normalize | token_extract | framing_observer) echo "dicts/$1.dict" ;;
    framing_differential | own_h1_parse) echo "dicts/framing_observer.dict" ;;
    *) echo "dicts/json.dict" ;;
  esac
}

failed=()
run_start=$SECONDS
for target in "${targets[@]}"; do
  mkdir -p "$work/$target" "$artifacts/$target"
  log=$work/$target.log
  echo "== fuzz: $target for ${per_target} s"
  # New inputs go to the scratch corpus (first directory); the committed seeds are only read.
  if "$bin_dir/$target" \
    -max_total_time="$per_target" \
    -timeout=10 \
    -rss_limit_mb=2048 \
    -max_len="$(max_len_for "$target")" \
    -dict="$(dict_for "$target")" \
    -artifact_prefix="$artifacts/$target/" \
    -print_final_stats=1 \
    "$work/$target" "corpus/$target" >"$log" 2>&1; then
    grep -E '#[0-9]+.*DONE.*cov:' "$log" | tail -n 1 || true
  else
    failed+=("$target")
    echo "!! fuzz: $target FAILED; the end of its log:"
    tail -n 60 "$log"
    for input in $(grep -oE '(Test unit|artifact_prefix.*Test unit) written to [^ ]+' "$log" | awk '{print $NF}'); do
      echo "!! crashing input: $input"
      echo "!!   replay:   $bin_dir/$target $input"
      echo "!!   minimise: $bin_dir/$target -minimize_crash=1 -runs=100000 $input"
      echo "!!   then: cp the minimised input to fuzz/regressions/$target/<name> (see fuzz/README.md)"
      if [[ -f "$input" ]]; then
        echo "!!   base64: $(base64 -w0 "$input" | head -c 4000)"
      fi
    done
  fi
done
echo "== fuzz: fuzzing took $((SECONDS - run_start)) s"

if ((${#failed[@]})); then
  echo "!! fuzz: crashes in: ${failed[*]}"
  exit 1
fi
echo "== fuzz: no crash in ${#targets[@]} targets"
