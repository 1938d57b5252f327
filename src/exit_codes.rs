//! The exit statuses of the process, from sysexits.h, so that systemd and scripts can tell
//! a failure a restart may fix (a port still held, a backend name not yet resolvable) from
//! one it cannot (a bad configuration, a missing user).

/// The command line names a process or file that does not fit (EX_USAGE).
pub const USAGE: u8 = 64;
/// The configured user or group does not exist (EX_NOUSER).
pub const NO_USER: u8 = 67;
/// Something the process needs is not available now: a port, a backend's address, a new
/// process that would not serve (EX_UNAVAILABLE).
pub const UNAVAILABLE: u8 = 69;
/// A system call failed where it should not (EX_OSERR).
pub const OS_ERROR: u8 = 71;
/// A runtime file or log cannot be created (EX_CANTCREAT).
pub const CANNOT_CREATE: u8 = 73;
/// The process lacks the privilege the configuration asks it to use or give up (EX_NOPERM).
pub const NO_PERMISSION: u8 = 77;
/// The configuration is invalid (EX_CONFIG), as ntpd-rs and others use.
pub const CONFIG: u8 = 78;

/// The statuses a restart cannot fix: the unit's `RestartPreventExitStatus=` lists them.
pub const PERMANENT: [u8; 3] = [CONFIG, NO_PERMISSION, NO_USER];

#[cfg(test)]
mod tests {
    use super::PERMANENT;

    /// The unit file and the NixOS module stop restarting on exactly these statuses.
    #[test]
    fn the_unit_files_prevent_restarts_on_the_permanent_failures() {
        let listed = |text: &str, prefix: &str| -> Vec<u8> {
            let line = text
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .unwrap_or_else(|| panic!("no {prefix} line"));
            line.trim_matches(|c: char| !c.is_ascii_digit())
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect()
        };
        let unit = include_str!("../dist/pingora-lb.service");
        assert_eq!(listed(unit, "RestartPreventExitStatus="), PERMANENT);
        let nix = include_str!("../nixos-module/unit-settings.nix");
        assert_eq!(listed(nix, "RestartPreventExitStatus ="), PERMANENT);
    }
}
