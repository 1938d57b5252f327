//! Test support: ports, real HTTP(S) backends on loopback, a minimal HTTP client, sockets
//! standing in for systemd's notify socket and syslog, and the real `pingora-lb` binary
//! started, checked and reloaded with a given configuration. Every helper more than one
//! test file needs lives here, once.
#![allow(dead_code)]

mod system;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;

pub const BINARY: &str = env!("CARGO_BIN_EXE_pingora-lb");

/// Binds a listener on loopback: the one place every test port comes from (0 lets the
/// kernel pick a free one), so that no two ways of picking ports can collide.
fn bind_loopback(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port))
}

/// A listener on a free loopback port, holding the port while it lives. It listens, so
/// Linux lets no other socket bind the port, SO_REUSEADDR or not (only SO_REUSEPORT set
/// on both sides would share it, and this one does not set it).
pub fn held_port() -> TcpListener {
    bind_loopback(0).unwrap()
}

/// A free TCP port on loopback (bound and released; the kernel does not hand it out again
/// at once).
pub fn free_port() -> u16 {
    held_port().local_addr().unwrap().port()
}

/// A loopback address on a free port, for a balancer to listen on.
pub fn listen_address() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// A free privileged port (below 1024, which the kernel never picks), for the tests that
/// bind one as root before dropping privileges.
pub fn privileged_port() -> u16 {
    (700..1000)
        .find(|port| bind_loopback(*port).is_ok())
        .expect("a free port below 1024")
}

/// The `upstreams:` section for these backend addresses, with no other setting.
pub fn upstreams(addresses: &[SocketAddr]) -> String {
    let mut text = String::from("upstreams:\n");
    for address in addresses {
        text.push_str(&format!("  - address: {address}\n"));
    }
    text
}

/// What a backend saw of one request.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub host: Option<String>,
    pub sni: Option<String>,
    pub path: String,
    /// Every request header, names in lower case.
    pub headers: HashMap<String, String>,
}

/// A real HTTP/1.1 backend on loopback, answering every request with its name. `/slow/MS`
/// waits MS milliseconds first. Optionally TLS.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        Backend::start_with(name, None, held_port())
    }

    pub fn start_tls(name: &str, tls: &TlsMaterial) -> Backend {
        Backend::start_with(name, Some(tls.acceptor()), held_port())
    }

    /// Requests answered so far.
    pub fn served(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// Starts on a given address (to bring a stopped backend back on its port).
    pub fn start_at(name: &str, addr: SocketAddr) -> Backend {
        Backend::start_with(name, None, TcpListener::bind(addr).unwrap())
    }

    fn start_with(
        name: &str,
        tls: Option<openssl::ssl::SslAcceptor>,
        listener: TcpListener,
    ) -> Backend {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = Backend {
            name: name.to_string(),
            addr,
            seen: Default::default(),
            requests: Default::default(),
            stop: Default::default(),
        };
        let (name, seen, requests, stop) = (
            backend.name.clone(),
            backend.seen.clone(),
            backend.requests.clone(),
            backend.stop.clone(),
        );
        let tls = tls.map(Arc::new);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        let (name, seen, requests, stop, tls) = (
                            name.clone(),
                            seen.clone(),
                            requests.clone(),
                            stop.clone(),
                            tls.clone(),
                        );
                        std::thread::spawn(move || {
                            let _ = match tls {
                                None => {
                                    serve_connection(stream, &name, None, &seen, &requests, &stop)
                                }
                                Some(acceptor) => {
                                    let Ok(tls_stream) = acceptor.accept(stream) else {
                                        return;
                                    };
                                    let sni = tls_stream
                                        .ssl()
                                        .servername(openssl::ssl::NameType::HOST_NAME)
                                        .map(String::from);
                                    serve_connection(
                                        tls_stream, &name, sni, &seen, &requests, &stop,
                                    )
                                }
                            };
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        backend
    }

    /// Stops accepting and closes connections as their requests end.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wait until the port is released.
        let deadline = Instant::now() + Duration::from_secs(2);
        while TcpStream::connect(self.addr).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_connection<S: Read + Write>(
    stream: S,
    name: &str,
    sni: Option<String>,
    seen: &Mutex<Vec<Seen>>,
    requests: &AtomicUsize,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                let name = k.trim().to_ascii_lowercase();
                let value = v.trim().to_string();
                // Repeated headers are joined, as a list-valued header reads.
                headers
                    .entry(name)
                    .and_modify(|old: &mut String| {
                        old.push_str(", ");
                        old.push_str(&value)
                    })
                    .or_insert(value);
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        if let Some(ms) = path.strip_prefix("/slow/").and_then(|m| m.parse().ok()) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        requests.fetch_add(1, Ordering::Relaxed);
        seen.lock().unwrap().push(Seen {
            host: headers.get("host").cloned(),
            sni: sni.clone(),
            path: path.clone(),
            headers: headers.clone(),
        });
        let close = stop.load(Ordering::Relaxed)
            || headers
                .get("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let forwarded = headers.get("x-forwarded-for").cloned().unwrap_or_default();
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Backend: {name}\r\nX-Seen-Host: {}\r\nX-Seen-Forwarded-For: {forwarded}\r\n{}\r\n{name}",
            name.len(),
            headers.get("host").map_or("", |h| h.as_str()),
            if close { "Connection: close\r\n" } else { "" },
        );
        reader.get_mut().write_all(response.as_bytes())?;
        reader.get_mut().flush()?;
        if close {
            return Ok(());
        }
    }
}

/// A CA and a certificate for `localhost`-style names, made by the test.
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    cert: openssl::x509::X509,
    key: openssl::pkey::PKey<openssl::pkey::Private>,
}

impl TlsMaterial {
    /// A CA, and a leaf certificate for `dns_name` signed by it.
    pub fn new(dns_name: &str) -> TlsMaterial {
        let ca = TestCa::new();
        let (cert, key) = ca.issue_x509(&[dns_name], 0, 2 * DAY);
        TlsMaterial {
            ca_pem: ca.pem(),
            cert,
            key,
        }
    }

    fn acceptor(&self) -> openssl::ssl::SslAcceptor {
        use openssl::ssl::{SslAcceptor, SslMethod};
        let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        builder.set_private_key(&self.key).unwrap();
        builder.set_certificate(&self.cert).unwrap();
        builder.build()
    }
}

/// Seconds in a day, for certificate validity.
pub const DAY: i64 = 86_400;

/// A certificate authority made by the test, and the certificates it issues.
pub struct TestCa {
    cert: openssl::x509::X509,
    key: openssl::pkey::PKey<openssl::pkey::Private>,
}

fn x509_name(cn: &str) -> openssl::x509::X509Name {
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    name.build()
}

/// `seconds` from now, as a certificate's time.
fn asn1_time(seconds: i64) -> openssl::asn1::Asn1Time {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    openssl::asn1::Asn1Time::from_unix(now + seconds).unwrap()
}

impl TestCa {
    pub fn new() -> TestCa {
        use openssl::bn::BigNum;
        use openssl::hash::MessageDigest;
        use openssl::pkey::PKey;
        use openssl::rsa::Rsa;
        use openssl::x509::extension::{BasicConstraints, KeyUsage};
        use openssl::x509::X509;

        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let mut ca = X509::builder().unwrap();
        ca.set_version(2).unwrap();
        ca.set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap())
            .unwrap();
        ca.set_subject_name(&x509_name("pingora-lb test CA"))
            .unwrap();
        ca.set_issuer_name(&x509_name("pingora-lb test CA"))
            .unwrap();
        ca.set_pubkey(&key).unwrap();
        ca.set_not_before(&asn1_time(-DAY)).unwrap();
        ca.set_not_after(&asn1_time(30 * DAY)).unwrap();
        ca.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        ca.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
        ca.sign(&key, MessageDigest::sha256()).unwrap();
        TestCa {
            cert: ca.build(),
            key,
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> Vec<u8> {
        self.cert.to_pem().unwrap()
    }

    /// A certificate for `names` (the first is its common name) valid from `from` to
    /// `until` seconds from now, and its key.
    pub fn issue_x509(
        &self,
        names: &[&str],
        from: i64,
        until: i64,
    ) -> (
        openssl::x509::X509,
        openssl::pkey::PKey<openssl::pkey::Private>,
    ) {
        use openssl::bn::BigNum;
        use openssl::hash::MessageDigest;
        use openssl::pkey::PKey;
        use openssl::rsa::Rsa;
        use openssl::x509::extension::SubjectAlternativeName;
        use openssl::x509::X509;

        static SERIAL: AtomicUsize = AtomicUsize::new(2);
        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let mut cert = X509::builder().unwrap();
        cert.set_version(2).unwrap();
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed) as u32;
        cert.set_serial_number(&BigNum::from_u32(serial).unwrap().to_asn1_integer().unwrap())
            .unwrap();
        cert.set_subject_name(&x509_name(names[0])).unwrap();
        cert.set_issuer_name(self.cert.subject_name()).unwrap();
        cert.set_pubkey(&key).unwrap();
        cert.set_not_before(&asn1_time(from)).unwrap();
        cert.set_not_after(&asn1_time(until)).unwrap();
        let mut san = SubjectAlternativeName::new();
        for name in names {
            san.dns(name);
        }
        let san = san
            .build(&cert.x509v3_context(Some(&self.cert), None))
            .unwrap();
        cert.append_extension(san).unwrap();
        cert.sign(&self.key, MessageDigest::sha256()).unwrap();
        (cert.build(), key)
    }

    /// Like [Self::issue_x509], written as `NAME.pem` (the chain: leaf and CA) and
    /// `NAME.key` (mode 0600) in `dir`; returns their paths.
    pub fn issue_files(
        &self,
        dir: &Path,
        file_name: &str,
        names: &[&str],
        from: i64,
        until: i64,
    ) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let (cert, key) = self.issue_x509(names, from, until);
        let cert_path = dir.join(format!("{file_name}.pem"));
        let key_path = dir.join(format!("{file_name}.key"));
        std::fs::write(&cert_path, [cert.to_pem().unwrap(), self.pem()].concat()).unwrap();
        std::fs::write(&key_path, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert_path, key_path)
    }
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Response {
    pub fn backend(&self) -> &str {
        self.headers.get("x-backend").map_or("", |s| s.as_str())
    }
}

/// One HTTP/1.1 request on a new connection.
pub fn get(
    addr: SocketAddr,
    path: &str,
    extra_headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut client = Client::over(stream);
    client.request(path, extra_headers, true)
}

/// A keep-alive HTTP/1.1 client connection.
pub struct Client {
    reader: BufReader<TcpStream>,
    pub closed_by_server: bool,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client::over(stream))
    }

    /// The connection, to write raw requests on.
    pub fn into_stream(self) -> TcpStream {
        self.reader.into_inner()
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        Client::over(stream)
    }

    fn over(stream: TcpStream) -> Client {
        Client {
            reader: BufReader::new(stream),
            closed_by_server: false,
        }
    }

    /// A response's status and header fields (names in lower case).
    fn response_head(&mut self) -> std::io::Result<(u16, HashMap<String, String>)> {
        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        Ok((status, headers))
    }

    pub fn request(
        &mut self,
        path: &str,
        extra_headers: &[(&str, &str)],
        close: bool,
    ) -> std::io::Result<Response> {
        let mut request = format!("GET {path} HTTP/1.1\r\n");
        if !extra_headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("host"))
        {
            request.push_str("Host: lb.test\r\n");
        }
        for (k, v) in extra_headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        if close {
            request.push_str("Connection: close\r\n");
        }
        request.push_str("\r\n");
        self.reader.get_mut().write_all(request.as_bytes())?;
        // As browsers and curl do, informational responses (but a 101) are read past.
        let (status, headers) = loop {
            let (status, headers) = self.response_head()?;
            if !(100..200).contains(&status) || status == 101 {
                break (status, headers);
            }
        };
        let body = if let Some(length) = headers.get("content-length").and_then(|l| l.parse().ok())
        {
            let mut body = vec![0; length];
            self.reader.read_exact(&mut body)?;
            body
        } else if headers
            .get("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"))
        {
            let mut body = Vec::new();
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size)?;
                let size = usize::from_str_radix(size.trim(), 16).map_err(std::io::Error::other)?;
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk)?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
            body
        } else {
            let mut body = Vec::new();
            self.reader.read_to_end(&mut body)?;
            body
        };
        if headers
            .get("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
        {
            self.closed_by_server = true;
        }
        Ok(Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// Sends raw bytes on a new connection and reads until the server closes it or stays
/// silent for `quiet`.
pub fn exchange(addr: SocketAddr, request: &[u8], quiet: Duration) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(quiet)).unwrap();
    stream.write_all(request).unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 65536];
    while let Ok(n) = stream.read(&mut buffer) {
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..n]);
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// A backend that accepts and then behaves as `answer` says.
pub fn broken_backend(answer: &'static [u8], reset: bool) -> SocketAddr {
    let listener = held_port();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer);
                if reset {
                    let _ = nix::sys::socket::setsockopt(
                        &stream,
                        nix::sys::socket::sockopt::Linger,
                        &nix::libc::linger {
                            l_onoff: 1,
                            l_linger: 0,
                        },
                    );
                    return;
                }
                let _ = stream.write_all(answer);
                // A silent backend keeps the connection open.
                std::thread::sleep(Duration::from_secs(20));
            });
        }
    });
    addr
}

/// The metrics listener's `/status`, as JSON.
pub fn status(addr: SocketAddr) -> serde_json::Value {
    let response = get(addr, "/status", &[]).unwrap();
    assert_eq!(response.status, 200);
    serde_json::from_str(&response.body).unwrap()
}

/// A Unix datagram socket the test reads what the balancer sends to: it stands in for
/// systemd's NOTIFY_SOCKET and for syslog's /dev/log.
pub struct DatagramSocket {
    pub path: PathBuf,
    socket: UnixDatagram,
    pub messages: Vec<String>,
    /// The directory made for the socket by `in_new_directory`, removed with it.
    directory: Option<tempfile::TempDir>,
}

impl DatagramSocket {
    /// Binds `path`, in a directory of the test's own.
    pub fn bind(path: &Path) -> DatagramSocket {
        let path = path.to_path_buf();
        let socket = UnixDatagram::bind(&path).unwrap();
        // Like systemd's, reachable by a process that dropped to an unprivileged user.
        use std::os::unix::fs::PermissionsExt;
        let dir = path.parent().unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        DatagramSocket {
            path,
            socket,
            messages: Vec::new(),
            directory: None,
        }
    }

    /// Binds a socket in a directory of its own (a stand-in for syslog).
    pub fn in_new_directory() -> DatagramSocket {
        let directory = tempfile::tempdir().unwrap();
        let mut socket = DatagramSocket::bind(&directory.path().join("socket"));
        socket.directory = Some(directory);
        socket
    }

    /// Receives until a message containing `needle` arrives; returns it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        if let Some(m) = self.messages.iter().find(|m| m.contains(needle)) {
            return Some(m.clone());
        }
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            self.socket
                .set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                ))
                .unwrap();
            if let Ok(n) = self.socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.messages.push(message.clone());
                if message.contains(needle) {
                    return Some(message);
                }
            }
        }
        None
    }

    /// As `wait_for`, failing the test with what did arrive when nothing matches.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for(needle, timeout)
            .unwrap_or_else(|| panic!("no {needle:?} within {timeout:?}: {:?}", self.messages))
    }

    /// Everything received within `period`.
    pub fn drain(&mut self, period: Duration) -> Vec<String> {
        self.wait_for("\u{0}never", period);
        self.messages.clone()
    }
}

/// How a run of the binary that ends by itself ended (`-t`, a start that fails, `reload`):
/// its exit code (-1 when a signal ended it), stdout and stderr.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Outcome {
    fn from(output: Output) -> Outcome {
        Outcome {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// Runs `command` to its end with stdout and stderr read from pipes.
pub fn run(command: &mut Command) -> Outcome {
    command.stdin(Stdio::null()).output().unwrap().into()
}

/// Runs `pingora-lb -t -c config`.
pub fn check_config(config: &Path) -> Outcome {
    run(Command::new(BINARY).arg("-t").arg("-c").arg(config))
}

/// Runs `pingora-lb -c config` in the foreground, for a start that must fail: it returns
/// only once the process has exited.
pub fn start_to_end(config: &Path) -> Outcome {
    run(Command::new(BINARY).arg("-c").arg(config))
}

/// Fails unless the command exited with `code` and said `words` on stderr: every failure
/// test checks both the status scripts and systemd see and what the operator reads.
pub fn assert_failed(outcome: &Outcome, code: i32, words: &str) {
    assert_eq!(outcome.code, code, "{outcome:?}");
    assert!(
        outcome.stderr.contains(words),
        "expected {words:?}: {outcome:?}"
    );
}

/// Fails unless `outcome` is a start (or a reload's new process) refused the listener on
/// `address`, which another process holds, the same way whichever of them it was.
pub fn assert_port_taken(outcome: &Outcome, address: SocketAddr) {
    // EX_UNAVAILABLE: the port may be free again later, so systemd may restart.
    assert_failed(
        outcome,
        69,
        &format!("cannot listen on {address} (key `listeners[0]`)"),
    );
    assert!(
        outcome.stderr.contains("another process holds this port"),
        "{outcome:?}"
    );
}

/// The process a successful `pingora-lb reload` says serves now ("... process N serves"),
/// so that every test reads its output the same way.
pub fn reloaded_pid(stdout: &str) -> i32 {
    stdout
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("reload prints the new pid: {stdout:?}"))
}

/// The first line of a JSON access log, once a line with `needle` has been written.
pub fn first_json_log_line(log: &Path, needle: &str) -> serde_json::Value {
    assert!(
        eventually(Duration::from_secs(3), || {
            std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle))
        }),
        "no {needle:?} in {}",
        log.display()
    );
    let text = std::fs::read_to_string(log).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

/// A pingora-lb process started by the test, killed when dropped.
pub struct Lb {
    pub child: Option<Child>,
    pub pid: i32,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub listen: SocketAddr,
    pub notify: DatagramSocket,
    /// Processes that took over by reload, to kill at the end.
    pub successors: Vec<i32>,
}

/// A configuration file in a fresh private directory, with the runtime files inside it.
/// `body` may override any of the defaults set here.
pub fn write_config(dir: &Path, body: &str) -> PathBuf {
    let config = dir.join("pingora-lb.yaml");
    let dir = dir.display();
    let defaults = [
        format!("pid_file: {dir}/run/pingora-lb.pid"),
        format!("upgrade_sock: {dir}/run/upgrade.sock"),
        format!("error_log: {dir}/error.log"),
        "grace_period_seconds: 5".to_string(),
        // The suite runs a second time with the fast path off (tests/run-all.sh).
        match std::env::var_os("PINGORA_LB_TEST_FAST_PATH") {
            Some(v) if v == "off" => "fast_path: false".to_string(),
            _ => String::new(),
        },
        // Tests about privileges set `user`; the others stay who they are.
        if is_root() {
            "user: root".to_string()
        } else {
            String::new()
        },
    ];
    let mut text = String::new();
    for line in defaults.iter().filter(|l| !l.is_empty()) {
        let key = line.split(':').next().unwrap();
        if !body.starts_with(&format!("{key}:")) && !body.contains(&format!("\n{key}:")) {
            text.push_str(line);
            text.push('\n');
        }
    }
    text.push_str(body);
    std::fs::write(&config, text).unwrap();
    config
}

/// A backend named "a" and a balancer in front of it on a free port, with `extra`
/// settings: the set-up most tests start from.
pub fn balancer_with_one_backend(extra: &str) -> (Backend, Lb) {
    let backend = Backend::start("a");
    let lb = Lb::start(
        listen_address(),
        &format!("{}{extra}", upstreams(&[backend.addr])),
    );
    (backend, lb)
}

/// A configuration (as `write_config` makes it) in a new directory of its own, which holds
/// the runtime files too and is removed when the returned handle is dropped.
pub fn config_in_new_directory(body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), body);
    (dir, config)
}

impl Lb {
    /// Starts the binary with `body` appended to the test's runtime settings, and waits
    /// for READY=1 on its notify socket.
    pub fn start(listen: SocketAddr, body: &str) -> Lb {
        Lb::try_start(listen, body).expect("pingora-lb did not become ready")
    }

    pub fn try_start(listen: SocketAddr, body: &str) -> Result<Lb, String> {
        Lb::try_start_with(listen, &format!("listeners: [\"{listen}\"]\n{body}"))
    }

    /// A balancer whose configuration `body` has its own `listeners`, among them the plain
    /// HTTP `listen` that [Lb::get] uses.
    pub fn start_with_listeners(body: &str, listen: SocketAddr) -> Lb {
        Lb::try_start_with(listen, body).expect("pingora-lb did not become ready")
    }

    fn try_start_with(listen: SocketAddr, text: &str) -> Result<Lb, String> {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), text);
        let mut notify = DatagramSocket::bind(&dir.path().join("notify.sock"));
        let child = Command::new(BINARY)
            .arg("-c")
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify.path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let ready = notify.wait_for("READY=1", Duration::from_secs(15));
        let lb = Lb {
            child: Some(child),
            pid,
            dir,
            config,
            listen,
            notify,
            successors: Vec::new(),
        };
        match ready {
            Some(_) => Ok(lb),
            None => Err(format!("no READY=1; error log:\n{}", lb.error_log())),
        }
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Waits up to `timeout` for `needle` in the error log; fails the test with the log
    /// if it does not come.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        assert!(
            eventually(timeout, || self.error_log().contains(needle)),
            "no {needle:?} in the error log:\n{}",
            self.error_log()
        );
    }

    /// Runs `pingora-lb reload` against the current main process. The new process inherits
    /// the command's stdout and stderr, so they go to files rather than pipes read to EOF.
    pub fn reload(&mut self, extra: &[&str]) -> Outcome {
        let out = self.dir.path().join("reload.out");
        let err = self.dir.path().join("reload.err");
        let status = Command::new(BINARY)
            .args(["reload", "-c"])
            .arg(&self.config)
            .args(["--pid", &self.pid.to_string()])
            .args(extra)
            .env("NOTIFY_SOCKET", &self.notify.path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .status()
            .unwrap();
        let outcome = Outcome {
            code: status.code().unwrap_or(-1),
            stdout: std::fs::read_to_string(&out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err).unwrap_or_default(),
        };
        if status.success() {
            let pid = reloaded_pid(&outcome.stdout);
            self.successors.push(pid);
            self.pid = pid;
        }
        outcome
    }

    pub fn get(&self, path: &str) -> std::io::Result<Response> {
        get(self.listen, path, &[])
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        for pid in self.successors.iter().chain(std::iter::once(&self.pid)) {
            kill_now(*pid);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `signal` to `pid`; the test fails if it cannot.
pub fn signal(pid: i32, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .unwrap_or_else(|e| panic!("kill {pid}: {e}"));
}

/// SIGKILL to `pid`, whether or not it still runs: the clean-up after a test.
fn kill_now(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
}

/// Kills a process the test did not start itself (a reload's successor) when dropped, so
/// that a failing test leaves nothing running.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill_now(self.0);
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Fails a test about privileges when the suite does not run as root.
pub fn require_root() {
    assert!(
        is_root(),
        "privilege tests run as root (CI runs the suite as root)"
    );
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// Waits until `condition` holds, up to `timeout`.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    condition()
}

/// Records every entry created, written, renamed or removed in a directory from its
/// creation on: a process that wrote a file and removed it again before it exited (as the
/// pid file is at a clean exit) leaves no trace for a look at the directory afterwards.
pub struct DirectoryWatch {
    events: std::fs::File,
}

impl DirectoryWatch {
    pub fn new(dir: &Path) -> DirectoryWatch {
        use nix::libc;
        // Not IN_CLOSE_WRITE: a process spawned by another test thread while the test was
        // writing its configuration holds a copy of that descriptor until its exec closes
        // it, which reports a close-after-write on the configuration file long after the
        // test wrote it. A real write shows as IN_MODIFY (opening with O_TRUNC included).
        let changes = libc::IN_CREATE
            | libc::IN_MODIFY
            | libc::IN_DELETE
            | libc::IN_MOVED_FROM
            | libc::IN_MOVED_TO;
        let events = system::watch_directory(dir, changes)
            .unwrap_or_else(|e| panic!("inotify on {dir:?}: {e}"));
        DirectoryWatch { events }
    }

    /// What changed so far, one "name (event mask)" an event; empty when nothing did.
    pub fn changes(&self) -> Vec<String> {
        let header = std::mem::size_of::<nix::libc::inotify_event>();
        let mut events = &self.events;
        let mut changes = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match events.read(&mut buffer) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return changes,
                Err(e) => panic!("inotify: {e}"),
            };
            let mut at = 0;
            while at + header <= n {
                let field = |offset: usize| {
                    u32::from_ne_bytes(buffer[at + offset..at + offset + 4].try_into().unwrap())
                };
                let (mask, length) = (field(4), field(12) as usize);
                let name = &buffer[at + header..at + header + length];
                let name = name.split(|b| *b == 0).next().unwrap_or_default();
                changes.push(format!("{} ({mask:#x})", String::from_utf8_lossy(name)));
                at += header + length;
            }
        }
    }
}
