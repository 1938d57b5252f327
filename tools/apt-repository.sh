#!/usr/bin/env bash
# Publish .deb files in a signed apt repository (a directory to serve over HTTPS as it is).
#
# Usage:
#   tools/apt-repository.sh --key KEYID --url URL [options] REPO_DIR [PACKAGE.deb...]
#
# Options:
#   --key KEYID        the OpenPGP key that signs the repository (RSA 3072 or larger: older
#                      apt/gpgv and many keyservers handle nothing else well); required
#   --gpg-home DIR     the gpg home holding its secret key (default: $GNUPGHOME, else gpg's own);
#                      a key without a passphrase, or a gpg-agent that already has it
#   --url URL          where clients will find REPO_DIR (https://..., or file:/... for a local
#                      copy); written into pingora-lb.sources; required
#   --suite NAME       default: stable
#   --component NAME   default: main
#   --keyring PATH     where clients keep the public key, named by Signed-By in the snippet
#                      (default: /etc/apt/keyrings/pingora-lb.gpg, as sources.list(5) suggests
#                      for keys no package manages)
#
# The packages given are copied into REPO_DIR/pool/COMPONENT/p/NAME/ (a file already there under
# the same name must be identical: a published version never changes), then the indexes are made
# again from everything in the pool with apt-ftparchive (apt-utils) and signed with gpg: InRelease
# (clear-signed) and Release.gpg (detached). Older versions stay in the pool and the indexes, so
# clients can still install or downgrade to them. Run it again with no package to re-sign (e.g.
# with a new key). REPO_DIR also gets:
#   pingora-lb.gpg        the public key (binary keyring, the format Signed-By wants)
#   pingora-lb.asc        the same key, ASCII-armored (to publish, or to compare fingerprints)
#   pingora-lb.sources    a deb822 sources snippet for clients (from tools/pingora-lb.sources.in)
#
# A client then does (as root):
#   install -d -m 0755 /etc/apt/keyrings
#   curl -fsSLo /etc/apt/keyrings/pingora-lb.gpg URL/pingora-lb.gpg
#   curl -fsSLo /etc/apt/sources.list.d/pingora-lb.sources URL/pingora-lb.sources
#   apt-get update && apt-get install pingora-lb
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
NAME=pingora-lb
KEY=
GPG_HOME=${GNUPGHOME:-}
URL=
SUITE=stable
COMPONENT=main
KEYRING=/etc/apt/keyrings/$NAME.gpg

die() { echo "apt-repository: $*" >&2; exit 1; }
usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case $1 in
    --key) KEY=${2:?}; shift 2 ;;
    --gpg-home) GPG_HOME=${2:?}; shift 2 ;;
    --url) URL=${2:?}; shift 2 ;;
    --suite) SUITE=${2:?}; shift 2 ;;
    --component) COMPONENT=${2:?}; shift 2 ;;
    --keyring) KEYRING=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    --) shift; break ;;
    -*) die "unknown option $1" ;;
    *) break ;;
    esac
done
[ $# -ge 1 ] || usage
[ -n "$KEY" ] || die "--key KEYID is required"
[ -n "$URL" ] || die "--url URL is required"
for v in "$SUITE" "$COMPONENT"; do
    [[ $v =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "bad suite or component name: $v"
done
for tool in apt-ftparchive dpkg-deb gpg gzip; do
    command -v "$tool" >/dev/null || die "$tool is not installed (apt-ftparchive: package apt-utils)"
done
REPO=$1
shift
mkdir -p "$REPO"
REPO=$(cd "$REPO" && pwd)

gpg_() {
    if [ -n "$GPG_HOME" ]; then
        timeout 60 gpg --batch --quiet --no-tty --homedir "$GPG_HOME" "$@"
    else
        timeout 60 gpg --batch --quiet --no-tty "$@"
    fi
}
gpg_ --list-secret-keys "$KEY" >/dev/null 2>&1 || die "no secret key $KEY${GPG_HOME:+ in $GPG_HOME}"

# Add the packages to the pool.
for deb in "$@"; do
    [ -f "$deb" ] || die "no such file: $deb"
    pkg=$(dpkg-deb -f "$deb" Package) || die "$deb is not a .deb"
    ver=$(dpkg-deb -f "$deb" Version)
    arch=$(dpkg-deb -f "$deb" Architecture)
    case $pkg in lib?*) prefix=${pkg:0:4} ;; *) prefix=${pkg:0:1} ;; esac
    dir=$REPO/pool/$COMPONENT/$prefix/$pkg
    # The archive's own naming, with an epoch's colon left out.
    file=${pkg}_${ver#*:}_$arch.deb
    if [ -e "$dir/$file" ]; then
        cmp -s "$deb" "$dir/$file" ||
            die "$pkg $ver ($arch) is already published with other contents: a version never changes, publish a new one"
        echo "already published: $pkg $ver ($arch)"
        continue
    fi
    mkdir -p "$dir"
    cp "$deb" "$dir/$file.tmp"
    mv "$dir/$file.tmp" "$dir/$file"
    echo "added: $pkg $ver ($arch)"
done

# The architectures in the pool ("all" packages go into every architecture's index).
mapfile -t debs < <(find "$REPO/pool" -name '*.deb' -type f 2>/dev/null | sort)
[ ${#debs[@]} -gt 0 ] || die "the pool is empty: give at least one package"
archs=$(for d in "${debs[@]}"; do dpkg-deb -f "$d" Architecture; done | { grep -vx all || true; } | sort -u | xargs)
[ -n "$archs" ] || archs=$(dpkg --print-architecture)

# Indexes and Release into a new dists tree, then swap it in.
NEW=$REPO/dists.new
rm -rf "$NEW"
for arch in $archs; do
    out=$NEW/$SUITE/$COMPONENT/binary-$arch
    mkdir -p "$out"
    (cd "$REPO" && apt-ftparchive --arch "$arch" packages "pool/$COMPONENT") >"$out/Packages"
    gzip -9n <"$out/Packages" >"$out/Packages.gz"
done
(
    cd "$NEW/$SUITE"
    apt-ftparchive \
        -o APT::FTPArchive::Release::Origin="$NAME" \
        -o APT::FTPArchive::Release::Label="$NAME" \
        -o APT::FTPArchive::Release::Suite="$SUITE" \
        -o APT::FTPArchive::Release::Codename="$SUITE" \
        -o APT::FTPArchive::Release::Architectures="$archs" \
        -o APT::FTPArchive::Release::Components="$COMPONENT" \
        -o APT::FTPArchive::Release::Description="$NAME packages" \
        release . >"$NEW/Release.tmp"
)
mv "$NEW/Release.tmp" "$NEW/$SUITE/Release"
gpg_ --yes --local-user "$KEY" --digest-algo SHA512 --clearsign \
    --output "$NEW/$SUITE/InRelease" "$NEW/$SUITE/Release" || die "gpg could not sign with $KEY"
gpg_ --yes --local-user "$KEY" --digest-algo SHA512 --armor --detach-sign \
    --output "$NEW/$SUITE/Release.gpg" "$NEW/$SUITE/Release" || die "gpg could not sign with $KEY"
# Keep any other suite already published; replace this one.
mkdir -p "$REPO/dists"
rm -rf "$REPO/dists/$SUITE.old"
[ -d "$REPO/dists/$SUITE" ] && mv "$REPO/dists/$SUITE" "$REPO/dists/$SUITE.old"
mv "$NEW/$SUITE" "$REPO/dists/$SUITE"
rm -rf "$REPO/dists/$SUITE.old" "$NEW"

# The public key and the client's sources snippet.
if ! gpg_ --export "$KEY" >"$REPO/$NAME.gpg.tmp" || [ ! -s "$REPO/$NAME.gpg.tmp" ]; then
    die "cannot export key $KEY"
fi
mv "$REPO/$NAME.gpg.tmp" "$REPO/$NAME.gpg"
gpg_ --armor --export "$KEY" >"$REPO/$NAME.asc"
template=$(<"$HERE/$NAME.sources.in")
template=${template//@URL@/"$URL"}
template=${template//@SUITE@/"$SUITE"}
template=${template//@COMPONENT@/"$COMPONENT"}
template=${template//@KEYRING@/"$KEYRING"}
printf '%s\n' "$template" >"$REPO/$NAME.sources"

fpr=$(gpg_ --with-colons --fingerprint "$KEY" | awk -F: '$1 == "fpr" { print $10; exit }')
echo "published $REPO ($SUITE/$COMPONENT, $archs; ${#debs[@]} package file(s)), signed by $fpr"
