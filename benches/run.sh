#!/usr/bin/env bash
# Benchmark of pingora-lb against HAProxy and nginx (issue 7).
#
#   benches/run.sh [--threads N] [--rounds R] [--duration S] ...   (run.sh --help)
#
# Two nginx instances on loopback are the backends. pingora-lb, HAProxy and nginx are each
# configured as an equivalent round-robin balancer over them with the same thread/worker
# count, pinned (taskset) to the same CPU set; the backends and wrk run on the other CPUs.
# wrk runs in alternating rounds (pingora-lb, HAProxy, nginx, pingora-lb, ...) for
# keep-alive clients (also pausing between requests, for latency below saturation) and for a
# new connection per request, over plain HTTP and over TLS
# (issue 13: the same throwaway certificate, protocol and cipher for all three). On request
# (--scenarios idle-memory) it measures the memory each balancer holds per idle keep-alive
# client connection (benches/idle-clients.py). Then it times pingora-lb's reload and how
# fast a dead backend leaves the rotation.
#
# PINGORA_LB=path selects the pingora-lb binary (default: target/release/pingora-lb).
# Several, as name=path pairs separated by commas, are all measured in the same rounds:
#   PINGORA_LB=before=/tmp/old/pingora-lb,after=target/release/pingora-lb benches/run.sh
#
# Needs: haproxy, nginx (nginx-light is enough), wrk, taskset (util-linux), ss (iproute2),
# openssl (for the TLS scenarios), python3 (for idle-memory).
# Installs nothing. Runs as root or as any user (then the processes stay that user).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
ORIG_ARGS=("$@")

# ---------------------------------------------------------------- options
THREADS=1
# On a VM whose rounds swing by ±20%, three rounds' medians moved ~10% between runs.
ROUNDS=7
DURATION=10
CONNECTIONS=64
WRK_THREADS=1
LB_CPUS=
LOAD_CPUS=
RELOADS=5
KILLS=3
PORT_BASE=20100
BACKEND_WORKERS=2
OUT="$BENCH_DIR/results/latest.md"
ONLY="pingora,haproxy,nginx"
SCENARIOS="keepalive,keepalive-paced,close,tls-keepalive,tls-handshake"
ALL_SCENARIOS="keepalive,keepalive-paced,close,tls-keepalive,tls-handshake,tls-resume,idle-memory,instructions,tls-instructions"
# keepalive-paced: each connection pauses this long (wrk's delay(), whole milliseconds) before
# each request.
PACE_MS=1
IDLE_CONNECTIONS=10000
IDLE_CONCURRENCY=64
# TLS scenarios: every balancer and wrk settle on exactly this (see openssl-client.cnf.in).
TLS_PROTOCOL=TLSv1.3
TLS_CIPHER=TLS_AES_128_GCM_SHA256
TLS_GROUP=X25519
TLS_NAME=bench.test
KEEP_TMP=0
REDO=2

usage() {
    cat <<EOF
Usage: benches/run.sh [options]

  --threads N          threads (pingora-lb, HAProxy nbthread) / worker processes (nginx)
                       of every balancer (default $THREADS)
  --rounds R           alternating rounds per scenario; figures are medians (default $ROUNDS)
  --duration S         seconds of each wrk run (default $DURATION)
  --connections C      wrk connections (default $CONNECTIONS)
  --wrk-threads T      wrk threads (default $WRK_THREADS)
  --lb-cpus LIST       CPUs the balancers are pinned to (default: 0, or 0..N-1 for
                       --threads N when enough CPUs are left for the load side)
  --load-cpus LIST     CPUs for the backends and wrk (default: every other CPU)
  --reloads K          pingora-lb reloads timed (default $RELOADS; 0 skips)
  --kills K            times a backend is killed to time its removal (default $KILLS; 0 skips)
  --scenarios LIST     from keepalive, keepalive-paced (keep-alive clients pausing $PACE_MS ms
                       before each request, so that neither the balancer nor the load side
                       is saturated), close (plain HTTP), tls-keepalive, tls-handshake (a
                       full TLS handshake per request, resumption off), tls-resume (a
                       resumed one per request), idle-memory (memory per idle keep-alive
                       client connection), instructions and tls-instructions (user-space
                       instructions per keep-alive request, counted by callgrind);
                       "plain", "tls" and "all" name groups (default $SCENARIOS)
  --idle-connections N idle-memory: idle keep-alive connections held open (default $IDLE_CONNECTIONS;
                       the open file limit must allow it)
  --idle-concurrency C idle-memory: connections opened (and requests made) at once (default $IDLE_CONCURRENCY)
  --only LIST          balancers to run: pingora,haproxy,nginx (default all)
  --port-base P        ports P+1.. are used on 127.0.0.1 (default $PORT_BASE)
  --backend-workers W  nginx workers of each backend (default $BACKEND_WORKERS)
  --out FILE           markdown report (default benches/results/latest.md; '-' for none)
  --redo N             repeat a run up to N times when other processes took 10% or more of
                       a CPU on the balancer CPUs during it (default $REDO)
  --keep-tmp           keep the temporary directory (configs, logs, raw wrk output)

Environment: PINGORA_LB=path, or name=path[,name=path...] to compare binaries.
EOF
}

die() { echo "run.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

while (($#)); do
    case "$1" in
        --threads) THREADS=${2:?}; shift 2 ;;
        --rounds) ROUNDS=${2:?}; shift 2 ;;
        --duration) DURATION=${2:?}; shift 2 ;;
        --connections) CONNECTIONS=${2:?}; shift 2 ;;
        --wrk-threads) WRK_THREADS=${2:?}; shift 2 ;;
        --lb-cpus) LB_CPUS=${2:?}; shift 2 ;;
        --load-cpus) LOAD_CPUS=${2:?}; shift 2 ;;
        --reloads) RELOADS=${2:?}; shift 2 ;;
        --kills) KILLS=${2:?}; shift 2 ;;
        --scenarios) SCENARIOS=${2:?}; shift 2 ;;
        --idle-connections) IDLE_CONNECTIONS=${2:?}; shift 2 ;;
        --idle-concurrency) IDLE_CONCURRENCY=${2:?}; shift 2 ;;
        --only) ONLY=${2:?}; shift 2 ;;
        --port-base) PORT_BASE=${2:?}; shift 2 ;;
        --backend-workers) BACKEND_WORKERS=${2:?}; shift 2 ;;
        --out) OUT=${2:?}; shift 2 ;;
        --redo) REDO=${2:?}; shift 2 ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
for v in THREADS ROUNDS DURATION CONNECTIONS WRK_THREADS RELOADS KILLS PORT_BASE BACKEND_WORKERS REDO \
    IDLE_CONNECTIONS IDLE_CONCURRENCY; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "--${v,,} must be a whole number"
done
((THREADS >= 1 && ROUNDS >= 1 && DURATION >= 1 && CONNECTIONS >= 1 && WRK_THREADS >= 1)) ||
    die "threads, rounds, duration, connections and wrk threads must be at least 1"
((IDLE_CONNECTIONS >= 1 && IDLE_CONCURRENCY >= 1)) || die "--idle-connections and --idle-concurrency must be at least 1"
((CONNECTIONS >= WRK_THREADS)) || die "--connections must be at least --wrk-threads"
SCEN_LIST=()
IFS=',' read -r -a _scens <<<"$SCENARIOS"
for scen in "${_scens[@]}"; do
    case "$scen" in
        plain) SCEN_LIST+=(keepalive keepalive-paced close) ;;
        tls) SCEN_LIST+=(tls-keepalive tls-handshake tls-resume) ;;
        all) IFS=',' read -r -a _all <<<"$ALL_SCENARIOS"; SCEN_LIST+=("${_all[@]}") ;;
        keepalive|keepalive-paced|close|tls-keepalive|tls-handshake|tls-resume|idle-memory|instructions|tls-instructions)
            SCEN_LIST+=("$scen") ;;
        *) die "--scenarios: unknown scenario $scen" ;;
    esac
done
((${#SCEN_LIST[@]})) || die "--scenarios selects no scenario"
mapfile -t SCEN_LIST < <(printf '%s\n' "${SCEN_LIST[@]}" | awk '!seen[$0]++')
is_tls() { [[ $1 == tls-* ]]; }                                   # over TLS
closes() { [[ $1 == close || $1 == tls-handshake || $1 == tls-resume ]]; }  # Connection: close
ANY_TLS=0
for scen in "${SCEN_LIST[@]}"; do if is_tls "$scen"; then ANY_TLS=1; fi; done
# idle-memory and the instruction counts are no throughput scenarios: they run after the
# others, each with its own report section.
IDLE_MEMORY=0
WRK_SCENS=()
INSTR_SCENS=()
for scen in "${SCEN_LIST[@]}"; do
    case "$scen" in
        idle-memory) IDLE_MEMORY=1 ;;
        instructions|tls-instructions) INSTR_SCENS+=("$scen") ;;
        *) WRK_SCENS+=("$scen") ;;
    esac
done

# ---------------------------------------------------------------- tools
missing=()
tools=(haproxy nginx taskset ss timeout getconf)
if ((${#WRK_SCENS[@]} || ${#INSTR_SCENS[@]} || RELOADS > 0 || KILLS > 0)); then tools+=(wrk); fi
if ((${#INSTR_SCENS[@]})); then tools+=(valgrind callgrind_control callgrind_annotate); fi
if ((ANY_TLS)); then tools+=(openssl); fi
if ((IDLE_MEMORY)); then tools+=(python3); fi
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "run.sh: missing: ${missing[*]}" >&2
    echo "  on Debian: apt-get install -y haproxy nginx-light wrk util-linux iproute2 coreutils openssl python3 valgrind" >&2
    exit 1
fi

# idle-memory: the client and each balancer hold every connection open at once, one file
# descriptor each (plus the balancer's backend connections and its own files).
IDLE_NOFILE=$((IDLE_CONNECTIONS + 1024))
if ((IDLE_MEMORY)); then
    hard_nofile=$(ulimit -Hn)
    if [[ $hard_nofile != unlimited ]] && ((hard_nofile < IDLE_NOFILE)); then
        die "--idle-connections $IDLE_CONNECTIONS needs an open file limit of $IDLE_NOFILE; the hard limit is $hard_nofile (raise it, e.g. in limits.conf or with prlimit, or use fewer connections)"
    fi
fi

# pingora-lb binaries: PL_NAMES[i] / PL_BINS[i]
PL_NAMES=()
PL_BINS=()
IFS=',' read -r -a _pl_specs <<<"${PINGORA_LB:-$REPO_DIR/target/release/pingora-lb}"
for spec in "${_pl_specs[@]}"; do
    [[ -n $spec ]] || continue
    if [[ $spec == *=* ]]; then name=${spec%%=*}; bin=${spec#*=}; else name=pingora-lb; bin=$spec; fi
    [[ -x $bin ]] || die "pingora-lb binary $bin does not exist or is not executable (cargo build --release, or set PINGORA_LB)"
    bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
    PL_NAMES+=("$name")
    PL_BINS+=("$bin")
done
((${#PL_NAMES[@]})) || die "PINGORA_LB names no binary"
if ((${#PL_NAMES[@]} > 1)); then
    dupes=$(printf '%s\n' "${PL_NAMES[@]}" | sort | uniq -d)
    [[ -z $dupes ]] || die "PINGORA_LB: give each binary its own name (name=path): $dupes"
fi

# ---------------------------------------------------------------- CPUs
expand_cpus() { # "0-2,5" -> "0 1 2 5"
    local part parts cpus=()
    IFS=',' read -r -a parts <<<"$1"
    for part in "${parts[@]}"; do
        if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
            mapfile -t -O "${#cpus[@]}" cpus < <(seq "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}")
        elif [[ $part =~ ^[0-9]+$ ]]; then
            cpus+=("$part")
        else
            die "bad CPU list: $1"
        fi
    done
    echo "${cpus[@]}"
}
join_by() { local IFS=$1; shift; echo "$*"; }

ALLOWED=$(taskset -pc $$ | sed 's/.*: *//')
read -r -a ALLOWED_LIST <<<"$(expand_cpus "$ALLOWED")"
NCPU=${#ALLOWED_LIST[@]}
PIN=1
if ((NCPU < 2)); then
    log "WARNING: only one CPU available: nothing is pinned and the load side competes with the balancer"
    PIN=0
    LB_CPUS=${LB_CPUS:-${ALLOWED_LIST[0]}}
    LOAD_CPUS=${LOAD_CPUS:-${ALLOWED_LIST[0]}}
fi
if [[ -z $LB_CPUS ]]; then
    n=$THREADS
    ((n <= NCPU - 1)) || n=1
    LB_CPUS=$(join_by , "${ALLOWED_LIST[@]:0:n}")
fi
read -r -a LB_LIST <<<"$(expand_cpus "$LB_CPUS")"
if [[ -z $LOAD_CPUS ]]; then
    rest=()
    for c in "${ALLOWED_LIST[@]}"; do
        [[ " ${LB_LIST[*]} " == *" $c "* ]] || rest+=("$c")
    done
    ((${#rest[@]})) || die "no CPU left for the load side; give --load-cpus"
    LOAD_CPUS=$(join_by , "${rest[@]}")
fi
read -r -a LOAD_LIST <<<"$(expand_cpus "$LOAD_CPUS")"
for c in "${LB_LIST[@]}" "${LOAD_LIST[@]}"; do
    [[ " ${ALLOWED_LIST[*]} " == *" $c "* ]] || die "CPU $c is not available (available: $ALLOWED)"
done
if ((PIN)); then
    for c in "${LB_LIST[@]}"; do
        [[ " ${LOAD_LIST[*]} " != *" $c "* ]] || log "WARNING: CPU $c is in both --lb-cpus and --load-cpus"
    done
fi
# Background processes are started as `taskset -c CPUS program ... &` (never through a
# shell function, which would fork a subshell): taskset execs the program, so $! is its pid.

CLK_TCK=$(getconf CLK_TCK)
ME=$(id -un)

# ---------------------------------------------------------------- ports
B1_PORT=$((PORT_BASE + 1))
B2_PORT=$((PORT_BASE + 2))
B3_PORT=$((PORT_BASE + 3))
LIFECYCLE_PORT=$((PORT_BASE + 9))
for p in $B1_PORT $B2_PORT $B3_PORT $LIFECYCLE_PORT $(seq $((PORT_BASE + 10)) $((PORT_BASE + 20))); do
    if ss -Hltn "sport = :$p" | grep -q .; then
        die "port $p is in use (stop what listens there, e.g. the system's nginx/haproxy, or pass --port-base)"
    fi
done

# ---------------------------------------------------------------- processes and cleanup
TMP=$(mktemp -d /tmp/pingora-lb-bench.XXXXXX)
chmod 700 "$TMP"
BG_JOB=
STARTED_PIDS=()    # every long-lived process started here, plus pingora-lb's reloaded ones

stop_pid() { # pid...: TERM, then KILL what is left after 5 s
    local pid alive=() i
    for pid in "$@"; do
        kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null && alive+=("$pid")
    done
    for ((i = 0; i < 50 && ${#alive[@]}; i++)); do
        local still=()
        for pid in "${alive[@]}"; do
            if kill -0 "$pid" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]; then
                still+=("$pid")
            fi
        done
        alive=("${still[@]+"${still[@]}"}")
        ((${#alive[@]})) && sleep 0.1
    done
    for pid in "${alive[@]+"${alive[@]}"}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # pingora-lb processes started by a reload are not our children: find them by pid file.
    local f
    for f in "$TMP"/*/pingora-lb.pid; do
        if [[ -f $f ]]; then STARTED_PIDS+=("$(cat "$f" 2>/dev/null)"); fi
    done
    # Only processes whose command line names our temporary directory (pids can be reused).
    local pid ours=()
    for pid in "${STARTED_PIDS[@]+"${STARTED_PIDS[@]}"}"; do
        if [[ $pid =~ ^[0-9]+$ ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF "$TMP"; then
            ours+=("$pid")
        fi
    done
    # Safety net: any other process whose command line names our temporary directory.
    # shellcheck disable=SC2013  # /proc/N/cmdline: no spaces
    for f in $(grep -laF "$TMP" /proc/[0-9]*/cmdline 2>/dev/null); do
        pid=${f#/proc/}
        pid=${pid%/cmdline}
        if [[ $pid != "$$" && " ${ours[*]-} " != *" $pid "* ]]; then ours+=("$pid"); fi
    done
    if [[ -n ${BG_JOB:-} ]]; then
        mapfile -t -O "${#ours[@]}" ours < <(proc_tree "$BG_JOB")
    fi
    if ((${#ours[@]})); then
        stop_pid "${ours[@]}"
    fi
    if ((KEEP_TMP)); then
        echo "run.sh: temporary files kept in $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Replace @KEY@ by values: render TEMPLATE OUT KEY=value...
render() {
    local template=$1 dest=$2 kv key val content
    shift 2
    content=$(<"$template")
    for kv in "$@"; do
        key=${kv%%=*}
        val=${kv#*=}
        content=${content//@$key@/$val}
    done
    [[ $content != *@[A-Z_]*@* ]] || die "unreplaced placeholder in $template"
    printf '%s\n' "$content" >"$dest"
}

# HTTP status of GET / on a port, or nothing.
http_status() {
    # shellcheck disable=SC2016  # the inner script's own expansions
    timeout 3 bash -c '
        exec 3<>/dev/tcp/127.0.0.1/'"$1"' || exit 1
        printf "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" >&3
        read -r _ code _ <&3 && echo "$code"' 2>/dev/null || true
}

# The same over TLS, with the client settings wrk has in the TLS scenarios.
https_status() {
    printf 'GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' |
        OPENSSL_CONF=$TLS_CLIENT_CONF timeout 3 openssl s_client -connect "127.0.0.1:$1" \
            -servername "$TLS_NAME" -quiet 2>/dev/null | awk 'NR == 1 { print $2 }' || true
}

# wait_ready PORT PID LOG [tls]: until GET / answers 200
READY_SECONDS=15   # a balancer must answer within this after its start
wait_ready() {
    local port=$1 pid=$2 logf=$3 tls=${4:-} i code
    for ((i = 0; i < READY_SECONDS * 10; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "--- $logf" >&2
            tail -n 30 "$logf" >&2 2>/dev/null || true
            die "process $pid (port $port) exited during start-up"
        fi
        if [[ $tls == tls ]]; then code=$(https_status "$port"); else code=$(http_status "$port"); fi
        [[ $code == 200 ]] && return 0
        sleep 0.1
    done
    tail -n 30 "$logf" >&2 2>/dev/null || true
    die "nothing answers 200 on port $port after $READY_SECONDS s"
}

# The process and all its descendants.
proc_tree() {
    local pid=$1 child
    [[ -d /proc/$pid ]] || return 0
    echo "$pid"
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
        proc_tree "$child"
    done
}

# utime+stime in clock ticks, summed over the given pids (all threads of each).
cpu_ticks() {
    local pid sum=0 t
    for pid in "$@"; do
        t=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
        sum=$((sum + ${t:-0}))
    done
    echo "$sum"
}

# VmHWM (peak RSS) in kB, summed over the given pids.
peak_rss_kb() {
    local pid sum=0 k
    for pid in "$@"; do
        k=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || k=0
        sum=$((sum + ${k:-0}))
    done
    echo "$sum"
}

# "busy total" jiffies summed over the given CPUs, from /proc/stat.
cpu_jiffies() {
    local want
    want=$(printf 'cpu%s ' "$@")
    awk -v want=" $want" '
        $1 ~ /^cpu[0-9]+$/ && index(want, " " $1 " ") {
            total = 0
            for (i = 2; i <= NF; i++) total += $i
            busy += total - $5 - $6; all += total
        }
        END { print busy + 0, all + 0 }' /proc/stat
}

# ---------------------------------------------------------------- TLS material
# A throwaway ECDSA P-256 certificate for bench.test, made now and used by all three
# balancers; the client (wrk, and the openssl s_client checks) is pinned by its OpenSSL
# configuration to one protocol, cipher suite and group; the balancers get an OpenSSL
# configuration of their own that sets the number of TLS 1.3 session tickets (0: no
# resumption possible) the same way for all three.
TLS_DIR="$TMP/tls"
TLS_CLIENT_CONF="$TLS_DIR/openssl-client.cnf"
if ((ANY_TLS)); then
    mkdir -p "$TLS_DIR"
    if ! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$TLS_DIR/key.pem" -out "$TLS_DIR/cert.pem" -days 30 -subj "/CN=$TLS_NAME" \
        -addext "subjectAltName=DNS:$TLS_NAME" >"$TLS_DIR/req.log" 2>&1; then
        cat "$TLS_DIR/req.log" >&2
        die "openssl could not make the test certificate"
    fi
    chmod 600 "$TLS_DIR/key.pem"
    # HAProxy's crt: the chain and the key in one file.
    cat "$TLS_DIR/cert.pem" "$TLS_DIR/key.pem" >"$TLS_DIR/haproxy.pem"
    chmod 600 "$TLS_DIR/haproxy.pem"
    render "$BENCH_DIR/openssl-client.cnf.in" "$TLS_CLIENT_CONF" \
        "PROTOCOL=$TLS_PROTOCOL" "CIPHER=$TLS_CIPHER" "GROUP=$TLS_GROUP"
    render "$BENCH_DIR/openssl-server.cnf.in" "$TLS_DIR/openssl-server-tickets.cnf" "NUM_TICKETS=2"
    render "$BENCH_DIR/openssl-server.cnf.in" "$TLS_DIR/openssl-server-notickets.cnf" "NUM_TICKETS=0"
fi
# The balancers' OpenSSL configuration in a TLS scenario: no session ticket (so no
# resumption) where each connection must be a full handshake.
server_openssl_conf() {
    if [[ $1 == tls-handshake ]]; then echo "$TLS_DIR/openssl-server-notickets.cnf"
    else echo "$TLS_DIR/openssl-server-tickets.cnf"; fi
}

# tls_probe PORT: what a client pinned like wrk negotiates with the balancer on PORT, as
# "PROTOCOL CIPHER SUBJECT RESUMPTION": RESUMPTION is "on" when a second connection resumed
# the session the first was given, else "off" (no ticket given, or not accepted).
tls_probe() {
    local port=$1 sess="$TLS_DIR/probe-$1.sess" out proto cipher subject resumed=off
    local req='GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n'
    rm -f "$sess"
    # shellcheck disable=SC2059
    out=$(printf "$req" | OPENSSL_CONF=$TLS_CLIENT_CONF timeout 5 openssl s_client \
        -connect "127.0.0.1:$port" -servername "$TLS_NAME" -sess_out "$sess" -ign_eof 2>&1) || true
    read -r proto cipher < <(sed -n 's/^New, \(TLSv[0-9.]*\), Cipher is \(.*\)$/\1 \2/p' <<<"$out" | head -n 1) || true
    subject=$(sed -n 's/^subject=.*CN *= *\([^ ,/]*\).*/\1/p' <<<"$out" | head -n 1)
    if [[ -s $sess ]]; then
        # shellcheck disable=SC2059
        out=$(printf "$req" | OPENSSL_CONF=$TLS_CLIENT_CONF timeout 5 openssl s_client \
            -connect "127.0.0.1:$port" -servername "$TLS_NAME" -sess_in "$sess" -ign_eof 2>&1) || true
        if grep -q '^Reused, ' <<<"$out"; then resumed=on; fi
    fi
    echo "${proto:-none} ${cipher:-none} ${subject:-none} $resumed"
}

# ---------------------------------------------------------------- backends
# start_backend NAME PORT [detached]: a separate nginx instance on the load CPUs; sets
# BACKEND_PID to its master's pid. "detached" makes it no child of this shell (bash would
# report its SIGKILL on the terminal).
start_backend() {
    local name=$1 port=$2 detached=${3:-} dir="$TMP/$1" user_line="" pid
    mkdir -p "$dir"
    if [[ $ME == root ]]; then user_line="user root;"; fi
    render "$BENCH_DIR/backend-nginx.conf.in" "$dir/nginx.conf" \
        "DIR=$dir" "PORT=$port" "WORKERS=$BACKEND_WORKERS" "USER_LINE=$user_line"
    if [[ $detached == detached ]]; then
        (
            taskset -c "$LOAD_CPUS" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" \
                -g 'daemon off;' >"$dir/stdout.log" 2>&1 &
            echo $! >"$dir/master.pid"
        )
        pid=$(<"$dir/master.pid")
    else
        taskset -c "$LOAD_CPUS" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -g 'daemon off;' \
            >"$dir/stdout.log" 2>&1 &
        pid=$!
    fi
    STARTED_PIDS+=("$pid")
    wait_ready "$port" "$pid" "$dir/error.log"
    BACKEND_PID=$pid
}

# ---------------------------------------------------------------- balancers
# Each pingora-lb binary is copied first, so that a rebuild during the run changes nothing.
PL_COPIES=()
PL_SHA=()
PL_BUILT=()
for j in "${!PL_BINS[@]}"; do
    PL_BUILT+=("$(date -u -r "${PL_BINS[$j]}" '+%Y-%m-%d %H:%M UTC')")
    mkdir -p "$TMP/bin$j"
    cp "${PL_BINS[$j]}" "$TMP/bin$j/pingora-lb"
    PL_COPIES+=("$TMP/bin$j/pingora-lb")
    PL_SHA+=("$(sha256sum "$TMP/bin$j/pingora-lb" | cut -c1-12)")
done

# Balancer i: KIND[i] (pingora|haproxy|nginx), NAME[i], BIN[i], PORT[i]
KIND=()
NAME=()
BIN=()
PORT=()
add_balancer() {
    KIND+=("$1"); NAME+=("$2"); BIN+=("$3"); PORT+=($((PORT_BASE + 10 + ${#PORT[@]})))
}
IFS=',' read -r -a _only <<<"$ONLY"
for k in "${_only[@]}"; do
    case "$k" in
        pingora) for i in "${!PL_NAMES[@]}"; do add_balancer pingora "${PL_NAMES[$i]}" "${PL_COPIES[$i]}"; done ;;
        haproxy) add_balancer haproxy HAProxy "$(command -v haproxy)" ;;
        nginx) add_balancer nginx nginx "$(command -v nginx)" ;;
        *) die "--only: unknown balancer $k" ;;
    esac
done
((${#KIND[@]})) || die "--only selects no balancer"
((${#KIND[@]} <= 11)) || die "at most 11 balancers"

pingora_upstreams() { # ports...
    local p
    for p in "$@"; do printf '  - address: 127.0.0.1:%s\n' "$p"; done
}

# pingora_listeners PORT [tls]: the `listeners` entries. HTTP/2 is not offered: wrk speaks
# HTTP/1.1 (and offers no ALPN), as HAProxy and nginx are set up here.
pingora_listeners() {
    if [[ ${2:-} != tls ]]; then
        printf '  - 127.0.0.1:%s\n' "$1"
        return
    fi
    printf '%s\n' \
        "  - address: 127.0.0.1:$1" \
        "    tls:" \
        "      certificates:" \
        "        - cert: $TLS_DIR/cert.pem" \
        "          key: $TLS_DIR/key.pem" \
        "      min_version: \"${TLS_PROTOCOL#TLSv}\"" \
        "      http2: false"
}

# start_balancer I SCENARIO: start balancer I pinned to the balancer CPUs, its command
# prefixed by LB_WRAP (valgrind, for the instruction counts); sets LB_PID[I].
LB_WRAP=()
# In a TLS scenario its listener terminates TLS (the backends stay plain HTTP) and its
# OpenSSL configuration (OPENSSL_CONF, read by the libssl all three link) is the scenario's.
declare -A LB_PID=()
start_balancer() {
    local i=$1 scen=$2 dir="$TMP/lb$1-$2" pid user_line="" tls="" ossl_conf=""
    local bind_tls="" listen_tls="" tls_lines="" run_env=() maxconn=8192 strict_limits=""
    mkdir -p "$dir"
    # Room for every idle connection (pingora-lb has no connection limit).
    if [[ $scen == idle-memory ]]; then maxconn=$IDLE_NOFILE strict_limits="    no strict-limits"; fi
    if is_tls "$scen"; then
        tls=tls
        ossl_conf=$(server_openssl_conf "$scen")
        run_env=(env "OPENSSL_CONF=$ossl_conf")
        bind_tls=" ssl crt $TLS_DIR/haproxy.pem ssl-min-ver $TLS_PROTOCOL ciphersuites $TLS_CIPHER"
        listen_tls=" ssl"
        tls_lines=$(printf '%s\n' \
            "        ssl_certificate $TLS_DIR/cert.pem;" \
            "        ssl_certificate_key $TLS_DIR/key.pem;" \
            "        ssl_protocols $TLS_PROTOCOL;" \
            "        ssl_conf_command Ciphersuites $TLS_CIPHER;")
    fi
    case "${KIND[$i]}" in
        pingora)
            render "$BENCH_DIR/pingora-lb.yaml.in" "$dir/pingora-lb.yaml" \
                "DIR=$dir" "LISTENERS=$(pingora_listeners "${PORT[$i]}" "$tls")" "THREADS=$THREADS" \
                "USER=$ME" "LOG_LEVEL=warn" "UPSTREAMS=$(pingora_upstreams "$B1_PORT" "$B2_PORT")"
            "${run_env[@]+"${run_env[@]}"}" \
                taskset -c "$LB_CPUS" "${LB_WRAP[@]+"${LB_WRAP[@]}"}" "${BIN[$i]}" -c "$dir/pingora-lb.yaml" \
                >"$dir/stdout.log" 2>&1 &
            pid=$!
            LB_LOG[$i]="$dir/error.log"
            ;;
        haproxy)
            render "$BENCH_DIR/haproxy.cfg.in" "$dir/haproxy.cfg" \
                "PORT=${PORT[$i]}" "BIND_TLS=$bind_tls" "THREADS=$THREADS" "B1=$B1_PORT" "B2=$B2_PORT" \
                "MAXCONN=$maxconn" "STRICT_LIMITS=$strict_limits"
            # -db: foreground, one process (its threads); no master-worker.
            "${run_env[@]+"${run_env[@]}"}" \
                taskset -c "$LB_CPUS" "${LB_WRAP[@]+"${LB_WRAP[@]}"}" haproxy -db -f "$dir/haproxy.cfg" \
                >"$dir/stdout.log" 2>&1 &
            pid=$!
            LB_LOG[$i]="$dir/stdout.log"
            ;;
        nginx)
            if [[ $ME == root ]]; then user_line="user root;"; fi
            local globals="daemon off;"
            # callgrind_control cannot reach a forked worker: under callgrind nginx serves
            # from its one process.
            if ((${#LB_WRAP[@]})); then globals+=" master_process off;"; fi
            render "$BENCH_DIR/nginx-lb.conf.in" "$dir/nginx.conf" \
                "DIR=$dir" "PORT=${PORT[$i]}" "LISTEN_TLS=$listen_tls" "TLS_LINES=$tls_lines" \
                "THREADS=$THREADS" "B1=$B1_PORT" "B2=$B2_PORT" "USER_LINE=$user_line" \
                "WORKER_CONNECTIONS=$maxconn"
            "${run_env[@]+"${run_env[@]}"}" \
                taskset -c "$LB_CPUS" "${LB_WRAP[@]+"${LB_WRAP[@]}"}" \
                nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -g "$globals" \
                >"$dir/stdout.log" 2>&1 &
            pid=$!
            LB_LOG[$i]="$dir/error.log"
            ;;
    esac
    STARTED_PIDS+=("$pid")
    LB_PID[$i]=$pid
    wait_ready "${PORT[$i]}" "$pid" "${LB_LOG[$i]}" "$tls"
}
declare -A LB_LOG=()

stop_balancer() {
    local i=$1 pids
    pids=$(proc_tree "${LB_PID[$i]}")
    # shellcheck disable=SC2086
    stop_pid $pids
}

# ---------------------------------------------------------------- wrk
WRK_LUA="$BENCH_DIR/report.lua"
# keepalive-paced's script: report.lua's hook, and a pause before each request.
PACED_LUA="$TMP/paced.lua"
printf 'dofile("%s")\ndelay = function() return %d end\n' "$WRK_LUA" "$PACE_MS" >"$PACED_LUA"
# scenario round i requests duration_us p50_us p99_us errors ticks load_busy lb_util lb_other
RAW="$TMP/raw.tsv"
DISCARDED="$TMP/discarded.tsv"   # runs repeated because other processes disturbed them
printf '' >"$RAW"
printf '' >"$DISCARDED"

# run_wrk OUTFILE PORT SECONDS CONNECTIONS [wrk args...]; PORT may be "tls:PORT" (https,
# with the pinned client TLS settings). A script (-s) among the wrk args replaces report.lua:
# wrk keeps the last one given.
run_wrk() {
    local out=$1 port=$2 secs=$3 conns=$4 url
    shift 4
    local threads=$WRK_THREADS
    ((threads <= conns)) || threads=$conns
    local run_env=()
    if [[ $port == tls:* ]]; then
        url="https://127.0.0.1:${port#tls:}/"
        run_env=(env "OPENSSL_CONF=$TLS_CLIENT_CONF")
    else
        url="http://127.0.0.1:$port/"
    fi
    timeout --foreground -k 5 $((secs + 30)) taskset -c "$LOAD_CPUS" "${run_env[@]+"${run_env[@]}"}" \
        wrk -t"$threads" -c"$conns" -d"${secs}s" --latency -s "$WRK_LUA" "$@" \
        "$url" >"$out" 2>&1 || true
}
# wrk_target I SCENARIO: run_wrk's PORT for balancer I in a scenario.
wrk_target() { if is_tls "$2"; then echo "tls:${PORT[$1]}"; else echo "${PORT[$1]}"; fi; }

# measure I SCENARIO ROUND: one wrk run against balancer I; appends a line to $RAW.
measure() {
    local i=$1 scen=$2 round=$3 out pids t0 t1 l0 l1 c0 c1 line extra=()
    if closes "$scen"; then extra=(-H "Connection: close"); fi
    if [[ $scen == keepalive-paced ]]; then extra=(-s "$PACED_LUA"); fi
    out="$TMP/wrk-$scen-r$round-lb$i.txt"
    pids=$(proc_tree "${LB_PID[$i]}")
    # shellcheck disable=SC2086
    t0=$(cpu_ticks $pids)
    l0=$(cpu_jiffies "${LOAD_LIST[@]}")
    c0=$(cpu_jiffies "${LB_LIST[@]}")
    run_wrk "$out" "$(wrk_target "$i" "$scen")" "$DURATION" "$CONNECTIONS" "${extra[@]+"${extra[@]}"}"
    l1=$(cpu_jiffies "${LOAD_LIST[@]}")
    c1=$(cpu_jiffies "${LB_LIST[@]}")
    # shellcheck disable=SC2086
    t1=$(cpu_ticks $pids)
    line=$(grep '^BENCH ' "$out" || true)
    if [[ -z $line ]]; then
        cat "$out" >&2
        die "wrk produced no result against ${NAME[$i]} ($scen, round $round)"
    fi
    # BENCH requests=.. duration_us=.. p50_us=.. p99_us=.. connect=.. read=.. write=.. status=.. timeout=..
    local requests duration p50 p99 errors
    read -r requests duration p50 p99 errors < <(echo "$line" | awk '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        print v["requests"], v["duration_us"], v["p50_us"], v["p99_us"],
            v["connect"] + v["read"] + v["write"] + v["status"] + v["timeout"] }')
    local busy
    busy=$(awk -v a="$l0" -v b="$l1" 'BEGIN { split(a, x, " "); split(b, y, " ");
        d = y[2] - x[2]; printf "%.3f", (d > 0 ? (y[1] - x[1]) / d : 0) }')
    local util other
    util=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v d="$duration" \
        'BEGIN { printf "%.3f", (d > 0 ? t / hz / (d / 1e6) : 0) }')
    # What else ran on the balancer CPUs (in CPUs): their busy time minus the balancer's own.
    other=$(awk -v a="$c0" -v b="$c1" -v t=$((t1 - t0)) -v n="${#LB_LIST[@]}" 'BEGIN {
        split(a, x, " "); split(b, y, " "); d = y[2] - x[2]
        o = (d > 0 ? ((y[1] - x[1]) - t) / d * n : 0); printf "%.3f", (o > 0 ? o : 0) }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scen" "$round" "$i" "$requests" \
        "$duration" "$p50" "$p99" "$errors" $((t1 - t0)) "$busy" "$util" "$other" >>"$RAW"
    log "  $(printf '%-12s' "${NAME[$i]}") $(awk -v r="$requests" -v d="$duration" -v p50="$p50" -v p99="$p99" \
        -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v e="$errors" -v u="$util" -v b="$busy" -v o="$other" 'BEGIN {
        printf "%9.0f req/s  p50 %7.3f ms  p99 %7.3f ms  %6.2f us/req  lb cpu %3.0f%%  load cpus %3.0f%%  other on lb cpus %2.0f%%  errors %d",
            r / (d / 1e6), p50 / 1000, p99 / 1000, (r > 0 ? t / hz * 1e6 / r : 0), u * 100, b * 100, o * 100, e }')"
}

# ---------------------------------------------------------------- environment report
load_now() { awk '{print $1}' /proc/loadavg; }
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "temporary directory $TMP"
log "balancer CPUs: $LB_CPUS, backend+wrk CPUs: $LOAD_CPUS, threads/workers: $THREADS"
if awk -v l="$(load_now)" 'BEGIN { exit !(l > 0.5) }'; then
    log "WARNING: load average is $(load_now): other work on this machine will skew the figures"
fi

# ---------------------------------------------------------------- backends up
start_backend backend1 "$B1_PORT"
B1_PID=$BACKEND_PID
start_backend backend2 "$B2_PORT"
B2_PID=$BACKEND_PID
log "backends: nginx on 127.0.0.1:$B1_PORT (pid $B1_PID) and 127.0.0.1:$B2_PORT (pid $B2_PID), $BACKEND_WORKERS workers each"

# ---------------------------------------------------------------- throughput rounds
declare -A RSS_KB=()    # scenario,i -> peak RSS kB
declare -A NPROCS=()    # scenario,i -> processes summed
declare -A CEILING=()   # scenario -> req/s of wrk straight to a backend
declare -A TLS_SEEN=()  # scenario,i -> what openssl s_client negotiated with the balancer
for scen in "${WRK_SCENS[@]+"${WRK_SCENS[@]}"}"; do
    log "scenario $scen: starting balancers"
    for i in "${!KIND[@]}"; do start_balancer "$i" "$scen"; done
    if is_tls "$scen"; then
        # Every balancer must settle on the same protocol, cipher and certificate, and resume
        # sessions or not as the scenario says.
        want_resumption=on
        if [[ $scen == tls-handshake ]]; then want_resumption=off; fi
        for i in "${!KIND[@]}"; do
            read -r proto cipher subject resumption < <(tls_probe "${PORT[$i]}")
            log "  ${NAME[$i]}: $proto $cipher, certificate $subject, resumption $resumption"
            [[ $proto == "$TLS_PROTOCOL" && $cipher == "$TLS_CIPHER" && $subject == "$TLS_NAME" ]] ||
                die "${NAME[$i]} negotiated $proto $cipher with certificate $subject, not $TLS_PROTOCOL $TLS_CIPHER $TLS_NAME"
            [[ $resumption == "$want_resumption" ]] ||
                die "${NAME[$i]}: session resumption is $resumption in $scen, should be $want_resumption"
            TLS_SEEN[$scen,$i]="$proto $cipher, resumption $resumption"
        done
    fi
    sleep 1
    # Warm-up: fills connection pools and caches, not measured.
    warm_extra=()
    if closes "$scen"; then warm_extra=(-H "Connection: close"); fi
    for i in "${!KIND[@]}"; do
        run_wrk "$TMP/warmup-$scen-lb$i.txt" "$(wrk_target "$i" "$scen")" 1 "$CONNECTIONS" \
            "${warm_extra[@]+"${warm_extra[@]}"}"
    done
    if [[ $scen == keepalive ]]; then
        # The load side's own ceiling: wrk straight to one backend, same CPUs, no balancer.
        # With keep-alive the load CPUs do the same work per request as behind a balancer.
        run_wrk "$TMP/ceiling-$scen.txt" "$B1_PORT" "$DURATION" "$CONNECTIONS"
        CEILING[$scen]=$(awk '/^BENCH / { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
            if (v["duration_us"] > 0) printf "%.0f", v["requests"] / (v["duration_us"] / 1e6) }' "$TMP/ceiling-$scen.txt")
        log "  load-side ceiling (wrk straight to a backend): ${CEILING[$scen]:-?} req/s"
        sleep 1
    fi
    for ((round = 1; round <= ROUNDS; round++)); do
        log "scenario $scen, round $round/$ROUNDS"
        for i in "${!KIND[@]}"; do
            for ((attempt = 0; ; attempt++)); do
                measure "$i" "$scen" "$round"
                sleep 1
                disturbed=$(tail -n 1 "$RAW" | awk -F'\t' '{ print ($12 >= 0.10) }')
                ((disturbed && attempt < REDO)) || break
                # Keep the disturbed run out of the figures, but listed.
                tail -n 1 "$RAW" >>"$DISCARDED"
                sed -i '$d' "$RAW"
                log "  (other processes used the balancer CPUs: run repeated in 5 s)"
                sleep 5
            done
        done
    done
    for i in "${!KIND[@]}"; do
        pids=$(proc_tree "${LB_PID[$i]}")
        # shellcheck disable=SC2086
        RSS_KB[$scen,$i]=$(peak_rss_kb $pids)
        NPROCS[$scen,$i]=$(wc -w <<<"$pids")
        stop_balancer "$i"
    done
done

# ---------------------------------------------------------------- idle keep-alive connections
# idle-memory: each balancer, started afresh, gets one request on each of IDLE_CONNECTIONS
# keep-alive connections (IDLE_CONCURRENCY at a time), which then all stay open and idle.
# The growth of its resident memory from before to then, divided by the connections still
# open, is its memory per idle connection. Opening them must finish within IDLE_OPEN_LIMIT
# seconds, well inside every balancer's idle timeout (HAProxy and nginx 60 s, pingora-lb's
# client.keepalive_timeout 75 s), and the client checks that none was closed meanwhile.
# IDLE_RAW columns: 1 round 2 i 3 open 4 closed early 5 failed 6 rss0 kB 7 rss1 kB
# 8 pss0 kB 9 pss1 kB 10 seconds to open 11 processes
IDLE_RAW="$TMP/idle.tsv"
printf '' >"$IDLE_RAW"
IDLE_OPEN_LIMIT=45
IDLE_SETTLE=2
IDLE_CLIENT="$TMP/idle-clients.py"   # a copy: its command line names $TMP (cleanup)

# "VmRSS Pss" in kB, each summed over the given pids.
rss_pss_kb() {
    local pid r=0 p=0 k
    for pid in "$@"; do
        k=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || k=0
        r=$((r + ${k:-0}))
        k=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null) || k=0
        p=$((p + ${k:-0}))
    done
    echo "$r $p"
}

# wait_line FILE PATTERN PID SECONDS: until FILE has a line matching PATTERN; fails if PID
# exits or the time is up first.
wait_line() {
    local i
    for ((i = 0; i < $4 * 10; i++)); do
        if grep -q "$2" "$1" 2>/dev/null; then return 0; fi
        if ! kill -0 "$3" 2>/dev/null; then grep -q "$2" "$1" 2>/dev/null; return; fi
        sleep 0.1
    done
    return 1
}
kv() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }   # kv LINE KEY: KEY's value in "k=v k=v"

# measure_idle I ROUND: appends a line to $IDLE_RAW.
measure_idle() {
    local i=$1 round=$2 dir="$TMP/lb$1-idle-memory" pids rss0 pss0 rss1 pss1 cpid out ready status
    out="$dir/clients-r$round.txt"
    # Warm-up, not measured: as many connections as are opened at once, one request each, then
    # closed, so that backend connections are pooled and lazy initialisation is done.
    if ! timeout -k 5 60 taskset -c "$LOAD_CPUS" python3 "$IDLE_CLIENT" --port "${PORT[$i]}" \
        --connections "$IDLE_CONCURRENCY" --concurrency "$IDLE_CONCURRENCY" --hold 0 \
        >"$dir/warmup-r$round.txt" 2>&1; then
        cat "$dir/warmup-r$round.txt" >&2
        die "idle-memory: the warm-up against ${NAME[$i]} failed"
    fi
    sleep 1
    pids=$(proc_tree "${LB_PID[$i]}")
    # shellcheck disable=SC2086
    read -r rss0 pss0 < <(rss_pss_kb $pids)
    taskset -c "$LOAD_CPUS" python3 "$IDLE_CLIENT" --port "${PORT[$i]}" --connections "$IDLE_CONNECTIONS" \
        --concurrency "$IDLE_CONCURRENCY" --open-timeout "$IDLE_OPEN_LIMIT" --hold 120 >"$out" 2>"$out.err" &
    cpid=$!
    STARTED_PIDS+=("$cpid")
    wait_line "$out" '^ready ' "$cpid" $((IDLE_OPEN_LIMIT + 10)) || true
    ready=$(grep '^ready ' "$out" || true)
    if [[ -z $ready ]]; then
        cat "$out" "$out.err" >&2
        stop_pid "$cpid"
        die "idle-memory: $IDLE_CONNECTIONS connections to ${NAME[$i]} were not open within $IDLE_OPEN_LIMIT s (try fewer, --idle-connections)"
    fi
    sleep "$IDLE_SETTLE"
    pids=$(proc_tree "${LB_PID[$i]}")
    # shellcheck disable=SC2086
    read -r rss1 pss1 < <(rss_pss_kb $pids)
    kill -USR1 "$cpid" 2>/dev/null || true
    wait_line "$out" '^status ' "$cpid" 10 || true
    status=$(grep '^status ' "$out" | tail -n 1 || true)
    stop_pid "$cpid"
    [[ -n $status ]] || die "idle-memory: the client reported no status (${NAME[$i]}, $out)"
    local open closed failed secs
    open=$(kv "$status" open)
    closed=$(($(kv "$status" closed) + $(kv "$status" unexpected)))
    failed=$(kv "$ready" failed)
    secs=$(kv "$ready" seconds)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$i" "$open" "$closed" "$failed" \
        "$rss0" "$rss1" "$pss0" "$pss1" "$secs" "$(wc -w <<<"$pids")" >>"$IDLE_RAW"
    log "  $(printf '%-12s' "${NAME[$i]}") $(awk -v o="$open" -v a="$rss0" -v b="$rss1" -v c="$pss0" -v d="$pss1" \
        -v cl="$closed" -v f="$failed" -v s="$secs" 'BEGIN {
        printf "%d idle connections (opened in %.1f s): RSS %.1f -> %.1f MiB, %.2f KiB per connection (PSS %.2f); closed early %d, failed %d",
            o, s, a / 1024, b / 1024, (o > 0 ? (b - a) / o : 0), (o > 0 ? (d - c) / o : 0), cl, f }')"
}

if ((IDLE_MEMORY)); then
    cp "$BENCH_DIR/idle-clients.py" "$IDLE_CLIENT"
    # The client and each balancer hold one descriptor per connection (checked at the start).
    if [[ $(ulimit -Sn) != unlimited ]] && (($(ulimit -Sn) < IDLE_NOFILE)); then ulimit -Sn "$IDLE_NOFILE"; fi
    for ((round = 1; round <= ROUNDS; round++)); do
        log "scenario idle-memory, round $round/$ROUNDS: $IDLE_CONNECTIONS idle keep-alive connections per balancer"
        for i in "${!KIND[@]}"; do
            start_balancer "$i" idle-memory
            measure_idle "$i" "$round"
            stop_balancer "$i"
        done
    done
fi

# ---------------------------------------------------------------- instructions per request
# instructions, tls-instructions: each balancer in turn runs under callgrind (valgrind), which
# counts the instructions it executes in user space: its own code and its libraries (libssl,
# libcrypto, libc), not the kernel's. wrk runs keep-alive requests; once its connections are
# open (and, over TLS, their handshakes done), counting is switched on for DURATION seconds,
# and the count is divided by the requests the backends answered meanwhile (nginx
# stub_status). Unlike time, the count does not drift with the machine: one round is enough.
# INSTR_RAW columns: 1 scenario 2 i 3 requests 4 instructions
INSTR_RAW="$TMP/instructions.tsv"
printf '' >"$INSTR_RAW"
INSTR_WARMUP=3

# Requests both backends have answered so far, the two asking for it included.
backend_requests() {
    local port sum=0 n
    for port in "$B1_PORT" "$B2_PORT"; do
        # shellcheck disable=SC2016  # the inner script's own expansions
        n=$(timeout 3 bash -c '
            exec 3<>/dev/tcp/127.0.0.1/'"$port"' || exit 1
            printf "GET /bench-status HTTP/1.0\r\n\r\n" >&3
            cat <&3' 2>/dev/null | awk 'f { print $3; exit } /^server accepts handled requests/ { f = 1 }')
        [[ $n =~ ^[0-9]+$ ]] || die "backend on port $port gave no request count (stub_status)"
        sum=$((sum + n))
    done
    echo "$sum"
}

measure_instructions() {
    local i=$1 scen=$2 dir="$TMP/lb$1-$2" pids pid wrk_pid before after total=0 f
    pids=$(proc_tree "${LB_PID[$i]}")
    run_wrk "$TMP/wrk-$scen-lb$i.txt" "$(wrk_target "$i" "$scen")" $((INSTR_WARMUP + DURATION + 2)) \
        "$CONNECTIONS" &
    wrk_pid=$!
    sleep "$INSTR_WARMUP"
    before=$(backend_requests)
    for pid in $pids; do callgrind_control -i on "$pid" >/dev/null; done
    sleep "$DURATION"
    for pid in $pids; do callgrind_control -i off "$pid" >/dev/null; done
    after=$(backend_requests)
    wait "$wrk_pid" || true
    for pid in $pids; do callgrind_control -d "$pid" >/dev/null; done
    for f in "$dir"/callgrind.out.*.1; do
        [[ -e $f ]] && total=$((total + $(awk '/^totals:/ { print $2; exit }' "$f")))
    done
    # The two requests asking for the count after it.
    local requests=$((after - before - 2))
    ((requests > 0 && total > 0)) || die "no request or no instruction counted for ${NAME[$i]} under callgrind ($scen)"
    printf '%s\t%s\t%s\t%s\n' "$scen" "$i" "$requests" "$total" >>"$INSTR_RAW"
    log "  $(printf '%-12s' "${NAME[$i]}") $requests requests, $((total / requests)) instructions per request"
}

for scen in "${INSTR_SCENS[@]+"${INSTR_SCENS[@]}"}"; do
    log "scenario $scen: user-space instructions per keep-alive request, under callgrind"
    for i in "${!KIND[@]}"; do
        LB_WRAP=(valgrind --tool=callgrind --instr-atstart=no "--callgrind-out-file=$TMP/lb$i-$scen/callgrind.out.%p")
        READY_SECONDS=120
        start_balancer "$i" "$scen"
        LB_WRAP=() READY_SECONDS=15
        measure_instructions "$i" "$scen"
        stop_balancer "$i"
    done
done

# ---------------------------------------------------------------- reload and dead backend
# One pingora-lb per binary over backend1, backend2 and a third, dedicated backend: timed
# reloads under light load, then backend3 is killed and the time until pingora-lb logs
# "backend 127.0.0.1:PORT becomes unhealthy" (health check every 1s, fall 1) is taken.
declare -A RELOAD_MS=() KILL_MS=() RETRIED=() BG_RESULT=()

# Light background load (wrk, 4 connections) during a phase, so that client-visible errors
# are counted. wrk only reports at its end, so it runs for an estimate of the phase's length
# and is waited for afterwards. bg_start FILE PORT SECONDS / bg_end KEY
bg_start() {
    BG_FILE=$1
    BG_SECS=$3
    BG_T0=$(now_ms)
    run_wrk "$1" "$2" "$3" 4 &
    BG_JOB=$!
    sleep 0.5
}
bg_end() {
    local key=$1 elapsed line errs
    elapsed=$(($(now_ms) - BG_T0))
    wait "$BG_JOB" 2>/dev/null || true
    BG_JOB=
    line=$(grep '^BENCH ' "$BG_FILE" || true)
    if [[ -z $line ]]; then
        BG_RESULT[$key]="n/a"
        return 0
    fi
    # "E of N" plus the kinds of errors, e.g. "2 of 300000 (read 2)"
    errs=$(echo "$line" | awk '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        n = split("connect read write status timeout", k, " ")
        for (j = 1; j <= n; j++) {
            t += v[k[j]]
            if (v[k[j]] > 0) d = d (d == "" ? "" : ", ") (k[j] == "status" ? "non-2xx/3xx" : k[j]) " " v[k[j]]
        }
        printf "%d of %d%s", t, v["requests"], (d == "" ? "" : " (" d ")") }')
    if ((elapsed > BG_SECS * 1000 + 500)); then
        errs+="; wrk covered only ${BG_SECS} s of ${elapsed} ms"
    fi
    BG_RESULT[$key]=$errs
}
now_ms() { local us=${EPOCHREALTIME/[.,]/}; echo $((us / 1000)); }
if ((RELOADS > 0 || KILLS > 0)) && [[ " ${KIND[*]} " == *" pingora "* ]]; then
    start_backend backend3 "$B3_PORT" detached; B3_PID=$BACKEND_PID
    for i in "${!KIND[@]}"; do
        [[ ${KIND[$i]} == pingora ]] || continue
        dir="$TMP/life$i"
        mkdir -p "$dir"
        render "$BENCH_DIR/pingora-lb.yaml.in" "$dir/pingora-lb.yaml" \
            "DIR=$dir" "LISTENERS=$(pingora_listeners "$LIFECYCLE_PORT")" "THREADS=$THREADS" "USER=$ME" "LOG_LEVEL=info" \
            "UPSTREAMS=$(pingora_upstreams "$B1_PORT" "$B2_PORT" "$B3_PORT")"
        taskset -c "$LB_CPUS" "${BIN[$i]}" -c "$dir/pingora-lb.yaml" >"$dir/stdout.log" 2>&1 &
        pid=$!
        STARTED_PIDS+=("$pid")
        wait_ready "$LIFECYCLE_PORT" "$pid" "$dir/error.log"
        sleep 1.5

        times=()
        if ((RELOADS > 0)); then bg_start "$dir/wrk-reloads.txt" "$LIFECYCLE_PORT" $((RELOADS * 3 + 1)); fi
        for ((k = 1; k <= RELOADS; k++)); do
            t0=$(now_ms)
            # Output to a file: the new process may keep inherited descriptors open.
            if ! taskset -c "$LB_CPUS" timeout --foreground -k 5 60 "${BIN[$i]}" reload -c "$dir/pingora-lb.yaml" \
                --pid "$pid" >"$dir/reload$k.out" 2>&1 </dev/null; then
                cat "$dir/reload$k.out" >&2
                die "reload $k of ${NAME[$i]} failed"
            fi
            t1=$(now_ms)
            out=$(cat "$dir/reload$k.out")
            newpid=$(echo "$out" | sed -n 's/.*process \([0-9][0-9]*\) serves.*/\1/p' | tail -n 1)
            [[ -n $newpid ]] || die "reload printed no new pid: $out"
            STARTED_PIDS+=("$newpid")
            pid=$newpid
            times+=($((t1 - t0)))
            log "  ${NAME[$i]}: reload $k took $((t1 - t0)) ms (now pid $pid)"
            sleep 2   # the old process drains (grace_period_seconds: 1) and exits
        done
        RELOAD_MS[$i]="${times[*]-}"
        if ((RELOADS > 0)); then bg_end "reload,$i"; fi

        kills=()
        retried=()
        if ((KILLS > 0)); then bg_start "$dir/wrk-kills.txt" "$LIFECYCLE_PORT" $((KILLS * 3 + 1)); fi
        for ((k = 1; k <= KILLS; k++)); do
            # backend3 must be in rotation: wait for its "becomes healthy" if it was down.
            if ((k > 1)); then
                start_backend backend3 "$B3_PORT" detached; B3_PID=$BACKEND_PID
                for ((w = 0; w < 100; w++)); do
                    (($(grep -c "backend 127.0.0.1:$B3_PORT becomes healthy" "$dir/error.log" || true) >= k - 1)) && break
                    sleep 0.1
                done
                sleep 0.5
            fi
            before=$(grep -c "backend 127.0.0.1:$B3_PORT becomes unhealthy" "$dir/error.log" || true)
            retries_before=$(grep -c "cannot connect to backend 127.0.0.1:$B3_PORT" "$dir/error.log" || true)
            b3pids=$(proc_tree "$B3_PID")
            t0=$(now_ms)
            # shellcheck disable=SC2086
            kill -KILL $b3pids
            found=0
            while (($(now_ms) - t0 < 15000)); do
                if (($(grep -c "backend 127.0.0.1:$B3_PORT becomes unhealthy" "$dir/error.log" || true) > before)); then
                    found=1
                    break
                fi
                sleep 0.01
            done
            t1=$(now_ms)
            ((found)) || die "${NAME[$i]} did not log backend 127.0.0.1:$B3_PORT becomes unhealthy within 15 s"
            sleep 0.2
            retries_after=$(grep -c "cannot connect to backend 127.0.0.1:$B3_PORT" "$dir/error.log" || true)
            kills+=($((t1 - t0)))
            retried+=($((retries_after - retries_before)))
            log "  ${NAME[$i]}: dead backend out of rotation after $((t1 - t0)) ms ($((retries_after - retries_before)) requests retried on another backend)"
        done
        KILL_MS[$i]="${kills[*]-}"
        RETRIED[$i]="${retried[*]-}"

        if ((KILLS > 0)); then bg_end "kill,$i"; fi
        stop_pid "$pid"
        # backend3 for the next binary
        if ! kill -0 "$B3_PID" 2>/dev/null || [[ $(http_status "$B3_PORT") != 200 ]]; then
            start_backend backend3 "$B3_PORT" detached; B3_PID=$BACKEND_PID
        fi
    done
fi

# ---------------------------------------------------------------- report
median() { # numbers on stdin -> median
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
maxof() { sort -g | tail -n 1; }

# The figures of a wrk run, as awk expressions over the raw columns:
# 1 scen 2 round 3 i 4 requests 5 duration_us 6 p50 7 p99 8 errors 9 ticks 10 busy 11 util 12 other
# shellcheck disable=SC2016  # awk expressions
declare -A FIGURE=(
    [rps]='$4 / ($5 / 1e6)'
    [p50]='$6 / 1000'
    [p99]='$7 / 1000'
    [cpu]='($4 > 0 ? $9 / hz * 1e6 / $4 : "nan")'
    [util]='$11 * 100'
    [busy]='$10 * 100'
)
# med_of SCEN I FIGURE -> the median over rounds of balancer I's figure
med_of() {
    awk -F'\t' -v s="$1" -v i="$2" -v hz="$CLK_TCK" \
        '$1 == s && $3 == i { print '"${FIGURE[$3]}"' }' "$RAW" | median
}
# paired_ratio SCEN I J FIGURE -> the median over rounds of I's figure ÷ J's in the same round.
# The balancers take turns within a round, and this VM's speed drifts more between rounds than
# within one (the same binary swings by up to ±20% from round to round): a ratio within each round
# cancels that drift, which a ratio of the two medians keeps.
paired_ratio() {
    awk -F'\t' -v s="$1" -v i="$2" -v j="$3" -v hz="$CLK_TCK" '
        $1 == s && ($3 == i || $3 == j) { v[$3 "," $2] = '"${FIGURE[$4]}"'; round[$2] = 1 }
        END { for (r in round) { a = v[i "," r]; b = v[j "," r]
            if (a != "" && b != "" && a != "nan" && b != "nan" && b + 0 != 0) print a / b } }' "$RAW" | median
}
sum_errors() { awk -F'\t' -v s="$1" -v i="$2" '$1 == s && $3 == i { e += $8 } END { print e + 0 }' "$RAW"; }

fmt() { awk -v v="$1" -v f="$2" 'BEGIN { if (v == "nan" || v == "") print "n/a"; else printf f, v }'; }
ratio() { # a b -> a/b formatted
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || a == "" || b == "" || b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'
}

HAP=-1 NGX=-1
for i in "${!KIND[@]}"; do
    if [[ ${KIND[$i]} == haproxy ]]; then HAP=$i; fi
    if [[ ${KIND[$i]} == nginx ]]; then NGX=$i; fi
done
declare -A V=()

raw_table() { # FILE: the per-run lines as a markdown table
    echo "| scenario | round | balancer | requests | req/s | p50 ms | p99 ms | CPU µs/req | balancer CPU | load CPUs busy | other on LB CPUs | errors |"
    echo "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    local s r i req dur p50 p99 err ticks busy util other
    while IFS=$'\t' read -r s r i req dur p50 p99 err ticks busy util other; do
        awk -v s="$s" -v r="$r" -v n="${NAME[$i]}" -v req="$req" -v d="$dur" -v p50="$p50" -v p99="$p99" \
            -v e="$err" -v t="$ticks" -v hz="$CLK_TCK" -v b="$busy" -v u="$util" -v o="$other" 'BEGIN {
            printf "| %s | %s | %s | %d | %.0f | %.3f | %.3f | %.2f | %.0f%% | %.0f%% | %.0f%% | %d |\n",
                s, r, n, req, req / (d / 1e6), p50 / 1000, p99 / 1000, (req > 0 ? t / hz * 1e6 / req : 0),
                u * 100, b * 100, o * 100, e }'
    done <"$1"
}

REPORT="$TMP/report.md"
{
    echo "# pingora-lb benchmark"
    echo
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), Linux $(uname -r)."
    echo
    echo "Command: \`$(if [[ -n ${PINGORA_LB:-} ]]; then printf "PINGORA_LB='%s' " "$PINGORA_LB"; fi)benches/run.sh${ORIG_ARGS[*]:+ ${ORIG_ARGS[*]}}\`"
    echo
    echo "- Balancers pinned to CPU(s) $LB_CPUS with $THREADS thread(s)/worker(s) each; backends (2 nginx instances, $BACKEND_WORKERS workers each, \`return 200 \"ok\\n\"\`) and wrk on CPU(s) $LOAD_CPUS."
    if ((${#WRK_SCENS[@]})); then
        echo "- wrk $(wrk -v 2>&1 | head -n 1 | awk '{print $2}'): \`-t$WRK_THREADS -c$CONNECTIONS -d${DURATION}s\`; $ROUNDS alternating rounds per scenario, figures are medians over the rounds."
    fi
    for j in "${!PL_NAMES[@]}"; do
        [[ ,$ONLY, == *,pingora,* ]] || break
        echo "- ${PL_NAMES[$j]}: \`${PL_BINS[$j]}\` ($("${PL_COPIES[$j]}" --version 2>/dev/null | head -n 1 || true), built ${PL_BUILT[$j]}, sha256 ${PL_SHA[$j]})"
    done
    echo "- Repository HEAD: $(git -C "$REPO_DIR" log -1 --format='%h %s' 2>/dev/null || echo unknown)$(if [[ -n $(git -C "$REPO_DIR" status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then echo " (src/ has uncommitted changes)"; fi)."
    echo "- $(haproxy -v 2>/dev/null | head -n 1 | sed 's/ - https.*//'); nginx $(nginx -v 2>&1 | sed 's/.*nginx\///')."
    if ((ANY_TLS)); then
        libs=$(for b in "${PL_COPIES[@]}" "$(command -v haproxy)" "$(command -v nginx)"; do
            ldd "$b" 2>/dev/null | awk '/libssl/ { print $3; f = 1 } END { if (!f) print "static" }'
        done | sort -u)
        if [[ $libs == /* && $libs != *$'\n'* ]]; then
            libs="all three link $libs, $(openssl version | awk '{ print $1, $2 }')"
        else
            libs="libssl: $(tr '\n' ' ' <<<"$libs")(not the same for all three), $(openssl version | awk '{ print $1, $2 }') on the system"
        fi
        echo "- TLS scenarios: $TLS_PROTOCOL, $TLS_CIPHER, $TLS_GROUP key exchange, a self-signed ECDSA P-256 certificate for $TLS_NAME made for the run (the same files for all three; $libs). wrk is held to exactly that by its OpenSSL configuration, sends 127.0.0.1 as server name and verifies no certificate; the balancers' backends stay plain HTTP."
    fi
    echo "- Load average before the run: $LOAD_AT_START."
    max_other=$(awk -F'\t' '{ if ($12 > m) m = $12 } END { printf "%.0f", m * 100 }' "$RAW")
    if ((max_other >= 5)); then
        disturbed=$(awk -F'\t' '$12 >= 0.05 && !seen[$1 " round " $2]++ { printf "%s%s round %s", sep, $1, $2; sep = ", " }' "$RAW")
        echo "- **Warning**: other processes took up to ${max_other}% of a CPU on the balancer CPUs ($disturbed); those figures are disturbed."
    fi
    if [[ -s $DISCARDED ]]; then
        echo "- $(wc -l <"$DISCARDED") run(s) disturbed by other processes were repeated (listed at the end, not counted)."
    fi
    for scen in "${WRK_SCENS[@]+"${WRK_SCENS[@]}"}"; do
        echo
        rate="req/s" per="req"
        case "$scen" in
            keepalive)
                echo "## Keep-alive clients ($CONNECTIONS connections)"
                if [[ -n ${CEILING[$scen]-} ]]; then
                    echo
                    echo "Load-side ceiling: wrk straight to one backend (no balancer, same CPUs) makes ${CEILING[$scen]} req/s."
                fi
                ;;
            keepalive-paced)
                echo "## Keep-alive clients pausing $PACE_MS ms before each request ($CONNECTIONS connections)"
                echo
                echo "Each connection waits $PACE_MS ms after a response before it sends its next request (wrk's \`delay()\`), so the"
                echo "clients set the pace, below what the balancer or the load side can do. In the keep-alive scenario's closed"
                echo "loop, whichever side is saturated queues the requests, and that queueing is in the latencies; here it is"
                echo "not. req/s differ only as far as the latencies do."
                ;;
            close)
                echo "## New connection per request (\`Connection: close\`, $CONNECTIONS concurrent)"
                ;;
            tls-keepalive)
                echo "## TLS, keep-alive clients ($CONNECTIONS connections, $TLS_PROTOCOL $TLS_CIPHER)"
                echo
                echo "One handshake per connection, then requests only: TLS record encryption and decryption on top of the proxying."
                ;;
            tls-handshake)
                rate="handshakes/s" per="handshake"
                echo "## TLS, a full handshake per request (\`Connection: close\`, $CONNECTIONS concurrent, resumption off)"
                echo
                echo "Each request is a new TCP connection with a full $TLS_PROTOCOL handshake ($TLS_GROUP, ECDSA P-256 signature):"
                echo "handshakes/s = requests/s, and the CPU per handshake includes its request. No balancer issues session"
                echo "tickets (OpenSSL \`NumTickets = 0\` for all three), so none can be resumed. The client's half of a handshake"
                echo "costs wrk about as much CPU as the balancer's half: with few load CPUs, wrk sets the pace (load CPUs busy"
                echo "near 100%, balancer CPU use below), and CPU µs/handshake is the figure to compare."
                ;;
            tls-resume)
                rate="handshakes/s" per="handshake"
                echo "## TLS, a resumed handshake per request (\`Connection: close\`, $CONNECTIONS concurrent, resumption on)"
                echo
                echo "Session tickets on (OpenSSL's default, 2 per handshake, for all three). wrk keeps each connection's TLS"
                echo "session when it reconnects, so every new connection but the first of each of its $CONNECTIONS resumes"
                echo "($TLS_PROTOCOL PSK with a $TLS_GROUP exchange: no certificate, no signature)."
                ;;
        esac
        if is_tls "$scen"; then
            seen=$(for i in "${!KIND[@]}"; do echo "${NAME[$i]}: ${TLS_SEEN[$scen,$i]-?}"; done | awk '{ printf "%s%s", sep, $0; sep = "; " }')
            echo
            echo "Checked with \`openssl s_client\` pinned like wrk: $seen."
        fi
        echo
        echo "| balancer | $rate | p50 ms | p99 ms | CPU µs/$per | balancer CPU use | peak RSS MiB | load CPUs busy | errors |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        for i in "${!KIND[@]}"; do
            rps=$(med_of "$scen" "$i" rps)
            p50=$(med_of "$scen" "$i" p50)
            p99=$(med_of "$scen" "$i" p99)
            cpu=$(med_of "$scen" "$i" cpu)
            util=$(med_of "$scen" "$i" util)
            busy=$(med_of "$scen" "$i" busy)
            rss=$(awk -v k="${RSS_KB[$scen,$i]}" 'BEGIN { print k / 1024 }')
            procs=${NPROCS[$scen,$i]}
            V[$scen,$i,rss]=$rss
            echo "| ${NAME[$i]} | $(fmt "$rps" %.0f) | $(fmt "$p50" %.3f) | $(fmt "$p99" %.3f) | $(fmt "$cpu" %.2f) | $(fmt "$util" %.0f)% | $(fmt "$rss" %.1f)$(if ((procs > 1)); then echo " ($procs proc.)"; fi) | $(fmt "$busy" %.0f)% | $(sum_errors "$scen" "$i") |"
        done
        if ((HAP >= 0 || NGX >= 0)); then
            echo
            echo "Ratios ($rate: higher is better; the others: lower is better): for $rate, latency and CPU, the median"
            echo "over the rounds of the ratio within each round; for RSS, of the peaks."
            echo
            hdr="| balancer |" sep="|---|"
            for m in "$rate" "p50" "p99" "CPU/$per" "RSS"; do
                if ((HAP >= 0)); then hdr+=" $m ÷ HAProxy |"; sep+="---:|"; fi
                if ((NGX >= 0)); then hdr+=" $m ÷ nginx |"; sep+="---:|"; fi
            done
            echo "$hdr"
            echo "$sep"
            for i in "${!KIND[@]}"; do
                row="| ${NAME[$i]} |"
                for m in rps p50 p99 cpu; do
                    if ((HAP >= 0)); then row+=" $(fmt "$(paired_ratio "$scen" "$i" "$HAP" "$m")" %.2f) |"; fi
                    if ((NGX >= 0)); then row+=" $(fmt "$(paired_ratio "$scen" "$i" "$NGX" "$m")" %.2f) |"; fi
                done
                if ((HAP >= 0)); then row+=" $(ratio "${V[$scen,$i,rss]}" "${V[$scen,$HAP,rss]}") |"; fi
                if ((NGX >= 0)); then row+=" $(ratio "${V[$scen,$i,rss]}" "${V[$scen,$NGX,rss]}") |"; fi
                echo "$row"
            done
        fi
    done
    if ((IDLE_MEMORY)); then
        echo
        echo "## Idle keep-alive connections ($IDLE_CONNECTIONS per balancer)"
        echo
        echo "Each balancer, started afresh with the configuration of the other scenarios (only its connection limit raised),"
        echo "gets one GET on each of $IDLE_CONNECTIONS keep-alive connections ($IDLE_CONCURRENCY at a time, \`benches/idle-clients.py\`);"
        echo "every connection then stays open and idle. Memory per idle connection: the growth of the balancer's resident"
        echo "memory (VmRSS, and PSS, summed over its processes) from before the connections were opened (after a warm-up"
        echo "of $IDLE_CONCURRENCY connections, closed again) to ${IDLE_SETTLE} s after the last response, divided by the connections still"
        echo "open then. Medians over $ROUNDS round(s)."
        echo
        echo "| balancer | processes | RSS before MiB | RSS with the idle connections MiB | KiB per idle connection (RSS) | KiB per idle connection (PSS) | still open | seconds to open them |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|"
        idle_med() { awk -F'\t' -v i="$1" '$2 == i { print '"$2"' }' "$IDLE_RAW" | median; }
        # shellcheck disable=SC2016  # awk expressions
        for i in "${!KIND[@]}"; do
            V[idle,$i]=$(idle_med "$i" '($3 > 0 ? ($7 - $6) / $3 : "nan")')
            echo "| ${NAME[$i]} | $(idle_med "$i" '$11') | $(fmt "$(idle_med "$i" '$6 / 1024')" %.1f) | $(fmt "$(idle_med "$i" '$7 / 1024')" %.1f) | $(fmt "${V[idle,$i]}" %.2f) | $(fmt "$(idle_med "$i" '($3 > 0 ? ($9 - $8) / $3 : "nan")')" %.2f) | $(idle_med "$i" '$3') of $IDLE_CONNECTIONS | $(fmt "$(idle_med "$i" '$10')" %.1f) |"
        done
        if ((HAP >= 0 || NGX >= 0)); then
            echo
            echo "Ratios of the memory per idle connection (RSS; lower is better)"
            echo
            hdr="| balancer |" sep="|---|"
            if ((HAP >= 0)); then hdr+=" ÷ HAProxy |"; sep+="---:|"; fi
            if ((NGX >= 0)); then hdr+=" ÷ nginx |"; sep+="---:|"; fi
            echo "$hdr"
            echo "$sep"
            for i in "${!KIND[@]}"; do
                row="| ${NAME[$i]} |"
                if ((HAP >= 0)); then row+=" $(ratio "${V[idle,$i]}" "${V[idle,$HAP]}") |"; fi
                if ((NGX >= 0)); then row+=" $(ratio "${V[idle,$i]}" "${V[idle,$NGX]}") |"; fi
                echo "$row"
            done
        fi
        early=$(awk -F'\t' '{ c += $4; f += $5 } END { print c + 0, f + 0 }' "$IDLE_RAW")
        if [[ $early != "0 0" ]]; then
            echo
            echo "**Warning**: ${early% *} connection(s) closed by a balancer before the measurement and ${early#* } failed (all rounds; see below)."
        fi
    fi
    for scen in "${INSTR_SCENS[@]+"${INSTR_SCENS[@]}"}"; do
        echo
        if is_tls "$scen"; then
            echo "## User-space instructions per TLS keep-alive request (callgrind, $TLS_PROTOCOL $TLS_CIPHER)"
        else
            echo "## User-space instructions per keep-alive request (callgrind)"
        fi
        echo
        echo "Each balancer under callgrind, with wrk's $CONNECTIONS keep-alive connections open (over TLS, their"
        echo "handshakes done): the instructions it executed in user space (its code, libssl, libcrypto, libc; not the"
        echo "kernel's) in ${DURATION} s, divided by the requests its backends answered meanwhile. The count does not drift"
        echo "with the machine (it moves by about 2% between runs, with how many requests each wake-up finds), but it is"
        echo "not time: cache misses and the kernel's share (about half of a request's CPU here) are not in it. nginx"
        echo "serves from its one process here (\`master_process off\`)."
        echo
        echo "| balancer | requests counted | instructions per request |$(
            if ((HAP >= 0)); then echo " ÷ HAProxy |"; fi)$(if ((NGX >= 0)); then echo " ÷ nginx |"; fi)"
        echo "|---|---:|---:|$(if ((HAP >= 0)); then echo "---:|"; fi)$(if ((NGX >= 0)); then echo "---:|"; fi)"
        per_request() { awk -F'\t' -v s="$scen" -v i="$1" '$1 == s && $2 == i && $3 > 0 { print $4 / $3 }' "$INSTR_RAW"; }
        for i in "${!KIND[@]}"; do
            row=$(awk -F'\t' -v s="$scen" -v i="$i" -v n="${NAME[$i]}" '$1 == s && $2 == i {
                printf "| %s | %d | %.0f |", n, $3, $4 / $3 }' "$INSTR_RAW")
            if ((HAP >= 0)); then row+=" $(ratio "$(per_request "$i")" "$(per_request "$HAP")") |"; fi
            if ((NGX >= 0)); then row+=" $(ratio "$(per_request "$i")" "$(per_request "$NGX")") |"; fi
            echo "$row"
        done
    done
    if ((${#RELOAD_MS[@]} || ${#KILL_MS[@]})); then
        echo
        echo "## pingora-lb lifecycle"
        echo
        echo "| binary | reload ms, median | reload ms, max | client errors during reloads | dead backend out after ms, median | max | requests retried elsewhere | client errors during kills |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|"
        for i in "${!KIND[@]}"; do
            [[ ${KIND[$i]} == pingora ]] || continue
            r=${RELOAD_MS[$i]-} k=${KILL_MS[$i]-}
            rmed=$( [[ -n $r ]] && tr ' ' '\n' <<<"$r" | median || echo n/a)
            rmax=$( [[ -n $r ]] && tr ' ' '\n' <<<"$r" | maxof || echo n/a)
            kmed=$( [[ -n $k ]] && tr ' ' '\n' <<<"$k" | median || echo n/a)
            kmax=$( [[ -n $k ]] && tr ' ' '\n' <<<"$k" | maxof || echo n/a)
            retr=$(tr ' ' '\n' <<<"${RETRIED[$i]-}" | awk '{ s += $1 } END { print s + 0 }')
            echo "| ${NAME[$i]} | $rmed | $rmax | ${BG_RESULT[reload,$i]-n/a} | $kmed | $kmax | $retr | ${BG_RESULT[kill,$i]-n/a} |"
        done
        echo
        echo "Reload: wall time of \`pingora-lb reload -c FILE --pid PID\` ($RELOADS times, 2 s apart), which returns once the"
        echo "new process serves. Dead backend: a third backend is killed (SIGKILL, $KILLS times); time until pingora-lb logs"
        echo "\`backend 127.0.0.1:$B3_PORT becomes unhealthy\` (TCP health check every 1 s, fall 1), so expect 0-1 s."
        echo "Requests sent to the dead backend until then are retried on another one (counted from the \"cannot connect\""
        echo "warnings). During both, wrk (4 keep-alive connections) keeps requesting; its errors are the client errors."
    fi
    echo
    echo "## Method"
    echo
    if ((${#WRK_SCENS[@]})); then
        cat <<EOF
- Each scenario starts every balancer afresh, warms it up with 1 s of wrk, then runs the rounds in turn.
- **req/s, p50, p99** come from wrk (\`--latency\`, via a \`done()\` hook in \`benches/report.lua\`). wrk times a
  request from sending it to the end of the response, so the new-connection scenarios' latencies exclude the TCP
  and TLS handshakes.
EOF
    fi
    if ((ANY_TLS)); then
        cat <<EOF
- **TLS**: each balancer terminates TLS on its listener with the same certificate and key (pingora-lb: a
  \`listeners\` entry with \`tls\`, \`min_version: "${TLS_PROTOCOL#TLSv}"\`, \`http2: false\`; HAProxy: \`bind ... ssl crt\`
  with \`ssl-min-ver $TLS_PROTOCOL ciphersuites $TLS_CIPHER\`; nginx: \`listen ... ssl\`, \`ssl_protocols $TLS_PROTOCOL\`,
  \`ssl_conf_command Ciphersuites $TLS_CIPHER\`). pingora-lb has no cipher setting (Mozilla "intermediate"), so the
  client decides: wrk, through \`OPENSSL_CONF\` (\`benches/openssl-client.cnf.in\`), offers only $TLS_PROTOCOL,
  $TLS_CIPHER and $TLS_GROUP. Session resumption is set the same way for all three, in the OpenSSL configuration
  each balancer is started with (\`benches/openssl-server.cnf.in\`, \`NumTickets\`: 0 in tls-handshake, 2 otherwise),
  since pingora-lb has no setting for it. Before a TLS scenario's rounds, \`openssl s_client\` with wrk's settings
  checks each balancer's protocol, cipher, certificate and whether a second connection resumes the first's
  session; the run stops if one differs.
EOF
    fi
    if ((${#WRK_SCENS[@]})); then
        cat <<EOF
- **CPU µs/req**: utime+stime (\`/proc/PID/stat\`, all threads) of the balancer's processes (pingora-lb: one
  process; HAProxy: one process, started with \`-db\`; nginx: master + workers) from before to after a run,
  divided by the requests wrk completed. **balancer CPU use** is that CPU time over the run's wall time
  (100% = one CPU busy); **load CPUs busy** is how busy the backend+wrk CPUs were (from \`/proc/stat\`):
  near 100% there means the load side, not the balancer, set the pace.
- **other on LB CPUs** (raw rounds): CPU time that other processes took on the balancer CPUs during a run,
  from \`/proc/stat\` minus the balancer's own; it should be about 0%. A run where it reaches 10% is repeated
  (up to $REDO times, \`--redo\`).
- **peak RSS**: VmHWM from \`/proc/PID/status\` at the end of the scenario, summed over the balancer's
  processes (for nginx master + workers; pages they share are counted once per process, so this overstates
  nginx's real footprint).
EOF
    fi
    if ((IDLE_MEMORY)); then
        cat <<EOF
- **idle-memory**: VmRSS (\`/proc/PID/status\`) and Pss (\`/proc/PID/smaps_rollup\`), summed over the balancer's
  processes, before and with the idle connections; the kernel's socket buffers are in neither. The connection
  limits are raised to the connections plus 1024 (HAProxy \`maxconn\`, with \`no strict-limits\` as it reserves two
  descriptors per connection; nginx \`worker_connections\`; pingora-lb has none), and so is the open file limit
  (\`ulimit -n\`). The idle timeouts (HAProxy \`timeout http-keep-alive\` and nginx \`keepalive_timeout\` 60 s,
  pingora-lb \`client.keepalive_timeout\` 75 s by default) outlast the measurement, which gives up when opening
  the connections takes more than $IDLE_OPEN_LIMIT s.
EOF
    fi
    cat <<EOF
- Configurations: \`benches/pingora-lb.yaml.in\`, \`benches/haproxy.cfg.in\`, \`benches/nginx-lb.conf.in\`,
  backends \`benches/backend-nginx.conf.in\`; TLS: \`benches/openssl-client.cnf.in\`, \`benches/openssl-server.cnf.in\`.
EOF
    if [[ -s $RAW || (IDLE_MEMORY -eq 1 && -s $IDLE_RAW) ]]; then
        echo
        echo "## Raw rounds"
    fi
    if [[ -s $RAW ]]; then
        echo
        raw_table "$RAW"
    fi
    if ((IDLE_MEMORY)) && [[ -s $IDLE_RAW ]]; then
        echo
        echo "Idle connections (idle-memory), each round:"
        echo
        echo "| round | balancer | still open | closed early | failed | RSS before kB | RSS after kB | KiB per connection (RSS) | KiB per connection (PSS) | seconds to open |"
        echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        while IFS=$'\t' read -r r i o c f r0 r1 p0 p1 secs _; do
            awk -v r="$r" -v n="${NAME[$i]}" -v o="$o" -v c="$c" -v f="$f" -v r0="$r0" -v r1="$r1" -v p0="$p0" -v p1="$p1" -v s="$secs" 'BEGIN {
                printf "| %s | %s | %d | %d | %d | %d | %d | %.2f | %.2f | %.1f |\n", r, n, o, c, f, r0, r1,
                    (o > 0 ? (r1 - r0) / o : 0), (o > 0 ? (p1 - p0) / o : 0), s }'
        done <"$IDLE_RAW"
    fi
    if [[ -s $DISCARDED ]]; then
        echo
        echo "Repeated because other processes disturbed them (not counted):"
        echo
        raw_table "$DISCARDED"
    fi
} >"$REPORT"

echo
cat "$REPORT"
if [[ $OUT != - ]]; then
    mkdir -p "$(dirname "$OUT")"
    cp "$REPORT" "$OUT"
    log "report written to $OUT"
fi
