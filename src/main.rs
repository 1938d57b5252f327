//! The `pingora-lb` binary: dispatches the command line.

use clap::Parser;

use pingora_lb::cli::{Cli, Command};
use pingora_lb::config::{Config, ConfigError, EXIT_CONFIG};
use pingora_lb::{allocator, lifecycle, reload, startup};

fn main() {
    allocator::disable_transparent_huge_pages();
    report_panics_in_one_line();
    lifecycle::ignore_signals_until_ready();
    let cli = Cli::parse();
    if let Some(Command::Reload { conf, pid, timeout }) = &cli.command {
        let timeout = std::time::Duration::from_secs(*timeout);
        match reload::reload(conf.as_deref(), *pid, timeout) {
            Ok(pid) => println!("pingora-lb: reloaded; process {pid} serves"),
            Err(e @ reload::ReloadError::Config(_)) => fail(EXIT_CONFIG, &e),
            Err(e) => fail(1, &format!("reload failed: {e}")),
        }
        return;
    }
    let config = Config::load_or_seed(cli.conf.as_deref())
        .unwrap_or_else(|e: ConfigError| fail(EXIT_CONFIG, &format!("configuration error: {e}")));
    if cli.test {
        let name = cli
            .conf
            .as_ref()
            .map_or(pingora_lb::config::SEED_CONFIG_NAME.into(), |c| {
                c.display().to_string()
            });
        println!("pingora-lb: configuration {name} is valid");
        return;
    }
    if let Err(e) = startup::serve(&cli, config) {
        fail(1, &e);
    }
}

fn fail(code: i32, message: &dyn std::fmt::Display) -> ! {
    eprintln!("pingora-lb: {message}");
    std::process::exit(code)
}

/// A bug must still reach the operator as one line that says where, in the error log and
/// on stderr, not as a backtrace dump (pingora contains a panic to its request).
fn report_panics_in_one_line() {
    std::panic::set_hook(Box::new(|info| {
        let message = format!("internal error, please report it: {info}").replace('\n', " ");
        if !pingora_lb::logging::goes_to_stderr() {
            log::error!("{message}");
        }
        eprintln!("pingora-lb: {message}");
    }));
}
