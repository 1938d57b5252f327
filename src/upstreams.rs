//! The backends of the pool: address resolution, the selection algorithm, how each backend
//! is reached (TLS, SNI, Host header, timeouts), and the rounds of health checks.

pub mod health;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use pingora::lb::discovery::Static;
use pingora::lb::selection::{BackendIter, BackendSelection, Consistent, Random, RoundRobin};
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;

use crate::config::{Config, HashKey, Selection, Upstream};
use crate::metrics::{BackendMetrics, Metrics};
use health::{BackendHealth, BackendState, HealthWatch, Target};

/// A backend's place in the configuration's `upstreams` list.
pub type BackendId = usize;

/// A backend as the proxy reaches it, prepared once at start.
pub struct Destination {
    /// Cloned for every request to this backend.
    pub peer: HttpPeer,
    /// `Host` header replacing the client's, if configured.
    pub host: Option<http::HeaderValue>,
    /// Health as checks last found it; its name is the address as configured.
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

/// pingora's [LoadBalancer] over one selection algorithm, chosen once when the pool is built.
trait Selector: Send + Sync {
    fn select_with(&self, key: &[u8], accept: &dyn Fn(&Backend, bool) -> bool) -> Option<Backend>;
    fn backends(&self) -> &Backends;
}

impl<S> Selector for LoadBalancer<S>
where
    S: BackendSelection + Send + Sync + 'static,
    S::Iter: BackendIter,
{
    fn select_with(&self, key: &[u8], accept: &dyn Fn(&Backend, bool) -> bool) -> Option<Backend> {
        // Bounds the walk over the selector's ring or list; it holds each backend once per
        // unit of weight, so this covers every backend.
        const MAX_ITERATIONS: usize = 1024;
        LoadBalancer::select_with(self, key, MAX_ITERATIONS, accept)
    }

    fn backends(&self) -> &Backends {
        LoadBalancer::backends(self)
    }
}

/// Everything the proxy needs to choose and reach a backend.
pub struct Upstreams {
    selector: Box<dyn Selector>,
    /// In configuration order: a [BackendId] indexes it.
    destinations: Vec<Destination>,
    ids: HashMap<SocketAddr, BackendId>,
    hash_key: Option<HashKey>,
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

impl Upstreams {
    /// Resolves the backends and builds the selector. Health checks run in [HealthChecks],
    /// which must be added to the server.
    pub fn build(config: &Config, metrics: &Metrics) -> Result<Arc<Upstreams>, ResolveError> {
        let addresses = resolve(config)?;
        let destinations: Vec<Destination> = config
            .upstreams
            .iter()
            .zip(&addresses)
            .map(|(upstream, addr)| destination(config, upstream, *addr, metrics))
            .collect();
        let health = Arc::new(HealthWatch::new(
            destinations.iter().map(|d| d.state.clone()).collect(),
        ));
        let mut pool = Backends::new(Static::new(
            config
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
        if let Some(check) = BackendHealth::build(&config.health_check, targets, health.clone()) {
            pool.set_health_check(Box::new(check));
        }
        let (selector, hash_key): (Box<dyn Selector>, _) = match &config.selection {
            Selection::RoundRobin => (load_balancer::<RoundRobin>(pool), None),
            Selection::Random => (load_balancer::<Random>(pool), None),
            Selection::ConsistentHash { key } => {
                (load_balancer::<Consistent>(pool), Some(key.clone()))
            }
        };
        Ok(Arc::new(Upstreams {
            selector,
            ids: addresses.into_iter().zip(0..).collect(),
            destinations,
            hash_key,
            health,
        }))
    }

    /// What consistent hashing hashes, if it is in use.
    pub fn hash_key(&self) -> Option<&HashKey> {
        self.hash_key.as_ref()
    }

    /// Picks a healthy backend not in `excluded`, following the selection algorithm.
    pub fn select(&self, key: &[u8], excluded: &[BackendId]) -> Option<BackendId> {
        let id = |backend: &Backend| {
            backend
                .addr
                .as_inet()
                .and_then(|addr| self.ids.get(addr).copied())
        };
        let accept = |backend: &Backend, healthy: bool| {
            healthy && (excluded.is_empty() || id(backend).is_some_and(|i| !excluded.contains(&i)))
        };
        id(&self.selector.select_with(key, &accept)?)
    }

    /// How to reach a backend returned by [Self::select].
    pub fn destination(&self, id: BackendId) -> &Destination {
        &self.destinations[id]
    }

    /// The health of every backend.
    pub fn health(&self) -> &HealthWatch {
        &self.health
    }

    /// Runs one round of health checks. Only [HealthChecks] calls it: two rounds at once
    /// would race on the same backend and report a transition twice.
    async fn check_health_once(&self) {
        self.selector.backends().run_health_check(true).await;
        self.health.round_done();
    }
}

/// pingora's load balancer over the pool, filled before the first request.
fn load_balancer<S>(pool: Backends) -> Box<dyn Selector>
where
    S: BackendSelection + Send + Sync + 'static,
    S::Iter: BackendIter,
{
    let lb = LoadBalancer::<S>::from_backends(pool);
    // Static discovery never waits: the selector is filled before the first request.
    lb.update()
        .now_or_never()
        .expect("static discovery does not block")
        .expect("static discovery does not fail");
    Box::new(lb)
}

/// The backends' addresses, in configuration order.
fn resolve(config: &Config) -> Result<Vec<SocketAddr>, ResolveError> {
    config
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, upstream)| {
            upstream.address.resolve().map_err(|source| ResolveError {
                key: format!("upstreams[{i}].address"),
                address: upstream.address.to_string(),
                source,
            })
        })
        .collect()
}

/// Builds the peer template and Host override of one backend.
fn destination(
    config: &Config,
    upstream: &Upstream,
    addr: SocketAddr,
    metrics: &Metrics,
) -> Destination {
    let name = upstream.address.to_string();
    let mut peer = HttpPeer::new(addr, upstream.tls, upstream.effective_sni());
    let options = &mut peer.options;
    options.connection_timeout = Some(config.timeouts.connect.0);
    options.total_connection_timeout = Some(config.timeouts.connect.0);
    options.read_timeout = Some(config.timeouts.read.0);
    options.write_timeout = Some(config.timeouts.read.0);
    options.idle_timeout = Some(config.timeouts.idle.0);
    options.verify_cert = upstream.verify_cert;
    options.verify_hostname = upstream.verify_cert;
    if let Some(ca) = upstream.ca_file.as_ref().or(config.ca_file.as_ref()) {
        options.ca = Some(ca.certificates.clone());
    }
    let weight = upstream.weight.0;
    Destination {
        peer,
        host: upstream.host.clone(),
        metrics: metrics.backend(&name),
        state: Arc::new(BackendState::new(
            name.clone(),
            weight,
            metrics.backend_health(&name, weight),
        )),
    }
}

/// The background service that runs the health-check rounds, one at a time, every interval.
pub struct HealthChecks {
    pub upstreams: Arc<Upstreams>,
    pub interval: Duration,
}

#[async_trait]
impl BackgroundService for HealthChecks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = self.upstreams.check_health_once() => {}
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }
}
