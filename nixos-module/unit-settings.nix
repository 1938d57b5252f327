# The settings of dist/pingora-lb.service, the one unit file every package ships, in a form
# the NixOS module uses directly: section name -> directive -> value. A list is one line per
# element (as NixOS writes it); a bool is systemd's yes/no.
#
# This file and the unit file must say the same thing: tests/nix/check.sh evaluates this file
# with the Debian/RPM paths (the defaults below) and fails on any difference, in either
# direction. Change both together; the comments explaining each directive live in the unit.
{ bin ? "/usr/bin/pingora-lb"
, configFile ? "/etc/pingora-lb/pingora-lb.yaml"
, user ? "pingora-lb"
, group ? "pingora-lb"
}:
{
  Unit = {
    Description = "pingora-lb HTTP load balancer";
    Documentation = [ "https://github.com/pingora-lb/pingora-lb#readme" ];
    Wants = [ "network-online.target" ];
    After = [ "network-online.target" "nss-lookup.target" ];
  };

  Service = {
    Type = "notify";
    # The process a reload starts takes over with MAINPID= + READY=1: only "all" accepts it.
    NotifyAccess = "all";

    User = user;
    Group = group;

    ExecStartPre = "${bin} -t -c ${configFile}";
    ExecStart = "${bin} -c ${configFile}";
    # Socket handoff to a new process; blocks until it serves, non-zero leaves the old one.
    ExecReload = "${bin} reload -c ${configFile} --pid $MAINPID";

    TimeoutStartSec = "60s";
    TimeoutStopSec = "45s";
    # Right after a reload the old process is still draining beside the new one: both get SIGTERM.
    KillMode = "control-group";
    Restart = "on-failure";
    RestartSec = "2s";
    RestartPreventExitStatus = "78 77 67";
    LimitNOFILE = 1048576;

    RuntimeDirectory = "pingora-lb";
    RuntimeDirectoryMode = "0750";

    AmbientCapabilities = "CAP_NET_BIND_SERVICE CAP_DAC_READ_SEARCH";
    CapabilityBoundingSet = "CAP_NET_BIND_SERVICE CAP_DAC_READ_SEARCH";
    NoNewPrivileges = true;

    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    DevicePolicy = "closed";
    PrivateIPC = true;
    PrivateMounts = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectControlGroups = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6";
    RestrictNamespaces = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    RemoveIPC = true;
    UMask = "0077";

    SystemCallArchitectures = "native";
    # Order matters: allow the service set, deny two groups, then allow capset back.
    SystemCallFilter = [
      "@system-service"
      "~@privileged @resources"
      "capset"
    ];
    SystemCallErrorNumber = "EPERM";
  };

  Install = {
    WantedBy = [ "multi-user.target" ];
  };
}
