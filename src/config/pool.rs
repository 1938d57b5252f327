//! A pool of backends: the backends themselves, how one is chosen, and how their health
//! is watched. The top-level `upstreams` of the seed's shape form the pool `default`.

use serde::Deserialize;

use super::defaults;
use super::values::{self, CaFile, HashKey, HumanDuration, NonEmpty, UpstreamAddress, Weight};

/// The shortest time between two health probes of a backend.
pub const MIN_HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Backends one process may balance over, in all its pools.
pub const MAX_UPSTREAMS: usize = 10_000;

/// The most turns one cycle of a pool's weighted round robin may take. The cycle is worked
/// out whole when the configuration is loaded (and on each reload), at two bytes a turn.
pub const MAX_ROUND_ROBIN_CYCLE: usize = 65_536;

/// Each weight divided by the weights' greatest common divisor: the turns each backend takes
/// in one cycle of weighted round robin (weights 200 and 400 take turns 1 and 2).
pub fn round_robin_turns(weights: &[usize]) -> Vec<usize> {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let common = weights.iter().fold(0, |divisor, &w| gcd(divisor, w)).max(1);
    weights.iter().map(|w| w / common).collect()
}

/// A named pool (`pools.NAME`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The backends of the pool.
    pub upstreams: NonEmpty<Upstream, MAX_UPSTREAMS>,
    /// How a backend is chosen for each request.
    #[serde(default)]
    pub selection: Selection,
    /// Active health checking of the backends.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// Taking out backends that fail live requests.
    #[serde(default)]
    pub passive_health: PassiveHealth,
    /// Upstream timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// How many other backends a request is tried on when connecting to its backend fails.
    #[serde(default = "defaults::retries", deserialize_with = "values::retries")]
    pub retries: usize,
    /// Send each backend connection a PROXY protocol header naming the client.
    #[serde(default)]
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
}

/// A version of HAProxy's PROXY protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocolVersion {
    /// The text header.
    V1,
    /// The binary header.
    V2,
}

impl PoolConfig {
    /// Checks that span several keys of the pool; the key is relative to the pool's.
    pub(super) fn check(&self) -> Result<(), (String, String)> {
        let mut seen = std::collections::HashSet::new();
        for (i, upstream) in self.upstreams.iter().enumerate() {
            if !seen.insert(&upstream.address) {
                return Err((
                    format!("upstreams[{i}].address"),
                    format!(
                        "{} is listed twice; give it a larger weight instead",
                        upstream.address
                    ),
                ));
            }
            upstream
                .check()
                .map_err(|(key, message)| (format!("upstreams[{i}].{key}"), message))?;
        }
        self.check_round_robin_cycle()?;
        self.health_check.check()
    }

    /// Round robin's cycle is short enough to be worked out whole.
    fn check_round_robin_cycle(&self) -> Result<(), (String, String)> {
        if self.selection != Selection::RoundRobin {
            return Ok(());
        }
        let weights: Vec<usize> = self.upstreams.iter().map(|u| u.weight.0).collect();
        let turns: usize = round_robin_turns(&weights).iter().sum();
        if turns <= MAX_ROUND_ROBIN_CYCLE {
            return Ok(());
        }
        Err((
            "upstreams".to_string(),
            format!(
                "round robin over these weights takes {turns} turns a cycle (their sum \
                 divided by their greatest common divisor); at most {MAX_ROUND_ROBIN_CYCLE} are \
                 accepted: give weights with a larger common divisor, or choose another \
                 `selection.algorithm`"
            ),
        ))
    }
}

/// Passive health (outlier detection): a backend that fails `consecutive_failures` live
/// requests in a row is taken out of rotation for `ejection_time`, twice as long after each
/// ejection in a row, at most `max_ejection_time`. The last backend in rotation is never
/// taken out (a pool fails open, as Envoy's does).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealth {
    /// Failures in a row that take a backend out; 0 turns passive health off.
    #[serde(
        default = "defaults::consecutive_failures",
        deserialize_with = "values::consecutive_failures"
    )]
    pub consecutive_failures: u32,
    /// How long the first ejection lasts.
    #[serde(default = "defaults::ejection_time")]
    pub ejection_time: HumanDuration,
    /// The longest an ejection lasts.
    #[serde(default = "defaults::max_ejection_time")]
    pub max_ejection_time: HumanDuration,
    /// Whether a 5xx response counts as a failure; connection failures and timeouts
    /// always do.
    #[serde(default)]
    pub on_5xx: bool,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            consecutive_failures: defaults::consecutive_failures(),
            ejection_time: defaults::ejection_time(),
            max_ejection_time: defaults::max_ejection_time(),
            on_5xx: false,
        }
    }
}

/// One backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `IP:port` or `hostname:port`; a host name is resolved when the process starts.
    pub address: UpstreamAddress,
    /// Share of the requests relative to the other backends.
    #[serde(default)]
    pub weight: Weight,
    /// Speak TLS to this backend.
    #[serde(default)]
    pub tls: bool,
    /// TLS server name; defaults to the host name of `address`.
    #[serde(default)]
    pub sni: Option<String>,
    /// `Host` header sent to this backend instead of the client's.
    #[serde(default, deserialize_with = "values::host_header")]
    pub host: Option<http::HeaderValue>,
    /// Verify the backend's certificate chain and name.
    #[serde(default = "defaults::yes")]
    pub verify_cert: bool,
    /// CA bundle for this backend, instead of the global `ca_file` or the system's.
    #[serde(default)]
    pub ca_file: Option<CaFile>,
    /// Speak HTTP/2 to this backend (gRPC): offered by ALPN with `tls` (the backend may
    /// still choose HTTP/1.1), with prior knowledge (h2c) without.
    #[serde(default)]
    pub http2: bool,
}

impl Upstream {
    fn check(&self) -> Result<(), (String, String)> {
        if self.tls && self.verify_cert && self.effective_sni().is_empty() {
            return Err((
                "sni".to_string(),
                format!(
                    "{} is an IP address with tls on: set `sni` to the name its certificate \
                     is issued for (or `verify_cert: false` to skip verification)",
                    self.address
                ),
            ));
        }
        if !self.tls && (self.sni.is_some() || self.ca_file.is_some()) {
            return Err((
                "tls".to_string(),
                "`sni` and `ca_file` only apply with `tls: true`".to_string(),
            ));
        }
        Ok(())
    }

    /// The server name sent in the TLS handshake: the configured one, else the host name of
    /// the address (an IP address gives none).
    pub fn effective_sni(&self) -> String {
        match &self.sni {
            Some(sni) => sni.clone(),
            None if self.address.is_host_name() => self.address.host().to_string(),
            None => String::new(),
        }
    }
}

/// Backend selection algorithm.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(tag = "algorithm", rename_all = "snake_case", deny_unknown_fields)]
pub enum Selection {
    /// Weighted round robin: equal weights give strict alternation.
    #[default]
    RoundRobin,
    /// Weighted random choice.
    Random,
    /// Consistent (ketama) hashing of a request key, for stickiness.
    ConsistentHash {
        /// What part of the request is hashed.
        #[serde(default)]
        key: HashKey,
    },
    /// The backend with the fewest requests in flight for its weight (HAProxy `leastconn`).
    LeastConnections,
    /// The less loaded of two backends drawn at random (Envoy's least request).
    PowerOfTwoChoices,
}

/// How backends are probed.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// A TCP connection (and TLS handshake for TLS backends) must succeed.
    #[default]
    Tcp,
    /// An HTTP request must get the expected status.
    Http,
    /// No active checks: every backend is always in rotation (failover still applies).
    None,
}

/// Active health checking.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Kind of probe.
    #[serde(default)]
    pub kind: HealthCheckKind,
    /// Time between two probes of a backend.
    #[serde(default = "defaults::health_interval")]
    pub interval: HumanDuration,
    /// Longest a probe may take.
    #[serde(default = "defaults::health_timeout")]
    pub timeout: HumanDuration,
    /// Consecutive successes that bring a backend back.
    #[serde(
        default = "defaults::threshold",
        deserialize_with = "values::threshold"
    )]
    pub rise: usize,
    /// Consecutive failures that take a backend out.
    #[serde(
        default = "defaults::threshold",
        deserialize_with = "values::threshold"
    )]
    pub fall: usize,
    /// Path requested by HTTP checks.
    #[serde(
        default = "defaults::health_path",
        deserialize_with = "values::http_path"
    )]
    pub path: String,
    /// Status an HTTP check expects.
    #[serde(
        default = "defaults::expected_status",
        deserialize_with = "values::status"
    )]
    pub expected_status: u16,
    /// `Host` header of HTTP checks; defaults to the backend's `host` or address.
    #[serde(default, deserialize_with = "values::host_header")]
    pub host: Option<http::HeaderValue>,
}

impl HealthCheck {
    fn check(&self) -> Result<(), (String, String)> {
        if self.interval.0 < MIN_HEALTH_INTERVAL {
            return Err((
                "health_check.interval".to_string(),
                format!(
                    "must be at least {}ms: probing more often only loads the backends",
                    MIN_HEALTH_INTERVAL.as_millis()
                ),
            ));
        }
        if self.kind == HealthCheckKind::Http && self.timeout.0 > self.interval.0 {
            return Err((
                "health_check.timeout".to_string(),
                "must not be longer than health_check.interval".to_string(),
            ));
        }
        Ok(())
    }
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            kind: HealthCheckKind::default(),
            interval: defaults::health_interval(),
            timeout: defaults::health_timeout(),
            rise: defaults::threshold(),
            fall: defaults::threshold(),
            path: defaults::health_path(),
            expected_status: defaults::expected_status(),
            host: None,
        }
    }
}

/// Upstream timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Connecting (TCP and TLS) to a backend; a timeout fails over to another backend.
    #[serde(default = "defaults::connect_timeout")]
    pub connect: HumanDuration,
    /// Waiting for data from a backend.
    #[serde(default = "defaults::read_timeout")]
    pub read: HumanDuration,
    /// How long an idle upstream connection is kept for reuse.
    #[serde(default = "defaults::idle_timeout")]
    pub idle: HumanDuration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: defaults::connect_timeout(),
            read: defaults::read_timeout(),
            idle: defaults::idle_timeout(),
        }
    }
}
