//! The error log: pingora and this crate log through the `log` facade, and this module
//! sends the lines to stderr, syslog or a file.
//!
//! The syslog connection is made before privileges are dropped (the socket may be
//! unreachable for the service user otherwise); a file is reopened on SIGHUP for logrotate.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use log::{LevelFilter, Log, Metadata, Record};

use crate::config::{Config, ErrorLog};

/// Where the lines go.
enum Sink {
    Stderr,
    Syslog(Mutex<syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>>),
    File { path: PathBuf, file: Mutex<File> },
}

/// Level filter: the configured level, or the directives of `RUST_LOG`
/// (`level` or `target=level`, comma separated; the longest matching target wins).
struct Filter {
    default: LevelFilter,
    by_target: Vec<(String, LevelFilter)>,
}

impl Filter {
    fn new(configured: LevelFilter, rust_log: Option<&str>) -> Filter {
        let mut filter = Filter {
            default: configured,
            by_target: Vec::new(),
        };
        for directive in rust_log.unwrap_or("").split(',').map(str::trim) {
            match directive.split_once('=') {
                Some((target, level)) => {
                    if let Ok(level) = level.parse() {
                        filter.by_target.push((target.replace('-', "_"), level));
                    }
                }
                None => {
                    if let Ok(level) = directive.parse() {
                        filter.default = level;
                    }
                }
            }
        }
        filter
            .by_target
            .sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        filter
    }

    fn level_for(&self, target: &str) -> LevelFilter {
        self.by_target
            .iter()
            .find(|(t, _)| target.starts_with(t.as_str()))
            .map_or(self.default, |(_, l)| *l)
    }

    fn max(&self) -> LevelFilter {
        self.by_target
            .iter()
            .map(|(_, l)| *l)
            .fold(self.default, std::cmp::max)
    }
}

struct ErrorLogger {
    sink: Sink,
    filter: Filter,
}

static LOGGER: OnceLock<ErrorLogger> = OnceLock::new();

/// Installs the error log described by `config`. When syslog cannot be reached the lines go
/// to stderr and the reason is logged there, so that the process still starts.
pub fn init(config: &Config) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = Filter::new(config.log_level.0, rust_log.as_deref());
    let mut fallback_reason = None;
    let sink = match &config.error_log {
        ErrorLog::Stderr => Sink::Stderr,
        ErrorLog::Syslog => match connect_syslog(config) {
            Ok(logger) => Sink::Syslog(Mutex::new(logger)),
            Err(e) => {
                fallback_reason = Some(format!("syslog is unreachable ({e}); logging to stderr"));
                Sink::Stderr
            }
        },
        ErrorLog::File(path) => match open_append(path) {
            Ok(file) => Sink::File {
                path: path.clone(),
                file: Mutex::new(file),
            },
            Err(e) => {
                fallback_reason = Some(format!(
                    "cannot open error_log {}: {e}; logging to stderr",
                    path.display()
                ));
                Sink::Stderr
            }
        },
    };
    let max = filter.max();
    if LOGGER.set(ErrorLogger { sink, filter }).is_ok() {
        let logger = LOGGER.get().expect("logger was just set");
        if log::set_logger(logger).is_ok() {
            log::set_max_level(max);
        }
    }
    if let Some(reason) = fallback_reason {
        log::warn!("{reason}");
    }
}

/// Whether error log lines already go to stderr (so a fatal error is not printed twice).
pub fn goes_to_stderr() -> bool {
    LOGGER
        .get()
        .is_none_or(|logger| matches!(logger.sink, Sink::Stderr))
}

/// Reopens the error log file (after logrotate moved it); other sinks need nothing.
pub fn reopen() {
    if let Some(ErrorLogger {
        sink: Sink::File { path, file },
        ..
    }) = LOGGER.get()
    {
        match open_append(path) {
            Ok(new) => *file.lock().unwrap_or_else(|p| p.into_inner()) = new,
            Err(e) => log::error!("cannot reopen error_log {}: {e}", path.display()),
        }
    }
}

fn connect_syslog(
    config: &Config,
) -> syslog::Result<syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>> {
    let formatter = syslog::Formatter3164 {
        facility: config.syslog.facility.0,
        hostname: None,
        process: config.syslog.identifier.clone(),
        pid: std::process::id(),
    };
    match &config.syslog.socket {
        Some(socket) => syslog::unix_custom(formatter, &socket.0),
        None => syslog::unix(formatter),
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Log for ErrorLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.filter.level_for(metadata.target())
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        match &self.sink {
            Sink::Stderr => {
                // systemd's journal timestamps stderr lines itself.
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "{} {}: {}",
                    record.level(),
                    record.target(),
                    record.args()
                );
            }
            Sink::File { file, .. } => {
                let line = format!(
                    "{} {} {}: {}\n",
                    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                    record.level(),
                    record.target(),
                    record.args()
                );
                let _ = file
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write_all(line.as_bytes());
            }
            Sink::Syslog(logger) => {
                let message = format!("{}: {}", record.target(), record.args());
                let mut logger = logger.lock().unwrap_or_else(|p| p.into_inner());
                let _ = match record.level() {
                    log::Level::Error => logger.err(message),
                    log::Level::Warn => logger.warning(message),
                    log::Level::Info => logger.info(message),
                    log::Level::Debug | log::Level::Trace => logger.debug(message),
                };
            }
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_overrides_the_configured_level() {
        let filter = Filter::new(LevelFilter::Info, Some("warn,pingora_lb=debug"));
        assert_eq!(filter.level_for("pingora_core::server"), LevelFilter::Warn);
        assert_eq!(filter.level_for("pingora_lb::proxy"), LevelFilter::Debug);
        assert_eq!(filter.max(), LevelFilter::Debug);
        assert_eq!(
            Filter::new(LevelFilter::Info, None).max(),
            LevelFilter::Info
        );
    }
}
