//! Requests in flight and whether the process is draining: what the proxy counts and the
//! shutdown path, systemd's status and the status endpoint read.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Shared by every request of the process.
#[derive(Default)]
pub struct Traffic {
    in_flight: AtomicUsize,
    started: AtomicUsize,
    draining: AtomicBool,
    stopping: AtomicBool,
}

impl Traffic {
    /// Requests that have started and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Requests started since the process started (wrapping).
    pub fn started(&self) -> usize {
        self.started.load(Ordering::Acquire)
    }

    /// From now on every response closes its connection, so clients reconnect (to the
    /// new process, after a handoff) instead of finding their idle connection closed.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// The process is stopping with no successor: from now on it must not be sent new
    /// clients (keepalived's track script moves the virtual IP away).
    pub fn start_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
        self.start_draining();
    }

    /// Whether the process is stopping with no successor.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Whether responses must close their connection.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Counts a request as in flight for as long as it lives.
pub struct InFlight(Arc<Traffic>);

impl InFlight {
    pub fn new(traffic: &Arc<Traffic>) -> Self {
        traffic.in_flight.fetch_add(1, Ordering::AcqRel);
        traffic.started.fetch_add(1, Ordering::Release);
        InFlight(traffic.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_in_flight_while_it_lives() {
        let traffic = Arc::new(Traffic::default());
        let first = InFlight::new(&traffic);
        let second = InFlight::new(&traffic);
        assert_eq!((traffic.in_flight(), traffic.started()), (2, 2));
        drop(first);
        drop(second);
        assert_eq!((traffic.in_flight(), traffic.started()), (0, 2));
    }
}
