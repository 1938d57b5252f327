{
  description = "pingora-lb: an HTTP load balancer on Cloudflare pingora with zero-downtime reload";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      # The systems the appliance ships for; both are Linux-only (systemd, SO_PEERCRED, netns).
      systems = [ "x86_64-linux" "aarch64-linux" ];

      # Deliberately free of nixpkgs.lib so that `nix flake show` can evaluate the output
      # names against the stub nixpkgs of tests/nix/check.sh.
      forAllSystems = f: builtins.listToAttrs (map
        (system: {
          name = system;
          value = f system nixpkgs.legacyPackages.${system};
        })
        systems);

      # Name and version come from the one place the Rust build reads them.
      cargoToml = builtins.fromTOML (builtins.readFile ./Cargo.toml);

      packageFunction =
        { lib
        , rustPlatform
        , cmake
        , pkg-config
        , openssl
        }:
        rustPlatform.buildRustPackage {
          pname = cargoToml.package.name;
          inherit (cargoToml.package) version;

          # Only what cargo reads: editing the Nix files, docs or packaging does not rebuild.
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./Cargo.toml
              ./Cargo.lock
              ./src
              (lib.fileset.maybeMissing ./build.rs)
              (lib.fileset.maybeMissing ./README.md)
              (lib.fileset.maybeMissing ./benches)
              (lib.fileset.maybeMissing ./examples)
              # Explicitly declared [[test]] targets must exist for cargo to read the manifest.
              (lib.fileset.intersection
                (lib.fileset.maybeMissing ./tests)
                (lib.fileset.fileFilter (file: file.hasExt "rs") ./.))
            ];
          };

          cargoLock.lockFile = ./Cargo.lock;

          # cmake: libz-ng-sys builds zlib-ng with it; pkg-config: openssl-sys finds the
          # system OpenSSL. cmake is a build tool for a -sys crate here, not this project's
          # build system, so its configure phase must not take over.
          nativeBuildInputs = [ cmake pkg-config ];
          dontUseCmakeConfigure = true;
          buildInputs = [ openssl ];

          # Link nixpkgs' OpenSSL instead of compiling the copy pingora-openssl vendors
          # (the same switch as .cargo/config.toml and the Debian/RPM builds).
          env.OPENSSL_NO_VENDOR = "1";

          # The integration tests need root and network namespaces (they bind privileged
          # ports, drop privileges and hand sockets over between processes), which the Nix
          # build sandbox does not give. They run in CI (.ci/run); the NixOS VM test
          # (checks.<system>.vm-test) covers the packaged binary end to end.
          doCheck = false;

          meta = {
            description = cargoToml.package.description;
            homepage = cargoToml.package.repository;
            license = lib.licenses.asl20;
            mainProgram = "pingora-lb";
            platforms = lib.platforms.linux;
          };
        };
    in
    {
      overlays.default = final: _prev: {
        pingora-lb = final.callPackage packageFunction { };
      };

      packages = forAllSystems (_system: pkgs: rec {
        pingora-lb = pkgs.callPackage packageFunction { };
        default = pingora-lb;
      });

      nixosModules = {
        # The bare module: its package defaults to pkgs.pingora-lb, which exists once
        # overlays.default is in nixpkgs.overlays.
        pingora-lb = import ./nixos-module;

        # The same module, usable without the overlay: the package falls back to this
        # flake's build for the machine's system.
        default = { lib, pkgs, ... }: {
          imports = [ ./nixos-module ];
          services.pingora-lb.package = lib.mkDefault (
            pkgs.pingora-lb or
              self.packages.${pkgs.stdenv.hostPlatform.system}.default
          );
        };
      };

      devShells = forAllSystems (_system: pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            cmake
            pkg-config
            openssl
            # Load and comparison targets for the handoff and benchmark scripts.
            wrk
            haproxy
            nginx
          ];
          OPENSSL_NO_VENDOR = "1";
        };
      });

      checks = forAllSystems (system: pkgs: {
        package = self.packages.${system}.default;
        vm-test = import ./nixos-module/test.nix {
          inherit pkgs;
          module = self.nixosModules.default;
          package = self.packages.${system}.default;
        };
        config-check = import ./nixos-module/config-check.nix {
          inherit pkgs;
          module = self.nixosModules.default;
          package = self.packages.${system}.default;
        };
      });

      formatter = forAllSystems (_system: pkgs: pkgs.nixpkgs-fmt);
    };
}
