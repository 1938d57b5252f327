# Evaluates nixos-module/ with the real nixpkgs library (lib.evalModules) but without
# nixpkgs' packages or NixOS' own modules: the few NixOS options the module and the VM
# test's machine set are declared below as plain containers, and pkgs is the offline stub.
# tests/nix/check.sh runs this when NIXPKGS_LIB points at a copy of the library and
# compares the result with dist/ (tests/nix/checks.py module).
{ nixpkgsLib
, distConfigJson
}:

let
  lib = import (nixpkgsLib + "/lib");
  pkgs = import ./stub-nixpkgs/pkgs.nix { inherit lib; };
  distConfig = builtins.fromJSON (builtins.readFile distConfigJson);

  # Installed like the Debian and RPM packages: /usr/bin/pingora-lb.
  package = {
    type = "derivation";
    name = "pingora-lb";
    outPath = "/usr";
    meta.mainProgram = "pingora-lb";
  };

  nixosStubs = {
    options = {
      assertions = lib.mkOption { type = lib.types.listOf lib.types.unspecified; default = [ ]; };
      environment.systemPackages = lib.mkOption { type = lib.types.listOf lib.types.unspecified; default = [ ]; };
      environment.etc = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
      systemd.services = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
      users.users = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
      users.groups = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
      networking.firewall.allowedTCPPorts = lib.mkOption { type = lib.types.listOf lib.types.port; default = [ ]; };
      security.acme.certs = lib.mkOption {
        type = lib.types.attrsOf (lib.types.submodule ({ name, ... }: {
          freeformType = lib.types.attrsOf lib.types.anything;
          options.directory = lib.mkOption { type = lib.types.str; default = "/var/lib/acme/${name}"; };
          options.group = lib.mkOption { type = lib.types.str; default = "acme"; };
        }));
        default = { };
      };
      specialisation = lib.mkOption {
        type = lib.types.attrsOf (lib.types.submodule {
          options.configuration = lib.mkOption { type = lib.types.deferredModule; default = { }; };
        });
        default = { };
      };
      system.build = lib.mkOption {
        type = lib.types.attrsOf lib.types.anything;
        default.toplevel = "/nix/store/00000000000000000000000000000000-nixos-system-machine";
      };
    };
  };

  eval = modules: lib.evalModules {
    modules = [ nixosStubs ../../nixos-module ] ++ modules;
    specialArgs = { inherit pkgs; };
  };

  # What the checks look at in one evaluated system.
  summary = config:
    let
      service = config.systemd.services.pingora-lb;
      etcSource = config.environment.etc."pingora-lb/pingora-lb.yaml".source;
      cfg = config.services.pingora-lb;
    in
    {
      failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
      serviceConfig = service.serviceConfig;
      unit = { inherit (service) description documentation wants after wantedBy; };
      # NixOS' defaults where the module sets nothing (systemd.services is a plain container
      # here).
      reloadTriggers = map toString (service.reloadTriggers or [ ]);
      restartTriggers = map toString (service.restartTriggers or [ ]);
      reloadIfChanged = service.reloadIfChanged or false;
      restartIfChanged = service.restartIfChanged or true;
      package = toString cfg.package;
      etcSource = toString etcSource;
      checkScript = etcSource.script or null;
      configFile = toString cfg.configFile;
      settings = cfg.settings;
      # The generated file (JSON from the stub's formats.yaml), when it is the one in use.
      generated =
        if builtins.isAttrs cfg.configFile
        then null
        else if lib.hasPrefix builtins.storeDir (toString cfg.configFile)
        then builtins.fromJSON (builtins.readFile cfg.configFile)
        else null;
      firewall = config.networking.firewall.allowedTCPPorts;
      users = builtins.attrNames config.users.users;
      groups = builtins.attrNames config.users.groups;
      userAccount = config.users.users.pingora-lb or null;
      acmeCerts = config.security.acme.certs;
    };

  enabled = settings: extra: summary (eval [
    {
      services.pingora-lb = {
        enable = true;
        inherit package;
        settings = { inherit (distConfig) upstreams; } // settings;
      } // extra;
    }
  ]).config;

  # The VM test's machine, taken out of nixos-module/test.nix through a stub runNixOSTest
  # that returns the test's arguments.
  test = import ../../nixos-module/test.nix {
    pkgs = pkgs // { testers.runNixOSTest = args: args; };
    module = ../../nixos-module;
    inherit package;
  };
  machine = eval [ test.nodes.machine ];
  specialisations = builtins.mapAttrs
    (_: spec: summary (machine.extendModules { modules = [ spec.configuration ]; }).config)
    machine.config.specialisation;
in
{
  # The packaged defaults, with dist/pingora-lb.yaml's placeholder upstreams.
  defaults = enabled { } { openFirewall = true; };
  disabled = (eval [{ services.pingora-lb.package = package; }]).config.systemd.services;
  fileLog = enabled { error_log = "/var/log/pingora-lb/error.log"; } { };
  otherLog = enabled { error_log = "/srv/log/lb.log"; } { };
  badSocket = enabled { upgrade_sock = "/tmp/upgrade.sock"; } { };
  otherUser = enabled { } { user = "www"; group = "www"; };
  extraArgs = enabled { } { extraArgs = [ "--flag" "50% of $HOME" ]; };
  runtimeFile = enabled { } { configFile = "/var/lib/pingora-lb/pingora-lb.yaml"; };
  unchecked = enabled { } { checkConfig = false; };
  oneHealthKey = enabled { health_check.kind = "http"; retries = null; } { };
  acme = summary (eval [
    ({ config, ... }: {
      services.pingora-lb = {
        enable = true;
        inherit package;
        useACMEHosts = [ "example.com" ];
        settings = {
          inherit (distConfig) upstreams;
          listeners = [
            { address = "0.0.0.0:80"; redirect_to_https = true; }
            {
              address = "0.0.0.0:443";
              tls.certificates = [ config.services.pingora-lb.acmeCertificates."example.com" ];
            }
          ];
        };
      };
    })
  ]).config;
  twoListeners = enabled { listeners = [ "0.0.0.0:80" "[::1]:8443" "127.0.0.1:80" ]; } { openFirewall = true; };

  vmTest = {
    machine = summary machine.config;
    inherit specialisations;
    testScript = test.testScript { nodes.machine = machine.config; };
    loadScript = (builtins.head (builtins.filter (p: p ? text) machine.config.environment.systemPackages)).text;
  };
}
