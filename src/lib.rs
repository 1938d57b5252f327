//! pingora-lb: a hardened HTTP load balancer on pingora, built to run under systemd and to
//! be replaced without dropping a request.
//!
//! The binary (`main.rs`) only dispatches the command line to these modules.

/// The access log and its writer thread.
pub mod access_log;
/// The memory allocator.
pub mod allocator;
/// The command line.
pub mod cli;
/// Client connections: the request header deadline and keep-alive limits.
pub mod client_connections;
/// The YAML configuration and its validation.
pub mod config;
/// Exit statuses (sysexits.h).
pub mod exit_codes;
/// The fast path: common HTTP/1.1 requests forwarded as bytes.
pub mod fast_path;
/// X-Forwarded-* and Forwarded headers.
pub mod forwarding;
/// The header operations both request paths share.
pub mod header_edits;
/// The process's life after start-up: readiness, signals, handoff, draining.
pub mod lifecycle;
/// Binding the listening sockets and handing them to pingora.
pub mod listeners;
/// The error log: stderr, syslog or a file.
pub mod logging;
/// Prometheus metrics: the handles every other module counts with.
pub mod metrics;
/// The metrics listener's `/metrics` and `/status` endpoint.
pub mod metrics_endpoint;
/// sd_notify messages to systemd.
pub mod notify;
/// Giving up root and capabilities after binding.
pub mod privileges;
/// The HTTP proxy: selection, failover, headers.
pub mod proxy;
/// HAProxy's PROXY protocol, read from trusted load balancers and sent to backends.
pub mod proxy_protocol;
/// Start-up reports to a reload command or a `-d` parent.
pub mod readiness;
/// Plain HTTP redirected to HTTPS.
pub mod redirect;
/// The `reload` command.
pub mod reload;
/// The HTTP/1 request rules checked before a request is forwarded.
pub mod request_rules;
/// Routes: which pool a request goes to, and its limits and header rules.
pub mod routing;
/// The pid file and the runtime directory.
pub mod runtime_files;
/// The start-up sequence of a serving process.
pub mod startup;
/// `pingora-lb status`: can this machine's balancer take traffic (keepalived's track script).
pub mod status;
/// The few system calls no safe crate wraps: the only `unsafe` code.
pub mod system;
/// TLS termination: settings and the certificate chosen by SNI.
pub mod tls;
/// Requests in flight and draining.
pub mod traffic;
/// The socket handoff between an old process and its successor.
pub mod upgrade;
/// The pools of backends, their selection and health.
pub mod upstreams;
