# The VM test's Python script and load script, rendered without nixpkgs: test.nix is called
# with the offline stub (whose runNixOSTest returns the test's arguments), its machine
# module with stub module arguments, and its testScript with stand-in node values.
# tests/nix/check.sh compiles and lints what comes out.
let
  pkgs = import ./stub-nixpkgs/pkgs.nix { };
  package = {
    type = "derivation";
    name = "pingora-lb";
    outPath = "/usr";
    meta.mainProgram = "pingora-lb";
  };
  test = import ../../nixos-module/test.nix {
    pkgs = pkgs // { testers.runNixOSTest = args: args; };
    module = ../../nixos-module;
    inherit package;
  };
  machine = test.nodes.machine { inherit (pkgs) lib; inherit pkgs; };
  settings = import ../../nixos-module/config-defaults.nix // machine.services.pingora-lb.settings;
in
{
  testScript = test.testScript {
    nodes.machine = {
      system.build.toplevel = "/nix/store/00000000000000000000000000000000-nixos-system-machine";
      services.pingora-lb.settings = settings;
      networking.firewall.allowedTCPPorts = map
        (address: builtins.fromJSON (builtins.elemAt (builtins.match ".*:([0-9]+)" address) 0))
        settings.listeners;
    };
  };
  loadScript = (builtins.head (builtins.filter (p: p ? text) machine.environment.systemPackages)).text;
}
