//! Our stdout, written without ever waiting inside write().
//!
//! A Guest may print faster than whoever reads our stdout, or into a pipe
//! nobody reads at all. A blocking write would then keep the vCPU thread in
//! write() for good, retried after every signal, and the user's three Ctrl-C
//! would never be looked at. So the console writes through a descriptor that
//! never blocks, and keeps what stdout would not take yet in a bounded
//! backlog; when that is full, the console holds the Guest back instead (its
//! buffers wait in the ring) until stdout has room again.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Output kept for a stdout that is not taking it now.
pub const BACKLOG_MAX: usize = 64 * 1024;

/// How we reach the file behind stdout without blocking.
enum Sink {
    /// Our own open file description of it (a pipe, a FIFO, a terminal, a
    /// character device), opened with O_NONBLOCK. Setting that flag on the
    /// descriptor we inherited would set it for everyone sharing that
    /// description (the shell, the other end of a `| tee`), who may not
    /// expect EAGAIN; a description we opened ourselves is ours alone.
    Own(OwnedFd),
    /// A socket: send() with MSG_DONTWAIT, which changes no flag.
    Socket(RawFd),
    /// A regular file or a block device: a write never waits for a reader,
    /// and opening it again would lose our place in it.
    Plain(RawFd),
    /// Something we could not open again: write only when poll() says there
    /// is room, and no more than a pipe takes without waiting.
    Polled(RawFd),
}

/// What one write did.
enum Wrote {
    Bytes(usize),
    /// No room now: try again when poll() says POLLOUT.
    Full,
    /// The file is gone (a reader that closed, a full disk): these bytes
    /// have nowhere to go.
    Gone,
}

/// Stdout, and what it has not taken yet.
pub struct Output {
    sink: Sink,
    backlog: VecDeque<u8>,
}

/// A file's type and identity, from fstat.
fn stat(fd: RawFd) -> Option<libc::stat> {
    // SAFETY: fstat writes one stat we own; an invalid fd is just an error.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd, &mut st) == 0).then_some(st)
    }
}

/// A new open file description of what `fd` is, non-blocking, if it is the
/// very same file.
fn reopen(fd: RawFd) -> Option<OwnedFd> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).ok()?;
    // SAFETY: open() of a NUL-terminated path we own; the new descriptor is
    // owned by the OwnedFd right away.
    let new = unsafe {
        let raw = libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
        );
        if raw < 0 {
            return None;
        }
        OwnedFd::from_raw_fd(raw)
    };
    let (old, now) = (stat(fd)?, stat(new.as_raw_fd())?);
    (old.st_dev == now.st_dev && old.st_ino == now.st_ino && old.st_rdev == now.st_rdev)
        .then_some(new)
}

impl Output {
    /// Output to `fd` (stdout, or a pipe in tests).
    pub fn open(fd: RawFd) -> Output {
        let sink = match stat(fd) {
            None => Sink::Polled(fd),
            Some(st) => match st.st_mode & libc::S_IFMT {
                libc::S_IFREG | libc::S_IFBLK => Sink::Plain(fd),
                libc::S_IFSOCK => Sink::Socket(fd),
                // /dev/ptmx: opening it again makes a new terminal.
                libc::S_IFCHR if st.st_rdev == libc::makedev(5, 2) => Sink::Polled(fd),
                _ => reopen(fd).map_or(Sink::Polled(fd), Sink::Own),
            },
        };
        Output {
            sink,
            backlog: VecDeque::new(),
        }
    }

    /// The descriptor to poll for room.
    pub fn fd(&self) -> RawFd {
        match &self.sink {
            Sink::Own(fd) => fd.as_raw_fd(),
            Sink::Socket(fd) | Sink::Plain(fd) | Sink::Polled(fd) => *fd,
        }
    }

    /// Whether everything given has been written.
    pub fn is_empty(&self) -> bool {
        self.backlog.is_empty()
    }

    /// How many more bytes the backlog takes.
    pub fn room(&self) -> usize {
        BACKLOG_MAX.saturating_sub(self.backlog.len())
    }

    /// Writes `bytes` after the backlog, as far as stdout takes them now; the
    /// rest joins the backlog. The caller keeps to `room`, or knows why not.
    pub fn write(&mut self, mut bytes: &[u8]) {
        if !self.flush() {
            self.backlog.extend(bytes);
            return;
        }
        while !bytes.is_empty() {
            match self.write_some(bytes) {
                Wrote::Bytes(n) => bytes = &bytes[n..],
                Wrote::Full => {
                    self.backlog.extend(bytes);
                    return;
                }
                Wrote::Gone => return,
            }
        }
    }

    /// Writes the backlog as far as stdout takes it now; true when it is all
    /// out.
    pub fn flush(&mut self) -> bool {
        while !self.backlog.is_empty() {
            let (front, _) = self.backlog.as_slices();
            match self.write_some(front) {
                Wrote::Bytes(n) => drop(self.backlog.drain(..n)),
                Wrote::Full => return false,
                Wrote::Gone => self.backlog.clear(),
            }
        }
        true
    }

    /// One write that does not wait.
    fn write_some(&self, bytes: &[u8]) -> Wrote {
        loop {
            let n = match self.sink {
                Sink::Own(ref fd) => raw_write(fd.as_raw_fd(), bytes),
                Sink::Plain(fd) => raw_write(fd, bytes),
                // SAFETY: send() reads at most `bytes.len()` bytes from a
                // live slice.
                Sink::Socket(fd) => unsafe {
                    libc::send(
                        fd,
                        bytes.as_ptr().cast(),
                        bytes.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                },
                Sink::Polled(fd) => {
                    if !has_room(fd) {
                        return Wrote::Full;
                    }
                    // A pipe that polls writable has room for PIPE_BUF bytes.
                    raw_write(fd, &bytes[..bytes.len().min(libc::PIPE_BUF)])
                }
            };
            if n > 0 {
                return Wrote::Bytes(n as usize);
            }
            if n == 0 {
                // Nothing taken of a non-empty write: it never will be.
                return Wrote::Gone;
            }
            match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return Wrote::Full,
                _ => return Wrote::Gone,
            }
        }
    }
}

fn raw_write(fd: RawFd, bytes: &[u8]) -> isize {
    // SAFETY: write() reads at most `bytes.len()` bytes from a live slice.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) }
}

/// Whether `fd` can take a write now (or would fail at once).
fn has_room(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd we own, zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// Sleeps until `fd` has room for output, `wake` (an eventfd) is written, or
/// a signal comes; the caller then looks at why. A write to `wake` is
/// consumed.
pub fn wait_for_room(fd: RawFd, wake: &vmm_sys_util::eventfd::EventFd) {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two pollfds we own; EINTR (a signal) is one of the answers.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if fds[1].revents != 0 {
        let _ = wake.read();
    }
}

/// The Launcher's stdout, shared by the console and the early console so
/// their bytes keep their order.
pub fn stdout() -> MutexGuard<'static, Output> {
    static STDOUT: OnceLock<Mutex<Output>> = OnceLock::new();
    STDOUT
        .get_or_init(|| Mutex::new(Output::open(libc::STDOUT_FILENO)))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors, which the Files then own.
        unsafe {
            assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        }
    }

    fn flags(fd: RawFd) -> i32 {
        // SAFETY: F_GETFL only reads the description's flags.
        unsafe { libc::fcntl(fd, libc::F_GETFL) }
    }

    #[test]
    fn a_full_pipe_keeps_a_backlog_and_loses_nothing() {
        let (mut reader, writer) = pipe();
        let mut out = Output::open(writer.as_raw_fd());
        assert!(matches!(out.sink, Sink::Own(_)), "a pipe is opened again");
        // The reopened description is non-blocking; the one we were given
        // (and share with whoever gave it) is left as it was.
        assert_eq!(flags(out.fd()) & libc::O_NONBLOCK, libc::O_NONBLOCK);
        assert_eq!(flags(writer.as_raw_fd()) & libc::O_NONBLOCK, 0);

        // Far more than the pipe holds: write() comes back at once, and what
        // the pipe did not take waits in the backlog.
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut sent = 0;
        while sent < data.len() && out.room() > 0 {
            let n = out.room().min(data.len() - sent).min(10_000);
            out.write(&data[sent..sent + n]);
            sent += n;
        }
        assert!(!out.is_empty(), "a 64 KiB pipe can't have taken it all");
        assert_eq!(out.room(), 0);
        assert!(!out.flush(), "nobody read: still full");

        // A reader comes: the backlog drains, in order.
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        while !out.flush() {
            let n = reader.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        drop(out);
        drop(writer);
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got, &data[..sent]);
    }

    #[test]
    fn a_closed_reader_drops_output_instead_of_keeping_it() {
        let (reader, writer) = pipe();
        let mut out = Output::open(writer.as_raw_fd());
        drop(reader);
        out.write(b"nobody hears this");
        assert!(out.is_empty());
    }

    #[test]
    fn a_regular_file_is_written_in_place() {
        let path = std::env::temp_dir().join(format!("lguest-stdout-{}", std::process::id()));
        let mut file = File::create(&path).unwrap();
        std::io::Write::write_all(&mut file, b"before:").unwrap();
        let mut out = Output::open(file.as_raw_fd());
        assert!(matches!(out.sink, Sink::Plain(_)));
        out.write(b"after");
        assert!(out.is_empty());
        assert_eq!(std::fs::read(&path).unwrap(), b"before:after");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_socket_is_sent_to_without_waiting() {
        let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut out = Output::open(mine.as_raw_fd());
        assert!(matches!(out.sink, Sink::Socket(_)));
        let chunk = [b'x'; 16384];
        // A socket buffer fills too; write() must come back all the same.
        for _ in 0..64 {
            if out.room() < chunk.len() {
                break;
            }
            out.write(&chunk);
        }
        assert!(!out.is_empty(), "the socket should be full by now");
        assert_eq!(flags(mine.as_raw_fd()) & libc::O_NONBLOCK, 0);
        drop(theirs);
    }
}
