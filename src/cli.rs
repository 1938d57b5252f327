//! The command line: pingora's flags (`-d -c -u -t`) with their seed meanings, `--version`,
//! the `reload` command that `ExecReload` runs, and `status` for keepalived and monitoring.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// A hardened HTTP load balancer built on pingora.
#[derive(Debug, Parser)]
#[command(name = "pingora-lb", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Run in the background (the shell gets its prompt back once the server serves).
    #[arg(short, long)]
    pub daemon: bool,

    /// Configuration file; without it the embedded default (the pingora quickstart) is used.
    #[arg(short = 'c', long = "conf", value_name = "FILE")]
    pub conf: Option<PathBuf>,

    /// Take over the listening sockets of a running process through `upgrade_sock`
    /// (send that process SIGQUIT, before or after starting this one).
    #[arg(short, long)]
    pub upgrade: bool,

    /// Check the configuration and exit; binds nothing and writes nothing.
    #[arg(short, long)]
    pub test: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Commands besides serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replace the running process without dropping a request: check the configuration,
    /// start a new process that takes over the listening sockets, and wait until it serves.
    /// The running process is left untouched if anything fails.
    Reload {
        /// Configuration file of the new process; by default the one the running process
        /// was started with.
        #[arg(short = 'c', long = "conf", value_name = "FILE")]
        conf: Option<PathBuf>,

        /// Pid of the running process (systemd: `$MAINPID`); read from `pid_file` if absent.
        #[arg(long, value_name = "PID")]
        pid: Option<i32>,

        /// Longest time to wait for the new process to serve.
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        timeout: u64,
    },
    /// Exit 0 if the running process serves and every pool has a usable backend (asked of
    /// its `metrics.listen` endpoint), 69 otherwise, printing why: keepalived's
    /// `track_script` and monitoring run it.
    Status {
        /// Configuration file of the running process; the embedded default if absent.
        #[arg(short = 'c', long = "conf", value_name = "FILE")]
        conf: Option<PathBuf>,

        /// Longest wait for the answer.
        #[arg(long, value_name = "SECONDS", default_value_t = 2)]
        timeout: u64,
    },
}
