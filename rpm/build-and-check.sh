#!/bin/bash
# Build the RPM from the working tree and check it:
#   rpmbuild -bb, rpmlint (spec and package), install into a scratch root,
#   file list and modes, scriptlets (upgrade must reload, not restart), and
#   the installed binary's check of the installed default config.
# Exits non-zero on the first failure.
#
# Usage: rpm/build-and-check.sh [OUTPUT_DIR]   (default: target/rpm-out)
# RPM_NEWER=1 also writes OUTPUT_DIR/newer/: the same package with Release
# N+1 (for upgrade tests), packaging the binary this build left in
# $CARGO_TARGET_DIR/release without running cargo again.
# RPM_NO_CARGO=1 does not run cargo at all, not even for the first package:
# it packages $CARGO_TARGET_DIR/release/pingora-lb as it is (a quick local
# check; that binary may not match the working tree).
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
# The crates are not vendored here: this build reuses the tests' release build in
# CARGO_TARGET_DIR, from the registry's sources (tests/packaging/hermetic-build.sh
# builds the vendored tarball offline).
"$REPO/tools/source-tarball.sh" "$TMP/SOURCES"
cp "$REPO/dist/pingora-lb.sysusers" "$TMP/SOURCES/$NAME.sysusers"
cp "$SPEC" "$TMP/SPECS/"
cp "$SPEC" "$TMP/SOURCES/"

# A stand-in for cargo on PATH: %build's `cargo build` then does nothing, and
# %install packages the binary already in $CARGO_TARGET_DIR/release.
mkdir -p "$TMP/no-cargo"
cat >"$TMP/no-cargo/cargo" <<'NOCARGO'
#!/bin/sh
echo "rpm/build-and-check.sh: cargo $* not run: $CARGO_TARGET_DIR/release/pingora-lb is packaged as it is" >&2
test -x "$CARGO_TARGET_DIR/release/pingora-lb"
NOCARGO
chmod +x "$TMP/no-cargo/cargo"
NO_CARGO_PATH=$TMP/no-cargo:$PATH

step "rpmbuild -bb (CARGO_TARGET_DIR=$CARGO_TARGET_DIR${RPM_NO_CARGO:+, cargo not run})"
# --nodeps: on a Debian host the rpm database is empty, so every
# BuildRequires would count as missing although dpkg has them installed.
if [ "${RPM_NO_CARGO:-}" = 1 ]; then
    PATH=$NO_CARGO_PATH rpmbuild -bb --nodeps --define "_topdir $TMP" "$TMP/SPECS/$NAME.spec"
else
    rpmbuild -bb --nodeps --define "_topdir $TMP" "$TMP/SPECS/$NAME.spec"
fi
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
expect '-rwxr-xr-x' /usr/libexec/pingora-lb/reload-after-upgrade
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
/usr/libexec/pingora-lb
/usr/libexec/pingora-lb/reload-after-upgrade
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
cmp "$EXTRACT/usr/libexec/pingora-lb/reload-after-upgrade" "$REPO/dist/reload-after-upgrade"
cmp "$EXTRACT/etc/pingora-lb/pingora-lb.yaml" "$REPO/dist/pingora-lb.yaml"
cmp "$EXTRACT/usr/lib/sysusers.d/pingora-lb.conf" "$REPO/dist/pingora-lb.sysusers"
cmp "$EXTRACT/usr/share/doc/pingora-lb/examples/keepalived.conf" "$REPO/dist/keepalived/keepalived.conf"

step "scriptlets (rpm -qp --scripts)"
SCRIPTS=$(rpm -qp --scripts "$RPM")
echo "$SCRIPTS"
# An upgrade must reload the unit, never restart it: %pre notes that the old
# version serves, %posttrans hands over to the new binary with the shared
# reload-after-upgrade (which restarts only when the new binary cannot take
# over), and the old package's %postun leaves the service alone.
scriptlet() { echo "$SCRIPTS" | sed -n "/^$1 scriptlet/,/^[a-z]* *scriptlet/p"; }
scriptlet preinstall | grep -q 'rpm-state/pingora-lb/was-active' ||
    fail "%pre does not note whether the service runs"
scriptlet posttrans | grep -q '/usr/libexec/pingora-lb/reload-after-upgrade systemctl' ||
    fail "%posttrans does not reload the service after an upgrade"
if scriptlet postuninstall | grep -Eq 'restart|reload-or'; then
    fail "%postun restarts or reloads the service"
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

if [ "${RPM_NEWER:-}" = 1 ]; then
    step "the same package with Release N+1, for upgrade tests (cargo not run)"
    REL=$(sed -n 's/^Release:[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$SPEC")
    [ -n "$REL" ] || fail "no numeric Release in $SPEC"
    mkdir -p "$TMP/SPECS-newer" "$OUT/newer"
    sed "s/^\(Release:[[:space:]]*\)$REL/\1$((REL + 1))/" "$SPEC" >"$TMP/SPECS-newer/$NAME.spec"
    PATH=$NO_CARGO_PATH rpmbuild -bb --nodeps --quiet --define "_topdir $TMP" "$TMP/SPECS-newer/$NAME.spec"
    NEWER=$(find "$TMP/RPMS" -name "$NAME-$VERSION-$((REL + 1)).*rpm" ! -name '*debug*' | head -n1)
    [ -n "$NEWER" ] || fail "rpmbuild produced no $NAME-$VERSION-$((REL + 1)) package"
    rm -f "$OUT/newer/$NAME"-*.rpm
    cp "$NEWER" "$OUT/newer/"
    echo "built (newer): $OUT/newer/$(basename "$NEWER")"
fi

printf '\nOK: %s\n' "$OUT/$(basename "$RPM")"
