//! Idle backend connections shared between client connections.
//!
//! A backend connection is used for one exchange at a time and, between exchanges, waits
//! here for the next request of any client connection, as with HAProxy's `http-reuse` and
//! pingora's pool: neither a client opening a connection per request nor an idle
//! kept-alive client holds a backend connection of its own. They are kept per worker
//! thread: a socket stays with the runtime that registered it (pingora runs one runtime
//! per thread when work stealing is off), and no lock is taken.

use std::cell::RefCell;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::FutureExt;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::upstreams::{BackendId, PoolId};

/// A connection to one backend of one pool, boxed once when it is opened: a client
/// connection holds a pointer to the one it is using (an idle client connection holds
/// that pointer's room, not the connection's), and handing it here and back moves no
/// more than the pointer.
pub struct BackendConnection {
    pub pool: PoolId,
    pub backend: BackendId,
    pub stream: TcpStream,
    /// Read from the backend and not yet forwarded.
    pub read: BytesMut,
    /// The deadline of a read from the backend that has to wait: one timer for the
    /// connection's life, moved later for each wait rather than armed anew. tokio moves
    /// a pending timer later without a lock or a change to its timer wheel, whereas a
    /// timer armed anew that ends before every other one pending wakes the runtime's
    /// driver with an eventfd write. That was every ninth keep-alive request: a backend's
    /// read timeout (60 s) ends before a client's keep-alive wait (75 s). The timer stays
    /// armed after a read: if it ends before the next wait moves it, it wakes the task
    /// that waited last, which finds nothing ready, and the next wait arms it again.
    pub read_timer: Pin<Box<Sleep>>,
}

impl BackendConnection {
    /// A new connection, its read timer not yet armed.
    pub fn new(pool: PoolId, backend: BackendId, stream: TcpStream) -> Box<Self> {
        Box::new(BackendConnection {
            pool,
            backend,
            stream,
            read: BytesMut::new(),
            // Armed by its first `reset`; until then it is only a deadline.
            read_timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        })
    }
}

/// Idle connections kept per backend and thread; more are closed.
const PER_BACKEND: usize = 128;

/// Indexed by pool, then backend: both are small indices from the configuration, and
/// two lookups per request cost less than hashing a key (SipHash, about 400 instructions
/// per request).
type Idle = Vec<Vec<Vec<(Box<BackendConnection>, Instant)>>>;

thread_local! {
    static IDLE: RefCell<Idle> = const { RefCell::new(Vec::new()) };
}

/// Keeps a connection that carried complete exchanges and holds no unread byte. Its
/// read buffer is freed: idle, it holds only the socket.
pub fn put(mut connection: Box<BackendConnection>) {
    connection.read = BytesMut::new();
    let (pool, backend) = (connection.pool, connection.backend);
    IDLE.with_borrow_mut(|idle| {
        if idle.len() <= pool {
            idle.resize_with(pool + 1, Vec::new);
        }
        let backends = &mut idle[pool];
        if backends.len() <= backend {
            backends.resize_with(backend + 1, Vec::new);
        }
        let kept = &mut backends[backend];
        if kept.len() < PER_BACKEND {
            kept.push((connection, Instant::now()));
        }
    });
}

/// The most recently used idle connection to the backend that is still open and was
/// idle less than `max_idle`.
pub fn take(
    pool: PoolId,
    backend: BackendId,
    max_idle: Duration,
) -> Option<Box<BackendConnection>> {
    IDLE.with_borrow_mut(|idle| {
        let kept = idle.get_mut(pool)?.get_mut(backend)?;
        while let Some((connection, since)) = kept.pop() {
            if since.elapsed() < max_idle && still_open(&connection.stream) {
                return Some(connection);
            }
        }
        None
    })
}

/// Whether an idle connection is still open: no end of stream, no error and no stray
/// byte waiting on it. A socket with nothing to read costs no system call here.
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    stream.peek(&mut byte).now_or_never().is_none()
}
