//! The start-up sequence of a serving process. The order matters:
//! 1. `-d` forks first, so every later step (and its pid in syslog) belongs to the daemon;
//! 2. the error log connects (syslog may be unreachable once unprivileged);
//! 3. with `-u`, the sockets of the old process arrive over `upgrade_sock`;
//! 4. the remaining listening sockets are bound, the pid file opened, backends resolved;
//! 5. privileges are dropped, while the process still has a single thread;
//! 6. pingora runs, with this crate's signal handling and readiness announcement.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::info;
use nix::unistd::Uid;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;

use crate::access_log::{AccessLog, Sink};
use crate::cli::Cli;
use crate::client_connections::ClientConnections;
use crate::config::{Config, ListenAddress};
use crate::lifecycle::{Announcer, Lifecycle, Signals};
use crate::listeners::ListeningSockets;
use crate::logging;
use crate::metrics::Metrics;
use crate::metrics_endpoint::MetricsEndpoint;
use crate::privileges::{drop_privileges, Identity};
use crate::proxy::{Balancer, MAX_STALE_RETRIES};
use crate::readiness::Readiness;
use crate::runtime_files::{prepare_parent, PidFile};
use crate::traffic::Traffic;
use crate::upgrade::HandoffSocket;
use crate::upstreams::{HealthChecks, Upstreams};

/// Why the process could not start.
pub type StartError = Box<dyn std::error::Error>;

/// Runs the load balancer until it is told to stop.
pub fn serve(cli: &Cli, config: Config) -> Result<(), StartError> {
    let mut readiness = Readiness::from_env();
    if cli.daemon || config.daemon {
        readiness.daemonize()?;
    }
    logging::init(&config);
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
    /// Every listening socket, to hand to a successor.
    handed_over: Vec<(String, std::os::fd::RawFd)>,
    pid_file: Option<PidFile>,
    metrics: Arc<Metrics>,
    upstreams: Arc<Upstreams>,
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
        let path = &config.upgrade_sock.0;
        prepare_parent(path, owner).map_err(|e| format!("key `upgrade_sock`: {e}"))?;
        let socket = HandoffSocket::bind(path, owner).map_err(|e| {
            format!(
                "key `upgrade_sock`: cannot listen on {}: {e}",
                path.display()
            )
        })?;
        readiness.listening();
        info!(
            "waiting for the running process's sockets on {}",
            path.display()
        );
        let mut trusted = vec![Uid::from_raw(0), Uid::effective()];
        trusted.extend(identity.as_ref().map(|i| i.uid));
        let handoff = socket
            .receive(&trusted)
            .map_err(|e| format!("upgrade failed: {e}"))?;
        info!(
            "received {} listening sockets from process {}",
            handoff.sockets.len(),
            handoff.from_pid
        );
        let generation = handoff.from_generation + 1;
        let (sockets, predecessor) = handoff.into_parts();
        (sockets, Some(predecessor), generation)
    } else {
        (Default::default(), None, 1)
    };
    let addresses: Vec<(String, ListenAddress)> = config
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("listeners[{i}]"), *l))
        .chain(
            config
                .metrics
                .as_ref()
                .map(|m| ("metrics.listen".to_string(), m.listen)),
        )
        .collect();
    raise_open_file_limit();
    let mut sockets = ListeningSockets::open(&addresses, inherited)?;
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
        Some(path) => Some(
            PidFile::open(&path.0, owner)
                .map_err(|e| format!("key `pid_file`: {}: {e}", path.0.display()))?,
        ),
        None => None,
    };
    let metrics = Arc::new(Metrics::new(generation));
    let upstreams = Upstreams::build(config, &metrics)?;
    let access_log_sink =
        Sink::open(&config.access_log).map_err(|e| format!("key `access_log.destination`: {e}"))?;

    drop_privileges(identity.as_ref())?;
    Ok(Prepared {
        sockets,
        metrics_socket,
        handed_over,
        pid_file,
        metrics,
        upstreams,
        access_log_sink,
        predecessor,
        generation,
    })
}

/// Step 6: pingora's services on the prepared sockets, until the process is told to stop.
fn run(config: &Config, prepared: Prepared, readiness: Readiness) {
    let Prepared {
        sockets,
        metrics_socket,
        handed_over,
        pid_file,
        metrics,
        upstreams,
        access_log_sink,
        predecessor,
        generation,
    } = prepared;
    let access_log = access_log_sink
        .map(|sink| Arc::new(AccessLog::start(&config.access_log, sink, metrics.clone())));
    let mut server = Server::new_with_opt_and_conf(None, server_conf(config));
    let traffic = Arc::new(Traffic::default());
    let lifecycle = Arc::new(Lifecycle {
        traffic: traffic.clone(),
        upstreams: upstreams.clone(),
        sockets: handed_over,
        upgrade_sock: config.upgrade_sock.0.clone(),
        grace_period: Duration::from_secs(config.grace_period_seconds),
        pid_file,
        predecessor: Mutex::new(predecessor),
        readiness: Mutex::new(readiness),
        generation,
        access_log: access_log.clone(),
    });
    let balancer = pingora::proxy::http_proxy(
        &server.configuration,
        Balancer {
            upstreams: upstreams.clone(),
            retries: config.retries,
            traffic: traffic.clone(),
            forwarding: config.forwarding.clone(),
            metrics: metrics.clone(),
            access_log,
            client: config.client.clone(),
        },
    );
    let mut proxy = pingora::services::listening::Service::new(
        "proxy".to_string(),
        ClientConnections::new(balancer, &config.client),
    );
    for address in sockets.addresses() {
        // Reads go straight into the request's own buffer: pingora's default 64 KiB read
        // buffer per connection would be most of what an idle kept-alive client costs.
        let unbuffered_reads = L4BufferSettings {
            read: Some(0),
            write: None,
        };
        proxy.add_listener(ListenerConfig::tcp(address).l4_buffer(unbuffered_reads));
    }
    let proxy = server.add_boxed_service(sockets.attach(Box::new(proxy)));
    server.add_service(background_service(
        "health check",
        HealthChecks {
            upstreams: upstreams.clone(),
            interval: config.health_check.interval.0,
        },
    ));
    if let Some(socket) = metrics_socket {
        let endpoint = MetricsEndpoint {
            metrics,
            upstreams,
            traffic,
            listeners: config.listeners.iter().map(|l| l.0).collect(),
        };
        let mut service = pingora::services::listening::Service::new(
            "metrics".to_string(),
            pingora::apps::http_app::HttpServer::new_app(endpoint),
        );
        for address in socket.addresses() {
            service.add_tcp(address);
        }
        server.add_boxed_service(socket.attach(Box::new(service)));
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

/// The part of the configuration pingora itself reads.
fn server_conf(config: &Config) -> ServerConf {
    ServerConf {
        version: config.version,
        threads: config.threads,
        work_stealing: config.work_stealing,
        upgrade_sock: config.upgrade_sock.0.display().to_string(),
        // Draining is ours (it ends when idle); pingora's wait only backs it up.
        grace_period_seconds: Some(config.grace_period_seconds + 1),
        graceful_shutdown_timeout_seconds: Some(config.graceful_shutdown_timeout_seconds),
        upstream_keepalive_pool_size: config.upstream_keepalive_pool_size,
        max_retries: config.retries + 1 + MAX_STALE_RETRIES,
        ..ServerConf::default()
    }
}
