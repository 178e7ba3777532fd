//! Opening what the user names. A path may be anything: a FIFO that no one
//! writes (open would wait for a writer forever), a terminal, /dev/zero. So
//! we open without blocking, look at what we got through the descriptor
//! itself (no window for the path to change in between), and only then go
//! back to ordinary blocking I/O.

use std::fs::{File, FileType, Metadata};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` with O_NONBLOCK (and O_CLOEXEC, O_NOCTTY), read-only or
/// read-write, and returns it with its fstat. `flags` adds open flags.
pub fn open_nonblocking(path: &Path, write: bool, flags: i32) -> std::io::Result<(File, Metadata)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY | flags)
        .open(path)?;
    let meta = file.metadata()?;
    Ok((file, meta))
}

/// Clears O_NONBLOCK, once `file` is known to be a file or a disk.
pub fn set_blocking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL on a descriptor we own; no memory passes.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What a file that is not a regular file is, for messages.
pub fn kind_of(t: FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}
