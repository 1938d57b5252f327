//! A member of a keepalived pair: listening on a virtual IP the machine does not hold yet
//! (`freebind`), and `pingora-lb status`, the track script's question. The failover itself,
//! with real keepalived in network namespaces, is tests/ha/failover.sh.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use support::*;

/// An address of TEST-NET-1 (RFC 5737): no interface of a test machine holds it.
const ABSENT_IP: &str = "192.0.2.77";

/// Whether a socket listens on `address` in this network namespace, as the kernel says.
fn kernel_listens_on(address: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = address else {
        panic!("IPv4 only")
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    const LISTEN: &str = "0A";
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .any(|fields| fields[1] == local && fields[3] == LISTEN)
}

fn status(config: &std::path::Path) -> Outcome {
    run(Command::new(BINARY).arg("status").arg("-c").arg(config))
}

/// Kills the balancer and reaps it, keeping its configuration file.
fn stop(lb: &mut Lb) {
    let mut child = lb.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_freebind_listener_listens_on_an_address_no_interface_holds() {
    let backend = Backend::start("a");
    let virtual_ip: SocketAddr = format!("{ABSENT_IP}:{}", free_port()).parse().unwrap();
    let plain = listen_address();
    let listeners = |freebind: &str| {
        format!(
            "listeners:\n  - \"{plain}\"\n  - {{address: \"{virtual_ip}\"{freebind}}}\n{}",
            upstreams(&[backend.addr])
        )
    };

    let (_dir, refused) = config_in_new_directory(&listeners(""));
    let outcome = start_to_end(&refused);
    assert_failed(&outcome, 69, &format!("cannot listen on {virtual_ip}"));
    assert_failed(&outcome, 69, "set `freebind: true` on the listener");
    assert!(!kernel_listens_on(virtual_ip));

    let mut lb = Lb::start_with_listeners(&listeners(", freebind: true"), plain);
    assert!(kernel_listens_on(virtual_ip), "{}", lb.error_log());
    assert_eq!(lb.get("/").unwrap().status, 200);
    // The successor takes the socket over; it does not bind it again.
    let outcome = lb.reload(&[]);
    assert!(outcome.code == 0, "{outcome:?}");
    assert!(kernel_listens_on(virtual_ip), "{}", lb.error_log());
}

#[test]
fn status_answers_whether_this_balancer_can_take_traffic() {
    let backend = Backend::start("a");
    let metrics = listen_address();
    let mut lb = Lb::start(
        listen_address(),
        &format!(
            "{}health_check:\n  interval: 200ms\nmetrics:\n  listen: {metrics}\n",
            upstreams(&[backend.addr])
        ),
    );
    let serving = status(&lb.config);
    assert_eq!(serving.code, 0, "{serving:?}");
    assert!(
        serving.stdout.contains(&format!(
            "process {} serves; pool default 1/1 usable",
            lb.pid
        )),
        "{serving:?}"
    );

    backend.stop();
    assert!(
        eventually(Duration::from_secs(5), || status(&lb.config).code != 0),
        "status still succeeds with the only backend down"
    );
    assert_failed(
        &status(&lb.config),
        69,
        "not serving: pool `default` has no usable backend (1 backends: 1 unhealthy, 0 draining)",
    );

    // Stopping, the process says so at once, while it still answers (and drains): the
    // virtual IP can move before its listeners close.
    // The answer already fails (the backend is down), so wait for the words, not the code.
    let stopping = format!("not serving: process {} is stopping", lb.pid);
    signal(lb.pid, Signal::SIGTERM);
    let mut answer = status(&lb.config);
    eventually(Duration::from_secs(1), || {
        answer = status(&lb.config);
        answer.stderr.contains(&stopping)
    });
    assert_failed(&answer, 69, &stopping);

    stop(&mut lb);
    assert_failed(
        &status(&lb.config),
        69,
        &format!("not serving: the status endpoint {metrics} does not answer"),
    );
}

#[test]
fn without_a_metrics_endpoint_status_only_knows_the_process_runs() {
    let (_backend, mut lb) = balancer_with_one_backend("");
    let running = status(&lb.config);
    assert_eq!(running.code, 0, "{running:?}");
    assert!(running.stdout.contains(&format!(
        "process {} runs; backend health unknown (set metrics.listen to check it)",
        lb.pid
    )));
    stop(&mut lb);
    assert_failed(&status(&lb.config), 69, "is not running");

    let (_dir, broken) = config_in_new_directory("listeners: [\"127.0.0.1:1\"]\n");
    assert_failed(&status(&broken), 78, "configuration error");
}
