#!/usr/bin/env bash
# The dnf repository tools/dnf-repository.sh makes, checked with dnf itself (Debian's dnf
# package) in a throwaway configuration, installroot and cache:
#   - two throwaway RSA 3072 keys (A, the publisher's, and B, someone else's) in a temporary
#     GNUPGHOME;
#   - the repository from the given RPMs, signed with A: repomd.xml.asc verifies with A's key,
#     every package verifies with rpm -K once A's key is imported (and not before),
#     pingora-lb.repo has gpgcheck=1 and repo_gpgcheck=1;
#   - `dnf makecache` with that .repo file (repo_gpgcheck=1) succeeds after importing A's key,
#     and the primary metadata (read by dnf repoquery, and read directly) lists pingora-lb at
#     exactly the given versions;
#   - the same repository signed with B, for a client whose .repo trusts A: dnf makecache refuses
#     it, and dnf lists no package from it.
#
# Usage: tests/packaging/dnf-repository-check.sh PINGORA_LB.rpm [MORE.rpm...]
# Exits non-zero if any check fails.
# `COND && pass ... || fail ...` is intended: pass never fails.
# shellcheck disable=SC2015
set -uo pipefail

REPO_ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TOOL=$REPO_ROOT/tools/dnf-repository.sh
FAILS=0
CHECKS=0
TMP=

pass() { CHECKS=$((CHECKS + 1)); printf 'PASS: %s\n' "$*"; }
fail() { CHECKS=$((CHECKS + 1)); FAILS=$((FAILS + 1)); printf 'FAIL: %s\n' "$*"; }
info() { printf '      %s\n' "$*"; }
die() { fail "$*"; echo "aborting: the remaining checks depend on this one"; exit 1; }

cleanup() {
    local rc=$? s
    set +e
    trap - EXIT INT TERM HUP
    # gpg-agents: ours, and those dnf starts for its key stores in the cache.
    [ -n "$TMP" ] && find "$TMP" -name S.gpg-agent 2>/dev/null | while IFS= read -r s; do
        timeout 10 gpgconf --homedir "$(dirname "$s")" --kill gpg-agent >/dev/null 2>&1
    done
    [ -n "$TMP" ] && rm -rf "$TMP"
    if [ "$FAILS" -eq 0 ] && [ "$rc" -eq 0 ]; then
        echo "dnf repository check: OK ($CHECKS checks)"
        exit 0
    fi
    echo "dnf repository check: FAILED ($FAILS of $CHECKS checks failed; exit status $rc)"
    exit 1
}

[ $# -ge 1 ] || { echo "usage: $0 PINGORA_LB.rpm [MORE.rpm...]" >&2; exit 2; }
trap cleanup EXIT
trap 'echo interrupted; FAILS=$((FAILS + 1)); exit 1' INT TERM HUP

missing=()
for pair in createrepo_c:createrepo-c dnf:dnf rpmsign:rpm gpg:gnupg gpgv:gpgv python3:python3; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
[ ${#missing[@]} -eq 0 ] || die "missing tools; install the Debian packages: ${missing[*]}"

RPMS=()
WANT=()
for f in "$@"; do
    [ -f "$f" ] || die "no such file: $f"
    RPMS+=("$(readlink -f "$f")")
    WANT+=("$(rpm -qp --nosignature --qf '%{NAME} %{EPOCHNUM}:%{VERSION}-%{RELEASE} %{ARCH}' "$f" 2>/dev/null)")
done
WANT_SORTED=$(printf '%s\n' "${WANT[@]}" | sort)
info "packages: $(tr '\n' ';' <<<"$WANT_SORTED")"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/pingora-lb-dnf-check.XXXXXX")

# mkkey NAME: a throwaway RSA 3072 signing key without a passphrase in $TMP/gnupg-NAME; prints
# its fingerprint.
mkkey() {
    local home=$TMP/gnupg-$1
    mkdir -m 0700 "$home"
    timeout 120 gpg --homedir "$home" --batch --quiet --no-tty --passphrase '' \
        --quick-generate-key "pingora-lb check key $1 <$1@pingora-lb.invalid>" rsa3072 sign 1d \
        >/dev/null 2>&1 || return 1
    gpg --homedir "$home" --batch --with-colons --list-secret-keys 2>/dev/null |
        awk -F: '$1 == "fpr" { print $10; exit }'
}
KEY_A=$(mkkey a) && [ -n "$KEY_A" ] || die "cannot make a throwaway gpg key"
KEY_B=$(mkkey b) && [ -n "$KEY_B" ] || die "cannot make a second throwaway gpg key"
pass "throwaway RSA 3072 keys: A $KEY_A (the publisher's), B $KEY_B (another)"

# The repository, signed with A.
REPO_A=$TMP/repo-a
if timeout 300 "$TOOL" --gpg-home "$TMP/gnupg-a" --key "$KEY_A" --url "file://$REPO_A" \
    "$REPO_A" "${RPMS[@]}" >"$TMP/tool-a.log" 2>&1; then
    pass "tools/dnf-repository.sh made the repository: $(tail -n 1 "$TMP/tool-a.log")"
else
    cat "$TMP/tool-a.log"
    die "tools/dnf-repository.sh failed"
fi
for f in repodata/repomd.xml repodata/repomd.xml.asc RPM-GPG-KEY-pingora-lb pingora-lb.repo; do
    [ -s "$REPO_A/$f" ] || fail "no $f in the repository"
done
gpg --homedir "$TMP/gnupg-a" --batch --quiet --export "$KEY_A" >"$TMP/key-a.gpg" 2>/dev/null
gpg --homedir "$TMP/gnupg-b" --batch --quiet --export "$KEY_B" >"$TMP/key-b.gpg" 2>/dev/null
if gpgv --keyring "$TMP/key-a.gpg" "$REPO_A/repodata/repomd.xml.asc" "$REPO_A/repodata/repomd.xml" >/dev/null 2>&1; then
    pass "repodata/repomd.xml.asc is a valid signature by A"
else
    fail "repodata/repomd.xml.asc does not verify with A's key"
fi
if gpgv --keyring "$TMP/key-b.gpg" "$REPO_A/repodata/repomd.xml.asc" "$REPO_A/repodata/repomd.xml" >/dev/null 2>&1; then
    fail "repodata/repomd.xml.asc verifies with B's key too"
fi
conf=$(grep -E '^(gpgcheck|repo_gpgcheck|baseurl|gpgkey)=' "$REPO_A/pingora-lb.repo" | sort | xargs)
if grep -qx 'gpgcheck=1' "$REPO_A/pingora-lb.repo" && grep -qx 'repo_gpgcheck=1' "$REPO_A/pingora-lb.repo"; then
    pass "pingora-lb.repo: $conf"
else
    fail "pingora-lb.repo lacks gpgcheck=1 or repo_gpgcheck=1: $conf"
fi

# Package signatures: rpm -K with A's key imported into an rpm database of our own.
mapfile -t published < <(find "$REPO_A/Packages" -name '*.rpm' -type f | sort)
[ ${#published[@]} = ${#RPMS[@]} ] && pass "${#published[@]} package file(s) in Packages/" ||
    fail "${#published[@]} package files in Packages/, want ${#RPMS[@]}"
mkdir -p "$TMP/rpmdb"
if timeout 60 rpm --dbpath "$TMP/rpmdb" -K "${published[@]}" >"$TMP/k0.out" 2>&1; then
    fail "rpm -K accepts the packages without the key: $(xargs <"$TMP/k0.out")"
else
    pass "without A's key rpm -K reports: $(head -n 1 "$TMP/k0.out" | sed 's|.*/||')"
fi
timeout 60 rpm --dbpath "$TMP/rpmdb" --import "$REPO_A/RPM-GPG-KEY-pingora-lb" ||
    fail "rpm --import of RPM-GPG-KEY-pingora-lb failed"
if timeout 60 rpm --dbpath "$TMP/rpmdb" -K "${published[@]}" >"$TMP/k1.out" 2>&1 &&
    [ "$(grep -c ': digests signatures OK$' "$TMP/k1.out")" = ${#published[@]} ]; then
    pass "with A's key every package passes rpm -K: $(head -n 1 "$TMP/k1.out" | sed 's|.*/||')"
else
    fail "rpm -K with A's key: $(xargs <"$TMP/k1.out")"
fi

# dnf_ NAME REPOFILE ARGS...: dnf with nothing of this host's: its own config, .repo
# directory, installroot, cache and key store under $TMP/dnf-NAME.
dnf_() {
    local d=$TMP/dnf-$1 repofile=$2
    shift 2
    if [ ! -d "$d" ]; then
        mkdir -p "$d/repos.d" "$d/root"
        cp "$repofile" "$d/repos.d/"
        cat >"$d/dnf.conf" <<EOF
[main]
gpgcheck=1
# Fedora's default (Debian's dnf.conf says True): a repository that fails is an error.
skip_if_unavailable=False
reposdir=$d/repos.d
cachedir=$d/cache
logdir=$d/log
persistdir=$d/persist
install_weak_deps=0
EOF
    fi
    timeout --kill-after=5 120 dnf -y --config "$d/dnf.conf" --installroot "$d/root" --releasever 1 \
        --setopt=reposdir="$d/repos.d" --disableplugin='*' "$@"
}

# The client for repository A, with repo_gpgcheck=1.
if dnf_ a "$REPO_A/pingora-lb.repo" makecache >"$TMP/makecache-a.out" 2>&1; then
    pass "dnf makecache (repo_gpgcheck=1) accepts the repository signed with A"
else
    cat "$TMP/makecache-a.out"
    fail "dnf makecache refused the repository signed with A"
fi
# dnf's "Importing GPG key 0x...: Fingerprint: XXXX XXXX ...".
imported=$(sed -n 's/^ *Fingerprint: *//p' "$TMP/makecache-a.out" | tr -d ' ' | sort -u | xargs)
[ "$imported" = "$KEY_A" ] && pass "dnf imported the key from gpgkey=: fingerprint $imported (A)" ||
    fail "dnf imported key(s) '$imported', want A $KEY_A"
dnf_ a "$REPO_A/pingora-lb.repo" -C repoquery --qf '%{name} %{epoch}:%{version}-%{release} %{arch}' \
    pingora-lb >"$TMP/repoquery-a.out" 2>"$TMP/repoquery-a.err"
got=$(grep '^pingora-lb ' "$TMP/repoquery-a.out" | sort)
[ "$got" = "$WANT_SORTED" ] && pass "dnf repoquery lists: $(xargs <<<"$got")" ||
    fail "dnf repoquery lists '$(xargs <<<"$got")', want '$(xargs <<<"$WANT_SORTED")' $(xargs <"$TMP/repoquery-a.err")"
primary=$(python3 - "$REPO_A" <<'EOF'
import gzip, sys, xml.etree.ElementTree as ET
repo = sys.argv[1]
ns = {"repo": "http://linux.duke.edu/metadata/repo", "c": "http://linux.duke.edu/metadata/common"}
md = ET.parse(repo + "/repodata/repomd.xml")
href = md.find("repo:data[@type='primary']/repo:location", ns).get("href")
for p in ET.parse(gzip.open(repo + "/" + href)).getroot().findall("c:package", ns):
    v = p.find("c:version", ns)
    print("%s %s:%s-%s %s" % (p.findtext("c:name", namespaces=ns), v.get("epoch"), v.get("ver"),
                              v.get("rel"), p.findtext("c:arch", namespaces=ns)))
EOF
)
primary=$(sort <<<"$primary")
[ "$primary" = "$WANT_SORTED" ] && pass "the primary metadata lists: $(xargs <<<"$primary")" ||
    fail "the primary metadata lists '$(xargs <<<"$primary")', want '$(xargs <<<"$WANT_SORTED")'"

# The same packages and metadata signed with B, served to a client whose .repo names A's key.
REPO_B=$TMP/repo-b
cp -a "$REPO_A" "$REPO_B"
rm -f "$REPO_B/RPM-GPG-KEY-pingora-lb"
if timeout 300 "$TOOL" --gpg-home "$TMP/gnupg-b" --key "$KEY_B" --url "file://$REPO_B" \
    --key-url "file://$REPO_A/RPM-GPG-KEY-pingora-lb" "$REPO_B" >"$TMP/tool-b.log" 2>&1; then
    info "the repository signed again with B: $(tail -n 1 "$TMP/tool-b.log")"
else
    cat "$TMP/tool-b.log"
    die "tools/dnf-repository.sh could not sign the copy with B"
fi
dnf_ b "$REPO_B/pingora-lb.repo" makecache >"$TMP/makecache-b.out" 2>&1
rc=$?
refusal=$(grep -i -m 1 -E 'signature' "$TMP/makecache-b.out")
if [ "$rc" != 0 ] && [ -n "$refusal" ]; then
    pass "dnf makecache refuses the repository signed with B (exit $rc): $refusal"
else
    cat "$TMP/makecache-b.out"
    fail "dnf makecache on a repository signed with B for a client trusting A: exit $rc, no signature error"
fi
dnf_ b "$REPO_B/pingora-lb.repo" -C repoquery --qf '%{name} %{evr}' pingora-lb \
    >"$TMP/repoquery-b.out" 2>/dev/null
! grep -q '^pingora-lb ' "$TMP/repoquery-b.out" && pass "dnf lists no package from it" ||
    fail "dnf lists packages from the repository signed with B: $(xargs <"$TMP/repoquery-b.out")"
