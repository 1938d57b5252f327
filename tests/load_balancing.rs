//! The load balancer against real backends on loopback: selection, Host and SNI, TLS
//! verification, failover and health transitions.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::*;

fn count_backends(lb: &Lb, requests: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..requests {
        let response = get(lb.listen, "/", headers).unwrap();
        assert_eq!(response.status, 200, "{response:?}");
        *counts.entry(response.backend().to_string()).or_default() += 1;
    }
    counts
}

#[test]
fn round_robin_alternates_exactly() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Lb::start(listen_address(), &upstreams(&[a.addr, b.addr]));
    let order: Vec<String> = (0..10)
        .map(|_| lb.get("/").unwrap().backend().to_string())
        .collect();
    for pair in order.windows(2) {
        assert_ne!(pair[0], pair[1], "not alternating: {order:?}");
    }
}

#[test]
fn weights_are_honoured() {
    let (a, b) = (Backend::start("heavy"), Backend::start("light"));
    let lb = Lb::start(
        listen_address(),
        &format!(
            "upstreams:\n  - address: {}\n    weight: 3\n  - address: {}\n    weight: 1\n",
            a.addr, b.addr
        ),
    );
    let counts = count_backends(&lb, 40, &[]);
    assert_eq!(counts.get("heavy"), Some(&30), "{counts:?}");
    assert_eq!(counts.get("light"), Some(&10), "{counts:?}");
}

#[test]
fn random_selection_uses_every_backend() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Lb::start(
        listen_address(),
        &format!(
            "{}selection:\n  algorithm: random\n",
            upstreams(&[a.addr, b.addr])
        ),
    );
    let counts = count_backends(&lb, 60, &[]);
    assert!(
        counts.get("a").is_some_and(|&n| n > 5) && counts.get("b").is_some_and(|&n| n > 5),
        "{counts:?}"
    );
}

#[test]
fn consistent_hashing_is_stable_for_a_key() {
    let backends: Vec<Backend> = (0..4).map(|i| Backend::start(&format!("b{i}"))).collect();
    let addresses: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let lb = Lb::start(
        listen_address(),
        &format!(
            "{}selection:\n  algorithm: consistent_hash\n  key: header:X-User\n",
            upstreams(&addresses)
        ),
    );
    let mut chosen = HashMap::new();
    for user in 0..20 {
        let user = format!("user-{user}");
        let counts = count_backends(&lb, 5, &[("X-User", &user)]);
        assert_eq!(
            counts.len(),
            1,
            "user {user} moved between backends: {counts:?}"
        );
        chosen.insert(user, counts.into_keys().next().unwrap());
    }
    let distinct: std::collections::HashSet<_> = chosen.values().collect();
    assert!(
        distinct.len() >= 2,
        "every key went to one backend: {chosen:?}"
    );
}

#[test]
fn host_header_override_reaches_the_backend() {
    let a = Backend::start("a");
    let lb = Lb::start(
        listen_address(),
        &format!(
            "upstreams:\n  - address: {}\n    host: backend.internal\n",
            a.addr
        ),
    );
    let response = lb.get("/").unwrap();
    assert_eq!(response.headers["x-seen-host"], "backend.internal");
}

#[test]
fn tls_backend_gets_sni_and_is_verified_against_the_ca_file() {
    let tls = TlsMaterial::new("backend.test");
    let backend = Backend::start_tls("secure", &tls);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &tls.ca_pem).unwrap();
    let upstream = |ca_line: &str| {
        format!(
            "upstreams:\n  - address: {}\n    tls: true\n    sni: backend.test\n    host: backend.test\n{ca_line}",
            backend.addr
        )
    };
    let verified = Lb::start(
        listen_address(),
        &upstream(&format!("    ca_file: {}\n", ca.display())),
    );
    let response = verified.get("/").unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, "secure");
    let seen = backend.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.sni.as_deref(), Some("backend.test"));
    assert_eq!(seen.host.as_deref(), Some("backend.test"));

    // Without the CA the certificate chain is untrusted: the request must not go through.
    // (Health checks are off so the failure shows in the proxy, not as a down backend.)
    let unverified = Lb::start(
        listen_address(),
        &format!("{}health_check:\n  kind: none\n", upstream("")),
    );
    let before = backend.requests.load(std::sync::atomic::Ordering::Relaxed);
    let response = unverified.get("/").unwrap();
    assert_eq!(response.status, 502, "{response:?}");
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::Relaxed),
        before
    );
}

#[test]
fn a_dead_backend_fails_no_request_even_before_health_checks_notice() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let dead = free_port();
    let lb = Lb::start(
        listen_address(),
        &format!(
            "upstreams:\n  - address: 127.0.0.1:{dead}\n  - address: {}\n  - address: {}\nhealth_check:\n  kind: none\n",
            a.addr, b.addr
        ),
    );
    for i in 0..30 {
        let response = lb.get("/").unwrap();
        assert_eq!(response.status, 200, "request {i}: {response:?}");
    }
    // One warning per failover, pingora-lb's; pingora's own would repeat it.
    let log = lb.error_log();
    let about_dead: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!(":{dead}")))
        .collect();
    assert!(!about_dead.is_empty(), "{log}");
    // After five failures in a row passive health takes it out, which it says once.
    let (ejected, failovers): (Vec<&str>, Vec<&str>) = about_dead
        .iter()
        .partition(|l| l.contains("failed 5 requests in a row; out of rotation"));
    assert_eq!(ejected.len(), 1, "{log}");
    assert_eq!(failovers.len(), 5, "{log}");
    assert!(
        failovers
            .iter()
            .all(|l| l.contains(&format!("cannot connect to backend 127.0.0.1:{dead}"))),
        "{log}"
    );
}

#[test]
fn an_http_health_check_wants_its_status_path_and_host() {
    let backend = Backend::start("a");
    let addr = backend.addr;
    let lb = Lb::start(
        listen_address(),
        &format!(
            "{}health_check:\n  kind: http\n  path: /health\n  expected_status: 204\n  interval: 200ms\n  timeout: 200ms\n  rise: 1\n  fall: 1\n",
            upstreams(&[backend.addr])
        ),
    );
    lb.wait_for_log(
        &format!("backend {addr} becomes unhealthy"),
        Duration::from_secs(3),
    );
    assert!(
        lb.error_log().contains("health check expected status 204"),
        "{}",
        lb.error_log()
    );
    assert_eq!(lb.get("/").unwrap().status, 503);
    let seen = backend.seen.lock().unwrap();
    let probe = seen.iter().find(|s| s.path == "/health").expect("a probe");
    assert_eq!(probe.host.as_deref(), Some(addr.to_string().as_str()));
}

#[test]
fn a_client_that_goes_away_is_not_an_error() {
    let backend = Backend::start("a");
    let lb = Lb::start(listen_address(), &upstreams(&[backend.addr]));
    let mut client = std::net::TcpStream::connect(lb.listen).unwrap();
    std::io::Write::write_all(
        &mut client,
        b"GET /slow/1000 HTTP/1.1\r\nHost: test\r\n\r\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(client);
    // On either path (pingora-proxy's words, or the fast path's).
    lb.wait_for_log("client request failed: ", Duration::from_secs(3));
    let log = lb.error_log();
    assert!(!log.contains(" ERROR "), "{log}");
    assert_eq!(lb.get("/").unwrap().status, 200);
}

#[test]
fn health_checks_remove_and_restore_a_backend() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let b_addr = b.addr;
    let mut lb = Lb::start(
        listen_address(),
        &format!(
            "{}health_check:\n  kind: http\n  path: /health\n  interval: 200ms\n  timeout: 200ms\n  rise: 2\n  fall: 2\n",
            upstreams(&[a.addr, b.addr])
        ),
    );
    assert_eq!(count_backends(&lb, 4, &[]).len(), 2);

    b.stop();
    let stopped = Instant::now();
    lb.wait_for_log(
        &format!("backend {b_addr} becomes unhealthy"),
        Duration::from_secs(3),
    );
    // interval x fall, plus one probe's timeout and scheduling slack.
    assert!(
        stopped.elapsed() < Duration::from_millis(2 * 200 + 200 + 600),
        "{:?}",
        stopped.elapsed()
    );
    let counts = count_backends(&lb, 6, &[]);
    assert_eq!(counts.get("a"), Some(&6), "{counts:?}");
    lb.notify
        .expect("1/2 backends healthy", Duration::from_secs(2));

    let back = Backend::start_at("b", b_addr);
    let restarted = Instant::now();
    lb.wait_for_log(
        &format!("backend {b_addr} becomes healthy"),
        Duration::from_secs(3),
    );
    assert!(
        restarted.elapsed() < Duration::from_millis(2 * 200 + 800),
        "{:?}",
        restarted.elapsed()
    );
    assert_eq!(count_backends(&lb, 4, &[]).len(), 2);
    let log = lb.error_log();
    assert_eq!(
        log.matches(&format!("backend {b_addr} becomes unhealthy"))
            .count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches(&format!("backend {b_addr} becomes healthy"))
            .count(),
        1,
        "{log}"
    );
    drop(back);
}

#[test]
fn health_checks_run_whatever_the_selection_algorithm() {
    for algorithm in [
        "round_robin",
        "random",
        "consistent_hash",
        "least_connections",
        "power_of_two_choices",
    ] {
        let a = Backend::start("a");
        let b = Backend::start("b");
        let b_addr = b.addr;
        let lb = Lb::start(
            listen_address(),
            &format!(
                "{}selection: {{algorithm: {algorithm}}}\nhealth_check:\n  interval: 200ms\n  fall: 1\n",
                upstreams(&[a.addr, b.addr])
            ),
        );
        b.stop();
        lb.wait_for_log(
            &format!("backend {b_addr} becomes unhealthy"),
            Duration::from_secs(3),
        );
        let counts = count_backends(&lb, 4, &[]);
        assert_eq!(counts.get("a"), Some(&4), "{algorithm}: {counts:?}");
    }
}

#[test]
fn all_backends_down_is_answered_fast() {
    let lb = Lb::start(
        listen_address(),
        &format!(
            "upstreams:\n  - address: 127.0.0.1:{}\n  - address: 127.0.0.1:{}\n",
            free_port(),
            free_port()
        ),
    );
    let started = Instant::now();
    let response = lb.get("/").unwrap();
    assert!(
        response.status == 502 || response.status == 503,
        "{response:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}
