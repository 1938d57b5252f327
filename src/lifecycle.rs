//! The running process's life after start-up: announcing readiness, signals, the handoff
//! to a successor, and draining. See LIFECYCLE.md for the sequence and its failure cases.
//!
//! pingora's own signal handling is replaced ([RunArgs::shutdown_signal]) because on
//! SIGQUIT it shuts down even when the handoff failed, and on SIGTERM it always waits the
//! whole grace period. Here a failed handoff changes nothing, and draining ends as soon as
//! the last request has finished.
//!
//! [RunArgs::shutdown_signal]: pingora::server::RunArgs

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use log::{error, info, warn};
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

use crate::access_log::AccessLog;
use crate::notify;
use crate::readiness::Readiness;
use crate::runtime_files::PidFile;
use crate::traffic::Traffic;
use crate::upgrade::{self, Predecessor};
use crate::upstreams::health::HealthSummary;
use crate::upstreams::Pools;

/// After a handoff, how long responses carry `Connection: close` before accepting stops,
/// so that busy keep-alive clients move to the new process instead of finding their
/// connection closed.
const DRAIN_WINDOW: Duration = Duration::from_millis(1000);

/// Makes SIGQUIT and SIGHUP harmless until [Signals] handles them: their default action
/// would kill a process that is still starting (a reload racing a start, a logrotate).
/// Call first thing in `main`.
pub fn ignore_signals_until_ready() {
    use nix::sys::signal::Signal;
    for signal in [Signal::SIGQUIT, Signal::SIGHUP] {
        let _ = crate::system::ignore_signal(signal);
    }
}

/// State shared by the start-up announcement, the signal handling and the exit.
pub struct Lifecycle {
    pub traffic: Arc<Traffic>,
    pub pools: Arc<Pools>,
    /// Listening sockets by address, to hand to a successor.
    pub sockets: Vec<(String, RawFd)>,
    pub upgrade_sock: PathBuf,
    pub grace_period: Duration,
    /// After SIGTERM, how long new connections are still accepted.
    pub stop_accepting_after: Duration,
    pub pid_file: Option<PidFile>,
    /// The process that handed its sockets to this one, until told we serve.
    pub predecessor: Mutex<Option<Predecessor>>,
    pub readiness: Mutex<Readiness>,
    /// 1 for a fresh start, one more than the predecessor's after a handoff.
    pub generation: u64,
    pub access_log: Option<Arc<AccessLog>>,
    /// Told once [Signals] listens: until then SIGQUIT and SIGHUP are ignored (see
    /// [ignore_signals_until_ready]), so readiness waits for it.
    pub signals_armed: tokio::sync::Notify,
}

impl Lifecycle {
    fn status_line(&self, health: &HealthSummary) -> String {
        let listening: Vec<&str> = self.sockets.iter().map(|(a, _)| a.as_str()).collect();
        format!(
            "serving on {}; {}/{} backends healthy",
            listening.join(", "),
            health.healthy,
            health.total
        )
    }

    /// Removes what this process leaves behind; called on every exit path.
    pub fn clean_up(&self) {
        if let Some(pid_file) = &self.pid_file {
            pid_file.remove_if_ours();
        }
    }

    /// Stops accepting is pingora's part (after [Signals::recv] returns); this waits for the
    /// requests in flight and exits as soon as there are none, or when the grace period ends.
    fn exit_when_idle(self: Arc<Self>) {
        // A connection accepted just before accepting stopped holds no request until its
        // headers are read, which a loaded machine may delay: the process is idle only
        // once no request is in flight and none has started for a while.
        const QUIET: Duration = Duration::from_millis(250);
        let deadline = Instant::now() + self.grace_period;
        loop {
            let started = self.traffic.started();
            std::thread::sleep(QUIET);
            let idle = self.traffic.in_flight() == 0 && self.traffic.started() == started;
            if idle || Instant::now() >= deadline {
                break;
            }
        }
        let left = self.traffic.in_flight();
        if left > 0 {
            warn!("grace period over with {left} requests in flight; exiting");
        }
        self.clean_up();
        info!("exiting");
        std::process::exit(0);
    }

    async fn drain(self: &Arc<Self>, handed_over: bool) -> ShutdownSignal {
        let window = if handed_over {
            self.traffic.start_draining();
            // Logged once responses close their connections, which tests wait for.
            info!("the new process serves; this one drains");
            DRAIN_WINDOW
        } else {
            notify::stopping();
            self.traffic.start_stopping();
            self.stop_accepting_after
        };
        tokio::time::sleep(window.min(self.grace_period)).await;
        let lifecycle = self.clone();
        std::thread::spawn(move || lifecycle.exit_when_idle());
        ShutdownSignal::GracefulTerminate
    }
}

/// Announces readiness once the process serves, then keeps systemd's status and watchdog
/// current. Runs after the proxy service has started.
pub struct Announcer(pub Arc<Lifecycle>);

#[async_trait]
impl BackgroundService for Announcer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let lifecycle = &self.0;
        // Readiness means the first health-check round is done: no request is sent to a
        // backend already known to be down.
        let mut health = lifecycle.pools.health().subscribe();
        // The sender lives as long as the pools: waiting cannot fail.
        let _ = health.wait_for(|summary| summary.checked).await;
        // pingora starts the services before it polls [Signals]: a SIGQUIT sent the moment
        // systemd or a script hears READY=1 would otherwise fall into the ignored window and
        // be lost, and the successor waiting for the sockets would time out.
        lifecycle.signals_armed.notified().await;
        let predecessor = lifecycle.predecessor.lock().expect("not poisoned").take();
        let took_over = predecessor.is_some();
        if let Some(predecessor) = predecessor {
            let old = predecessor.pid;
            if let Err(e) = predecessor.confirm_serving() {
                error!(
                    "process {old} gave up the handoff ({e}); it keeps serving, so this process exits"
                );
                std::process::exit(1);
            }
            info!("took over from process {old}, which now drains");
        }
        if let Some(pid_file) = &lifecycle.pid_file {
            if let Err(e) = pid_file.publish() {
                warn!("cannot write the pid file: {e}");
            }
        }
        let status = lifecycle.status_line(&health.borrow_and_update());
        notify::ready(took_over, &status);
        lifecycle.readiness.lock().expect("not poisoned").ready();
        info!("{status}");

        let watchdog = notify::watchdog_interval();
        let mut tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Ok(()) = health.changed() => {
                    notify::status(&lifecycle.status_line(&health.borrow_and_update()));
                }
                _ = tick.tick(), if watchdog.is_some() => notify::watchdog(),
            }
        }
    }
}

/// Signal handling while serving:
/// - SIGTERM: drain and exit once idle (at most the grace period);
/// - SIGINT: exit at once;
/// - SIGQUIT: hand the sockets to a successor (`-u`); drain once it serves, keep serving if not;
/// - SIGHUP: reopen the error log file (configuration changes need `pingora-lb reload`).
pub struct Signals(pub Arc<Lifecycle>);

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let lifecycle = &self.0;
        let listen = |kind: SignalKind| signal(kind).expect("tokio can install signal handlers");
        let (mut term, mut int, mut quit, mut hup) = (
            listen(SignalKind::terminate()),
            listen(SignalKind::interrupt()),
            listen(SignalKind::quit()),
            listen(SignalKind::hangup()),
        );
        lifecycle.signals_armed.notify_one();
        let mut handoff: Option<tokio::sync::oneshot::Receiver<Result<(), upgrade::HandoffError>>> =
            None;
        loop {
            tokio::select! {
                _ = term.recv() => {
                    info!("SIGTERM: draining");
                    return lifecycle.drain(false).await;
                }
                _ = int.recv() => {
                    info!("SIGINT: exiting now");
                    return ShutdownSignal::FastShutdown;
                }
                _ = hup.recv() => {
                    crate::logging::reopen();
                    if let Some(access_log) = &lifecycle.access_log {
                        access_log.reopen();
                    }
                    info!("SIGHUP: log files reopened; apply a new configuration with `pingora-lb reload`");
                }
                _ = quit.recv() => {
                    if handoff.is_some() {
                        info!("SIGQUIT: a handoff is already under way");
                        continue;
                    }
                    info!("SIGQUIT: handing the listening sockets over through {}", lifecycle.upgrade_sock.display());
                    let (done, result) = tokio::sync::oneshot::channel();
                    let (path, sockets) = (lifecycle.upgrade_sock.clone(), lifecycle.sockets.clone());
                    let generation = lifecycle.generation;
                    // Blocking code on a plain thread, so that it never holds up the runtime.
                    std::thread::spawn(move || {
                        let _ = done.send(upgrade::hand_over(&path, &sockets, generation));
                    });
                    handoff = Some(result);
                }
                result = async { handoff.as_mut().expect("guarded").await }, if handoff.is_some() => {
                    handoff = None;
                    match result {
                        Ok(Ok(())) => return lifecycle.drain(true).await,
                        Ok(Err(e)) => error!("upgrade failed: {e}; this process keeps serving"),
                        Err(_) => error!("upgrade failed: the handoff thread died; this process keeps serving"),
                    }
                }
            }
        }
    }
}
