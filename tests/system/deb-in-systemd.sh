#!/usr/bin/env bash
# `COND && pass ... || fail ...` is intended: pass never fails. Single-quoted ${...} are
# dpkg-query formats and awk programs.
# shellcheck disable=SC2015,SC2016
# System test: the .deb in a real systemd (Debian bookworm booted with systemd-nspawn).
#
# Usage (as root):
#   tests/system/deb-in-systemd.sh PINGORA_LB.deb [NEWER.deb]
#   tests/system/deb-in-systemd.sh --boot-only        # only boot the container and run apt-get update
#
# Without NEWER.deb, a "newer build" of the package is made from PINGORA_LB.deb: unpacked with
# dpkg-deb -R, Version bumped to <version>+systest1, repacked with dpkg-deb -b. Two more are made
# the same way: <version>+systest2 (for the upgrade with an invalid config) and, with
# SYSTEST_INCOMPATIBLE_BIN, <version>+systest2+incompatible holding that binary.
#
# The packages reach the container as apt does it for an admin: tools/apt-repository.sh
# publishes them in a repository signed with a throwaway RSA key (made here, in a temporary
# GNUPGHOME), copied into the container as /srv/pingora-lb-repo, and named in
# /etc/apt/sources.list.d/pingora-lb.sources with Signed-By: /etc/apt/keyrings/pingora-lb.gpg.
# Upgrades publish the next version there, then `apt-get update` (of that source only: a full
# one would fetch the Debian mirror again) and `apt-get install --only-upgrade pingora-lb` (not
# `apt-get upgrade`, which would also upgrade whatever Debian updated since the cached root
# was made, systemd included, in the middle of the measurements).
#
# Steps (each prints PASS:/FAIL: lines; the exit status is non-zero if anything failed):
#   1. a bookworm minbase root made with mmdebstrap, cached in $SYSTEST_CACHE
#      (default /var/cache/pingora-lb-systest) and reused across runs; the signed repository;
#   2. booted with systemd-nspawn --volatile=overlay (the cache stays clean), sharing the host's
#      network (apt needs the mirror), in a cgroup of its own; commands run with nsenter;
#   3. a copy of the repository signed with ANOTHER key is refused (apt-get update fails with
#      NO_PUBKEY, pingora-lb cannot be installed from it); from the real one, apt-get install
#      pingora-lb by name; two python3 backends (http_backend.py); the service is active,
#      balances over both backends, runs as pingora-lb with no capabilities and NoNewPrivs;
#   4. 10 x systemctl reload under load (http_load.py: keep-alive, new-connection, slow
#      in-flight and idle keep-alive clients, and a monitor of the unit's state): no failed
#      request, a new MainPID each time (also unprivileged), the unit never leaves
#      active/reloading, the old processes exit;
#   5. a broken config: reload fails, the same process keeps serving; restored, reload works;
#   6. the newer package published and upgraded to from the repository under load: no failed
#      request, reloaded and not restarted (same InvocationID and ActiveEnterTimestamp; systemd
#      logged Reloading/Reloaded and no Stopping/Started), and the new MainPID runs the
#      installed binary;
#   6b. an upgrade while /etc/pingora-lb/pingora-lb.yaml is invalid fails loudly (apt-get exits
#      non-zero, the postinst names the config problem, the package stays half-configured) and
#      the old process keeps serving (same MainPID, no failed request); with the config
#      restored, dpkg --configure -a finishes the upgrade by a reload;
#   6c. (with SYSTEST_INCOMPATIBLE_BIN) an upgrade to a binary that cannot take over by reload
#      (another handoff protocol): the postinst falls back to a restart ("restarting
#      pingora-lb.service" in apt's output), the unit is active with a new InvocationID, and
#      its MainPID runs the installed /usr/bin/pingora-lb; the requests that failed during the
#      restart are reported, not counted as a failure;
#   7. the daemon's lines in the journal; systemd-analyze verify and security (exposure score
#      printed; saved to $SYSTEST_OUT/security.txt); systemctl stop in < 10 s with a request
#      in flight (answered) and an idle keep-alive connection open; apt-get purge is clean;
#   8. (with SYSTEST_RPM and SYSTEST_RPM_NEWER) the RPM's scriptlets for real, in the same
#      container, with Debian's rpm: with Fedora's default preset policy ("disable *", in
#      /etc/systemd/system-preset/99-default-disable.preset) `rpm -i` creates the pingora-lb
#      user (%pre; the user the .deb left is deleted first) and leaves the unit disabled and
#      stopped, which is what a Fedora or RHEL admin expects of a package with a service (%post
#      only applies the preset policy); `systemctl enable --now` starts it; `rpm -U` to the
#      newer build under load reloads it (new MainPID, same InvocationID, no failed request);
#      `rpm -e` after an edit of the config stops and disables the unit and keeps the edited
#      config as /etc/pingora-lb/pingora-lb.yaml.rpmsave.
# The container is always powered off and its cgroups removed; the cache is kept.
#
# Ports: the container shares the host's network, so the packaged config's ports (listener
# 8080, backends 8081/8082, and any other such as a metrics listener) are used as they are only
# if nothing on the host listens on them. Otherwise all are mapped to free ports from 28080 on,
# and the config in the container is edited (after the install, before the tests) to use them.
#
# Environment: SYSTEST_CACHE (cache directory), SYSTEST_OUT (directory for security.txt, the
# container's journal and console), SYSTEST_MIRROR / SYSTEST_SECURITY_MIRROR
# (Debian mirrors; default: the ones configured on this host for bookworm, else deb.debian.org),
# SYSTEST_CACHE_MAX_DAYS (rebuild an older cached root; default 30),
# SYSTEST_RPM and SYSTEST_RPM_NEWER (the .rpm and a newer build of it, e.g. from
# `RPM_NEWER=1 rpm/build-and-check.sh`: step 8, skipped without them),
# SYSTEST_INCOMPATIBLE_BIN (a pingora-lb binary speaking another handoff protocol: step 6c,
# skipped without it).
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TOOLS=$(cd "$HERE/../../tools" && pwd)
UNIT=pingora-lb.service
CONF=/etc/pingora-lb/pingora-lb.yaml
# The signed apt repository: on the host (under $WORK/share, seen as /systest) and in the
# container; the key file and sources file the admin installs.
REPO_IN=/srv/pingora-lb-repo
KEYRING_IN=/etc/apt/keyrings/pingora-lb.gpg
SOURCES_IN=/etc/apt/sources.list.d/pingora-lb.sources
INCOMPATIBLE_BIN=${SYSTEST_INCOMPATIBLE_BIN:-}
RPM_FILE=${SYSTEST_RPM:-}
RPM_NEWER_FILE=${SYSTEST_RPM_NEWER:-}
SUITE=bookworm
INCLUDE=systemd,systemd-sysv,dbus,curl,python3,ca-certificates,procps
CACHE=${SYSTEST_CACHE:-/var/cache/pingora-lb-systest}
OUT=${SYSTEST_OUT:-}
RELOADS=10
STOP_LIMIT=10

T_START=$(date +%s)
FAILS=0
WORK=
PID1=
NSPAWN_PID=
CG_DIRS=()
CG_SCOPE=
PORT_MAP=()
LOAD_PID=
LOAD_NAME=

elapsed() { echo $(($(date +%s) - T_START)); }
step() { printf '\n== [%3ss] %s\n' "$(elapsed)" "$*"; }
pass() { printf 'PASS: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; FAILS=$((FAILS + 1)); }
info() { printf '      %s\n' "$*"; }
die() { fail "$*"; printf 'aborting: the remaining steps depend on this one\n'; exit 1; }
# Seconds, with milliseconds, since the epoch.
now() { date +%s.%3N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

usage() {
    echo "usage: $0 PINGORA_LB.deb [NEWER.deb] | --boot-only" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------
# Running things inside the container

# cx CMD...: run CMD in all namespaces of the container, with a clean environment, bounded by
# $CX_TIMEOUT seconds (default 60).
cx() {
    timeout --kill-after=5 "${CX_TIMEOUT:-60}" \
        nsenter -t "$PID1" -a -- /usr/bin/env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}

svc_prop() { cx systemctl show -p "$1" --value "$UNIT"; }
main_pid() { svc_prop MainPID; }
is_active() { cx systemctl is-active "$UNIT"; }

# One request through the load balancer; prints the body.
lb_get() { cx curl -sS --max-time 5 "http://127.0.0.1:$LB_PORT/"; }

# ---------------------------------------------------------------------------------------------
# Cleanup: always power the container off, remove its cgroups, keep the cache.

cleanup() {
    local rc=$? i pid d
    set +e
    trap - EXIT INT TERM HUP
    trap '' PIPE
    # Processes started with nsenter are not children of the container's systemd: its final
    # shutdown would wait for them. Stop them first.
    for pid in $LOAD_PID $(jobs -p); do
        [ "$pid" = "$NSPAWN_PID" ] && continue
        kill "$pid" 2>/dev/null
    done
    [ -n "$LOAD_PID" ] && wait "$LOAD_PID" 2>/dev/null
    if [ -n "$PID1" ] && [ -n "$OUT" ] && kill -0 "$PID1" 2>/dev/null; then
        CX_TIMEOUT=20 cx journalctl -b --no-pager >"$OUT/container-journal.txt" 2>&1
    fi
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        step "cleanup: powering the container off"
        if [ -n "$PID1" ] && kill -0 "$PID1" 2>/dev/null; then
            CX_TIMEOUT=15 cx systemctl poweroff --no-block >/dev/null 2>&1
        fi
        for i in $(seq 1 300); do
            kill -0 "$NSPAWN_PID" 2>/dev/null || break
            [ "$i" = 200 ] && kill -TERM "$NSPAWN_PID" 2>/dev/null   # after 20 s
            sleep 0.1
        done
        if kill -0 "$NSPAWN_PID" 2>/dev/null; then
            info "systemd-nspawn still running after 30 s: killing it"
            kill -KILL "$NSPAWN_PID" 2>/dev/null
        fi
        wait "$NSPAWN_PID" 2>/dev/null
        info "container stopped"
    fi
    if [ -n "$CG_SCOPE" ]; then
        timeout 20 systemctl stop "$CG_SCOPE" >/dev/null 2>&1
    fi
    # Whatever is left in our cgroups was started by this script's container: kill it, then
    # remove the cgroup directories (the container's systemd created sub-cgroups in them).
    for d in "${CG_DIRS[@]}"; do
        [ -d "$d" ] || continue
        for i in $(seq 1 50); do
            pids=$(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null)
            [ -z "$pids" ] && break
            for pid in $pids; do kill -KILL "$pid" 2>/dev/null; done
            sleep 0.1
        done
        for i in $(seq 1 50); do
            find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
            [ -d "$d" ] || break
            sleep 0.1
        done
        [ -d "$d" ] && info "could not remove cgroup $d"
    done
    if [ -n "$WORK" ] && [ -n "$OUT" ] && [ -f "$WORK/console.log" ]; then
        cp "$WORK/console.log" "$OUT/container-console.txt"
    fi
    for d in "$WORK"/gnupg-*; do
        [ -d "$d" ] && timeout 10 gpgconf --homedir "$d" --kill gpg-agent >/dev/null 2>&1
    done
    [ -n "$WORK" ] && rm -rf "$WORK"
    echo
    if [ "$FAILS" -eq 0 ] && [ "$rc" -eq 0 ]; then
        echo "RESULT: PASS (all checks passed in $(elapsed) s)"
        exit 0
    fi
    [ "$FAILS" -eq 0 ] && echo "the script stopped with exit status $rc (see the error above)"
    echo "RESULT: FAIL ($FAILS failed checks, $(elapsed) s)"
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Host prerequisites, mirror, cache

ensure_tools() {
    local missing=() pair cmd pkg
    for pair in mmdebstrap:mmdebstrap systemd-nspawn:systemd-container curl:curl nsenter:util-linux \
        dpkg-deb:dpkg flock:util-linux timeout:coreutils python3:python3 pgrep:procps \
        apt-ftparchive:apt-utils gpg:gnupg; do
        cmd=${pair%%:*}
        pkg=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
    if [ ${#missing[@]} -gt 0 ]; then
        info "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        timeout 300 apt-get update -q >/dev/null &&
            timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
            die "could not install ${missing[*]}"
    fi
    pass "host tools present (mmdebstrap, systemd-nspawn, nsenter, dpkg-deb, curl, python3, apt-ftparchive, gpg)"
}

# The first http(s) URI in this host's apt sources that serves suite $1 (deb822 or one-line).
host_mirror() {
    python3 - "$1" <<'EOF'
import glob, re, sys
want = sys.argv[1]
files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")) \
    + sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
for path in files:
    try:
        text = open(path).read()
    except OSError:
        continue
    if path.endswith(".sources"):
        for para in re.split(r"\n\s*\n", text):
            fields = {}
            for line in para.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.split()
            if fields.get("enabled", ["yes"])[0].lower() == "no":
                continue
            if "deb" in fields.get("types", []) and want in fields.get("suites", []):
                for uri in fields.get("uris", []):
                    if uri.startswith(("http://", "https://")):
                        print(uri.rstrip("/"))
                        sys.exit(0)
    else:
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if not words or words[0] != "deb":
                continue
            words = words[1:]
            if words and words[0].startswith("["):
                while words and not words[0].endswith("]"):
                    words = words[1:]
                words = words[1:]
            if len(words) >= 2 and words[1] == want and words[0].startswith(("http://", "https://")):
                print(words[0].rstrip("/"))
                sys.exit(0)
sys.exit(1)
EOF
}

prepare_root() {
    local mirror sec stamp t
    mirror=${SYSTEST_MIRROR:-$(host_mirror "$SUITE" || echo http://deb.debian.org/debian)}
    sec=${SYSTEST_SECURITY_MIRROR:-$(host_mirror "$SUITE-security" || echo http://deb.debian.org/debian-security)}
    ROOT=$CACHE/$SUITE-minbase
    stamp="suite=$SUITE variant=minbase include=$INCLUDE mirror=$mirror security=$sec"
    mkdir -p "$CACHE" || die "cannot create $CACHE"
    exec 9>"$CACHE/.lock"
    flock -w 900 9 || die "another run holds $CACHE/.lock"
    if [ -d "$ROOT" ] && [ "$(cat "$ROOT.stamp" 2>/dev/null)" = "$stamp" ] &&
        [ -z "$(find "$ROOT.stamp" -mtime +"${SYSTEST_CACHE_MAX_DAYS:-30}")" ]; then
        pass "cached $SUITE root reused: $ROOT"
    else
        info "mmdebstrap $SUITE from $mirror (security: $sec) into $ROOT"
        rm -rf "$ROOT.new"
        t=$(now)
        if ! timeout 900 mmdebstrap --quiet --variant=minbase --include="$INCLUDE" "$SUITE" "$ROOT.new" \
            "deb $mirror $SUITE main" "deb $mirror $SUITE-updates main" \
            "deb $sec $SUITE-security main" >"$CACHE/mmdebstrap.log" 2>&1; then
            tail -n 30 "$CACHE/mmdebstrap.log"
            rm -rf "$ROOT.new"
            die "mmdebstrap failed (log: $CACHE/mmdebstrap.log)"
        fi
        rm -rf "$ROOT" "$ROOT.stamp"
        mv "$ROOT.new" "$ROOT"
        echo "$stamp" >"$ROOT.stamp"
        pass "$SUITE root created with mmdebstrap in $(since "$t") s: $ROOT"
    fi
    # Keep a shared lock while the container uses the root: another run may boot it too, but
    # must not rebuild it under us.
    flock -s -w 900 9 || die "cannot downgrade the lock on $CACHE/.lock"
}

# ---------------------------------------------------------------------------------------------
# Packages

# repack_deb SRC VERSION [BINARY]: SRC unpacked with dpkg-deb -R, its Version set to VERSION
# (and usr/bin/pingora-lb replaced by BINARY, md5sums updated), packed again into $WORK/debs/;
# prints the new file's path.
repack_deb() {
    local src=$1 ver=$2 bin=${3:-} tree=$WORK/repack-tree arch out sum
    arch=$(dpkg-deb -f "$src" Architecture)
    rm -rf "$tree"
    dpkg-deb -R "$src" "$tree" || return 1
    sed -i "s/^Version: .*/Version: $ver/" "$tree/DEBIAN/control"
    if [ -n "$bin" ]; then
        install -m 0755 "$bin" "$tree/usr/bin/pingora-lb" || return 1
        sum=$(cd "$tree" && md5sum usr/bin/pingora-lb | awk '{ print $1 }')
        awk -v s="$sum" '$2 == "usr/bin/pingora-lb" { print s "  " $2; next } { print }' \
            "$tree/DEBIAN/md5sums" >"$tree/md5sums" && mv "$tree/md5sums" "$tree/DEBIAN/md5sums"
    fi
    mkdir -p "$WORK/debs"
    out=$WORK/debs/pingora-lb_${ver//:/%3a}_${arch}.deb
    # gzip -1: a valid .deb, and fast to pack even with a large (debug) binary inside.
    dpkg-deb -Zgzip -z1 -b "$tree" "$out" >/dev/null || return 1
    rm -rf "$tree"
    echo "$out"
}

prepare_debs() {
    DEB=$(readlink -f "$1")
    [ -f "$DEB" ] || die "no such package: $1"
    [ "$(dpkg-deb -f "$DEB" Package)" = pingora-lb ] || die "$DEB is not the pingora-lb package"
    VER=$(dpkg-deb -f "$DEB" Version)
    if [ -n "${2:-}" ]; then
        NEWER=$(readlink -f "$2")
        [ -f "$NEWER" ] || die "no such package: $2"
        NEWVER=$(dpkg-deb -f "$NEWER" Version)
        info "newer package given: $NEWER"
    else
        NEWVER=$VER+systest1
        NEWER=$(repack_deb "$DEB" "$NEWVER") || die "cannot make the newer package $NEWVER"
        info "newer build made by bumping the version: $(basename "$NEWER")"
    fi
    dpkg --compare-versions "$NEWVER" gt "$VER" || die "$NEWVER is not newer than $VER"
    # The next one, for the upgrade with an invalid config (6b).
    NEXTVER=${NEWVER%+systest1}+systest2
    NEXT=$(repack_deb "$NEWER" "$NEXTVER") || die "cannot make the package $NEXTVER"
    dpkg --compare-versions "$NEXTVER" gt "$NEWVER" || die "$NEXTVER is not newer than $NEWVER"
    INCVER=
    if [ -n "$INCOMPATIBLE_BIN" ]; then
        [ -x "$INCOMPATIBLE_BIN" ] || die "SYSTEST_INCOMPATIBLE_BIN=$INCOMPATIBLE_BIN is not an executable file"
        INCVER=$NEXTVER+incompatible
        INC=$(repack_deb "$NEXT" "$INCVER" "$INCOMPATIBLE_BIN") || die "cannot make the package $INCVER"
        info "incompatible build: $(basename "$INC") with $INCOMPATIBLE_BIN"
    fi
    pass "packages: pingora-lb $VER, then $NEWVER, $NEXTVER${INCVER:+, $INCVER}"
}

# The RPMs for step 8, if given, into the directory the container sees.
prepare_rpms() {
    RPM_IN=
    RPM_NEWER_IN=
    [ -n "$RPM_FILE" ] || [ -n "$RPM_NEWER_FILE" ] || return 0
    [ -f "$RPM_FILE" ] || die "SYSTEST_RPM=$RPM_FILE: no such file"
    [ -f "$RPM_NEWER_FILE" ] || die "SYSTEST_RPM_NEWER=${RPM_NEWER_FILE:-(not set)}: no such file"
    [ "$(basename "$RPM_FILE")" != "$(basename "$RPM_NEWER_FILE")" ] ||
        die "SYSTEST_RPM and SYSTEST_RPM_NEWER have the same file name: $(basename "$RPM_FILE")"
    mkdir -p "$WORK/share/rpm"
    cp "$RPM_FILE" "$RPM_NEWER_FILE" "$WORK/share/rpm/" || die "cannot copy the RPMs"
    RPM_IN=/systest/rpm/$(basename "$RPM_FILE")
    RPM_NEWER_IN=/systest/rpm/$(basename "$RPM_NEWER_FILE")
    pass "RPMs for step 8: $(basename "$RPM_FILE"), then $(basename "$RPM_NEWER_FILE")"
}

# ---------------------------------------------------------------------------------------------
# The signed apt repository

# mkkey NAME: a throwaway RSA 3072 signing key without a passphrase in $WORK/gnupg-NAME; prints
# its fingerprint.
mkkey() {
    local home=$WORK/gnupg-$1
    mkdir -m 0700 "$home" || return 1
    timeout 120 gpg --homedir "$home" --batch --quiet --no-tty --passphrase '' \
        --quick-generate-key "pingora-lb system test $1 <$1@pingora-lb.invalid>" rsa3072 sign 1d \
        >/dev/null 2>&1 || return 1
    gpg --homedir "$home" --batch --with-colons --list-secret-keys 2>/dev/null |
        awk -F: '$1 == "fpr" { print $10; exit }'
}

# publish DEB...: tools/apt-repository.sh adds the packages to the repository (signed with
# the publisher's key A), which is then copied into the container as $REPO_IN.
publish() {
    local t
    t=$(now)
    if ! timeout 120 "$TOOLS/apt-repository.sh" --gpg-home "$WORK/gnupg-a" --key "$KEY_A" \
        --url "file:$REPO_IN" "$WORK/share/apt-repo" "$@" >"$WORK/publish.log" 2>&1; then
        cat "$WORK/publish.log"
        return 1
    fi
    if [ -n "$PID1" ]; then copy_repository_in "" || return 1; fi
    info "published in $(since "$t") s: $(grep -E '^added' "$WORK/publish.log" | xargs)"
}

# copy_repository_in SUFFIX: /systest/apt-repo$SUFFIX (the host's) to $REPO_IN$SUFFIX in the
# container, replacing what was there.
copy_repository_in() {
    local to=$REPO_IN$1
    cx sh -c "rm -rf $to.new && cp -a /systest/apt-repo$1 $to.new && rm -rf $to && mv $to.new $to"
}

# apt_update_source FILE: apt-get update of the sources in FILE (in the container) only.
apt_update_source() {
    CX_TIMEOUT=120 cx apt-get update -q -o Dir::Etc::SourceList="$1" -o Dir::Etc::SourceParts=- \
        -o APT::Get::List-Cleanup=0
}

# apt_upgrade LOG: apt-get update of the pingora-lb source, then apt-get install --only-upgrade
# pingora-lb (keeping a changed config); the output in LOG; returns apt-get's exit status.
apt_upgrade() {
    local rc
    apt_update_source "$SOURCES_IN" >"$1" 2>&1 || { cat "$1"; return 1; }
    CX_TIMEOUT=300 cx apt-get install -y -q --only-upgrade -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold pingora-lb >>"$1" 2>&1
    rc=$?
    grep -E '^(Unpacking|Setting up)|pingora-lb:|[Ww]arning|[Ee]rror|^E:|^W:' "$1" |
        while IFS= read -r l; do info "apt: ${l:0:200}"; done
    return "$rc"
}

# The repository with the first package, signed with a throwaway key A (the publisher's), and
# a copy of it signed with another key B (for the refusal check).
prepare_repository() {
    local t
    t=$(now)
    KEY_A=$(mkkey a) && [ -n "$KEY_A" ] || die "cannot make a throwaway gpg key"
    KEY_B=$(mkkey b) && [ -n "$KEY_B" ] || die "cannot make a second throwaway gpg key"
    publish "$DEB" || die "tools/apt-repository.sh failed"
    cp -a "$WORK/share/apt-repo" "$WORK/share/apt-repo-otherkey"
    timeout 120 "$TOOLS/apt-repository.sh" --gpg-home "$WORK/gnupg-b" --key "$KEY_B" \
        --url "file:$REPO_IN-otherkey" "$WORK/share/apt-repo-otherkey" >"$WORK/publish-b.log" 2>&1 ||
        { cat "$WORK/publish-b.log"; die "tools/apt-repository.sh failed with key B"; }
    pass "signed apt repository with $VER made in $(since "$t") s (key A $KEY_A; a copy signed with key B $KEY_B)"
}

# ---------------------------------------------------------------------------------------------
# Ports

# Is anything listening on TCP port $1 in this network namespace (shared with the container)?
port_busy() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# The ports in the packaged config: line 1 the listeners', line 2 the upstreams' (host
# 127.0.0.1 only), line 3 any other (e.g. a metrics listener).
config_ports() {
    python3 - "$1" <<'EOF2'
import re, sys
found = {"listeners": [], "upstreams": [], "other": []}
bad_upstream = False
section = None
for line in open(sys.argv[1]):
    code = line.split("#", 1)[0].rstrip()
    m = re.match(r"([A-Za-z_]+):", code)
    if m:
        section = m.group(1)
    for host, port in re.findall(r"(\d+\.\d+\.\d+\.\d+|\[[0-9a-fA-F:.]*\]|localhost):(\d+)", code):
        if section == "upstreams" and host != "127.0.0.1":
            bad_upstream = True
        found[section if section in ("listeners", "upstreams") else "other"].append(port)
print(" ".join(found["listeners"]))
print(" ".join(found["upstreams"]) if not bad_upstream else "not-loopback")
print(" ".join(found["other"]))
EOF2
}

# Use the packaged config as it is if none of its ports is taken on the host; otherwise map
# them all to free ports (PORT_MAP, applied to the config after the install).
choose_ports() {
    local conf=$WORK/packaged.yaml listeners upstreams others all busy=() base p ok lp=() up=() op=()
    dpkg-deb --fsys-tarfile "$DEB" | tar -xO ."$CONF" >"$conf" 2>/dev/null && [ -s "$conf" ] ||
        die "no $CONF in $DEB"
    { read -r listeners; read -r upstreams; read -r others; } < <(config_ports "$conf")
    read -r -a lp <<<"$listeners"
    read -r -a up <<<"$upstreams"
    if [ ${#lp[@]} != 1 ] || [ ${#up[@]} != 2 ] || [ "$upstreams" = not-loopback ]; then
        die "the packaged config has listeners '$listeners' and upstreams '$upstreams': this test expects one listener and two upstreams on 127.0.0.1"
    fi
    all=("${lp[@]}" "${up[@]}")
    read -r -a op <<<"$others"
    all+=("${op[@]}")
    for p in "${all[@]}"; do port_busy "$p" && busy+=("$p"); done
    PORT_MAP=()
    if [ ${#busy[@]} = 0 ]; then
        LB_PORT=${lp[0]} B1_PORT=${up[0]} B2_PORT=${up[1]}
        pass "the packaged config's ports (${all[*]}) are free on the host: it is used as is"
        return
    fi
    info "ports of the packaged config (${all[*]}) in use on the host: ${busy[*]}"
    # Consecutive free ports below the ephemeral range, away from the usual development ports.
    for base in $(seq 28080 10 28980); do
        ok=1
        for i in "${!all[@]}"; do port_busy $((base + i)) && ok=0; done
        [ "$ok" = 1 ] || continue
        for i in "${!all[@]}"; do PORT_MAP+=("${all[$i]}:$((base + i))"); done
        LB_PORT=$base B1_PORT=$((base + 1)) B2_PORT=$((base + 2))
        pass "free ports chosen: ${PORT_MAP[*]} (old:new; the config is edited after the install)"
        return
    done
    die "no ${#all[@]} free consecutive ports found in 28080-28989"
}

# ---------------------------------------------------------------------------------------------
# The container

boot_container() {
    local name=pingora-lb-systest-$$ h c i state t
    local args=(--quiet --register=no --keep-unit --console=read-only --volatile=overlay
        --machine=plb-systest --bind-ro="$WORK/share:/systest" --bind="$WORK/rw:/systest-rw"
        -D "$ROOT" -b)
    t=$(now)
    if [ -d /run/systemd/system ]; then
        # The host runs systemd: a delegated scope is the container's cgroup.
        CG_SCOPE=$name.scope
        systemd-run --quiet --scope --unit="$name" --property=Delegate=yes -- \
            systemd-nspawn "${args[@]}" >"$WORK/console.log" 2>&1 </dev/null &
        NSPAWN_PID=$!
    else
        # No systemd on the host (this machine kind): give nspawn a cgroup of its own in
        # every hierarchy systemd uses (cgroup v2 alone, or v1 name=systemd + v2 "unified").
        if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
            CG_DIRS=("/sys/fs/cgroup/$name")
        else
            for h in unified systemd; do
                [ -d /sys/fs/cgroup/$h ] && CG_DIRS+=("/sys/fs/cgroup/$h/$name")
            done
        fi
        for c in "${CG_DIRS[@]}"; do
            mkdir "$c" || die "cannot create cgroup $c"
        done
        (
            for c in "${CG_DIRS[@]}"; do echo "$BASHPID" >"$c/cgroup.procs" || exit 1; done
            exec systemd-nspawn "${args[@]}"
        ) >"$WORK/console.log" 2>&1 </dev/null &
        NSPAWN_PID=$!
    fi
    # The container's PID 1: the child of systemd-nspawn running systemd (systemd-run --scope
    # execs nspawn in its own process, so $! is nspawn's pid in both cases).
    for i in $(seq 1 300); do
        kill -0 "$NSPAWN_PID" 2>/dev/null || break
        for c in $(pgrep -P "$NSPAWN_PID" 2>/dev/null); do
            if [ "$(cat "/proc/$c/comm" 2>/dev/null)" = systemd ]; then PID1=$c; fi
        done
        [ -n "$PID1" ] && [ -S "/proc/$PID1/root/run/systemd/private" ] && break
        sleep 0.1
    done
    if [ -z "$PID1" ] || [ ! -S "/proc/$PID1/root/run/systemd/private" ]; then
        tail -n 30 "$WORK/console.log"
        die "the container did not boot (no systemd PID 1 with /run/systemd/private within 30 s)"
    fi
    state=$(CX_TIMEOUT=90 cx systemctl is-system-running --wait 2>&1)
    case $state in
    running) pass "container booted in $(since "$t") s (PID 1 = host pid $PID1, system $state)" ;;
    degraded)
        pass "container booted in $(since "$t") s (PID 1 = host pid $PID1, system $state)"
        info "failed units: $(cx systemctl list-units --failed --plain --no-legend | awk '{print $1}' | xargs)"
        ;;
    *)
        tail -n 30 "$WORK/console.log"
        die "container system state: '$state'"
        ;;
    esac
    info "$(cx systemctl --version | head -n 1)"
}

# ---------------------------------------------------------------------------------------------
# Load

# start_load NAME MAX_SECONDS: the bounded load script inside the container, in the background.
start_load() {
    local i
    LOAD_NAME=$1
    rm -f "$WORK/rw/$1".*
    timeout --kill-after=5 $(($2 + 30)) nsenter -t "$PID1" -a -- /usr/bin/env -i \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        python3 /systest/http_load.py --port "$LB_PORT" --duration "$2" --unit "$UNIT" \
        --stop-file "/systest-rw/$1.stop" --out "/systest-rw/$1.json" \
        --keepalive 2 --fresh 2 --slow 1 --idle 1 --pause 0.01 >"$WORK/$1.load.log" 2>&1 &
    LOAD_PID=$!
    for i in $(seq 1 150); do
        [ -f "$WORK/rw/$1.json.started" ] && return 0
        kill -0 "$LOAD_PID" 2>/dev/null || break
        sleep 0.1
    done
    fail "load '$1': no successful request within 15 s"
    cat "$WORK/$1.load.log"
    return 1
}

# stop_load [report]: stop the load, print its summary, PASS if nothing failed. With "report",
# failed requests and unit states are only reported (for a restart, which drops connections).
# Sets LOAD_FAILED and LOAD_TOTAL (requests failed, and all requests made) and LOAD_FIRST_FAIL
# (when the first request failed, in seconds since the load began; - if none did).
stop_load() {
    local name=$LOAD_NAME mode=${1:-} summary
    LOAD_FAILED=
    LOAD_TOTAL=
    LOAD_FIRST_FAIL=
    touch "$WORK/rw/$name.stop"
    wait "$LOAD_PID"
    LOAD_PID=
    if [ ! -f "$WORK/rw/$name.json" ]; then
        fail "load '$name': no summary"
        cat "$WORK/$name.load.log"
        return 1
    fi
    read -r LOAD_FAILED LOAD_TOTAL LOAD_FIRST_FAIL < <(python3 -c '
import json, sys
s = json.load(open(sys.argv[1]))
t = [f["t"] for f in s["failures"]]
print(s["failed"], s["failed"] + s["ok"], "%.2f" % min(t) if t else "-")' "$WORK/rw/$name.json")
    summary=$(python3 - "$WORK/rw/$name.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
ok = s["failed"] == 0 and not s["bad_states"] and s["stopped_by"] == "stop-file"
print("ok" if ok else "bad")
backends = ", ".join("%s: %d" % kv for kv in sorted(s["backends"].items()))
print("%d requests ok (%d keep-alive, %d new-connection, %d slow, %d idle keep-alive of which %d retried"
      " after an idle close), %d failed in %.1f s; %s; %d MainPIDs seen"
      % (s["ok"], s["keepalive_ok"], s["fresh_ok"], s["slow_ok"], s["idle_ok"], s["idle_retried"],
         s["failed"], s["seconds"], backends, len(s["main_pids"])))
if s.get("idle_closes"):
    print("idle keep-alive connections closed by the server (retried): %s"
          % ", ".join("%s: %d" % kv for kv in sorted(s["idle_closes"].items())))
if s["stopped_by"] != "stop-file":
    print("the load ran into its own time limit before the phase ended")
for f in s["failures"][:10]:
    print("failed request at %.3f s (%s): %s" % (f["t"], f["client"], f["error"]))
for b in s["bad_states"][:10]:
    print("unit state at %.3f s: %s/%s" % (b["t"], b["active"], b["sub"]))
EOF
    )
    if [ "$(head -n 1 <<<"$summary")" = ok ]; then
        pass "load '$name': $(sed -n 2p <<<"$summary")"
        tail -n +3 <<<"$summary" | while IFS= read -r l; do info "$l"; done
    elif [ "$mode" = report ]; then
        info "load '$name' (reported, not checked): $(sed -n 2p <<<"$summary")"
        tail -n +3 <<<"$summary" | while IFS= read -r l; do info "$l"; done
    else
        fail "load '$name': $(sed -n 2p <<<"$summary")"
        tail -n +3 <<<"$summary" | while IFS= read -r l; do info "$l"; done
        return 1
    fi
}

# ---------------------------------------------------------------------------------------------
# Checks on the service

# check_privs PID LABEL [quiet]: the process runs as pingora-lb, with no capabilities,
# NoNewPrivs 1 (with "quiet", only a failure is printed).
check_privs() {
    local pid=$1 label=$2 quiet=${3:-} status uid want_uid bad=
    status=$(cx cat "/proc/$pid/status") || { fail "$label: cannot read /proc/$pid/status"; return 1; }
    want_uid=$(cx id -u pingora-lb)
    uid=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' <<<"$status")
    [ "$uid" = "$want_uid $want_uid $want_uid $want_uid" ] || bad+=" Uid=($uid), want $want_uid;"
    for f in CapEff CapPrm CapAmb; do
        [ "$(awk -v f="$f:" '$1 == f { print $2 }' <<<"$status")" = 0000000000000000 ] || bad+=" $f not zero;"
    done
    [ "$(awk '$1 == "NoNewPrivs:" { print $2 }' <<<"$status")" = 1 ] || bad+=" NoNewPrivs not 1;"
    if [ -z "$bad" ]; then
        [ -n "$quiet" ] && return 0
        pass "$label: pid $pid runs as pingora-lb (uid $want_uid), CapEff/CapPrm/CapAmb 0, NoNewPrivs 1"
    else
        fail "$label: pid $pid:$bad"
        grep -E '^(Uid|Gid|Cap|NoNewPrivs)' <<<"$status" | while IFS= read -r l; do info "$l"; done
        return 1
    fi
}

# wait_balanced: requests through the listener reach both backends (bounded: 20 s).
wait_balanced() {
    local i seen body
    for i in $(seq 1 40); do
        seen=
        for _ in 1 2 3 4; do
            body=$(lb_get 2>/dev/null) && seen+=" $body"
        done
        if [[ $seen == *backend-1* && $seen == *backend-2* ]]; then
            pass "requests through 127.0.0.1:$LB_PORT succeed and reach both backends (round robin:$seen)"
            return 0
        fi
        sleep 0.5
    done
    fail "requests through 127.0.0.1:$LB_PORT: got '$seen' after 20 s (want backend-1 and backend-2)"
    return 1
}

# apply_port_map: the packaged config in the container edited to use the test ports, if the
# packaged ones are taken on the host (see choose_ports).
apply_port_map() {
    local sed_args=() m new_ports
    [ ${#PORT_MAP[@]} = 0 ] && return 0
    for m in "${PORT_MAP[@]}"; do
        sed_args+=(-e "s/([]0-9a-zA-Z.:]):${m%%:*}([^0-9]|\$)/\1:${m#*:}\2/g")
    done
    cx sed -i -E "${sed_args[@]}" "$CONF"
    new_ports=$(printf '%s|' "${PORT_MAP[@]#*:}")
    info "config edited: $(cx grep -v '^ *#' "$CONF" | grep -E ":(${new_ports%|})([^0-9]|$)" | xargs)"
    cx pingora-lb -t -c "$CONF" >/dev/null 2>&1 || fail "edited config does not pass pingora-lb -t"
}

# A cursor at the end of the container's journal.
journal_cursor() { cx journalctl -n 1 -o export --no-pager | sed -n 's/^__CURSOR=//p'; }

# ---------------------------------------------------------------------------------------------

[ $# -ge 1 ] && [ $# -le 2 ] || usage
BOOT_ONLY=0
[ "$1" = --boot-only ] && BOOT_ONLY=1
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
for f in http_load.py http_backend.py; do
    [ -f "$HERE/$f" ] || { echo "missing $HERE/$f" >&2; exit 2; }
done
[ -z "$OUT" ] || mkdir -p "$OUT" || { echo "cannot create $OUT" >&2; exit 2; }

trap cleanup EXIT
# On a signal, still clean up. A closed output pipe (SIGPIPE) must not stop the cleanup: from
# then on, output goes nowhere.
trap 'echo "interrupted"; FAILS=$((FAILS + 1)); exit 1' INT TERM HUP
trap 'exec >/dev/null 2>&1; FAILS=$((FAILS + 1)); exit 1' PIPE

WORK=$(mktemp -d /tmp/pingora-lb-systest.XXXXXX)
mkdir -p "$WORK/share" "$WORK/rw"
cp "$HERE/http_load.py" "$HERE/http_backend.py" "$WORK/share/"

step "1. host prerequisites, packages, Debian $SUITE root (cache: $CACHE)"
ensure_tools
if [ "$BOOT_ONLY" = 0 ]; then
    [ -x "$TOOLS/apt-repository.sh" ] || die "no $TOOLS/apt-repository.sh"
    prepare_debs "$@"
    prepare_rpms
    prepare_repository
fi
prepare_root

step "2. boot the container with systemd-nspawn"
[ "$BOOT_ONLY" = 1 ] || choose_ports
boot_container
t=$(now)
if CX_TIMEOUT=300 cx apt-get update -q >"$WORK/apt-update.log" 2>&1 ||
    { sleep 5; CX_TIMEOUT=300 cx apt-get update -q >"$WORK/apt-update.log" 2>&1; }; then
    pass "apt-get update in the container ($(since "$t") s)"
else
    tail -n 20 "$WORK/apt-update.log"
    die "apt-get update in the container failed"
fi
if [ "$BOOT_ONLY" = 1 ]; then
    info "$(cx sh -c 'cat /etc/debian_version; uname -r; ps -e | wc -l')"
    exit 0
fi

step "3. install pingora-lb $VER by name from the signed repository"
# Two backends, each answering with its own name (/slow after 2 s), as transient units of the
# container's systemd.
for i in 1 2; do
    port_var=B${i}_PORT
    cx systemd-run --quiet --unit="systest-backend-$i" \
        python3 /systest/http_backend.py "backend-$i" "${!port_var}" || die "cannot start backend $i"
done
backends_up=0
for i in $(seq 1 50); do
    [ "$(cx curl -sS --max-time 2 "http://127.0.0.1:$B1_PORT/" 2>/dev/null)" = backend-1 ] &&
        [ "$(cx curl -sS --max-time 2 "http://127.0.0.1:$B2_PORT/" 2>/dev/null)" = backend-2 ] && backends_up=1 && break
    sleep 0.2
done
[ "$backends_up" = 1 ] && pass "backends serve on 127.0.0.1:$B1_PORT and 127.0.0.1:$B2_PORT" ||
    die "the backends do not answer"

# What the admin installs: the publisher's key, where Signed-By names it.
cx install -d -m 0755 /etc/apt/keyrings &&
    cx install -m 0644 /systest/apt-repo/pingora-lb.gpg "$KEYRING_IN" || die "cannot install $KEYRING_IN"
# First a copy of the repository signed with another key, under a sources file that names the
# publisher's key: apt must refuse it.
other_sources=/etc/apt/sources.list.d/pingora-lb-otherkey.sources
copy_repository_in -otherkey || die "cannot copy the repository signed with key B into the container"
cx sh -c "sed 's|^URIs: .*|URIs: file:$REPO_IN-otherkey|' /systest/apt-repo/pingora-lb.sources >$other_sources"
t=$(now)
if apt_update_source "$other_sources" >"$WORK/apt-update-otherkey.log" 2>&1; then rc=0; else rc=$?; fi
why=$(grep -m 1 -E 'NO_PUBKEY|[Ss]ignature|not signed' "$WORK/apt-update-otherkey.log" | cut -c 1-200)
if [ "$rc" != 0 ] && [ -n "$why" ]; then
    pass "apt-get update refuses the copy signed with key B (exit $rc in $(since "$t") s): $why"
else
    tail -n 20 "$WORK/apt-update-otherkey.log"
    fail "apt-get update of the copy signed with key B: exit $rc, no NO_PUBKEY or signature error"
fi
if CX_TIMEOUT=60 cx apt-get install -s -q pingora-lb >"$WORK/apt-install-otherkey.log" 2>&1; then
    fail "pingora-lb can be installed from the copy signed with key B: $(grep -m 1 '^Inst' "$WORK/apt-install-otherkey.log")"
else
    pass "pingora-lb cannot be installed from it: $(grep -m 1 -E '^E:' "$WORK/apt-install-otherkey.log")"
fi
cx rm -rf "$other_sources" "$REPO_IN-otherkey"

# Then the repository as published.
copy_repository_in "" || die "cannot copy the repository into the container"
cx install -m 0644 /systest/apt-repo/pingora-lb.sources "$SOURCES_IN" || die "cannot install $SOURCES_IN"
info "$SOURCES_IN: $(cx grep -v '^#' "$SOURCES_IN" | xargs)"
t=$(now)
if apt_update_source "$SOURCES_IN" >"$WORK/apt-update-repo.log" 2>&1 &&
    ! grep -q -E '^(W|E):' "$WORK/apt-update-repo.log"; then
    pass "apt-get update of $SOURCES_IN: signature by key A accepted ($(since "$t") s)"
else
    tail -n 20 "$WORK/apt-update-repo.log"
    die "apt-get update of $SOURCES_IN failed or warned"
fi
candidate=$(cx apt-cache policy pingora-lb | awk '$1 == "Candidate:" { print $2 }')
[ "$candidate" = "$VER" ] && pass "apt-cache policy pingora-lb: candidate $candidate" ||
    die "apt-cache policy pingora-lb: candidate '$candidate', want $VER"
t=$(now)
if CX_TIMEOUT=300 cx apt-get install -y -q pingora-lb >"$WORK/apt-install.log" 2>&1; then
    pass "apt-get install pingora-lb ($(since "$t") s, dependencies from the mirror)"
else
    tail -n 30 "$WORK/apt-install.log"
    die "apt-get install pingora-lb failed"
fi
origin=$(cx apt-cache policy pingora-lb | awk '/^ *\*\*\*/ { getline; print $2, $3; exit }')
[ "$origin" = "file:$REPO_IN stable/main" ] && pass "installed from the repository: $origin" ||
    fail "installed version's origin: '$origin', want file:$REPO_IN stable/main"
status=$(cx dpkg-query -W -f='${Status} ${Version}' pingora-lb)
[ "$status" = "install ok installed $VER" ] && pass "dpkg: $status" || fail "dpkg status: '$status'"
[ "$(cx systemctl is-enabled "$UNIT")" = enabled ] && pass "$UNIT is enabled" || fail "$UNIT is not enabled"
cx getent passwd pingora-lb >/dev/null && pass "system user pingora-lb exists: $(cx getent passwd pingora-lb)" ||
    fail "no pingora-lb user"

# The package starts the service; wait (bounded) for the start job to settle.
for i in $(seq 1 50); do
    state=$(is_active)
    [ "$state" = activating ] || break
    sleep 0.2
done
if [ ${#PORT_MAP[@]} = 0 ]; then
    [ "$state" = active ] && pass "the package started $UNIT: is-active = active" ||
        die "after install, is-active = $state"
else
    if [ "$state" = active ]; then
        pass "the package started $UNIT (is-active = active, on the packaged ports)"
    else
        info "after install, is-active = $state (expected: packaged ports busy on the host)"
    fi
    apply_port_map
    cx systemctl reset-failed "$UNIT" 2>/dev/null
    CX_TIMEOUT=90 cx systemctl restart "$UNIT" && [ "$(is_active)" = active ] &&
        pass "restarted on the test ports: is-active = active" || die "restart on the test ports failed"
fi
wait_balanced
PID_FIRST=$(main_pid)
INV_FIRST=$(svc_prop InvocationID)
check_privs "$PID_FIRST" "MainPID after start"
info "its CapBnd (bounding set, not dropped by an unprivileged process): $(cx awk '$1 == "CapBnd:" { print $2 }' "/proc/$PID_FIRST/status")"

step "4. $RELOADS x systemctl reload under load"
start_load reloads 180
pids_seen=("$PID_FIRST")
for n in $(seq 1 "$RELOADS"); do
    old=$(main_pid)
    t=$(now)
    if CX_TIMEOUT=90 cx systemctl reload "$UNIT"; then rc=0; else rc=$?; fi
    dt=$(since "$t")
    new=$(main_pid)
    state=$(is_active)
    if [ "$rc" = 0 ] && [ "$new" != "$old" ] && [ "$new" != 0 ] && [ "$state" = active ]; then
        pass "reload $n: exit 0 in $dt s, MainPID $old -> $new, is-active = $state"
    else
        fail "reload $n: exit $rc in $dt s, MainPID $old -> $new, is-active = $state"
    fi
    pids_seen+=("$new")
    check_privs "$new" "reload $n" quiet
    sleep 1
done
stop_load
# The old processes drain and exit: within 20 s only the current MainPID is left.
for i in $(seq 1 100); do
    left=$(cx pgrep -x pingora-lb | xargs)
    [ "$left" = "$(main_pid)" ] && break
    sleep 0.2
done
[ "$left" = "$(main_pid)" ] && pass "old processes exited; only MainPID $left is left" ||
    fail "pingora-lb processes left after the reloads: $left (MainPID $(main_pid))"
[ "$(svc_prop InvocationID)" = "$INV_FIRST" ] && pass "same InvocationID after the reloads (never restarted)" ||
    fail "InvocationID changed: the unit was restarted"

step "5. a broken config: reload fails, the running process keeps serving"
cx cp -p "$CONF" /root/pingora-lb.yaml.orig
cx sh -c "printf '\nsystest_unknown_key: 1\n' >>$CONF"
cx pingora-lb -t -c "$CONF" >"$WORK/check.out" 2>&1
rc=$?
[ "$rc" = 78 ] && pass "pingora-lb -t rejects the unknown key: exit 78: $(head -n 1 "$WORK/check.out" | cut -c 1-140)" ||
    fail "pingora-lb -t on the broken config: exit $rc (want 78): $(head -n 3 "$WORK/check.out" | xargs)"
old=$(main_pid)
start_load broken 60
if CX_TIMEOUT=90 cx systemctl reload "$UNIT" 2>"$WORK/reload.err"; then
    fail "systemctl reload with the broken config succeeded"
else
    pass "systemctl reload fails: $(head -n 1 "$WORK/reload.err")"
fi
sleep 1
state=$(is_active)
new=$(main_pid)
[ "$state" = active ] && [ "$new" = "$old" ] &&
    pass "still active with the same MainPID $old" || fail "after the failed reload: is-active = $state, MainPID $old -> $new"
stop_load
info "journal: $(cx journalctl -u "$UNIT" -n 30 --no-pager -o cat | grep -m 1 -E 'systest_unknown_key' | cut -c 1-140)"
cx cp -p /root/pingora-lb.yaml.orig "$CONF"
cx pingora-lb -t -c "$CONF" >/dev/null 2>&1 && pass "config restored: pingora-lb -t passes" ||
    fail "restored config fails pingora-lb -t"
old=$(main_pid)
CX_TIMEOUT=90 cx systemctl reload "$UNIT" && [ "$(main_pid)" != "$old" ] && [ "$(is_active)" = active ] &&
    pass "reload after the restore works: MainPID $old -> $(main_pid)" || fail "reload after the restore"

step "5b. HTTPS from the packaged unit, with a key only root can read"
TLS_PORT=
for p in $(seq $((LB_PORT + 100)) $((LB_PORT + 150))); do
    port_busy "$p" || { TLS_PORT=$p; break; }
done
[ -n "$TLS_PORT" ] || die "no free port for the TLS listener"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj /CN=systest.test -addext subjectAltName=DNS:systest.test \
    -keyout "$WORK/share/systest.key" -out "$WORK/share/systest.pem" 2>/dev/null ||
    die "openssl cannot make the test certificate"
TLS_DIR=/etc/pingora-lb/tls
cx install -d -m 0755 "$TLS_DIR"
cx install -m 0644 /systest/systest.pem "$TLS_DIR/systest.pem"
cx install -m 0600 -o root -g root /systest/systest.key "$TLS_DIR/systest.key"
if cx runuser -u pingora-lb -- cat "$TLS_DIR/systest.key" >/dev/null 2>&1; then
    fail "the user pingora-lb can read the key: the test proves nothing"
else
    pass "$TLS_DIR/systest.key is 0600 root:root: the user pingora-lb cannot read it"
fi
cx cp -p "$CONF" /root/pingora-lb.yaml.plain
cx sed -i "/^listeners:/a\\  - {address: \"127.0.0.1:$TLS_PORT\", tls: {certificates: [{cert: $TLS_DIR/systest.pem, key: $TLS_DIR/systest.key}]}}" "$CONF"
https_get() {
    cx curl -sS --max-time 5 --cacert "$TLS_DIR/systest.pem" \
        --resolve "systest.test:$TLS_PORT:127.0.0.1" "https://systest.test:$TLS_PORT/"
}
old=$(main_pid)
if CX_TIMEOUT=90 cx systemctl reload "$UNIT" && body=$(https_get) && [[ $body == backend-* ]]; then
    pass "reload onto a TLS listener: MainPID $old -> $(main_pid), https://systest.test:$TLS_PORT/ answers $body"
else
    fail "HTTPS after the reload: '${body:-}'; $(cx journalctl -u "$UNIT" -n 5 --no-pager -o cat | xargs)"
fi
check_privs "$(main_pid)" "after reading the root-only key"
CX_TIMEOUT=90 cx systemctl restart "$UNIT"
if [ "$(is_active)" = active ] && body=$(https_get) && [[ $body == backend-* ]]; then
    pass "restart (ExecStartPre's check, then a fresh start) reads the key too: $body"
else
    fail "HTTPS after a restart: is-active = $(is_active), '${body:-}'"
fi
check_privs "$(main_pid)" "after a fresh start with the root-only key"
cx cp -p /root/pingora-lb.yaml.plain "$CONF"
CX_TIMEOUT=90 cx systemctl reload "$UNIT" && [ "$(is_active)" = active ] &&
    pass "back to the plain configuration by reload" || fail "reload back to the plain configuration"

step "6. $NEWVER published in the repository; apt-get upgrade to it under load"
publish "$NEWER" || die "publishing $NEWVER failed"
old=$(main_pid)
inv=$(svc_prop InvocationID)
aet=$(svc_prop ActiveEnterTimestampMonotonic)
nrestarts=$(svc_prop NRestarts)
cursor=$(journal_cursor)
start_load upgrade 240
sleep 1
t=$(now)
if apt_upgrade "$WORK/apt-upgrade.log"; then
    pass "apt-get update; apt-get install --only-upgrade pingora-lb ($(since "$t") s)"
else
    tail -n 30 "$WORK/apt-upgrade.log"
    fail "apt-get update; apt-get install --only-upgrade pingora-lb failed"
fi
sleep 2
stop_load
new=$(main_pid)
status=$(cx dpkg-query -W -f='${Status} ${Version}' pingora-lb)
[ "$status" = "install ok installed $NEWVER" ] && pass "dpkg: $status" || fail "dpkg status: '$status'"
[ "$(is_active)" = active ] && [ "$new" != "$old" ] && [ "$new" != 0 ] &&
    pass "active, MainPID $old -> $new" || fail "after the upgrade: is-active = $(is_active), MainPID $old -> $new"
exe=$(cx readlink "/proc/$new/exe")
[ "$exe" = /usr/bin/pingora-lb ] && pass "MainPID runs the installed binary: /proc/$new/exe -> $exe" ||
    fail "MainPID's binary: /proc/$new/exe -> '$exe' (old binary still running?)"
# Reloaded, not restarted: a start (restart) gives the unit a new InvocationID and a new
# ActiveEnterTimestamp; a reload keeps both. NRestarts counts automatic restarts. And systemd's
# own messages about the unit since the upgrade began show a reload and no stop/start.
inv2=$(svc_prop InvocationID)
aet2=$(svc_prop ActiveEnterTimestampMonotonic)
nrestarts2=$(svc_prop NRestarts)
[ "$inv2" = "$inv" ] && [ "$aet2" = "$aet" ] && [ "$nrestarts2" = "$nrestarts" ] &&
    pass "reloaded, not restarted: InvocationID, ActiveEnterTimestamp, NRestarts=$nrestarts2 unchanged" ||
    fail "restarted: InvocationID $inv -> $inv2, ActiveEnterTimestampMonotonic $aet -> $aet2, NRestarts $nrestarts -> $nrestarts2"
msgs=$(cx journalctl --no-pager -o cat --after-cursor="$cursor" _PID=1 UNIT="$UNIT")
info "systemd about $UNIT during the upgrade: $(tr '\n' '|' <<<"$msgs")"
if grep -q -E '^Reload' <<<"$msgs" && ! grep -q -E '^(Stopping|Stopped|Starting|Started|Deactivated)|Scheduled restart' <<<"$msgs"; then
    pass "journal: the upgrade reloaded $UNIT (no Stopping/Stopped/Starting/Started)"
else
    fail "journal: the upgrade did not (only) reload $UNIT"
fi
check_privs "$new" "MainPID after the upgrade"

step "6b. $NEXTVER published; upgrading to it with an invalid $CONF fails, the old process serves"
publish "$NEXT" || die "publishing $NEXTVER failed"
cx cp -p "$CONF" /root/pingora-lb.yaml.good
cx sh -c "printf '\nsystest_unknown_key: 1\n' >>$CONF"
old=$(main_pid)
inv=$(svc_prop InvocationID)
start_load badconfig 240
sleep 1
t=$(now)
if apt_upgrade "$WORK/apt-badconfig.log"; then rc=0; else rc=$?; fi
dt=$(since "$t")
sleep 1
body=$(lb_get 2>/dev/null)
stop_load
if [ "$rc" != 0 ] && grep -q 'returned an error code' "$WORK/apt-badconfig.log"; then
    pass "the upgrade fails: apt-get exits $rc after $dt s ($(grep -m 1 'returned an error code' "$WORK/apt-badconfig.log"))"
else
    tail -n 30 "$WORK/apt-badconfig.log"
    fail "apt-get exits $rc after $dt s although $CONF is invalid"
fi
named=$(grep -m 1 'systest_unknown_key' "$WORK/apt-badconfig.log" | cut -c 1-160)
[ -n "$named" ] && pass "the postinst names the config problem: $named" ||
    fail "apt's output does not name the invalid key systest_unknown_key"
status=$(cx dpkg-query -W -f='${Status} ${Version}' pingora-lb)
[ "$status" = "install ok half-configured $NEXTVER" ] && pass "dpkg: $status" ||
    fail "dpkg status: '$status' (want install ok half-configured $NEXTVER)"
new=$(main_pid)
if [ "$(is_active)" = active ] && [ "$new" = "$old" ] && [ "$(svc_prop InvocationID)" = "$inv" ] &&
    [[ $body == backend-* ]]; then
    pass "the old process keeps serving: active, same MainPID $old ($(cx readlink "/proc/$old/exe")), answers $body"
else
    fail "after the failed upgrade: is-active = $(is_active), MainPID $old -> $new, request: '$body'"
fi
cx cp -p /root/pingora-lb.yaml.good "$CONF"
start_load configure 120
sleep 1
t=$(now)
if CX_TIMEOUT=300 cx dpkg --configure -a >"$WORK/dpkg-configure.log" 2>&1; then
    pass "config restored: dpkg --configure -a finishes the upgrade ($(since "$t") s)"
else
    tail -n 20 "$WORK/dpkg-configure.log"
    fail "dpkg --configure -a fails with the config restored"
fi
sleep 1
stop_load
status=$(cx dpkg-query -W -f='${Status} ${Version}' pingora-lb)
[ "$status" = "install ok installed $NEXTVER" ] && pass "dpkg: $status" || fail "dpkg status: '$status'"
new=$(main_pid)
exe=$(cx readlink "/proc/$new/exe")
[ "$(is_active)" = active ] && [ "$new" != "$old" ] && [ "$(svc_prop InvocationID)" = "$inv" ] &&
    [ "$exe" = /usr/bin/pingora-lb ] &&
    pass "reloaded onto $NEXTVER: MainPID $old -> $new (running $exe), same InvocationID" ||
    fail "after dpkg --configure -a: is-active = $(is_active), MainPID $old -> $new ($exe), InvocationID $inv -> $(svc_prop InvocationID)"

if [ -z "$INCVER" ]; then
    step "6c. upgrade to a binary that cannot take over: skipped (SYSTEST_INCOMPATIBLE_BIN is not set)"
else
    step "6c. $INCVER (another handoff protocol) published; the upgrade under load falls back to a restart"
    publish "$INC" || die "publishing $INCVER failed"
    old=$(main_pid)
    inv=$(svc_prop InvocationID)
    cursor=$(journal_cursor)
    start_load incompatible 240
    sleep 1
    t=$(now)
    if apt_upgrade "$WORK/apt-incompatible.log"; then rc=0; else rc=$?; fi
    dt=$(since "$t")
    sleep 2
    stop_load report
    [ "$rc" = 0 ] && pass "apt-get update; apt-get install --only-upgrade pingora-lb: exit 0 ($dt s)" ||
        fail "apt-get update; apt-get install --only-upgrade pingora-lb: exit $rc ($dt s)"
    line=$(grep -m 1 'restarting pingora-lb.service' "$WORK/apt-incompatible.log")
    [ -n "$line" ] && pass "the postinst falls back to a restart: $line" ||
        fail "no 'restarting pingora-lb.service' in apt's output"
    why=$({
        cat "$WORK/apt-incompatible.log"
        cx journalctl --no-pager -o cat --after-cursor="$cursor" -u "$UNIT"
    } | grep -m 1 'handoff protocol' | cut -c 1-200)
    [ -n "$why" ] && pass "the reload failed on the handoff protocol: $why" ||
        fail "no 'handoff protocol' in apt's output or the unit's journal: the reload failed for another reason"
    status=$(cx dpkg-query -W -f='${Status} ${Version}' pingora-lb)
    [ "$status" = "install ok installed $INCVER" ] && pass "dpkg: $status" || fail "dpkg status: '$status'"
    new=$(main_pid)
    inv2=$(svc_prop InvocationID)
    [ "$(is_active)" = active ] && [ "$inv2" != "$inv" ] && [ "$new" != "$old" ] && [ "$new" != 0 ] &&
        pass "restarted: active, InvocationID $inv -> $inv2, MainPID $old -> $new" ||
        fail "after the upgrade: is-active = $(is_active), InvocationID $inv -> $inv2, MainPID $old -> $new"
    exe=$(cx readlink "/proc/$new/exe")
    [ "$exe" = /usr/bin/pingora-lb ] && pass "MainPID runs the installed binary: /proc/$new/exe -> $exe" ||
        fail "MainPID's binary: /proc/$new/exe -> '$exe'"
    [ "$(cx md5sum /usr/bin/pingora-lb | awk '{ print $1 }')" = "$(md5sum "$INCOMPATIBLE_BIN" | awk '{ print $1 }')" ] &&
        pass "/usr/bin/pingora-lb is the incompatible build" || fail "/usr/bin/pingora-lb is not $INCOMPATIBLE_BIN"
    info "requests during the upgrade with a restart: $LOAD_FAILED of $LOAD_TOTAL failed, the first $LOAD_FIRST_FAIL s into the load (reported, not checked)"
    wait_balanced
    check_privs "$new" "MainPID after the restart"
fi

step "7. journal, systemd-analyze security, stop, purge"
lines=$(cx journalctl -t pingora-lb --no-pager -o cat)
n_serving=$(grep -c 'serving on' <<<"$lines")
[ "$n_serving" -ge 1 ] &&
    pass "journalctl -t pingora-lb: $(wc -l <<<"$lines") lines, $n_serving 'serving on', e.g. '$(grep -m 1 'serving on' <<<"$lines")'" ||
    fail "journalctl -t pingora-lb has no 'serving on' line ($(wc -l <<<"$lines") lines)"
if CX_TIMEOUT=60 cx systemd-analyze verify "$UNIT" >"$WORK/verify.txt" 2>&1; then
    pass "systemd-analyze verify $UNIT: exit 0$([ -s "$WORK/verify.txt" ] && echo ", with messages:")"
    while IFS= read -r l; do info "$l"; done <"$WORK/verify.txt"
else
    fail "systemd-analyze verify $UNIT:"
    while IFS= read -r l; do info "$l"; done <"$WORK/verify.txt"
fi
CX_TIMEOUT=60 cx systemd-analyze security "$UNIT" --no-pager >"$WORK/security.txt" 2>&1
score=$(grep -E 'Overall exposure level' "$WORK/security.txt")
[ -n "$OUT" ] && cp "$WORK/security.txt" "$OUT/security.txt"
if [ -n "$score" ]; then
    pass "systemd-analyze security: ${score#→ }"
else
    fail "systemd-analyze security printed no exposure level"
    tail -n 5 "$WORK/security.txt"
fi

# Stop with a request in flight (the backend answers /slow after 2 s) and an idle keep-alive
# connection open: the request must be answered, and the idle connection must not hold the
# stop up until the grace period ends.
CX_TIMEOUT=20 cx curl -sS --max-time 15 "http://127.0.0.1:$LB_PORT/slow" >"$WORK/inflight.out" 2>&1 &
inflight_pid=$!
CX_TIMEOUT=20 cx python3 -c "
import http.client, os, time
c = http.client.HTTPConnection('127.0.0.1', $LB_PORT, timeout=5)
c.request('GET', '/'); c.getresponse().read(); print('idle connection open', flush=True)
end = time.monotonic() + 15
while time.monotonic() < end and not os.path.exists('/systest-rw/idle.stop'):
    time.sleep(0.1)" >"$WORK/idle.out" 2>&1 &
idle_pid=$!
sleep 0.5
t=$(now)
CX_TIMEOUT=60 cx systemctl stop "$UNIT"
rc=$?
dt=$(since "$t")
wait "$inflight_pid"
inflight=$(cat "$WORK/inflight.out")
[ "$(cat "$WORK/idle.out")" = "idle connection open" ] || info "idle connection: $(cat "$WORK/idle.out")"
touch "$WORK/rw/idle.stop"
wait "$idle_pid"
[[ $inflight == backend-? ]] && pass "the request in flight during the stop was answered ($inflight)" ||
    fail "the request in flight during the stop: '$inflight'"
state=$(is_active)
if [ "$rc" = 0 ] && awk -v d="$dt" -v l="$STOP_LIMIT" 'BEGIN { exit !(d < l) }' && [ "$state" != active ]; then
    pass "systemctl stop took $dt s (< $STOP_LIMIT s; TimeoutStopSec=$(svc_prop TimeoutStopUSec)), is-active = $state"
else
    fail "systemctl stop: exit $rc after $dt s (limit $STOP_LIMIT s), is-active = $state"
fi
left=$(cx pgrep -x pingora-lb | xargs)
[ -z "$left" ] && pass "no pingora-lb process left" || fail "pingora-lb processes left after stop: $left"

t=$(now)
if CX_TIMEOUT=300 cx apt-get purge -y -q pingora-lb >"$WORK/apt-purge.log" 2>&1; then
    pass "apt-get purge pingora-lb ($(since "$t") s)"
else
    tail -n 20 "$WORK/apt-purge.log"
    fail "apt-get purge failed"
fi
grep -i -E 'warning|error' "$WORK/apt-purge.log" | while IFS= read -r l; do info "apt: $l"; done
status=$(cx dpkg-query -W -f='${db:Status-Status}' pingora-lb 2>/dev/null)
[ -z "$status" ] || [ "$status" = not-installed ] && pass "dpkg: pingora-lb is not installed" ||
    fail "dpkg status after purge: $status"
leftovers=
for p in /etc/pingora-lb /usr/bin/pingora-lb /lib/systemd/system/pingora-lb.service \
    /usr/lib/systemd/system/pingora-lb.service /etc/systemd/system/multi-user.target.wants/pingora-lb.service \
    /run/pingora-lb; do
    cx test -e "$p" && leftovers+=" $p"
done
[ -z "$leftovers" ] && pass "purged cleanly: no /etc/pingora-lb, /usr/bin/pingora-lb, unit file, enablement link, /run/pingora-lb" ||
    fail "left after purge:$leftovers"
cx getent passwd pingora-lb >/dev/null && info "the pingora-lb system user stays (as usual for Debian system users)"

if [ -z "$RPM_IN" ]; then
    step "8. the RPM's scriptlets: skipped (SYSTEST_RPM and SYSTEST_RPM_NEWER are not set)"
    exit 0
fi
step "8. the RPM's scriptlets for real: rpm -i, rpm -U under load, rpm -e"
t=$(now)
if CX_TIMEOUT=300 cx apt-get install -y -q --no-install-recommends rpm >"$WORK/apt-rpm.log" 2>&1; then
    pass "apt-get install rpm (Debian's) in the container ($(since "$t") s)"
else
    tail -n 20 "$WORK/apt-rpm.log"
    die "apt-get install rpm failed"
fi
# The user the .deb left behind: gone, so that the RPM's %pre has to create it.
cx userdel pingora-lb >/dev/null 2>&1
cx groupdel pingora-lb >/dev/null 2>&1
cx getent passwd pingora-lb >/dev/null && die "cannot delete the pingora-lb user the .deb left"
# Fedora's and RHEL's preset policy: what no preset file enables stays disabled (Debian has no
# such policy: its units are enabled).
cx sh -c 'mkdir -p /etc/systemd/system-preset &&
    echo "disable *" >/etc/systemd/system-preset/99-default-disable.preset'
rpm_out() { grep -v -E 'should not be used directly|assuming you know what' "$1" | while IFS= read -r l; do info "rpm: $l"; done; }
t=$(now)
if CX_TIMEOUT=120 cx rpm -i --nodeps "$RPM_IN" >"$WORK/rpm-i.log" 2>&1; then
    pass "rpm -i --nodeps $(basename "$RPM_IN") ($(since "$t") s)"
    rpm_out "$WORK/rpm-i.log"
else
    cat "$WORK/rpm-i.log"
    die "rpm -i failed"
fi
q=$(cx rpm -q pingora-lb)
[ "$q.rpm" = "$(basename "$RPM_IN")" ] && pass "rpm -q pingora-lb: $q" || fail "rpm -q pingora-lb: '$q'"
cx getent passwd pingora-lb >/dev/null && pass "%pre created the user: $(cx getent passwd pingora-lb)" ||
    fail "no pingora-lb user after rpm -i"
enabled=$(cx systemctl is-enabled "$UNIT" 2>&1)
state=$(is_active)
[ "$enabled" = disabled ] && [ "$state" = inactive ] &&
    pass "%post applied the preset policy: is-enabled = $enabled, is-active = $state (as on Fedora/RHEL: the admin enables it)" ||
    fail "after rpm -i with the policy 'disable *': is-enabled = $enabled, is-active = $state (want disabled, inactive)"
apply_port_map
if CX_TIMEOUT=90 cx systemctl enable --now "$UNIT" >/dev/null 2>&1 && [ "$(is_active)" = active ] &&
    [ "$(cx systemctl is-enabled "$UNIT")" = enabled ]; then
    pass "systemctl enable --now $UNIT: enabled, active"
else
    die "systemctl enable --now $UNIT: is-enabled = $(cx systemctl is-enabled "$UNIT"), is-active = $(is_active)"
fi
wait_balanced
check_privs "$(main_pid)" "MainPID of the RPM's service"

old=$(main_pid)
inv=$(svc_prop InvocationID)
cursor=$(journal_cursor)
start_load rpm-upgrade 180
sleep 1
t=$(now)
if CX_TIMEOUT=180 cx rpm -U --nodeps "$RPM_NEWER_IN" >"$WORK/rpm-U.log" 2>&1; then
    pass "rpm -U --nodeps $(basename "$RPM_NEWER_IN") ($(since "$t") s)"
else
    cat "$WORK/rpm-U.log"
    fail "rpm -U failed"
fi
rpm_out "$WORK/rpm-U.log"
sleep 2
stop_load
q=$(cx rpm -q pingora-lb)
[ "$q.rpm" = "$(basename "$RPM_NEWER_IN")" ] && pass "rpm -q pingora-lb: $q" || fail "rpm -q pingora-lb: '$q'"
new=$(main_pid)
inv2=$(svc_prop InvocationID)
[ "$(is_active)" = active ] && [ "$new" != "$old" ] && [ "$new" != 0 ] && [ "$inv2" = "$inv" ] &&
    pass "reloaded, not restarted: MainPID $old -> $new, same InvocationID" ||
    fail "after rpm -U: is-active = $(is_active), MainPID $old -> $new, InvocationID $inv -> $inv2"
exe=$(cx readlink "/proc/$new/exe")
[ "$exe" = /usr/bin/pingora-lb ] && pass "MainPID runs the installed binary: /proc/$new/exe -> $exe" ||
    fail "MainPID's binary: /proc/$new/exe -> '$exe'"
msgs=$(cx journalctl --no-pager -o cat --after-cursor="$cursor" _PID=1 UNIT="$UNIT")
if grep -q -E '^Reload' <<<"$msgs" && ! grep -q -E '^(Stopping|Stopped|Starting|Started|Deactivated)|Scheduled restart' <<<"$msgs"; then
    pass "journal: rpm -U reloaded $UNIT (no Stopping/Stopped/Starting/Started)"
else
    fail "journal: rpm -U did not (only) reload $UNIT: $(tr '\n' '|' <<<"$msgs")"
fi
check_privs "$new" "MainPID after rpm -U"

cx sh -c "printf '# edited by the system test\n' >>$CONF"
t=$(now)
if CX_TIMEOUT=120 cx rpm -e pingora-lb >"$WORK/rpm-e.log" 2>&1; then
    pass "rpm -e pingora-lb ($(since "$t") s)"
else
    cat "$WORK/rpm-e.log"
    fail "rpm -e failed"
fi
rpm_out "$WORK/rpm-e.log"
state=$(is_active)
left=$(cx pgrep -x pingora-lb | xargs)
links=$(cx find /etc/systemd/system -name "$UNIT" | xargs)
[ "$state" != active ] && [ -z "$left" ] && [ -z "$links" ] &&
    pass "%preun stopped and disabled the unit: is-active = $state, no process, no enablement link" ||
    fail "after rpm -e: is-active = $state, processes '$left', links '$links'"
if cx grep -q 'edited by the system test' "$CONF.rpmsave" 2>/dev/null && ! cx test -e "$CONF"; then
    pass "the edited config is kept as $CONF.rpmsave"
else
    fail "no edited $CONF.rpmsave (files: $(cx ls /etc/pingora-lb 2>&1 | xargs))"
fi
leftovers=
for p in /usr/bin/pingora-lb /usr/lib/systemd/system/pingora-lb.service /usr/lib/sysusers.d/pingora-lb.conf; do
    cx test -e "$p" && leftovers+=" $p"
done
[ -z "$leftovers" ] && ! cx rpm -q pingora-lb >/dev/null 2>&1 &&
    pass "rpm -e removed the package's files (binary, unit, sysusers.d)" || fail "left after rpm -e:$leftovers"
