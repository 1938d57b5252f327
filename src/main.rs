//! The `pingora-lb` binary: dispatches the command line.

use std::process::ExitCode;

use clap::Parser;

use pingora_lb::cli::{Cli, Command};
use pingora_lb::config::{Config, SEED_CONFIG_NAME};
use pingora_lb::{allocator, exit_codes, lifecycle, logging, reload, startup, status};

fn main() -> ExitCode {
    allocator::disable_transparent_huge_pages();
    report_panics_in_one_line();
    lifecycle::ignore_signals_until_ready();
    let cli = Cli::parse();
    if let Some(Command::Reload { conf, pid, timeout }) = &cli.command {
        let timeout = std::time::Duration::from_secs(*timeout);
        return match reload::reload(conf.as_deref(), *pid, timeout) {
            Ok(pid) => {
                println!("pingora-lb: reloaded; process {pid} serves");
                ExitCode::SUCCESS
            }
            Err(e @ reload::ReloadError::Config(_)) => fail(e.exit_code(), &e),
            Err(e) => fail(e.exit_code(), &format!("reload failed: {e}")),
        };
    }
    if let Some(Command::Status { conf, timeout }) = &cli.command {
        let timeout = std::time::Duration::from_secs(*timeout);
        let checked = Config::load_or_seed(conf.as_deref())
            .map_err(status::StatusError::from)
            .and_then(|config| status::check(&config, timeout));
        return match checked {
            Ok(seen) => {
                println!("pingora-lb: {seen}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e.exit_code(), &e),
        };
    }
    let config = match Config::load_or_seed(cli.conf.as_deref()) {
        Ok(config) => config,
        Err(e) => return fail(exit_codes::CONFIG, &format!("configuration error: {e}")),
    };
    if cli.test {
        for warning in config.warnings() {
            eprintln!("pingora-lb: warning: {warning}");
        }
        let name = cli
            .conf
            .as_ref()
            .map_or(SEED_CONFIG_NAME.into(), |c| c.display().to_string());
        println!("pingora-lb: configuration {name} is valid");
        return ExitCode::SUCCESS;
    }
    match startup::serve(&cli, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.exit_code(), &e),
    }
}

fn fail(code: u8, message: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("pingora-lb: {message}");
    ExitCode::from(code)
}

/// A bug must still reach the operator as one line that says where, in the error log and
/// on stderr, not as a backtrace dump (pingora contains a panic to its request).
fn report_panics_in_one_line() {
    std::panic::set_hook(Box::new(|info| {
        let message = format!("internal error, please report it: {info}").replace('\n', " ");
        if !logging::goes_to_stderr() {
            log::error!("{message}");
        }
        eprintln!("pingora-lb: {message}");
    }));
}
