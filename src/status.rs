//! `pingora-lb status`: whether the balancer of this machine can take traffic, for
//! keepalived's `track_script` and for monitoring. It asks the running process's `/status`
//! endpoint (`metrics.listen`), so the answer is the process's own view: it serves, and
//! every pool has a backend that is healthy and not drained. Passively ejected backends
//! count, since the pool falls back to them rather than failing.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde::Deserialize;

use crate::config::{Config, ConfigError};
use crate::exit_codes;
use crate::runtime_files::{check_is_pingora_lb, read_pid};

/// The largest `/status` answer read: a few hundred bytes per backend.
const MAX_ANSWER: u64 = 16 << 20;

/// Why the balancer cannot take traffic, or why that cannot be told.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("configuration error: {0}")]
    Config(#[from] ConfigError),
    #[error("nothing tells whether pingora-lb runs: set metrics.listen (or at least pid_file)")]
    NoWayToAsk,
    #[error("not serving: the status endpoint {address} does not answer ({source})")]
    Unreachable {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("not serving: the status endpoint {address} answered {answer}")]
    BadAnswer { address: SocketAddr, answer: String },
    #[error("not serving: process {pid} is stopping")]
    Stopping { pid: u32 },
    #[error("not serving: pool `{pool}` has no usable backend ({detail})")]
    NoBackend { pool: String, detail: String },
    #[error("not serving: cannot read the pid file: {0}")]
    PidFile(std::io::Error),
    #[error("not serving: process {pid} of the pid file is not running")]
    NotRunning { pid: Pid },
    #[error("not serving: process {pid} of the pid file runs {name}, not pingora-lb")]
    Foreign { pid: Pid, name: String },
}

impl StatusError {
    /// The command's exit status: 78 for a bad configuration, 69 for anything that means
    /// "do not send traffic here".
    pub fn exit_code(&self) -> u8 {
        match self {
            StatusError::Config(_) => exit_codes::CONFIG,
            _ => exit_codes::UNAVAILABLE,
        }
    }
}

/// The `/status` fields this command reads.
#[derive(Debug, Deserialize)]
struct StatusAnswer {
    pid: u32,
    stopping: bool,
    pools: Vec<String>,
    backends: Vec<BackendAnswer>,
}

#[derive(Debug, Deserialize)]
struct BackendAnswer {
    pool: String,
    healthy: bool,
    draining: bool,
}

/// Checks the balancer `config` describes; on success, a line saying what was seen.
pub fn check(config: &Config, timeout: Duration) -> Result<String, StatusError> {
    match (&config.metrics, &config.pid_file) {
        (Some(metrics), _) => {
            let address = local_address(metrics.listen.0);
            let answer = ask(address, timeout)?;
            judge(&answer)
        }
        (None, Some(pid_file)) => {
            let pid = Pid::from_raw(read_pid(&pid_file.0).map_err(StatusError::PidFile)?);
            kill(pid, None).map_err(|_| StatusError::NotRunning { pid })?;
            check_is_pingora_lb(pid).map_err(|foreign| StatusError::Foreign {
                pid,
                name: foreign.name,
            })?;
            Ok(format!(
                "process {pid} runs; backend health unknown (set metrics.listen to check it)"
            ))
        }
        (None, None) => Err(StatusError::NoWayToAsk),
    }
}

/// A wildcard listening address is asked on loopback.
fn local_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `GET /status`, read up to its `Content-Length`.
fn ask(address: SocketAddr, timeout: Duration) -> Result<StatusAnswer, StatusError> {
    let unreachable = |source| StatusError::Unreachable { address, source };
    let bad = |answer: String| StatusError::BadAnswer { address, answer };
    let mut stream = TcpStream::connect_timeout(&address, timeout).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(unreachable)?;
    stream
        .write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n\r\n")
        .map_err(unreachable)?;
    let mut bytes = Vec::new();
    let mut chunk = [0; 8192];
    loop {
        if let Some(body) = complete_body(&bytes).map_err(bad)? {
            return serde_json::from_slice(body)
                .map_err(|e| bad(format!("JSON it could not read ({e})")));
        }
        let read = stream.read(&mut chunk).map_err(unreachable)?;
        if read == 0 || bytes.len() as u64 > MAX_ANSWER {
            return Err(bad("an incomplete HTTP response".into()));
        }
        bytes.extend_from_slice(&chunk[..read]);
    }
}

/// The body of a `200` response once all of it has arrived.
fn complete_body(bytes: &[u8]) -> Result<Option<&[u8]>, String> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&bytes[..end]);
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(format!("`{status_line}`"));
    }
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .ok_or("a response without Content-Length")?;
    let body = &bytes[end + 4..];
    Ok((body.len() >= length).then(|| &body[..length]))
}

/// A stopping process, or one with a pool without a backend that is healthy and not
/// drained, cannot take traffic.
fn judge(answer: &StatusAnswer) -> Result<String, StatusError> {
    if answer.stopping {
        return Err(StatusError::Stopping { pid: answer.pid });
    }
    let mut seen = Vec::with_capacity(answer.pools.len());
    for pool in &answer.pools {
        let backends: Vec<&BackendAnswer> =
            answer.backends.iter().filter(|b| b.pool == *pool).collect();
        let usable = backends.iter().filter(|b| b.healthy && !b.draining).count();
        if usable == 0 {
            let unhealthy = backends.iter().filter(|b| !b.healthy).count();
            let draining = backends.iter().filter(|b| b.draining).count();
            return Err(StatusError::NoBackend {
                pool: pool.clone(),
                detail: format!(
                    "{} backends: {unhealthy} unhealthy, {draining} draining",
                    backends.len()
                ),
            });
        }
        seen.push(format!("pool {pool} {usable}/{} usable", backends.len()));
    }
    Ok(format!(
        "process {} serves; {}",
        answer.pid,
        seen.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(backends: &[(&str, bool, bool)]) -> StatusAnswer {
        let mut pools: Vec<String> = backends.iter().map(|b| b.0.to_string()).collect();
        pools.dedup();
        StatusAnswer {
            pid: 7,
            stopping: false,
            pools,
            backends: backends
                .iter()
                .map(|&(pool, healthy, draining)| BackendAnswer {
                    pool: pool.into(),
                    healthy,
                    draining,
                })
                .collect(),
        }
    }

    #[test]
    fn every_pool_needs_a_healthy_backend_that_is_not_drained() {
        let fine = answer(&[("a", true, false), ("a", false, false), ("b", true, false)]);
        assert_eq!(
            judge(&fine).unwrap(),
            "process 7 serves; pool a 1/2 usable, pool b 1/1 usable"
        );
        let drained = answer(&[("a", true, false), ("b", true, true), ("b", false, false)]);
        let error = judge(&drained).unwrap_err().to_string();
        assert_eq!(
            error,
            "not serving: pool `b` has no usable backend (2 backends: 1 unhealthy, 1 draining)"
        );
        let stopping = StatusAnswer {
            stopping: true,
            ..answer(&[("a", true, false)])
        };
        assert_eq!(
            judge(&stopping).unwrap_err().to_string(),
            "not serving: process 7 is stopping"
        );
    }

    #[test]
    fn the_body_is_complete_at_its_content_length() {
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n";
        assert_eq!(complete_body(head.as_bytes()), Ok(None));
        let whole = format!("{head}{{}}\n\nextra");
        assert_eq!(complete_body(whole.as_bytes()), Ok(Some(&b"{}\n\n"[..])));
        let refused = "HTTP/1.1 503 Service Unavailable\r\n\r\n";
        assert_eq!(
            complete_body(refused.as_bytes()),
            Err("`HTTP/1.1 503 Service Unavailable`".to_string())
        );
    }

    #[test]
    fn a_wildcard_endpoint_is_asked_on_loopback() {
        let local = |a: &str| local_address(a.parse().unwrap()).to_string();
        assert_eq!(local("0.0.0.0:9100"), "127.0.0.1:9100");
        assert_eq!(local("[::]:9100"), "[::1]:9100");
        assert_eq!(local("10.0.0.1:9100"), "10.0.0.1:9100");
    }
}
