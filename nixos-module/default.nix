# NixOS module: services.pingora-lb, the HTTP load balancer with zero-downtime reload.
#
#   imports = [ pingora-lb.nixosModules.default ];   # from this repository's flake
#   services.pingora-lb = {
#     enable = true;
#     openFirewall = true;
#     settings.listeners = [ "0.0.0.0:80" ];
#     settings.upstreams = [ { address = "10.0.0.11:8080"; } { address = "10.0.0.12:8080"; } ];
#   };
#
# The unit is dist/pingora-lb.service, the one every package ships: its directives come from
# ./unit-settings.nix, which tests/nix/check.sh keeps equal to that file. The settings default
# to dist/pingora-lb.yaml (./config-defaults.nix, checked the same way). A configuration
# change or a new package is applied by `systemctl reload` (socket handoff to a new process,
# no connection lost), never by a restart; a configuration the daemon refuses fails the
# build, or, for a file outside the Nix store, the reload, while the running process keeps
# serving.
{ config
, lib
, pkgs
, ...
}:

let
  cfg = config.services.pingora-lb;

  format = pkgs.formats.yaml { };

  # The packaged default config (dist/pingora-lb.yaml) as Nix values.
  defaults = import ./config-defaults.nix;

  # Every directive and the reload command read the config at this path. Its target changes
  # with each generation while the path stays put, so the `systemctl reload` that
  # switch-to-configuration runs (after /etc has been updated) starts a process that reads
  # the new file.
  configPath = "/etc/pingora-lb/pingora-lb.yaml";

  # Runtime directory of the unit (RuntimeDirectory=pingora-lb): with ProtectSystem=strict
  # the only place the service can create its pid file and upgrade socket.
  runtimeDir = "/run/pingora-lb";

  # The directives of dist/pingora-lb.service, with this system's paths and accounts.
  unit = import ./unit-settings.nix {
    bin = lib.getExe cfg.package;
    configFile = configPath;
    inherit (cfg) user group;
  };

  # A setting set to null is left out of the file, and so are no pools and no routes: the
  # binary's own defaults apply.
  fileSettings = lib.filterAttrs
    (name: value: !(builtins.elem name [ "pools" "routes" ] && (value == { } || value == [ ])))
    (lib.filterAttrsRecursive (_: value: value != null) cfg.settings);
  generatedConfig = format.generate "pingora-lb.yaml" fileSettings;

  # A path outside the Nix store (a mutable or secret file) cannot be read by a build: it is
  # only checked when the service starts (ExecStartPre) and by the reload command.
  isRuntimeFile = builtins.isString cfg.configFile
    && !lib.hasPrefix "${builtins.storeDir}/" cfg.configFile;

  # Certificates and keys outside the Nix store (security.acme's, /etc/...) cannot be read
  # by a build: the build-time check of a generated config reads a throwaway certificate in
  # their place, and ExecStartPre and the reload check the real ones.
  placeholderCertificate = pkgs.runCommand "pingora-lb-placeholder-certificate"
    { nativeBuildInputs = [ pkgs.openssl ]; }
    ''
      mkdir "$out"
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -subj /CN=placeholder.invalid -addext subjectAltName=DNS:placeholder.invalid \
        -keyout "$out/key.pem" -out "$out/cert.pem"
    '';
  inStore = path: lib.hasPrefix "${builtins.storeDir}/" (toString path);
  withPlaceholder = certificate:
    if inStore certificate.cert && inStore certificate.key then certificate
    else { cert = "${placeholderCertificate}/cert.pem"; key = "${placeholderCertificate}/key.pem"; };
  withPlaceholders = listener:
    if builtins.isAttrs listener && listener.tls or null != null
    then listener // { tls = listener.tls // { certificates = map withPlaceholder listener.tls.certificates; }; }
    else listener;
  checkedListeners = map withPlaceholders cfg.settings.listeners;
  usesPlaceholders = toString cfg.configFile == toString generatedConfig
    && checkedListeners != cfg.settings.listeners;
  fileToCheck =
    if usesPlaceholders
    then
      format.generate "pingora-lb-check.yaml" (fileSettings // { listeners = checkedListeners; })
    else cfg.configFile;

  checkedConfig =
    if cfg.checkConfig && !isRuntimeFile
      && pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform
    then
      pkgs.runCommand "pingora-lb-checked.yaml"
        {
          nativeBuildInputs = [ cfg.package ];
          preferLocalBuild = true;
        }
        ''
          # The same check as ExecStartPre and the reload command: a config the daemon
          # would refuse fails the build, with the file, line and key in the message.
          pingora-lb -t -c ${fileToCheck}
          ln -s ${cfg.configFile} "$out"
        ''
    else cfg.configFile;

  # The certificates of security.acme this service serves.
  acmeCerts = map (name: config.security.acme.certs.${name}) cfg.useACMEHosts;
  acmeTargets = map (name: "acme-finished-${name}.target") cfg.useACMEHosts;

  # One argument of an Exec*= line: quoted, with systemd's specifier and variable
  # characters escaped.
  systemdArg = arg: lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON arg);

  # A listener is an address, or an attribute set with `address` (and `tls`).
  listenerPort = listener:
    let address = if builtins.isString listener then listener else listener.address;
    in lib.toInt (lib.last (lib.splitString ":" address));

  errorLogIsFile = lib.hasPrefix "/" cfg.settings.error_log;
  logsDir = "/var/log/pingora-lb/";

  inRuntimeDir = path: path == null || lib.hasPrefix "${runtimeDir}/" path;

  listenAddress =
    lib.types.strMatching "([0-9]{1,3}(\\.[0-9]{1,3}){3}|\\[[0-9a-fA-F:.]+]):[0-9]{1,5}";

  upstreamType = lib.types.submodule {
    freeformType = format.type;
    options.address = lib.mkOption {
      type = lib.types.str;
      example = "10.0.0.11:8080";
      description = "`IP:port` or `hostname:port` of the backend.";
    };
  };

  settingsOptions = {
    threads = lib.mkOption {
      type = lib.types.ints.positive;
      default = defaults.threads;
      description = "Worker threads of the proxy service.";
    };

    fast_path = lib.mkOption {
      type = lib.types.bool;
      default = defaults.fast_path;
      description = ''
        Forward common HTTP/1.1 requests (one Host, no body or a `Content-Length`,
        nothing to interpret) as bytes instead of through pingora-proxy, at about half
        its CPU per request. Anything else takes pingora-proxy either way.
      '';
    };

    pid_file = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = defaults.pid_file;
      description = ''
        Where the daemon writes its pid. It must be in {file}`${runtimeDir}`, the only
        directory the sandboxed service can write to; `null` writes none.
      '';
    };

    upgrade_sock = lib.mkOption {
      type = lib.types.str;
      default = defaults.upgrade_sock;
      description = ''
        Unix socket over which the listening sockets are handed to the new process on
        reload. It must be in {file}`${runtimeDir}` (owned by the service user, mode 0750).
      '';
    };

    error_log = lib.mkOption {
      type = lib.types.str;
      default = defaults.error_log;
      example = "/var/log/pingora-lb/error.log";
      description = ''
        `syslog` (read by journald: `journalctl -t pingora-lb`), `stderr` (the unit's
        journal), or an absolute file path. A file in {file}`${logsDir}` gets that directory
        as the unit's `LogsDirectory=`; a file elsewhere gets its directory added to
        `ReadWritePaths=`.
      '';
    };

    log_level = lib.mkOption {
      type = lib.types.enum [ "off" "error" "warn" "info" "debug" "trace" ];
      default = defaults.log_level;
      description = "Least severe level logged; `RUST_LOG` in the service's environment overrides it.";
    };

    user = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = cfg.user;
      defaultText = lib.literalExpression "config.services.pingora-lb.user";
      description = ''
        Account the daemon runs as. systemd already starts it as
        {option}`services.pingora-lb.user`: keep the two in agreement.
      '';
    };

    group = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = cfg.group;
      defaultText = lib.literalExpression "config.services.pingora-lb.group";
      description = "Group the daemon runs as; keep it equal to {option}`services.pingora-lb.group`.";
    };

    grace_period_seconds = lib.mkOption {
      type = lib.types.ints.between 0 3600;
      default = defaults.grace_period_seconds;
      description = ''
        How long in-flight requests may still finish after a stop or a handoff. The unit
        gives a stop 45 s (`TimeoutStopSec=`), enough for the default 30 + 5: raise
        `systemd.services.pingora-lb.serviceConfig.TimeoutStopSec` with it.
      '';
    };

    graceful_shutdown_timeout_seconds = lib.mkOption {
      type = lib.types.ints.between 0 3600;
      default = defaults.graceful_shutdown_timeout_seconds;
      description = "Time given to the runtimes to stop once the grace period is over.";
    };

    listeners = lib.mkOption {
      type = lib.types.nonEmptyListOf (lib.types.either listenAddress (lib.types.submodule {
        freeformType = format.type;
        options.address = lib.mkOption {
          type = listenAddress;
          description = "`IP:PORT` of the listener.";
        };
      }));
      default = defaults.listeners;
      example = lib.literalExpression ''
        [
          "0.0.0.0:80"
          { address = "0.0.0.0:443"; tls.certificates = [ { cert = "/etc/pingora-lb/tls/site.pem"; key = "/etc/pingora-lb/tls/site.key"; } ]; }
        ]
      '';
      description = ''
        `IP:PORT` addresses to accept HTTP on (`[IPv6]:PORT` for IPv6), or attribute sets
        with `address` and `tls` (`certificates`, `min_version`, `http2`) for HTTPS,
        `redirect_to_https = true` for a plain listener that sends clients to HTTPS, and
        `freebind = true` for an address this machine may not hold yet, such as the virtual
        IP of a keepalived pair (see {option}`services.pingora-lb.statusCommand`). Ports
        below 1024 work: the unit grants `CAP_NET_BIND_SERVICE`, which the daemon drops once
        they are bound. {option}`services.pingora-lb.openFirewall` opens these ports.
      '';
    };

    upstreams = lib.mkOption {
      type = lib.types.nullOr (lib.types.nonEmptyListOf upstreamType);
      default = null;
      example = [
        { address = "10.0.0.11:8080"; }
        { address = "10.0.0.12:8080"; weight = 2; }
        { address = "api.internal:443"; tls = true; }
      ];
      description = ''
        The backends of the pool `default`, each with the keys `address`, `weight`, `tls`,
        `sni`, `host`, `verify_cert`, `ca_file` and `http2`. There is no default: give these, or
        {option}`services.pingora-lb.settings.pools` and `routes`.
      '';
    };

    pools = lib.mkOption {
      type = lib.types.attrsOf (lib.types.submodule {
        freeformType = format.type;
        options.upstreams = lib.mkOption {
          type = lib.types.nonEmptyListOf upstreamType;
          description = "The backends of the pool.";
        };
      });
      default = { };
      example = lib.literalExpression ''
        { api = { upstreams = [ { address = "10.0.0.21:9000"; } ]; selection.algorithm = "least_connections"; }; }
      '';
      description = ''
        Named pools besides `upstreams`, each with the keys `upstreams`, `selection`,
        `health_check`, `passive_health`, `timeouts`, `retries` and `send_proxy_protocol`.
      '';
    };

    routes = lib.mkOption {
      type = lib.types.listOf (lib.types.submodule {
        freeformType = format.type;
        options.pool = lib.mkOption {
          type = lib.types.str;
          description = "The pool requests go to: `default` or a name of `pools`.";
        };
      });
      default = [ ];
      example = [
        { host = "api.example.com"; path = "/v1/"; pool = "api"; max_body_size = "10m"; }
        { pool = "default"; }
      ];
      description = ''
        Which pool each request goes to, by `host` (exact or `*.example.com`), `path` prefix
        (the longest wins) and `listeners`; each may also set `max_body_size`, `timeouts`,
        `request_headers` and `response_headers`. Without routes every request goes to the
        only pool.
      '';
    };
  };
in
{
  options.services.pingora-lb = {
    enable = lib.mkEnableOption "pingora-lb, an HTTP load balancer with zero-downtime reload";

    package = lib.mkPackageOption pkgs "pingora-lb" {
      extraDescription = ''
        pingora-lb is not in nixpkgs: add the pingora-lb flake's `overlays.default` to
        {option}`nixpkgs.overlays`, or import the flake's `nixosModules.default`, which falls
        back to the flake's own build.
      '';
    };

    user = lib.mkOption {
      type = lib.types.str;
      default = "pingora-lb";
      description = ''
        User the service runs as (`User=`). The default account is created; any other
        must exist already. A switch applies a change of it by a reload, which the running
        process refuses (it hands its sockets only to its own user): run
        `systemctl restart pingora-lb` after such a switch.
      '';
    };

    group = lib.mkOption {
      type = lib.types.str;
      default = "pingora-lb";
      description = ''
        Group the service runs as (`Group=`). The default group is created; any other
        must exist already. A change of it, like one of {option}`services.pingora-lb.user`,
        needs `systemctl restart pingora-lb`.
      '';
    };

    settings = lib.mkOption {
      type = lib.types.submodule {
        freeformType = format.type;
        options = settingsOptions;
      };
      default = { };
      example = lib.literalExpression ''
        {
          listeners = [ "0.0.0.0:80" ];
          upstreams = [
            { address = "10.0.0.11:8080"; }
            { address = "10.0.0.12:8080"; }
          ];
          selection.algorithm = "consistent_hash";
          selection.key = "header:X-User";
          health_check = {
            kind = "http";
            path = "/healthz";
          };
        }
      '';
      description = ''
        The configuration file {file}`${configPath}`, as Nix values. The defaults are those
        of the packaged config (dist/pingora-lb.yaml); set at least `upstreams`. Unknown keys
        are rejected by the daemon, and so by the build (see
        {option}`services.pingora-lb.checkConfig`). A value set to `null` is left out.
        Every key is described in the project's README, section "Configuration reference".
      '';
    };

    configFile = lib.mkOption {
      type = lib.types.path;
      default = generatedConfig;
      defaultText = lib.literalMD "a file generated from {option}`services.pingora-lb.settings`";
      example = "/var/lib/secrets/pingora-lb.yaml";
      description = ''
        The configuration file, instead of one generated from
        {option}`services.pingora-lb.settings`. It is linked to {file}`${configPath}`, the
        path the unit reads. A file in the Nix store is checked at build time; a path outside
        it (kept up to date by other means) is only checked when the service starts or
        reloads (give such a path as a string, so that it is not copied into the store), and
        a change to its contents is applied by `systemctl reload pingora-lb`, not by a system
        switch.
      '';
    };

    checkConfig = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Check the configuration file with `pingora-lb -t` when the system is built, so that
        a config the daemon would refuse fails the build instead of the reload. Turn it off
        when the file refers to something a build cannot read, such as a `ca_file` outside
        the Nix store.
      '';
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Open the TCP ports of {option}`services.pingora-lb.settings.listeners` in the
        firewall. With {option}`services.pingora-lb.configFile` set, keep `settings.listeners`
        in step with it or open the ports yourself.
      '';
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = ''
        Extra command-line arguments of the daemon started by the unit (`ExecStart=`). A
        process started by a reload gets its arguments from `pingora-lb reload`, not from
        here: put lasting settings in the configuration file.
      '';
    };

    useACMEHosts = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "example.com" ];
      description = ''
        Certificates of {option}`security.acme.certs` that TLS listeners serve, by name.
        For each, the service joins the certificate's group (to read its key), starts
        once it exists, and is reloaded (socket handoff, no connection lost) when it is
        renewed. Use them in a listener through
        {option}`services.pingora-lb.acmeCertificates`:
        ```nix
        services.pingora-lb.settings.listeners = [
          { address = "0.0.0.0:80"; redirect_to_https = true; }
          { address = "0.0.0.0:443";
            tls.certificates = [ config.services.pingora-lb.acmeCertificates."example.com" ]; }
        ];
        ```
        ACME HTTP-01 challenges on a listener with `redirect_to_https` still reach the
        backends, so a backend can answer them (or use a DNS-01 challenge).
      '';
    };

    acmeCertificates = lib.mkOption {
      type = lib.types.attrsOf (lib.types.attrsOf lib.types.str);
      readOnly = true;
      default = lib.genAttrs cfg.useACMEHosts (name:
        let directory = config.security.acme.certs.${name}.directory;
        in { cert = "${directory}/fullchain.pem"; key = "${directory}/key.pem"; });
      defaultText = lib.literalMD "`{ cert, key }` in each certificate's directory";
      description = ''
        For each name of {option}`services.pingora-lb.useACMEHosts`, the entry of a
        listener's `tls.certificates` that serves it.
      '';
    };

    statusCommand = lib.mkOption {
      type = lib.types.str;
      readOnly = true;
      default = "${lib.getExe cfg.package} status -c ${configPath}";
      defaultText = lib.literalExpression
        ''"''${lib.getExe config.services.pingora-lb.package} status -c ${configPath}"'';
      description = ''
        The command that exits 0 when this machine's balancer serves and every pool has a
        usable backend (it asks the `metrics.listen` endpoint, so set
        {option}`services.pingora-lb.settings.metrics`): the track script of a keepalived pair.
        ```nix
        services.keepalived = {
          enable = true;
          vrrpScripts.pingora-lb = {
            script = config.services.pingora-lb.statusCommand;
            interval = 1; fall = 2; rise = 2; user = "root";
          };
          vrrpInstances.web = {
            interface = "eth0"; state = "BACKUP"; priority = 150; virtualRouterId = 51;
            virtualIps = [ { addr = "192.0.2.10/24"; } ];
            trackScripts = [ "pingora-lb" ];
          };
        };
        services.pingora-lb.settings.listeners = [ { address = "192.0.2.10:80"; freebind = true; } ];
        ```
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    # Defaults of the keys without a typed option, leaf by leaf, so that setting one key of
    # a section (health_check.kind, say) keeps the packaged values of the others.
    services.pingora-lb.settings = lib.mapAttrsRecursive (_: lib.mkDefault) {
      inherit (defaults) version syslog selection health_check passive_health timeouts retries
        client forwarding metrics access_log;
    };

    assertions = [
      {
        assertion = inRuntimeDir cfg.settings.upgrade_sock && inRuntimeDir cfg.settings.pid_file;
        message = ''
          services.pingora-lb.settings.upgrade_sock and pid_file must be in ${runtimeDir}/:
          the service's file system is read-only everywhere else (ProtectSystem=strict).
        '';
      }
      {
        assertion = cfg.settings.upstreams != null || cfg.settings.pools != { };
        message = "services.pingora-lb.settings needs backends: set upstreams, or pools and routes.";
      }
    ];

    environment.systemPackages = [ cfg.package ];

    security.acme.certs = lib.genAttrs cfg.useACMEHosts (_: {
      reloadServices = [ "pingora-lb.service" ];
    });

    environment.etc."pingora-lb/pingora-lb.yaml".source = checkedConfig;

    systemd.services.pingora-lb = {
      description = unit.Unit.Description;
      documentation = unit.Unit.Documentation;
      wants = unit.Unit.Wants ++ acmeTargets;
      after = unit.Unit.After ++ acmeTargets;
      wantedBy = unit.Install.WantedBy;

      # A switch applies any change of this unit by a reload (socket handoff to a new
      # process, no connection lost), never by a restart, as the deb and rpm do on upgrade:
      #   - a new config changes only this trigger (and the /etc link the unit reads, which
      #     the activation script updates before the reload);
      #   - a new package changes the store path in ExecStart and ExecReload. The package is
      #     deliberately no restart trigger.
      # reloadIfChanged (X-ReloadIfChanged) makes every change of the unit file a reload;
      # reloadTriggers alone would reload only when nothing but the triggers changed, and
      # restart otherwise (NixOS manual, "Unit handling"). switch-to-configuration runs
      # `systemctl daemon-reload` before it reloads units, so the reload runs the new unit's
      # ExecReload: the new package's `pingora-lb reload`, which starts the new server from
      # its own executable. That server is a descendant of the ExecReload process, which
      # systemd starts under the new unit's settings: new User=, capabilities and sandbox
      # directives apply to it as they would to a restart.
      # Two changes a reload does not carry out:
      #   - services.pingora-lb.user/group: the handoff passes sockets only between
      #     processes of one user (or root), so the reload fails, the switch reports it
      #     (exit status 4) and the old process keeps serving as the old user. Apply it with
      #     `systemctl restart pingora-lb`.
      #   - extraArgs: only ExecStart passes them; they apply at the next start or restart.
      reloadIfChanged = true;
      reloadTriggers = [ checkedConfig ];

      serviceConfig = unit.Service // lib.optionalAttrs (acmeCerts != [ ]) {
        SupplementaryGroups = lib.unique (map (cert: cert.group) acmeCerts);
      } // {
        ExecStart = unit.Service.ExecStart + lib.concatMapStrings (arg: " " + systemdArg arg) cfg.extraArgs;
      }
        // lib.optionalAttrs (errorLogIsFile && lib.hasPrefix logsDir cfg.settings.error_log) {
        LogsDirectory = "pingora-lb";
        LogsDirectoryMode = "0750";
      }
        // lib.optionalAttrs (errorLogIsFile && !lib.hasPrefix logsDir cfg.settings.error_log) {
        ReadWritePaths = [ (dirOf cfg.settings.error_log) ];
      };
    };

    users.users = lib.optionalAttrs (cfg.user == "pingora-lb") {
      pingora-lb = {
        isSystemUser = true;
        inherit (cfg) group;
        description = "pingora-lb load balancer";
      };
    };

    users.groups = lib.optionalAttrs (cfg.group == "pingora-lb") {
      pingora-lb = { };
    };

    networking.firewall.allowedTCPPorts =
      lib.mkIf cfg.openFirewall (lib.unique (map listenerPort cfg.settings.listeners));
  };
}
