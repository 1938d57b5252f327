//! `pingora-lb reload`: the zero-downtime reload behind `ExecReload` and for people without
//! systemd. It checks the configuration, starts a new process detached from itself, asks
//! the running one to hand its sockets over, and returns 0 only once the new process serves.
//! On any failure the new process is stopped and the running one is left as it was.
//! See LIFECYCLE.md for the sequence.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{ForkResult, Pid};

use crate::config::{Config, ConfigError};
use crate::exit_codes;
use crate::readiness::{read_report, Report, READY_FD_ENV};
use crate::runtime_files::{check_is_pingora_lb, read_pid, ForeignProcess};
use crate::system::{exit_forked_child, fork_single_threaded};

/// Why a reload did not happen. The running process keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("configuration error: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot tell which process runs: {0}; give --pid")]
    PidFile(std::io::Error),
    #[error("cannot tell which process runs: give --pid, or set pid_file")]
    NoPid,
    #[error("process {pid} is not running ({source}); nothing to reload")]
    NotRunning { pid: Pid, source: nix::Error },
    #[error("process {pid} runs {name}, not {ours}; refusing to signal it (check --pid or the pid file)")]
    NotPingoraLb {
        pid: Pid,
        name: String,
        ours: String,
    },
    #[error("cannot tell which configuration process {pid} runs ({source}); give -c")]
    UnknownConfiguration { pid: i32, source: std::io::Error },
    #[error("{what}: {source}")]
    System {
        what: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot signal process {old}: {source}")]
    Signal { old: Pid, source: nix::Error },
    #[error("the new process could not start: {}; process {old} keeps serving", .reason.as_deref().unwrap_or("it exited without a reason (see the error log)"))]
    StartFailed { reason: Option<String>, old: Pid },
    #[error("the new process did not start in time; process {old} keeps serving")]
    NotStarted { old: Pid },
    #[error("the new process did not serve within {}s; process {old} keeps serving", .timeout.as_secs())]
    NotServing { old: Pid, timeout: Duration },
    #[error("the new process reported {report:?} out of turn; process {old} keeps serving")]
    OutOfTurn { report: Report, old: Pid },
}

impl ReloadError {
    /// The command's exit status for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            ReloadError::Config(_) => exit_codes::CONFIG,
            ReloadError::PidFile(_)
            | ReloadError::NoPid
            | ReloadError::NotPingoraLb { .. }
            | ReloadError::UnknownConfiguration { .. } => exit_codes::USAGE,
            ReloadError::System { .. } | ReloadError::Signal { .. } => exit_codes::OS_ERROR,
            ReloadError::NotRunning { .. }
            | ReloadError::StartFailed { .. }
            | ReloadError::NotStarted { .. }
            | ReloadError::NotServing { .. }
            | ReloadError::OutOfTurn { .. } => exit_codes::UNAVAILABLE,
        }
    }
}

/// Runs the reload; returns the pid of the process now serving.
pub fn reload(
    conf: Option<&Path>,
    pid: Option<i32>,
    timeout: Duration,
) -> Result<i32, ReloadError> {
    let inherited_conf;
    let conf = match (conf, pid) {
        (None, Some(pid)) => {
            inherited_conf = configuration_of(pid)?;
            inherited_conf.as_deref()
        }
        _ => conf,
    };
    let config = Config::load_or_seed(conf)?;
    let old = match (pid, &config.pid_file) {
        (Some(pid), _) => pid,
        (None, Some(pid_file)) => read_pid(&pid_file.0).map_err(ReloadError::PidFile)?,
        (None, None) => return Err(ReloadError::NoPid),
    };
    let old = Pid::from_raw(old);
    kill(old, None).map_err(|source| ReloadError::NotRunning { pid: old, source })?;
    // SIGQUIT kills a process that does not handle it: a stale pid file or a mistyped
    // `--pid` must not reach an unrelated process.
    check_is_pingora_lb(old).map_err(|ForeignProcess { name, ours }| {
        ReloadError::NotPingoraLb {
            pid: old,
            name,
            ours,
        }
    })?;

    let deadline = Instant::now() + timeout;
    let mut reports = spawn_detached(conf)?;
    let mut new = None;
    let outcome = hand_over(&mut reports, old, &mut new, deadline, timeout);
    match outcome {
        Ok(new) => Ok(new.as_raw()),
        Err(error) => {
            if let Some(pid) = new {
                stop(pid);
            }
            Err(error)
        }
    }
}

/// Follows the new process's reports, signalling the old one once the new one waits for
/// its sockets. `new` learns the new pid as soon as it is known, for clean-up on failure.
fn hand_over(
    reports: &mut File,
    old: Pid,
    new: &mut Option<Pid>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Pid, ReloadError> {
    let pid = match read_report(reports, Some(deadline)) {
        Report::Listening(pid) => Pid::from_raw(pid),
        Report::Failed(reason) => return Err(ReloadError::StartFailed { reason, old }),
        Report::TimedOut => return Err(ReloadError::NotStarted { old }),
        report @ Report::Ready => return Err(ReloadError::OutOfTurn { report, old }),
    };
    *new = Some(pid);
    kill(old, Signal::SIGQUIT).map_err(|source| ReloadError::Signal { old, source })?;
    match read_report(reports, Some(deadline)) {
        Report::Ready => Ok(pid),
        Report::Failed(reason) => Err(ReloadError::StartFailed { reason, old }),
        Report::TimedOut => Err(ReloadError::NotServing { old, timeout }),
        report @ Report::Listening(_) => Err(ReloadError::OutOfTurn { report, old }),
    }
}

/// Without `-c`, the configuration file the running process was started with: a forgotten
/// `-c` must not swap a production configuration for the embedded default.
fn configuration_of(pid: i32) -> Result<Option<PathBuf>, ReloadError> {
    let unreadable = |source| ReloadError::UnknownConfiguration { pid, source };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(unreadable)?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let Some(path) = conf_argument(&args) else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    if path.is_absolute() {
        return Ok(Some(path));
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).map_err(unreadable)?;
    Ok(Some(cwd.join(path)))
}

/// The value of `-c`/`--conf` in a `pingora-lb` command line (clap's spellings: `-c F`,
/// `-cF`, `-dc F`, `--conf F`, `--conf=F`).
fn conf_argument(args: &[String]) -> Option<&str> {
    let mut args = args.iter().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--conf" {
            return args.next().map(String::as_str);
        }
        if let Some(value) = arg.strip_prefix("--conf=") {
            return Some(value);
        }
        if arg.starts_with("--") {
            continue;
        }
        if let Some((_, rest)) = arg
            .strip_prefix('-')
            .and_then(|flags| flags.split_once('c'))
        {
            return if rest.is_empty() {
                args.next().map(String::as_str)
            } else {
                Some(rest)
            };
        }
    }
    None
}

/// Starts `pingora-lb -u [-c FILE]` in its own session, not as our child (double fork), so
/// systemd can adopt it as the main process and no one is left to reap it here. Returns the
/// read end of its report pipe.
///
/// The new process gets `/dev/null` as stdin and stdout, and as stderr too unless stderr is
/// the journal (`JOURNAL_STREAM`, under systemd): a caller reading this command's output
/// (`out=$(pingora-lb reload)`) would otherwise wait for the new server to exit. Its
/// start-up failure reaches this command through the report pipe instead.
fn spawn_detached(conf: Option<&Path>) -> Result<File, ReloadError> {
    fn fail<E: std::error::Error + Send + Sync + 'static>(
        what: &'static str,
    ) -> impl FnOnce(E) -> ReloadError {
        move |e| ReloadError::System {
            what,
            source: Box::new(e),
        }
    }
    let exe = std::env::current_exe().map_err(fail("cannot find this program"))?;
    let mut args = vec![exe.clone(), PathBuf::from("-u")];
    if let Some(conf) = conf {
        let absolute = std::path::absolute(conf).map_err(fail("configuration path"))?;
        args.extend([PathBuf::from("-c"), absolute]);
    }
    let (reader, writer) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(fail("cannot create a pipe"))?;
    let writer_fd = writer.as_raw_fd();
    let to_c = |s: &std::ffi::OsStr| CString::new(s.as_encoded_bytes()).expect("no NUL in paths");
    let argv: Vec<CString> = args.iter().map(|a| to_c(a.as_os_str())).collect();
    let mut envp: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != READY_FD_ENV)
        .map(|(k, v)| {
            let mut pair = k.into_encoded_bytes();
            pair.push(b'=');
            pair.extend(v.into_encoded_bytes());
            CString::new(pair).expect("environment entries hold no NUL")
        })
        .collect();
    envp.push(CString::new(format!("{READY_FD_ENV}={writer_fd}")).expect("no NUL"));
    let program = to_c(exe.as_os_str());
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(fail("cannot open /dev/null"))?;
    let keep_stderr = stderr_is_the_journal();

    // The children only call async-signal-safe functions (setsid, fork, dup2, fcntl,
    // execve, _exit) before exec.
    match fork_single_threaded().map_err(fail("cannot fork"))? {
        ForkResult::Child => {
            let _ = nix::unistd::setsid();
            if let Ok(ForkResult::Child) = fork_single_threaded() {
                let _ = nix::unistd::dup2_stdin(&null);
                let _ = nix::unistd::dup2_stdout(&null);
                if !keep_stderr {
                    let _ = nix::unistd::dup2_stderr(&null);
                }
                let _ = nix::fcntl::fcntl(
                    &writer,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                );
                let _ = nix::unistd::execve(&program, &argv, &envp);
            }
            exit_forked_child()
        }
        ForkResult::Parent { child } => {
            drop(writer);
            let _ = nix::sys::wait::waitpid(child, None);
            Ok(File::from(reader))
        }
    }
}

/// Whether stderr is the systemd journal stream that `JOURNAL_STREAM` (`DEVICE:INODE`)
/// names, as for `ExecReload=` under systemd.
fn stderr_is_the_journal() -> bool {
    let Some((device, inode)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        v.split_once(':')
            .map(|(d, i)| (d.to_string(), i.to_string()))
    }) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr())
        .is_ok_and(|stat| device.parse() == Ok(stat.st_dev) && inode.parse() == Ok(stat.st_ino))
}

/// Stops a new process that did not make it: SIGTERM, then SIGKILL if it lingers.
fn stop(pid: Pid) {
    if kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if kill(pid, None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(pid, Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::conf_argument;

    fn conf(line: &str) -> Option<String> {
        let args: Vec<String> = line.split(' ').map(String::from).collect();
        conf_argument(&args).map(String::from)
    }

    #[test]
    fn finds_the_configuration_in_every_spelling() {
        for line in [
            "pingora-lb -c /etc/lb.yaml",
            "pingora-lb -u -c /etc/lb.yaml",
            "pingora-lb -c/etc/lb.yaml",
            "pingora-lb -dc /etc/lb.yaml",
            "pingora-lb --conf /etc/lb.yaml -d",
            "pingora-lb --conf=/etc/lb.yaml",
        ] {
            assert_eq!(conf(line).as_deref(), Some("/etc/lb.yaml"), "{line}");
        }
        assert_eq!(conf("pingora-lb"), None);
        assert_eq!(conf("pingora-lb -d -u"), None);
    }
}
