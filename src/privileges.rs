//! Giving up privileges once the sockets are bound: the user and group switch (when started
//! as root), then every capability set cleared and no_new_privs set, so that a compromise of
//! the proxy cannot regain what binding needed.

use caps::CapSet;
use log::info;
use nix::unistd::{Gid, Group, Uid, User};

use crate::config::Config;
use crate::exit_codes;

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
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("key `user`: cannot switch to user {0:?}: the process was not started as root")]
    NotRoot(String),
    #[error("key `{key}`: no {key} {name:?} exists on this system")]
    NoSuchAccount { key: &'static str, name: String },
    #[error("key `{key}`: cannot look up {key} {name:?}: {source}")]
    Lookup {
        key: &'static str,
        name: String,
        source: nix::Error,
    },
    #[error("cannot drop privileges: {step}: {source}")]
    Drop {
        step: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl PrivilegeError {
    /// The process's exit status for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            PrivilegeError::NotRoot(_) => exit_codes::NO_PERMISSION,
            PrivilegeError::NoSuchAccount { .. } => exit_codes::NO_USER,
            PrivilegeError::Lookup { .. } | PrivilegeError::Drop { .. } => exit_codes::OS_ERROR,
        }
    }
}

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
                    Err(PrivilegeError::NotRoot(user.clone()))
                };
            }
            (None, false) => return Ok(None),
        };
        let user = account("user", &name, User::from_name(&name))?;
        let gid = match &config.group {
            None => user.gid,
            Some(group) => account("group", group, Group::from_name(group))?.gid,
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

/// The user or group an account lookup found, or why there is none.
fn account<T>(
    key: &'static str,
    name: &str,
    found: nix::Result<Option<T>>,
) -> Result<T, PrivilegeError> {
    let name = name.to_string();
    match found {
        Ok(Some(account)) => Ok(account),
        Ok(None) => Err(PrivilegeError::NoSuchAccount { key, name }),
        Err(source) => Err(PrivilegeError::Lookup { key, name, source }),
    }
}

/// Switches to `identity` (if any), then clears every capability and sets no_new_privs.
/// Must run before any thread is started, so that every thread inherits the result.
pub fn drop_privileges(identity: Option<&Identity>) -> Result<(), PrivilegeError> {
    fn fail<E: std::error::Error + Send + Sync + 'static>(
        step: &'static str,
    ) -> impl FnOnce(E) -> PrivilegeError {
        move |e| PrivilegeError::Drop {
            step,
            source: Box::new(e),
        }
    }
    let staying_root = identity.is_none() && Uid::effective().is_root();
    if staying_root {
        return Ok(());
    }
    if let Some(identity) = identity {
        // Clearing the bounding set needs CAP_SETPCAP, which only root still has here.
        caps::clear(None, CapSet::Bounding).map_err(fail("bounding set"))?;
        nix::unistd::setgroups(&[identity.gid]).map_err(fail("setgroups"))?;
        nix::unistd::setgid(identity.gid).map_err(fail("setgid"))?;
        nix::unistd::setuid(identity.uid).map_err(fail("setuid"))?;
    }
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::clear(None, set).map_err(fail("capabilities"))?;
    }
    // Kernels without ambient capabilities have none to clear.
    let _ = caps::clear(None, CapSet::Ambient);
    nix::sys::prctl::set_no_new_privs().map_err(fail("no_new_privs"))?;
    if let Some(identity) = identity {
        info!(
            "now running as user {} (uid {}, gid {}) without capabilities",
            identity.user, identity.uid, identity.gid
        );
    }
    Ok(())
}
