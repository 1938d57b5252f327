# A stand-in for the few parts of nixpkgs that this repository's Nix files touch, for the
# offline checks of tests/nix/check.sh (no nixpkgs can be fetched there). Nothing here is
# ever built: every package is a derivation whose builder fails, which is enough for
# `nix flake show` and `nix flake check --no-build`, which only instantiate.
#
# With `lib` (the real nixpkgs library, when a copy is at hand) the YAML format has its real
# option type, so the NixOS module can be evaluated with lib.evalModules.
{ system ? "x86_64-linux"
, lib ? null
}:

let
  # `drvAttrs` become part of the derivation (and so of its store path); `extra` is only
  # attached to the value, like passthru.
  fakeDrv = name: drvAttrs: extra: derivation
    ({
      inherit name system;
      builder = "/bin/sh";
      args = [ "-c" "echo 'stub package from tests/nix/stub-nixpkgs: not buildable' >&2; exit 1" ];
    } // drvAttrs) // extra;
  fake = name: extra: fakeDrv name { } extra;

  miniLib = {
    fileset = {
      # Type-checks the arguments the way the real functions would reject them.
      toSource = { root, fileset }: assert builtins.isPath root; builtins.seq fileset root;
      unions = sets: assert builtins.isList sets; sets;
      intersection = a: b: [ a b ];
      maybeMissing = path: assert builtins.isPath path; if builtins.pathExists path then path else [ ];
      fileFilter = predicate: path:
        assert builtins.isFunction predicate && builtins.isPath path; path;
    };
    licenses.asl20 = { spdxId = "Apache-2.0"; shortName = "asl20"; };
    platforms.linux = [ "x86_64-linux" "aarch64-linux" ];
    mkForce = value: value;
    mkDefault = value: value;
  };

  yamlType =
    if lib == null then null
    else
      let
        valueType = lib.types.nullOr
          (lib.types.oneOf [
            lib.types.bool
            lib.types.int
            lib.types.float
            lib.types.str
            lib.types.path
            (lib.types.attrsOf valueType)
            (lib.types.listOf valueType)
          ]) // { description = "YAML value"; };
      in
      valueType;

  pkgs = {
    inherit system;
    lib = if lib == null then miniLib else lib;

    stdenv = {
      buildPlatform = { inherit system; canExecute = _: true; };
      hostPlatform = { inherit system; };
    };

    callPackage = fn: overrides:
      fn (builtins.intersectAttrs (builtins.functionArgs fn) pkgs // overrides);

    rustPlatform.buildRustPackage = args:
      assert builtins.pathExists args.cargoLock.lockFile;
      fake "${args.pname}-${args.version}" {
        inherit (args) pname version meta;
        src = args.src;
      };

    mkShell = args: builtins.seq (builtins.length args.packages) (fake "nix-shell" { });

    # Like the real one, `meta` of env becomes the package's meta (lib.getExe reads it).
    runCommand = name: env: script:
      fakeDrv name { inherit script; } ({ inherit env script; } // (if env ? meta then { inherit (env) meta; } else { }));
    writeText = name: text: fakeDrv name { inherit text; } { inherit text; };
    writeTextDir = path: text: fake (baseNameOf path) { inherit text; };
    writeShellApplication = { name, text, ... }: fake name {
      inherit text;
      meta.mainProgram = name;
    };

    formats.yaml = {}: {
      type = yamlType;
      # JSON is YAML; the file is only read back by the checks (which need no store path it
      # names to exist, so their references are dropped: toFile cannot keep them).
      generate = name: value:
        builtins.toFile name (builtins.unsafeDiscardStringContext (builtins.toJSON value));
    };

    testers = {
      runNixOSTest = test: fake "vm-test-run-${test.name}" { };
      testBuildFailure = drv: fake "${drv.name}-failure" { };
    };

    nixos = _configuration: {
      config.environment.etc."pingora-lb/pingora-lb.yaml".source = fake "pingora-lb-checked.yaml" { };
    };
  } // builtins.listToAttrs (map (name: { inherit name; value = fake name { }; }) [
    "cargo"
    "clippy"
    "cmake"
    "coreutils"
    "curl"
    "gnugrep"
    "haproxy"
    "nginx"
    "nixpkgs-fmt"
    "openssl"
    "pkg-config"
    "python3"
    "rustc"
    "rustfmt"
    "wrk"
  ]);
in
pkgs
