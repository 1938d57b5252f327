//! Test support: real HTTP(S) backends on loopback, a minimal HTTP client, a systemd-style
//! notify socket, and the real `pingora-lb` binary started with a given configuration.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BINARY: &str = env!("CARGO_BIN_EXE_pingora-lb");

/// A free TCP port on loopback (bound and released; the kernel does not hand it out again
/// at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
        Backend::start_with(name, None, "127.0.0.1:0".parse().unwrap())
    }

    pub fn start_tls(name: &str, tls: &TlsMaterial) -> Backend {
        Backend::start_with(name, Some(tls.acceptor()), "127.0.0.1:0".parse().unwrap())
    }

    /// Starts on a given address (to bring a stopped backend back on its port).
    pub fn start_at(name: &str, addr: SocketAddr) -> Backend {
        Backend::start_with(name, None, addr)
    }

    fn start_with(name: &str, tls: Option<openssl::ssl::SslAcceptor>, addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).unwrap();
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
        use openssl::asn1::Asn1Time;
        use openssl::bn::BigNum;
        use openssl::hash::MessageDigest;
        use openssl::pkey::PKey;
        use openssl::rsa::Rsa;
        use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
        use openssl::x509::{X509NameBuilder, X509};

        let name = |cn: &str| {
            let mut n = X509NameBuilder::new().unwrap();
            n.append_entry_by_text("CN", cn).unwrap();
            n.build()
        };
        let ca_key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let mut ca = X509::builder().unwrap();
        ca.set_version(2).unwrap();
        ca.set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap())
            .unwrap();
        ca.set_subject_name(&name("pingora-lb test CA")).unwrap();
        ca.set_issuer_name(&name("pingora-lb test CA")).unwrap();
        ca.set_pubkey(&ca_key).unwrap();
        ca.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        ca.set_not_after(&Asn1Time::days_from_now(2).unwrap())
            .unwrap();
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
        ca.sign(&ca_key, MessageDigest::sha256()).unwrap();
        let ca = ca.build();

        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let mut cert = X509::builder().unwrap();
        cert.set_version(2).unwrap();
        cert.set_serial_number(&BigNum::from_u32(2).unwrap().to_asn1_integer().unwrap())
            .unwrap();
        cert.set_subject_name(&name(dns_name)).unwrap();
        cert.set_issuer_name(ca.subject_name()).unwrap();
        cert.set_pubkey(&key).unwrap();
        cert.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        cert.set_not_after(&Asn1Time::days_from_now(2).unwrap())
            .unwrap();
        let san = SubjectAlternativeName::new()
            .dns(dns_name)
            .build(&cert.x509v3_context(Some(&ca), None))
            .unwrap();
        cert.append_extension(san).unwrap();
        cert.sign(&ca_key, MessageDigest::sha256()).unwrap();
        TlsMaterial {
            ca_pem: ca.to_pem().unwrap(),
            cert: cert.build(),
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

    pub fn request(
        &mut self,
        path: &str,
        extra_headers: &[(&str, &str)],
        close: bool,
    ) -> std::io::Result<Response> {
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: lb.test\r\n");
        for (k, v) in extra_headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        if close {
            request.push_str("Connection: close\r\n");
        }
        request.push_str("\r\n");
        self.reader.get_mut().write_all(request.as_bytes())?;
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

/// A socket standing in for systemd's NOTIFY_SOCKET.
pub struct NotifySocket {
    pub path: PathBuf,
    socket: UnixDatagram,
    pub messages: Vec<String>,
}

impl NotifySocket {
    pub fn new(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        // Like systemd's, reachable by a process that dropped to an unprivileged user.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        NotifySocket {
            path,
            socket,
            messages: Vec::new(),
        }
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

    /// Everything received within `period`.
    pub fn drain(&mut self, period: Duration) -> Vec<String> {
        self.wait_for("\u{0}never", period);
        self.messages.clone()
    }
}

/// What `pingora-lb reload` did.
#[derive(Debug)]
pub struct ReloadOutcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A pingora-lb process started by the test, killed when dropped.
pub struct Lb {
    pub child: Option<Child>,
    pub pid: i32,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub listen: SocketAddr,
    pub notify: NotifySocket,
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

impl Lb {
    /// Starts the binary with `body` appended to the test's runtime settings, and waits
    /// for READY=1 on its notify socket.
    pub fn start(listen: SocketAddr, body: &str) -> Lb {
        Lb::try_start(listen, body).expect("pingora-lb did not become ready")
    }

    pub fn try_start(listen: SocketAddr, body: &str) -> Result<Lb, String> {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &format!("listeners: [\"{listen}\"]\n{body}"));
        let mut notify = NotifySocket::new(dir.path());
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

    /// Runs `pingora-lb reload` against the current main process. The new process inherits
    /// the command's stdout and stderr, so they go to files rather than pipes read to EOF.
    pub fn reload(&mut self, extra: &[&str]) -> ReloadOutcome {
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
        let outcome = ReloadOutcome {
            code: status.code().unwrap_or(-1),
            stdout: std::fs::read_to_string(&out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err).unwrap_or_default(),
        };
        if status.success() {
            let pid: i32 = outcome
                .stdout
                .split_whitespace()
                .find_map(|w| w.parse().ok())
                .expect("reload prints the new pid");
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
            unsafe { nix::libc::kill(*pid, nix::libc::SIGKILL) };
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `pingora-lb -t -c config`: its exit status and stderr.
pub fn check_config(config: &Path) -> (Option<i32>, String) {
    let output = Command::new(BINARY)
        .arg("-t")
        .arg("-c")
        .arg(config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr)
}

pub fn is_root() -> bool {
    unsafe { nix::libc::geteuid() == 0 }
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
