//! The pools of backends: address resolution, the selection algorithm of each pool, how
//! each backend is reached (TLS, SNI, Host header, timeouts), passive health, and the
//! rounds of active health checks.

pub mod health;
mod selection;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::lb::discovery::Static;
use pingora::lb::{Backend, Backends};
use pingora::protocols::ALPN;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;

use crate::config::{
    CaFile, Config, HashKey, NamedPool, PassiveHealth, ProxyProtocolVersion, Selection, Upstream,
};
use crate::metrics::{BackendMetrics, Metrics};
use crate::proxy_protocol;
use health::{BackendHealth, BackendState, HealthWatch, Target};
use selection::Selector;

/// Concurrent requests one HTTP/2 connection to a backend carries, as nginx's
/// `http2_max_concurrent_streams` default; more open another connection.
const H2_STREAMS_PER_CONNECTION: usize = 128;

/// A pool's place among the pools: `default` (if any) first, then by name.
pub type PoolId = usize;

pub use selection::BackendId;

/// A backend as the proxy reaches it, prepared once at start.
pub struct Destination {
    /// Cloned for every request to this backend.
    pub peer: HttpPeer,
    /// `Host` header replacing the client's, if configured.
    pub host: Option<http::HeaderValue>,
    /// Health, load and draining; its name is the address as configured.
    pub state: Arc<BackendState>,
    /// Request-path metrics.
    pub metrics: BackendMetrics,
}

impl Destination {
    /// The address as configured, for log lines.
    pub fn name(&self) -> &str {
        &self.state.name
    }
}

/// One pool: its backends and how one is chosen.
pub struct Pool {
    pub name: String,
    selector: Box<dyn Selector>,
    /// In configuration order: a [BackendId] indexes it.
    destinations: Vec<Destination>,
    hash_key: Option<HashKey>,
    /// Other backends a request is tried on after a connect failure.
    pub retries: usize,
    passive_health: PassiveHealth,
    /// Sent to every backend connection, naming the client.
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    health_interval: Duration,
    checked_once: AtomicBool,
    health: Arc<HealthWatch>,
}

/// Every pool, and the health of all their backends.
pub struct Pools {
    pools: Vec<Arc<Pool>>,
    health: Arc<HealthWatch>,
}

/// A backend address that could not be resolved at start.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve backend {address} (key `{key}`): {source}")]
pub struct ResolveError {
    pub key: String,
    pub address: String,
    pub source: std::io::Error,
}

impl Pools {
    /// Resolves every backend and builds each pool's selector. Health checks run in
    /// [HealthChecks], one per pool, which must be added to the server.
    pub fn build(config: &Config, metrics: &Metrics) -> Result<Pools, ResolveError> {
        let named = config.pools();
        let mut prepared = Vec::with_capacity(named.len());
        for pool in &named {
            let addresses = resolve(pool)?;
            let destinations: Vec<Destination> = pool
                .config
                .upstreams
                .iter()
                .zip(&addresses)
                .map(|(upstream, addr)| {
                    destination(config.ca_file.as_ref(), pool, upstream, *addr, metrics)
                })
                .collect();
            prepared.push((addresses, destinations));
        }
        let states = prepared
            .iter()
            .flat_map(|(_, destinations)| destinations.iter().map(|d| d.state.clone()))
            .collect();
        let health = Arc::new(HealthWatch::new(states, named.len()));
        let pools = named
            .into_iter()
            .zip(prepared)
            .map(|(pool, (addresses, destinations))| {
                Arc::new(Pool::new(pool, addresses, destinations, health.clone()))
            })
            .collect();
        Ok(Pools { pools, health })
    }

    pub fn get(&self, id: PoolId) -> &Pool {
        &self.pools[id]
    }

    /// The pool named `name`.
    pub fn id_of(&self, name: &str) -> Option<PoolId> {
        self.pools.iter().position(|p| p.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.iter()
    }

    /// The health of every backend.
    pub fn health(&self) -> &HealthWatch {
        &self.health
    }

    /// The background services that run each pool's health checks.
    pub fn health_checks(&self) -> Vec<HealthChecks> {
        self.pools
            .iter()
            .map(|pool| HealthChecks { pool: pool.clone() })
            .collect()
    }
}

impl Pool {
    fn new(
        config: NamedPool,
        addresses: Vec<SocketAddr>,
        destinations: Vec<Destination>,
        health: Arc<HealthWatch>,
    ) -> Pool {
        let settings = config.config;
        let mut backends = Backends::new(Static::new(
            settings
                .upstreams
                .iter()
                .zip(&addresses)
                .map(|(upstream, addr)| Backend {
                    addr: pingora::protocols::l4::socket::SocketAddr::Inet(*addr),
                    weight: upstream.weight.0,
                    ext: Default::default(),
                })
                .collect::<BTreeSet<_>>(),
        ));
        let targets = addresses
            .iter()
            .zip(&destinations)
            .map(|(addr, d)| Target {
                addr: *addr,
                peer: &d.peer,
                host: d.host.as_ref(),
                state: d.state.clone(),
            })
            .collect();
        if let Some(check) = BackendHealth::build(&settings.health_check, targets, health.clone()) {
            backends.set_health_check(Box::new(check));
        }
        let states = destinations.iter().map(|d| d.state.clone()).collect();
        let ids = addresses.into_iter().zip(0..).collect();
        Pool {
            name: config.name,
            selector: selection::build(&settings.selection, backends, ids, states),
            destinations,
            hash_key: match settings.selection {
                Selection::ConsistentHash { key } => Some(key),
                _ => None,
            },
            retries: settings.retries,
            passive_health: settings.passive_health,
            send_proxy_protocol: settings.send_proxy_protocol,
            health_interval: settings.health_check.interval.0,
            checked_once: AtomicBool::new(false),
            health,
        }
    }

    /// Whether every backend speaks plain HTTP/1 without a PROXY header: what the fast
    /// path can reach.
    pub fn plain_http1(&self) -> bool {
        self.send_proxy_protocol.is_none()
            && self
                .destinations
                .iter()
                .all(|d| !d.peer.is_tls() && d.peer.options.alpn == ALPN::H1)
    }

    /// What consistent hashing hashes, if it is in use.
    pub fn hash_key(&self) -> Option<&HashKey> {
        self.hash_key.as_ref()
    }

    /// Picks a backend in rotation and not in `excluded`, following the selection
    /// algorithm. When passive health has ejected every healthy backend left, an ejected
    /// one is taken: the pool fails open rather than refusing every request. Drained
    /// backends never get a new request.
    pub fn select(&self, key: &[u8], excluded: &[BackendId]) -> Option<BackendId> {
        let state = |id: BackendId| &self.destinations[id].state;
        let in_rotation = |id: BackendId| state(id).in_rotation() && !excluded.contains(&id);
        self.selector.select(key, &in_rotation).or_else(|| {
            let only_ejected = |id: BackendId| {
                state(id).healthy() && !state(id).draining() && !excluded.contains(&id)
            };
            self.selector.select(key, &only_ejected)
        })
    }

    /// The peer a request reaches a backend through: the backend's, with the PROXY header
    /// naming `client` (which connected to `listener`) when the pool sends one. Connections
    /// carrying different headers are never shared (`group_key`). `listener` is called only
    /// for that header: reading the address costs a system call per connection.
    pub fn peer(
        &self,
        id: BackendId,
        client: Option<SocketAddr>,
        listener: impl FnOnce() -> Option<SocketAddr>,
    ) -> Box<HttpPeer> {
        let mut peer = Box::new(self.destinations[id].peer.clone());
        if let Some(version) = self.send_proxy_protocol {
            let proxied = client.zip(listener());
            let header = proxy_protocol::encode(version, proxied);
            peer.group_key = {
                use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
                BuildHasherDefault::<DefaultHasher>::default().hash_one(&header)
            };
            peer.options.custom_l4 = Some(Arc::new(proxy_protocol::SendHeader(header)));
        }
        peer
    }

    /// How to reach a backend returned by [Self::select].
    pub fn destination(&self, id: BackendId) -> &Destination {
        &self.destinations[id]
    }

    /// Every backend, in configuration order.
    pub fn destinations(&self) -> &[Destination] {
        &self.destinations
    }

    /// The backend named `name` (its address as configured).
    pub fn find(&self, name: &str) -> Option<&Destination> {
        self.destinations.iter().find(|d| d.name() == name)
    }

    /// A live request to a backend got its response (`failed`: a 5xx that counts as a
    /// failure, see `passive_health.on_5xx`).
    pub fn response_received(&self, id: BackendId, status: u16) {
        let failed = self.passive_health.on_5xx && status >= 500;
        if failed {
            self.request_failed(id);
        } else {
            self.destinations[id].state.request_succeeded();
        }
    }

    /// A live request to a backend failed: no connection, or a timeout.
    pub fn request_failed(&self, id: BackendId) {
        let others = self
            .destinations
            .iter()
            .enumerate()
            .any(|(other, d)| other != id && d.state.in_rotation());
        self.destinations[id]
            .state
            .request_failed(&self.passive_health, !others);
    }

    /// Runs one round of health checks. Only [HealthChecks] calls it: two rounds at once
    /// would race on the same backend and report a transition twice.
    async fn check_health_once(&self) {
        self.selector.backends().run_health_check(true).await;
        if !self.checked_once.swap(true, Ordering::AcqRel) {
            self.health.first_round_done();
        }
    }
}

/// The backends' addresses, in configuration order.
fn resolve(pool: &NamedPool) -> Result<Vec<SocketAddr>, ResolveError> {
    pool.config
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, upstream)| {
            upstream.address.resolve().map_err(|source| ResolveError {
                key: format!("{}upstreams[{i}].address", pool.key),
                address: upstream.address.to_string(),
                source,
            })
        })
        .collect()
}

/// Builds the peer template and Host override of one backend.
fn destination(
    ca_file: Option<&CaFile>,
    pool: &NamedPool,
    upstream: &Upstream,
    addr: SocketAddr,
    metrics: &Metrics,
) -> Destination {
    let name = upstream.address.to_string();
    let timeouts = &pool.config.timeouts;
    let mut peer = HttpPeer::new(addr, upstream.tls, upstream.effective_sni());
    let options = &mut peer.options;
    options.connection_timeout = Some(timeouts.connect.0);
    options.total_connection_timeout = Some(timeouts.connect.0);
    options.read_timeout = Some(timeouts.read.0);
    options.write_timeout = Some(timeouts.read.0);
    options.idle_timeout = Some(timeouts.idle.0);
    options.verify_cert = upstream.verify_cert;
    options.verify_hostname = upstream.verify_cert;
    if let Some(ca) = upstream.ca_file.as_ref().or(ca_file) {
        options.ca = Some(ca.certificates.clone());
    }
    if upstream.http2 {
        // Over TLS the backend chooses by ALPN; in clear text only prior knowledge works.
        options.alpn = if upstream.tls { ALPN::H2H1 } else { ALPN::H2 };
        options.max_h2_streams = H2_STREAMS_PER_CONNECTION;
    }
    // Connections of the balancer's own (health checks) say so; requests replace it with
    // their client's (see `Pool::peer`).
    if let Some(version) = pool.config.send_proxy_protocol {
        options.custom_l4 = Some(Arc::new(proxy_protocol::SendHeader(
            proxy_protocol::encode(version, None),
        )));
    }
    let weight = upstream.weight.0;
    Destination {
        peer,
        host: upstream.host.clone(),
        metrics: metrics.backend(&pool.name, &name),
        state: Arc::new(BackendState::new(
            &pool.name,
            name.clone(),
            weight,
            metrics.backend_health(&pool.name, &name, weight),
        )),
    }
}

/// The background service that runs one pool's health-check rounds, one at a time, every
/// interval.
pub struct HealthChecks {
    pool: Arc<Pool>,
}

#[async_trait]
impl BackgroundService for HealthChecks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = self.pool.check_health_once() => {}
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(self.pool.health_interval) => {}
            }
        }
    }
}
