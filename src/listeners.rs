//! Listening sockets are bound here, in `main`, before anything else runs: a busy port is a
//! clear error at start (not a panic in a pingora service thread), binding happens while
//! the process may still hold the privilege to do so, and pingora is then handed the
//! ready sockets through its table of inherited file descriptors.

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};

use async_trait::async_trait;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::{ServiceReadyNotifier, ServiceWithDependents};

use crate::config::ListenAddress;

/// A listening address that cannot be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} (key `{key}`): {source}{}", hint(.source))]
pub struct BindError {
    /// The configuration key of the address, such as `listeners[1]`.
    pub key: String,
    pub address: ListenAddress,
    pub source: std::io::Error,
}

/// What the operator can do about a bind failure.
fn hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => "; another process holds this port",
        std::io::ErrorKind::PermissionDenied => {
            "; ports below 1024 need root or CAP_NET_BIND_SERVICE"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "; no interface of this machine has that address (for an address that comes later, \
             such as a keepalived virtual IP, set `freebind: true` on the listener)"
        }
        _ => "",
    }
}

/// An address to listen on, as configured.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The configuration key of the address, such as `listeners[1]`.
    pub key: String,
    pub address: ListenAddress,
    /// Bind while no interface holds the address (IP_FREEBIND).
    pub freebind: bool,
}

/// The process's listening sockets, keyed by the address string pingora is given.
pub struct ListeningSockets {
    sockets: Vec<(String, OwnedFd)>,
}

impl ListeningSockets {
    /// Takes the sockets a previous process handed over where their address is still
    /// configured, and binds the rest. Handed-over sockets no longer configured are closed.
    pub fn open(
        bindings: &[Binding],
        mut inherited: HashMap<String, OwnedFd>,
    ) -> Result<ListeningSockets, BindError> {
        let mut sockets = Vec::with_capacity(bindings.len());
        for binding in bindings {
            let key = binding.address.to_string();
            let fd = match inherited.remove(&key) {
                Some(fd) => fd,
                None => bind(binding).map_err(|source| BindError {
                    key: binding.key.clone(),
                    address: binding.address,
                    source,
                })?,
            };
            sockets.push((key, fd));
        }
        for key in inherited.keys() {
            log::info!("no longer listening on {key}: it left the configuration");
        }
        Ok(ListeningSockets { sockets })
    }

    /// Takes the socket of `address` out of this set, to attach it to another service.
    pub fn split_off(&mut self, address: &ListenAddress) -> ListeningSockets {
        let key = address.to_string();
        let (taken, kept) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition(|(k, _)| *k == key);
        self.sockets = kept;
        ListeningSockets { sockets: taken }
    }

    /// The address strings, in configuration order.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.sockets.iter().map(|(key, _)| key.as_str())
    }

    /// Keys and raw descriptors, for handing the sockets to a new process.
    pub fn raw(&self) -> Vec<(String, RawFd)> {
        self.sockets
            .iter()
            .map(|(key, fd)| (key.clone(), fd.as_raw_fd()))
            .collect()
    }

    /// Wraps `service` so that, when pingora starts it, these sockets are in pingora's fd
    /// table under the exact keys the service listens on. pingora then only calls
    /// `listen()` on them and never binds by itself.
    pub fn attach(self, service: Box<dyn ServiceWithDependents>) -> Box<dyn ServiceWithDependents> {
        let sockets = self
            .sockets
            .into_iter()
            .map(|(key, fd)| (key, fd.into_raw_fd()))
            .collect();
        Box::new(WithListeningSockets { service, sockets })
    }
}

/// Listens at once, so connections queue in the kernel from here on, before pingora's
/// accept loops run.
fn bind(binding: &Binding) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let address = binding.address.0;
    let family = match address {
        std::net::SocketAddr::V4(_) => AddressFamily::Inet,
        std::net::SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    // tokio does not make adopted sockets non-blocking.
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = socket::socket(family, SockType::Stream, flags, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if binding.freebind {
        // Linux honours IP_FREEBIND on IPv6 sockets too.
        socket::setsockopt(&fd, sockopt::IpFreebind, &true)?;
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(address))?;
    socket::listen(&fd, socket::Backlog::MAXCONN)?;
    let listener = TcpListener::from(fd);
    defer_accept(&listener)?;
    Ok(listener.into())
}

/// HTTP clients speak first, so a connection is only accepted once its request has arrived
/// (TCP_DEFER_ACCEPT, nginx's `deferred`). When a draining process stops accepting, pingora
/// drops the connections still waiting for a request; with this option none of those is a
/// connection whose request is already on its way.
fn defer_accept(listener: &TcpListener) -> std::io::Result<()> {
    // Seconds a silent connection may wait before it is accepted all the same.
    crate::system::set_defer_accept(listener, 10)
}

struct WithListeningSockets {
    service: Box<dyn ServiceWithDependents>,
    /// Owned by pingora once inserted into its table.
    sockets: Vec<(String, RawFd)>,
}

#[async_trait]
impl ServiceWithDependents for WithListeningSockets {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready_notifier: ServiceReadyNotifier,
    ) {
        let fds = fds.expect("pingora passes its fd table on unix");
        {
            let mut table = fds.lock();
            for (key, fd) in self.sockets.drain(..) {
                table.add(key, fd);
            }
        }
        self.service
            .start_service(Some(fds), shutdown, listeners_per_fd, ready_notifier)
            .await
    }

    fn name(&self) -> &str {
        self.service.name()
    }

    fn threads(&self) -> Option<usize> {
        self.service.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.service.listen_addresses()
    }
}
