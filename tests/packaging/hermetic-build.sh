#!/bin/bash
# The Debian package built as a build daemon would: from the vendored source tarball
# (tools/source-tarball.sh --vendor), unpacked at another path, inside a network namespace
# of its own (`unshare --net`: no network at all) with an empty CARGO_HOME. Then:
#   - the binary links the system OpenSSL (libssl.so.3, libcrypto.so.3), not a vendored copy;
#   - reproducibility: the binary, and the .deb, are byte-identical to the ones CI built from
#     the working tree with the registry's crates (tests/packaging/deb-build.sh): another
#     path, another CARGO_HOME, crates from vendor/ instead of the registry, a build from
#     scratch; only SOURCE_DATE_EPOCH (from debian/changelog) and the path renaming of
#     tools/path-remap-flags are shared;
#   - the RPM spec builds in the same tree, offline too (rpmbuild --build-in-place), and
#     cargo finds the build above up to date: the same flags and sources;
#   - then, in that tree, a deliberately incompatible build (PINGORA_LB_HANDOFF_PROTOCOL=99,
#     only this crate is compiled again) for the system test's failed-upgrade case:
#     $CARGO_TARGET_DIR/handoff-incompatible/pingora-lb.
#
# Usage (as root, for unshare): tests/packaging/hermetic-build.sh REFERENCE.deb
#   REFERENCE.deb: the package deb-build.sh made; its binary must be
#   $CARGO_TARGET_DIR/release/pingora-lb.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
reference_deb=$(realpath "$1")
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
reference_bin=$CARGO_TARGET_DIR/release/pingora-lb

fail() { echo "FAIL: $*" >&2; exit 1; }
step() { printf '\n--> %s (%ss)\n' "$*" "$SECONDS"; }

for tool in unshare dpkg-buildpackage rpmbuild readelf cmp; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done
[ -x "$reference_bin" ] || fail "no $reference_bin"

work=$(mktemp -d "${TMPDIR:-/tmp}/pingora-lb-hermetic.XXXXXX")
trap 'rm -rf "$work"' EXIT

step "vendored source tarball"
tarball=$("$repo/tools/source-tarball.sh" --vendor "$work/dist")
ls -l "$tarball"
mkdir -p "$work/build" "$work/cargo-home" "$work/home"
tar -C "$work/build" -xzf "$tarball"
tree=$(echo "$work"/build/pingora-lb-*)

# The toolchain itself, not rustup's proxies (they would look for their home in CARGO_HOME).
toolchain=$(rustc --print sysroot)/bin
[ -x "$toolchain/cargo" ] || fail "no cargo in $toolchain"
# offline COMMAND...: runs COMMAND in the unpacked tree with no network, a clean
# environment and an empty CARGO_HOME.
offline() {
    (cd "$tree" && unshare --net -- env -i PATH="$toolchain:/usr/sbin:/usr/bin:/sbin:/bin" \
        HOME="$work/home" CARGO_HOME="$work/cargo-home" LANG=C.UTF-8 "$@")
}

step "no network in the build's namespace"
offline ip -o link show | tee "$work/links"
[ "$(grep -cv ': lo:' "$work/links")" -eq 0 ] || fail "the namespace has a link other than lo"
if offline cargo search --limit 1 pingora >/dev/null 2>&1; then
    fail "cargo reached the registry from inside the namespace"
fi

step "dpkg-buildpackage -b, offline, at $tree"
offline dpkg-buildpackage -us -uc -b >"$work/dpkg-buildpackage.log" 2>&1 || {
    tail -n 40 "$work/dpkg-buildpackage.log"
    fail "the offline Debian build failed (log above)"
}
grep -E '^ *(Compiling|Finished)' "$work/dpkg-buildpackage.log" | tail -n 3
[ -z "$(ls -A "$work/cargo-home")" ] || [ ! -d "$work/cargo-home/registry" ] ||
    fail "the build downloaded into CARGO_HOME: $(ls "$work/cargo-home/registry")"
deb=$(echo "$work"/build/pingora-lb_*.deb)
[ -f "$deb" ] || fail "no .deb was built"
bin=$tree/target/release/pingora-lb

step "the binary links the system OpenSSL"
needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
echo "$needed"
grep -qx 'libssl.so.3' <<<"$needed" || fail "the binary does not link libssl.so.3"
grep -qx 'libcrypto.so.3' <<<"$needed" || fail "the binary does not link libcrypto.so.3"

step "reproducible: the same binary and package as the build from the working tree"
if cmp "$bin" "$reference_bin"; then
    echo "identical: $(sha256sum <"$bin" | cut -c1-16) $bin"
else
    # What differs, for the log: embedded paths are the usual suspect.
    diff <(strings -n 8 "$reference_bin") <(strings -n 8 "$bin") | head -n 20 || true
    fail "the offline build's binary differs from $reference_bin"
fi
if cmp "$deb" "$reference_deb"; then
    echo "identical: $(sha256sum <"$deb" | cut -c1-16) $(basename "$deb")"
else
    mkdir -p "$work/a" "$work/b"
    dpkg-deb -R "$reference_deb" "$work/a"
    dpkg-deb -R "$deb" "$work/b"
    diff -r "$work/a" "$work/b" | head -n 20 || true
    fail "the offline build's .deb differs from $reference_deb"
fi

step "rpmbuild --build-in-place, offline, in the same tree"
mkdir -p "$work/rpm"
offline rpmbuild -bb --nodeps --build-in-place --define "_topdir $work/rpm" \
    --define "_sourcedir $tree/dist" rpm/pingora-lb.spec >"$work/rpmbuild.log" 2>&1 || {
    tail -n 40 "$work/rpmbuild.log"
    fail "the offline RPM build failed (log above)"
}
rpm=$(find "$work/rpm/RPMS" -name 'pingora-lb-[0-9]*.rpm' | head -n1)
[ -n "$rpm" ] || fail "rpmbuild produced no package"
# Each package strips the binary its own way; the same build is what cargo says.
if grep -E '^ *Compiling ' "$work/rpmbuild.log"; then
    fail "cargo compiled again for the RPM: its build differs from the Debian one"
fi
echo "built: $(basename "$rpm"), from the same cargo build"

step "a deliberately incompatible build: handoff protocol 99"
offline env RUSTFLAGS="$(sh "$tree/tools/path-remap-flags" "$tree")" PINGORA_LB_HANDOFF_PROTOCOL=99 \
    cargo build --release --locked --offline --bin pingora-lb 2>&1 | grep -E '^ *(Compiling|Finished)'
mkdir -p "$CARGO_TARGET_DIR/handoff-incompatible"
install -m 0755 "$bin" "$CARGO_TARGET_DIR/handoff-incompatible/pingora-lb"
echo "built: $CARGO_TARGET_DIR/handoff-incompatible/pingora-lb"
echo "OK: offline, reproducible, system OpenSSL"
