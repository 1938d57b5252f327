//! Day-one operability on the real binary: forwarded headers, the access log, Prometheus
//! metrics and the status endpoint, including across a reload.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use support::*;

fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let response = get(addr, "/metrics", &[]).unwrap();
    assert_eq!(response.status, 200);
    assert!(response.headers["content-type"].starts_with("text/plain"));
    prometheus_parse::Scrape::parse(response.body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of a counter or gauge with the given labels (0 when absent).
fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[test]
fn forwarded_headers_are_set_and_not_spoofable() {
    let backend = Backend::start("a");
    let upstreams = upstreams(&[backend.addr]);
    let untrusting = Lb::start(
        listen_address(),
        &format!("{upstreams}forwarding:\n  x_forwarded: true\n  forwarded: true\n  trusted_proxies: [\"10.0.0.0/8\"]\n"),
    );
    get(
        untrusting.listen,
        "/",
        &[
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("Forwarded", "for=6.6.6.6"),
        ],
    )
    .unwrap();
    let seen = backend.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], "lb.test");
    assert_eq!(
        seen.headers["forwarded"],
        "for=127.0.0.1;proto=http;host=\"lb.test\""
    );

    let trusting = Lb::start(
        listen_address(),
        &format!(
            "{upstreams}forwarding:\n  x_forwarded: true\n  trusted_proxies: [\"127.0.0.0/8\"]\n"
        ),
    );
    get(trusting.listen, "/", &[("X-Forwarded-For", "203.0.113.7")]).unwrap();
    let seen = backend.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert!(!seen.headers.contains_key("forwarded"));
}

#[test]
fn access_log_file_is_written_and_reopened_on_sighup() {
    let backend = Backend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let lb = Lb::start(
        listen_address(),
        &format!(
            "{}access_log:\n  destination: {}\n  format: json\n",
            upstreams(&[backend.addr]),
            log.display()
        ),
    );
    get(lb.listen, "/first?x=1", &[("User-Agent", "test-agent")]).unwrap();
    let line = first_json_log_line(&log, "/first");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/first?x=1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["client"], "127.0.0.1");
    assert_eq!(line["upstream"], backend.addr.to_string());
    assert_eq!(line["user_agent"], "test-agent");
    assert_eq!(line["retries"], 0);
    assert!(line["request_time"].as_f64().unwrap() >= 0.0);
    assert!(line["upstream_time"].as_f64().is_some());

    // logrotate: rename, SIGHUP, and the next line lands in a new file.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    signal(lb.pid, Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(700));
    get(lb.listen, "/second", &[]).unwrap();
    assert!(eventually(Duration::from_secs(3), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("/second"))
    }));
    assert!(!std::fs::read_to_string(&rotated)
        .unwrap()
        .contains("/second"));
}

/// A backend that answers every request with its header at once and its 5-byte body
/// `delay` later.
fn slow_backend(hints_delay: Duration, body_delay: Duration) -> SocketAddr {
    let listener = held_port();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buffer = [0u8; 4096];
                // Health checks connect and send nothing.
                while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {
                    let parts: [(&[u8], Duration); 3] = [
                        (b"HTTP/1.1 103 Early Hints\r\n\r\n", hints_delay),
                        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", body_delay),
                        (b"hello", Duration::ZERO),
                    ];
                    for (part, then_wait) in parts {
                        if stream.write_all(part).is_err() {
                            return;
                        }
                        std::thread::sleep(then_wait);
                    }
                }
            });
        }
    });
    addr
}

/// `upstream_time` runs from choosing the backend to its final response header, on either
/// path (the suite also runs with the fast path off): not to an informational response
/// before it, nor to the end of the body.
#[test]
fn upstream_time_ends_at_the_final_response_header() {
    let backend = slow_backend(Duration::from_millis(300), Duration::from_millis(600));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let lb = Lb::start(
        listen_address(),
        &format!(
            "{}access_log:\n  destination: {}\n  format: json\n",
            upstreams(&[backend]),
            log.display()
        ),
    );
    let response = get(lb.listen, "/slow", &[]).unwrap();
    assert_eq!(response.body, "hello");
    let line = first_json_log_line(&log, "/slow");
    let upstream_time = line["upstream_time"].as_f64().unwrap();
    assert!(line["request_time"].as_f64().unwrap() >= 0.9, "{line}");
    assert!((0.3..0.8).contains(&upstream_time), "{line}");
}

#[test]
fn access_log_reaches_syslog_in_combined_format() {
    let mut syslog = DatagramSocket::in_new_directory();
    let (backend, lb) = balancer_with_one_backend(&format!(
        "access_log:\n  destination: syslog\n  syslog:\n    identifier: lb-access\n    socket: {}\n",
        syslog.path.display()
    ));
    get(lb.listen, "/logged", &[]).unwrap();
    // The first message, whatever it says: the access log line.
    let line = syslog.expect("", Duration::from_secs(5));
    // daemon (3) * 8 + info (6) = 30.
    assert!(line.starts_with("<30>"), "{line}");
    assert!(line.contains(&format!("lb-access[{}]", lb.pid)), "{line}");
    assert!(
        line.contains("127.0.0.1 - - [") && line.contains("\"GET /logged HTTP/1.1\" 200 1"),
        "{line}"
    );
    assert!(
        line.contains(&format!("upstream={}", backend.addr)) && line.contains("retries=0"),
        "{line}"
    );
}

#[test]
fn metrics_and_status_follow_requests_retries_health_and_reloads() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let dead = free_port();
    let metrics = listen_address();
    let mut lb = Lb::start(
        listen_address(),
        &format!(
            "upstreams:\n  - address: 127.0.0.1:{dead}\n  - address: {}\n  - address: {}\nhealth_check:\n  interval: 200ms\nmetrics:\n  listen: {metrics}\n",
            a.addr, b.addr
        ),
    );
    // The first health round ran before READY: the dead backend is already out.
    let s = status(metrics);
    assert_eq!(s["generation"], 1);
    let backends = s["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 3);
    assert_eq!(backends[0]["address"], format!("127.0.0.1:{dead}"));
    assert_eq!(backends[0]["healthy"], false);
    assert_eq!(backends[0]["last_check"]["ok"], false);
    assert_eq!(backends[1]["healthy"], true);
    assert_eq!(backends[1]["weight"], 1);

    for _ in 0..10 {
        assert_eq!(lb.get("/").unwrap().status, 200);
    }
    assert!(eventually(Duration::from_secs(2), || value(
        &scrape(metrics),
        "pingora_lb_requests_total",
        &[]
    ) == 10.0));
    let m = scrape(metrics);
    let a_name = a.addr.to_string();
    let b_name = b.addr.to_string();
    let to_a = value(
        &m,
        "pingora_lb_requests_total",
        &[("status_class", "2xx"), ("backend", &a_name)],
    );
    let to_b = value(
        &m,
        "pingora_lb_requests_total",
        &[("status_class", "2xx"), ("backend", &b_name)],
    );
    assert_eq!(to_a + to_b, 10.0);
    assert!(to_a >= 3.0 && to_b >= 3.0, "{to_a} {to_b}");
    assert_eq!(
        value(&m, "pingora_lb_requests_total", &[("backend", "none")]),
        0.0
    );
    assert_eq!(
        value(
            &m,
            "pingora_lb_backend_up",
            &[("backend", &format!("127.0.0.1:{dead}"))]
        ),
        0.0
    );
    assert_eq!(
        value(&m, "pingora_lb_backend_up", &[("backend", &a_name)]),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "pingora_lb_health_transitions_total",
            &[("backend", &format!("127.0.0.1:{dead}")), ("state", "down")]
        ),
        1.0
    );
    assert_eq!(value(&m, "pingora_lb_reload_generation", &[]), 1.0);
    assert_eq!(
        value(
            &m,
            "pingora_lb_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(value(&m, "process_start_time_seconds", &[]) > 1.7e9);
    let histogram_count = m
        .samples
        .iter()
        .find(|s| {
            s.metric == "pingora_lb_upstream_response_seconds"
                && s.labels.get("backend") == Some(a_name.as_str())
        })
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => buckets.last().unwrap().count,
            _ => 0.0,
        });
    assert_eq!(histogram_count, Some(to_a));

    // A backend goes down: health, status and metrics follow, and it comes back.
    b.stop();
    assert!(eventually(Duration::from_secs(3), || status(metrics)
        ["backends"][2]["healthy"]
        == false));
    let down = scrape(metrics);
    assert_eq!(
        value(&down, "pingora_lb_backend_up", &[("backend", &b_name)]),
        0.0
    );
    assert_eq!(
        value(
            &down,
            "pingora_lb_health_transitions_total",
            &[("backend", &b_name), ("state", "down")]
        ),
        1.0
    );
    let b_again = Backend::start_at("b", b.addr);
    assert!(eventually(Duration::from_secs(3), || status(metrics)
        ["backends"][2]["healthy"]
        == true));
    assert_eq!(
        value(
            &scrape(metrics),
            "pingora_lb_health_transitions_total",
            &[("backend", &b_name), ("state", "up")]
        ),
        1.0
    );

    // It all keeps working after a reload; the new process counts from zero, one generation up.
    let old_pid = lb.pid;
    let outcome = lb.reload(&[]);
    assert_eq!(outcome.code, 0, "{outcome:?}");
    // The old process accepts too until it has drained (about a second).
    assert!(eventually(Duration::from_secs(5), || !alive(old_pid)));
    let s = status(metrics);
    assert_eq!(s["generation"], 2);
    assert_eq!(s["pid"], lb.pid);
    assert_eq!(lb.get("/").unwrap().status, 200);
    assert_eq!(
        value(&scrape(metrics), "pingora_lb_reload_generation", &[]),
        2.0
    );
    drop(b_again);
}

#[test]
fn a_retry_is_counted() {
    let a = Backend::start("a");
    let dead = free_port();
    let metrics = listen_address();
    let lb = Lb::start(
        listen_address(),
        &format!(
            "upstreams:\n  - address: 127.0.0.1:{dead}\n  - address: {}\nhealth_check:\n  kind: none\nmetrics:\n  listen: {metrics}\n",
            a.addr
        ),
    );
    for _ in 0..4 {
        assert_eq!(lb.get("/").unwrap().status, 200);
    }
    // Counted after the response is sent: wait for the last one.
    let a_name = a.addr.to_string();
    assert!(eventually(Duration::from_secs(2), || {
        value(
            &scrape(metrics),
            "pingora_lb_requests_total",
            &[("status_class", "2xx"), ("backend", &a_name)],
        ) == 4.0
    }));
    let m = scrape(metrics);
    let dead_name = format!("127.0.0.1:{dead}");
    // Round robin moves on with every selection, retries included, so at least every other
    // request meets the dead backend first; each such meeting is one failure and one retry.
    let failures = value(
        &m,
        "pingora_lb_upstream_connect_failures_total",
        &[("backend", &dead_name)],
    );
    assert!(failures >= 2.0, "{failures}");
    assert_eq!(value(&m, "pingora_lb_retries_total", &[]), failures);
    assert_eq!(
        value(&m, "pingora_lb_requests_total", &[("status_class", "5xx")]),
        0.0
    );
    assert_eq!(get(metrics, "/nothing", &[]).unwrap().status, 404);

    // Three clients holding keep-alive connections are three downstream connections.
    let mut clients: Vec<Client> = (0..3)
        .map(|_| Client::connect(lb.listen).unwrap())
        .collect();
    for client in &mut clients {
        assert_eq!(client.request("/", &[], false).unwrap().status, 200);
    }
    let listener = lb.listen.to_string();
    let open = value(
        &scrape(metrics),
        "pingora_lb_downstream_connections",
        &[("listener", &listener)],
    );
    assert_eq!(open, 3.0);
    drop(clients);
    assert!(eventually(Duration::from_secs(3), || {
        value(
            &scrape(metrics),
            "pingora_lb_downstream_connections",
            &[("listener", &listener)],
        ) == 0.0
    }));
}
