#!/usr/bin/env bash
# mfa-gate benchmark suite: the same tiny upstream reached directly, through nginx, through
# mfa-gate (warm and cold) and through nginx auth_request -> mfa-gate, interleaved, pinned and
# unpinned, on 127.0.0.1 only. See bench/README.md.
#
#   bash bench/run.sh                  # full run (~10 min on 2 cores, after the builds)
#   bash bench/run.sh --smoke          # every row ~2 s: builds and proves the suite works (CI)
#   bash bench/run.sh --soak           # instead: 10 min of mixed traffic, RSS/fds/p99 per minute
#                                      # and whether the tail is flat (not in CI; ~11 min)
#   bash bench/run.sh --install-deps   # first apt-get install what is missing (root + apt)
#   bash bench/run.sh --no-build       # use the binaries of the last build
#   bash bench/run.sh --nice 0         # scheduling priority of everything measured (default -10
#                                      # as root: ahead of other builds on a shared machine)
#   bash bench/run.sh -- --rounds 5    # anything after -- goes to `mfa-gate-bench run`
#                                      # (with --soak: to `mfa-gate-bench soak`, e.g. --rate 3000)
#
# Environment: CARGO_TARGET_DIR (mfa-gate's release build, default /tmp/target-bench),
# HARNESS_TARGET_DIR (default: the same, so that the harness reuses every dependency compiled
# for mfa-gate), BENCH_OUT (default bench/out).
# Timings are printed, never asserted: the exit status says only whether the suite ran.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/target-bench}"
HARNESS_TARGET_DIR="${HARNESS_TARGET_DIR:-$TARGET_DIR}"
OUT="${BENCH_OUT:-$HERE/out}"

smoke=0
soak=0
install=0
build=1
nice_level=0
[ "$(id -u)" = 0 ] && nice_level=-10
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=1 ;;
        --install-deps) install=1 ;;
        --no-build) build=0 ;;
        --nice) shift; nice_level="${1:?--nice needs a value}" ;;
        --soak) soak=1 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; extra+=("$@"); break ;;
        *) echo "bench/run.sh: unknown argument $1 (try --help)" >&2; exit 64 ;;
    esac
    shift
done

started=$(date +%s)
say() { echo "bench: $*" >&2; }
if [ "$smoke" = 1 ] && [ "$soak" = 1 ]; then
    say "--smoke and --soak exclude each other"
    exit 64
fi

# --- What the suite needs -------------------------------------------------------------------
# tool -> Debian package
declare -A package=(
    [wrk]=wrk
    [nginx]=nginx-light
    [taskset]=util-linux
    [getconf]=libc-bin
    [cargo]="(a Rust toolchain, 1.85+, from rustup)"
)
missing=()
for tool in cargo wrk nginx taskset getconf; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ] && [ "$install" = 1 ]; then
    apt_pkgs=()
    for tool in "${missing[@]}"; do
        case "${package[$tool]}" in "("*) ;; *) apt_pkgs+=("${package[$tool]}") ;; esac
    done
    if [ ${#apt_pkgs[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing ${apt_pkgs[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
    fi
    missing=()
    for tool in cargo wrk nginx taskset getconf; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "missing: ${missing[*]}"
    for tool in "${missing[@]}"; do say "  $tool: Debian package ${package[$tool]}"; done
    say "install with: apt-get update && apt-get install -y wrk nginx-light   (as root), or rerun with --install-deps"
    exit 2
fi
for module in http_stub_status_module http_auth_request_module; do
    if ! nginx -V 2>&1 | grep -q -- "--with-$module"; then
        say "this nginx lacks $module (Debian's nginx-light and nginx have it)"
        exit 2
    fi
done

modes="pinned,unpinned"
if [ "$(nproc)" -lt 2 ]; then
    say "fewer than 2 CPUs: pinned mode skipped"
    modes="unpinned"
fi

# --- Builds -----------------------------------------------------------------------------------
build_start=$(date +%s)
if [ "$build" = 1 ]; then
    say "building mfa-gate (release) in $TARGET_DIR"
    (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --locked --bin mfa-gate)
    # The harness builds against the very versions of the main lock file: copy it, and let cargo
    # add the harness's own entry (the versions in it are not changed).
    cp "$ROOT/Cargo.lock" "$HERE/harness/Cargo.lock"
    say "building the harness (release) in $HARNESS_TARGET_DIR"
    (cd "$HERE/harness" && CARGO_TARGET_DIR="$HARNESS_TARGET_DIR" cargo build --release)
fi
build_end=$(date +%s)

gate="$TARGET_DIR/release/mfa-gate"
harness="$HARNESS_TARGET_DIR/release/mfa-gate-bench"
for bin in "$gate" "$harness"; do
    [ -x "$bin" ] || { say "$bin is missing (run without --no-build)"; exit 2; }
done

# --- Run --------------------------------------------------------------------------------------
if [ "$smoke" = 1 ]; then
    args=(--rounds 1 --duration 2 --warmup 1 --cache-sizes 0,10000,100000)
else
    args=()
fi
commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
    commit="$commit+dirty"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# Servers the harness started record their pids in $OUT/<mode>/<name>.pid. Whatever way the run
# ends, stop those of them still running (only processes whose command line names $OUT: ours).
stop_leftovers() {
    local pidfile pid
    for pidfile in "$OUT"/*/*.pid; do
        [ -e "$pidfile" ] || continue
        pid="$(cat "$pidfile" 2>/dev/null || true)"
        if [ -n "$pid" ] && { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$OUT"; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}
stop_leftovers
trap stop_leftovers EXIT
cd "$ROOT"
if [ "$soak" = 1 ]; then
    # The soak's own servers record their pids in $OUT/soak/*.pid, which stop_leftovers covers.
    mkdir -p "$OUT/soak"
    say "soak (nice $nice_level): load average before $(cut -d' ' -f1-3 /proc/loadavg)"
    BENCH_COMMIT="$commit" nice -n "$nice_level" "$harness" soak --mfa-gate "$gate" --out "$OUT/soak" \
        "${extra[@]}" | tee "$OUT/soak/table.md"
    ended=$(date +%s)
    say "load average after $(cut -d' ' -f1-3 /proc/loadavg)"
    say "soak done in $((ended - started)) s (builds $((build_end - build_start)) s); report in $OUT/soak/soak.md"
    exit 0
fi
say "measuring (nice $nice_level)"
BENCH_COMMIT="$commit" BENCH_NICE="$nice_level" nice -n "$nice_level" "$harness" run --mfa-gate "$gate" --out "$OUT" --modes "$modes" \
    "${args[@]}" "${extra[@]}"
ended=$(date +%s)
say "done in $((ended - started)) s (builds $((build_end - build_start)) s, measuring $((ended - build_end)) s); tables in $OUT/results.md"
