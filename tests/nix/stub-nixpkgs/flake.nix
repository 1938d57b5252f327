# Stand-in for the nixpkgs input, used by tests/nix/check.sh through
# `--override-input nixpkgs path:tests/nix/stub-nixpkgs`: see pkgs.nix.
{
  description = "offline stub of the nixpkgs flake for pingora-lb's Nix checks";

  outputs = _: {
    legacyPackages = builtins.listToAttrs (map
      (system: {
        name = system;
        value = import ./pkgs.nix { inherit system; };
      })
      [ "x86_64-linux" "aarch64-linux" ]);
  };
}
