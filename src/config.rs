//! The one YAML configuration file: pingora's server keys and the load balancer's own,
//! parsed strictly (unknown keys are errors) so that a typo never falls back to a default.
//!
//! Every check that can be made without touching the network or the file system (apart from
//! reading a CA file) lives here, so `-t`, start-up, the reload command and the packages'
//! `ExecStartPre` share one validation path.

mod defaults;
mod error;
mod listener;
mod pool;
mod routes;
mod values;

use std::path::Path;

use serde::Deserialize;

use crate::runtime_files::check_private_parent;

pub use error::ConfigError;
pub use listener::{Certificate, Listener, TlsListener, TlsVersion, EXPIRY_WARNING_DAYS};
pub use pool::{
    round_robin_turns, HealthCheck, HealthCheckKind, PassiveHealth, PoolConfig,
    ProxyProtocolVersion, Selection, Timeouts, Upstream, MAX_UPSTREAMS, MIN_HEALTH_INTERVAL,
};
pub use routes::{HeaderRules, RouteConfig, RouteTimeouts};
pub use values::{
    AbsolutePath, AccessLogDestination, ByteSize, CaFile, Cidr, ErrorLog, HashKey, HostPattern,
    HumanDuration, ListenAddress, LogLevel, NonEmpty, SyslogFacility, UpstreamAddress, Weight,
};

/// The configuration the binary runs when no `-c` is given: the pingora quickstart's
/// load balancer (round robin over 1.1.1.1 and 1.0.0.1 over TLS, SNI and Host
/// `one.one.one.one`, TCP health check every second, listening on 0.0.0.0:6188).
pub const SEED_CONFIG: &str = include_str!("config/seed.yaml");

/// Name used in error messages for [SEED_CONFIG].
pub const SEED_CONFIG_NAME: &str = "<embedded default config>";

/// The largest configuration file read: a thousand times a large real one, small enough
/// that parsing and checking it stays well under a second.
pub const MAX_FILE_SIZE: u64 = 1024 * 1024;

/// Proxy listeners one process may have: with the metrics listener, every listening socket
/// must fit into the one handoff message (see `upgrade`).
pub const MAX_LISTENERS: usize = 63;

/// Routes one process may have.
pub const MAX_ROUTES: usize = 10_000;

/// The name of the pool the top-level `upstreams` form.
pub const DEFAULT_POOL: &str = "default";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Configuration format version; only 1 exists.
    #[serde(default = "defaults::version", deserialize_with = "values::version")]
    pub version: usize,
    /// Worker threads of the proxy service.
    #[serde(default = "defaults::threads", deserialize_with = "values::threads")]
    pub threads: usize,
    /// Whether idle worker threads may steal work from busy ones (pingora's
    /// `work_stealing`); by default only with more than one thread, since one thread has
    /// no one to steal from and a current-thread runtime is cheaper.
    #[serde(default)]
    pub work_stealing: Option<bool>,
    /// Whether common HTTP/1.1 requests take the fast path (forwarded as bytes) rather
    /// than pingora-proxy; see `fast_path.rs`.
    #[serde(default = "defaults::yes")]
    pub fast_path: bool,
    /// Run in the background, as `-d` does.
    #[serde(default)]
    pub daemon: bool,
    /// Where the process writes its pid; none by default.
    #[serde(default)]
    pub pid_file: Option<AbsolutePath>,
    /// Unix socket over which listening sockets are handed to a new process on upgrade.
    #[serde(default = "defaults::upgrade_sock")]
    pub upgrade_sock: AbsolutePath,
    /// Where error (operational) log lines go.
    #[serde(default)]
    pub error_log: ErrorLog,
    /// How the error log reaches syslog when `error_log: syslog`.
    #[serde(default)]
    pub syslog: SyslogConfig,
    /// Least severe level logged; `RUST_LOG` overrides it.
    #[serde(default)]
    pub log_level: LogLevel,
    /// Unprivileged user to switch to after binding, when started as root.
    #[serde(default)]
    pub user: Option<String>,
    /// Group to switch to; defaults to the user's primary group.
    #[serde(default)]
    pub group: Option<String>,
    /// Longest time in-flight requests get to finish after SIGTERM or a handoff.
    #[serde(
        default = "defaults::grace_period_seconds",
        deserialize_with = "values::grace_seconds"
    )]
    pub grace_period_seconds: u64,
    /// After SIGTERM, new connections are still accepted (and answered with `Connection:
    /// close`) this long before the listeners close, within the grace period: in a
    /// keepalived pair, the time the virtual IP takes to move away, so no client is refused.
    #[serde(default = "defaults::stop_accepting_after")]
    pub stop_accepting_after: HumanDuration,
    /// Time given to pingora's runtimes to stop once the grace period is over.
    #[serde(
        default = "defaults::graceful_shutdown_timeout_seconds",
        deserialize_with = "values::grace_seconds"
    )]
    pub graceful_shutdown_timeout_seconds: u64,
    /// Idle upstream connections kept for reuse.
    #[serde(
        default = "defaults::upstream_keepalive_pool_size",
        deserialize_with = "values::pool_size"
    )]
    pub upstream_keepalive_pool_size: usize,
    /// CA bundle used to verify TLS upstreams that have no `ca_file` of their own.
    #[serde(default)]
    pub ca_file: Option<CaFile>,
    /// Addresses the load balancer accepts client connections on.
    pub listeners: NonEmpty<Listener, MAX_LISTENERS>,
    /// The backends of the pool `default`, which every request goes to when there are no
    /// `routes`.
    #[serde(default)]
    pub upstreams: Option<NonEmpty<Upstream, MAX_UPSTREAMS>>,
    /// How a backend of `upstreams` is chosen for each request.
    #[serde(default)]
    pub selection: Selection,
    /// Active health checking of `upstreams`.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// Taking out backends of `upstreams` that fail live requests.
    #[serde(default)]
    pub passive_health: PassiveHealth,
    /// Timeouts towards `upstreams`.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Named pools of backends, besides `upstreams`.
    #[serde(default)]
    pub pools: std::collections::BTreeMap<String, PoolConfig>,
    /// Which pool each request goes to.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// PROXY protocol headers accepted from load balancers in front of this one.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocolIn>,
    /// Send the backends of `upstreams` a PROXY protocol header naming the client.
    #[serde(default)]
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    /// Status of a request no route matches.
    #[serde(
        default = "defaults::no_route_status",
        deserialize_with = "values::error_status"
    )]
    pub no_route_status: u16,
    /// Timeouts and size limits a client connection meets.
    #[serde(default)]
    pub client: ClientLimits,
    /// How many other backends of `upstreams` a request is tried on when connecting to its
    /// backend fails.
    #[serde(default = "defaults::retries", deserialize_with = "values::retries")]
    pub retries: usize,
    /// Headers telling backends who the client is.
    #[serde(default)]
    pub forwarding: Forwarding,
    /// One line per request.
    #[serde(default)]
    pub access_log: AccessLogConfig,
    /// The Prometheus and status endpoint.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
}

/// Where PROXY protocol headers (v1 or v2) come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolIn {
    /// Connections from these sources must start with a header, and the client address is
    /// the one it names; from anyone else a header is not read (it is a bad request).
    pub from: Vec<Cidr>,
    /// Only on these listeners; all when empty.
    #[serde(default)]
    pub listeners: Vec<ListenAddress>,
}

/// Headers telling backends who the client is.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forwarding {
    /// Send `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host`.
    #[serde(default)]
    pub x_forwarded: bool,
    /// Send the RFC 7239 `Forwarded` header.
    #[serde(default)]
    pub forwarded: bool,
    /// Clients whose own forwarding headers are kept and appended to; anyone else's are
    /// replaced, so a client cannot pose as another.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
}

/// Format of access log lines.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// The combined log format, with the upstream, durations and retries appended.
    #[default]
    Combined,
    /// One JSON object per line.
    Json,
}

/// The access log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// `off`, `syslog` or an absolute file path.
    #[serde(default)]
    pub destination: AccessLogDestination,
    /// Line format.
    #[serde(default)]
    pub format: AccessLogFormat,
    /// Fraction of requests logged, from 0 (none) to 1 (all).
    #[serde(
        default = "defaults::sample_rate",
        deserialize_with = "values::sample_rate"
    )]
    pub sample_rate: f64,
    /// Syslog settings, apart from the error log's.
    #[serde(default = "access_syslog")]
    pub syslog: SyslogConfig,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            destination: AccessLogDestination::Off,
            format: AccessLogFormat::Combined,
            sample_rate: defaults::sample_rate(),
            syslog: access_syslog(),
        }
    }
}

/// The Prometheus (`/metrics`) and backend status (`/status`) endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where it listens; keep it on a private address.
    pub listen: ListenAddress,
}

/// Timeouts and size limits a client connection meets, with nginx's and HAProxy's
/// defaults: a slow or idle client cannot hold a connection (and its memory) for ever.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientLimits {
    /// Longest time to receive a whole request header, from the connection's accept or
    /// the end of the idle time (nginx `client_header_timeout`).
    #[serde(default = "defaults::client_header_timeout")]
    pub header_timeout: HumanDuration,
    /// Idle time allowed between two requests on a kept-alive connection, in whole
    /// seconds (nginx `keepalive_timeout`).
    #[serde(default = "defaults::client_keepalive_timeout")]
    pub keepalive_timeout: HumanDuration,
    /// Longest wait for the next part of a request body (nginx `client_body_timeout`).
    #[serde(default = "defaults::client_body_timeout")]
    pub body_timeout: HumanDuration,
    /// Longest wait for the client to take the next part of a response (nginx
    /// `send_timeout`).
    #[serde(default = "defaults::client_send_timeout")]
    pub send_timeout: HumanDuration,
    /// Idle time allowed, either way, on a connection the backend upgraded (WebSocket),
    /// instead of the read and send timeouts (HAProxy `timeout tunnel`).
    #[serde(default = "defaults::client_tunnel_timeout")]
    pub tunnel_timeout: HumanDuration,
    /// Requests served on one connection before it is closed (nginx `keepalive_requests`).
    #[serde(
        default = "defaults::keepalive_requests",
        deserialize_with = "values::keepalive_requests"
    )]
    pub keepalive_requests: u32,
    /// Longest request-target (path and query); longer gets 414.
    #[serde(
        default = "defaults::max_uri_length",
        deserialize_with = "values::uri_length"
    )]
    pub max_uri_length: usize,
    /// Largest request line and header fields together; larger gets 431.
    #[serde(
        default = "defaults::max_header_size",
        deserialize_with = "values::header_size"
    )]
    pub max_header_size: usize,
    /// Most header fields in a request; more gets 431.
    #[serde(
        default = "defaults::max_header_count",
        deserialize_with = "values::header_count"
    )]
    pub max_header_count: usize,
}

impl ClientLimits {
    /// The requests a connection may still carry after the one it has read, when it has
    /// served `served` before: with none, that request is its last.
    pub fn requests_after(&self, served: u32) -> u32 {
        self.keepalive_requests.saturating_sub(served + 1)
    }
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            header_timeout: defaults::client_header_timeout(),
            keepalive_timeout: defaults::client_keepalive_timeout(),
            body_timeout: defaults::client_body_timeout(),
            send_timeout: defaults::client_send_timeout(),
            tunnel_timeout: defaults::client_tunnel_timeout(),
            keepalive_requests: defaults::keepalive_requests(),
            max_uri_length: defaults::max_uri_length(),
            max_header_size: defaults::max_header_size(),
            max_header_count: defaults::max_header_count(),
        }
    }
}

/// Syslog settings for the error log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// Program name of each line (`journalctl -t IDENTIFIER`).
    #[serde(default = "defaults::syslog_identifier")]
    pub identifier: String,
    /// Syslog facility.
    #[serde(default)]
    pub facility: SyslogFacility,
    /// Socket to write to; `/dev/log` by default.
    #[serde(default)]
    pub socket: Option<AbsolutePath>,
}

impl Default for SyslogConfig {
    fn default() -> Self {
        SyslogConfig {
            identifier: defaults::syslog_identifier(),
            facility: SyslogFacility::default(),
            socket: None,
        }
    }
}

/// The access log's syslog settings: those of the error log, under another identifier.
fn access_syslog() -> SyslogConfig {
    SyslogConfig {
        identifier: "pingora-lb-access".into(),
        ..SyslogConfig::default()
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = read_bounded(path).map_err(|e| ConfigError::unreadable(&name, e))?;
        Config::parse(&name, &text)
    }

    /// Reads `path`, or the embedded seed configuration when there is none.
    pub fn load_or_seed(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(path) => Config::load(path),
            None => Config::parse(SEED_CONFIG_NAME, SEED_CONFIG),
        }
    }

    /// Parses and validates configuration text; `name` is used in error messages.
    pub fn parse(name: &str, text: &str) -> Result<Config, ConfigError> {
        check_flow_nesting(text).map_err(|line| {
            ConfigError::at_line(
                name,
                line,
                format!(
            "brackets nested deeper than {MAX_FLOW_NESTING} levels; a configuration needs a few"
        ),
            )
        })?;
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(deserializer)
            .map_err(|e| ConfigError::from_serde(name, text, e))?;
        config.check_consistency(name, text)?;
        Ok(config)
    }

    /// Checks that span several keys, which serde cannot express per field.
    fn check_consistency(&self, name: &str, text: &str) -> Result<(), ConfigError> {
        self.check_listeners()
            .and_then(|()| self.check_pools())
            .and_then(|()| self.check_routes())
            .and_then(|()| self.check_process())
            .map_err(|(key, message)| ConfigError::at_key(name, text, key, message))
    }

    fn check_listeners(&self) -> Result<(), Inconsistency> {
        if let Some(metrics) = &self.metrics {
            if self.listens_on(&metrics.listen) {
                return Err((
                    "metrics.listen".to_string(),
                    format!(
                        "{} is also a proxy listener; give the metrics endpoint its own port",
                        metrics.listen
                    ),
                ));
            }
        }
        if let Some(proxy_protocol) = &self.proxy_protocol {
            if let Some(l) = proxy_protocol
                .listeners
                .iter()
                .find(|l| !self.listens_on(l))
            {
                return Err((
                    "proxy_protocol.listeners".to_string(),
                    format!("{l} is not one of `listeners`"),
                ));
            }
        }
        self.check_https_redirects()?;
        let mut seen = std::collections::HashSet::new();
        match self
            .listeners
            .iter()
            .enumerate()
            .find(|(_, l)| !seen.insert(l.address))
        {
            Some((i, listener)) => Err((
                format!("listeners[{i}]"),
                format!(
                    "{} is listed twice; each listening address may appear once",
                    listener.address
                ),
            )),
            None => Ok(()),
        }
    }

    /// A redirect to HTTPS is on a plain listener, and some listener serves HTTPS.
    fn check_https_redirects(&self) -> Result<(), Inconsistency> {
        let redirecting = self.listeners.iter().enumerate();
        for (i, listener) in redirecting.filter(|(_, l)| l.redirect_to_https) {
            let key = format!("listeners[{i}].redirect_to_https");
            if listener.tls.is_some() {
                return Err((key, "this listener serves HTTPS already".to_string()));
            }
            if self.https_port().is_none() {
                return Err((
                    key,
                    "no listener has `tls`: there is no HTTPS to redirect to".to_string(),
                ));
            }
        }
        Ok(())
    }

    /// The port of the first HTTPS listener, where plain HTTP is redirected.
    pub fn https_port(&self) -> Option<u16> {
        self.listeners
            .iter()
            .find(|l| l.tls.is_some())
            .map(|l| l.address.0.port())
    }

    /// Each pool, and backends enough (and not too many) in all.
    fn check_pools(&self) -> Result<(), Inconsistency> {
        if self.upstreams.is_none() && self.pools.is_empty() {
            return Err((
                "upstreams".to_string(),
                "no backends: give `upstreams`, or `pools` and `routes`".to_string(),
            ));
        }
        if self.upstreams.is_some() && self.pools.contains_key(DEFAULT_POOL) {
            return Err((
                format!("pools.{DEFAULT_POOL}"),
                format!("the top-level `upstreams` are the pool `{DEFAULT_POOL}`; name this one otherwise"),
            ));
        }
        let pools = self.pools();
        let total: usize = pools.iter().map(|p| p.config.upstreams.len()).sum();
        if total > MAX_UPSTREAMS {
            return Err((
                "pools".to_string(),
                format!("{total} backends in all: at most {MAX_UPSTREAMS} are accepted"),
            ));
        }
        for pool in &pools {
            if !valid_pool_name(&pool.name) {
                return Err((
                    format!("pools.{}", pool.name),
                    "a pool name is letters, digits, `-` and `_` (at most 64)".to_string(),
                ));
            }
            pool.config
                .check()
                .map_err(|(key, message)| (format!("{}{key}", pool.key), message))?;
        }
        Ok(())
    }

    /// Routes name existing pools and listeners, and each can match some request.
    fn check_routes(&self) -> Result<(), Inconsistency> {
        let pools = self.pools();
        if self.routes.is_empty() && pools.len() > 1 {
            return Err((
                "routes".to_string(),
                "several pools need `routes` to say which requests go to which".to_string(),
            ));
        }
        if self.routes.len() > MAX_ROUTES {
            return Err((
                "routes".to_string(),
                format!("at most {MAX_ROUTES} routes are accepted"),
            ));
        }
        let mut seen = std::collections::HashMap::new();
        for (i, route) in self.routes.iter().enumerate() {
            if !pools.iter().any(|p| p.name == route.pool) {
                let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
                return Err((
                    format!("routes[{i}].pool"),
                    format!(
                        "no pool {:?}; the pools are: {}",
                        route.pool,
                        names.join(", ")
                    ),
                ));
            }
            if let Some(listener) = route.listeners.iter().find(|l| !self.listens_on(l)) {
                return Err((
                    format!("routes[{i}].listeners"),
                    format!("{listener} is not one of `listeners`"),
                ));
            }
            let mut listeners: Vec<String> =
                route.listeners.iter().map(|l| l.to_string()).collect();
            listeners.sort();
            let matched = (route.host.clone(), route.path.clone(), listeners);
            if let Some(first) = seen.insert(matched, i) {
                return Err((
                    format!("routes[{i}]"),
                    format!("matches the same requests as routes[{first}], which always wins; remove one"),
                ));
            }
        }
        Ok(())
    }

    /// Whether `address` is one of `listeners`.
    pub fn listens_on(&self, address: &ListenAddress) -> bool {
        self.listeners.iter().any(|l| l.address == *address)
    }

    /// What is valid but probably not meant: each is logged at start and printed by `-t`.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = self.certificate_warnings();
        warnings.extend(self.routing_warnings());
        warnings
    }

    /// Certificates that end within [EXPIRY_WARNING_DAYS].
    fn certificate_warnings(&self) -> Vec<String> {
        self.listeners
            .iter()
            .filter_map(|l| l.tls.as_ref())
            .flat_map(|tls| tls.certificates.iter())
            .filter(|c| c.days_left < EXPIRY_WARNING_DAYS as i32)
            .map(|c| {
                format!(
                    "the certificate in {} expires in {} days",
                    c.cert_file.display(),
                    c.days_left
                )
            })
            .collect()
    }

    fn routing_warnings(&self) -> Vec<String> {
        if self.routes.is_empty() {
            return Vec::new();
        }
        let mut warnings: Vec<String> = self
            .pools()
            .iter()
            .filter(|pool| !self.routes.iter().any(|r| r.pool == pool.name))
            .map(|pool| format!("no route sends requests to pool `{}`", pool.name))
            .collect();
        if !self
            .routes
            .iter()
            .any(|r| r.host.is_none() && r.path == "/" && r.listeners.is_empty())
        {
            warnings.push(format!(
                "no route matches every request: the others get {}",
                self.no_route_status
            ));
        }
        warnings
    }

    /// Every pool: `default` (the top-level `upstreams`) first, then `pools` by name.
    pub fn pools(&self) -> Vec<NamedPool> {
        let default = self.upstreams.as_ref().map(|upstreams| NamedPool {
            name: DEFAULT_POOL.to_string(),
            key: String::new(),
            config: PoolConfig {
                upstreams: upstreams.clone(),
                selection: self.selection.clone(),
                health_check: self.health_check.clone(),
                passive_health: self.passive_health.clone(),
                timeouts: self.timeouts.clone(),
                retries: self.retries,
                send_proxy_protocol: self.send_proxy_protocol,
            },
        });
        let named = self.pools.iter().map(|(name, config)| NamedPool {
            name: name.clone(),
            key: format!("pools.{name}."),
            config: config.clone(),
        });
        default.into_iter().chain(named).collect()
    }

    /// The runtime files and the account the process runs as.
    fn check_process(&self) -> Result<(), Inconsistency> {
        check_private_parent(&self.upgrade_sock.0).map_err(|m| ("upgrade_sock".to_string(), m))?;
        if let Some(pid_file) = &self.pid_file {
            check_private_parent(&pid_file.0).map_err(|m| ("pid_file".to_string(), m))?;
        }
        if self.user.is_none() && self.group.is_some() {
            return Err((
                "group".to_string(),
                "`group` needs `user` as well".to_string(),
            ));
        }
        Ok(())
    }
}

/// A key and what is wrong with it in the light of other keys.
type Inconsistency = (String, String);

/// A pool with its name, and where its settings are: under the top level for `default`,
/// under `pools.NAME.` for the others.
#[derive(Debug, Clone)]
pub struct NamedPool {
    pub name: String,
    /// The prefix of the pool's keys in the file, for error messages.
    pub key: String,
    pub config: PoolConfig,
}

fn valid_pool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The deepest nesting of flow collections (`[`, `{`) accepted. The YAML parser's time
/// grows with the square of that depth (a 40,000-deep file took 8 s): refuse it first.
const MAX_FLOW_NESTING: usize = 32;

/// Counts flow-collection depth outside quoted scalars and comments; on excess returns the
/// line. A quote only opens a scalar where YAML lets one start (after `:`, `-`, `?`, `,`,
/// a bracket, or at the start of a line), and every state ends with its line, so the count
/// can over-estimate the depth (brackets in plain scalars) but never under-estimate it.
fn check_flow_nesting(text: &str) -> Result<(), usize> {
    let mut depth = 0usize;
    for (index, line) in text.lines().enumerate() {
        let mut quote = None;
        let mut previous = ' ';
        let mut last_significant = '\n';
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match (quote, c) {
                (Some('"'), '\\') => {
                    chars.next();
                }
                (Some(q), c) if q == c => quote = None,
                (Some(_), _) => {}
                (None, '#') if previous.is_whitespace() => break,
                (None, '"' | '\'')
                    if matches!(last_significant, '\n' | ':' | '-' | '?' | ',' | '[' | '{') =>
                {
                    quote = Some(c)
                }
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_FLOW_NESTING {
                        return Err(index + 1);
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                (None, _) => {}
            }
            previous = c;
            if !c.is_whitespace() {
                last_significant = c;
            }
        }
    }
    Ok(())
}

/// Reads at most [MAX_FILE_SIZE] bytes, so that a huge file (or `/dev/zero`) is refused
/// instead of exhausting memory.
fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_SIZE + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_SIZE {
        return Err(std::io::Error::other(format!(
            "the file is larger than {} KiB; this cannot be a configuration",
            MAX_FILE_SIZE / 1024
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse("test.yaml", text)
    }

    const TWO_POOLS: &str = "listeners: [\"127.0.0.1:1\"]\n\
        pools:\n  a: {upstreams: [{address: \"127.0.0.1:2\"}]}\n  b: {upstreams: [{address: \"127.0.0.1:3\"}]}\n";

    #[test]
    fn routes_and_pools_are_checked_together() {
        let table = [
            ("", "routes", "several pools need `routes`"),
            ("routes: [{pool: c}]\n", "routes[0].pool", "no pool \"c\"; the pools are: a, b"),
            ("routes: [{pool: a}, {pool: b, path: /}]\n", "routes[1]", "same requests as routes[0]"),
            ("routes: [{pool: a, listeners: [\"127.0.0.1:9\"]}]\n", "routes[0].listeners", "not one of `listeners`"),
            ("routes: [{pool: a, host: \"a b\"}]\n", "routes[0].host", "not a host name"),
            ("routes: [{pool: a, max_body_size: 1t}]\n", "routes[0].max_body_size", "not a size"),
            ("routes: [{pool: a, request_headers: {set: {Content-Length: \"1\"}}}]\n", "routes[0].request_headers", "cannot be changed"),
            ("upstreams: [{address: \"127.0.0.1:4\"}]\npools:\n  default: {upstreams: [{address: \"127.0.0.1:5\"}]}\n", "pools", "pool `default`"),
        ];
        for (extra, key, words) in table {
            let text = if extra.starts_with("upstreams") {
                format!("listeners: [\"127.0.0.1:1\"]\n{extra}")
            } else {
                format!("{TWO_POOLS}{extra}")
            };
            let error = parse(&text).unwrap_err();
            assert!(error.key.starts_with(key), "{extra}: {error}");
            assert!(error.message.contains(words), "{extra}: {error}");
        }
        let no_backends = parse("listeners: [\"127.0.0.1:1\"]\n").unwrap_err();
        assert!(no_backends.message.contains("no backends"), "{no_backends}");
    }

    #[test]
    fn a_pool_nothing_routes_to_is_a_warning() {
        let config = parse(&format!("{TWO_POOLS}routes: [{{pool: a, path: /a/}}]\n")).unwrap();
        assert_eq!(
            config.warnings(),
            [
                "no route sends requests to pool `b`",
                "no route matches every request: the others get 404"
            ]
        );
        let config = parse(&format!(
            "{TWO_POOLS}routes: [{{pool: a}}, {{pool: b, host: b.test}}]\n"
        ))
        .unwrap();
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
    }

    #[test]
    fn seed_config_is_the_quickstart() {
        let config = Config::parse(SEED_CONFIG_NAME, SEED_CONFIG).unwrap();
        assert_eq!(config.listeners[0].address.to_string(), "0.0.0.0:6188");
        let upstreams = config.upstreams.as_ref().unwrap();
        let addresses: Vec<String> = upstreams.iter().map(|u| u.address.to_string()).collect();
        assert_eq!(addresses, ["1.1.1.1:443", "1.0.0.1:443"]);
        assert!(upstreams.iter().all(|u| u.tls
            && u.effective_sni() == "one.one.one.one"
            && u.host.as_ref().is_some_and(|h| h == "one.one.one.one")));
        assert_eq!(config.selection, Selection::RoundRobin);
        assert_eq!(config.health_check.kind, HealthCheckKind::Tcp);
        assert_eq!(
            config.health_check.interval.0,
            std::time::Duration::from_secs(1)
        );
    }

    #[test]
    fn unknown_key_names_line_and_path() {
        let err = parse(
            "listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\n    wieght: 3\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("test.yaml:4"), "{err}");
        assert!(err.contains("upstreams[0]"), "{err}");
        assert!(err.contains("wieght"), "{err}");
    }

    #[test]
    fn a_round_robin_cycle_too_long_to_work_out_is_rejected_with_its_key() {
        // 70 backends of weights 1000, 999, ...: 67,585 turns a cycle.
        let pool = |selection: &str| {
            let upstreams: String = (0..70)
                .map(|i| {
                    format!(
                        "      - address: 127.0.0.1:{}\n        weight: {}\n",
                        1000 + i,
                        1000 - i
                    )
                })
                .collect();
            format!(
                "listeners: [\"127.0.0.1:1\"]\npools:\n  big:\n    selection:\n      \
                 algorithm: {selection}\n    upstreams:\n{upstreams}"
            )
        };
        let err = Config::parse("x.yaml", &pool("round_robin"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `pools.big.upstreams`"), "{err}");
        assert!(err.contains("67585 turns"), "{err}");
        assert!(err.contains("x.yaml:6:"), "{err}");
        Config::parse("x.yaml", &pool("least_connections")).unwrap();
    }

    #[test]
    fn zero_weight_is_rejected_with_its_key() {
        let err = parse(
            "listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\n    weight: 0\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("test.yaml:4"), "{err}");
        assert!(err.contains("upstreams[0].weight"), "{err}");
    }

    #[test]
    fn duplicate_upstream_is_located() {
        let err = parse(
            "listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\n  - address: 127.0.0.1:2\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("test.yaml:4"), "{err}");
        assert!(err.contains("upstreams[1].address"), "{err}");
    }

    #[test]
    fn consistent_hash_takes_a_header_key() {
        let config = parse(
            "listeners: [\"127.0.0.1:1\"]\nupstreams: [{address: \"127.0.0.1:2\"}]\nselection:\n  algorithm: consistent_hash\n  key: header:X-User\n",
        )
        .unwrap();
        assert_eq!(
            config.selection,
            Selection::ConsistentHash {
                key: HashKey::Header("X-User".into())
            }
        );
    }

    #[test]
    fn flow_nesting_is_counted_outside_quotes_and_comments() {
        let deep = "[".repeat(MAX_FLOW_NESTING + 1);
        assert_eq!(check_flow_nesting(&format!("a: 1\nb: {deep}")), Err(2));
        assert_eq!(
            check_flow_nesting(&format!("a: '{deep}'\n# {deep}\nb: \"{deep}\"")),
            Ok(())
        );
        // A quote inside a plain scalar opens nothing: the brackets after it count.
        assert_eq!(check_flow_nesting(&format!("a: [b 'c, {deep}")), Err(1));
        assert_eq!(
            check_flow_nesting(&format!("a: [b, \"c\\\"{deep}\"]")),
            Ok(())
        );
        assert_eq!(check_flow_nesting(&"[]".repeat(1000)), Ok(()));
    }

    #[test]
    fn a_redirect_to_https_needs_an_https_listener() {
        let error = parse(
            "listeners: [{address: \"127.0.0.1:1\", redirect_to_https: true}]\n\
             upstreams: [{address: \"127.0.0.1:2\"}]\n",
        )
        .unwrap_err();
        assert_eq!(error.key, "listeners[0].redirect_to_https");
        assert!(error.message.contains("no listener has `tls`"), "{error}");
    }

    #[test]
    fn tls_to_an_ip_needs_a_server_name() {
        let err = parse(
            "listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 10.0.0.1:443\n    tls: true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("upstreams[0].sni"), "{err}");
    }
}
