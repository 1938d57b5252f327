# The module's build-time check, proven: a configuration the daemon refuses (here a misspelt
# key) fails the build of the system, and the build log carries the daemon's message naming
# the key. The VM test cannot show this, since such a system never builds.
#
# Run: nix build .#checks.x86_64-linux.config-check
{ pkgs
, module
, package
}:

let
  system = pkgs.nixos {
    imports = [ module ];
    services.pingora-lb = {
      enable = true;
      inherit package;
      settings = {
        upstreams = [{ address = "127.0.0.1:8081"; }];
        listners = [ "0.0.0.0:80" ];
      };
    };
  };

  checkedConfig = system.config.environment.etc."pingora-lb/pingora-lb.yaml".source;
in
pkgs.runCommand "pingora-lb-config-check"
{
  failure = pkgs.testers.testBuildFailure checkedConfig;
}
  ''
    echo "the build failed as it should, with exit code $(cat "$failure/testBuildFailure.exit")"
    grep --fixed-strings listners "$failure/testBuildFailure.log"
    touch "$out"
  ''
