#!/usr/bin/env bash
# Offline checks of the Nix packaging (flake.nix, nixos-module/): everything that can be
# proven without nixpkgs, which cannot be downloaded where CI runs. Building the package and
# running the NixOS VM test (`nix flake check` with the real nixpkgs) is for machines that
# have Nix and network access.
#
# This script installs nothing. CI (as root) installs beforehand:
#   apt-get install -y nix-bin shellcheck     # Nix >= 2.8; shellcheck is optional
#   cargo install --locked deadnix nixpkgs-fmt
#   python3 with PyYAML                        # the machine image has it (pip PyYAML)
#
# What it checks:
#   1. every .nix file parses (nix-instantiate --parse);
#   2. deadnix --fail (no unused bindings) and nixpkgs-fmt --check (formatting);
#   3. drift: nixos-module/unit-settings.nix against dist/pingora-lb.service and
#      nixos-module/config-defaults.nix against dist/pingora-lb.yaml, key by key; and the
#      module's unit, evaluated with a stub of nixpkgs' lib (tests/nix/eval-unit.nix): a
#      switch to a new package or config reloads it (reloadIfChanged, no restart trigger);
#   4. flake.lock: nixpkgs locked to a GitHub revision with its narHash, from the branch
#      flake.nix names, and Nix accepts the lock as it is (`nix flake lock
#      --no-update-lock-file --offline`: no change, no download). Then the flake evaluates:
#      `nix flake show` and `nix flake check --no-build` with the nixpkgs input replaced by
#      tests/nix/stub-nixpkgs (--override-input; the lock is neither fetched nor rewritten,
#      which is checked afterwards), and every package, check, dev shell and formatter of
#      both systems instantiates (nothing is built);
#   5. the VM test's Python script compiles (and passes pyflakes when it is installed), and
#      its load script passes shellcheck (when installed), as the test driver and
#      writeShellApplication would demand;
#   6. only with NIXPKGS_LIB=<a checkout of nixpkgs or of nix-community/nixpkgs.lib>: the
#      module evaluated with the real lib.evalModules, compared with dist/ (the unit NixOS
#      writes is the packaged one, the generated config is the packaged one) and with its
#      promises (a config change only changes reloadTriggers, firewall, accounts, ...);
#   7. only with PINGORA_LB_BIN=<a built pingora-lb>: the VM test's runtime config passes
#      `pingora-lb -t` and its misspelt one is refused naming the key; with NIXPKGS_LIB too,
#      the configs the module generates (defaults, the test machine's) pass as well.
# Exit status: non-zero when any check failed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

nix_flags=(--extra-experimental-features 'nix-command flakes' --offline)

passed=0 failed=0 skipped=0
failed_names=()

# step NAME COMMAND...: runs one check, records its result, carries on after a failure.
step() {
  local name=$1
  shift
  echo "--- $name"
  if "$@"; then
    passed=$((passed + 1))
    echo "ok   $name"
  else
    failed=$((failed + 1))
    failed_names+=("$name")
    echo "FAIL $name"
  fi
}

skip() {
  skipped=$((skipped + 1))
  echo "--- $1"
  echo "skip $1: $2"
}

missing=()
for tool in nix nix-instantiate deadnix nixpkgs-fmt python3 git; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
python3 -c 'import yaml' 2>/dev/null || missing+=("python3 module yaml (PyYAML)")
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "tests/nix/check.sh: missing tools: ${missing[*]} (see the top of this script)" >&2
  exit 2
fi
echo "using $(nix --version), $(deadnix --version), nixpkgs-fmt $(nixpkgs-fmt --version 2>&1 | awk '{print $NF}')"

# The repository's files as git sees them (tracked, plus untracked ones not ignored), so a
# developer's uncommitted work is checked too and build output never is.
git ls-files -co --exclude-standard | grep -v '^target/' | sort -u >"$work/files"
mapfile -t nix_files < <(grep '\.nix$' "$work/files")
echo "Nix files: ${nix_files[*]}"

parse_all() {
  local file ok=0
  for file in "${nix_files[@]}"; do
    nix-instantiate --parse "$file" >/dev/null || { echo "does not parse: $file"; ok=1; }
  done
  return $ok
}
step "every .nix file parses" parse_all
step "deadnix: no unused bindings" deadnix --fail "${nix_files[@]}"
step "nixpkgs-fmt: formatted" nixpkgs-fmt --check "${nix_files[@]}"

unit_drift() {
  nix-instantiate --eval --strict --json nixos-module/unit-settings.nix \
    --argstr bin /usr/bin/pingora-lb \
    --argstr configFile /etc/pingora-lb/pingora-lb.yaml \
    --argstr user pingora-lb --argstr group pingora-lb >"$work/unit.json" &&
    python3 tests/nix/checks.py unit "$work/unit.json" dist/pingora-lb.service
}
step "unit-settings.nix == dist/pingora-lb.service" unit_drift

config_drift() {
  nix-instantiate --eval --strict --json nixos-module/config-defaults.nix >"$work/defaults.json" &&
    python3 tests/nix/checks.py config "$work/defaults.json" dist/pingora-lb.yaml
}
step "config-defaults.nix == dist/pingora-lb.yaml" config_drift

unit_triggers() {
  nix-instantiate --read-write-mode --eval --strict --json tests/nix/eval-unit.nix >"$work/unit-triggers.json" &&
    python3 tests/nix/checks.py unit-triggers "$work/unit-triggers.json"
}
step "module unit: a new package or config reloads, never restarts (stub lib)" unit_triggers

# The flake is evaluated from a scratch git repository holding the same files, so that
# untracked files count and the work tree's git state does not matter.
flake="$work/flake"
mkdir "$flake"
tar -cf - -T "$work/files" | tar -xf - -C "$flake"
git -C "$flake" init -q
git -C "$flake" add -A
git -C "$flake" -c user.name=check -c user.email=check@localhost commit -q -m scratch
# The lock as committed: its nixpkgs input stays locked (never fetched here), the override
# replaces it for these evaluations only, and nothing may write the lock file.
stub=(--override-input nixpkgs "path:$flake/tests/nix/stub-nixpkgs" --no-write-lock-file --no-update-lock-file)

flake_lock() {
  [[ -f $flake/flake.lock ]] || { echo "no flake.lock: nix build would lock whatever nixpkgs is current"; return 1; }
  nix-instantiate --eval --strict --json --expr "(import $flake/flake.nix).inputs" >"$work/inputs.json" &&
    python3 tests/nix/checks.py flake-lock "$flake/flake.lock" "$work/inputs.json" &&
    sha256sum "$flake/flake.lock" >"$work/flake.lock.sha256" &&
    # Fails when flake.nix asks for an input the lock does not hold as it is (Nix would
    # have to change the lock, and download to do so).
    nix "${nix_flags[@]}" flake lock --no-update-lock-file "$flake"
}
step "flake.lock pins nixpkgs as flake.nix names it" flake_lock

step "nix flake show (stub nixpkgs)" \
  nix "${nix_flags[@]}" flake show "${stub[@]}" "$flake"
step "nix flake check --no-build (stub nixpkgs)" \
  nix "${nix_flags[@]}" flake check --no-build "${stub[@]}" "$flake"

instantiate_all() {
  # drvPath of every derivation output, for both systems (flake check covers only this one).
  local output status=0
  for output in packages checks devShells formatter; do
    nix "${nix_flags[@]}" eval --json "${stub[@]}" "$flake#$output" --apply '
      builtins.mapAttrs (_: perSystem:
        if perSystem ? drvPath then perSystem.drvPath
        else builtins.mapAttrs (_: drv: drv.drvPath) perSystem)' >"$work/$output.json" || status=1
  done
  [[ $status -eq 0 ]] && python3 tests/nix/checks.py outputs "$work"
}
step "every output of both systems instantiates" instantiate_all

lock_untouched() {
  [[ -s $work/flake.lock.sha256 ]] && sha256sum --check --quiet "$work/flake.lock.sha256" &&
    git -C "$flake" diff --quiet -- flake.lock
}
step "the flake evaluations left flake.lock as it is" lock_untouched

render_test() {
  nix-instantiate --read-write-mode --eval --strict --json tests/nix/render-test.nix >"$work/render.json" &&
    python3 tests/nix/checks.py render "$work/render.json" "$work" &&
    python3 -m py_compile "$work/testscript.py"
}
step "VM test script compiles" render_test

if python3 -c 'import pyflakes' 2>/dev/null; then
  step "VM test script passes pyflakes" python3 -m pyflakes "$work/testscript-with-driver-names.py"
else
  skip "VM test script passes pyflakes" "pyflakes is not installed (the test driver runs it)"
fi
if command -v shellcheck >/dev/null; then
  step "VM test load script passes shellcheck" shellcheck "$work/lb-load.sh"
else
  skip "VM test load script passes shellcheck" "shellcheck is not installed (writeShellApplication runs it)"
fi

if [[ -n ${NIXPKGS_LIB:-} ]]; then
  module_eval() {
    mkdir -p "$work/deep"
    python3 tests/nix/checks.py yaml-to-json dist/pingora-lb.yaml "$work/dist.json" &&
      nix-instantiate --read-write-mode --eval --strict --json tests/nix/eval-module.nix \
        --arg nixpkgsLib "$NIXPKGS_LIB" --arg distConfigJson "$work/dist.json" >"$work/eval.json" &&
      python3 tests/nix/checks.py module "$work/eval.json" dist/pingora-lb.service dist/pingora-lb.yaml &&
      python3 tests/nix/checks.py render "$work/eval.json" "$work/deep" &&
      python3 -m py_compile "$work/deep/testscript.py"
  }
  step "module evaluated with lib.evalModules (NIXPKGS_LIB=$NIXPKGS_LIB)" module_eval
else
  skip "module evaluated with lib.evalModules" "set NIXPKGS_LIB to a checkout of nixpkgs' lib"
fi

if [[ -n ${PINGORA_LB_BIN:-} ]]; then
  binary_check() {
    local status=0 path
    local -a good bad
    # The VM test's runtime configs (rendered by render-test.nix) ...
    mapfile -t good < <(grep -oE '/nix/store/[a-z0-9]+-pingora-lb-runtime-good\.yaml' "$work/testscript.py" | sort -u)
    mapfile -t bad < <(grep -oE '/nix/store/[a-z0-9]+-pingora-lb-runtime-bad\.yaml' "$work/testscript.py" | sort -u)
    # ... and, after the lib.evalModules step, the configs the module generates.
    if [[ -s $work/eval.json ]]; then
      mapfile -t -O "${#good[@]}" good < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
for c in [d["defaults"], d["vmTest"]["machine"], *d["vmTest"]["specialisations"].values()]:
    if c["generated"] is not None:
        print(c["configFile"])' "$work/eval.json")
    fi
    [[ ${#good[@]} -gt 0 && ${#bad[@]} -gt 0 ]] || { echo "no configs found to check"; return 1; }
    for path in "${good[@]}"; do
      "$PINGORA_LB_BIN" -t -c "$path" || { echo "refused: $path"; status=1; }
    done
    for path in "${bad[@]}"; do
      if "$PINGORA_LB_BIN" -t -c "$path" 2>"$work/bad.err"; then
        echo "accepted the VM test's misspelt config: $path"
        status=1
      elif ! grep -q listners "$work/bad.err"; then
        echo "the refusal does not name the misspelt key: $(cat "$work/bad.err")"
        status=1
      fi
    done
    echo "${#good[@]} configs accepted, ${#bad[@]} refused as they should be"
    return $status
  }
  step "the test's and module's configs pass pingora-lb -t ($PINGORA_LB_BIN)" binary_check
else
  skip "the test's and module's configs pass pingora-lb -t" "set PINGORA_LB_BIN to a built binary"
fi

echo
if [[ $failed -gt 0 ]]; then
  printf 'failed: %s\n' "${failed_names[@]}"
fi
echo "nix-checks: $passed passed, $failed failed, $skipped skipped"
[[ $failed -eq 0 ]]
