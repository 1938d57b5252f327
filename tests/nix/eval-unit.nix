# The systemd unit that nixos-module/ defines, evaluated without nixpkgs' library (CI has
# none): the module's function is called directly, with the option values written out below
# as `config` and a stub `lib` holding only the functions the unit's definition reads.
# Evaluated for two systems that differ only in the pingora-lb package, for
# tests/nix/checks.py unit-triggers: a switch to a new package (or config) must reload the
# service, not restart it. With NIXPKGS_LIB, tests/nix/eval-module.nix evaluates the whole
# module with the real lib.evalModules.
let
  pkgs = import ./stub-nixpkgs/pkgs.nix { };

  lib = pkgs.lib // rec {
    # What lib.evalModules would resolve: the condition is checked below.
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    optionalAttrs = condition: attrs: if condition then attrs else { };
    hasPrefix = prefix: string:
      builtins.substring 0 (builtins.stringLength prefix) string == prefix;
    filterAttrs = predicate: set: builtins.listToAttrs (builtins.concatMap
      (name: if predicate name set.${name} then [{ inherit name; value = set.${name}; }] else [ ])
      (builtins.attrNames set));
    filterAttrsRecursive = predicate: set: builtins.listToAttrs (builtins.concatMap
      (name:
        let value = set.${name}; in
        if predicate name value
        then [{ inherit name; value = if builtins.isAttrs value then filterAttrsRecursive predicate value else value; }]
        else [ ])
      (builtins.attrNames set));
    getExe = package: "${package}/bin/${package.meta.mainProgram}";
    concatMapStrings = f: list: builtins.concatStringsSep "" (map f list);
    inherit (builtins) replaceStrings;
  };

  # Stand-ins for two builds of the package: only their paths differ.
  package = hash: version: {
    type = "derivation";
    name = "pingora-lb-${version}";
    outPath = "${builtins.storeDir}/${hash}-pingora-lb-${version}";
    meta.mainProgram = "pingora-lb";
  };

  # The option values of `services.pingora-lb.enable = true` with backends: the module's
  # defaults (the packaged config for `settings`).
  settings = import ../../nixos-module/config-defaults.nix // {
    upstreams = [{ address = "127.0.0.1:8081"; }];
  };
  optionValues = pkg: {
    enable = true;
    package = pkg;
    user = "pingora-lb";
    group = "pingora-lb";
    inherit settings;
    configFile = (pkgs.formats.yaml { }).generate "pingora-lb.yaml" settings;
    checkConfig = true;
    openFirewall = false;
    extraArgs = [ ];
    useACMEHosts = [ ];
  };

  unitOf = pkg:
    let
      module = import ../../nixos-module {
        config = {
          services.pingora-lb = optionValues pkg;
          security.acme.certs = { };
        };
        inherit lib pkgs;
      };
      defined = module.config;
      service = defined.content.systemd.services.pingora-lb;
    in
    {
      enabled = defined._type == "if" && defined.condition;
      package = toString pkg;
      # NixOS' defaults where the module sets nothing.
      reloadIfChanged = service.reloadIfChanged or false;
      restartIfChanged = service.restartIfChanged or true;
      restartTriggers = map toString (service.restartTriggers or [ ]);
      reloadTriggers = map toString (service.reloadTriggers or [ ]);
      etcSource = toString defined.content.environment.etc."pingora-lb/pingora-lb.yaml".source;
      inherit (service) serviceConfig;
    };
in
{
  current = unitOf (package "00000000000000000000000000000000" "0.1.0");
  next = unitOf (package "11111111111111111111111111111111" "0.1.1");
}
