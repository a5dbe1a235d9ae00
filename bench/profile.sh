#!/usr/bin/env bash
# Instructions per request on the cached path, by callgrind: repeatable whatever else the
# machine does, so one change at a time can be weighed (bench/README.md, "Profile").
#
#   bash bench/profile.sh                     # mfa-gate, warm token, 10 s of load
#   bash bench/profile.sh --binary PATH       # another mfa-gate build (default: the release
#                                             # build in $CARGO_TARGET_DIR, /tmp/target-bench)
#   bash bench/profile.sh --seconds 20 --top 40
#   bash bench/profile.sh --close             # a new client connection per request
#
# The proxy runs alone on CPU 0 under `valgrind --tool=callgrind --instr-atstart=no`, one
# worker; the upstream (nginx, `return 200 "ok"`), the IAM (`mfa-gate dev`'s simulator, for the
# one verification of the warm token) and `wrk -t1 -c64` run on CPU 1. Instrumentation is on
# only while wrk runs; the total is divided by the requests the upstream counted
# (`stub_status`). Prints instructions per request, the atomic read-modify-writes among them
# (bench/atomics.py: the instructions that cost ~20 cycles, not one) and the top functions
# (self cost), and leaves the callgrind file in $BENCH_OUT/profile/ for
# callgrind_annotate --inclusive=yes (and `python3 bench/atomics.py FILE BINARY N --sources`).
# --close: wrk asks for `Connection: close`, so the count includes each connection's set-up and
# end in the proxy (the upstream connections are still kept alive).
# For line-level attribution build with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only.
# Loopback only; every server is stopped by pid at the end.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/target-bench}"
OUT="${BENCH_OUT:-$HERE/out}/profile"
binary="$TARGET_DIR/release/mfa-gate"
seconds=10
top=25
close=()
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) shift; binary="${1:?--binary needs a path}" ;;
        --seconds) shift; seconds="${1:?--seconds needs a value}" ;;
        --top) shift; top="${1:?--top needs a value}" ;;
        --close) close=(-H "Connection: close") ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/profile.sh: unknown argument $1 (try --help)" >&2; exit 64 ;;
    esac
    shift
done

for tool in valgrind callgrind_control callgrind_annotate wrk nginx taskset curl python3 objdump; do
    command -v "$tool" >/dev/null || { echo "bench/profile.sh: needs $tool (Debian: valgrind, wrk, nginx-light, util-linux, curl, python3, binutils)" >&2; exit 69; }
done
[ -x "$binary" ] || { echo "bench/profile.sh: no mfa-gate binary at $binary (build it: CARGO_TARGET_DIR=$TARGET_DIR cargo build --release)" >&2; exit 69; }

rm -rf "$OUT" && mkdir -p "$OUT"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

up_port=$(free_port)
cat > "$OUT/upstream.conf" <<EOF
worker_processes 1;
daemon off;
pid $OUT/upstream.pid;
error_log $OUT/upstream.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$up_port; location / { return 200 "ok"; } location = /status { stub_status; } }
}
EOF
taskset -c 1 nginx -p "$OUT" -c "$OUT/upstream.conf" & pids+=($!)
wait_for "http://127.0.0.1:$up_port/status"

proxy_port=$(free_port)
token=""
{
    start_iam_sim "$OUT" "$binary" taskset -c 1
    gateway_toml "$proxy_port" "$(free_port)" "$up_port" "$iam" > "$OUT/gateway.toml"
    TOKIO_WORKER_THREADS=1 taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --dump-instr=yes \
        --callgrind-out-file="$OUT/callgrind.%p" "$binary" --log-level warn run \
        --config "$OUT/gateway.toml" > "$OUT/valgrind.log" 2>&1 & pids+=($!)
}
header=(-H "X-Auth-Token: $token")
[ -n "$token" ] || header=()
for _ in $(seq 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "${header[@]}" "http://127.0.0.1:$proxy_port/x")" = 200 ] && break
    sleep 0.1
done

upstream_requests() { curl -s "http://127.0.0.1:$up_port/status" | sed -n 3p | awk '{print $3}'; }
callgrind_control -i on > /dev/null
before=$(upstream_requests)
taskset -c 1 wrk -t1 -c64 -d"${seconds}s" "${close[@]}" "${header[@]}" "http://127.0.0.1:$proxy_port/x" > "$OUT/wrk.txt"
after=$(upstream_requests)
callgrind_control -i off > /dev/null
callgrind_control -d > /dev/null
sleep 1
requests=$((after - before - 1)) # the last status request counts itself

total=0
for file in "$OUT"/callgrind.*; do
    [ -s "$file" ] || continue
    ir=$(callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    [ -n "$ir" ] && total=$((total + ir))
done
echo "proxy: mfa-gate ($binary)"
echo "requests through the proxy: $requests in ${seconds} s under callgrind"
echo "instructions per request: $((total / requests))"
biggest=$(ls -S "$OUT"/callgrind.* | head -1)
python3 "$HERE/atomics.py" "$biggest" "$binary" "$requests" --top 8
echo
callgrind_annotate "$biggest" 2>/dev/null | awk -v top="$top" '/file:function/ {on=1; next} on && NF && n < top {print; n++}' | cut -c1-160
echo
echo "callgrind files: $OUT (callgrind_annotate --inclusive=yes $biggest)"
