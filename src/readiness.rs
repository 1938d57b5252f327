//! Telling whoever started this process how far start-up got, through a pipe: the `reload`
//! command (which passes the pipe's descriptor in [READY_FD_ENV]) and, with `-d`, the
//! foreground parent that returns the shell prompt only once the daemon serves.
//!
//! Each report is one line: `listening PID` once a `-u` process waits on `upgrade_sock`,
//! `ready` once it serves, `failed REASON` when start-up fails. The reason travels in the
//! pipe because the reader may stop the process as soon as the pipe closes: a reason only
//! written to the error log could be lost, and the reload command runs where that log is
//! not seen. A pipe closed without `ready` also means start-up failed.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::system;

/// Environment variable naming the inherited pipe descriptor to report on.
pub const READY_FD_ENV: &str = "PINGORA_LB_READY_FD";

/// What a starting process reported.
#[derive(Debug, PartialEq, Eq)]
pub enum Report {
    /// Waiting on `upgrade_sock` for the old process's sockets.
    Listening(i32),
    /// Serving.
    Ready,
    /// Start-up failed, with the reason when the process could say it.
    Failed(Option<String>),
    /// Nothing came before the deadline.
    TimedOut,
}

/// The pipes this process reports on.
#[derive(Default)]
pub struct Readiness {
    pipes: Vec<File>,
    daemonized: bool,
}

impl Readiness {
    /// Picks up the pipe of a `reload` command, if this process was started by one.
    pub fn from_env() -> Readiness {
        let mut readiness = Readiness::default();
        if let Some(fd) = std::env::var(READY_FD_ENV)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
        {
            // Children of this process must not inherit the variable.
            std::env::remove_var(READY_FD_ENV);
            let Some(pipe) = system::adopt_inherited_descriptor(fd) else {
                return readiness;
            };
            let _ = nix::fcntl::fcntl(
                &pipe,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            readiness.pipes.push(pipe);
        }
        readiness
    }

    /// Forks into the background. The parent waits for the child's `ready` and exits 0, or
    /// exits with the child's status if the child fails first (its error is already on the
    /// shared stderr). Must run before any thread is started.
    pub fn daemonize(&mut self) -> std::io::Result<()> {
        let (reader, writer) = nix::unistd::pipe()?;
        match system::fork_single_threaded()? {
            nix::unistd::ForkResult::Parent { child } => {
                drop(writer);
                let mut reader = File::from(reader);
                let code = loop {
                    match read_report(&mut reader, None) {
                        Report::Ready => break 0,
                        Report::Listening(_) => continue,
                        Report::Failed(_) | Report::TimedOut => break exit_status(child),
                    }
                };
                std::process::exit(code);
            }
            nix::unistd::ForkResult::Child => {
                drop(reader);
                nix::unistd::setsid()?;
                std::env::set_current_dir("/")?;
                self.pipes.push(File::from(writer));
                self.daemonized = true;
                Ok(())
            }
        }
    }

    /// `-u`: waiting for the old process on `upgrade_sock`.
    pub fn listening(&mut self) {
        let line = format!("listening {}\n", std::process::id());
        self.report(&line);
    }

    /// Serving: the last report; the pipes are closed and a daemon lets go of the terminal.
    pub fn ready(&mut self) {
        self.report("ready\n");
        self.pipes.clear();
        if self.daemonized {
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                let _ = nix::unistd::dup2_stdin(&null);
                let _ = nix::unistd::dup2_stdout(&null);
                let _ = nix::unistd::dup2_stderr(&null);
            }
        }
    }

    /// Start-up failed: the last report, with its reason on one line.
    pub fn failed(&mut self, reason: &dyn std::fmt::Display) {
        let reason = reason.to_string().replace(['\n', '\r'], " ");
        self.report(&format!("failed {reason}\n"));
        self.pipes.clear();
    }

    fn report(&mut self, line: &str) {
        // A reader that went away (a reload command that gave up) is not our problem.
        for pipe in &mut self.pipes {
            let _ = pipe.write_all(line.as_bytes());
        }
    }
}

/// The exit status of a child that failed to start; 1 if it ended otherwise.
fn exit_status(child: nix::unistd::Pid) -> i32 {
    match nix::sys::wait::waitpid(child, None) {
        Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => code,
        _ => 1,
    }
}

/// The longest report line kept.
const MAX_LINE: usize = 4096;

fn parse_report(line: &str) -> Option<Report> {
    if line == "ready" {
        return Some(Report::Ready);
    }
    if let Some(reason) = line.strip_prefix("failed ") {
        return Some(Report::Failed(Some(reason.to_string())));
    }
    line.strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .map(Report::Listening)
}

/// Reads the next report, waiting until `deadline` (forever with `None`).
pub fn read_report(pipe: &mut File, deadline: Option<Instant>) -> Report {
    let mut line = Vec::new();
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Report::TimedOut;
                }
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return Report::Failed(None),
        }
        let mut byte = [0u8; 1];
        match pipe.read(&mut byte) {
            Ok(0) | Err(_) => return Report::Failed(None),
            Ok(_) if byte[0] == b'\n' => {
                if let Some(report) = parse_report(&String::from_utf8_lossy(&line)) {
                    return report;
                }
                line.clear();
            }
            // A reason longer than this is cut rather than read without end.
            Ok(_) if line.len() >= MAX_LINE => {}
            Ok(_) => line.push(byte[0]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe_pair() -> (File, Readiness) {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let readiness = Readiness {
            pipes: vec![File::from(writer)],
            daemonized: false,
        };
        (File::from(reader), readiness)
    }

    #[test]
    fn a_failure_carries_its_reason_on_one_line() {
        let (mut reader, mut readiness) = pipe_pair();
        readiness.listening();
        readiness.failed(&"cannot listen on 127.0.0.1:80\n(key `listeners[0]`)");
        assert_eq!(
            read_report(&mut reader, None),
            Report::Listening(std::process::id() as i32)
        );
        assert_eq!(
            read_report(&mut reader, None),
            Report::Failed(Some(
                "cannot listen on 127.0.0.1:80 (key `listeners[0]`)".into()
            ))
        );
    }

    #[test]
    fn a_closed_pipe_is_a_failure_without_reason() {
        let (mut reader, readiness) = pipe_pair();
        drop(readiness);
        assert_eq!(read_report(&mut reader, None), Report::Failed(None));
    }
}
