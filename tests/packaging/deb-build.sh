#!/bin/bash
# Build the .deb from the working tree with dpkg-buildpackage and lint it.
#
# Usage: tests/packaging/deb-build.sh [OUTPUT_DIR]
#   OUTPUT_DIR defaults to /work/main/target/debian-out.
# CARGO_TARGET_DIR defaults to the repository's target/, so the release build
# made for the tests is reused as is (same sources, same path: nothing is
# compiled again if it is up to date).
#
# Fails if the build fails or lintian reports an error (E:); warnings and
# other tags are printed only.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-/work/main/target/debian-out}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"

fail() { echo "FAIL: $*" >&2; exit 1; }

for tool in dpkg-buildpackage dpkg-parsechangelog lintian; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done

cd "$REPO"
SOURCE=$(dpkg-parsechangelog -S Source)
VERSION=$(dpkg-parsechangelog -S Version)
ARCH=$(dpkg --print-architecture)
CHANGES=../${SOURCE}_${VERSION}_${ARCH}.changes
mkdir -p "$OUT"

# dpkg-buildpackage writes its results next to the source tree. Move away
# any left from an earlier run so that only this run's files are collected.
rm -f "../${SOURCE}_${VERSION}_${ARCH}".{changes,buildinfo} \
      "../${SOURCE}"{,-dbgsym}_"${VERSION}_${ARCH}".{deb,ddeb}

echo "==> dpkg-buildpackage -us -uc -b (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
dpkg-buildpackage -us -uc -b
[ -f "$CHANGES" ] || fail "dpkg-buildpackage wrote no $CHANGES"

# Collect everything the .changes lists (the .deb, a -dbgsym package if any,
# the .buildinfo), then the .changes itself.
FILES=$(sed -n '/^Files:/,/^[^ ]/{/^ /p}' "$CHANGES" | awk '{print $NF}')
for f in $FILES; do
    mv -f "../$f" "$OUT/"
done
mv -f "$CHANGES" "$OUT/"
DEB=$OUT/${SOURCE}_${VERSION}_${ARCH}.deb
[ -f "$DEB" ] || fail "no $DEB"

# Leave the tree as it was: debhelper's build directories under debian/.
debian/rules clean >/dev/null

echo "==> contents of $DEB"
dpkg-deb --info "$DEB"
CONTENTS=$(dpkg-deb --contents "$DEB")
echo "$CONTENTS"
grep -Eq ' \./usr/share/doc/pingora-lb/examples/keepalived\.conf(\.gz)?$' <<<"$CONTENTS" ||
    fail "the keepalived example is not in /usr/share/doc/pingora-lb/examples"
grep -Eq '^-rwxr-xr-x root/root .* \./usr/libexec/pingora-lb/reload-after-upgrade$' <<<"$CONTENTS" ||
    fail "/usr/libexec/pingora-lb/reload-after-upgrade is missing or not executable"

echo "==> lintian --allow-root $DEB"
# --fail-on error: exit status non-zero only for E: tags. Tags are printed
# including informational ones (I:).
status=0
lintian --allow-root --display-info --fail-on error "$DEB" || status=$?
[ "$status" -eq 0 ] || fail "lintian reported errors (exit status $status)"

echo "OK: $DEB"
