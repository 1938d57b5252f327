//! Talking to systemd (`Type=notify`): readiness, status, stopping and the watchdog.
//! Every call is a no-op when the process does not run under systemd.

use std::time::Duration;

use log::warn;
use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    // `false`: NOTIFY_SOCKET stays set, as the process notifies for its whole life.
    if let Err(e) = sd_notify::notify(false, states) {
        warn!("cannot notify systemd: {e}");
    }
}

/// The process serves. A process that took over by upgrade also claims to be the unit's
/// main process, which systemd accepts while the reload runs (`NotifyAccess=all`).
pub fn ready(took_over: bool, status: &str) {
    let pid = std::process::id();
    if took_over {
        send(&[
            NotifyState::MainPid(pid),
            NotifyState::Ready,
            NotifyState::Status(status),
        ]);
    } else {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }
}

/// A one-line status shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// The unit is stopping. Never sent by a process handing over to a new one: systemd would
/// deactivate the unit.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The interval at which systemd expects `WATCHDOG=1`, if it asked for it.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    // Half the timeout, as sd_watchdog_enabled(3) recommends.
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

/// Tells systemd the process is alive.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}
