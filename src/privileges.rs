//! Giving up privileges once the sockets are bound: the user and group switch (when started
//! as root), then every capability set cleared and no_new_privs set, so that a compromise of
//! the proxy cannot regain what binding needed.

use caps::CapSet;
use log::info;
use nix::unistd::{Gid, Group, Uid, User};

use crate::config::Config;

/// Account a root process switches to when `user` is not configured, as nginx's workers do.
const FALLBACK_USER: &str = "nobody";

/// Who the process will run as after binding.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Why the process cannot become what the configuration asks for.
#[derive(Debug)]
pub struct PrivilegeError(pub String);

impl std::fmt::Display for PrivilegeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PrivilegeError {}

impl Identity {
    /// Decides, before anything is bound, whom to switch to: `None` means staying who we
    /// are (not root, or root by the explicit `user: root`).
    pub fn resolve(config: &Config) -> Result<Option<Identity>, PrivilegeError> {
        let current = Uid::effective();
        let name = match (&config.user, current.is_root()) {
            (Some(user), true) if user == "root" => {
                info!("staying root, as configured by `user: root`");
                return Ok(None);
            }
            (Some(user), true) => user.clone(),
            (None, true) => FALLBACK_USER.to_string(),
            (Some(user), false) => {
                let me = User::from_uid(current).ok().flatten();
                return if me.as_ref().is_some_and(|me| &me.name == user) {
                    Ok(None)
                } else {
                    Err(PrivilegeError(format!(
                        "key `user`: cannot switch to user {user:?}: the process was not started as root"
                    )))
                };
            }
            (None, false) => return Ok(None),
        };
        let user = User::from_name(&name)
            .map_err(|e| PrivilegeError(format!("key `user`: cannot look up user {name:?}: {e}")))?
            .ok_or_else(|| {
                PrivilegeError(format!(
                    "key `user`: no user {name:?} exists on this system"
                ))
            })?;
        let gid = match &config.group {
            None => user.gid,
            Some(group) => {
                Group::from_name(group)
                    .map_err(|e| {
                        PrivilegeError(format!("key `group`: cannot look up group {group:?}: {e}"))
                    })?
                    .ok_or_else(|| {
                        PrivilegeError(format!(
                            "key `group`: no group {group:?} exists on this system"
                        ))
                    })?
                    .gid
            }
        };
        if config.user.is_none() {
            info!("started as root with no `user` configured: switching to {name:?}");
        }
        Ok(Some(Identity {
            user: name,
            uid: user.uid,
            gid,
        }))
    }
}

/// Switches to `identity` (if any), then clears every capability and sets no_new_privs.
/// Must run before any thread is started, so that every thread inherits the result.
pub fn drop_privileges(identity: Option<&Identity>) -> Result<(), PrivilegeError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        PrivilegeError(format!("cannot drop privileges: {what}: {e}"))
    };
    let staying_root = identity.is_none() && Uid::effective().is_root();
    if staying_root {
        return Ok(());
    }
    if let Some(identity) = identity {
        // Clearing the bounding set needs CAP_SETPCAP, which only root still has here.
        caps::clear(None, CapSet::Bounding).map_err(|e| fail("bounding set", &e))?;
        nix::unistd::setgroups(&[identity.gid]).map_err(|e| fail("setgroups", &e))?;
        nix::unistd::setgid(identity.gid).map_err(|e| fail("setgid", &e))?;
        nix::unistd::setuid(identity.uid).map_err(|e| fail("setuid", &e))?;
    }
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::clear(None, set).map_err(|e| fail("capabilities", &e))?;
    }
    // Kernels without ambient capabilities have none to clear.
    let _ = caps::clear(None, CapSet::Ambient);
    nix::sys::prctl::set_no_new_privs().map_err(|e| fail("no_new_privs", &e))?;
    if let Some(identity) = identity {
        info!(
            "now running as user {} (uid {}, gid {}) without capabilities",
            identity.user, identity.uid, identity.gid
        );
    }
    Ok(())
}
