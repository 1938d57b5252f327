//! Several pools behind routes, and the traffic policies of each pool: host and path
//! routing, least connections, power of two choices, passive health, body limits, header
//! rules, draining through the metrics listener and the HTML status page.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;

/// A pool named `name` over `backends`, as a `pools:` entry.
fn pool(name: &str, backends: &[&Backend], extra: &str) -> String {
    let addresses: Vec<String> = backends
        .iter()
        .map(|b| format!("{{address: \"{}\"}}", b.addr))
        .collect();
    format!(
        "  {name}:\n    upstreams: [{}]\n    health_check: {{kind: none}}\n{extra}",
        addresses.join(", ")
    )
}

fn backend_for(lb: &Lb, host: &str, path: &str) -> (u16, String) {
    let response = get(lb.listen, path, &[("Host", host)]).unwrap();
    (response.status, response.backend().to_string())
}

#[test]
fn requests_follow_host_and_longest_path() {
    let (a, b, c) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    );
    let lb = Lb::start(
        listen_address(),
        &format!(
            "pools:\n{}{}{}routes:\n\
             - {{host: www.example.com, pool: a}}\n\
             - {{host: www.example.com, path: /api/, pool: b}}\n\
             - {{host: \"*.example.com\", pool: c}}\n\
             - {{path: /api/v2/, pool: c}}\n\
             - {{path: /api/, pool: b}}\n",
            pool("a", &[&a], ""),
            pool("b", &[&b], ""),
            pool("c", &[&c], "")
        ),
    );
    let table = [
        ("www.example.com", "/", "a"),
        ("WWW.Example.COM:8080", "/index.html", "a"),
        ("www.example.com", "/api/users", "b"),
        ("shop.example.com", "/", "c"),
        ("shop.example.com", "/api/x", "c"),
        ("other.test", "/api/v2/x", "c"),
        ("other.test", "/api/v1/x", "b"),
    ];
    for (host, path, expected) in table {
        assert_eq!(
            backend_for(&lb, host, path),
            (200, expected.to_string()),
            "{host} {path}"
        );
    }
    // Nothing matches: a clear 404, and nothing reaches a backend.
    let before = a.served() + b.served() + c.served();
    let (status, backend) = backend_for(&lb, "other.test", "/");
    assert_eq!((status, backend.as_str()), (404, ""));
    assert_eq!(a.served() + b.served() + c.served(), before);
}

#[test]
fn a_route_for_some_listeners_takes_only_their_requests() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let (public, internal) = (listen_address(), listen_address());
    let _lb = Lb::start_with_listeners(
        &format!(
            "listeners: [\"{public}\", \"{internal}\"]\npools:\n{}{}routes:\n\
             - {{path: /admin/, pool: b, listeners: [\"{internal}\"]}}\n\
             - {{pool: a}}\n",
            pool("a", &[&a], ""),
            pool("b", &[&b], "")
        ),
        public,
    );
    let backend_at = |listener: SocketAddr, path: &str| {
        let response = get(listener, path, &[("Host", "x.test")]).unwrap();
        (response.status, response.backend().to_string())
    };
    assert_eq!(backend_at(internal, "/admin/x"), (200, "b".to_string()));
    assert_eq!(backend_at(public, "/admin/x"), (200, "a".to_string()));
    assert_eq!(backend_at(internal, "/other"), (200, "a".to_string()));
}

/// A request refused for want of a route leaves its connection open for the next, as
/// nginx's and HAProxy's do after a 404; one with a body it did not read closes it, so that
/// body is never taken for a request.
#[test]
fn a_request_without_a_route_keeps_its_connection() {
    let (backend, lb) = balancer_with_one_backend("routes:\n  - {path: /a/, pool: default}\n");
    let mut client = Client::connect(lb.listen).unwrap();
    let refused = client.request("/nowhere", &[], false).unwrap();
    assert_eq!(refused.status, 404);
    assert!(!client.closed_by_server, "{:?}", refused.headers);
    let served = client.request("/a/x", &[], false).unwrap();
    assert_eq!((served.status, served.backend()), (200, "a"));

    let pipelined = b"POST /nowhere HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 24\r\n\r\n\
                      GET /a/smuggled HTTP/1.1\
                      GET /a/y HTTP/1.1\r\nHost: lb.test\r\nConnection: close\r\n\r\n";
    let answer = exchange(lb.listen, pipelined, Duration::from_secs(3));
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("Connection: close"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    assert_eq!(backend.served(), 1, "the body was taken for a request");
}

#[test]
fn the_seed_shape_is_the_default_pool_and_no_route_status_is_configurable() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Lb::start(
        listen_address(),
        &format!(
            "{}pools:\n{}routes:\n  - {{path: /b/, pool: b}}\n  - {{path: /a/, pool: default}}\nno_route_status: 421\n",
            upstreams(&[a.addr]),
            pool("b", &[&b], "")
        ),
    );
    assert_eq!(backend_for(&lb, "x.test", "/a/1"), (200, "a".to_string()));
    assert_eq!(backend_for(&lb, "x.test", "/b/1"), (200, "b".to_string()));
    assert_eq!(backend_for(&lb, "x.test", "/c").0, 421);
}

#[test]
fn least_connections_steers_away_from_a_busy_backend() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Lb::start(
        listen_address(),
        &format!(
            "{}selection: {{algorithm: least_connections}}\nhealth_check: {{kind: none}}\n",
            upstreams(&[a.addr, b.addr])
        ),
    );
    let listen = lb.listen;
    let slow = std::thread::spawn(move || get(listen, "/slow/3000", &[]).unwrap());
    // The slow request is on its backend well before it ends.
    std::thread::sleep(Duration::from_millis(500));
    let quick: Vec<String> = (0..10)
        .map(|_| lb.get("/").unwrap().backend().to_string())
        .collect();
    let slow = slow.join().unwrap();
    assert_eq!(slow.status, 200);
    assert!(
        !quick.iter().any(|name| name == slow.backend()),
        "{quick:?} while {} was busy",
        slow.backend()
    );
}

#[test]
fn power_of_two_choices_uses_every_backend() {
    let backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lb = Lb::start(
        listen_address(),
        &format!(
            "{}selection: {{algorithm: power_of_two_choices}}\nhealth_check: {{kind: none}}\n",
            upstreams(&addresses)
        ),
    );
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        *seen
            .entry(lb.get("/").unwrap().backend().to_string())
            .or_insert(0) += 1;
    }
    for name in ["a", "b", "c"] {
        assert!(seen.get(name).copied().unwrap_or(0) > 40, "{seen:?}");
    }
}

/// The metrics listener of a balancer, and the balancer.
fn with_metrics(body: &str) -> (Lb, SocketAddr) {
    let metrics = listen_address();
    let lb = Lb::start(
        listen_address(),
        &format!("{body}metrics:\n  listen: \"{metrics}\"\n"),
    );
    (lb, metrics)
}

fn backend_status(metrics: SocketAddr, address: SocketAddr) -> serde_json::Value {
    let status = status(metrics);
    status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == address.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("{address} not in {status}"))
}

#[test]
fn a_failing_backend_is_ejected_and_comes_back_but_the_last_one_never_goes() {
    let good = Backend::start("good");
    let failing = broken_backend(
        b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        false,
    );
    let (lb, metrics) = with_metrics(&format!(
        "{}health_check: {{kind: none}}\npassive_health:\n  consecutive_failures: 3\n  ejection_time: 2s\n  on_5xx: true\n",
        upstreams(&[good.addr, failing])
    ));
    // Round robin: every other request meets the failing backend until it is ejected.
    let mut failed = 0;
    for _ in 0..10 {
        if lb.get("/").unwrap().status == 503 {
            failed += 1;
        }
    }
    assert_eq!(failed, 3, "ejected after three failures in a row");
    let state = backend_status(metrics, failing);
    assert_eq!(
        (state["ejected"].as_bool(), state["in_rotation"].as_bool()),
        (Some(true), Some(false)),
        "{state}"
    );
    lb.wait_for_log(
        "failed 3 requests in a row; out of rotation for 2000ms",
        Duration::from_secs(1),
    );
    // After the ejection it is tried again.
    assert!(eventually(Duration::from_secs(4), || !backend_status(
        metrics, failing
    )["ejected"]
        .as_bool()
        .unwrap()));
    let statuses: Vec<u16> = (0..4).map(|_| lb.get("/").unwrap().status).collect();
    assert!(statuses.contains(&503), "{statuses:?}");

    // The last backend in rotation stays, whatever it answers.
    let lonely = broken_backend(
        b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        false,
    );
    let (lb, metrics) = with_metrics(&format!(
        "{}health_check: {{kind: none}}\npassive_health: {{consecutive_failures: 1, on_5xx: true}}\n",
        upstreams(&[lonely])
    ));
    for _ in 0..5 {
        assert_eq!(lb.get("/").unwrap().status, 503);
    }
    assert_eq!(backend_status(metrics, lonely)["ejected"], false);
}

/// Passive health judges the final response, not an informational one before it (on
/// either path: the suite also runs with the fast path off).
#[test]
fn an_informational_response_does_not_hide_the_failure_after_it() {
    let good = Backend::start("good");
    let failing = broken_backend(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
          HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        false,
    );
    let (lb, metrics) = with_metrics(&format!(
        "{}health_check: {{kind: none}}\npassive_health: {{consecutive_failures: 2, on_5xx: true}}\n",
        upstreams(&[good.addr, failing])
    ));
    for _ in 0..6 {
        lb.get("/").unwrap();
    }
    assert_eq!(backend_status(metrics, failing)["ejected"], true);
}

#[test]
fn a_connection_refused_counts_as_a_failure_but_the_request_is_served() {
    let good = Backend::start("good");
    let gone = Backend::start("gone");
    let gone_addr = gone.addr;
    drop(gone);
    let (lb, metrics) = with_metrics(&format!(
        "{}health_check: {{kind: none}}\npassive_health: {{consecutive_failures: 2}}\n",
        upstreams(&[good.addr, gone_addr])
    ));
    for _ in 0..6 {
        assert_eq!(lb.get("/").unwrap().backend(), "good");
    }
    assert_eq!(backend_status(metrics, gone_addr)["ejected"], true);
}

#[test]
fn bodies_over_the_route_limit_get_413() {
    let (_backend, lb) = balancer_with_one_backend(
        "routes:\n  - {path: /upload/, pool: default, max_body_size: 16}\n  - {pool: default}\n",
    );
    let post = |path: &str, body: &str| {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: a.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        exchange(lb.listen, request.as_bytes(), Duration::from_secs(3))
    };
    assert!(post("/upload/x", "small").starts_with("HTTP/1.1 200"));
    assert!(post("/upload/x", &"x".repeat(17)).starts_with("HTTP/1.1 413"));
    assert!(post("/other", &"x".repeat(100)).starts_with("HTTP/1.1 200"));
    // A chunked body is counted as it arrives.
    let chunked = format!(
        "POST /upload/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{}",
        "8\r\nxxxxxxxx\r\n".repeat(4) + "0\r\n\r\n"
    );
    let answer = exchange(lb.listen, chunked.as_bytes(), Duration::from_secs(3));
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[test]
fn a_route_has_its_own_timeouts() {
    let backend = Backend::start("a");
    let lb = Lb::start(
        listen_address(),
        &format!(
            "{}health_check: {{kind: none}}\nroutes:\n  - {{host: a.test, pool: default, timeouts: {{read: 300ms}}}}\n  - {{pool: default}}\n",
            upstreams(&[backend.addr])
        ),
    );
    // A backend connection's read timer is kept between requests: armed here for the
    // pool's 60 s, it must be moved earlier for the next request's 300 ms.
    let response = get(lb.listen, "/slow/200", &[("Host", "b.test")]).unwrap();
    assert_eq!(response.status, 200);
    let started = Instant::now();
    let response = get(lb.listen, "/slow/1500", &[("Host", "a.test")]).unwrap();
    assert_eq!(response.status, 504);
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    // The pool's own read timeout (60 s) applies to the other route.
    let response = get(lb.listen, "/slow/1000", &[("Host", "b.test")]).unwrap();
    assert_eq!(response.status, 200);
}

#[test]
fn header_rules_change_requests_and_responses() {
    let backend = Backend::start("a");
    let lb = Lb::start(
        listen_address(),
        &format!(
            "{}routes:\n  - pool: default\n    request_headers:\n      set: {{X-Env: prod}}\n      add: {{X-Tag: lb}}\n      remove: [X-Secret]\n    response_headers:\n      set: {{Strict-Transport-Security: max-age=63072000}}\n      remove: [X-Seen-Forwarded-For]\n",
            upstreams(&[backend.addr])
        ),
    );
    let response = get(
        lb.listen,
        "/",
        &[
            ("X-Env", "dev"),
            ("X-Tag", "client"),
            ("X-Secret", "s3cret"),
        ],
    )
    .unwrap();
    let seen = backend.seen.lock().unwrap().last().unwrap().headers.clone();
    assert_eq!(seen.get("x-env").map(String::as_str), Some("prod"));
    assert_eq!(seen.get("x-tag").map(String::as_str), Some("client, lb"));
    assert_eq!(seen.get("x-secret"), None);
    assert_eq!(
        response
            .headers
            .get("strict-transport-security")
            .map(String::as_str),
        Some("max-age=63072000")
    );
    assert_eq!(response.headers.get("x-seen-forwarded-for"), None);
}

fn post(addr: SocketAddr, path: &str) -> String {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: m\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    exchange(addr, request.as_bytes(), Duration::from_secs(3))
}

#[test]
fn a_backend_drained_through_the_metrics_listener_gets_no_new_request() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let (lb, metrics) = with_metrics(&format!(
        "{}health_check: {{kind: none}}\n",
        upstreams(&[a.addr, b.addr])
    ));
    let drain = format!("/pools/default/backends/{}/drain", a.addr);
    assert!(
        get(metrics, &drain, &[]).unwrap().status == 405,
        "a GET changes nothing"
    );
    let answer = post(metrics, &drain);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("draining"),
        "{answer}"
    );
    let before = a.served();
    for _ in 0..10 {
        assert_eq!(lb.get("/").unwrap().backend(), "b");
    }
    assert_eq!(a.served(), before);
    assert_eq!(backend_status(metrics, a.addr)["draining"], true);
    let scrape = get(metrics, "/metrics", &[]).unwrap().body;
    assert!(
        scrape.contains(&format!(
            "pingora_lb_backend_draining{{backend=\"{}\",pool=\"default\"}} 1",
            a.addr
        )),
        "{scrape}"
    );
    assert!(post(
        metrics,
        &format!("/pools/default/backends/{}/ready", a.addr)
    )
    .starts_with("HTTP/1.1 200"));
    let names: Vec<String> = (0..4)
        .map(|_| lb.get("/").unwrap().backend().to_string())
        .collect();
    assert!(names.contains(&"a".to_string()), "{names:?}");
    assert!(post(metrics, "/pools/default/backends/10.9.9.9:1/drain").starts_with("HTTP/1.1 404"));
}

#[test]
fn the_status_page_renders_a_table_of_pools_for_a_browser() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let (_lb, metrics) = with_metrics(&format!(
        "{}pools:\n{}routes:\n  - {{pool: default}}\n  - {{path: /b/, pool: api}}\n",
        upstreams(&[a.addr]),
        pool("api", &[&b], "")
    ));
    let page = get(
        metrics,
        "/status",
        &[("Accept", "text/html,application/xhtml+xml")],
    )
    .unwrap();
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"].starts_with("text/html"));
    for needle in [
        "<table>",
        "<h2>pool default</h2>",
        "<h2>pool api</h2>",
        &a.addr.to_string(),
        &b.addr.to_string(),
    ] {
        assert!(
            page.body.contains(needle),
            "{needle} missing: {}",
            page.body
        );
    }
    screenshot(metrics);
}

/// Renders the page in headless Chromium, as an operator's browser would. CI installs
/// Chromium (tests/run-all.sh) and requires this; elsewhere it is skipped when absent.
fn screenshot(metrics: SocketAddr) {
    let Some(chromium) = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    else {
        assert!(
            std::env::var_os("PINGORA_LB_REQUIRE_CHROMIUM").is_none(),
            "Chromium is required here: apt-get install chromium"
        );
        eprintln!("skipped: no Chromium to render the status page");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("status.png");
    let started = Instant::now();
    let output = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1024,768",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("http://{metrics}/status"))
        .output()
        .unwrap();
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}) after {:?}: {}",
            started.elapsed(),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5_000,
        "{} bytes",
        png.len()
    );
    // Kept for a human to look at, next to the other build outputs.
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&target, &png).unwrap();
    eprintln!("status page screenshot: {}", target.display());
}
