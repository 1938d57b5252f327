//! The few system calls no safe wrapper covers, each behind a safe function that checks
//! what it can. This is the only module allowed `unsafe` (see `[lints]` in Cargo.toml).
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::signal::{SigHandler, Signal};
use nix::unistd::ForkResult;

/// Sets `signal` to be ignored.
pub fn ignore_signal(signal: Signal) -> nix::Result<()> {
    // SAFETY: SIG_IGN installs no handler code.
    unsafe { nix::sys::signal::signal(signal, SigHandler::SigIgn) }.map(drop)
}

/// Forks, refusing when this process has more than one thread: the child of a threaded
/// process holds copies of locks other threads may have held, and may deadlock on them.
pub fn fork_single_threaded() -> nix::Result<ForkResult> {
    let threads = std::fs::read_dir("/proc/self/task").map_or(0, |tasks| tasks.count());
    if threads != 1 {
        return Err(Errno::EDEADLK);
    }
    // SAFETY: the only thread is the one forking, so the child is a complete copy.
    unsafe { nix::unistd::fork() }
}

/// Ends a forked child at once, without running exit handlers or flushing buffers that
/// belong to the parent's copy of the process.
pub fn exit_forked_child() -> ! {
    // SAFETY: _exit is async-signal-safe and takes no pointers.
    unsafe { nix::libc::_exit(0) }
}

/// Takes ownership of the descriptors that came with an SCM_RIGHTS message.
pub fn adopt_received_descriptors(fds: Vec<RawFd>) -> Vec<OwnedFd> {
    fds.into_iter()
        // SAFETY: the kernel just installed these descriptors in this process, for us alone.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Takes ownership of a descriptor a parent process left open for this one, named in the
/// environment; `None` if no such descriptor is open.
pub fn adopt_inherited_descriptor(fd: RawFd) -> Option<File> {
    // Descriptors 0-2 are stdio, owned by std.
    if fd <= 2 || nix::fcntl::fcntl(borrow_for_probe(fd), nix::fcntl::FcntlArg::F_GETFD).is_err() {
        return None;
    }
    // SAFETY: open (checked above), not stdio, and handed to this process for this purpose
    // only; nothing else in the process knows its number.
    Some(unsafe { File::from_raw_fd(fd) })
}

fn borrow_for_probe<'a>(fd: RawFd) -> std::os::fd::BorrowedFd<'a> {
    // SAFETY: only used for an F_GETFD probe, which fails harmlessly on a closed number.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// Sets TCP_DEFER_ACCEPT on a listening socket (nix has no wrapper for it).
pub fn set_defer_accept(listener: &impl AsRawFd, seconds: i32) -> std::io::Result<()> {
    use nix::libc;
    // SAFETY: a valid socket, and an option value of the size given.
    let result = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threaded_process_does_not_fork() {
        // The test harness runs tests on threads of their own.
        assert_eq!(fork_single_threaded().err(), Some(Errno::EDEADLK));
    }

    #[test]
    fn only_an_open_non_stdio_descriptor_is_adopted() {
        assert!(adopt_inherited_descriptor(1).is_none());
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let number =
            nix::fcntl::fcntl(&reader, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(900)).unwrap();
        drop(reader);
        drop(writer);
        assert!(adopt_inherited_descriptor(number).is_some());
        assert!(adopt_inherited_descriptor(number).is_none());
    }
}
