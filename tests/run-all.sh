#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint and the bundled licences, unit and integration
# tests on the real binary (as root: privilege tests need it; the integration tests twice,
# with the fast path on and off), the .deb built and linted, the
# .rpm built, linted and installed into a scratch root, a signed dnf repository read by dnf,
# the vendored source tarball built offline (unshare -n) and compared byte for byte with the
# first build, the Nix files checked, a keepalived pair failed over in network namespaces,
# and, in a real systemd booted in a container, the package installed by name from a signed
# apt repository, reloaded and upgraded under load (also across an incompatible handoff
# protocol), purged, then the RPM's scriptlets run for real.
#
# Usage: sudo bash tests/run-all.sh        (installs what a fresh Debian machine lacks)
# SKIP_SYSTEM=1 leaves out the systemd container test.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n==> %s (%ss)\n' "$*" "$SECONDS"; }

[ "$(id -u)" = 0 ] || { echo "run as root: the privilege and packaging tests need it" >&2; exit 1; }

step "system packages"
packages=(build-essential cmake pkg-config libssl-dev debhelper fakeroot lintian rpm rpmlint
          nix-bin shellcheck mmdebstrap systemd-container curl python3 wrk haproxy nginx-light
          chromium keepalived iproute2 openssl apt-utils gnupg createrepo-c dnf)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The packaged haproxy and nginx are only used by the benchmark, keepalived by the HA
# test in its own network namespaces: keep the system's services stopped.
systemctl disable --now haproxy nginx keepalived >/dev/null 2>&1 || true

step "cargo fetch, and the build flags every build below shares"
cargo fetch --locked
# The packages' builds (debian/rules, the spec) rename the crates' source paths; the
# tests' build uses the same flags, so the packages reuse it instead of rebuilding all.
RUSTFLAGS=$(tools/path-remap-flags)
export RUSTFLAGS

step "cargo fmt --check"
cargo fmt --all -- --check

step "bundled licences match Cargo.lock"
python3 tools/bundled-licenses.py --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test --release (unit and integration tests)"
# The status page test renders the page in headless Chromium; here it may not skip.
PINGORA_LB_REQUIRE_CHROMIUM=1 cargo test --release --locked

step "integration tests again, with the fast path off (every request through pingora-proxy)"
PINGORA_LB_TEST_FAST_PATH=off cargo test --release --locked --test '*'

step "Debian package: dpkg-buildpackage and lintian"
rm -rf "$CARGO_TARGET_DIR/debian-out"
bash tests/packaging/deb-build.sh "$CARGO_TARGET_DIR/debian-out"

step "RPM package: rpmbuild, rpmlint, install into a scratch root"
# RPM_NEWER=1: also a build with Release N+1 (the same binary, cargo not run again) in
# rpm-out/newer/, for the upgrade in the system test.
rm -rf "$CARGO_TARGET_DIR/rpm-out"
RPM_NEWER=1 bash rpm/build-and-check.sh "$CARGO_TARGET_DIR/rpm-out"
RPM_FILE=$(find "$CARGO_TARGET_DIR/rpm-out" -maxdepth 1 -name 'pingora-lb-*.rpm' | head -n 1)
RPM_NEWER_FILE=$(find "$CARGO_TARGET_DIR/rpm-out/newer" -name 'pingora-lb-*.rpm' | head -n 1)

step "dnf repository: tools/dnf-repository.sh, signed, read by dnf (and refused when signed by another key)"
bash tests/packaging/dnf-repository-check.sh "$RPM_FILE" "$RPM_NEWER_FILE"

step "offline and reproducible: the vendored tarball built in unshare -n, compared with the build above"
# Also makes $CARGO_TARGET_DIR/handoff-incompatible/pingora-lb for the system test.
bash tests/packaging/hermetic-build.sh "$CARGO_TARGET_DIR"/debian-out/pingora-lb_*.deb

step "Nix: parse, deadnix, nixpkgs-fmt, flake evaluation, unit drift"
for tool in deadnix nixpkgs-fmt; do
    command -v "$tool" >/dev/null || cargo install --locked --quiet "$tool"
done
PINGORA_LB_BIN="$CARGO_TARGET_DIR/release/pingora-lb" bash tests/nix/check.sh

step "HA pair: the keepalived example, and a failover with real keepalived in network namespaces"
bash tests/ha/example-config.sh "$CARGO_TARGET_DIR/release/pingora-lb"
bash tests/ha/failover.sh "$CARGO_TARGET_DIR/release/pingora-lb"

if [ "${SKIP_SYSTEM:-}" != 1 ]; then
    step "systemd: apt install, reload under load, package upgrade, purge"
    # The build speaking another handoff protocol (hermetic-build.sh made it): the upgrade
    # that must fall back to a restart.
    SYSTEST_RPM=$RPM_FILE SYSTEST_RPM_NEWER=$RPM_NEWER_FILE \
    SYSTEST_INCOMPATIBLE_BIN=$CARGO_TARGET_DIR/handoff-incompatible/pingora-lb \
        bash tests/system/deb-in-systemd.sh "$CARGO_TARGET_DIR"/debian-out/pingora-lb_*.deb
fi

step "all tests passed"
