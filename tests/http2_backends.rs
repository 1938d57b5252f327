//! HTTP/2 to backends (`http2: true`), against real nginx: h2c with prior knowledge in
//! clear text, h2 chosen by ALPN over TLS; requests and HTTP health checks alike.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

/// nginx in the foreground answering every request with the protocol it heard.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// `listen` options after the port: `http2` (h2c), `ssl http2` (h2 by ALPN), or none.
    fn start(listen_options: &str, tls: Option<(&Path, &Path)>) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let d = dir.path().display();
        let certificate = tls.map_or(String::new(), |(cert, key)| {
            format!(
                "ssl_certificate {}; ssl_certificate_key {};",
                cert.display(),
                key.display()
            )
        });
        let user = if is_root() { "user root;" } else { "" };
        let conf = format!(
            "{user} daemon off; master_process off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{}}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};\n\
             fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen {addr} {listen_options}; {certificate}\n\
             location / {{ return 200 \"$server_protocol $http_x_forwarded_proto\\n\"; }} }} }}\n"
        );
        let conf_file = dir.path().join("nginx.conf");
        std::fs::write(&conf_file, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf_file)
            .arg("-p")
            .arg(dir.path())
            .stdin(Stdio::null())
            .spawn()
            .expect("nginx runs (apt-get install nginx-light)");
        let nginx = Nginx {
            child,
            addr,
            _dir: dir,
        };
        assert!(
            eventually(Duration::from_secs(5), || std::net::TcpStream::connect(
                addr
            )
            .is_ok()),
            "nginx did not listen on {addr}"
        );
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A balancer over `backend` with its HTTP health check; the protocol the backend heard.
fn heard(upstream: &str) -> (String, serde_json::Value) {
    let metrics = listen_address();
    let lb = Lb::start(
        listen_address(),
        &format!(
            "upstreams:\n  - {upstream}\nhealth_check: {{kind: http, path: /health}}\n\
             forwarding: {{x_forwarded: true}}\nmetrics: {{listen: \"{metrics}\"}}\n"
        ),
    );
    let answer = lb.get("/").unwrap();
    assert_eq!(answer.status, 200, "{answer:?}\n{}", lb.error_log());
    (answer.body, status(metrics))
}

#[test]
fn h2c_backends_are_spoken_to_with_prior_knowledge() {
    let nginx = Nginx::start("http2", None);
    let (body, status) = heard(&format!("{{address: \"{}\", http2: true}}", nginx.addr));
    assert_eq!(body, "HTTP/2.0 http\n");
    assert_eq!(status["backends"][0]["healthy"], true, "{status}");
    // Without the option, the same backend hears HTTP/1.1 (nginx takes both here).
    let plain = Nginx::start("", None);
    let (body, _) = heard(&format!("{{address: \"{}\"}}", plain.addr));
    assert_eq!(body, "HTTP/1.1 http\n");
}

#[test]
fn tls_backends_are_offered_h2_by_alpn() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.issue_files(dir.path(), "backend", &["backend.test"], -DAY, DAY);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let nginx = Nginx::start("ssl http2", Some((&cert, &key)));
    let upstream = format!(
        "{{address: \"{}\", tls: true, sni: backend.test, ca_file: {}, http2: true}}",
        nginx.addr,
        ca_file.display()
    );
    let (body, status) = heard(&upstream);
    assert_eq!(body, "HTTP/2.0 http\n");
    assert_eq!(status["backends"][0]["healthy"], true, "{status}");
    let (body, _) = heard(&upstream.replace(", http2: true", ""));
    assert_eq!(body, "HTTP/1.1 http\n");
}
