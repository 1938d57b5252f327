//! The access log: one line per request (or per sampled request), in a combined-log-like
//! text format or JSON, to syslog or a file reopened on SIGHUP.
//!
//! The request path never waits on the sink: entries go through a bounded queue to a writer
//! thread, which formats and writes them; when the queue is full the entry is dropped and
//! counted (`pingora_lb_access_log_dropped_total`).

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Local, Utc};

use crate::config::{AccessLogConfig, AccessLogDestination, AccessLogFormat};
use crate::metrics::Metrics;

/// Entries waiting for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// One request, as logged.
pub struct Entry {
    pub time: SystemTime,
    pub client: Option<SocketAddr>,
    pub method: http::Method,
    pub target: String,
    pub version: http::Version,
    pub status: u16,
    pub bytes: usize,
    pub referer: Option<String>,
    pub user_agent: Option<String>,
    pub upstream: Option<String>,
    pub total: Duration,
    pub upstream_time: Option<Duration>,
    pub retries: usize,
    /// The client connection's TLS; `None` for plain HTTP.
    pub tls: Option<TlsFacts>,
}

/// What the access log says of a TLS connection.
pub struct TlsFacts {
    /// `TLSv1.3`, `TLSv1.2`.
    pub version: Cow<'static, str>,
    pub cipher: Cow<'static, str>,
    /// The name the client asked for (SNI).
    pub server_name: Option<String>,
}

/// An opened destination, before the writer thread starts.
pub enum Sink {
    File {
        path: PathBuf,
        file: BufWriter<File>,
    },
    Syslog(syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>),
}

impl Sink {
    /// Opens the destination; done before privileges are dropped. `None` when logging is off.
    pub fn open(config: &AccessLogConfig) -> std::io::Result<Option<Sink>> {
        match &config.destination {
            AccessLogDestination::Off => Ok(None),
            _ if config.sample_rate == 0.0 => Ok(None),
            AccessLogDestination::File(path) => Ok(Some(Sink::File {
                path: path.clone(),
                file: BufWriter::new(open_append(path)?),
            })),
            AccessLogDestination::Syslog => {
                let formatter = syslog::Formatter3164 {
                    facility: config.syslog.facility.0,
                    hostname: None,
                    process: config.syslog.identifier.clone(),
                    pid: std::process::id(),
                };
                let logger = match &config.syslog.socket {
                    Some(socket) => syslog::unix_custom(formatter, &socket.0),
                    None => syslog::unix(formatter),
                };
                logger
                    .map(|l| Some(Sink::Syslog(l)))
                    .map_err(|e| std::io::Error::other(format!("syslog is unreachable: {e}")))
            }
        }
    }

    fn write(&mut self, line: &str) {
        match self {
            Sink::File { file, .. } => {
                let _ = file.write_all(line.as_bytes());
                let _ = file.write_all(b"\n");
            }
            Sink::Syslog(logger) => {
                let _ = logger.info(line);
            }
        }
    }

    fn flush(&mut self) {
        if let Sink::File { file, .. } = self {
            let _ = file.flush();
        }
    }

    fn reopen(&mut self) {
        if let Sink::File { path, file } = self {
            let _ = file.flush();
            match open_append(path) {
                Ok(new) => *file = BufWriter::new(new),
                Err(e) => log::error!("cannot reopen the access log {}: {e}", path.display()),
            }
        }
    }
}

fn open_append(path: &PathBuf) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The request path's handle on the access log.
pub struct AccessLog {
    queue: SyncSender<Entry>,
    /// Log one request in this many.
    every: u64,
    seen: AtomicU64,
    reopen: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// Starts the writer thread (after privileges are dropped, so it holds none).
    pub fn start(config: &AccessLogConfig, sink: Sink, metrics: Arc<Metrics>) -> AccessLog {
        let (queue, entries) = sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let format = config.format;
        let flag = reopen.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_entries(entries, sink, format, &flag))
            .expect("a thread can be started");
        AccessLog {
            queue,
            every: (1.0 / config.sample_rate).round().max(1.0) as u64,
            seen: AtomicU64::new(0),
            reopen,
            metrics,
        }
    }

    /// Whether the next request is to be logged (sampling).
    pub fn sample(&self) -> bool {
        self.every == 1
            || self
                .seen
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(self.every)
    }

    /// Queues an entry; never blocks.
    pub fn record(&self, entry: Entry) {
        if let Err(TrySendError::Full(_)) = self.queue.try_send(entry) {
            self.metrics.access_log_dropped();
        }
    }

    /// Asks the writer to reopen a file destination (logrotate, SIGHUP).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }
}

fn write_entries(
    entries: Receiver<Entry>,
    mut sink: Sink,
    format: AccessLogFormat,
    reopen: &AtomicBool,
) {
    loop {
        if reopen.swap(false, Ordering::Relaxed) {
            sink.reopen();
        }
        match entries.recv_timeout(Duration::from_millis(500)) {
            Ok(entry) => {
                sink.write(&format_entry(&entry, format));
                // Write what else is queued, then flush once.
                while let Ok(entry) = entries.try_recv() {
                    sink.write(&format_entry(&entry, format));
                }
                sink.flush();
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                sink.flush();
                return;
            }
        }
    }
}

fn format_entry(entry: &Entry, format: AccessLogFormat) -> String {
    let client = entry.client.map(|c| c.ip().to_string());
    match format {
        AccessLogFormat::Combined => {
            let quoted = |v: &Option<String>| v.as_deref().unwrap_or("-").replace('"', "\\\"");
            format!(
                "{} - - [{}] \"{} {} {:?}\" {} {} \"{}\" \"{}\" upstream={} request_time={:.3} upstream_time={} retries={} tls={} sni={}",
                client.as_deref().unwrap_or("-"),
                DateTime::<Local>::from(entry.time).format("%d/%b/%Y:%H:%M:%S %z"),
                entry.method,
                entry.target.replace('"', "%22"),
                entry.version,
                entry.status,
                entry.bytes,
                quoted(&entry.referer),
                quoted(&entry.user_agent),
                entry.upstream.as_deref().unwrap_or("-"),
                entry.total.as_secs_f64(),
                entry.upstream_time.map_or("-".to_string(), |t| format!("{:.3}", t.as_secs_f64())),
                entry.retries,
                entry.tls.as_ref().map_or("-".to_string(), |t| format!("{}/{}", t.version, t.cipher)),
                entry.tls.as_ref().and_then(|t| t.server_name.as_deref()).unwrap_or("-"),
            )
        }
        AccessLogFormat::Json => serde_json::json!({
            "time": DateTime::<Utc>::from(entry.time).to_rfc3339(),
            "client": client,
            "method": entry.method.as_str(),
            "path": entry.target,
            "protocol": format!("{:?}", entry.version),
            "status": entry.status,
            "bytes": entry.bytes,
            "referer": entry.referer,
            "user_agent": entry.user_agent,
            "upstream": entry.upstream,
            "request_time": entry.total.as_secs_f64(),
            "upstream_time": entry.upstream_time.map(|t| t.as_secs_f64()),
            "retries": entry.retries,
            "tls_version": entry.tls.as_ref().map(|t| &t.version),
            "tls_cipher": entry.tls.as_ref().map(|t| &t.cipher),
            "sni": entry.tls.as_ref().and_then(|t| t.server_name.as_deref()),
        })
        .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            client: Some("192.0.2.1:5555".parse().unwrap()),
            method: http::Method::GET,
            target: "/a?b=\"c\"".into(),
            version: http::Version::HTTP_11,
            status: 200,
            bytes: 42,
            referer: None,
            user_agent: Some("curl/8".into()),
            upstream: Some("10.0.0.1:80".into()),
            total: Duration::from_millis(12),
            upstream_time: Some(Duration::from_millis(10)),
            retries: 1,
            tls: Some(TlsFacts {
                version: "TLSv1.3".into(),
                cipher: "TLS_AES_128_GCM_SHA256".into(),
                server_name: Some("a.example".into()),
            }),
        }
    }

    #[test]
    fn combined_format() {
        let line = format_entry(&entry(), AccessLogFormat::Combined);
        assert!(line.starts_with("192.0.2.1 - - ["), "{line}");
        assert!(line.contains("\"GET /a?b=%22c%22 HTTP/1.1\" 200 42 \"-\" \"curl/8\" upstream=10.0.0.1:80 request_time=0.012 upstream_time=0.010 retries=1 tls=TLSv1.3/TLS_AES_128_GCM_SHA256 sni=a.example"), "{line}");
    }

    #[test]
    fn json_format() {
        let line = format_entry(&entry(), AccessLogFormat::Json);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["status"], 200);
        assert_eq!(value["path"], "/a?b=\"c\"");
        assert_eq!(value["upstream"], "10.0.0.1:80");
        assert_eq!(value["retries"], 1);
        assert_eq!(value["tls_version"], "TLSv1.3");
        assert_eq!(value["sni"], "a.example");
    }
}
