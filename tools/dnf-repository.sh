#!/usr/bin/env bash
# Publish .rpm files in a signed dnf/yum repository (a directory to serve over HTTPS as it is).
#
# Usage:
#   tools/dnf-repository.sh --key KEYID --url URL [options] REPO_DIR [PACKAGE.rpm...]
#
# Options:
#   --key KEYID        the OpenPGP key that signs the packages and the metadata; an RSA key
#                      (3072 bits or more): the rpm of EL8 and older cannot check EdDSA
#                      signatures; required
#   --gpg-home DIR     the gpg home holding its secret key (default: $GNUPGHOME, else gpg's own);
#                      a key without a passphrase, or a gpg-agent that already has it
#   --url URL          where clients will find REPO_DIR (https://..., or file:///... for a local
#                      copy); written into pingora-lb.repo; required
#   --key-url URL      where clients fetch the public key (default: URL/RPM-GPG-KEY-pingora-lb)
#
# The packages given are signed with rpmsign (rpm-sign on Fedora, rpm on Debian) as they are
# copied into REPO_DIR/Packages/ (the files given are left unsigned; a package already there
# under the same name must be the same build: a published version never changes). Then
# createrepo_c makes the metadata from everything in Packages/ again, and gpg signs
# repodata/repomd.xml (repodata/repomd.xml.asc, what dnf checks with repo_gpgcheck=1). Older
# versions stay. Run it again with no package to re-sign the metadata. REPO_DIR also gets:
#   RPM-GPG-KEY-pingora-lb  the public key, ASCII-armored (dnf imports it from gpgkey=)
#   pingora-lb.repo         the client's repository file (from tools/pingora-lb.repo.in):
#                           gpgcheck=1 and repo_gpgcheck=1
#
# A client then does (as root):
#   curl -fsSLo /etc/yum.repos.d/pingora-lb.repo URL/pingora-lb.repo
#   dnf install pingora-lb        (asks once to import the key; compare its fingerprint)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
NAME=pingora-lb
KEY=
GPG_HOME=${GNUPGHOME:-}
URL=
KEY_URL=

die() { echo "dnf-repository: $*" >&2; exit 1; }
usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case $1 in
    --key) KEY=${2:?}; shift 2 ;;
    --gpg-home) GPG_HOME=${2:?}; shift 2 ;;
    --url) URL=${2:?}; shift 2 ;;
    --key-url) KEY_URL=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    --) shift; break ;;
    -*) die "unknown option $1" ;;
    *) break ;;
    esac
done
[ $# -ge 1 ] || usage
[ -n "$KEY" ] || die "--key KEYID is required"
[ -n "$URL" ] || die "--url URL is required"
KEY_URL=${KEY_URL:-${URL%/}/RPM-GPG-KEY-$NAME}
for tool in createrepo_c rpmsign rpm gpg; do
    command -v "$tool" >/dev/null || die "$tool is not installed (packages createrepo-c, rpm, gnupg)"
done
REPO=$1
shift
mkdir -p "$REPO/Packages"
REPO=$(cd "$REPO" && pwd)
if [ -n "$GPG_HOME" ]; then
    GPG_HOME=$(cd "$GPG_HOME" && pwd)
    export GNUPGHOME=$GPG_HOME
fi

gpg_() { timeout 60 gpg --batch --quiet --no-tty "$@"; }
gpg_ --list-secret-keys "$KEY" >/dev/null 2>&1 || die "no secret key $KEY${GPG_HOME:+ in $GPG_HOME}"
algo=$(gpg_ --with-colons --list-secret-keys "$KEY" | awk -F: '$1 == "sec" { print $4; exit }')
[ "$algo" = 1 ] ||
    echo "dnf-repository: warning: $KEY is not an RSA key: the rpm of EL8 and older cannot check its signatures" >&2

# The ids rpm shows in a package's signature: the last 16 hex digits of the fingerprint of the
# key, or of its subkey that signs.
fprs=$(gpg_ --with-colons --fingerprint --fingerprint "$KEY" | awk -F: '$1 == "fpr" { print tolower($10) }')
fpr=$(head -n 1 <<<"$fprs")

# A build's identity, unchanged by signing: the SHA-256 of its header (which holds the
# payload's digest).
build_id() { rpm -qp --nosignature --qf '%{SHA256HEADER} %{NAME} %{EVR} %{ARCH}' "$1" 2>/dev/null; }

for rpm in "$@"; do
    [ -f "$rpm" ] || die "no such file: $rpm"
    id=$(build_id "$rpm") || die "$rpm is not an rpm package"
    read -r _ n evr arch <<<"$id"
    [ "$arch" != src ] || die "$rpm: source packages are not published here"
    file=$n-${evr#*:}.$arch.rpm   # no epoch in the file name
    dest=$REPO/Packages/$file
    if [ -e "$dest" ]; then
        [ "$(build_id "$dest")" = "$id" ] ||
            die "$n $evr ($arch) is already published from another build: a version never changes, publish a new one"
        echo "already published: $n $evr ($arch)"
        continue
    fi
    cp "$rpm" "$dest.tmp"
    mv "$dest.tmp" "$dest"
    echo "added: $n $evr ($arch)"
done

mapfile -t rpms < <(find "$REPO/Packages" -name '*.rpm' -type f | sort)
[ ${#rpms[@]} -gt 0 ] || die "Packages/ is empty: give at least one package"
# Every package must carry this key's signature: sign the new ones, and the older ones again
# after a change of key.
for rpm in "${rpms[@]}"; do
    sig=$(rpm -qp --nosignature --qf '%|RSAHEADER?{%{RSAHEADER:pgpsig}}:{%{DSAHEADER:pgpsig}}|' "$rpm" 2>/dev/null)
    keyid=
    [[ $sig == *"Key ID "* ]] && keyid=${sig##*Key ID }
    if [ -n "$keyid" ] && grep -q -- "${keyid,,}\$" <<<"$fprs"; then
        continue
    fi
    # rpm's macros run gpg (Debian's rpm looks for it as gpg2): --batch and --no-tty, no
    # prompt, no terminal.
    if ! out=$(timeout 120 rpmsign --addsign --define "__gpg $(command -v gpg)" --define "_gpg_name $KEY" \
        ${GPG_HOME:+--define "_gpg_path $GPG_HOME"} \
        --define "_gpg_sign_cmd_extra_args --batch --no-tty" \
        --define "_gpg_digest_algo sha256" "$rpm" 2>&1 </dev/null); then
        printf '%s\n' "$out" >&2
        die "rpmsign could not sign $rpm with $KEY"
    fi
    echo "signed: $(basename "$rpm")"
done

# Metadata: gzip (every dnf and yum reads it), no sqlite databases (dnf does not use them).
timeout 300 createrepo_c --quiet --no-database --general-compress-type=gz "$REPO" >/dev/null ||
    die "createrepo_c failed"
gpg_ --yes --local-user "$KEY" --digest-algo SHA512 --armor --detach-sign \
    --output "$REPO/repodata/repomd.xml.asc" "$REPO/repodata/repomd.xml" ||
    die "gpg could not sign repodata/repomd.xml with $KEY"

if ! gpg_ --armor --export "$KEY" >"$REPO/RPM-GPG-KEY-$NAME.tmp" || [ ! -s "$REPO/RPM-GPG-KEY-$NAME.tmp" ]; then
    die "cannot export key $KEY"
fi
mv "$REPO/RPM-GPG-KEY-$NAME.tmp" "$REPO/RPM-GPG-KEY-$NAME"
template=$(<"$HERE/$NAME.repo.in")
template=${template//@URL@/"$URL"}
template=${template//@KEY_URL@/"$KEY_URL"}
printf '%s\n' "$template" >"$REPO/$NAME.repo"

echo "published $REPO (${#rpms[@]} package file(s)), packages and repomd.xml signed by $fpr"
