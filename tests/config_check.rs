//! `-t` and start-up reject bad configurations with the file, line and key, and exit 78,
//! without binding or writing anything.

mod support;

use std::process::Command;

use support::*;

const GOOD: &str = "listeners: [\"LISTEN\"]\nupstreams:\n  - address: 127.0.0.1:9\n";

fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, text).unwrap();
    let outcome = check_config(&path);
    (
        outcome.code,
        outcome.stderr.replace(&path.display().to_string(), "FILE"),
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
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\nselection:\n  algorithm: fastest\n", 5, "selection", "unknown variant `fastest`"),
        ("listeners: [\"127.0.0.1:99999\"]\nupstreams:\n  - address: 127.0.0.1:2\n", 1, "listeners[0]", "not a listening address"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 300.0.0.1:80\n", 3, "upstreams[0].address", "not a backend address"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\npid_file: run/lb.pid\n", 4, "pid_file", "not an absolute file path"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\nupgrade_sock: upgrade.sock\n", 4, "upgrade_sock", "not an absolute file path"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\n    tls: true\n    sni: a.test\n    ca_file: /nonexistent/ca.pem\n", 6, "upstreams[0].ca_file", "cannot read CA file"),
        ("listeners: [\"127.0.0.1:1\"]\nthreads: many\nupstreams:\n  - address: 127.0.0.1:2\n", 2, "threads", "invalid type"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\nhealth_check:\n  interval: soon\n", 5, "health_check.interval", "not a positive duration"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\n  - address: 127.0.0.1:2\n", 4, "upstreams[1].address", "listed twice"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\n    host: \"\"\n", 4, "upstreams[0].host", "not a valid Host header value"),
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

/// Whether a process bound or wrote anything can only be seen while it runs: after it
/// exits, its sockets are closed and it may have removed its files (a clean exit removes
/// the pid file). So the test holds every port the configuration names for the whole run,
/// and a process that tried to bind one would meet EADDRINUSE and fail the way a start on
/// a busy port does (`a_busy_port_is_a_clear_error`); and it watches the directory that
/// holds the pid file, upgrade socket and error log from before the process starts.
#[test]
fn check_binds_nothing_and_writes_nothing() {
    let (listener, metrics) = (held_port(), held_port());
    let (dir, config) = config_in_new_directory(&format!(
        "{}metrics:\n  listen: {}\n",
        GOOD.replace("LISTEN", &listener.local_addr().unwrap().to_string()),
        metrics.local_addr().unwrap()
    ));
    let watch = DirectoryWatch::new(dir.path());
    let outcome = check_config(&config);
    assert_eq!(outcome.code, 0, "{outcome:?}");
    assert!(outcome.stdout.contains("is valid"), "{outcome:?}");
    assert_eq!(watch.changes(), Vec::<String>::new(), "-t wrote in {dir:?}");
}

#[test]
fn the_embedded_default_is_valid() {
    let output = Command::new(BINARY).arg("-t").output().unwrap();
    assert!(output.status.success(), "{output:?}");
}

/// As `check_binds_nothing_and_writes_nothing`, for a start refused for its configuration:
/// a start that bound its port before judging the configuration would fail on the held
/// port with 1, not 78.
#[test]
fn a_bad_configuration_starts_nothing() {
    let listener = held_port();
    let (dir, config) = config_in_new_directory(&format!(
        "listeners: [\"{}\"]\nupstreams: []\n",
        listener.local_addr().unwrap()
    ));
    let watch = DirectoryWatch::new(dir.path());
    let outcome = start_to_end(&config);
    assert_eq!(outcome.code, 78, "{outcome:?}");
    assert_eq!(watch.changes(), Vec::<String>::new(), "wrote in {dir:?}");
}

#[test]
fn a_busy_port_is_a_clear_error() {
    let busy = held_port();
    let address = busy.local_addr().unwrap();
    let (_dir, config) = config_in_new_directory(&GOOD.replace("LISTEN", &address.to_string()));
    assert_port_taken(&start_to_end(&config), address);
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
