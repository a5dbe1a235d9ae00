# What bench/profile.sh and bench/ab.sh share; sourced, after `set -euo pipefail` and with a
# `pids` array that the script's exit trap stops. Loopback only.

bench_name="bench/${0##*/}"

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 10 s for URL to answer; exits 70 if it does not.
wait_for() {
    for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done
    echo "$bench_name: $1 did not come up" >&2
    exit 70
}

# start_iam_sim OUT BINARY [LAUNCHER ...]: `mfa-gate dev`'s IAM simulator in the background
# (started through LAUNCHER, e.g. `taskset -c 1`; its log in OUT/dev.log). Sets `iam`, its URL,
# and `token`, a demo user's with a bound MFA device.
start_iam_sim() {
    local out=$1 binary=$2 port admin
    shift 2
    port=$(free_port) admin=$(free_port)
    "$@" "$binary" dev --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        > "$out/dev.log" 2>&1 & pids+=($!)
    wait_for "http://127.0.0.1:$admin/healthz"
    iam=$(grep -o 'iam=http://[0-9.:]*' "$out/dev.log" | head -1 | cut -d= -f2)
    token=$(grep -o 'demo-alice-[0-9a-f]*' "$out/dev.log" | head -1)
}

# gateway_toml PORT ADMIN_PORT UPSTREAM_PORT IAM_URL: the cached path's config, on stdout.
gateway_toml() {
    cat <<EOF
[server]
listen = "127.0.0.1:$1"
[admin]
listen = "127.0.0.1:$2"
[upstream]
url = "http://127.0.0.1:$3"
[iam]
provider = "huawei"
endpoint = "$4"
[policy]
require = "mfa_device"
[cache]
ttl = "1h"
EOF
}
