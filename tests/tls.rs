//! The edge: HTTPS termination with real clients (curl and `openssl s_client`) against
//! certificates a test CA issues, chosen by SNI; HTTP/2 by ALPN; forwarding headers that
//! say https; the configuration check of certificates; a certificate replaced by a reload;
//! and WebSockets passed through.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

/// A directory with the CA and the certificates of `a.test`, `*.b.test` and the default
/// `default.test`.
struct Certificates {
    dir: tempfile::TempDir,
    ca: TestCa,
}

impl Certificates {
    fn new() -> Certificates {
        let certificates = Certificates {
            dir: tempfile::tempdir().unwrap(),
            ca: TestCa::new(),
        };
        std::fs::write(certificates.ca_file(), certificates.ca.pem()).unwrap();
        for (file, names) in [
            ("default", &["default.test"][..]),
            ("a", &["a.test"]),
            ("b", &["*.b.test"]),
        ] {
            certificates.issue(file, names, 30 * DAY);
        }
        certificates
    }

    fn issue(&self, file: &str, names: &[&str], until: i64) -> (PathBuf, PathBuf) {
        self.ca
            .issue_files(self.dir.path(), file, names, -DAY, until)
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn entry(&self, file: &str) -> String {
        let dir = self.dir.path().display();
        format!("{{cert: {dir}/{file}.pem, key: {dir}/{file}.key}}")
    }

    /// A TLS listener on `address` with the three certificates, the default first.
    fn listener(&self, address: SocketAddr) -> String {
        format!(
            "  - address: \"{address}\"\n    tls:\n      certificates: [{}, {}, {}]\n",
            self.entry("default"),
            self.entry("a"),
            self.entry("b")
        )
    }
}

/// A balancer with a plain listener and a TLS one in front of `backend`; the TLS address.
fn https_balancer(certificates: &Certificates, backend: &Backend, extra: &str) -> (Lb, SocketAddr) {
    let tls = listen_address();
    let plain = listen_address();
    let body = format!(
        "listeners:\n  - \"{plain}\"\n{}{}health_check: {{kind: none}}\nforwarding: {{x_forwarded: true, forwarded: true}}\n{extra}",
        certificates.listener(tls),
        upstreams(&[backend.addr])
    );
    let lb = Lb::start_with_listeners(&body, plain);
    (lb, tls)
}

/// curl over HTTPS to `name` (resolved to `address`), verifying against the test CA.
fn curl(
    certificates: &Certificates,
    address: SocketAddr,
    name: &str,
    args: &[&str],
) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(certificates.ca_file())
        .arg("--resolve")
        .arg(format!("{name}:{}:{}", address.port(), address.ip()))
        .args(args)
        .arg(format!("https://{name}:{}/", address.port()))
        .output()
        .unwrap()
}

/// The subject of the certificate `openssl s_client` is served for `server_name` (none:
/// no SNI), and what it printed.
fn served_subject(address: SocketAddr, server_name: Option<&str>, extra: &[&str]) -> String {
    let mut command = Command::new("openssl");
    command
        .args(["s_client", "-connect", &address.to_string()])
        .args(extra);
    match server_name {
        Some(name) => command.args(["-servername", name]),
        None => command.arg("-noservername"),
    };
    let output = command.stdin(std::process::Stdio::null()).output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn each_name_gets_its_certificate_and_old_protocols_are_refused() {
    let certificates = Certificates::new();
    let backend = Backend::start("a");
    let (_lb, tls) = https_balancer(&certificates, &backend, "");
    for name in ["a.test", "x.b.test", "default.test"] {
        let output = curl(&certificates, tls, name, &["-w", "%{http_code}"]);
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "a200",
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Without SNI, or with a name no certificate has: the first certificate.
    assert!(served_subject(tls, None, &[]).contains("CN = default.test"));
    assert!(served_subject(tls, Some("unknown.test"), &[]).contains("CN = default.test"));
    assert!(served_subject(tls, Some("a.test"), &[]).contains("CN = a.test"));
    // A wildcard covers one label only.
    assert!(served_subject(tls, Some("x.y.b.test"), &[]).contains("CN = default.test"));
    let tls12 = served_subject(tls, Some("a.test"), &["-tls1_2"]);
    assert!(
        tls12.contains("Protocol: TLSv1.2") || tls12.contains("TLSv1.2"),
        "{tls12}"
    );
    for old in ["-tls1", "-tls1_1"] {
        let output = served_subject(tls, Some("a.test"), &[old, "-cipher", "DEFAULT@SECLEVEL=0"]);
        assert!(
            !output.contains("CN = a.test") && output.contains("alert protocol version"),
            "{old}: {output}"
        );
    }
}

#[test]
fn http2_multiplexes_and_backends_hear_https() {
    let certificates = Certificates::new();
    let backend = Backend::start("a");
    let (_lb, tls) = https_balancer(&certificates, &backend, "");
    let port = tls.port();
    let urls: Vec<String> = (0..5)
        .map(|i| format!("https://a.test:{port}/{i}"))
        .collect();
    let output = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--http2",
            "--parallel",
            "--cacert",
        ])
        .arg(certificates.ca_file())
        .arg("--resolve")
        .arg(format!("a.test:{port}:{}", tls.ip()))
        .args(["-w", "%{http_version} %{num_connects}\\n"])
        .args(
            urls.iter()
                .flat_map(|url| ["-o", "/dev/null", url.as_str()]),
        )
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(
        lines.len(),
        5,
        "{report} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(lines.iter().all(|l| l.starts_with("2 ")), "{report}");
    let connections: usize = lines
        .iter()
        .map(|l| l.split(' ').nth(1).unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(connections, 1, "five streams on one connection: {report}");
    let seen = backend.seen.lock().unwrap().last().unwrap().headers.clone();
    assert_eq!(
        seen.get("x-forwarded-proto").map(String::as_str),
        Some("https")
    );
    assert!(
        seen.get("forwarded")
            .is_some_and(|f| f.contains("proto=https")),
        "{seen:?}"
    );
}

/// `-t` on a configuration with this TLS listener entry.
fn check_tls(certificates: &Certificates, certificate: &str) -> Outcome {
    let dir = certificates.dir.path();
    let config = dir.join("check.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:\n  - address: \"127.0.0.1:1\"\n    tls:\n      certificates:\n        - {certificate}\nupstreams: [{{address: \"127.0.0.1:2\"}}]\n"
        ),
    )
    .unwrap();
    check_config(&config)
}

#[test]
fn bad_certificates_are_configuration_errors_naming_the_file() {
    let certificates = Certificates::new();
    let dir = certificates.dir.path();
    certificates.issue("expired", &["old.test"], -DAY / 2);
    // Four days and 23 hours left.
    certificates.issue("soon", &["soon.test"], 5 * DAY - 3600);
    std::fs::write(dir.join("garbage.pem"), "not a certificate\n").unwrap();
    let path = |name: &str| dir.join(name).display().to_string();
    let entry = |cert: &str, key: &str| format!("{{cert: {}, key: {}}}", path(cert), path(key));
    let table = [
        (
            entry("missing.pem", "a.key"),
            format!("cannot read {}", path("missing.pem")),
        ),
        (
            entry("a.pem", "missing.key"),
            format!("cannot read {}", path("missing.key")),
        ),
        (
            entry("garbage.pem", "a.key"),
            format!("{} holds no PEM certificate", path("garbage.pem")),
        ),
        (
            entry("a.pem", "garbage.pem"),
            format!("{} holds no PEM private key", path("garbage.pem")),
        ),
        (
            entry("a.pem", "b.key"),
            format!(
                "the key in {} is not the key of the certificate in {}",
                path("b.key"),
                path("a.pem")
            ),
        ),
        (
            entry("expired.pem", "expired.key"),
            format!("the certificate in {} expired", path("expired.pem")),
        ),
    ];
    for (certificate, words) in table {
        let outcome = check_tls(&certificates, &certificate);
        assert_failed(&outcome, 78, &words);
        assert!(
            outcome
                .stderr
                .contains("key `listeners[0].tls.certificates[0]`"),
            "{outcome:?}"
        );
    }
    let outcome = check_tls(&certificates, &entry("soon.pem", "soon.key"));
    assert_eq!(outcome.code, 0, "{outcome:?}");
    assert!(
        outcome.stderr.contains(&format!(
            "warning: the certificate in {} expires in 4 days",
            path("soon.pem")
        )),
        "{outcome:?}"
    );
}

#[test]
fn a_reload_serves_a_renewed_certificate_without_a_failed_request() {
    let certificates = Certificates::new();
    let backend = Backend::start("a");
    let (mut lb, tls) = https_balancer(&certificates, &backend, "");
    assert!(served_subject(tls, Some("a.test"), &[]).contains("CN = a.test"));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let ca_file = certificates.ca_file();
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let output = Command::new("curl")
                    .args(["-sS", "--max-time", "10", "--cacert"])
                    .arg(&ca_file)
                    .arg("--resolve")
                    .arg(format!("a.test:{}:{}", tls.port(), tls.ip()))
                    .arg(format!("https://a.test:{}/", tls.port()))
                    .output()
                    .unwrap();
                let counter = if output.stdout == b"a" { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // certbot's deploy hook: new files in place, then a reload.
    certificates.issue("a", &["a.test", "renewed.a.test"], 60 * DAY);
    assert_eq!(lb.reload(&[]).code, 0, "{}", lb.error_log());
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} failed of {}", ok + failed);
    assert!(ok > 5, "too little load: {ok}");
    // The old process keeps accepting for the first second of its drain (LIFECYCLE.md).
    let mut subject = String::new();
    let renewed = eventually(Duration::from_secs(5), || {
        subject = served_subject(tls, Some("renewed.a.test"), &[]);
        subject.contains("CN = a.test")
    });
    assert!(renewed, "{subject}");
    assert!(Path::new(&certificates.ca_file()).exists());
}

/// A WebSocket server that echoes every frame: RFC 6455's handshake, then unmasked
/// copies of the client's masked frames.
fn websocket_echo_backend() -> SocketAddr {
    let listener = held_port();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut key = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("sec-websocket-key") {
                            key = value.trim().to_string();
                        }
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let accept = openssl::base64::encode_block(&openssl::sha::sha1(
                    format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
                ));
                let response = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                );
                let _ = reader.get_mut().write_all(response.as_bytes());
                loop {
                    let mut head = [0u8; 2];
                    if reader.read_exact(&mut head).is_err() {
                        return;
                    }
                    let length = usize::from(head[1] & 0x7f);
                    let mut mask = [0u8; 4];
                    let mut payload = vec![0u8; length];
                    if reader.read_exact(&mut mask).is_err()
                        || reader.read_exact(&mut payload).is_err()
                    {
                        return;
                    }
                    for (i, byte) in payload.iter_mut().enumerate() {
                        *byte ^= mask[i % 4];
                    }
                    let mut frame = vec![head[0], length as u8];
                    frame.extend_from_slice(&payload);
                    let _ = reader.get_mut().write_all(&frame);
                }
            });
        }
    });
    addr
}

/// Opens a WebSocket to the echo backend through `lb`; the connection after the handshake.
fn open_websocket(lb: SocketAddr) -> BufReader<TcpStream> {
    let stream = TcpStream::connect(lb).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    reader
        .get_mut()
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let mut accept = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line
            .to_ascii_lowercase()
            .starts_with("sec-websocket-accept:")
        {
            accept = line.clone();
        }
        if line == "\r\n" {
            break;
        }
    }
    assert!(accept.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{accept}");
    reader
}

/// Sends `message` as a masked text frame and reads the echo; `None` if the connection
/// is gone.
fn echo(socket: &mut BufReader<TcpStream>, message: &str) -> Option<String> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | message.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(message.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    socket.get_mut().write_all(&frame).ok()?;
    let mut head = [0u8; 2];
    socket.read_exact(&mut head).ok()?;
    let mut payload = vec![0u8; usize::from(head[1])];
    socket.read_exact(&mut payload).ok()?;
    assert_eq!(head[0], 0x81);
    String::from_utf8(payload).ok()
}

#[test]
fn websockets_pass_through_with_their_own_idle_timeout() {
    let backend = websocket_echo_backend();
    // A read timeout far shorter than the tunnel's, which must not cut an idle WebSocket.
    let lb = Lb::start(
        listen_address(),
        &format!(
            "{}health_check: {{kind: none}}\ntimeouts: {{read: 300ms}}\nclient: {{tunnel_timeout: 2s}}\n",
            upstreams(&[backend])
        ),
    );
    let mut socket = open_websocket(lb.listen);
    for message in ["hello", "through pingora-lb"] {
        assert_eq!(echo(&mut socket, message).as_deref(), Some(message));
    }
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        echo(&mut socket, "after a second").as_deref(),
        Some("after a second")
    );
    // Idle past the tunnel timeout: the balancer closes it.
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(echo(&mut socket, "too late"), None);
}

/// The value of a sample of `/metrics` whose line starts with `prefix`.
fn sample(metrics: SocketAddr, prefix: &str) -> Option<f64> {
    let page = get(metrics, "/metrics", &[]).unwrap().body;
    page.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[test]
fn handshakes_follow_a_proxy_header_are_counted_and_logged_with_version_cipher_and_name() {
    let certificates = Certificates::new();
    let backend = Backend::start("a");
    let (metrics, logs) = (listen_address(), tempfile::tempdir().unwrap());
    let log = logs.path().join("access.log");
    let tls_address = listen_address();
    let extra = format!(
        "metrics: {{listen: \"{metrics}\"}}\naccess_log: {{destination: {}, format: json}}\n\
         proxy_protocol: {{from: [127.0.0.1/32], listeners: [\"{tls_address}\"]}}\n\
         client: {{header_timeout: 1s}}\n",
        log.display()
    );
    let body = format!(
        "listeners:\n{}{}health_check: {{kind: none}}\n{extra}",
        certificates.listener(tls_address),
        upstreams(&[backend.addr])
    );
    let lb = Lb::start_with_listeners(&body, tls_address);
    let proxy_header = format!(
        "PROXY TCP4 203.0.113.9 {} 4444 {}\r\n",
        tls_address.ip(),
        tls_address.port()
    );

    // A PROXY header, then TLS with SNI, as a balancer in front would send them.
    let mut tcp = TcpStream::connect(tls_address).unwrap();
    tcp.write_all(proxy_header.as_bytes()).unwrap();
    let mut connector =
        openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
    connector.set_ca_file(certificates.ca_file()).unwrap();
    let mut tls = connector.build().connect("a.test", tcp).unwrap();
    tls.write_all(b"GET /over-tls HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Plain HTTP to the TLS port; then a PROXY header and silence until the deadline.
    let garbage = exchange(
        tls_address,
        format!("{proxy_header}GET / HTTP/1.1\r\n\r\n").as_bytes(),
        Duration::from_secs(2),
    );
    assert!(!garbage.contains("200"), "{garbage}");
    let silent = exchange(tls_address, proxy_header.as_bytes(), Duration::from_secs(3));
    assert_eq!(silent, "", "closed without a word after the deadline");

    let listener = format!("pingora_lb_tls_handshakes_total{{listener=\"{tls_address}\",");
    for (result, count) in [("done", 1.0), ("failed", 1.0), ("timeout", 1.0)] {
        assert_eq!(
            sample(metrics, &format!("{listener}result=\"{result}\"}}")),
            Some(count),
            "{result}"
        );
    }
    let line = first_json_log_line(&log, "/over-tls");
    assert_eq!(line["client"], "203.0.113.9");
    assert_eq!(line["tls_version"], "TLSv1.3");
    assert_eq!(line["sni"], "a.test");
    assert!(
        line["tls_cipher"]
            .as_str()
            .is_some_and(|c| c.starts_with("TLS_")),
        "{line}"
    );
    drop(lb);
}

#[test]
fn plain_http_is_redirected_to_https_except_acme_challenges() {
    let certificates = Certificates::new();
    let backend = Backend::start("a");
    let (tls, plain) = (listen_address(), listen_address());
    let body = format!(
        "listeners:\n  - {{address: \"{plain}\", redirect_to_https: true}}\n{}{}health_check: {{kind: none}}\n",
        certificates.listener(tls),
        upstreams(&[backend.addr])
    );
    let lb = Lb::start_with_listeners(&body, plain);
    let port = tls.port();

    let get = lb.get("/x/y?z=1").unwrap();
    assert_eq!(get.status, 301, "{get:?}");
    assert_eq!(
        get.headers["location"],
        format!("https://lb.test:{port}/x/y?z=1")
    );
    let post = exchange(
        plain,
        b"POST /form HTTP/1.1\r\nHost: A.test:80\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        Duration::from_secs(2),
    );
    assert!(post.starts_with("HTTP/1.1 308"), "{post}");
    assert!(
        post.contains(&format!("\r\nlocation: https://a.test:{port}/form\r\n"))
            || post.contains(&format!("\r\nLocation: https://a.test:{port}/form\r\n")),
        "{post}"
    );
    let no_host = exchange(plain, b"GET / HTTP/1.0\r\n\r\n", Duration::from_secs(2));
    assert!(no_host.starts_with("HTTP/1.1 400"), "{no_host}");
    let before = backend.served();
    let challenge = lb.get("/.well-known/acme-challenge/token").unwrap();
    assert_eq!((challenge.status, challenge.backend()), (200, "a"));
    assert_eq!(backend.served(), before + 1);

    let redirecting_tls = lb.config.with_file_name("redirecting-tls.yaml");
    std::fs::write(
        &redirecting_tls,
        std::fs::read_to_string(&lb.config).unwrap().replace(
            &format!("  - address: \"{tls}\"\n"),
            &format!("  - redirect_to_https: true\n    address: \"{tls}\"\n"),
        ),
    )
    .unwrap();
    assert_failed(
        &check_config(&redirecting_tls),
        78,
        "key `listeners[1].redirect_to_https`: this listener serves HTTPS already",
    );

    // A client that follows it lands on HTTPS.
    let followed = Command::new("curl")
        .args([
            "-sS",
            "-L",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{url_effective} %{http_code}",
            "--cacert",
        ])
        .arg(certificates.ca_file())
        .arg("--resolve")
        .arg(format!("a.test:{port}:{}", tls.ip()))
        .arg("--resolve")
        .arg(format!("a.test:{}:{}", plain.port(), plain.ip()))
        .arg(format!("http://a.test:{}/page", plain.port()))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&followed.stdout),
        format!("https://a.test:{port}/page 200"),
        "{}",
        String::from_utf8_lossy(&followed.stderr)
    );
}
