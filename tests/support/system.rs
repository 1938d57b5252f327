//! The system calls the tests make that no safe wrapper among the dependencies covers
//! (nix is built without its `inotify` feature), each behind a safe function: the only test
//! code allowed `unsafe`, as `src/system.rs` is the only such code of the program.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::libc;

/// A non-blocking inotify descriptor watching `dir` for the events in `mask`, read as a
/// file of `struct inotify_event` records.
pub fn watch_directory(dir: &Path, mask: u32) -> std::io::Result<File> {
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: takes flags only; the result is checked before it is used.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened by this thread, owned by nothing else.
    let inotify = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a valid descriptor and a NUL-terminated path that outlives the call.
    let watch = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), mask) };
    if watch < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(File::from(inotify))
}
