#!/usr/bin/env bash
# The shipped keepalived example, dist/keepalived/keepalived.conf, as it is, passes
# `keepalived --config-test` without a message. keepalived checks that the example's
# interface (eth0) exists and that its track script, /usr/bin/pingora-lb, exists and is
# safe to run as root: the test runs in a network namespace of its own with an eth0 (a veth),
# and, when the host has no /usr/bin/pingora-lb, in a mount namespace of its own where the
# binary under test is added to /usr/bin (an overlay). Nothing on the host changes. The
# example's track script must also be a command line the binary accepts.
#
# Usage (as root): tests/ha/example-config.sh [PINGORA_LB]  (default: target/release/pingora-lb)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$(realpath "${1:-$REPO/target/release/pingora-lb}")
CONF=$REPO/dist/keepalived/keepalived.conf

[ "$(id -u)" = 0 ] || { echo "run as root (unshare, mount)" >&2; exit 1; }
command -v keepalived >/dev/null || { echo "missing: keepalived (apt-get install keepalived)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "no pingora-lb binary at $BIN" >&2; exit 1; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# shellcheck disable=SC2016 # expanded by the inner shell
unshare --net --mount --propagation private -- bash -euc '
    bin=$1 conf=$2 tmp=$3
    ip link add eth0 type veth peer name eth1
    if [ ! -e /usr/bin/pingora-lb ]; then
        mount -t tmpfs -o mode=755 tmpfs "$tmp"
        mkdir -m 755 "$tmp/upper" "$tmp/work"
        install -m 755 "$bin" "$tmp/upper/pingora-lb"
        mount -t overlay overlay -o "lowerdir=/usr/bin,upperdir=$tmp/upper,workdir=$tmp/work" /usr/bin
    fi
    keepalived --config-test -f "$conf" >"$tmp/out" 2>&1 || { cat "$tmp/out"; exit 1; }
    if [ -s "$tmp/out" ]; then cat "$tmp/out"; echo "(keepalived said the above)"; exit 1; fi
    # The track script is a command line pingora-lb understands (without a running
    # balancer it fails, but not with a usage error, 2).
    script=$(sed -n "s/^ *script \"\(.*\)\"$/\1/p" "$conf")
    read -ra cmd <<<"$script"
    rc=0
    "${cmd[@]}" >"$tmp/out" 2>&1 || rc=$?
    if [ "$rc" = 2 ] || [ "$rc" = 126 ] || [ "$rc" = 127 ]; then
        cat "$tmp/out"; echo "(the track script \`$script\` exits $rc)"; exit 1
    fi
' check "$BIN" "$CONF" "$TMP" || {
    echo "FAIL: $CONF (see above)" >&2
    exit 1
}
echo "PASS: keepalived --config-test accepts dist/keepalived/keepalived.conf ($(keepalived --version 2>&1 | head -n1))"
