//! The backends: address resolution, the selection algorithm, and how each backend is
//! reached (TLS, SNI, Host header, timeouts).

pub mod health;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use futures::FutureExt;
use pingora::lb::discovery::Static;
use pingora::lb::selection::{Consistent, Random, RoundRobin};
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;

use tokio::sync::{watch, Notify};

use crate::config::{Config, HashKey, Selection, Upstream};
use crate::metrics::{BackendMetrics, BackendState, Metrics};
use health::BackendHealth;

/// How requests reach one backend, prepared once at start.
pub struct Route {
    /// Cloned for every request to this backend.
    pub peer: HttpPeer,
    /// `Host` header replacing the client's, if configured.
    pub host: Option<http::HeaderValue>,
    /// The address as configured, for log lines.
    pub name: String,
    /// Health as checks last found it.
    pub state: Arc<BackendState>,
    /// Request-path metrics.
    pub metrics: BackendMetrics,
}

/// The configured selection algorithm over the backends; each variant is pingora's
/// [LoadBalancer] with a different [pingora::lb::selection::BackendSelection].
enum Selector {
    RoundRobin(Arc<LoadBalancer<RoundRobin>>),
    Random(Arc<LoadBalancer<Random>>),
    Consistent(Arc<LoadBalancer<Consistent>>),
}

/// Everything the proxy needs to choose and reach a backend.
pub struct Upstreams {
    selector: Selector,
    routes: HashMap<SocketAddr, Route>,
    hash_key: Option<HashKey>,
    /// Backends in configuration order, for status reports.
    order: Vec<SocketAddr>,
    /// Woken on every health transition.
    pub health_changed: Arc<Notify>,
    /// Becomes true once the first round of health checks is done.
    first_round: watch::Sender<bool>,
}

/// A backend address that could not be resolved at start.
#[derive(Debug)]
pub struct ResolveError {
    pub key: String,
    pub address: String,
    pub error: std::io::Error,
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot resolve backend {} (key `{}`): {}",
            self.address, self.key, self.error
        )
    }
}

impl std::error::Error for ResolveError {}

impl Upstreams {
    /// Resolves the backends and builds the selector. Health checks run in
    /// [health::HealthChecks], which must be added to the server.
    pub fn build(config: &Config, metrics: &Metrics) -> Result<Arc<Upstreams>, ResolveError> {
        let mut routes = HashMap::new();
        let mut order = Vec::new();
        let mut backends = BTreeSet::new();
        for (i, upstream) in config.upstreams.iter().enumerate() {
            let addr = upstream.address.resolve().map_err(|error| ResolveError {
                key: format!("upstreams[{i}].address"),
                address: upstream.address.to_string(),
                error,
            })?;
            backends.insert(Backend {
                addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
                weight: upstream.weight.0,
                ext: Default::default(),
            });
            routes.insert(addr, route(config, upstream, addr, metrics));
            order.push(addr);
        }
        let health_changed = Arc::new(Notify::new());
        let mut pool = Backends::new(Static::new(backends));
        if let Some(check) = BackendHealth::build(config, &routes, health_changed.clone()) {
            pool.set_health_check(Box::new(check));
        }

        fn load_balancer<S>(pool: Backends) -> Arc<LoadBalancer<S>>
        where
            S: pingora::lb::selection::BackendSelection + Send + Sync + 'static,
            S::Iter: pingora::lb::selection::BackendIter,
        {
            let lb = LoadBalancer::<S>::from_backends(pool);
            // Static discovery never waits: the selector is filled before the first request.
            lb.update()
                .now_or_never()
                .expect("static discovery does not block")
                .expect("static discovery does not fail");
            Arc::new(lb)
        }

        let selector = match config.selection {
            Selection::RoundRobin => Selector::RoundRobin(load_balancer(pool)),
            Selection::Random => Selector::Random(load_balancer(pool)),
            Selection::ConsistentHash { .. } => Selector::Consistent(load_balancer(pool)),
        };
        let hash_key = match &config.selection {
            Selection::ConsistentHash { key } => Some(key.clone()),
            _ => None,
        };
        let (first_round, _) = watch::channel(false);
        Ok(Arc::new(Upstreams {
            selector,
            routes,
            hash_key,
            order,
            health_changed,
            first_round,
        }))
    }

    /// What consistent hashing hashes, if it is in use.
    pub fn hash_key(&self) -> Option<&HashKey> {
        self.hash_key.as_ref()
    }

    /// Picks a healthy backend not in `excluded`, following the selection algorithm.
    pub fn select(&self, key: &[u8], excluded: &[SocketAddr]) -> Option<SocketAddr> {
        // Bounds the walk over the selector's ring or list; it holds each backend once per
        // unit of weight, so this covers every backend.
        const MAX_ITERATIONS: usize = 1024;
        let accept = |backend: &Backend, healthy: bool| {
            healthy
                && backend
                    .addr
                    .as_inet()
                    .is_some_and(|addr| !excluded.contains(addr))
        };
        let backend = match &self.selector {
            Selector::RoundRobin(lb) => lb.select_with(key, MAX_ITERATIONS, accept),
            Selector::Random(lb) => lb.select_with(key, MAX_ITERATIONS, accept),
            Selector::Consistent(lb) => lb.select_with(key, MAX_ITERATIONS, accept),
        }?;
        backend.addr.as_inet().copied()
    }

    /// How to reach a backend returned by [Self::select].
    pub fn route(&self, addr: &SocketAddr) -> Option<&Route> {
        self.routes.get(addr)
    }

    /// Every backend's state, in configuration order.
    pub fn states(&self) -> impl Iterator<Item = &BackendState> {
        self.order.iter().map(|addr| &*self.routes[addr].state)
    }

    /// Backends in rotation.
    pub fn healthy(&self) -> usize {
        self.states().filter(|s| s.healthy()).count()
    }

    /// All backends.
    pub fn total(&self) -> usize {
        self.order.len()
    }

    /// Runs one round of health checks. Only [health::HealthChecks] calls it: two rounds at
    /// once would race on the same backend and report a transition twice.
    async fn check_health_once(&self) {
        match &self.selector {
            Selector::RoundRobin(lb) => lb.backends().run_health_check(true).await,
            Selector::Random(lb) => lb.backends().run_health_check(true).await,
            Selector::Consistent(lb) => lb.backends().run_health_check(true).await,
        }
        self.first_round.send_replace(true);
    }

    /// Waits until the first round of health checks is done.
    pub async fn first_health_round(&self) {
        let mut done = self.first_round.subscribe();
        // The sender lives as long as `self`: waiting cannot fail.
        let _ = done.wait_for(|done| *done).await;
    }
}

/// Builds the peer template and Host override of one backend.
fn route(config: &Config, upstream: &Upstream, addr: SocketAddr, metrics: &Metrics) -> Route {
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
    Route {
        peer,
        host: upstream
            .host
            .as_deref()
            .map(|h| http::HeaderValue::from_str(h).expect("validated with the configuration")),
        state: Arc::new(metrics.backend_state(&name, upstream.weight.0)),
        metrics: metrics.backend(&name),
        name,
    }
}
