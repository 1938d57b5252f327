#!/bin/bash
# Makes the source tarball NAME-VERSION.tar.gz from the working tree: the RPM spec's Source0,
# and what an offline Debian or RPM build starts from.
#
# With --vendor, every crate of Cargo.lock goes in too (`cargo vendor --versioned-dirs`,
# under vendor/), with the cargo configuration that reads them from there: the packages
# then build with no network and an empty CARGO_HOME (debian/rules and the spec pass
# --offline when vendor/ exists). Vendoring needs the crates, from the registry or its cache.
#
# The tarball is reproducible: the files of the working tree as git sees them (tracked, and
# untracked ones not ignored: uncommitted work is included, build output never), sorted,
# owned by root, dated SOURCE_DATE_EPOCH (default: the last commit's time), gzip -n.
#
# Usage: tools/source-tarball.sh [--vendor] OUTPUT_DIR     (prints the tarball's path)
set -euo pipefail

vendor=
if [ "${1:-}" = --vendor ]; then
    vendor=1
    shift
fi
[ $# -eq 1 ] || { echo "usage: $0 [--vendor] OUTPUT_DIR" >&2; exit 2; }
out=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
name=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct)}

stage=$(mktemp -d "${TMPDIR:-/tmp}/$name-tarball.XXXXXX")
trap 'rm -rf "$stage"' EXIT
tree=$stage/$name-$version
mkdir -p "$tree" "$out"

git -C "$repo" ls-files -z -co --exclude-standard |
    (cd "$repo" && while IFS= read -r -d '' file; do
        # A tracked file deleted in the working tree is not part of it.
        [ -e "$file" ] && printf '%s\0' "$file"
    done) |
    tar -C "$repo" --null -T - -cf - | tar -C "$tree" -xf -

if [ -n "$vendor" ]; then
    (cd "$repo" && cargo vendor --quiet --locked --versioned-dirs "$tree/vendor" >/dev/null)
    cat >>"$tree/.cargo/config.toml" <<'CONFIG'

# Added by tools/source-tarball.sh --vendor: every crate comes from vendor/, never the network.
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"
CONFIG
fi

tarball=$out/$name-$version.tar.gz
tar -C "$stage" --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -cf - "$name-$version" | gzip -n >"$tarball"
echo "$tarball"
