//! The pid file and the runtime directory holding it and the upgrade socket. Both are
//! prepared while the process may still be root, so the unprivileged process can still
//! update and remove what it owns.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Pid, Uid};

/// Refuses a world-writable (even sticky, like `/tmp`) directory for `file`: anyone could
/// plant an upgrade socket there and receive our listening sockets, or a symbolic link
/// for the pid file that root would then write through. A missing directory is fine: it
/// is created private.
pub fn check_private_parent(file: &Path) -> Result<(), String> {
    let Some(dir) = file.parent() else {
        return Ok(());
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.mode() & 0o002 != 0 => Err(format!(
            "{} is writable by everyone; keep {} in a private directory such as /run/pingora-lb",
            dir.display(),
            file.display()
        )),
        _ => Ok(()),
    }
}

/// Creates the directory holding `file` when missing (private to `owner`), and refuses a
/// world-writable one ([check_private_parent]).
pub fn prepare_parent(file: &Path, owner: Option<(Uid, Gid)>) -> std::io::Result<()> {
    check_private_parent(file).map_err(std::io::Error::other)?;
    let Some(dir) = file.parent() else {
        return Ok(());
    };
    match std::fs::metadata(dir) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)?;
            if let Some((uid, gid)) = owner {
                nix::unistd::chown(dir, Some(uid), Some(gid))?;
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The pid file, opened at start and written once the process serves, so that during a
/// handoff it names the old process until the new one has taken over.
pub struct PidFile {
    path: PathBuf,
    file: File,
}

impl PidFile {
    /// Opens (creating if needed) without changing its content.
    pub fn open(path: &Path, owner: Option<(Uid, Gid)>) -> std::io::Result<PidFile> {
        prepare_parent(path, owner)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            // Root must not write through a link planted in the directory.
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(nix::libc::ELOOP) => std::io::Error::other(
                    "is a symbolic link; refusing to write through it".to_string(),
                ),
                _ => e,
            })?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("exists and is not a regular file"));
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid.as_raw()), Some(gid.as_raw()))?;
        }
        Ok(PidFile {
            path: path.to_owned(),
            file,
        })
    }

    /// Writes this process's pid.
    pub fn publish(&self) -> std::io::Result<()> {
        let mut file = &self.file;
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(file, "{}", std::process::id())
    }

    /// Removes the file if it still names this process (a successor may have rewritten it).
    pub fn remove_if_ours(&self) {
        let mut content = String::new();
        let mut file = &self.file;
        let ours = file.seek(SeekFrom::Start(0)).is_ok()
            && file.read_to_string(&mut content).is_ok()
            && content.trim() == std::process::id().to_string();
        // The successor opened the same path: if it replaced the file, ours is stale.
        let same_file = std::fs::metadata(&self.path)
            .ok()
            .zip(self.file.metadata().ok())
            .is_some_and(|(on_disk, open)| on_disk.ino() == open.ino());
        if ours && same_file && std::fs::remove_file(&self.path).is_err() {
            // The directory is not ours to write: leave an empty file rather than a wrong pid.
            let _ = self.file.set_len(0);
        }
    }
}

/// A process that runs another program than this one.
#[derive(Debug)]
pub struct ForeignProcess {
    /// What it runs.
    pub name: String,
    /// What this process runs.
    pub ours: String,
}

/// Whether process `pid` runs pingora-lb, before it is signalled or trusted. The program is recognised by its file name, as
/// started (a symbolic link's name) or as run (`/proc/PID/exe`, " (deleted)" once a package
/// upgrade replaced it); a process whose name cannot be read is given the benefit of doubt.
pub fn check_is_pingora_lb(pid: Pid) -> Result<(), ForeignProcess> {
    let Some(ours) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_name().map(|n| n.to_string_lossy().into_owned()))
    else {
        return Ok(());
    };
    let started_as = std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|cmdline| {
            let first = cmdline
                .split(|b| *b == 0)
                .next()
                .unwrap_or_default()
                .to_vec();
            Path::new(std::ffi::OsStr::from_bytes(&first))
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        });
    let running = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|exe| {
            exe.file_name().map(|n| {
                n.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_string()
            })
        });
    let names: Vec<String> = started_as.into_iter().chain(running).collect();
    if names.is_empty() || names.contains(&ours) {
        return Ok(());
    }
    Err(ForeignProcess {
        name: names[0].clone(),
        ours,
    })
}

/// Reads the pid in a pid file.
pub fn read_pid(path: &Path) -> std::io::Result<i32> {
    let text = std::fs::read_to_string(path)?;
    text.trim()
        .parse()
        .map_err(|_| std::io::Error::other(format!("{} does not hold a pid", path.display())))
}
