//! The socket handoff between an old process and its successor, over `upgrade_sock`.
//! See LIFECYCLE.md for the whole sequence and its failure cases.
//!
//! Wire format (one connection): the old process sends one message whose payload is a
//! version line (`pingora-lb handoff 2`), the listening addresses separated by spaces
//! (pingora's own format), a newline and its reload generation, and whose SCM_RIGHTS control
//! message carries the matching descriptors; it then waits for the successor to write one
//! byte, [SERVING], once it serves. Only then does the old process stop accepting, so a
//! successor that dies at any point before leaves the old process serving.
//!
//! The version line is how a package upgrade learns that the new binary cannot take over
//! from the running one: the successor refuses a version it does not speak, with
//! [HandoffError::IncompatibleProtocol], and the reload fails loudly instead of the new
//! binary misreading the message. Version 1 is the message of pingora-lb 0.1.0, which had
//! no version line and the same fields after it.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt::PeerCredentials, ControlMessage, ControlMessageOwned,
    MsgFlags,
};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{Gid, Uid};

use crate::system;

/// Written by the successor once it serves.
const SERVING: u8 = b'S';
/// How long the old process keeps trying to reach a successor after SIGQUIT.
const CONNECT_WINDOW: Duration = Duration::from_secs(5);
/// How long a successor started with `-u` waits for the old process to connect.
pub const ACCEPT_WINDOW: Duration = Duration::from_secs(10);
/// How long the old process waits for the successor to serve once it has the sockets.
const SERVING_WINDOW: Duration = Duration::from_secs(60);
/// Every listening socket a configuration can have: the proxy listeners and the metrics one.
const MAX_SOCKETS: usize = crate::config::MAX_LISTENERS + 1;
/// Starts the first line of a versioned message.
const VERSION_PREFIX: &str = "pingora-lb handoff ";

/// The handoff protocol this build speaks. Raise it, and [OLDEST_ACCEPTED] if the older
/// message can no longer be read, whenever the message changes.
///
/// Setting `PINGORA_LB_HANDOFF_PROTOCOL` when building makes a build that speaks only that
/// version: a deliberately incompatible binary, with which the system test checks that a
/// package upgrade the new binary cannot take over falls back to a restart.
pub const PROTOCOL: u32 = match option_env!("PINGORA_LB_HANDOFF_PROTOCOL") {
    Some(version) => parse_version(version),
    None => 2,
};
/// The oldest version this build takes sockets from.
const OLDEST_ACCEPTED: u32 = match option_env!("PINGORA_LB_HANDOFF_PROTOCOL") {
    Some(_) => PROTOCOL,
    None => 1,
};

/// A decimal version, at compile time: anything else fails the build.
const fn parse_version(text: &str) -> u32 {
    let bytes = text.as_bytes();
    assert!(!bytes.is_empty(), "PINGORA_LB_HANDOFF_PROTOCOL is empty");
    let mut value: u32 = 0;
    let mut i = 0;
    while i < bytes.len() {
        assert!(
            bytes[i].is_ascii_digit(),
            "PINGORA_LB_HANDOFF_PROTOCOL must be a decimal number"
        );
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    value
}

/// Why a handoff did not happen; the old process keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("no new process listens on {path} ({source}); start one with `-u` or use `pingora-lb reload`")]
    NoSuccessor {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "refusing to hand the sockets to pid {pid} running as uid {uid}: only root or this \
         service's user may take them over (is {path} in a directory others can write?)"
    )]
    UntrustedSuccessor { pid: i32, uid: u32, path: PathBuf },
    #[error("refusing sockets from pid {pid} running as uid {uid}: only the service's user or root may hand them over")]
    UntrustedSender { pid: i32, uid: u32 },
    #[error("cannot read the peer's credentials: {0}")]
    Credentials(nix::Error),
    #[error("cannot send the listening sockets: {0}")]
    Send(nix::Error),
    #[error("cannot receive the sockets: {0}")]
    Receive(nix::Error),
    #[error("{what}: {source}")]
    Socket {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("no running process handed its sockets over within {}s: send it SIGQUIT", ACCEPT_WINDOW.as_secs())]
    NoSender,
    #[error("the new process exited before serving{}", .0.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    SuccessorGone(Option<std::io::Error>),
    #[error("the new process did not report serving within {}s", SERVING_WINDOW.as_secs())]
    NotServing,
    #[error("the list of addresses received is not UTF-8")]
    NotUtf8,
    #[error("received {addresses} addresses but {sockets} sockets")]
    CountMismatch { addresses: usize, sockets: usize },
    #[error("the running process sent a malformed generation {0:?}")]
    MalformedGeneration(String),
    #[error(
        "the running process hands its sockets over with handoff protocol {theirs}, and this \
         build of pingora-lb speaks protocol {}, so it cannot take them over; restart the \
         service to switch to this build (connections open now are closed)",
        PROTOCOL
    )]
    IncompatibleProtocol { theirs: String },
}

/// Old process: sends the listening sockets to the successor listening on `path`, then
/// waits (bounded) until the successor says it serves. Blocking: run it on its own thread.
pub fn hand_over(
    path: &Path,
    sockets: &[(String, RawFd)],
    generation: u64,
) -> Result<(), HandoffError> {
    let mut stream = connect_to_successor(path)?;
    check_successor(&stream, path)?;
    let keys = sockets
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let payload = format!("{VERSION_PREFIX}{PROTOCOL}\n{keys}\n{generation}");
    let fds: Vec<RawFd> = sockets.iter().map(|(_, fd)| *fd).collect();
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(payload.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(HandoffError::Send)?;
    wait_until_serving(&mut stream)
}

/// Connects to `path`, retrying for [CONNECT_WINDOW] while the successor starts.
fn connect_to_successor(path: &Path) -> Result<UnixStream, HandoffError> {
    let deadline = Instant::now() + CONNECT_WINDOW;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(source) if Instant::now() >= deadline => {
                return Err(HandoffError::NoSuccessor {
                    path: path.to_owned(),
                    source,
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Only a successor run by root or by our own user gets the sockets: a process of another
/// user that managed to listen on `path` would otherwise take over the ports.
fn check_successor(stream: &UnixStream, path: &Path) -> Result<(), HandoffError> {
    let peer = getsockopt(stream, PeerCredentials).map_err(HandoffError::Credentials)?;
    if peer.uid() != 0 && Uid::from_raw(peer.uid()) != Uid::effective() {
        return Err(HandoffError::UntrustedSuccessor {
            pid: peer.pid(),
            uid: peer.uid(),
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Waits (at most [SERVING_WINDOW]) for the successor's [SERVING].
fn wait_until_serving(stream: &mut UnixStream) -> Result<(), HandoffError> {
    stream
        .set_read_timeout(Some(SERVING_WINDOW))
        .map_err(|source| HandoffError::Socket {
            what: "upgrade connection",
            source,
        })?;
    let mut reply = [0u8; 1];
    match stream.read(&mut reply) {
        Ok(1) if reply[0] == SERVING => Ok(()),
        Ok(_) => Err(HandoffError::SuccessorGone(None)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(HandoffError::NotServing)
        }
        Err(e) => Err(HandoffError::SuccessorGone(Some(e))),
    }
}

/// New process: the bound `upgrade_sock`, waiting for the old process to connect.
pub struct HandoffSocket {
    listener: UnixListener,
    path: PathBuf,
}

/// Sockets received from the old process, and the line back to it.
pub struct Handoff {
    pub sockets: HashMap<String, OwnedFd>,
    /// Pid of the process that sent them.
    pub from_pid: i32,
    /// Reload generation of the process that sent them.
    pub from_generation: u64,
    connection: UnixStream,
}

impl HandoffSocket {
    /// Binds `path` readable and writable by its owner only, owned by `owner` when given
    /// (the user the old process runs as, so it can connect).
    pub fn bind(path: &Path, owner: Option<(Uid, Gid)>) -> std::io::Result<HandoffSocket> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::other(format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                )));
            }
            std::fs::remove_file(path)?;
        }
        // The socket is created with these permissions, with no moment of wider access.
        let previous = umask(Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        umask(previous);
        let listener = bound?;
        if let Some((uid, gid)) = owner {
            // Not through a link someone swapped in since the bind.
            std::os::unix::fs::lchown(path, Some(uid.as_raw()), Some(gid.as_raw()))?;
        }
        Ok(HandoffSocket {
            listener,
            path: path.to_owned(),
        })
    }

    /// Waits up to [ACCEPT_WINDOW] for the old process and receives its sockets. Only a
    /// peer running as one of `trusted` may hand sockets over.
    pub fn receive(self, trusted: &[Uid]) -> Result<Handoff, HandoffError> {
        let result = self.accept_and_receive(trusted);
        let _ = std::fs::remove_file(&self.path);
        result
    }

    fn accept_and_receive(&self, trusted: &[Uid]) -> Result<Handoff, HandoffError> {
        let connection = self.accept()?;
        let peer = getsockopt(&connection, PeerCredentials).map_err(HandoffError::Credentials)?;
        if !trusted.contains(&Uid::from_raw(peer.uid())) {
            return Err(HandoffError::UntrustedSender {
                pid: peer.pid(),
                uid: peer.uid(),
            });
        }
        let (payload, fds) = receive_message(&connection)?;
        let (sockets, from_generation) = parse_message(&payload, fds)?;
        Ok(Handoff {
            sockets,
            from_pid: peer.pid(),
            from_generation,
            connection,
        })
    }

    /// Waits up to [ACCEPT_WINDOW] for the old process to connect.
    fn accept(&self) -> Result<UnixStream, HandoffError> {
        let socket_error = |what| move |source| HandoffError::Socket { what, source };
        self.listener
            .set_nonblocking(true)
            .map_err(socket_error("upgrade socket"))?;
        let deadline = Instant::now() + ACCEPT_WINDOW;
        let connection = loop {
            match self.listener.accept() {
                Ok((connection, _)) => break connection,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(HandoffError::NoSender);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(socket_error("accepting on the upgrade socket")(e)),
            }
        };
        connection
            .set_nonblocking(false)
            .map_err(socket_error("upgrade connection"))?;
        Ok(connection)
    }
}

/// Reads the one message of the old process: its payload, and the descriptors it carries.
fn receive_message(connection: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), HandoffError> {
    let mut payload = vec![0u8; 4096];
    let mut control = nix::cmsg_space!([RawFd; MAX_SOCKETS]);
    let mut iov = [IoSliceMut::new(&mut payload)];
    let message = recvmsg::<()>(
        connection.as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(HandoffError::Receive)?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs().map_err(HandoffError::Receive)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            fds.extend(received);
        }
    }
    let length = message.bytes;
    let fds = system::adopt_received_descriptors(fds);
    payload.truncate(length);
    Ok((payload, fds))
}

/// Pairs the addresses of the payload with the descriptors, and reads the generation.
fn parse_message(
    payload: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<(HashMap<String, OwnedFd>, u64), HandoffError> {
    let text = std::str::from_utf8(payload).map_err(|_| HandoffError::NotUtf8)?;
    let text = check_version(text)?;
    let (keys, generation) = text.split_once('\n').unwrap_or((text, "0"));
    let keys: Vec<&str> = keys.split(' ').filter(|k| !k.is_empty()).collect();
    if keys.len() != fds.len() {
        return Err(HandoffError::CountMismatch {
            addresses: keys.len(),
            sockets: fds.len(),
        });
    }
    let generation = generation
        .trim()
        .parse()
        .map_err(|_| HandoffError::MalformedGeneration(generation.to_string()))?;
    Ok((
        keys.into_iter().map(String::from).zip(fds).collect(),
        generation,
    ))
}

/// Checks the version line of a message and returns what follows it. An address never
/// starts with [VERSION_PREFIX], so a message without one is version 1.
fn check_version(text: &str) -> Result<&str, HandoffError> {
    let (version, rest) = match text.strip_prefix(VERSION_PREFIX) {
        Some(versioned) => versioned.split_once('\n').unwrap_or((versioned, "")),
        None => ("1", text),
    };
    match version.parse::<u32>() {
        Ok(v) if (OLDEST_ACCEPTED..=PROTOCOL).contains(&v) => Ok(rest),
        _ => Err(HandoffError::IncompatibleProtocol {
            theirs: version.chars().take(32).collect(),
        }),
    }
}

/// Held by a process that took over, to tell the old one to stop.
pub struct Predecessor {
    connection: UnixStream,
    pub pid: i32,
}

impl Handoff {
    /// Splits the received sockets from the line back to the old process.
    pub fn into_parts(self) -> (HashMap<String, OwnedFd>, Predecessor) {
        (
            self.sockets,
            Predecessor {
                connection: self.connection,
                pid: self.from_pid,
            },
        )
    }
}

impl Predecessor {
    /// Tells the old process this one serves, so it stops accepting and drains. Fails if
    /// the old process gave up waiting: it then keeps serving and this one must not.
    pub fn confirm_serving(mut self) -> std::io::Result<()> {
        self.connection.write_all(&[SERVING])?;
        self.connection.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::fs::PermissionsExt;

    fn socket_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("upgrade.sock")
    }

    fn listening_socket() -> (String, OwnedFd) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        (
            listener.local_addr().unwrap().to_string(),
            OwnedFd::from(listener),
        )
    }

    /// Sends `payload` with `fds` as the old process would, without any check of ours.
    fn send_raw(path: &Path, payload: &str, fds: &[RawFd]) -> UnixStream {
        let stream = UnixStream::connect(path).unwrap();
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(payload.as_bytes())],
            &[ControlMessage::ScmRights(fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        stream
    }

    fn ours() -> Vec<Uid> {
        vec![Uid::effective()]
    }

    #[test]
    fn sockets_and_generation_arrive_and_serving_is_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir);
        let socket = HandoffSocket::bind(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (address, fd) = listening_socket();
        let sent = vec![(address.clone(), fd.as_raw_fd())];
        let sender = std::thread::spawn(move || hand_over(&path, &sent, 7));
        let handoff = socket.receive(&ours()).unwrap();
        assert_eq!(handoff.from_generation, 7);
        assert_eq!(handoff.from_pid, std::process::id() as i32);
        let (sockets, predecessor) = handoff.into_parts();
        assert!(sockets.contains_key(&address));
        predecessor.confirm_serving().unwrap();
        sender.join().unwrap().unwrap();
    }

    #[test]
    fn a_peer_of_an_untrusted_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir);
        let socket = HandoffSocket::bind(&path, None).unwrap();
        let (address, fd) = listening_socket();
        let sent = vec![(address, fd.as_raw_fd())];
        let sender = std::thread::spawn(move || hand_over(&path, &sent, 1));
        let stranger = Uid::from_raw(Uid::effective().as_raw().wrapping_add(4242));
        let error = socket.receive(&[stranger]).err().unwrap();
        assert!(
            matches!(error, HandoffError::UntrustedSender { .. }),
            "{error}"
        );
        // The old process learns that its successor went away, and keeps serving.
        let error = sender.join().unwrap().unwrap_err();
        assert!(matches!(error, HandoffError::SuccessorGone(_)), "{error}");
    }

    #[test]
    fn addresses_and_descriptors_must_match() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir);
        let socket = HandoffSocket::bind(&path, None).unwrap();
        let (_, fd) = listening_socket();
        let _sender = send_raw(&path, "127.0.0.1:1 127.0.0.1:2\n1", &[fd.as_raw_fd()]);
        let error = socket.receive(&ours()).err().unwrap();
        assert!(
            matches!(
                error,
                HandoffError::CountMismatch {
                    addresses: 2,
                    sockets: 1
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn a_malformed_generation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir);
        let socket = HandoffSocket::bind(&path, None).unwrap();
        let (address, fd) = listening_socket();
        let _sender = send_raw(&path, &format!("{address}\nseven"), &[fd.as_raw_fd()]);
        let error = socket.receive(&ours()).err().unwrap();
        assert!(
            matches!(&error, HandoffError::MalformedGeneration(g) if g == "seven"),
            "{error}"
        );
    }

    #[test]
    fn the_unversioned_message_of_0_1_0_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir);
        let socket = HandoffSocket::bind(&path, None).unwrap();
        let (address, fd) = listening_socket();
        let _sender = send_raw(&path, &format!("{address}\n3"), &[fd.as_raw_fd()]);
        let handoff = socket.receive(&ours()).unwrap();
        assert_eq!(handoff.from_generation, 3);
        assert!(handoff.sockets.contains_key(&address));
    }

    #[test]
    fn a_protocol_this_build_does_not_speak_is_refused_and_the_old_process_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir);
        let socket = HandoffSocket::bind(&path, None).unwrap();
        let (address, fd) = listening_socket();
        let payload = format!("{VERSION_PREFIX}{}\n{address}\n1", PROTOCOL + 1);
        let sender = std::thread::spawn(move || {
            let mut stream = send_raw(&path, &payload, &[fd.as_raw_fd()]);
            wait_until_serving(&mut stream)
        });
        let error = socket.receive(&ours()).err().unwrap();
        assert!(
            matches!(&error, HandoffError::IncompatibleProtocol { theirs } if *theirs == (PROTOCOL + 1).to_string()),
            "{error}"
        );
        assert!(error.to_string().contains("restart the service"), "{error}");
        let error = sender.join().unwrap().unwrap_err();
        assert!(matches!(error, HandoffError::SuccessorGone(_)), "{error}");
    }

    proptest::proptest! {
        /// The version line decides alone: a message is read past it only when its version
        /// is one this build speaks, and an unversioned message is version 1.
        #[test]
        fn only_spoken_versions_are_read(version in 0u32..8, rest in "[ -~\n]{0,40}") {
            let message = format!("{VERSION_PREFIX}{version}\n{rest}");
            let spoken = (OLDEST_ACCEPTED..=PROTOCOL).contains(&version);
            proptest::prop_assert_eq!(check_version(&message).ok(), spoken.then_some(rest.as_str()));
        }

        #[test]
        fn any_text_is_judged_without_panicking(text in "\\PC{0,60}") {
            let verdict = check_version(&text);
            if !text.starts_with(VERSION_PREFIX) {
                proptest::prop_assert_eq!(verdict.ok(), (OLDEST_ACCEPTED <= 1).then_some(text.as_str()));
            }
        }
    }

    #[test]
    fn a_successor_gone_before_serving_leaves_the_old_process_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir);
        let listener = UnixListener::bind(&path).unwrap();
        let successor = std::thread::spawn(move || {
            // Takes the sockets, then dies without a word.
            let (connection, _) = listener.accept().unwrap();
            let mut buffer = [0u8; 4096];
            let _ = (&connection).read(&mut buffer);
        });
        let (address, fd) = listening_socket();
        let error = hand_over(&path, &[(address, fd.as_raw_fd())], 1).unwrap_err();
        assert!(matches!(error, HandoffError::SuccessorGone(_)), "{error}");
        successor.join().unwrap();
    }
}
