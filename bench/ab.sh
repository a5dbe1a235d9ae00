#!/usr/bin/env bash
# A/B of mfa-gate builds on the cached path, interleaved with nginx proxy_pass: one change at a
# time weighed in wall-clock terms, where bench/profile.sh weighs it in instructions. Quicker
# than the full suite (one row, one loop type) and it takes several binaries.
#
#   bash bench/ab.sh BINARY [BINARY ...]             # pinned: proxy on CPU 0, one worker
#   bash bench/ab.sh --unpinned BINARY [BINARY ...]  # nothing pinned, two workers each
#   bash bench/ab.sh --rounds 8 --seconds 6 A B
#   bash bench/ab.sh --unpinned multi-thread:A A     # RUNTIME:BINARY sets MFA_GATE_RUNTIME
#   bash bench/ab.sh --latency 15000 A               # also open-loop latency at 15,000 req/s
#   bash bench/ab.sh --close A                       # every request on a new client connection
#
# Per round (nginx, then each binary, in turn): `wrk -t1 -c64` for --seconds after a 1 s
# warm-up, req/s, the proxy's user and system CPU per request from /proc/PID/stat (nginx: the
# master and its workers) and its voluntary context switches per 1,000 requests (all threads;
# a thread woken per request shows up here, bench/README.md "Full run at a99bdad"). Then
# medians with ratios to nginx. The upstream (nginx `return 200 "ok"`), the IAM simulator
# (`mfa-gate dev` of the first binary, for the warm token) and wrk run on CPU 1 when pinned.
# With --latency RATE, each round also loads the upstream directly, nginx and each binary with
# the harness's open loop (`mfa-gate-bench open`, 64 connections, send times evenly spread) for
# --seconds, and a second table gives p50/p99/p99.9 with what each proxy adds over direct. The
# harness is $HARNESS_TARGET_DIR/release/mfa-gate-bench (default /tmp/target-bench, as
# bench/run.sh builds it). With --close, wrk asks for `Connection: close` on every request:
# each one a new client connection (accept, handshake, the connection's set-up in the proxy),
# the upstream connections still kept alive.
# Loopback only; every server is stopped at the end. Timings are printed, never asserted.
set -euo pipefail

rounds=5
seconds=5
pinned=1
latency=
close=()
specs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) shift; rounds="${1:?--rounds needs a value}" ;;
        --seconds) shift; seconds="${1:?--seconds needs a value}" ;;
        --unpinned) pinned=0 ;;
        --latency) shift; latency="${1:?--latency needs a rate in req/s}" ;;
        --close) close=(-H "Connection: close") ;;
        -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "bench/ab.sh: unknown argument $1 (try --help)" >&2; exit 64 ;;
        *) specs+=("$1") ;;
    esac
    shift
done
[ ${#specs[@]} -gt 0 ] || { echo "bench/ab.sh: name at least one mfa-gate binary (try --help)" >&2; exit 64; }
for tool in wrk nginx taskset curl python3; do
    command -v "$tool" >/dev/null || { echo "bench/ab.sh: needs $tool (Debian: wrk, nginx-light, util-linux, curl, python3)" >&2; exit 69; }
done
harness="${HARNESS_TARGET_DIR:-${CARGO_TARGET_DIR:-/tmp/target-bench}}/release/mfa-gate-bench"
if [ -n "$latency" ] && [ ! -x "$harness" ]; then
    echo "bench/ab.sh: --latency needs the harness at $harness (bash bench/run.sh builds it)" >&2; exit 69
fi
for spec in "${specs[@]}"; do
    binary="${spec#*:}"
    [ -x "$binary" ] || { echo "bench/ab.sh: no executable at $binary" >&2; exit 69; }
    case "$spec" in *:*) case "${spec%%:*}" in per-worker|multi-thread) ;; *) echo "bench/ab.sh: runtime ${spec%%:*}: per-worker or multi-thread" >&2; exit 64 ;; esac ;; esac
done

HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${BENCH_OUT:-$HERE/out}/ab"
rm -rf "$OUT" && mkdir -p "$OUT"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
if [ "$pinned" = 1 ]; then
    proxy_cpu=(taskset -c 0); load_cpu=(taskset -c 1); workers=1
else
    proxy_cpu=(); load_cpu=(); workers=2
fi

up_port=$(free_port)
cat > "$OUT/upstream.conf" <<EOF
worker_processes 1; daemon off; pid $OUT/upstream.pid; error_log $OUT/upstream.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$up_port; location / { return 200 "ok"; } } }
EOF
"${load_cpu[@]}" nginx -p "$OUT" -c "$OUT/upstream.conf" & pids+=($!)
wait_for "http://127.0.0.1:$up_port/"

start_iam_sim "$OUT" "${specs[0]#*:}" "${load_cpu[@]}"

nginx_port=$(free_port)
if [ "$pinned" = 1 ]; then processes="master_process off;"; else processes="worker_processes $workers;"; fi
cat > "$OUT/proxy.conf" <<EOF
$processes daemon off; pid $OUT/proxy.pid; error_log $OUT/proxy.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream u { server 127.0.0.1:$up_port; keepalive 64; }
  server { listen 127.0.0.1:$nginx_port;
    location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF

# user and system clock ticks, and voluntary context switches, of a process and its children
# (all their threads)
usage_of() {
    local procs="$1 $(pgrep -P "$1" | tr '\n' ' ')" ticks switches=0
    ticks=$(for p in $procs; do cat "/proc/$p/stat"; done | awk '{u += $14; s += $15} END {print u, s}')
    for p in $procs; do
        switches=$((switches + $(cat /proc/"$p"/task/*/status | awk '/^voluntary_ctxt_switches/ {n += $2} END {print n}')))
    done
    echo "$ticks $switches"
}

measure() { # name pid port
    local name=$1 pid=$2 port=$3 out requests
    "${load_cpu[@]}" wrk -t1 -c64 -d1s "${close[@]}" -H "X-Auth-Token: $token" "http://127.0.0.1:$port/x" > /dev/null
    read -r u0 s0 c0 < <(usage_of "$pid")
    out=$("${load_cpu[@]}" wrk -t1 -c64 -d"${seconds}s" "${close[@]}" -H "X-Auth-Token: $token" "http://127.0.0.1:$port/x")
    read -r u1 s1 c1 < <(usage_of "$pid")
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    if echo "$out" | grep -q "Non-2xx"; then echo "bench/ab.sh: $name answered non-2xx: $out" >&2; exit 70; fi
    local tick; tick=$(getconf CLK_TCK)
    python3 - "$name" "$requests" "$seconds" "$u0" "$u1" "$s0" "$s1" "$c0" "$c1" "$tick" <<'PY' | tee -a "$OUT/rounds.txt"
import sys
name, n, secs, u0, u1, s0, s1, c0, c1, tick = sys.argv[1], *map(float, sys.argv[2:])
us = 1e6 / tick / n
print(f"{name}\t{n / secs:.0f}\t{(u1 - u0) * us:.2f}\t{(s1 - s0) * us:.2f}\t{(c1 - c0) * 1000 / n:.1f}")
PY
}

# Open-loop latency of whatever listens on PORT: name, achieved req/s, p50, p99, p99.9 (ms),
# errors, appended to latency.txt.
open_loop() { # name port
    [ -n "$latency" ] || return 0
    local result
    result=$("${load_cpu[@]}" "$harness" open --addr "127.0.0.1:$2" --token "$token" \
        --rate "$latency" --seconds "$seconds")
    printf '%s\t%s\n' "$1" "$result" | tee -a "$OUT/latency.txt"
}

echo "mode: $([ "$pinned" = 1 ] && echo "pinned (proxy on CPU 0, one worker)" || echo "unpinned (two workers)")$([ ${#close[@]} -gt 0 ] && echo ", a new client connection per request"); $rounds rounds x ${seconds} s; columns: req/s, user µs/req, system µs/req, voluntary context switches / 1k req"
for round in $(seq "$rounds"); do
    open_loop "direct" "$up_port"
    "${proxy_cpu[@]}" nginx -p "$OUT" -c "$OUT/proxy.conf" & nginx_pid=$!
    wait_for "http://127.0.0.1:$nginx_port/"
    measure "nginx" "$nginx_pid" "$nginx_port"
    open_loop "nginx" "$nginx_port"
    kill "$nginx_pid"; wait "$nginx_pid" 2>/dev/null || true
    for i in "${!specs[@]}"; do
        spec="${specs[$i]}"; binary="${spec#*:}"; runtime=per-worker
        case "$spec" in *:*) runtime="${spec%%:*}" ;; esac
        port=$(free_port) admin=$(free_port)
        gateway_toml "$port" "$admin" "$up_port" "$iam" > "$OUT/gateway.toml"
        MFA_GATE_RUNTIME=$runtime TOKIO_WORKER_THREADS=$workers "${proxy_cpu[@]}" "$binary" --log-level warn run \
            --config "$OUT/gateway.toml" > "$OUT/gateway.$i.log" 2>&1 & gate_pid=$!
        wait_for "http://127.0.0.1:$admin/healthz"
        measure "$((i + 1)). $spec" "$gate_pid" "$port"
        open_loop "$((i + 1)). $spec" "$port"
        kill "$gate_pid"; wait "$gate_pid" 2>/dev/null || true
    done
done

echo
python3 - "$OUT" "$latency" <<'PY'
import collections, os, statistics, sys
out, latency = sys.argv[1], sys.argv[2]
def rows_of(path):
    """name -> one list of numbers per round, in the order the names first came."""
    rows = collections.OrderedDict()
    for line in open(path):
        name, *values = line.rstrip("\n").split("\t")
        rows.setdefault(name, []).append([float(v) for v in values])
    return rows
def median(row, i):
    return statistics.median(r[i] for r in row)

rows = rows_of(os.path.join(out, "rounds.txt"))
base = rows["nginx"]
for row in rows.values():
    for r in row:
        r.append(r[1] + r[2])
base_rate, base_cpu = median(base, 0), median(base, 4)
print("| proxy | req/s (min–max) | ×nginx | CPU µs/req (median user + median sys) | ×nginx | ctx switches / 1k req |")
print("|---|---|---|---|---|---|")
for name, row in rows.items():
    rate, user, sys_, cpu = median(row, 0), median(row, 1), median(row, 2), median(row, 4)
    low, high = min(r[0] for r in row), max(r[0] for r in row)
    print(f"| {name} | {rate:,.0f} ({low:,.0f}–{high:,.0f}) | {rate / base_rate:.3f}× | "
          f"{cpu:.2f} ({user:.2f} + {sys_:.2f}) | {cpu / base_cpu:.3f}× | {median(row, 3):.0f} |")

if latency:
    rows = rows_of(os.path.join(out, "latency.txt"))
    direct, nginx = rows["direct"], rows["nginx"]
    print(f"\nOpen loop at {float(latency):,.0f} req/s, 64 connections; ms, median (min–max) of the rounds; "
          "'added' is the median p50 minus direct's, in µs")
    print("| target | p50 | added µs | ×nginx | p99 | ×nginx | p99.9 | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        p50, p99, p999 = median(row, 1), median(row, 2), median(row, 3)
        span = f"{min(r[1] for r in row):.3f}–{max(r[1] for r in row):.3f}"
        print(f"| {name} | {p50:.3f} ({span}) | {(p50 - median(direct, 1)) * 1000:+.0f} | "
              f"{p50 / median(nginx, 1):.2f}× | {p99:.3f} | {p99 / median(nginx, 2):.2f}× | {p999:.3f} | "
              f"{sum(r[4] for r in row):.0f} |")
PY
