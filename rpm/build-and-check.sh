#!/bin/bash
# Build the RPM from the working tree and check it:
#   rpmbuild -bb, rpmlint (spec and package), install into a scratch root,
#   file list and modes, scriptlets (upgrade must reload, not restart), and
#   the installed binary's check of the installed default config.
# Exits non-zero on the first failure.
#
# Usage: rpm/build-and-check.sh [OUTPUT_DIR]   (default: target/rpm-out)
# CARGO_TARGET_DIR defaults to the repository's target/ so that the release
# build made for the tests is reused (only this crate is compiled again,
# because the unpacked sources live at another path).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
OUT=${1:-$REPO/target/rpm-out}
SPEC=$REPO/rpm/pingora-lb.spec
NAME=pingora-lb

fail() { echo "FAIL: $*" >&2; exit 1; }
step() { printf '\n==> %s\n' "$*"; }

for tool in rpmbuild rpmspec rpm rpmlint tar; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done

VERSION=$(rpmspec -q --srpm --qf '%{version}' "$SPEC" 2>/dev/null)
CARGO_VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -n1)
[ "$VERSION" = "$CARGO_VERSION" ] ||
    fail "spec Version $VERSION differs from Cargo.toml version $CARGO_VERSION"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/pingora-lb-rpm.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP"/{BUILD,BUILDROOT,RPMS,SOURCES,SPECS,SRPMS} "$OUT"

step "source tarball $NAME-$VERSION.tar.gz from the working tree"
# The working tree as it is (committed or not), without build output, VCS
# data and what a Debian build leaves under debian/.
STAGE=$TMP/stage/$NAME-$VERSION
mkdir -p "$STAGE"
tar -C "$REPO" -cf - \
    --exclude=./target --exclude=./.git \
    --exclude=./debian/.debhelper --exclude=./debian/pingora-lb \
    --exclude=./debian/tmp --exclude=./result \
    . | tar -C "$STAGE" -xf -
tar -C "$TMP/stage" -czf "$TMP/SOURCES/$NAME-$VERSION.tar.gz" "$NAME-$VERSION"
cp "$REPO/dist/pingora-lb.sysusers" "$TMP/SOURCES/$NAME.sysusers"
cp "$SPEC" "$TMP/SPECS/"
cp "$SPEC" "$TMP/SOURCES/"

step "rpmbuild -bb (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
# --nodeps: on a Debian host the rpm database is empty, so every
# BuildRequires would count as missing although dpkg has them installed.
rpmbuild -bb --nodeps --define "_topdir $TMP" "$TMP/SPECS/$NAME.spec"
RPM=$(find "$TMP/RPMS" -name "$NAME-$VERSION-*.rpm" ! -name '*debug*' | head -n1)
[ -n "$RPM" ] || fail "rpmbuild produced no $NAME package"
cp "$RPM" "$OUT/"
echo "built: $OUT/$(basename "$RPM")"

step "rpmlint"
# Fails on errors (exit status), prints warnings. Known, explained false
# positives are filtered in rpm/pingora-lb.rpmlintrc.
# The spec is linted next to its Source1, which %pre reads when it is parsed.
rpmlint -r "$REPO/rpm/pingora-lb.rpmlintrc" "$TMP/SOURCES/$NAME.spec" "$RPM" ||
    fail "rpmlint reported errors"

step "file list and modes (rpm -qlvp)"
LIST=$(rpm -qlvp "$RPM")
echo "$LIST"
expect() { # mode path
    echo "$LIST" | grep -Eq "^$1 +[0-9]+ root +root .* $2\$" ||
        fail "expected $2 with mode $1, owned by root:root"
}
expect '-rwxr-xr-x' /usr/bin/pingora-lb
expect '-rw-r--r--' /usr/lib/systemd/system/pingora-lb.service
expect 'drwxr-xr-x' /etc/pingora-lb
expect '-rw-r--r--' /etc/pingora-lb/pingora-lb.yaml
expect '-rw-r--r--' /usr/lib/sysusers.d/pingora-lb.conf
expect '-rw-r--r--' /usr/share/doc/pingora-lb/README.md
expect '-rw-r--r--' /usr/share/doc/pingora-lb/examples/keepalived.conf
expect '-rw-r--r--' /usr/share/licenses/pingora-lb/LICENSE
# Nothing else, apart from rpm's /usr/lib/.build-id links to the binary.
# (The manual page's compression suffix depends on the distribution.)
FOUND=$(echo "$LIST" | grep -v ' /usr/lib/.build-id' | awk '{print $NF}' |
    sed -E 's/\.(gz|xz|bz2|zst)$//' | sort)
WANTED=$(sort <<'EOF'
/etc/pingora-lb
/etc/pingora-lb/pingora-lb.yaml
/usr/bin/pingora-lb
/usr/lib/systemd/system/pingora-lb.service
/usr/lib/sysusers.d/pingora-lb.conf
/usr/share/doc/pingora-lb
/usr/share/man/man8/pingora-lb.8
/usr/share/doc/pingora-lb/README.md
/usr/share/doc/pingora-lb/examples
/usr/share/doc/pingora-lb/examples/keepalived.conf
/usr/share/licenses/pingora-lb
/usr/share/licenses/pingora-lb/LICENSE
EOF
)
[ "$FOUND" = "$WANTED" ] ||
    fail "unexpected file list: $(diff <(echo "$WANTED") <(echo "$FOUND") | grep '^[<>]' | tr '\n' ' ')"
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$RPM" |
    grep -Eq '^cn /etc/pingora-lb/pingora-lb.yaml$' ||
    fail "the config is not %config(noreplace)"
# The packaged files are the ones in dist/ (single source of truth).
EXTRACT=$TMP/extract
mkdir -p "$EXTRACT"
(cd "$EXTRACT" && rpm2cpio "$RPM" | cpio -idm --quiet)
cmp "$EXTRACT/usr/lib/systemd/system/pingora-lb.service" "$REPO/dist/pingora-lb.service"
cmp "$EXTRACT/etc/pingora-lb/pingora-lb.yaml" "$REPO/dist/pingora-lb.yaml"
cmp "$EXTRACT/usr/lib/sysusers.d/pingora-lb.conf" "$REPO/dist/pingora-lb.sysusers"
cmp "$EXTRACT/usr/share/doc/pingora-lb/examples/keepalived.conf" "$REPO/dist/keepalived/keepalived.conf"

step "scriptlets (rpm -qp --scripts)"
SCRIPTS=$(rpm -qp --scripts "$RPM")
echo "$SCRIPTS"
# %postun of an upgrade ($1 >= 1) must reload the unit: either systemd's
# mark-reload-system-units (real macros) or try-reload-or-restart (fallback),
# and never restart it.
POSTUN=$(echo "$SCRIPTS" | sed -n '/^postuninstall scriptlet/,/^[a-z]* *scriptlet/p')
echo "$POSTUN" | grep -Eq 'mark-reload-system-units|try-reload-or-restart' ||
    fail "%postun does not reload the service on upgrade"
echo "$POSTUN" | grep -q 'pingora-lb.service' || fail "%postun does not name pingora-lb.service"
if echo "$POSTUN" | grep -Eq 'mark-restart-system-units|try-restart|systemctl restart'; then
    fail "%postun restarts the service on upgrade"
fi
echo "$SCRIPTS" | grep -q 'pingora-lb' || fail "no scriptlet creates the pingora-lb user"

step "install into a scratch root"
ROOT=$TMP/root
rpm --root "$ROOT" --initdb
# --nodeps: the scratch root has no packages, hence no systemd, shadow-utils
# or glibc to satisfy Requires. Scriptlets run chrooted into the root; an
# empty root has no /bin/sh to run them with, so if installing with them
# fails, start over without them (--noscripts): their text was checked above.
if ! rpm --root "$ROOT" -ivh --nodeps "$RPM"; then
    echo "note: scriptlets cannot run in an empty root (no /bin/sh there); installing with --noscripts"
    rm -rf "$ROOT"
    rpm --root "$ROOT" --initdb
    rpm --root "$ROOT" -ivh --nodeps --noscripts "$RPM"
fi
rpm --root "$ROOT" -V --nodeps "$NAME" || fail "rpm -V: installed files differ from the package"
[ "$(stat -c %a "$ROOT/usr/bin/pingora-lb")" = 755 ] || fail "binary mode"
[ "$(stat -c %a "$ROOT/etc/pingora-lb/pingora-lb.yaml")" = 644 ] || fail "config mode"

step "installed binary checks the installed config"
"$ROOT/usr/bin/pingora-lb" -t -c "$ROOT/etc/pingora-lb/pingora-lb.yaml" ||
    fail "pingora-lb -t rejected the packaged config"

step "erase from the scratch root"
rpm --root "$ROOT" -e --nodeps --noscripts "$NAME"
[ ! -e "$ROOT/usr/bin/pingora-lb" ] || fail "binary left behind after erase"

printf '\nOK: %s\n' "$OUT/$(basename "$RPM")"
