//! The fast path against pingora-proxy: generated requests (valid, odd and hostile) go
//! through a balancer with the fast path on and one with it off, each in front of its
//! own recording backend, and what each backend receives and what each client receives
//! must be the same. A difference is a failure unless it is one of the deliberate ones
//! `normalise` names.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use support::*;

/// One request as a backend received it: request line, header fields (names lower-cased,
/// framing fields left out, sorted by name) and decoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Received {
    line: String,
    fields: Vec<(String, String)>,
    body: Vec<u8>,
}

/// A backend that records every request and answers as its path says: `/chunked`,
/// `/close` (no length, closes), `/nocontent` (204), `/early` (103 then 200), else with a
/// `Content-Length`.
struct RecordingBackend {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl RecordingBackend {
    fn start() -> RecordingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || serve_recorded(stream, &log));
            }
        });
        RecordingBackend { addr, received }
    }

    fn take(&self) -> Vec<Received> {
        std::mem::take(&mut *self.received.lock().unwrap())
    }
}

/// Reads from `stream` until `buf` holds `want` bytes; false at end of stream.
fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, want: usize) -> bool {
    let mut chunk = [0u8; 8192];
    while buf.len() < want {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf[from..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

/// Reads until a line starting at `at` is complete; where its CRLF is.
fn read_line(stream: &mut TcpStream, buf: &mut Vec<u8>, at: usize) -> Option<usize> {
    loop {
        if let Some(end) = line_end(buf, at) {
            return Some(end);
        }
        let have = buf.len();
        if !fill(stream, buf, have + 1) {
            return None;
        }
    }
}

/// Decodes a chunked body starting at `at`; returns the body and where it ends.
fn read_chunked(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut at: usize,
) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    loop {
        let end = read_line(stream, buf, at)?;
        let size_text = String::from_utf8_lossy(&buf[at..end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = end + 2;
        if size == 0 {
            // Trailer fields, up to the empty line.
            loop {
                let end = read_line(stream, buf, at)?;
                let empty = end == at;
                at = end + 2;
                if empty {
                    return Some((body, at));
                }
            }
        }
        if !fill(stream, buf, at + size + 2) {
            return None;
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

fn serve_recorded(mut stream: TcpStream, log: &Mutex<Vec<Received>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    loop {
        let (head_len, line, fields, length, chunked) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let line = format!(
                        "{} {} HTTP/1.{}",
                        request.method.unwrap(),
                        request.path.unwrap(),
                        request.version.unwrap()
                    );
                    let mut fields = Vec::new();
                    let mut length = 0;
                    let mut chunked = false;
                    for h in request.headers.iter() {
                        let name = h.name.to_ascii_lowercase();
                        let value = String::from_utf8_lossy(h.value).to_string();
                        match name.as_str() {
                            "content-length" => length = value.trim().parse().unwrap_or(0),
                            "transfer-encoding" => chunked = value.contains("chunked"),
                            _ => fields.push((name, value)),
                        }
                    }
                    fields.sort();
                    break (len, line, fields, length, chunked);
                }
                Ok(httparse::Status::Partial) => {
                    let have = buf.len();
                    if !fill(&mut stream, &mut buf, have + 1) {
                        return;
                    }
                }
                Err(e) => {
                    log.lock().unwrap().push(Received {
                        line: format!("unparsable: {e}"),
                        fields: Vec::new(),
                        body: buf.clone(),
                    });
                    return;
                }
            }
        };
        let (body, end) = if chunked {
            match read_chunked(&mut stream, &mut buf, head_len) {
                Some(read) => read,
                None => return,
            }
        } else {
            if !fill(&mut stream, &mut buf, head_len + length) {
                return;
            }
            (buf[head_len..head_len + length].to_vec(), head_len + length)
        };
        buf.drain(..end);
        let path = line.split(' ').nth(1).unwrap_or("").to_string();
        log.lock().unwrap().push(Received { line, fields, body });
        let answer: &[u8] = if path.starts_with("/chunked") {
            b"HTTP/1.1 200 OK\r\nX-Kind: chunked\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        } else if path.starts_with("/close") {
            b"HTTP/1.1 200 OK\r\nX-Kind: close\r\nConnection: close\r\n\r\nuntil the end"
        } else if path.starts_with("/nocontent") {
            b"HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n"
        } else if path.starts_with("/early") {
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        } else {
            b"HTTP/1.1 200 OK\r\nX-Kind: length\r\nKeep-Alive: timeout=5\r\nContent-Length: 5\r\n\r\nhello"
        };
        if stream.write_all(answer).is_err() || path.starts_with("/close") {
            return;
        }
    }
}

/// One balancer and its backend.
struct Side {
    backend: RecordingBackend,
    _lb: Lb,
    listen: SocketAddr,
}

impl Side {
    fn start(fast_path: bool) -> Side {
        let backend = RecordingBackend::start();
        let listen = listen_address();
        let config = format!(
            "fast_path: {fast_path}\n\
             client:\n  header_timeout: 1s\n  body_timeout: 1s\n  max_header_count: 40\n\
             pools:\n  default:\n    upstreams:\n      - address: {}\n\
             routes:\n\
             \x20 - host: b.test\n    pool: default\n    max_body_size: 8\n\
             \x20   request_headers: {{set: {{X-Route: b}}, add: {{X-Added: 1}}, remove: [X-Secret]}}\n\
             \x20   response_headers: {{set: {{X-Kind: rewritten}}, add: {{X-Via: lb}}}}\n\
             \x20 - pool: default\n",
            backend.addr
        );
        let lb = Lb::start(listen, &config);
        Side {
            backend,
            _lb: lb,
            listen,
        }
    }

    /// Sends `request` and returns what came back (until the connection closes, or
    /// nothing more came for a while) and what the backend received.
    fn exchange(&self, request: &[u8]) -> (Vec<u8>, Vec<Received>) {
        // Not a half-close: pingora-proxy takes it for a client gone away.
        let mut stream = TcpStream::connect(self.listen).unwrap();
        stream.set_read_timeout(Some(QUIET)).unwrap();
        let _ = stream.write_all(request);
        let mut answer = Vec::new();
        let started = Instant::now();
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
                // Nothing yet: the balancer may be waiting out the body timeout (1 s).
                Err(_) if answer.is_empty() && started.elapsed() < FIRST_ANSWER => {}
                Err(_) => break,
            }
        }
        (answer, self.backend.take())
    }
}

/// How long after its last byte an answer is taken as complete.
const QUIET: Duration = Duration::from_millis(300);
/// Longest wait for the first byte of an answer.
const FIRST_ANSWER: Duration = Duration::from_millis(2500);

/// A response as the client got it, framing and per-process values left out.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    fields: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Parses the responses in `bytes` to requests whose methods are `methods`; what cannot
/// be parsed is kept as it is, as the last element.
fn responses(bytes: &[u8], methods: &[String]) -> (Vec<Answer>, Vec<u8>) {
    let mut answers = Vec::new();
    let mut at = 0;
    let mut request = 0;
    while at < bytes.len() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(len)) = response.parse(&bytes[at..]) else {
            break;
        };
        let status = response.code.unwrap();
        let mut fields = Vec::new();
        let mut length = None;
        let mut chunked = false;
        for h in response.headers.iter() {
            let name = h.name.to_ascii_lowercase();
            let value = String::from_utf8_lossy(h.value).to_string();
            match name.as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = true,
                // Per process, or the framing the two paths may choose differently.
                "date" | "connection" | "keep-alive" => {}
                _ => fields.push((name, value)),
            }
        }
        fields.sort();
        let start = at + len;
        let head = methods.get(request).is_some_and(|m| m == "HEAD");
        let (body, end) = if status < 200 || status == 204 || status == 304 || head {
            (Vec::new(), start)
        } else if chunked {
            let mut body = Vec::new();
            let mut p = start;
            loop {
                let Some(e) = line_end(bytes, p) else {
                    return (answers, bytes[at..].to_vec());
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&bytes[p..e])
                        .split(';')
                        .next()
                        .unwrap_or(""),
                    16,
                )
                .unwrap_or(0);
                p = e + 2;
                if size == 0 {
                    p += 2;
                    break;
                }
                body.extend_from_slice(&bytes[p..(p + size).min(bytes.len())]);
                p += size + 2;
            }
            (body, p.min(bytes.len()))
        } else if let Some(length) = length {
            let end = (start + length).min(bytes.len());
            (bytes[start..end].to_vec(), end)
        } else {
            (bytes[start..].to_vec(), bytes.len())
        };
        if status >= 200 {
            request += 1;
        }
        answers.push(Answer {
            status,
            fields,
            body,
        });
        at = end;
    }
    (answers, bytes[at..].to_vec())
}

/// Runs `request` through both balancers and compares.
fn compare(fast: &Side, proxy: &Side, request: &[u8], methods: &[String]) -> Result<(), String> {
    let ((fast_answer, fast_received), (proxy_answer, proxy_received)) = std::thread::scope(|s| {
        let fast = s.spawn(|| fast.exchange(request));
        let proxy = proxy.exchange(request);
        (fast.join().unwrap(), proxy)
    });
    let text = String::from_utf8_lossy(request);
    if fast_received != proxy_received {
        return Err(format!(
            "the backends received different requests for {text:?}:\nfast path: {fast_received:#?}\nproxy path: {proxy_received:#?}"
        ));
    }
    let fast_responses = responses(&fast_answer, methods);
    let proxy_responses = responses(&proxy_answer, methods);
    if fast_responses != proxy_responses {
        return Err(format!(
            "the clients received different answers for {text:?}:\nfast path: {:?}\nproxy path: {:?}",
            String::from_utf8_lossy(&fast_answer),
            String::from_utf8_lossy(&proxy_answer)
        ));
    }
    Ok(())
}

/// Both balancers live for one test, so that they are stopped at its end.
#[test]
fn the_fast_path_and_pingora_proxy_agree() {
    let (fast, proxy) = (Side::start(true), Side::start(false));
    // The comparison sees real answers, not two silent balancers.
    let (answer, received) = fast.exchange(b"GET /cl HTTP/1.1\r\nHost: a.test\r\n\r\n");
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "{answer:?}");
    assert_eq!(received.len(), 1);
    known_hostile_requests(&fast, &proxy);
    generated_requests(&fast, &proxy);
}

/// Requests every HTTP parser must get right, each on its own.
fn known_hostile_requests(fast: &Side, proxy: &Side) {
    let table: &[&str] = &[
        "GET /cl HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "GET /chunked HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "GET /close HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "GET /nocontent HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "GET /early HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "GET /early HTTP/1.1\r\nHost: b.test\r\n\r\n",
        "HEAD /cl HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "POST /cl HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello",
        "POST /cl HTTP/1.1\r\nHost: b.test\r\nContent-Length: 9\r\n\r\nnine byte",
        "GET /cl HTTP/1.1\r\nHost: b.test\r\nX-Secret: s\r\n\r\n",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3, 3\r\n\r\nabc",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\nContent-Length: +3\r\n\r\nabc",
        "POST /cl HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "POST /cl HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "POST /cl HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "POST /cl HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\nX-Fold: a\r\n b\r\n\r\n",
        "GET /cl HTTP/1.1\nHost: a.test\n\n",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\nX-Nul: a\0b\r\n\r\n",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\nX-Caf\u{e9}: 1\r\n\r\n",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\nX-Utf: caf\u{e9}\r\n\r\n",
        "GET http://a.test/cl HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "GET http://b.test/cl HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        "GET /cl HTTP/1.1\r\n\r\n",
        "GET /cl HTTP/1.0\r\n\r\n",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\nGET /cl HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\nConnection: x-forwarded-for\r\n\r\n",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\n\r\n",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nab",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        "GET /cl HTTP/1.1\r\nHost: a.test\r\n\r\nGET /chunked HTTP/1.1\r\nHost: a.test\r\n\r\nGET /close HTTP/1.1\r\nHost: a.test\r\n\r\nGET /cl HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "POST /cl HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\n\r\nabGET /chunked HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "POST /cl HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nshort",
        "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "FOO /cl HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "GET /a%20b?c={} HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "GET * HTTP/1.1\r\nHost: a.test\r\n\r\n",
    ];
    let mut failures = Vec::new();
    for request in table {
        let methods: Vec<String> = request
            .split("HTTP/1.")
            .filter_map(|part| part.rsplit(['\n']).next())
            .filter_map(|line| line.split(' ').next().map(String::from))
            .filter(|m| !m.is_empty())
            .collect();
        if let Err(e) = compare(fast, proxy, request.as_bytes(), &methods) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A header field, from the valid to the hostile.
fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Host: a.test".to_string()),
        Just("Host: b.test".to_string()),
        Just("Host: A.Test:80".to_string()),
        Just("Host:".to_string()),
        (0u32..12).prop_map(|n| format!("Content-Length: {n}")),
        (0u32..12).prop_map(|n| format!("Content-Length: {n}, {n}")),
        (0u32..12).prop_map(|n| format!("Content-Length:  +{n} ")),
        prop::sample::select(vec![
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: gzip, chunked",
            "Transfer-Encoding: chunked, gzip",
            "transfer-encoding: CHUNKED",
            "Transfer-Encoding : chunked",
            "Transfer-Encoding:\tchunked",
            "Connection: close",
            "Connection: keep-alive",
            "Connection: keep-alive, x-secret",
            "Connection: upgrade",
            "Upgrade: websocket",
            "Expect: 100-continue",
            "TE: trailers",
            "Keep-Alive: timeout=1",
            "Proxy-Connection: keep-alive",
            "X-Forwarded-For: 1.2.3.4",
            "X-Forwarded-Host: evil.test",
            "Forwarded: for=1.2.3.4",
            "X-Secret: s",
            "X-Fold: a\r\n b",
            "X-Nul: a\0b",
            "X-Utf: caf\u{e9}",
            "X-Caf\u{e9}: 1",
            "X-Space : 1",
            " X-Lead: 1",
            "X-Empty:",
            "X-Tab:\tv\t",
        ])
        .prop_map(String::from),
        ("[a-z]{1,8}", "[ -~]{0,12}").prop_map(|(n, v)| format!("X-{n}: {v}")),
    ]
}

/// A request: method, target, version, fields, line ends and body, all generated.
fn request() -> impl Strategy<Value = (String, String)> {
    let method = prop::sample::select(vec![
        "GET", "GET", "POST", "HEAD", "PUT", "DELETE", "get", "CONNECT", "FOO",
    ]);
    let target = prop::sample::select(vec![
        "/cl",
        "/chunked",
        "/close",
        "/nocontent",
        "/early",
        "/cl?x=1&y=%41",
        "//cl",
        "/cl#f",
        "*",
        "http://a.test/cl",
        "/c{l}",
        "/cl\"",
    ]);
    let version = prop::sample::select(vec![
        "HTTP/1.1",
        "HTTP/1.1",
        "HTTP/1.1",
        "HTTP/1.0",
        "HTTP/2.0",
        "HTTP/1.10",
    ]);
    let eol = prop::sample::select(vec!["\r\n", "\r\n", "\r\n", "\n"]);
    let body = prop::sample::select(vec![
        "",
        "",
        "abc",
        "hello",
        "3\r\nabc\r\n0\r\n\r\n",
        "5\r\nab\r\n0\r\n\r\n",
        "0\r\n\r\n",
    ]);
    (
        method,
        target,
        version,
        prop::collection::vec(field(), 0..6),
        eol,
        body,
    )
        .prop_map(|(method, target, version, fields, eol, body)| {
            let mut text = format!("{method} {target} {version}{eol}");
            for field in &fields {
                text.push_str(field);
                text.push_str(eol);
            }
            text.push_str(eol);
            text.push_str(body);
            (text, method.to_string())
        })
}

/// One or two requests on a connection (the second pipelined), generated.
fn generated_requests(fast: &Side, proxy: &Side) {
    let config = ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let outcome = runner.run(&prop::collection::vec(request(), 1..3), |requests| {
        let bytes: String = requests.iter().map(|(text, _)| text.as_str()).collect();
        let methods: Vec<String> = requests.iter().map(|(_, m)| m.clone()).collect();
        compare(fast, proxy, bytes.as_bytes(), &methods).map_err(TestCaseError::fail)
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
