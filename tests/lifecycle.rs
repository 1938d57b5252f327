//! The daemon's life on real processes: privilege drop, systemd notifications, syslog,
//! signals, and reload by socket handoff, under load and when it fails.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

fn proc_status(pid: i32) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn started_as_root_it_serves_a_low_port_as_an_unprivileged_user_without_capabilities() {
    require_root();
    let backend = Backend::start("a");
    let addr = SocketAddr::from(([127, 0, 0, 1], privileged_port()));
    let lb = Lb::start(
        addr,
        &format!("user: nobody\n{}", upstreams(&[backend.addr])),
    );
    assert_eq!(lb.get("/").unwrap().status, 200);
    let status = proc_status(lb.pid);
    assert!(
        status["Uid"].split_whitespace().all(|id| id == "65534"),
        "{status:?}"
    );
    assert!(
        status["Gid"].split_whitespace().all(|id| id == "65534"),
        "{status:?}"
    );
    assert_eq!(status["Groups"], "65534");
    for set in ["CapEff", "CapPrm", "CapAmb", "CapInh", "CapBnd"] {
        assert_eq!(status[set], "0000000000000000", "{set}: {status:?}");
    }
    assert_eq!(status["NoNewPrivs"], "1");
    // Every thread, not just the main one.
    for task in std::fs::read_dir(format!("/proc/{}/task", lb.pid)).unwrap() {
        let task = task.unwrap().path();
        let text = std::fs::read_to_string(task.join("status")).unwrap();
        assert!(text.contains("CapEff:\t0000000000000000"), "{text}");
    }
}

#[test]
fn started_as_root_without_user_it_drops_to_nobody() {
    require_root();
    let backend = Backend::start("a");
    let dir = tempfile::tempdir().unwrap();
    // `user` is left out on purpose; write_config would otherwise add `user: root`.
    let config = dir.path().join("lb.yaml");
    let addr = listen_address();
    std::fs::write(
        &config,
        format!("listeners: [\"{addr}\"]\n{}", upstreams(&[backend.addr])),
    )
    .unwrap();
    let mut child = std::process::Command::new(BINARY)
        .arg("-c")
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || get(addr, "/", &[])
        .is_ok_and(|r| r.status == 200)));
    let status = proc_status(child.id() as i32);
    assert!(status["Uid"].starts_with("65534"), "{status:?}");
    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("switching to \"nobody\""));
}

#[test]
fn systemd_hears_ready_status_and_stopping() {
    let (_backend, mut lb) = balancer_with_one_backend("");
    // READY came first (Lb::start waited for it): a connection is accepted right away.
    assert_eq!(lb.get("/").unwrap().status, 200);
    let ready = lb
        .notify
        .messages
        .iter()
        .find(|m| m.contains("READY=1"))
        .unwrap()
        .clone();
    assert!(
        !ready.contains("MAINPID"),
        "a fresh start does not claim MAINPID: {ready}"
    );
    assert!(
        ready.contains("STATUS=serving on") && ready.contains("1/1 backends healthy"),
        "{ready}"
    );
    signal(lb.pid, Signal::SIGTERM);
    lb.notify.expect("STOPPING=1", Duration::from_secs(5));
    let mut child = lb.child.take().unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn the_error_log_reaches_syslog_with_the_configured_identifier() {
    let mut syslog = DatagramSocket::in_new_directory();
    let (_backend, lb) = balancer_with_one_backend(&format!(
        "error_log: syslog\nsyslog:\n  identifier: lb-test\n  facility: local3\n  socket: {}\n",
        syslog.path.display()
    ));
    let serving = syslog.expect("serving on", Duration::from_secs(5));
    // RFC 3164: <PRI> with local3 (19) * 8 + info (6) = 158, then "lb-test[PID]:".
    assert!(serving.starts_with("<158>"), "{serving}");
    assert!(
        serving.contains(&format!("lb-test[{}]", lb.pid)),
        "{serving}"
    );
}

#[test]
fn sighup_does_not_kill_and_sigterm_lets_a_slow_request_finish() {
    let (_backend, mut lb) = balancer_with_one_backend("");
    signal(lb.pid, Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(lb.pid));
    assert_eq!(lb.get("/").unwrap().status, 200);

    let addr = lb.listen;
    let slow = std::thread::spawn(move || get(addr, "/slow/2000", &[]));
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    signal(lb.pid, Signal::SIGTERM);
    let response = slow
        .join()
        .unwrap()
        .expect("the in-flight request finished");
    assert_eq!(response.status, 200);
    let mut child = lb.child.take().unwrap();
    assert!(child.wait().unwrap().success());
    let took = signalled.elapsed();
    // The request needed ~1.7 s more; exit follows at once, far from the 5 s grace period.
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(3000),
        "{took:?}"
    );
}

#[test]
fn sigterm_on_an_idle_process_exits_promptly() {
    let (_backend, mut lb) = balancer_with_one_backend("");
    let signalled = Instant::now();
    signal(lb.pid, Signal::SIGTERM);
    let mut child = lb.child.take().unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        signalled.elapsed() < Duration::from_millis(2000),
        "{:?}",
        signalled.elapsed()
    );
    assert!(
        !lb.dir.path().join("run/pingora-lb.pid").exists()
            || std::fs::read_to_string(lb.dir.path().join("run/pingora-lb.pid"))
                .unwrap()
                .is_empty()
    );
}

#[test]
fn daemon_mode_returns_once_serving() {
    let backend = Backend::start("a");
    let addr = listen_address();
    let (dir, config) = config_in_new_directory(&format!(
        "listeners: [\"{addr}\"]\n{}",
        upstreams(&[backend.addr])
    ));
    let status = std::process::Command::new(BINARY)
        .arg("-d")
        .arg("-c")
        .arg(&config)
        .status()
        .unwrap();
    assert!(status.success());
    // No waiting: it serves as soon as -d returns.
    assert_eq!(get(addr, "/", &[]).unwrap().status, 200);
    let pid: i32 = std::fs::read_to_string(dir.path().join("run/pingora-lb.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    signal(pid, Signal::SIGTERM);
    assert!(eventually(Duration::from_secs(5), || !alive(pid)));
}

/// Bounded continuous load: keep-alive clients, a new connection per request, and slow
/// requests, on new connections and on kept-alive ones (a response that goes out after
/// its process started draining must close its connection). Returns (successes, failures).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, limit: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures: Arc<Mutex<Vec<String>>> = Default::default();
        let deadline = Instant::now() + limit;
        let mut threads = Vec::new();
        for kind in [
            "keepalive",
            "keepalive",
            "keepalive",
            "new",
            "new",
            "slow",
            "slow",
            "slow-keepalive",
            "slow-keepalive",
        ] {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            threads.push(std::thread::spawn(move || {
                let mut client: Option<Client> = None;
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && sent < 200_000 {
                    sent += 1;
                    let result = match kind {
                        "keepalive" | "slow-keepalive" => {
                            if client.as_ref().is_none_or(|c| c.closed_by_server) {
                                client = Client::connect(addr).ok();
                            }
                            // Slower than the drain's first second (`stop_accepting_after`),
                            // after which a draining process closes idle connections.
                            let path = match kind {
                                "keepalive" => "/",
                                _ => "/slow/1500",
                            };
                            match client.as_mut() {
                                Some(c) => c.request(path, &[], false),
                                None => Err(std::io::Error::other("connect failed")),
                            }
                        }
                        "new" => get(addr, "/", &[]),
                        _ => get(addr, "/slow/300", &[]),
                    };
                    match result {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{kind}: status {}", r.status)),
                        Err(e) => {
                            failures.lock().unwrap().push(format!("{kind}: {e}"));
                            client = None;
                        }
                    }
                }
            }));
        }
        Load {
            stop,
            ok,
            failures,
            threads,
        }
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failures.lock().unwrap().clone(),
        )
    }
}

#[test]
fn twenty_reloads_under_load_fail_no_request() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let mut lb = Lb::start(listen_address(), &upstreams(&[a.addr, b.addr]));
    let first = lb.pid;
    let load = Load::start(lb.listen, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(300));
    let mut pids = vec![first];
    for round in 0..20 {
        let old = lb.pid;
        let outcome = lb.reload(&[]);
        assert_eq!(
            outcome.code,
            0,
            "reload {round}: {outcome:?}\n{}",
            lb.error_log()
        );
        assert_ne!(lb.pid, old);
        pids.push(lb.pid);
        // The new process announced itself as the main process, and the old one drains
        // without telling systemd it stops.
        lb.notify
            .expect(&format!("MAINPID={}", lb.pid), Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(150));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed of {}: {failures:?}",
        failures.len(),
        ok + failures.len()
    );
    assert!(ok > 200, "too little load: {ok}");
    let messages = lb.notify.drain(Duration::from_millis(200));
    assert!(
        !messages.iter().any(|m| m.contains("STOPPING=1")),
        "{messages:?}"
    );
    assert_eq!(
        messages.iter().filter(|m| m.contains("READY=1")).count(),
        21
    );
    // Every old process has drained and gone.
    assert!(eventually(Duration::from_secs(10), || pids[..20]
        .iter()
        .all(|p| !alive(*p))));
    assert!(alive(lb.pid));
}

/// A backend that answers each request with `103 Early Hints` and then `200`, the 103
/// only once `go` says so: it tells `received` when a request has arrived, so a test can
/// change the balancer's state while the request is in flight.
fn early_hints_backend(received: Sender<()>, go: Receiver<()>) -> SocketAddr {
    let listener = held_port();
    let addr = listener.local_addr().unwrap();
    let go = Arc::new(Mutex::new(go));
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let (received, go) = (received.clone(), go.clone());
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    // Health checks connect and close without a request.
                    if stream.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = received.send(());
                let _ = go.lock().unwrap().recv_timeout(Duration::from_secs(10));
                let _ = stream.write_all(
                    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
                      HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
                );
                std::thread::sleep(Duration::from_secs(2));
            });
        }
    });
    addr
}

#[test]
fn a_draining_process_closes_on_the_final_response_not_on_an_early_hint() {
    let (received, backend_received) = channel();
    let (go, backend_go) = channel();
    let backend = early_hints_backend(received, backend_go);
    let mut lb = Lb::start(listen_address(), &upstreams(&[backend]));
    let mut client = TcpStream::connect(lb.listen).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client
        .write_all(b"GET /page HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .unwrap();
    backend_received
        .recv_timeout(Duration::from_secs(5))
        .expect("the request reached the backend");
    let outcome = lb.reload(&[]);
    assert_eq!(outcome.code, 0, "{outcome:?}\n{}", lb.error_log());
    // The reload ends when the new process is ready, which may be before the old one
    // has heard that it serves.
    assert!(eventually(Duration::from_secs(5), || lb
        .error_log()
        .contains("this one drains")));
    go.send(()).unwrap();

    let mut answer = Vec::new();
    let end = client.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    // The draining process closed the connection after the final response.
    assert!(end.is_ok(), "{end:?}: {answer}");
    let (hint, last) = answer.split_once("\r\n\r\n").unwrap();
    assert!(hint.starts_with("http/1.1 103"), "{answer}");
    assert!(hint.contains("link: </style.css>"), "{answer}");
    assert!(!hint.contains("connection"), "{answer}");
    assert!(last.starts_with("http/1.1 200"), "{answer}");
    assert!(last.contains("connection: close\r\n"), "{answer}");
    assert!(last.ends_with("\r\n\r\nfinal"), "{answer}");
}

/// Starts a balancer, rewrites its configuration with `change`, reloads, and checks the
/// reload failed with `code` and `words` while the running process kept serving untouched.
fn failed_reload(
    change: impl Fn(&str, &Backend) -> String,
    extra: &[&str],
    code: i32,
    words: &str,
) -> Lb {
    let (backend, mut lb) = balancer_with_one_backend("");
    let pid = lb.pid;
    let good = std::fs::read_to_string(&lb.config).unwrap();
    std::fs::write(&lb.config, change(&good, &backend)).unwrap();
    let outcome = lb.reload(extra);
    assert_failed(&outcome, code, words);
    assert_eq!(lb.pid, pid);
    assert!(alive(pid));
    for _ in 0..5 {
        assert_eq!(lb.get("/").unwrap().status, 200);
    }
    lb
}

#[test]
fn a_reload_with_a_broken_config_changes_nothing() {
    failed_reload(
        |good, _| good.replace("upstreams:", "upstreamz:"),
        &[],
        78,
        "upstreamz",
    );
}

#[test]
fn a_new_process_that_dies_before_taking_the_sockets_changes_nothing() {
    // Valid for the config check, fatal at start: the user does not exist.
    failed_reload(
        |good, _| good.replace("user: root\n", "") + "user: no-such-user-pingora-lb\n",
        &[],
        69,
        "could not start: key `user`: no user \"no-such-user-pingora-lb\"",
    );
}

#[test]
fn a_new_process_that_dies_after_taking_the_sockets_changes_nothing() {
    // Valid for the config check, fatal after the handoff: the name does not resolve.
    let lb = failed_reload(
        |good, backend| good.replace(&backend.addr.to_string(), "backend.invalid:80"),
        &[],
        69,
        "could not start: cannot resolve backend backend.invalid:80",
    );
    lb.wait_for_log("keeps serving", Duration::from_secs(2));
}

#[test]
fn an_unreachable_upgrade_socket_fails_the_reload_and_changes_nothing() {
    // The new process waits on a socket the running one does not know about.
    let started = Instant::now();
    let lb = failed_reload(
        |good, _| good.replace("run/upgrade.sock", "elsewhere/upgrade.sock"),
        &["--timeout", "7"],
        69,
        "did not serve within 7s",
    );
    assert!(started.elapsed() < Duration::from_secs(12));
    assert!(
        lb.error_log().contains("upgrade failed"),
        "{}",
        lb.error_log()
    );
}

#[test]
fn the_manual_upgrade_works_with_sigquit_first() {
    // pingora's documented flow in the other order: SIGQUIT to the old process, then the
    // new one started with -u within the retry window (5 s: a loaded machine needs most
    // of what is left of it to start the new process).
    let (_backend, mut lb) = balancer_with_one_backend("");
    let old = lb.pid;
    signal(old, Signal::SIGQUIT);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        lb.get("/").unwrap().status,
        200,
        "the old process serves while it waits"
    );
    let mut new = std::process::Command::new(BINARY)
        .arg("-u")
        .arg("-c")
        .arg(&lb.config)
        .env("NOTIFY_SOCKET", &lb.notify.path)
        .spawn()
        .unwrap();
    lb.notify
        .expect(&format!("MAINPID={}", new.id()), Duration::from_secs(10));
    lb.successors.push(new.id() as i32);
    assert!(eventually(Duration::from_secs(5), || !alive(old)));
    assert_eq!(lb.get("/").unwrap().status, 200);
    new.kill().unwrap();
    new.wait().unwrap();
}

#[test]
fn a_sigquit_sent_the_moment_it_is_ready_is_not_lost() {
    // READY=1 is what `pingora-lb reload` and scripts wait for before SIGQUIT; until the
    // handler listens the signal is ignored, so READY=1 must not come before it. The window
    // is narrow: several starts give a loaded machine the chance to show it.
    for _ in 0..6 {
        let (_backend, lb) = balancer_with_one_backend("");
        signal(lb.pid, Signal::SIGQUIT);
        lb.wait_for_log(
            "SIGQUIT: handing the listening sockets over",
            Duration::from_secs(3),
        );
    }
}

#[test]
fn a_missing_user_is_a_failure_no_restart_can_fix() {
    require_root();
    let (_dir, config) = config_in_new_directory(&format!(
        "listeners: [\"{}\"]\nuser: no-such-user-pingora-lb\n{}",
        listen_address(),
        upstreams(&["127.0.0.1:9".parse().unwrap()])
    ));
    let outcome = start_to_end(&config);
    // EX_NOUSER, which the unit's RestartPreventExitStatus lists.
    assert_failed(
        &outcome,
        67,
        "key `user`: no user \"no-such-user-pingora-lb\" exists",
    );
}
