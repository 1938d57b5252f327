//! HAProxy's PROXY protocol on real sockets: read from trusted load balancers only (the
//! client address then comes from it), and sent to backends that ask for it.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

/// A balancer accepting PROXY headers `from` these sources, with its access log in a file.
fn accepting(from: &str, backend: &Backend) -> (Lb, tempfile::TempDir) {
    let logs = tempfile::tempdir().unwrap();
    let lb = Lb::start(
        listen_address(),
        &format!(
            "{}health_check: {{kind: none}}\nforwarding: {{x_forwarded: true}}\nproxy_protocol:\n  from: [\"{from}\"]\naccess_log: {{destination: {}/access.log}}\n",
            upstreams(&[backend.addr]),
            logs.path().display()
        ),
    );
    (lb, logs)
}

fn request_after(header: &[u8]) -> Vec<u8> {
    [
        header,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    ]
    .concat()
}

/// The v2 header for an IPv4 client, written out byte by byte as the specification draws it.
fn v2_header(source: [u8; 4], source_port: u16, destination: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(destination) = destination else {
        panic!("IPv4 only")
    };
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    header.extend_from_slice(&source);
    header.extend_from_slice(&destination.ip().octets());
    header.extend_from_slice(&source_port.to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header
}

#[test]
fn a_trusted_balancer_names_the_client_in_v1_or_v2() {
    let backend = Backend::start("a");
    let (lb, logs) = accepting("127.0.0.0/8", &backend);
    let quiet = Duration::from_secs(3);
    let v1 = format!(
        "PROXY TCP4 203.0.113.7 {} 5555 {}\r\n",
        lb.listen.ip(),
        lb.listen.port()
    );
    let answer = exchange(lb.listen, &request_after(v1.as_bytes()), quiet);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("X-Seen-Forwarded-For: 203.0.113.7\r\n"),
        "{answer}"
    );
    let v2 = v2_header([198, 51, 100, 9], 4444, lb.listen);
    let answer = exchange(lb.listen, &request_after(&v2), quiet);
    assert!(
        answer.contains("X-Seen-Forwarded-For: 198.51.100.9\r\n"),
        "{answer}"
    );
    // The access log names the clients the headers named.
    let log = logs.path().join("access.log");
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(3), || logged()
            .contains("\n198.51.100.9 - - [")
            && logged().starts_with("203.0.113.7 - - [")),
        "{}",
        logged()
    );
    // A trusted source must send the header: without it nothing is served.
    let before = backend.served();
    let answer = exchange(lb.listen, &request_after(b""), quiet);
    assert_eq!(answer, "", "served without a header");
    assert_eq!(backend.served(), before);
    lb.wait_for_log("no PROXY protocol header", Duration::from_secs(2));
}

#[test]
fn an_untrusted_sender_cannot_pose_as_another_client() {
    let backend = Backend::start("a");
    let (lb, _logs) = accepting("10.0.0.0/8", &backend);
    let v1 = format!(
        "PROXY TCP4 203.0.113.7 {} 5555 {}\r\n",
        lb.listen.ip(),
        lb.listen.port()
    );
    let answer = exchange(
        lb.listen,
        &request_after(v1.as_bytes()),
        Duration::from_secs(3),
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let v2 = v2_header([198, 51, 100, 9], 4444, lb.listen);
    let answer = exchange(lb.listen, &request_after(&v2), Duration::from_secs(3));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(backend.served(), 0);
    // Its own requests are served as its own.
    let answer = exchange(lb.listen, &request_after(b""), Duration::from_secs(3));
    assert!(
        answer.contains("X-Seen-Forwarded-For: 127.0.0.1\r\n"),
        "{answer}"
    );
}

/// A backend that, like nginx with `proxy_protocol`, reads a PROXY header first on every
/// connection, records it, then answers each request 200.
fn header_reading_backend() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = held_port();
    let addr = listener.local_addr().unwrap();
    let headers = Arc::new(Mutex::new(Vec::new()));
    let seen = headers.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut header = vec![0u8; 16];
                if reader.read_exact(&mut header[..6]).is_err() {
                    return;
                }
                if header.starts_with(b"PROXY ") {
                    header.truncate(6);
                    let mut rest = Vec::new();
                    let _ = reader.read_until(b'\n', &mut rest);
                    header.extend_from_slice(&rest);
                } else {
                    let _ = reader.read_exact(&mut header[6..]);
                    let mut body =
                        vec![0u8; usize::from(u16::from_be_bytes([header[14], header[15]]))];
                    let _ = reader.read_exact(&mut body);
                    header.extend_from_slice(&body);
                }
                seen.lock().unwrap().push(header);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        let _ = reader
                            .get_mut()
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                    }
                }
            });
        }
    });
    (addr, headers)
}

#[test]
fn backends_that_ask_for_it_get_the_client_in_a_header() {
    for version in ["v1", "v2"] {
        let (backend, headers) = header_reading_backend();
        let lb = Lb::start(
            listen_address(),
            &format!(
                "{}health_check: {{kind: tcp}}\nsend_proxy_protocol: {version}\n",
                upstreams(&[backend])
            ),
        );
        let client = TcpStream::connect(lb.listen).unwrap();
        let client_port = client.local_addr().unwrap().port();
        let mut client = Client::from_stream(client);
        assert_eq!(client.request("/", &[], false).unwrap().status, 200);
        let headers = headers.lock().unwrap().clone();
        let expected = match version {
            "v1" => format!(
                "PROXY TCP4 127.0.0.1 {} {client_port} {}\r\n",
                lb.listen.ip(),
                lb.listen.port()
            )
            .into_bytes(),
            _ => v2_header([127, 0, 0, 1], client_port, lb.listen),
        };
        assert!(headers.contains(&expected), "{version}: {headers:?}");
        // The health checks' own connections say they are the balancer's (LOCAL, UNKNOWN).
        let local: &[u8] = match version {
            "v1" => b"PROXY UNKNOWN\r\n",
            _ => b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00",
        };
        assert!(headers.iter().any(|h| h == local), "{version}: {headers:?}");
    }
}
