#!/usr/bin/env python3
"""Comparisons behind tests/nix/check.sh: the Nix side of the packaging against dist/.

Subcommands (each exits 1 with one line per difference):
  unit UNIT_JSON UNIT_FILE          nixos-module/unit-settings.nix (evaluated) == the unit file
  config DEFAULTS_JSON YAML_FILE    nixos-module/config-defaults.nix == the packaged config
  yaml-to-json YAML_FILE OUT_JSON   the packaged config as JSON, for tests/nix/eval-module.nix
  module EVAL_JSON UNIT_FILE YAML_FILE
                                    the module evaluated with lib.evalModules
                                    (tests/nix/eval-module.nix) against dist/ and its own
                                    promises (reload-not-restart, firewall, users, ...)
  unit-triggers UNITS_JSON          the module's unit evaluated without nixpkgs' lib
                                    (tests/nix/eval-unit.nix): a switch to a new package or
                                    config reloads it, nothing restarts it
  flake-lock LOCK_FILE INPUTS_JSON  flake.lock pins nixpkgs to a GitHub revision with a NAR
                                    hash, from the branch flake.nix names (its inputs, JSON)
  outputs WORK_DIR                  the flake's outputs (drvPaths from `nix eval`) are complete
  render RENDER_JSON OUT_DIR        writes the VM test's Python script and load script out of
                                    an evaluation, for py_compile, pyflakes and shellcheck
"""

import json
import re
import sys
from pathlib import Path

import yaml

# Keys of dist/pingora-lb.yaml that the module deliberately does not default.
NOT_DEFAULTED = {
    "upstreams": "site-specific: the packaged file has placeholders, the module requires a value",
}

# Directives whose value is a list of names: NixOS writes its lists on one line, the unit file
# may spread them over several. Compared as multisets of words.
WORD_LISTS = {"Wants", "Requires", "After", "Before", "WantedBy", "RequiredBy", "Documentation"}

TRUE = {"yes", "true", "on"}
FALSE = {"no", "false", "off"}


class Failures(list):
    def check(self, ok, message):
        if not ok:
            self.append(message)

    def finish(self, what):
        for failure in self:
            print(f"FAIL {what}: {failure}")
        if self:
            sys.exit(1)
        print(f"ok   {what}")


def parse_unit(path):
    """A systemd unit file as {section: {key: [value per line]}}, as systemd reads it:
    comments, backslash continuations, and an empty assignment resetting the list."""
    sections = {}
    current = None
    pending = ""
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise SystemExit(f"{path}: cannot parse line {raw!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        if value == "":
            current[key] = []
        else:
            current.setdefault(key, []).append(value)
    return sections


def nix_lines(value):
    """The lines NixOS writes for one serviceConfig/unitConfig value."""
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, bool):
            out.append("yes" if v else "no")
        else:
            out.append(str(v))
    return out


def canonical(value):
    low = value.lower()
    if low in TRUE:
        return "yes"
    if low in FALSE:
        return "no"
    return value


def compare_section(failures, label, nix, dist):
    """nix: {key: nix value}; dist: {key: [lines]}."""
    for key in sorted(set(nix) | set(dist)):
        if key not in dist:
            failures.append(f"[{label}] {key}= is set on the Nix side but not in the unit file")
            continue
        if key not in nix:
            failures.append(f"[{label}] {key}={' / '.join(dist[key])} is in the unit file but not on the Nix side")
            continue
        ours = [canonical(v) for v in nix_lines(nix[key])]
        theirs = [canonical(v) for v in dist[key]]
        if key in WORD_LISTS:
            ours = sorted(" ".join(ours).split())
            theirs = sorted(" ".join(theirs).split())
        if ours != theirs:
            failures.append(f"[{label}] {key}: Nix side {ours} != unit file {theirs}")


def cmd_unit(unit_json, unit_file):
    nix = json.loads(Path(unit_json).read_text())
    dist = parse_unit(unit_file)
    failures = Failures()
    failures.check(set(dist) == set(nix),
                   f"sections differ: Nix side {sorted(nix)}, unit file {sorted(dist)}")
    for section in sorted(set(nix) & set(dist)):
        compare_section(failures, section, nix[section], dist[section])
    failures.finish(f"nixos-module/unit-settings.nix matches {unit_file}")


def compare_values(failures, path, ours, theirs):
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in sorted(set(ours) | set(theirs)):
            where = f"{path}.{key}" if path else key
            if key not in theirs:
                failures.append(f"{where} is on the Nix side but not in the YAML file")
            elif key not in ours:
                failures.append(f"{where} is in the YAML file but not on the Nix side")
            else:
                compare_values(failures, where, ours[key], theirs[key])
    elif ours != theirs or type(ours) is not type(theirs):
        failures.append(f"{path}: Nix side {ours!r} != YAML file {theirs!r}")


def cmd_config(defaults_json, yaml_file):
    ours = json.loads(Path(defaults_json).read_text())
    theirs = yaml.safe_load(Path(yaml_file).read_text())
    failures = Failures()
    for key in NOT_DEFAULTED:
        failures.check(key not in ours, f"{key} is defaulted, though listed in NOT_DEFAULTED")
        failures.check(key in theirs, f"{key} is listed in NOT_DEFAULTED but not in the YAML file")
    compare_values(failures, "", ours, {k: v for k, v in theirs.items() if k not in NOT_DEFAULTED})
    failures.finish(f"nixos-module/config-defaults.nix matches {yaml_file}")


def cmd_yaml_to_json(yaml_file, out_json):
    Path(out_json).write_text(json.dumps(yaml.safe_load(Path(yaml_file).read_text())))


def listener_port(address):
    return int(address.rsplit(":", 1)[1])


def cmd_module(eval_json, unit_file, yaml_file):
    result = json.loads(Path(eval_json).read_text())
    dist_unit = parse_unit(unit_file)
    dist_config = yaml.safe_load(Path(yaml_file).read_text())
    failures = Failures()
    check = failures.check

    # The defaults: the unit NixOS writes is the packaged one, the config file the packaged one.
    d = result["defaults"]
    check(d["failedAssertions"] == [], f"defaults: assertions fail: {d['failedAssertions']}")
    compare_section(failures, "Service (module)", d["serviceConfig"], dist_unit["Service"])
    unit = d["unit"]
    compare_section(failures, "Unit (module)", {
        "Description": unit["description"],
        "Documentation": unit["documentation"],
        "Wants": unit["wants"],
        "After": unit["after"],
    }, dist_unit["Unit"])
    compare_section(failures, "Install (module)", {"WantedBy": unit["wantedBy"]}, dist_unit["Install"])
    compare_values(failures, "generated config", d["generated"], dist_config)
    check(d["firewall"] == sorted({listener_port(a) for a in dist_config["listeners"]}),
          f"openFirewall opens {d['firewall']}, listeners are {dist_config['listeners']}")
    check(d["users"] == ["pingora-lb"] and d["groups"] == ["pingora-lb"],
          f"default account not created: users {d['users']}, groups {d['groups']}")
    account = d["userAccount"] or {}
    check(account.get("isSystemUser") is True and account.get("group") == "pingora-lb",
          f"pingora-lb is not a system user in group pingora-lb: {account}")
    check(d["checkScript"] is not None and f"pingora-lb -t -c {d['configFile']}" in d["checkScript"],
          "the generated config is not checked with `pingora-lb -t -c` at build time")
    check(d["etcSource"] != d["configFile"],
          "/etc/pingora-lb/pingora-lb.yaml is not the checked file")
    check(d["reloadTriggers"] == [d["etcSource"]],
          f"reloadTriggers {d['reloadTriggers']} != [the config in /etc]")
    check(d["reloadIfChanged"] is True,
          "reloadIfChanged is not set: a switch to a new package would restart, not reload")
    check(d["restartTriggers"] == [],
          f"restartTriggers {d['restartTriggers']}: the package (or anything) is a restart trigger again")
    check(result["disabled"] == {}, "a disabled module defines systemd services")

    # Variations.
    check("LogsDirectory" in result["fileLog"]["serviceConfig"],
          "error_log in /var/log/pingora-lb/ does not get LogsDirectory=")
    check(result["otherLog"]["serviceConfig"].get("ReadWritePaths") == ["/srv/log"],
          "error_log elsewhere does not get its directory in ReadWritePaths=")
    check(result["badSocket"]["failedAssertions"] != [],
          "upgrade_sock outside /run/pingora-lb/ passes the assertions")
    other = result["otherUser"]
    check(other["users"] == [] and other["groups"] == [], "a custom account is created")
    check(other["serviceConfig"]["User"] == "www" and other["generated"]["user"] == "www"
          and other["serviceConfig"]["Group"] == "www" and other["generated"]["group"] == "www",
          "User=/Group= and the config's user/group do not follow services.pingora-lb.user/group")
    check(result["extraArgs"]["serviceConfig"]["ExecStart"]
          == d["serviceConfig"]["ExecStart"] + ' "--flag" "50%% of $$HOME"',
          f"extraArgs badly escaped: {result['extraArgs']['serviceConfig']['ExecStart']}")
    runtime = result["runtimeFile"]
    check(runtime["etcSource"] == "/var/lib/pingora-lb/pingora-lb.yaml" and runtime["checkScript"] is None,
          "a config file outside the store is not linked as is (or is checked at build time)")
    check(result["unchecked"]["etcSource"] == result["unchecked"]["configFile"],
          "checkConfig = false still checks")
    health = result["oneHealthKey"]["generated"]
    check(health["health_check"] == dict(dist_config["health_check"], kind="http"),
          f"setting one health_check key lost the others: {health['health_check']}")
    check("retries" not in health, "a setting set to null is not left out")
    check(result["twoListeners"]["firewall"] == [80, 8443],
          f"ports of several listeners: {result['twoListeners']['firewall']}")

    # A certificate of security.acme: read through its group, awaited, reloaded on renewal;
    # the build-time check reads a placeholder in its place (a build cannot read it).
    acme = result["acme"]
    check(acme["failedAssertions"] == [], f"acme: assertions fail: {acme['failedAssertions']}")
    target = "acme-finished-example.com.target"
    check(target in acme["unit"]["wants"] and target in acme["unit"]["after"],
          f"useACMEHosts: the unit does not wait for {target}: {acme['unit']}")
    check(acme["serviceConfig"].get("SupplementaryGroups") == ["acme"],
          f"useACMEHosts: SupplementaryGroups {acme['serviceConfig'].get('SupplementaryGroups')}")
    check(acme["acmeCerts"]["example.com"].get("reloadServices") == ["pingora-lb.service"],
          f"useACMEHosts: a renewal does not reload: {acme['acmeCerts']}")
    served = acme["generated"]["listeners"][1]["tls"]["certificates"]
    check(served == [{"cert": "/var/lib/acme/example.com/fullchain.pem",
                      "key": "/var/lib/acme/example.com/key.pem"}],
          f"acmeCertificates: the listener serves {served}")
    script = acme["checkScript"] or ""
    check("pingora-lb -t -c " in script and f"-t -c {acme['configFile']}" not in script
          and "pingora-lb-check.yaml" in script,
          f"the build-time check of a config with ACME certificates does not use placeholders: {script}")
    check(d["serviceConfig"].get("SupplementaryGroups") is None and d["acmeCerts"] == {},
          "without useACMEHosts, the unit still joins groups or asks for certificates")

    # The VM test's machine: its specialisations differ from it only in what a reload applies.
    vm = result["vmTest"]
    base = vm["machine"]
    check(base["failedAssertions"] == [], f"VM test machine: assertions fail: {base['failedAssertions']}")
    specs = vm["specialisations"]
    check(set(specs) == {"only-backend-b", "runtime-config", "new-package"},
          f"specialisations: {sorted(specs)}")
    for name, spec in specs.items():
        check(spec["reloadIfChanged"] is True and base["reloadIfChanged"] is True,
              f"specialisation {name}: reloadIfChanged is not set, switching to it would restart")
        for key in ("unit", "restartTriggers"):
            check(spec[key] == base[key],
                  f"specialisation {name} changes {key}, not only what a reload applies")
    # A config change: the unit differs only in its reload trigger.
    for name in ("only-backend-b", "runtime-config"):
        spec = specs.get(name)
        if spec is None:
            continue
        check(spec["serviceConfig"] == base["serviceConfig"],
              f"specialisation {name} changes serviceConfig, not only the config")
        check(spec["reloadTriggers"] != base["reloadTriggers"],
              f"specialisation {name} does not change reloadTriggers: switching to it would not reload")
    # A new package: the unit differs only in the package's path, so the reload the switch
    # runs is the new package's `pingora-lb reload`.
    new = specs.get("new-package")
    if new is not None:
        check(new["package"] != base["package"], "specialisation new-package keeps the package")
        check(json.dumps(new["serviceConfig"], sort_keys=True)
              == json.dumps(base["serviceConfig"], sort_keys=True).replace(base["package"], new["package"]),
              "specialisation new-package changes serviceConfig in more than the package's path")
        check(new["serviceConfig"]["ExecReload"].startswith(f"{new['package']}/bin/pingora-lb reload "),
              f"specialisation new-package: ExecReload {new['serviceConfig']['ExecReload']}")
    check([u["address"] for u in specs["only-backend-b"]["generated"]["upstreams"]] == ["127.0.0.1:8082"],
          "specialisation only-backend-b does not replace the upstreams")
    check(specs["runtime-config"]["etcSource"] == "/var/lib/pingora-lb-test/pingora-lb.yaml",
          "specialisation runtime-config does not link the mutable file")
    failures.finish("the NixOS module evaluated with lib.evalModules")


def cmd_unit_triggers(units_json):
    """The unit of two systems that differ only in the pingora-lb package."""
    units = json.loads(Path(units_json).read_text())
    failures = Failures()
    check = failures.check
    current, new = units["current"], units["next"]
    for label, unit in (("current", current), ("next", new)):
        package = unit["package"]
        check(unit["enabled"] is True, f"{label}: enable = true does not define the unit")
        check(unit["reloadIfChanged"] is True,
              f"{label}: reloadIfChanged is not set: a switch to a new package would restart the service")
        check(unit["restartIfChanged"] is True, f"{label}: restartIfChanged is turned off")
        check(unit["restartTriggers"] == [],
              f"{label}: restartTriggers {unit['restartTriggers']} (the package is no restart trigger)")
        check(not any(package in trigger for trigger in unit["restartTriggers"]),
              f"{label}: the package is a restart trigger")
        check(unit["reloadTriggers"] == [unit["etcSource"]],
              f"{label}: reloadTriggers {unit['reloadTriggers']} != [the config in /etc, {unit['etcSource']}]")
        service = unit["serviceConfig"]
        check(service.get("ExecReload", "").startswith(f"{package}/bin/pingora-lb reload "),
              f"{label}: ExecReload {service.get('ExecReload')} does not run the package's reload")
        check(service.get("ExecStart", "").startswith(f"{package}/bin/pingora-lb "),
              f"{label}: ExecStart {service.get('ExecStart')} does not run the package")
    check(current["package"] != new["package"], "the two systems have the same package")
    check(json.dumps(new["serviceConfig"], sort_keys=True)
          == json.dumps(current["serviceConfig"], sort_keys=True).replace(current["package"], new["package"]),
          "a new package changes more of the unit than the package's path")
    failures.finish("a switch to a new package or config reloads the unit (module without nixpkgs' lib)")


def cmd_flake_lock(lock_file, inputs_json):
    """flake.lock: the nixpkgs input locked to a GitHub revision with its NAR hash, from the
    branch that flake.nix names, and nothing else locked."""
    failures = Failures()
    check = failures.check
    try:
        lock = json.loads(Path(lock_file).read_text())
    except (OSError, ValueError) as e:
        print(f"FAIL {lock_file}: {e}")
        sys.exit(1)
    inputs = json.loads(Path(inputs_json).read_text())
    check(lock.get("version") == 7, f"lock file version {lock.get('version')}, not 7")
    nodes = lock.get("nodes", {})
    root = nodes.get(lock.get("root", ""), {})
    check(set(root.get("inputs", {})) == set(inputs),
          f"locked inputs {sorted(root.get('inputs', {}))} != flake.nix inputs {sorted(inputs)}")
    node = nodes.get(root.get("inputs", {}).get("nixpkgs", ""), {})
    locked, original = node.get("locked", {}), node.get("original", {})
    check(locked.get("type") == "github" and locked.get("owner") == "NixOS" and locked.get("repo") == "nixpkgs",
          f"nixpkgs is not locked to github:NixOS/nixpkgs: {locked}")
    check(re.fullmatch(r"[0-9a-f]{40}", str(locked.get("rev", ""))) is not None,
          f"nixpkgs is not locked to a revision: rev {locked.get('rev')!r}")
    check(re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", str(locked.get("narHash", ""))) is not None,
          f"nixpkgs has no sha256 narHash: {locked.get('narHash')!r}")
    check(isinstance(locked.get("lastModified"), int) and locked["lastModified"] > 0,
          f"nixpkgs has no lastModified: {locked.get('lastModified')!r}")
    check(set(locked) == {"lastModified", "narHash", "owner", "repo", "rev", "type"},
          f"unexpected keys in the nixpkgs lock: {sorted(locked)}")
    url = inputs.get("nixpkgs", {}).get("url", "")
    want = f"github:{original.get('owner')}/{original.get('repo')}"
    if "ref" in original:
        want += f"/{original['ref']}"
    check(original.get("type") == "github" and "rev" not in original and url == want,
          f"flake.nix's nixpkgs input {url!r} is not the lock's original {original} ({want!r})")
    extra = set(nodes) - {lock.get("root"), root.get("inputs", {}).get("nixpkgs")}
    check(not extra, f"nodes locked that flake.nix does not use: {sorted(extra)}")
    failures.finish(f"{Path(lock_file).name}: nixpkgs locked to {locked.get('rev', '?')[:12]} "
                    f"({original.get('ref', '?')}, lastModified {locked.get('lastModified')})")


def cmd_render(render_json, out_dir):
    rendered = json.loads(Path(render_json).read_text())
    # tests/nix/eval-module.nix's output has it under vmTest; render-test.nix's at the top.
    rendered = rendered.get("vmTest", rendered)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # What the NixOS test driver puts in scope of every test script.
    prelude = (
        "from typing import Any\n"
        "machine: Any = None\n"
        "def start_all() -> None: ...\n"
        "def subtest(name: str) -> Any: ...\n"
    )
    (out / "testscript.py").write_text(rendered["testScript"])
    (out / "testscript-with-driver-names.py").write_text(prelude + rendered["testScript"])
    # writeShellApplication's preamble.
    (out / "lb-load.sh").write_text(
        "#!/usr/bin/env bash\nset -o errexit\nset -o nounset\nset -o pipefail\n\n" + rendered["loadScript"]
    )


def cmd_outputs(work_dir):
    """The drvPaths `nix eval` printed for each output kind (tests/nix/check.sh) cover the
    outputs the flake promises, for both systems."""
    expected = {
        "packages": {"default", "pingora-lb"},
        "checks": {"package", "vm-test", "config-check"},
        "devShells": {"default"},
        "formatter": set(),
    }
    failures = Failures()
    count = 0
    for output, names in expected.items():
        per_system = json.loads((Path(work_dir) / f"{output}.json").read_text())
        for system in ("x86_64-linux", "aarch64-linux"):
            got = per_system.get(system)
            if got is None:
                failures.append(f"no {output}.{system}")
                continue
            got = {"": got} if isinstance(got, str) else got
            count += len(got)
            for name in sorted(names - set(got)):
                failures.append(f"no {output}.{system}.{name}")
            for name, drv in got.items():
                failures.check(drv.startswith("/nix/store/") and drv.endswith(".drv"),
                               f"{output}.{system}.{name} is not a derivation: {drv}")
    failures.finish(f"{count} derivations of packages, checks, devShells and formatter instantiate")


COMMANDS = {
    "outputs": cmd_outputs,
    "unit": cmd_unit,
    "config": cmd_config,
    "yaml-to-json": cmd_yaml_to_json,
    "module": cmd_module,
    "unit-triggers": cmd_unit_triggers,
    "flake-lock": cmd_flake_lock,
    "render": cmd_render,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit(__doc__)
    COMMANDS[sys.argv[1]](*sys.argv[2:])
