//! Hostile clients, broken backends and careless operators, against the real binary:
//! nothing hangs, nothing is forwarded that RFC 9112 says to refuse, and every failure
//! says what and where.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// The status line of every response in `text` (a body need not end with a newline).
fn status_lines(text: &str) -> Vec<&str> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text[at..].lines().next())
        .collect()
}

#[test]
fn requests_rfc_9112_refuses_are_not_forwarded() {
    let (backend, lb) =
        balancer_with_one_backend("client:\n  max_uri_length: 1024\n  max_header_count: 20\n");
    let quiet = Duration::from_secs(3);
    let long_path = format!("/{}", "a".repeat(2000));
    let big_header = format!("X-Big: {}\r\n", "b".repeat(40_000));
    let many_headers: String = (0..30).map(|i| format!("X-H{i}: v\r\n")).collect();
    let table: Vec<(String, &str)> = vec![
        ("GET / HTTP/1.1\r\n\r\n".into(), "400"),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab".into(),
            "400",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\n\r\nab".into(),
            "400",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc".into(),
            "400",
        ),
        (
            format!("GET {long_path} HTTP/1.1\r\nHost: a\r\n\r\n"),
            "414",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: a\r\n{big_header}\r\n"),
            "431",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: a\r\n{many_headers}\r\n"),
            "431",
        ),
    ];
    for (request, status) in &table {
        let response = exchange(lb.listen, request.as_bytes(), quiet);
        let first = status_lines(&response);
        assert!(
            first.len() == 1 && first[0].starts_with(&format!("HTTP/1.1 {status}")),
            "{:.80}: expected one {status}, got {response:.200}",
            request
        );
    }
    assert_eq!(
        backend.requests.load(Ordering::Relaxed),
        0,
        "a refused request reached the backend"
    );
    // HTTP/1.0 needs no Host; a well-formed request still passes.
    let response = exchange(lb.listen, b"GET / HTTP/1.0\r\n\r\n", quiet);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[test]
fn pipelined_requests_are_all_answered_in_order() {
    let (backend, lb) = balancer_with_one_backend("");
    let mut requests = String::new();
    for i in 1..=5 {
        let close = if i == 5 { "Connection: close\r\n" } else { "" };
        requests.push_str(&format!("GET /{i} HTTP/1.1\r\nHost: a\r\n{close}\r\n"));
    }
    let response = exchange(lb.listen, requests.as_bytes(), Duration::from_secs(5));
    assert_eq!(
        status_lines(&response),
        vec!["HTTP/1.1 200 OK"; 5],
        "{response}"
    );
    let paths: Vec<String> = backend
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(paths, ["/1", "/2", "/3", "/4", "/5"]);
}

#[test]
fn slow_and_idle_clients_are_closed_without_starving_others() {
    let (_backend, lb) =
        balancer_with_one_backend("client:\n  header_timeout: 2s\n  keepalive_timeout: 1s\n");
    // Slowloris: 20 connections sending their header one byte every 300 ms, each read
    // well inside any per-read timeout.
    let started = Instant::now();
    let slow: Vec<std::thread::JoinHandle<Option<Duration>>> = (0..20)
        .map(|_| {
            let addr = lb.listen;
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).unwrap();
                let opened = Instant::now();
                for byte in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: "
                    .iter()
                    .chain([b'x'; 60].iter())
                {
                    std::thread::sleep(Duration::from_millis(300));
                    if stream.write_all(&[*byte]).is_err() {
                        return Some(opened.elapsed());
                    }
                }
                None
            })
        })
        .collect();
    // Normal clients are served meanwhile.
    for _ in 0..10 {
        assert_eq!(lb.get("/").unwrap().status, 200);
    }
    for handle in slow {
        let closed_after = handle
            .join()
            .unwrap()
            .expect("a slow client was never closed");
        assert!(
            closed_after < Duration::from_secs(6),
            "closed after {closed_after:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(15));

    // An idle kept-alive connection is closed after keepalive_timeout.
    let mut client = Client::connect(lb.listen).unwrap();
    assert_eq!(client.request("/", &[], false).unwrap().status, 200);
    let idle = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    let after_idle = client.request("/", &[], false);
    assert!(
        after_idle.is_err(),
        "an idle connection was still open after {:?}",
        idle.elapsed()
    );
}

/// `client.keepalive_requests` counts every request of a connection, whichever path serves
/// it: a request that takes pingora-proxy's path after some served by the fast path
/// continues the count instead of starting another.
#[test]
fn keepalive_requests_counts_the_requests_of_both_paths() {
    let (_backend, lb) = balancer_with_one_backend("client:\n  keepalive_requests: 3\n");
    let mut client = Client::connect(lb.listen).unwrap();
    assert_eq!(client.request("/1", &[], false).unwrap().status, 200);
    // `TE` sends a request to pingora-proxy's path.
    let second = client.request("/2", &[("TE", "trailers")], false).unwrap();
    assert_eq!(second.status, 200);
    assert!(!client.closed_by_server, "closed after 2 requests of 3");
    assert_eq!(client.request("/3", &[], false).unwrap().status, 200);
    assert!(
        client.closed_by_server,
        "the third request of 3 did not close"
    );
    assert!(client.request("/4", &[], false).is_err());
}

#[test]
fn a_thousand_idle_connections_do_not_stop_new_ones() {
    let (_backend, lb) = balancer_with_one_backend("");
    // Each holds a kept-alive connection after one answered request.
    let idle: Vec<Client> = (0..1000)
        .map(|_| {
            let mut client = Client::connect(lb.listen).unwrap();
            assert_eq!(client.request("/", &[], false).unwrap().status, 200);
            client
        })
        .collect();
    for _ in 0..20 {
        assert_eq!(lb.get("/").unwrap().status, 200);
    }
    drop(idle);
}

/// A backend that keeps connections alive as far as its responses say, but closes each
/// one `close_after` after answering (as Node, gunicorn and Apache do on their own clock).
fn closing_backend(close_after: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = held_port();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let counter = answered.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let _ = reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                counter.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(close_after);
            });
        }
    });
    (addr, answered)
}

#[test]
fn a_backend_closing_kept_alive_connections_costs_no_request() {
    for close_after in [
        Duration::ZERO,
        Duration::from_millis(1),
        Duration::from_millis(5),
    ] {
        let (backend, answered) = closing_backend(close_after);
        let lb = Lb::start(
            listen_address(),
            &(upstreams(&[backend]) + "health_check:\n  kind: none\n"),
        );
        let mut client = Client::connect(lb.listen).unwrap();
        let mut failed = Vec::new();
        for i in 0..150 {
            let request = if i % 3 == 0 {
                format!("POST /{i} HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody")
            } else {
                format!("GET /{i} HTTP/1.1\r\nHost: a\r\n\r\n")
            };
            client = match send_on(client, lb.listen, &request) {
                (client, 200) => client,
                (client, status) => {
                    failed.push((i, status));
                    client
                }
            };
        }
        assert!(
            failed.is_empty(),
            "close after {close_after:?}: failed {failed:?}"
        );
        assert!(eventually(Duration::from_secs(2), || answered
            .load(Ordering::Relaxed)
            >= 150));
    }
}

/// Sends one request on a kept-alive client connection (reconnecting if the balancer
/// closed it), returning the status.
fn send_on(client: Client, addr: SocketAddr, request: &str) -> (Client, u16) {
    let mut stream = client.into_stream();
    if stream.write_all(request.as_bytes()).is_err() {
        stream = TcpStream::connect(addr).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    let _ = reader.read_line(&mut status_line);
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    (Client::from_stream(reader.into_inner()), status)
}

#[test]
fn broken_backends_give_502_and_silent_ones_504_in_time() {
    let cases: [(&[u8], bool, u16); 3] = [
        (b"", false, 504),
        (b"", true, 502),
        (b"NOT HTTP AT ALL\r\n\r\n", false, 502),
    ];
    for (answer, reset, expected) in cases {
        let backend = broken_backend(answer, reset);
        let lb = Lb::start(
            listen_address(),
            &(upstreams(&[backend]) + "health_check:\n  kind: none\ntimeouts:\n  read: 1s\n"),
        );
        let started = Instant::now();
        let response = lb.get("/").unwrap();
        assert_eq!(
            response.status, expected,
            "answer {answer:?}, reset {reset}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn the_reload_command_lets_go_of_its_callers_output() {
    let (_backend, lb) = balancer_with_one_backend("");
    let mut command = Command::new(BINARY);
    command
        .args(["reload", "-c"])
        .arg(&lb.config)
        .args(["--pid", &lb.pid.to_string()])
        .env("NOTIFY_SOCKET", &lb.notify.path)
        .stdin(Stdio::null());
    // As `out=$(pingora-lb reload ...)` runs it: stdout and stderr are pipes read to EOF.
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(command.output());
    });
    let outcome: Outcome = receiver
        .recv_timeout(Duration::from_secs(20))
        .expect("the reload command's output stayed open")
        .unwrap()
        .into();
    assert_eq!(outcome.code, 0, "{outcome:?}");
    let _successor = KillOnDrop(reloaded_pid(&outcome.stdout));
    assert!(eventually(Duration::from_secs(10), || !alive(lb.pid)));
    assert_eq!(lb.get("/").unwrap().status, 200);
}

#[test]
fn a_reload_without_c_keeps_the_running_configuration() {
    let (_backend, lb) = balancer_with_one_backend("");
    let outcome = run(Command::new(BINARY)
        .args(["reload", "--pid", &lb.pid.to_string()])
        .env("NOTIFY_SOCKET", &lb.notify.path));
    assert_eq!(outcome.code, 0, "{outcome:?}");
    let new_pid = reloaded_pid(&outcome.stdout);
    let _successor = KillOnDrop(new_pid);
    let cmdline = std::fs::read_to_string(format!("/proc/{new_pid}/cmdline")).unwrap();
    assert!(
        cmdline.contains(&lb.config.display().to_string()),
        "{cmdline:?}"
    );
    assert!(eventually(Duration::from_secs(10), || !alive(lb.pid)));
    let response = lb.get("/").unwrap();
    assert_eq!((response.status, response.backend()), (200, "a"));
}

#[test]
fn a_reload_never_signals_a_process_that_is_not_pingora_lb() {
    let (_backend, lb) = balancer_with_one_backend("");
    let mut bystander = Command::new("sleep").arg("30").spawn().unwrap();
    let outcome = run(Command::new(BINARY)
        .args(["reload", "-c"])
        .arg(&lb.config)
        .args(["--pid", &bystander.id().to_string()]));
    assert_failed(&outcome, 64, "runs sleep, not pingora-lb");
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "the bystander was signalled"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}

#[test]
fn operator_faults_change_nothing() {
    let (_backend, mut lb) = balancer_with_one_backend("");
    let pid = lb.pid;
    // SIGQUIT twice with no successor waiting: one handoff attempt, then serving as before.
    signal(pid, Signal::SIGQUIT);
    lb.wait_for_log(
        "handing the listening sockets over",
        Duration::from_secs(10),
    );
    signal(pid, Signal::SIGQUIT);
    assert_eq!(lb.get("/").unwrap().status, 200);
    lb.wait_for_log("this process keeps serving", Duration::from_secs(15));
    assert!(lb.error_log().contains("a handoff is already under way"));
    // A reload whose configuration file vanished.
    let config = lb.config.clone();
    let kept = std::fs::read_to_string(&config).unwrap();
    std::fs::remove_file(&config).unwrap();
    let outcome = lb.reload(&[]);
    assert_failed(&outcome, 78, "cannot read the configuration file");
    std::fs::write(&config, kept).unwrap();
    assert_eq!(lb.pid, pid);
    assert_eq!(lb.get("/").unwrap().status, 200);
    // And a reload after all that still works.
    assert_eq!(lb.reload(&[]).code, 0);
    assert_eq!(lb.get("/").unwrap().status, 200);
}

#[test]
fn a_reload_onto_a_taken_port_says_which_every_time() {
    let (_backend, mut lb) = balancer_with_one_backend("");
    let taken = held_port();
    let port = taken.local_addr().unwrap();
    let good = std::fs::read_to_string(&lb.config).unwrap();
    std::fs::write(
        &lb.config,
        good.replace("listeners: [\"", &format!("listeners: [\"{port}\", \"")),
    )
    .unwrap();
    let pid = lb.pid;
    for _ in 0..10 {
        assert_port_taken(&lb.reload(&[]), port);
        assert_eq!(lb.pid, pid);
    }
    assert_eq!(lb.get("/").unwrap().status, 200);
}

#[test]
fn runtime_files_in_a_world_writable_directory_are_refused_at_check() {
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        shared.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    for key in ["upgrade_sock", "pid_file"] {
        let (_dir, config) = config_in_new_directory(&format!(
            "{key}: {}/lb.file\nlisteners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\n",
            shared.path().display()
        ));
        let line = std::fs::read_to_string(&config)
            .unwrap()
            .lines()
            .position(|l| l.starts_with(&format!("{key}:")))
            .unwrap()
            + 1;
        let Outcome { code, stderr, .. } = check_config(&config);
        assert_eq!(code, 78, "{key}: {stderr}");
        assert!(
            stderr.contains(&format!(":{line}: key `{key}`"))
                && stderr.contains("writable by everyone"),
            "{key}: {stderr}"
        );
    }
}

#[test]
fn a_pid_file_that_is_a_symbolic_link_is_not_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::create_dir(dir.path().join("run")).unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("run/pingora-lb.pid")).unwrap();
    let backend = Backend::start("a");
    let config = write_config(
        dir.path(),
        &format!(
            "listeners: [\"{}\"]\n{}",
            listen_address(),
            upstreams(&[backend.addr])
        ),
    );
    let Outcome { code, stderr, .. } = start_to_end(&config);
    assert_eq!(code, 73, "{stderr}");
    assert!(
        stderr.contains("key `pid_file`") && stderr.contains("symbolic link"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
}

/// A process of another user that managed to listen on `upgrade_sock` gets nothing: the
/// running process checks who is on the other end before sending its sockets.
#[test]
fn sockets_are_never_handed_to_another_user() {
    if !is_root() {
        eprintln!("skipped: needs root to run the impostor as another user");
        return;
    }
    let (_backend, lb) = balancer_with_one_backend("");
    let run = lb.dir.path().join("run");
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let socket = run.join("upgrade.sock");
    let impostor = r#"
import array, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(1); s.settimeout(15)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(5)
try:
    msg, anc, flags, addr = c.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
except OSError:
    anc = []
fds = array.array("i")
for level, kind, data in anc:
    fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
print("received", len(fds), flush=True)
"#;
    let mut child = Command::new("python3")
        .args(["-c", impostor])
        .arg(&socket)
        .stdout(Stdio::piped())
        .uid(65534)
        .gid(65534)
        .spawn()
        .unwrap();
    let mut output = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    signal(lb.pid, Signal::SIGQUIT);
    line.clear();
    output.read_line(&mut line).unwrap();
    let _ = child.wait();
    assert_eq!(line.trim(), "received 0", "the impostor got sockets");
    lb.wait_for_log("refusing to hand the sockets", Duration::from_secs(5));
    assert!(alive(lb.pid));
    assert_eq!(lb.get("/").unwrap().status, 200);
}
