//! `-t` and start-up reject bad configurations with the file, line and key, and exit 78,
//! without binding or writing anything.

mod support;

use std::net::TcpListener;
use std::process::Command;

use support::*;

const GOOD: &str = "listeners: [\"127.0.0.1:PORT\"]\nupstreams:\n  - address: 127.0.0.1:9\n";

fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, text).unwrap();
    let (code, stderr) = check_config(&path);
    (
        code.unwrap_or(-1),
        stderr.replace(&path.display().to_string(), "FILE"),
    )
}

#[test]
fn bad_configurations_name_file_line_and_key() {
    // (configuration, line, key, words of the explanation)
    let table: &[(&str, usize, &str, &str)] = &[
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\n    wieght: 2\n", 4, "upstreams[0]", "unknown field `wieght`"),
        ("listeners: [\"127.0.0.1:1\"]\nupstream:\n  - address: 127.0.0.1:2\n", 2, "", "unknown field `upstream`"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams: []\n", 2, "upstreams", "at least one"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\n    weight: 0\n", 4, "upstreams[0].weight", "between 1 and 1000"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\nselection:\n  algorithm: least_conn\n", 5, "selection", "unknown variant `least_conn`"),
        ("listeners: [\"127.0.0.1:99999\"]\nupstreams:\n  - address: 127.0.0.1:2\n", 1, "listeners[0]", "not a listening address"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 300.0.0.1:80\n", 3, "upstreams[0].address", "not a backend address"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\npid_file: run/lb.pid\n", 4, "pid_file", "not an absolute file path"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\nupgrade_sock: upgrade.sock\n", 4, "upgrade_sock", "not an absolute file path"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\n    tls: true\n    sni: a.test\n    ca_file: /nonexistent/ca.pem\n", 6, "upstreams[0].ca_file", "cannot read CA file"),
        ("listeners: [\"127.0.0.1:1\"]\nthreads: many\nupstreams:\n  - address: 127.0.0.1:2\n", 2, "threads", "invalid type"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\nhealth_check:\n  interval: soon\n", 5, "health_check.interval", "not a positive duration"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\n  - address: 127.0.0.1:2\n", 4, "upstreams[1].address", "listed twice"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\nhealth_check:\n  interval: 10ms\n", 5, "health_check.interval", "at least 100ms"),
        ("listeners: [\"127.0.0.1:1\"\nupstreams:\n", 2, "", "did not find expected"),
    ];
    for (text, line, key, words) in table {
        let (code, stderr) = check(text);
        assert_eq!(code, 78, "{text}\n{stderr}");
        assert!(
            stderr.contains(&format!("FILE:{line}:")),
            "expected line {line} for:\n{text}\ngot: {stderr}"
        );
        if !key.is_empty() {
            assert!(
                stderr.contains(&format!("key `{key}")),
                "expected key {key} for:\n{text}\ngot: {stderr}"
            );
        }
        assert!(
            stderr.contains(words),
            "expected {words:?} for:\n{text}\ngot: {stderr}"
        );
    }
}

#[test]
fn check_binds_nothing_and_writes_nothing() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &GOOD.replace("PORT", &port.to_string()));
    let output = Command::new(BINARY)
        .arg("-t")
        .arg("-c")
        .arg(&config)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("is valid"));
    // The port is still free and no runtime file was created.
    TcpListener::bind(("127.0.0.1", port)).expect("-t left the port bound");
    assert!(!dir.path().join("run").exists());
    assert!(!dir.path().join("error.log").exists());
}

#[test]
fn the_embedded_default_is_valid() {
    let output = Command::new(BINARY).arg("-t").output().unwrap();
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn a_bad_configuration_starts_nothing() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("listeners: [\"127.0.0.1:{port}\"]\nupstreams: []\n"),
    );
    let output = Command::new(BINARY)
        .arg("-c")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    TcpListener::bind(("127.0.0.1", port)).expect("the port was bound");
}

#[test]
fn a_busy_port_is_a_clear_error() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &GOOD.replace("PORT", &port.to_string()));
    let output = Command::new(BINARY)
        .arg("-c")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && stderr.contains("listeners[0]"),
        "{stderr}"
    );
}

#[test]
fn version_and_help() {
    let output = Command::new(BINARY).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("pingora-lb "));
    let output = Command::new(BINARY).arg("-h").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in ["-d", "-c", "-u", "-t", "reload"] {
        assert!(help.contains(flag), "{help}");
    }
}
