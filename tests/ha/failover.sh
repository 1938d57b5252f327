#!/usr/bin/env bash
# HA pair (issue 15): two pingora-lb nodes sharing a virtual IP with real keepalived (VRRP),
# under continuous client load, in network namespaces this test creates.
#
# Usage (as root): tests/ha/failover.sh [PINGORA_LB]     (default: target/release/pingora-lb)
#
#   switch namespace: bridge br0, one port per namespace below (nothing on the host's network)
#   node A   10.213.0.1   pingora-lb + keepalived, priority 150   } listener on the VIP
#   node B   10.213.0.2   pingora-lb + keepalived, priority 100   } 10.213.0.100:80 (freebind)
#   client   10.213.0.10  tests/ha/client.py: a new connection every 50 ms, and a keep-alive one
#   backends 10.213.0.21:8080 and 10.213.0.22:8080 (tests/system/http_backend.py)
#
# Round 0: both balancers reload (socket handoff): the VIP stays on A and no request fails.
# Round 1: node A's pingora-lb is stopped (SIGTERM) -> keepalived's track script fails and the
# VIP moves to B; then it is started again -> the VIP comes back to A (preemption).
# Round 2: node A's link goes down -> B takes over; link up -> back to A.
# Round 3: keepalived on A is stopped (planned maintenance) -> B; started again -> back to A.
# For each switch: the time from the action to the first answer from the other node, the
# requests that failed meanwhile, and the VIP held by exactly that node. Bounds below.
#
# Needs: ip and ss (iproute2), keepalived, python3, curl (tests/run-all.sh installs them).
# Environment: PLB_HA_KEEP=1 keeps the temporary directory (configs, logs, client records).
#   PLB_HA_STANDIN=1 runs with a binary that lacks `freebind` and `status` (listener on
#   0.0.0.0:80, track script `curl /status`): only for developing this test.
set -euo pipefail

TEST_MAX=150      # seconds: the whole test, at most (then it fails, and still cleans up)
if [ -z "${PLB_HA_TIMED:-}" ]; then
    PLB_HA_TIMED=1 exec timeout --foreground -k 30 "$TEST_MAX" "$BASH" "$0" "$@"
fi

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${1:-$REPO/target/release/pingora-lb}

FAILOVER_MAX=10   # seconds from the action to the first answer from node B
FAILBACK_MAX=10   # seconds from the action to the first answer from node A again
SWITCH_WAIT=20    # how long a switch is waited for before the test gives up
SETTLE=3          # seconds of load after each switch, counted in its phase

VIP=10.213.0.100
NODE_IP_a=10.213.0.1
NODE_IP_b=10.213.0.2
CLIENT_IP=10.213.0.10
BACKENDS=(10.213.0.21 10.213.0.22)
VRID=213          # virtual_router_id; on the test's own bridge it clashes with nothing

P=plbha-$$
NS_SW=$P-sw NS_a=$P-a NS_b=$P-b NS_C=$P-c NS_BE=$P-be
ALL_NS=("$NS_SW" "$NS_a" "$NS_b" "$NS_C" "$NS_BE")

# ---------------------------------------------------------------------------------------
say() { printf '%s [%3ss] %s\n' "ha:" "$SECONDS" "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
node_ns() { local v=NS_$1; echo "${!v}"; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "none" && a <= b) }'; }

[ "$(id -u)" = 0 ] || fail "run as root: the test creates network namespaces"
missing=()
for tool in ip ss keepalived python3 curl timeout awk; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] ||
    fail "missing: ${missing[*]} (Debian: apt-get install iproute2 keepalived python3 curl)"
[ -x "$BIN" ] || fail "no pingora-lb binary at $BIN (build it, or pass its path)"
BIN=$(realpath "$BIN")
case $BIN in *[[:space:]]*) fail "the binary's path must not contain spaces: $BIN" ;; esac

TMP=$(mktemp -d /tmp/plbha.XXXXXX)
# pingora-lb drops to nobody: it must reach its run directory (which it creates) below here.
chmod 755 "$TMP"
PIDS=()
results=()

dump_logs() {
    local f
    for f in "$TMP"/*/pingora-lb.log "$TMP"/*/pingora-lb.stderr "$TMP"/*/keepalived.log \
        "$TMP"/backends.log; do
        [ -s "$f" ] || continue
        printf '\n----- %s (last 60 lines)\n' "${f#"$TMP"/}"
        tail -n 60 "$f"
    done
    if [ -s "$TMP/client.tsv" ]; then
        printf '\n----- failed requests (first 30)\n'
        awk -F'\t' '$4 == 0 && n++ < 30' "$TMP/client.tsv"
    fi
    for n in a b; do
        printf '\n----- node %s: addresses, and what its track command says now\n' "${n^^}"
        ip -n "$(node_ns "$n")" -4 -o addr show dev eth0 2>/dev/null
        declare -F lb_serves >/dev/null && lb_serves "$n" 2>&1
    done
}

cleanup() {
    local rc=$? pid ns
    set +e
    trap - EXIT INT TERM HUP
    trap '' PIPE
    touch "$TMP/stop"
    [ ${#results[@]} -gt 0 ] && summary
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for _ in $(seq 50); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    if [ "$rc" != 0 ]; then
        dump_logs
        printf '\nFAIL (after %ss); files in %s\n' "$SECONDS" "$TMP"
    fi
    # Whatever still runs in the test's namespaces was started by this test.
    for ns in "${ALL_NS[@]}"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null
        ip netns del "$ns" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    if [ "$rc" = 0 ] && [ "${PLB_HA_KEEP:-}" != 1 ]; then rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'fail "interrupted"' INT
trap 'exit 129' HUP
trap 'exit 141' PIPE   # output cut (| head): still clean up
trap 'fail "took longer than ${TEST_MAX}s (or was terminated)"' TERM

# wait_until SECONDS WHAT COMMAND...: polls COMMAND every 0.2 s.
wait_until() {
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || fail "$what: not within ${limit}s"
        sleep 0.2
    done
}

# ---------------------------------------------------------------------------------------
# The listener and the check keepalived tracks: the only two things the stand-in changes.
if [ "${PLB_HA_STANDIN:-}" = 1 ]; then
    LISTENER='"0.0.0.0:80"'
    track_cmd() { echo "/usr/bin/curl -fsS -m 1 -o /dev/null http://127.0.0.1:9100/status"; }
    say "STAND-IN: listener 0.0.0.0:80 and curl /status instead of freebind and pingora-lb status"
else
    grep -qE '^ +status' <<<"$("$BIN" --help)" ||
        fail "$BIN has no \`status\` subcommand (PLB_HA_STANDIN=1 runs this test without it)"
    LISTENER="{address: \"$VIP:80\", freebind: true}"
    track_cmd() { echo "$BIN status -c $TMP/$1/pingora-lb.yaml"; }
fi

# ---------------------------------------------------------------------------------------
say "network: namespaces $P-{sw,a,b,c,be} on a bridge; VIP $VIP"
for ns in "${ALL_NS[@]}"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip -n "$NS_SW" link add br0 type bridge
ip -n "$NS_SW" link set br0 up
attach() { # attach NAMESPACE PORT ADDRESS...: eth0 in NAMESPACE, PORT on the bridge
    local ns=$1 port=$2 addr
    shift 2
    ip -n "$NS_SW" link add "$port" type veth peer name eth0 netns "$ns"
    ip -n "$NS_SW" link set "$port" master br0 up
    for addr in "$@"; do ip -n "$ns" addr add "$addr/24" dev eth0; done
    ip -n "$ns" link set eth0 up
}
attach "$NS_a" pa "$NODE_IP_a"
attach "$NS_b" pb "$NODE_IP_b"
attach "$NS_C" pc "$CLIENT_IP"
attach "$NS_BE" pbe "${BACKENDS[@]}"

say "backends: ${BACKENDS[*]} port 8080"
i=0
for addr in "${BACKENDS[@]}"; do
    i=$((i + 1))
    ip netns exec "$NS_BE" python3 "$HERE/../system/http_backend.py" "backend-$i" 8080 "$addr" \
        >>"$TMP/backends.log" 2>&1 &
    PIDS+=($!)
done
for addr in "${BACKENDS[@]}"; do
    wait_until 10 "backend $addr" ip netns exec "$NS_BE" curl -fsS -m 1 "http://$addr:8080/"
done

# ---------------------------------------------------------------------------------------
write_node() { # write_node a|b PRIORITY PEER_NODE
    local n=$1 prio=$2 dir=$TMP/$1 self_ip=NODE_IP_$1 peer_ip=NODE_IP_$3
    self_ip=${!self_ip} peer_ip=${!peer_ip}
    mkdir -p "$dir"
    cat >"$dir/pingora-lb.yaml" <<EOF
version: 1
threads: 1
pid_file: $dir/run/pingora-lb.pid
upgrade_sock: $dir/run/upgrade.sock
error_log: $dir/pingora-lb.log
grace_period_seconds: 6
graceful_shutdown_timeout_seconds: 1
# Keep accepting while keepalived moves the VIP away (track fall 2 x 1 s + VRRP).
stop_accepting_after: 4s
listeners:
  - $LISTENER
upstreams:
  - address: ${BACKENDS[0]}:8080
  - address: ${BACKENDS[1]}:8080
health_check:
  kind: http
  interval: 500ms
  timeout: 500ms
  rise: 1
  fall: 2
timeouts:
  connect: 1s
routes:
  - pool: default
    response_headers: {set: {X-Served-By: node-$n}}
metrics:
  listen: 127.0.0.1:9100
EOF
    cat >"$dir/keepalived.conf" <<EOF
global_defs {
    router_id plbha-node-$n
    script_user root
    enable_script_security
    max_auto_priority
}
vrrp_script chk_pingora_lb {
    script "$(track_cmd "$n")"
    interval 1
    timeout 2
    fall 2
    rise 2
}
vrrp_instance plbha {
    state BACKUP
    interface eth0
    virtual_router_id $VRID
    priority $prio
    advert_int 1
    unicast_src_ip $self_ip
    unicast_peer {
        $peer_ip
    }
    virtual_ipaddress {
        $VIP/24 dev eth0
    }
    track_script {
        chk_pingora_lb
    }
}
EOF
    "$BIN" -t -c "$dir/pingora-lb.yaml" >/dev/null || fail "node $n: pingora-lb -t refused its config"
    ip netns exec "$(node_ns "$n")" keepalived --config-test -f "$dir/keepalived.conf" \
        2>"$dir/config-test.log" || {
        cat "$dir/config-test.log"
        fail "node $n: keepalived --config-test refused its config"
    }
}

start_lb() { # start_lb a|b
    local ns
    ns=$(node_ns "$1")
    ip netns exec "$ns" "$BIN" -c "$TMP/$1/pingora-lb.yaml" >>"$TMP/$1/pingora-lb.stderr" 2>&1 &
    PIDS+=($!)
}

lb_serves() { # the track command itself, run in the node
    local cmd
    read -ra cmd <<<"$(track_cmd "$1")"
    ip netns exec "$(node_ns "$1")" "${cmd[@]}"
}

stop_lb() { # SIGTERM to the pid in the node's pid file
    local pid
    pid=$(cat "$TMP/$1/run/pingora-lb.pid")
    [ -n "$pid" ] || fail "node $1: empty pid file"
    kill -TERM "$pid"
}

start_keepalived() {
    local n=$1 dir=$TMP/$1
    ip netns exec "$(node_ns "$n")" keepalived --vrrp --dont-fork --log-console --log-detail \
        --no-syslog -f "$dir/keepalived.conf" -p "$dir/keepalived.pid" -r "$dir/vrrp.pid" \
        >>"$dir/keepalived.log" 2>&1 &
    PIDS+=($!)
}

vip_holders() { # the nodes whose eth0 holds the VIP, e.g. "a" or "a b" or ""
    local n out=()
    for n in a b; do
        ip -n "$(node_ns "$n")" -4 -o addr show dev eth0 | grep -F " $VIP/" >/dev/null && out+=("$n")
    done
    echo "${out[*]}"
}
vip_only_on() { [ "$(vip_holders)" = "$1" ]; }

served_by() { # a request from the client namespace says X-Served-By: node-$1
    ip netns exec "$NS_C" curl -fsS -m 1 -D - -o /dev/null "http://$VIP/" |
        tr -d '\r' | grep -ix "x-served-by: node-$1" >/dev/null
}

write_node a 150 b
write_node b 100 a
say "pingora-lb on node A and node B: $BIN"
start_lb a
start_lb b
wait_until 15 "pingora-lb serving on node A" lb_serves a
wait_until 15 "pingora-lb serving on node B" lb_serves b

say "keepalived on both nodes (state BACKUP, priorities 150 and 100, advert_int 1)"
start_keepalived a
start_keepalived b
wait_until 20 "the VIP on node A alone" vip_only_on a
wait_until 10 "a request through the VIP answered by node A" served_by a
if [ "${PLB_HA_STANDIN:-}" != 1 ]; then
    # freebind: node B listens on the VIP it does not hold.
    ip netns exec "$NS_b" ss -Hltn "sport = :80" | grep -F "$VIP:80" >/dev/null ||
        fail "node B's pingora-lb does not listen on $VIP:80 while node A holds it"
fi

# ---------------------------------------------------------------------------------------
say "client load from the client namespace: a new connection every 50 ms, and a keep-alive one"
ip netns exec "$NS_C" python3 "$HERE/client.py" run --host "$VIP" --port 80 \
    --out "$TMP/client.tsv" --stop-file "$TMP/stop" --interval 0.05 --timeout 1 \
    --duration $((TEST_MAX - SECONDS)) --max-requests 8000 >>"$TMP/client.log" 2>&1 &
PIDS+=($!)
first_from() { python3 "$HERE/client.py" first --out "$TMP/client.tsv" --after "$1" --node "node-$2"; }
wait_until 10 "the client's first answer from node A" first_from 0 a
sleep 1

# phase LABEL NODE MAX ACTION...: runs ACTION, then waits for the first answer from NODE,
# for the VIP on NODE alone, and SETTLE seconds more; records the phase's numbers. With MAX
# "stay", NODE already holds the VIP and must keep it, and no request may fail.
phase() {
    local label=$1 node=$2 max=$3 t0 t1 line took failed_fresh failed_ka
    shift 3
    say "$label"
    t0=$(now)
    "$@"
    wait_until "$SWITCH_WAIT" "$label: an answer from node ${node^^}" first_from "$t0" "$node"
    wait_until 10 "$label: the VIP on node ${node^^} alone" vip_only_on "$node"
    sleep "$SETTLE"
    vip_only_on "$node" || fail "$label: the VIP is on '$(vip_holders)' ${SETTLE}s after the switch"
    t1=$(now)
    line=$(python3 "$HERE/client.py" phase --out "$TMP/client.tsv" --start "$t0" --end "$t1" \
        --node "node-$node" --label "$label")
    took=$(cut -f2 <<<"$line") failed_fresh=$(cut -f4 <<<"$line") failed_ka=$(cut -f7 <<<"$line")
    if [ "$max" = stay ]; then
        line=$(awk -F'\t' -v OFS='\t' '{ $2 = "-"; print }' <<<"$line")
    fi
    results+=("$line")
    if [ "$max" = stay ]; then
        say "  node ${node^^} kept the VIP; failed requests: $failed_fresh new-connection, $failed_ka keep-alive"
        if [ "$failed_fresh" != 0 ] || [ "$failed_ka" != 0 ]; then
            fail "$label: requests failed although the VIP did not move"
        fi
    else
        say "  node ${node^^} answered after ${took}s; failed requests: $failed_fresh new-connection, $failed_ka keep-alive"
        le "$took" "$max" || fail "$label: node ${node^^} answered after ${took}s (bound ${max}s)"
    fi
}

summary() {
    printf '\n%-34s %8s %14s %9s %14s %6s  %s\n' "phase" "switch s" "fresh failed" "gap s" \
        "k-a failed" "stale" "what clients saw"
    local line
    for line in "${results[@]}"; do
        IFS=$'\t' read -r label took nf ff gap nk fk other errors <<<"$line"
        printf '%-34s %8s %14s %9s %14s %6s  %s\n' "$label" "$took" "$ff/$nf" "$gap" \
            "$fk/$nk" "$other" "$errors"
    done
    cat <<EOF
(switch s: from the action to the first answer from the other node; gap s: longest time
 without a successful new-connection request; stale: answers from the old node after that)
EOF
}

# Round 0: both balancers reload (socket handoff): the VIP stays on A, nothing fails.
reload_lb() {
    ip netns exec "$(node_ns "$1")" "$BIN" reload -c "$TMP/$1/pingora-lb.yaml" \
        >>"$TMP/$1/reload.log" 2>&1 || fail "node $1: pingora-lb reload failed"
}
reload_both() { reload_lb a && reload_lb b; }
phase "0. reload pingora-lb on A and B" a stay reload_both

# Round 1: the balancer on node A stops.
phase "1. stop pingora-lb on A" b "$FAILOVER_MAX" stop_lb a
if lb_serves a >"$TMP/a/status-after-stop.txt" 2>&1; then
    fail "the track command still succeeds on node A with its pingora-lb stopped"
fi
say "  node A's track command now says: $(head -n 1 "$TMP/a/status-after-stop.txt")"
phase "1. start pingora-lb on A again" a "$FAILBACK_MAX" start_lb a

# Round 2: node A's link goes down.
phase "2. link of A down" b "$FAILOVER_MAX" ip -n "$NS_a" link set eth0 down
phase "2. link of A up" a "$FAILBACK_MAX" ip -n "$NS_a" link set eth0 up

# Round 3: planned maintenance: keepalived on A stops first (it gives up the VIP at once,
# sending priority 0), and starts again.
stop_keepalived() { kill -TERM "$(cat "$TMP/$1/keepalived.pid")"; }
phase "3. stop keepalived on A" b "$FAILOVER_MAX" stop_keepalived a
phase "3. start keepalived on A again" a "$FAILBACK_MAX" start_keepalived a

touch "$TMP/stop"
say "all phases passed in ${SECONDS}s"
