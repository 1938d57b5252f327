# NixOS VM test of the module and the packaged binary, on one machine: pingora-lb on port 80
# in front of two HTTP backends. It proves that
#   - requests go through to both backends, served by the unprivileged service user, with the
#     firewall open for the listener;
#   - `systemctl reload` hands the sockets over to a new process without failing a request;
#   - a configuration change applied by switch-to-configuration is a reload (new main process,
#     same unit invocation, no stop), again without failing a request, and takes effect;
#   - so is a new pingora-lb package: the switch hands the sockets over to a process running
#     the new store path's binary, without failing a request;
#   - a configuration the daemon refuses makes the reload, and so the switch, fail while the
#     old process keeps serving (a file outside the Nix store, which the build cannot check);
#   - a stop completes within the unit's timeout.
#
# Run: nix build .#checks.x86_64-linux.vm-test (needs KVM for reasonable speed).
{ pkgs
, module
, package
}:

let
  # Directory of a backend's single page; its body names the backend.
  page = name: pkgs.writeTextDir "index.html" "${name}\n";

  # A new pingora-lb package, as an update brings: the same binary at another store path,
  # so that every Exec*= line of the unit changes, without building the package twice. A
  # copy, not a symbolic link: a reload starts the new server from its own executable
  # (/proc/self/exe), which would resolve a link to the old path.
  nextPackage = pkgs.runCommand "pingora-lb-next" { meta.mainProgram = "pingora-lb"; } ''
    install -D --mode=0755 ${package}/bin/pingora-lb "$out/bin/pingora-lb"
  '';

  # Where the runtime-config specialisation points the service: a mutable file, as a
  # secret-management tool or an operator would keep it.
  runtimeConfigPath = "/var/lib/pingora-lb-test/pingora-lb.yaml";

  # Bounded load while the test reloads: two clients, one opening a connection per request,
  # one sending 10 requests per keep-alive connection, until DIR/stop appears (at most 120 s
  # and 30000 requests each). Each writes "<sent> <failed>" to DIR/<client>.result.
  lbLoad = pkgs.writeShellApplication {
    name = "lb-load";
    runtimeInputs = [ pkgs.curl pkgs.coreutils pkgs.gnugrep ];
    text = ''
      dir=$1
      mkdir -p "$dir"

      client() {
        local name=$1 batch=$2
        local -a args=()
        local i
        for ((i = 0; i < batch; i++)); do
          args+=(--output /dev/null http://127.0.0.1/)
        done
        local sent=0 failed=0 ok codes
        local deadline=$((SECONDS + 120))
        while [[ ! -e $dir/stop && $sent -lt 30000 && $SECONDS -lt $deadline ]]; do
          codes=$(curl --silent --show-error --max-time 10 --write-out '%{http_code}\n' \
            "''${args[@]}" 2>>"$dir/$name.errors" || true)
          ok=$(grep --count '^200$' <<<"$codes" || true)
          sent=$((sent + batch))
          failed=$((failed + batch - ok))
          if [[ $sent -ge 20 ]]; then
            touch "$dir/$name.started"
          fi
        done
        echo "$sent $failed" >"$dir/$name.result"
      }

      client fresh 1 &
      client keepalive 10 &
      wait
      touch "$dir/done"
    '';
  };
in
pkgs.testers.runNixOSTest {
  name = "pingora-lb";

  nodes.machine = { lib, pkgs, ... }:
    let
      backend = name: port: {
        description = "test backend ${name}";
        wantedBy = [ "multi-user.target" ];
        before = [ "pingora-lb.service" ];
        serviceConfig = {
          DynamicUser = true;
          ExecStart = "${pkgs.python3}/bin/python3 -m http.server ${toString port} --bind 127.0.0.1 --directory ${page name}";
        };
      };
    in
    {
      imports = [ module ];

      services.pingora-lb = {
        enable = true;
        inherit package;
        openFirewall = true;
        settings = {
          listeners = [ "0.0.0.0:80" ];
          upstreams = [
            { address = "127.0.0.1:8081"; }
            { address = "127.0.0.1:8082"; }
          ];
          # A replaced process drains for a few seconds, not the packaged 30.
          grace_period_seconds = 3;
          graceful_shutdown_timeout_seconds = 2;
        };
      };

      systemd.services.backend-a = backend "backend-a" 8081;
      systemd.services.backend-b = backend "backend-b" 8082;

      environment.systemPackages = [ pkgs.curl lbLoad ];

      # A configuration change: only backend-b. Switching to it must reload, not restart.
      specialisation.only-backend-b.configuration = {
        services.pingora-lb.settings.upstreams = lib.mkForce [
          { address = "127.0.0.1:8082"; }
        ];
      };

      # A new package: every Exec*= line names another store path. Switching to it must
      # reload onto the new binary, not restart.
      specialisation.new-package.configuration = {
        services.pingora-lb.package = lib.mkForce nextPackage;
      };

      # The escape hatch: a config file outside the Nix store, checked only at run time.
      specialisation.runtime-config.configuration = {
        services.pingora-lb.configFile = runtimeConfigPath;
      };
    };

  testScript = { nodes, ... }:
    let
      toplevel = nodes.machine.system.build.toplevel;
      yaml = pkgs.formats.yaml { };
      settings = nodes.machine.services.pingora-lb.settings;
      # The machine's own settings with only backend-a: valid, and recognisable by its answers.
      goodRuntimeConfig = yaml.generate "pingora-lb-runtime-good.yaml"
        (settings // { upstreams = [{ address = "127.0.0.1:8081"; }]; });
      # The same with a misspelt key, which the daemon rejects (unknown keys are errors).
      badRuntimeConfig = yaml.generate "pingora-lb-runtime-bad.yaml"
        (settings // { listners = settings.listeners; });
    in
    # openFirewall opens the listener's port.
    assert builtins.elem 80 nodes.machine.networking.firewall.allowedTCPPorts;
    ''
      BOTH = {"backend-a", "backend-b"}


      def show(prop):
          return machine.succeed(
              f"systemctl show --property={prop} --value pingora-lb.service"
          ).strip()


      def manager_messages(prefix):
          """How many of systemd's own messages about the unit start with prefix."""
          return int(
              machine.succeed(
                  "journalctl --boot --output=cat _PID=1 UNIT=pingora-lb.service"
                  f" | grep --count '^{prefix}' || true"
              ).strip()
          )


      def answers(n=20):
          out = machine.succeed(
              f"for i in $(seq {n}); do curl --silent --fail --max-time 5 http://127.0.0.1/; done"
          )
          return set(out.split())


      def assert_serves(expected):
          machine.wait_until_succeeds("curl --silent --fail --max-time 5 http://127.0.0.1/")
          seen = answers()
          assert seen == expected, f"expected answers from {expected}, got {seen}"


      load_runs = 0


      def under_load(action):
          """Runs action() while two clients send requests; asserts none failed."""
          global load_runs
          load_runs += 1
          d = f"/run/lb-load-{load_runs}"
          machine.succeed(
              f"systemd-run --unit=lb-load-{load_runs} --collect ${lbLoad}/bin/lb-load {d}"
          )
          machine.wait_for_file(f"{d}/fresh.started", timeout=60)
          machine.wait_for_file(f"{d}/keepalive.started", timeout=60)
          action()
          # Keep the clients going against the new process for a while.
          machine.sleep(3)
          machine.succeed(f"touch {d}/stop")
          machine.wait_for_file(f"{d}/done", timeout=150)
          for client in ("fresh", "keepalive"):
              sent, failed = map(int, machine.succeed(f"cat {d}/{client}.result").split())
              errors = machine.succeed(f"cat {d}/{client}.errors 2>/dev/null || true")
              print(f"{client}: {sent} requests, {failed} failed")
              assert sent >= 20, f"{client}: only {sent} requests were sent"
              assert failed == 0, f"{client}: {failed} of {sent} requests failed:\n{errors}"


      def identity():
          return show("InvocationID"), show("MainPID")


      def executable(pid):
          return machine.succeed(f"readlink /proc/{pid}/exe").strip()


      def assert_reloaded(before, reloads_before):
          """The unit was reloaded by a handoff: new main process, same invocation."""
          invocation, old_pid = before
          assert show("ActiveState") == "active", show("ActiveState")
          assert show("InvocationID") == invocation, "the unit was restarted, not reloaded"
          assert show("NRestarts") == "0", "the unit was restarted"
          new_pid = show("MainPID")
          assert new_pid not in (old_pid, "0"), f"main process still {new_pid}: no handoff"
          # journald may take a moment to store systemd's message.
          machine.wait_until_succeeds(
              "journalctl --boot --output=cat _PID=1 UNIT=pingora-lb.service"
              f" | grep --count '^Reloaded ' | grep --line-regexp {reloads_before + 1}",
              timeout=30,
          )
          assert manager_messages("Stopping ") == 0, "the unit was stopped"
          assert manager_messages("Started ") == 1, "the unit was started again"
          # The old process drains (grace_period_seconds = 3) and exits; until then it may
          # still answer with the previous config.
          machine.wait_until_fails(f"kill -0 {old_pid}", timeout=60)


      def assert_untouched(before):
          """A failed reload left the old process serving, as main process."""
          assert show("ActiveState") == "active", show("ActiveState")
          assert identity() == before, f"{identity()} != {before}"


      def switch(name=None):
          path = f"${toplevel}/specialisation/{name}" if name else "${toplevel}"
          return machine.execute(f"{path}/bin/switch-to-configuration test >&2")[0]


      def switch_succeeds(name=None):
          status = switch(name)
          assert status == 0, f"switch-to-configuration exited {status}"


      def install_runtime_config(source):
          machine.succeed(f"install -D --mode=0644 {source} ${runtimeConfigPath}")


      start_all()
      machine.wait_for_unit("backend-a.service")
      machine.wait_for_unit("backend-b.service")
      machine.wait_for_unit("pingora-lb.service")
      machine.wait_for_open_port(80)

      with subtest("serves through to both backends as the service user"):
          assert_serves(BOTH)
          pid = show("MainPID")
          assert machine.succeed(f"ps -o user= -p {pid}").strip() == "pingora-lb"
          # CAP_NET_BIND_SERVICE is gone once port 80 is bound.
          for caps in ("CapEff", "CapAmb"):
              machine.succeed(f"grep -E '^{caps}:\\s+0+$' /proc/{pid}/status")
          machine.succeed("pingora-lb -t -c /etc/pingora-lb/pingora-lb.yaml")

      with subtest("systemctl reload hands over without failing a request"):
          before, reloads = identity(), manager_messages("Reloaded ")
          under_load(lambda: machine.succeed("systemctl reload pingora-lb.service"))
          assert_reloaded(before, reloads)
          assert_serves(BOTH)

      with subtest("a config change is applied by a reload, not a restart"):
          before, reloads = identity(), manager_messages("Reloaded ")
          under_load(lambda: switch_succeeds("only-backend-b"))
          assert_reloaded(before, reloads)
          assert_serves({"backend-b"})

          before, reloads = identity(), manager_messages("Reloaded ")
          assert switch() == 0
          assert_reloaded(before, reloads)
          assert_serves(BOTH)

      with subtest("a new package is applied by a reload onto the new binary, not a restart"):
          old_binary, new_binary = "${package}/bin/pingora-lb", "${nextPackage}/bin/pingora-lb"
          before, reloads = identity(), manager_messages("Reloaded ")
          assert executable(before[1]) == old_binary, executable(before[1])
          under_load(lambda: switch_succeeds("new-package"))
          assert_reloaded(before, reloads)
          running = executable(show("MainPID"))
          assert running == new_binary, f"the new main process runs {running}, not {new_binary}"
          assert_serves(BOTH)

          # And back: the old package is a new one too.
          before, reloads = identity(), manager_messages("Reloaded ")
          under_load(switch_succeeds)
          assert_reloaded(before, reloads)
          running = executable(show("MainPID"))
          assert running == old_binary, f"the new main process runs {running}, not {old_binary}"
          assert_serves(BOTH)

      with subtest("a refused config fails the switch and the old process keeps serving"):
          install_runtime_config("${badRuntimeConfig}")
          before = identity()
          status = switch("runtime-config")
          # 4: switch-to-configuration's "units failed" status (here: the reload job).
          assert status == 4, f"switch-to-configuration exited {status}, expected 4"
          assert_untouched(before)
          assert_serves(BOTH)
          machine.succeed("journalctl --boot --unit=pingora-lb.service | grep -F listners")

      with subtest("a fixed runtime config is applied by systemctl reload"):
          install_runtime_config("${goodRuntimeConfig}")
          before, reloads = identity(), manager_messages("Reloaded ")
          under_load(lambda: machine.succeed("systemctl reload pingora-lb.service"))
          assert_reloaded(before, reloads)
          assert_serves({"backend-a"})

      with subtest("a refused config fails systemctl reload and the old process keeps serving"):
          install_runtime_config("${badRuntimeConfig}")
          before = identity()
          machine.fail("systemctl reload pingora-lb.service")
          assert_untouched(before)
          assert_serves({"backend-a"})

      with subtest("back to the generated config"):
          before, reloads = identity(), manager_messages("Reloaded ")
          assert switch() == 0
          assert_reloaded(before, reloads)
          assert_serves(BOTH)

      with subtest("stops within the unit's timeout"):
          machine.succeed("timeout 45 systemctl stop pingora-lb.service")
          machine.wait_for_closed_port(80)
          assert show("ActiveState") == "inactive", show("ActiveState")
    '';
}
