//! The start-up sequence of a serving process. The order matters:
//! 1. `-d` forks first, so every later step (and its pid in syslog) belongs to the daemon;
//! 2. the error log connects (syslog may be unreachable once unprivileged);
//! 3. with `-u`, the sockets of the old process arrive over `upgrade_sock`;
//! 4. the remaining listening sockets are bound, the pid file opened, backends resolved;
//! 5. privileges are dropped, while the process still has a single thread;
//! 6. pingora runs, with this crate's signal handling and readiness announcement.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::info;
use nix::unistd::Uid;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::ServiceWithDependents;

use crate::access_log::{AccessLog, Sink};
use crate::cli::Cli;
use crate::client_connections::ClientConnections;
use crate::config::{Config, ListenAddress};
use crate::exit_codes;
use crate::fast_path::FastPath;
use crate::lifecycle::{Announcer, Lifecycle, Signals};
use crate::listeners::BindError;
use crate::listeners::{Binding, ListeningSockets};
use crate::logging;
use crate::metrics::Metrics;
use crate::metrics_endpoint::MetricsEndpoint;
use crate::privileges::{drop_privileges, Identity, PrivilegeError};
use crate::proxy::{Balancer, MAX_STALE_RETRIES};
use crate::readiness::Readiness;
use crate::redirect::HttpsRedirect;
use crate::routing::Router;
use crate::runtime_files::{prepare_parent, PidFile};
use crate::tls::{TlsListeners, TlsTerminator};
use crate::traffic::Traffic;
use crate::upgrade::{Handoff, HandoffError, HandoffSocket};
use crate::upstreams::{Pools, ResolveError};

/// Why the process could not start. A predecessor, if any, keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot fork into the background: {0}")]
    Daemonize(std::io::Error),
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    #[error("key `upgrade_sock`: {0}")]
    UpgradeDirectory(std::io::Error),
    #[error("key `upgrade_sock`: cannot listen on {}: {source}", .path.display())]
    UpgradeSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("upgrade failed: {0}")]
    Handoff(#[from] HandoffError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("key `pid_file`: {}: {source}", .path.display())]
    PidFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("key `access_log.destination`: {0}")]
    AccessLog(std::io::Error),
    #[error("key `listeners[{index}].tls`: {source}")]
    Tls {
        index: usize,
        source: pingora::tls::error::ErrorStack,
    },
}

impl StartError {
    /// The process's exit status for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Privileges(e) => e.exit_code(),
            StartError::Bind(e) if e.source.kind() == std::io::ErrorKind::PermissionDenied => {
                exit_codes::NO_PERMISSION
            }
            StartError::Bind(_) | StartError::Resolve(_) | StartError::Handoff(_) => {
                exit_codes::UNAVAILABLE
            }
            StartError::UpgradeDirectory(_)
            | StartError::UpgradeSocket { .. }
            | StartError::PidFile { .. }
            | StartError::AccessLog(_) => exit_codes::CANNOT_CREATE,
            StartError::Daemonize(_) | StartError::Tls { .. } => exit_codes::OS_ERROR,
        }
    }
}

/// Runs the load balancer until it is told to stop.
pub fn serve(cli: &Cli, config: Config) -> Result<(), StartError> {
    let mut readiness = Readiness::from_env();
    if cli.daemon || config.daemon {
        readiness.daemonize().map_err(StartError::Daemonize)?;
    }
    logging::init(&config);
    for warning in config.warnings() {
        log::warn!("configuration: {warning}");
    }
    match prepare(cli, &config, &mut readiness) {
        Ok(prepared) => {
            run(&config, prepared, readiness);
            Ok(())
        }
        Err(e) => {
            // Logged and reported before the pipe closes: a reload command stops this
            // process as soon as it sees the pipe close.
            if !logging::goes_to_stderr() {
                log::error!("{e}");
            }
            readiness.failed(&e);
            Err(e)
        }
    }
}

/// Everything start-up acquires while it may still be root, ready to run unprivileged.
struct Prepared {
    /// The proxy's listening sockets.
    sockets: ListeningSockets,
    metrics_socket: Option<ListeningSockets>,
    /// TLS termination of each TLS listener.
    tls: Vec<(ListenAddress, TlsTerminator)>,
    /// Every listening socket, to hand to a successor.
    handed_over: Vec<(String, std::os::fd::RawFd)>,
    pid_file: Option<PidFile>,
    metrics: Arc<Metrics>,
    pools: Arc<Pools>,
    access_log_sink: Option<Sink>,
    predecessor: Option<crate::upgrade::Predecessor>,
    generation: u64,
}

/// Steps 3 to 5: sockets (inherited or bound), runtime files, backends, then the
/// privilege drop. Every failure here leaves a predecessor serving.
fn prepare(cli: &Cli, config: &Config, readiness: &mut Readiness) -> Result<Prepared, StartError> {
    let identity = Identity::resolve(config)?;
    let owner = identity.as_ref().map(|i| (i.uid, i.gid));
    let (inherited, predecessor, generation) = if cli.upgrade {
        let handoff = take_over(config, identity.as_ref(), readiness)?;
        let generation = handoff.from_generation + 1;
        let (sockets, predecessor) = handoff.into_parts();
        (sockets, Some(predecessor), generation)
    } else {
        (Default::default(), None, 1)
    };
    raise_open_file_limit();
    let mut sockets = ListeningSockets::open(&listening_addresses(config), inherited)?;
    let metrics_socket = config
        .metrics
        .as_ref()
        .map(|m| sockets.split_off(&m.listen));
    let handed_over = sockets
        .raw()
        .into_iter()
        .chain(metrics_socket.iter().flat_map(|m| m.raw()))
        .collect();
    let pid_file = match &config.pid_file {
        Some(path) => {
            Some(
                PidFile::open(&path.0, owner).map_err(|source| StartError::PidFile {
                    path: path.0.clone(),
                    source,
                })?,
            )
        }
        None => None,
    };
    let metrics = Arc::new(Metrics::new(generation));
    let pools = Arc::new(Pools::build(config, &metrics)?);
    let access_log_sink = Sink::open(&config.access_log).map_err(StartError::AccessLog)?;
    let tls = tls_terminators(config)?;

    drop_privileges(identity.as_ref())?;
    Ok(Prepared {
        sockets,
        metrics_socket,
        tls,
        handed_over,
        pid_file,
        metrics,
        pools,
        access_log_sink,
        predecessor,
        generation,
    })
}

/// Step 3, with `-u`: listens on `upgrade_sock` and receives the running process's sockets.
fn take_over(
    config: &Config,
    identity: Option<&Identity>,
    readiness: &mut Readiness,
) -> Result<Handoff, StartError> {
    let owner = identity.map(|i| (i.uid, i.gid));
    let path = &config.upgrade_sock.0;
    prepare_parent(path, owner).map_err(StartError::UpgradeDirectory)?;
    let socket = HandoffSocket::bind(path, owner).map_err(|source| StartError::UpgradeSocket {
        path: path.clone(),
        source,
    })?;
    readiness.listening();
    info!(
        "waiting for the running process's sockets on {}",
        path.display()
    );
    let mut trusted = vec![Uid::from_raw(0), Uid::effective()];
    trusted.extend(identity.map(|i| i.uid));
    let handoff = socket.receive(&trusted)?;
    info!(
        "received {} listening sockets from process {}",
        handoff.sockets.len(),
        handoff.from_pid
    );
    Ok(handoff)
}

/// TLS termination of each TLS listener.
fn tls_terminators(config: &Config) -> Result<Vec<(ListenAddress, TlsTerminator)>, StartError> {
    let mut terminators = Vec::new();
    for (index, listener) in config.listeners.iter().enumerate() {
        if let Some(tls) = &listener.tls {
            let terminator =
                TlsTerminator::new(tls).map_err(|source| StartError::Tls { index, source })?;
            terminators.push((listener.address, terminator));
        }
    }
    Ok(terminators)
}

/// Every address to listen on, with its configuration key: the proxy's, then the metrics'.
fn listening_addresses(config: &Config) -> Vec<Binding> {
    let proxy = config.listeners.iter().enumerate().map(|(i, l)| Binding {
        key: format!("listeners[{i}]"),
        address: l.address,
        freebind: l.freebind,
    });
    let metrics = config.metrics.as_ref().map(|m| Binding {
        key: "metrics.listen".to_string(),
        address: m.listen,
        freebind: false,
    });
    proxy.chain(metrics).collect()
}

/// Step 6: pingora's services on the prepared sockets, until the process is told to stop.
fn run(config: &Config, prepared: Prepared, readiness: Readiness) {
    let (metrics, pools) = (prepared.metrics.clone(), prepared.pools.clone());
    let router = Arc::new(Router::build(config, &pools, &metrics));
    let access_log = prepared
        .access_log_sink
        .map(|sink| Arc::new(AccessLog::start(&config.access_log, sink, metrics.clone())));
    let mut server = Server::new_with_opt_and_conf(None, server_conf(config));
    let traffic = Arc::new(Traffic::default());
    let lifecycle = Arc::new(Lifecycle {
        traffic: traffic.clone(),
        pools: pools.clone(),
        sockets: prepared.handed_over,
        upgrade_sock: config.upgrade_sock.0.clone(),
        grace_period: Duration::from_secs(config.grace_period_seconds),
        stop_accepting_after: config.stop_accepting_after.0,
        pid_file: prepared.pid_file,
        predecessor: Mutex::new(prepared.predecessor),
        readiness: Mutex::new(readiness),
        generation: prepared.generation,
        access_log: access_log.clone(),
        signals_armed: tokio::sync::Notify::new(),
    });
    let balancer = Balancer {
        pools: pools.clone(),
        router,
        no_route_status: config.no_route_status,
        https_redirect: HttpsRedirect::from_config(config),
        traffic: traffic.clone(),
        forwarding: config.forwarding.clone(),
        metrics: metrics.clone(),
        access_log,
        client: config.client.clone(),
    };
    let proxy = proxy_service(
        &server.configuration,
        config,
        balancer,
        prepared.sockets,
        prepared.tls,
        &metrics,
    );
    let proxy = server.add_boxed_service(proxy);
    for checks in pools.health_checks() {
        server.add_service(background_service("health check", checks));
    }
    if let Some(socket) = prepared.metrics_socket {
        let endpoint = MetricsEndpoint {
            metrics: metrics.clone(),
            pools: pools.clone(),
            traffic,
            listeners: config.listeners.iter().map(|l| l.address.0).collect(),
        };
        server.add_boxed_service(metrics_service(endpoint, socket));
    }
    let announcer = server.add_service(background_service(
        "announcer",
        Announcer(lifecycle.clone()),
    ));
    announcer.add_dependency(&proxy);

    server.run(RunArgs {
        shutdown_signal: Box::new(Signals(lifecycle.clone())),
    });
    lifecycle.clean_up();
}

/// The proxy: client connections on the proxy's sockets, each request through `balancer`.
fn proxy_service(
    server_conf: &Arc<ServerConf>,
    config: &Config,
    balancer: Balancer,
    sockets: ListeningSockets,
    tls: Vec<(ListenAddress, TlsTerminator)>,
    metrics: &Metrics,
) -> Box<dyn ServiceWithDependents> {
    let mut proxy = pingora::services::listening::Service::new(
        "proxy".to_string(),
        ClientConnections::new(
            pingora::proxy::http_proxy(server_conf, balancer.clone()),
            &config.client,
            config.proxy_protocol.clone(),
            TlsListeners::new(tls, metrics),
            config.fast_path.then(|| FastPath::new(balancer)),
        ),
    );
    // Reads go straight into the request's own buffer: pingora's default 64 KiB read
    // buffer per connection would be most of what an idle kept-alive client costs. No
    // write buffer either (1.5 KiB per connection): the fast path writes a response's
    // header and body in one call; only pingora-proxy's responses take two.
    let unbuffered = L4BufferSettings {
        read: Some(0),
        write: Some(0),
    };
    for address in sockets.addresses() {
        proxy.add_listener(ListenerConfig::tcp(address).l4_buffer(unbuffered));
    }
    sockets.attach(Box::new(proxy))
}

/// `/metrics` and `/status` on the metrics socket.
fn metrics_service(
    endpoint: MetricsEndpoint,
    socket: ListeningSockets,
) -> Box<dyn ServiceWithDependents> {
    let mut service = pingora::services::listening::Service::new(
        "metrics".to_string(),
        pingora::apps::http_app::HttpServer::new_app(endpoint),
    );
    for address in socket.addresses() {
        service.add_tcp(address);
    }
    socket.attach(Box::new(service))
}

/// Every client connection takes a file descriptor: the soft limit (often 1024 outside
/// systemd) is raised to the hard one, as HAProxy does, so idle clients cannot exhaust it
/// long before memory would.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => info!("open file limit raised from {soft} to {hard}"),
                Err(e) => log::warn!("cannot raise the open file limit from {soft}: {e}"),
            }
        }
    }
}

/// The most other backends any pool tries a request on.
fn max_retries(config: &Config) -> usize {
    config
        .pools()
        .iter()
        .map(|p| p.config.retries)
        .max()
        .unwrap_or(0)
}

/// The part of the configuration pingora itself reads.
fn server_conf(config: &Config) -> ServerConf {
    ServerConf {
        version: config.version,
        threads: config.threads,
        work_stealing: config.work_stealing.unwrap_or(config.threads > 1),
        upgrade_sock: config.upgrade_sock.0.display().to_string(),
        // Draining is ours (it ends when idle); pingora's wait only backs it up.
        grace_period_seconds: Some(config.grace_period_seconds + 1),
        graceful_shutdown_timeout_seconds: Some(config.graceful_shutdown_timeout_seconds),
        upstream_keepalive_pool_size: config.upstream_keepalive_pool_size,
        max_retries: max_retries(config) + 1 + MAX_STALE_RETRIES,
        ..ServerConf::default()
    }
}
