# The values of dist/pingora-lb.yaml, the packaged default config, that the NixOS module uses
# as the defaults of services.pingora-lb.settings. tests/nix/check.sh compares this file with
# the YAML file key by key and fails on any difference; the one key deliberately left out is
# `upstreams` (the YAML file has placeholders, the module makes you name your backends).
{
  version = 1;
  threads = 2;
  fast_path = true;

  pid_file = "/run/pingora-lb/pingora-lb.pid";
  upgrade_sock = "/run/pingora-lb/upgrade.sock";

  error_log = "syslog";
  syslog = {
    identifier = "pingora-lb";
    facility = "daemon";
  };
  log_level = "info";

  user = "pingora-lb";
  group = "pingora-lb";

  grace_period_seconds = 30;
  graceful_shutdown_timeout_seconds = 5;

  listeners = [ "0.0.0.0:8080" ];

  selection = {
    algorithm = "round_robin";
  };

  health_check = {
    kind = "tcp";
    interval = "1s";
    timeout = "1s";
    rise = 1;
    fall = 1;
  };

  passive_health = {
    consecutive_failures = 5;
    ejection_time = "10s";
    max_ejection_time = "300s";
    on_5xx = false;
  };

  timeouts = {
    connect = "2s";
    read = "60s";
    idle = "60s";
  };

  retries = 2;

  client = {
    header_timeout = "60s";
    keepalive_timeout = "75s";
    body_timeout = "60s";
    send_timeout = "60s";
    tunnel_timeout = "1h";
    keepalive_requests = 1000;
    max_uri_length = 8192;
    max_header_size = 32768;
    max_header_count = 100;
  };

  forwarding = {
    x_forwarded = true;
    forwarded = false;
    trusted_proxies = [ ];
  };

  metrics = {
    listen = "127.0.0.1:9464";
  };

  access_log = {
    destination = "off";
  };
}
