//! The sandbox: once the Launcher has opened everything a Guest will ever
//! need, it gives up what it could do with the rest of the machine.
//!
//! Two steps, both taken in [`crate::launcher::Launch::run`] after /dev/kvm,
//! the taps, the disks, the kernel and the initrd are open, and before the
//! Guest's first instruction:
//!
//! - **the drop** (`--chroot=DIR`, `--username=USER`), as the original
//!   Launcher did: change root to DIR, then become USER, with USER's groups,
//!   and make sure there is no way back;
//! - **seccomp**: every thread runs under an allow-list of system calls for
//!   its kind ([`ThreadKind`]); anything else ends the Launcher.
//!
//! A restart needs nothing new: the kernel and initrd are read from the
//! descriptors opened at set-up, and a new VM comes from the /dev/kvm
//! descriptor. The lists, and why each call is on them, are in
//! docs/reliability.md ("The sandbox").

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `what` is the options and their verb: "--chroot needs".
    #[error("{what} root (the Launcher runs as uid {euid})")]
    NotRoot { what: &'static str, euid: u32 },
    #[error("--username={0}: no such user")]
    NoSuchUser(String),
    #[error("--username={name}: cannot look the user up: {err}")]
    Lookup { name: String, err: std::io::Error },
    #[error("--chroot={dir}: {err}")]
    ChrootDir { dir: String, err: std::io::Error },
    #[error("--chroot={dir}: {kind}, not a directory")]
    ChrootNotDir { dir: String, kind: &'static str },
    #[error("cannot drop privileges: {step} failed: {err}")]
    Drop {
        step: &'static str,
        err: std::io::Error,
    },
    #[error(
        "--username={0}: setuid(0) still succeeds after the drop, so nothing was dropped \
         (use a user other than root)"
    )]
    NotDropped(String),
    #[error("LGUEST_SECCOMP={0}: expected kill, trap or log")]
    BadMode(String),
    #[error("cannot build the seccomp filters: {0}")]
    Filter(String),
    #[error("cannot install the seccomp filter of the {kind} thread: {err}")]
    Install {
        kind: &'static str,
        err: seccompiler::Error,
    },
}

/*
 * The drop.
 */

/// The user named by `--username`, looked up at set-up, while /etc/passwd and
/// /etc/group are still there to read (the chroot may have neither).
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Every group USER is in, the primary one included: what initgroups()
    /// would set, read now instead of after the chroot.
    pub groups: Vec<libc::gid_t>,
}

impl User {
    pub fn lookup(name: &str) -> Result<User, SandboxError> {
        let no_user = || SandboxError::NoSuchUser(name.to_string());
        let c_name = CString::new(name).map_err(|_| no_user())?;
        let mut buf = vec![0 as libc::c_char; 1024];
        // SAFETY: passwd is plain data, filled in by getpwnam_r below.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        loop {
            let mut found: *mut libc::passwd = std::ptr::null_mut();
            // SAFETY: every pointer is to live memory we own, and `buf.len()`
            // is the size of `buf`; the strings in `pw` point into `buf`.
            let rc = unsafe {
                libc::getpwnam_r(
                    c_name.as_ptr(),
                    &mut pw,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut found,
                )
            };
            if rc == libc::ERANGE && buf.len() < 1 << 20 {
                buf.resize(buf.len() * 2, 0);
                continue;
            }
            if found.is_null() {
                // 0 or one of the "not found" codes getpwnam_r(3) lists.
                return Err(match rc {
                    0 | libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => no_user(),
                    _ => SandboxError::Lookup {
                        name: name.to_string(),
                        err: std::io::Error::from_raw_os_error(rc),
                    },
                });
            }
            break;
        }
        let (uid, gid) = (pw.pw_uid, pw.pw_gid);
        let mut groups: Vec<libc::gid_t> = vec![0; 32];
        loop {
            let mut n = groups.len() as libc::c_int;
            // SAFETY: `groups` has room for `n` gids; getgrouplist writes at
            // most that many and says how many there are in `n`.
            let rc =
                unsafe { libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
            if rc >= 0 {
                groups.truncate(n.max(0) as usize);
                break;
            }
            if n as usize <= groups.len() || groups.len() >= 1 << 16 {
                return Err(SandboxError::Lookup {
                    name: name.to_string(),
                    err: std::io::Error::other("getgrouplist failed"),
                });
            }
            groups.resize(n as usize, 0);
        }
        Ok(User {
            name: name.to_string(),
            uid,
            gid,
            groups,
        })
    }
}

/// What the drop will do: a user to become, a directory to make the root.
#[derive(Debug, Default)]
pub struct Privileges {
    user: Option<User>,
    /// The `--chroot` directory, opened at set-up: the chroot is made
    /// through this descriptor, so it is the directory we checked.
    chroot: Option<(String, OwnedFd)>,
}

/// The effective uid.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

impl Privileges {
    /// Checks `--username` and `--chroot` (it is set-up: nothing changes
    /// yet). Both need root, and the user and the directory must exist.
    pub fn prepare(username: Option<&str>, chroot: Option<&Path>) -> Result<Self, SandboxError> {
        let what = match (username, chroot) {
            (None, None) => return Ok(Privileges::default()),
            (Some(_), None) => "--username needs",
            (None, Some(_)) => "--chroot needs",
            (Some(_), Some(_)) => "--username and --chroot need",
        };
        if euid() != 0 {
            return Err(SandboxError::NotRoot { what, euid: euid() });
        }
        let user = username.map(User::lookup).transpose()?;
        let chroot = match chroot {
            None => None,
            Some(dir) => {
                let name = dir.display().to_string();
                let dir_err = |err| SandboxError::ChrootDir {
                    dir: name.clone(),
                    err,
                };
                let meta = std::fs::metadata(dir).map_err(dir_err)?;
                if !meta.is_dir() {
                    return Err(SandboxError::ChrootNotDir {
                        dir: name,
                        kind: if meta.is_file() {
                            "a regular file"
                        } else {
                            crate::files::kind_of(meta.file_type())
                        },
                    });
                }
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
                    .open(dir)
                    .map_err(dir_err)?;
                Some((name, OwnedFd::from(file)))
            }
        };
        Ok(Privileges { user, chroot })
    }

    /// Whether there is anything to drop.
    pub fn is_empty(&self) -> bool {
        self.user.is_none() && self.chroot.is_none()
    }

    /// Changes root, then becomes the user: groups, then gid, then uid (the
    /// first two need the privilege the last one gives up). Then checks
    /// that setuid(0) fails: a uid that can come back was never dropped.
    /// Called with no other thread running.
    pub fn drop_now(&self) -> Result<(), SandboxError> {
        let fail = |step| move |err| SandboxError::Drop { step, err };
        if let Some((dir, fd)) = &self.chroot {
            // SAFETY: fchdir on a descriptor we own.
            check(unsafe { libc::fchdir(fd.as_raw_fd()) }).map_err(fail("fchdir"))?;
            std::os::unix::fs::chroot(".").map_err(fail("chroot"))?;
            std::env::set_current_dir("/").map_err(fail("chdir(\"/\")"))?;
            tracing::debug!("changed root to {dir}");
        }
        let Some(user) = &self.user else {
            return Ok(());
        };
        // SAFETY: setgroups reads `len` gids from a live slice.
        check(unsafe { libc::setgroups(user.groups.len(), user.groups.as_ptr()) })
            .map_err(fail("setgroups"))?;
        // SAFETY: plain system calls on this process's credentials.
        check(unsafe { libc::setresgid(user.gid, user.gid, user.gid) })
            .map_err(fail("setresgid"))?;
        // SAFETY: as above.
        check(unsafe { libc::setresuid(user.uid, user.uid, user.uid) })
            .map_err(fail("setresuid"))?;
        // SAFETY: as above; if it succeeds we are root and stop at once.
        if unsafe { libc::setuid(0) } == 0 {
            return Err(SandboxError::NotDropped(user.name.clone()));
        }
        tracing::debug!(
            "now user {} (uid {}, gid {}, groups {:?})",
            user.name,
            user.uid,
            user.gid,
            user.groups
        );
        Ok(())
    }
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/*
 * seccomp.
 */

/// The kinds of thread the Launcher runs, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The Launcher's main thread, which runs the vCPU and, on a restart,
    /// builds the next VM and starts the next threads. Threads inherit its
    /// filter before they install their own, so its list holds theirs.
    Vcpu,
    /// A device's thread (`virtio`): its queues and its backend.
    Device,
    /// The timer thread (`timer`): the clock event and the re-look.
    Timer,
    /// The gdb stub's watcher thread: it waits for gdb to send something
    /// while the Guest runs, and kicks the vCPU (the stub itself runs on
    /// the vCPU thread, whose list then grows by the stub's group).
    Gdb,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Timer,
        ThreadKind::Gdb,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Device => "device",
            ThreadKind::Timer => "timer",
            ThreadKind::Gdb => "gdb",
        }
    }
}

/// What happens to a thread that makes a call its list does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// The kernel kills the Launcher at once (SIGSYS): the normal runs.
    Kill,
    /// The kernel sends SIGSYS, and the Launcher says which thread made
    /// which call before it dies of it (`--verbose`, `LGUEST_SECCOMP=trap`).
    Trap,
    /// The call goes ahead and the kernel logs it (dmesg, `type=1326`):
    /// for finding what a list lacks (`LGUEST_SECCOMP=log`).
    Log,
}

impl Enforcement {
    /// `LGUEST_SECCOMP`'s value.
    pub fn parse(value: &str) -> Result<Enforcement, SandboxError> {
        match value {
            "kill" => Ok(Enforcement::Kill),
            "trap" => Ok(Enforcement::Trap),
            "log" => Ok(Enforcement::Log),
            _ => Err(SandboxError::BadMode(value.to_string())),
        }
    }

    fn action(self) -> SeccompAction {
        match self {
            Enforcement::Kill => SeccompAction::KillProcess,
            Enforcement::Trap => SeccompAction::Trap,
            Enforcement::Log => SeccompAction::Log,
        }
    }
}

/// The ioctl numbers on the lists, built as the kernel's headers build them.
#[allow(clippy::missing_safety_doc)]
mod ioctls {
    use kvm_bindings::*;
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
    ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
    ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);
    ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
    ioctl_iow_nr!(KVM_SET_GUEST_DEBUG, KVMIO, 0x9b, kvm_guest_debug);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
    ioctl_iow_nr!(TUNSETVNETHDRSZ, 0x54, 0xd8, ::std::os::raw::c_int);
}

/// What a list allows of one system call's arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Args {
    /// Anything.
    Any,
    /// Argument `index` (its low 32 bits) is one of these, named.
    OneOf {
        index: u8,
        values: Vec<(&'static str, u64)>,
    },
    /// Argument `index` has every bit of `mask` set.
    HasBits { index: u8, mask: u64 },
}

/// One system call a group allows.
#[derive(Clone, Debug)]
struct Call {
    name: &'static str,
    nr: i64,
    args: Args,
}

/// A group of calls, and why a kind of thread needs them.
struct Group {
    name: &'static str,
    calls: Vec<Call>,
}

macro_rules! calls {
    ($($name:ident),* $(,)?) => {
        vec![$(Call { name: stringify!($name), nr: paste_sys!($name), args: Args::Any }),*]
    };
}

/// `libc::SYS_<name>`.
macro_rules! paste_sys {
    (read) => {
        libc::SYS_read
    };
    (write) => {
        libc::SYS_write
    };
    (readv) => {
        libc::SYS_readv
    };
    (writev) => {
        libc::SYS_writev
    };
    (pread64) => {
        libc::SYS_pread64
    };
    (pwrite64) => {
        libc::SYS_pwrite64
    };
    (preadv) => {
        libc::SYS_preadv
    };
    (pwritev) => {
        libc::SYS_pwritev
    };
    (close) => {
        libc::SYS_close
    };
    (poll) => {
        libc::SYS_poll
    };
    (ppoll) => {
        libc::SYS_ppoll
    };
    (mmap) => {
        libc::SYS_mmap
    };
    (munmap) => {
        libc::SYS_munmap
    };
    (mprotect) => {
        libc::SYS_mprotect
    };
    (madvise) => {
        libc::SYS_madvise
    };
    (mremap) => {
        libc::SYS_mremap
    };
    (brk) => {
        libc::SYS_brk
    };
    (futex) => {
        libc::SYS_futex
    };
    (sched_yield) => {
        libc::SYS_sched_yield
    };
    (exit) => {
        libc::SYS_exit
    };
    (exit_group) => {
        libc::SYS_exit_group
    };
    (sigaltstack) => {
        libc::SYS_sigaltstack
    };
    (rt_sigreturn) => {
        libc::SYS_rt_sigreturn
    };
    (rt_sigprocmask) => {
        libc::SYS_rt_sigprocmask
    };
    (rt_sigaction) => {
        libc::SYS_rt_sigaction
    };
    (getpid) => {
        libc::SYS_getpid
    };
    (gettid) => {
        libc::SYS_gettid
    };
    (clock_gettime) => {
        libc::SYS_clock_gettime
    };
    (clock_nanosleep) => {
        libc::SYS_clock_nanosleep
    };
    (nanosleep) => {
        libc::SYS_nanosleep
    };
    (getrandom) => {
        libc::SYS_getrandom
    };
    (epoll_create1) => {
        libc::SYS_epoll_create1
    };
    (epoll_ctl) => {
        libc::SYS_epoll_ctl
    };
    (epoll_wait) => {
        libc::SYS_epoll_wait
    };
    (epoll_pwait) => {
        libc::SYS_epoll_pwait
    };
    (eventfd2) => {
        libc::SYS_eventfd2
    };
    (timerfd_create) => {
        libc::SYS_timerfd_create
    };
    (timerfd_gettime) => {
        libc::SYS_timerfd_gettime
    };
    (timerfd_settime) => {
        libc::SYS_timerfd_settime
    };
    (fdatasync) => {
        libc::SYS_fdatasync
    };
    (fsync) => {
        libc::SYS_fsync
    };
    (sendto) => {
        libc::SYS_sendto
    };
    (recvfrom) => {
        libc::SYS_recvfrom
    };
    (rseq) => {
        libc::SYS_rseq
    };
    (set_robust_list) => {
        libc::SYS_set_robust_list
    };
    (sched_getaffinity) => {
        libc::SYS_sched_getaffinity
    };
    (clone3) => {
        libc::SYS_clone3
    };
    (getsockname) => {
        libc::SYS_getsockname
    };
    (accept4) => {
        libc::SYS_accept4
    };
    (setsockopt) => {
        libc::SYS_setsockopt
    };
    (shutdown) => {
        libc::SYS_shutdown
    };
}

fn ioctl(values: &[(&'static str, u64)]) -> Call {
    Call {
        name: "ioctl",
        nr: libc::SYS_ioctl,
        args: Args::OneOf {
            index: 1,
            values: values.to_vec(),
        },
    }
}

fn one_of(name: &'static str, nr: i64, index: u8, values: &[(&'static str, u64)]) -> Call {
    Call {
        name,
        nr,
        args: Args::OneOf {
            index,
            values: values.to_vec(),
        },
    }
}

/// The groups every thread needs, whatever it does.
fn common_groups(pid: u32) -> Vec<Group> {
    vec![
        Group {
            name: "memory (the allocator, thread stacks)",
            calls: calls![brk, mmap, munmap, mprotect, madvise, mremap],
        },
        Group {
            name: "locks, and a thread's end",
            calls: calls![futex, sched_yield, sigaltstack, exit, exit_group],
        },
        Group {
            name: "signals: kicks, the terminal's restore on SIGTERM, dying of a signal",
            calls: {
                let mut c = calls![rt_sigreturn, rt_sigprocmask, rt_sigaction, getpid, gettid];
                c.push(one_of(
                    "tgkill",
                    libc::SYS_tgkill,
                    0,
                    &[("our own process", pid as u64)],
                ));
                c
            },
        },
        Group {
            name: "time",
            calls: calls![clock_gettime, clock_nanosleep, nanosleep],
        },
        Group {
            name: "output, randomness",
            calls: calls![write, getrandom],
        },
        Group {
            name: "the terminal, put back on every way out",
            calls: vec![ioctl(&[("TCGETS", libc::TCGETS), ("TCSETS", libc::TCSETS)])],
        },
    ]
}

/// The groups of one kind of thread, beyond the common ones.
fn own_groups(kind: ThreadKind) -> Vec<Group> {
    use ioctls::*;
    match kind {
        ThreadKind::Vcpu => vec![
            Group {
                name: "running the Guest",
                calls: vec![ioctl(&[
                    ("KVM_RUN", KVM_RUN()),
                    ("KVM_GET_SREGS", KVM_GET_SREGS()),
                    ("KVM_SET_SREGS", KVM_SET_SREGS()),
                    ("KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION()),
                ])],
            },
            Group {
                name: "a new VM at each boot (restart)",
                calls: {
                    let mut c = vec![ioctl(&[
                        ("KVM_CREATE_VM", KVM_CREATE_VM()),
                        ("KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE()),
                        ("KVM_CREATE_VCPU", KVM_CREATE_VCPU()),
                        ("KVM_GET_SUPPORTED_CPUID", KVM_GET_SUPPORTED_CPUID()),
                        ("KVM_SET_CPUID2", KVM_SET_CPUID2()),
                        ("KVM_SET_REGS", KVM_SET_REGS()),
                        ("KVM_GET_FPU", KVM_GET_FPU()),
                        ("KVM_SET_FPU", KVM_SET_FPU()),
                        ("KVM_SET_MSRS", KVM_SET_MSRS()),
                        ("KVM_GET_XCRS", KVM_GET_XCRS()),
                        ("KVM_SET_XCRS", KVM_SET_XCRS()),
                        ("KVM_GET_TSC_KHZ", KVM_GET_TSC_KHZ()),
                    ])];
                    c.extend(calls![
                        pread64,
                        eventfd2,
                        epoll_create1,
                        epoll_ctl,
                        timerfd_create,
                        timerfd_settime,
                        close,
                    ]);
                    c.push(one_of(
                        "fcntl",
                        libc::SYS_fcntl,
                        1,
                        &[
                            ("F_GETFD", libc::F_GETFD as u64),
                            ("F_GETFL", libc::F_GETFL as u64),
                            ("F_SETFL", libc::F_SETFL as u64),
                        ],
                    ));
                    c
                },
            },
            Group {
                name: "starting threads (threads, never processes), and what a new thread \
                       does until its own filter is on",
                calls: {
                    let mut c = vec![Call {
                        name: "clone",
                        nr: libc::SYS_clone,
                        args: Args::HasBits {
                            index: 0,
                            mask: libc::CLONE_THREAD as u64,
                        },
                    }];
                    // Allowed here so that the second filter's ENOSYS
                    // answers it (see `no_clone3`).
                    c.extend(calls![clone3, rseq, set_robust_list, sched_getaffinity]);
                    c.push(one_of(
                        "prctl",
                        libc::SYS_prctl,
                        0,
                        &[
                            ("PR_SET_NAME", libc::PR_SET_NAME as u64),
                            ("PR_SET_NO_NEW_PRIVS", libc::PR_SET_NO_NEW_PRIVS as u64),
                        ],
                    ));
                    // Another filter can only narrow what this one allows.
                    c.push(one_of(
                        "seccomp",
                        libc::SYS_seccomp,
                        0,
                        &[(
                            "SECCOMP_SET_MODE_FILTER",
                            libc::SECCOMP_SET_MODE_FILTER as u64,
                        )],
                    ));
                    c
                },
            },
            Group {
                name: "devices served on the vCPU thread (console output and input, \
                       virtio-mmio), the HALT sleep",
                calls: {
                    let mut c = calls![read, sendto, poll, ppoll];
                    c.push(ioctl(&[("TUNSETVNETHDRSZ", TUNSETVNETHDRSZ())]));
                    c
                },
            },
            Group {
                name: "the 2007 device model (--transport=dma)",
                calls: {
                    // A HALT looks whether a clock event is armed; the
                    // console's input thread reads a copy of stdin.
                    let mut c = calls![timerfd_gettime];
                    c.push(one_of(
                        "fcntl",
                        libc::SYS_fcntl,
                        1,
                        &[("F_DUPFD_CLOEXEC", libc::F_DUPFD_CLOEXEC as u64)],
                    ));
                    c
                },
            },
        ],
        ThreadKind::Device => vec![
            Group {
                name: "queues and backends: disks, taps, stdin and stdout",
                calls: {
                    let mut c = calls![
                        read, readv, writev, pread64, pwrite64, preadv, pwritev, fdatasync, fsync,
                        sendto, poll, ppoll,
                    ];
                    c.push(ioctl(&[("TUNSETVNETHDRSZ", TUNSETVNETHDRSZ())]));
                    c
                },
            },
            Group {
                name: "waiting for kicks",
                calls: {
                    let mut c = calls![epoll_wait, epoll_pwait, epoll_ctl, close];
                    // std checks a descriptor it closes is valid (F_GETFD).
                    c.push(one_of(
                        "fcntl",
                        libc::SYS_fcntl,
                        1,
                        &[("F_GETFD", libc::F_GETFD as u64)],
                    ));
                    c
                },
            },
            Group {
                name: "the shared network (--sharenet): whether a Launcher still holds a slot",
                // A full or locked ring whose reader may be gone: the
                // sender (a vCPU's SEND_DMA, a tap bridge) and the reader
                // test that slot's lock on the FILE, already open.
                calls: vec![one_of(
                    "fcntl",
                    libc::SYS_fcntl,
                    1,
                    &[("F_OFD_SETLK", libc::F_OFD_SETLK as u64)],
                )],
            },
        ],
        ThreadKind::Timer => vec![Group {
            name: "the timerfds",
            calls: calls![epoll_wait, epoll_pwait, read, timerfd_settime, close],
        }],
        ThreadKind::Gdb => vec![Group {
            name: "watching the debugger's socket (and closing its copy of it)",
            calls: {
                let mut c = calls![poll, ppoll, read, close];
                // std checks a descriptor it closes is valid (F_GETFD).
                c.push(one_of(
                    "fcntl",
                    libc::SYS_fcntl,
                    1,
                    &[("F_GETFD", libc::F_GETFD as u64)],
                ));
                c
            },
        }],
    }
}

/// With `--gdb`, the stub itself runs on the vCPU thread: it waits for gdb
/// to connect, talks to it, and reads and writes the Guest's registers.
fn gdb_stub_group() -> Group {
    use ioctls::*;
    Group {
        name: "the gdb stub, on the vCPU thread (with --gdb)",
        calls: {
            let mut c = calls![accept4, getsockname, recvfrom, sendto, setsockopt, shutdown];
            c.push(ioctl(&[
                ("FIONBIO", libc::FIONBIO),
                ("KVM_SET_GUEST_DEBUG", KVM_SET_GUEST_DEBUG()),
                ("KVM_GET_REGS", KVM_GET_REGS()),
                ("KVM_SET_REGS", KVM_SET_REGS()),
                ("KVM_GET_FPU", KVM_GET_FPU()),
                ("KVM_SET_FPU", KVM_SET_FPU()),
            ]));
            // The connection is shared with the watcher thread (try_clone).
            c.push(one_of(
                "fcntl",
                libc::SYS_fcntl,
                1,
                &[("F_DUPFD_CLOEXEC", libc::F_DUPFD_CLOEXEC as u64)],
            ));
            c
        },
    }
}

/// Every group of `kind`'s list. The vCPU thread starts the others, which
/// run under its filter until they install their own: its list holds
/// theirs (the gdb thread's only when there is one).
fn groups(kind: ThreadKind, pid: u32, gdb: bool) -> Vec<Group> {
    let mut all = common_groups(pid);
    all.extend(own_groups(kind));
    if kind == ThreadKind::Vcpu {
        for other in [ThreadKind::Device, ThreadKind::Timer] {
            all.extend(own_groups(other));
        }
        if gdb {
            all.extend(own_groups(ThreadKind::Gdb));
            all.push(gdb_stub_group());
        }
    }
    all
}

/// A group as docs/reliability.md lists it: its name and its calls, with
/// the argument values allowed (`ioctl(KVM_RUN, ...)`).
pub struct ListedGroup {
    pub name: &'static str,
    pub calls: Vec<String>,
}

/// Each kind's own groups (the vCPU's with the common ones): what
/// docs/reliability.md lists, and a test checks the two agree.
pub fn documented_lists() -> Vec<(ThreadKind, Vec<ListedGroup>)> {
    ThreadKind::ALL
        .iter()
        .map(|&kind| {
            let mut own = own_groups(kind);
            if kind == ThreadKind::Gdb {
                own.push(gdb_stub_group());
            }
            let own = own.into_iter();
            let groups: Vec<Group> = if kind == ThreadKind::Vcpu {
                common_groups(std::process::id())
                    .into_iter()
                    .chain(own)
                    .collect()
            } else {
                own.collect()
            };
            let listed = groups
                .into_iter()
                .map(|g| ListedGroup {
                    name: g.name,
                    calls: g
                        .calls
                        .iter()
                        .map(|c| match &c.args {
                            Args::OneOf { values, .. } => format!(
                                "{}({})",
                                c.name,
                                values.iter().map(|v| v.0).collect::<Vec<_>>().join(", ")
                            ),
                            _ => c.name.to_string(),
                        })
                        .collect(),
                })
                .collect();
            (kind, listed)
        })
        .collect()
}

/// Merges calls into one rule set: a call allowed with any arguments
/// anywhere is allowed with any; argument values add up.
fn merge(groups: &[Group]) -> BTreeMap<i64, (&'static str, Args)> {
    let mut calls: BTreeMap<i64, (&'static str, Args)> = BTreeMap::new();
    for call in groups.iter().flat_map(|g| &g.calls) {
        let merged = match (calls.remove(&call.nr), &call.args) {
            (None, args) => args.clone(),
            (Some((_, Args::Any)), _) | (_, Args::Any) => Args::Any,
            (
                Some((
                    _,
                    Args::OneOf {
                        index,
                        values: mut have,
                    },
                )),
                Args::OneOf {
                    index: i,
                    values: more,
                },
            ) if index == *i => {
                for v in more {
                    if !have.contains(v) {
                        have.push(*v);
                    }
                }
                Args::OneOf {
                    index,
                    values: have,
                }
            }
            (Some((_, old)), new) if old == *new => old,
            (Some((_, old)), new) => unreachable!("{}: {old:?} and {new:?}", call.name),
        };
        calls.insert(call.nr, (call.name, merged));
    }
    calls
}

fn rules(args: &Args) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    match args {
        Args::Any => Ok(vec![]),
        Args::OneOf { index, values } => values
            .iter()
            .map(|(_, v)| {
                SeccompRule::new(vec![SeccompCondition::new(
                    *index,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    *v,
                )?])
            })
            .collect(),
        Args::HasBits { index, mask } => Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
            *index,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(*mask),
            *mask,
        )?])?]),
    }
}

/// Compiles one list: what it allows, allowed; anything else, `action`.
fn compile(
    calls: &BTreeMap<i64, (&'static str, Args)>,
    action: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let err = |e: &dyn std::fmt::Display| SandboxError::Filter(e.to_string());
    let rules = calls
        .iter()
        .map(|(nr, (_, args))| Ok((*nr, rules(args).map_err(|e| err(&e))?)))
        .collect::<Result<BTreeMap<_, _>, SandboxError>>()?;
    let filter = SeccompFilter::new(rules, action, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| err(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))
}

/// The compiled filters, one per kind of thread.
#[derive(Clone)]
pub struct Filters {
    enforcement: Enforcement,
    programs: Vec<(ThreadKind, BpfProgram)>,
    /// clone3 fails with ENOSYS, so the C library falls back to clone,
    /// whose flags a filter can see (clone3 passes them in memory): only
    /// threads may be made, never processes.
    no_clone3: BpfProgram,
    /// Every call on some list, by number, for the trap's message.
    names: Vec<(i64, &'static str)>,
}

impl Filters {
    /// Builds the lists for this process (`tgkill` is allowed towards it
    /// alone). With `gdb` (`--gdb`), the vCPU thread runs the gdb stub and
    /// starts its watcher thread.
    pub fn compile(enforcement: Enforcement, gdb: bool) -> Result<Filters, SandboxError> {
        let pid = std::process::id();
        let mut programs = Vec::new();
        for kind in ThreadKind::ALL {
            let calls = merge(&groups(kind, pid, gdb));
            programs.push((kind, compile(&calls, enforcement.action())?));
        }
        let every = merge(&groups(ThreadKind::Vcpu, pid, true));
        let names = every.iter().map(|(nr, (name, _))| (*nr, *name)).collect();
        let mut clone3 = BTreeMap::new();
        clone3.insert(libc::SYS_clone3, vec![]);
        let no_clone3 = SeccompFilter::new(
            clone3,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            TargetArch::x86_64,
        )
        .and_then(TryInto::try_into)
        .map_err(|e| SandboxError::Filter(e.to_string()))?;
        Ok(Filters {
            enforcement,
            programs,
            no_clone3,
            names,
        })
    }

    fn program(&self, kind: ThreadKind) -> &BpfProgram {
        &self
            .programs
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("a program for every kind")
            .1
    }

    /// Installs `kind`'s filter on the calling thread (with no_new_privs,
    /// which seccompiler sets first: an unprivileged thread may then filter
    /// itself, and nothing it runs can gain privileges).
    fn install(&self, kind: ThreadKind) -> Result<(), SandboxError> {
        let install = |p: &BpfProgram| {
            seccompiler::apply_filter(p).map_err(|err| SandboxError::Install {
                kind: kind.name(),
                err,
            })
        };
        remember(kind);
        install(self.program(kind))?;
        if kind == ThreadKind::Vcpu {
            install(&self.no_clone3)?;
        }
        Ok(())
    }
}

/// The filters in force, once the vCPU thread has locked down.
static ACTIVE: OnceLock<Filters> = OnceLock::new();

thread_local! {
    /// This thread's kind and name, for the trap's message (read in a
    /// signal handler: plain data, no destructor).
    static CURRENT: Cell<Option<(ThreadKind, [u8; 16])>> = const { Cell::new(None) };
}

fn remember(kind: ThreadKind) {
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let n = &n.as_bytes()[..n.len().min(15)];
        name[..n.len()].copy_from_slice(n);
    }
    CURRENT.with(|c| c.set(Some((kind, name))));
}

/// Locks the calling thread (the vCPU's) down: installs its filter, and
/// makes the others' ready for the threads it will start
/// ([`enter_thread`]). Called once, with no other thread running, after
/// the drop.
pub fn lock_down(filters: Filters) -> Result<(), SandboxError> {
    if filters.enforcement == Enforcement::Trap {
        install_trap_handler();
    }
    let filters = ACTIVE.get_or_init(|| filters);
    filters.install(ThreadKind::Vcpu)
}

/// The first thing a Host thread does: install its kind's filter, if the
/// Launcher locked down (in the library's unit tests it has not: then
/// nothing happens). A thread that cannot is not run unfiltered: the
/// Launcher ends, saying why.
pub fn enter_thread(kind: ThreadKind) {
    let Some(filters) = ACTIVE.get() else { return };
    if let Err(e) = filters.install(kind) {
        crate::output::message(format_args!("seccomp: {e}"));
        crate::devices::terminal::restore();
        // SAFETY: _exit ends the process at once; nothing is left half done
        // that the kernel does not clean up (the disks are written through).
        unsafe { libc::_exit(2) };
    }
}

/*
 * The trap: a forbidden call becomes SIGSYS, and we say what it was.
 */

/// The kernel's siginfo for SIGSYS (`_sigsys` in the union after the
/// first three ints and their padding).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

fn install_trap_handler() {
    // SAFETY: sigaction with a handler that only formats into a stack
    // buffer, write()s it, restores the terminal and re-raises: all
    // async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
}

/// A line built on the stack, for the signal handler.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    use std::fmt::Write;
    // SAFETY: the kernel hands SIGSYS handlers a siginfo whose union is
    // `_sigsys`, laid out as SigsysInfo.
    let nr = unsafe { (*(info as *const SigsysInfo)).syscall } as i64;
    let name = ACTIVE
        .get()
        .and_then(|f| f.names.iter().find(|(n, _)| *n == nr))
        .map_or("not on any list", |(_, name)| name);
    let (kind, thread) = CURRENT
        .with(|c| c.get())
        .map_or(("unfiltered", [0; 16]), |(k, t)| (k.name(), t));
    let thread = std::str::from_utf8(&thread)
        .unwrap_or("")
        .trim_end_matches('\0');
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    let _ = writeln!(
        line,
        "lguest: seccomp: the {kind} thread ({thread}) made system call {nr} ({name}), \
         which its list does not allow"
    );
    // Then back to the default action, and the signal again: it is blocked
    // while we run, so it arrives as we return, and the Launcher dies of
    // SIGSYS as it would have without the trap.
    // SAFETY: write reads a live stack buffer; signal and raise take no
    // pointers; all three, and restore, are async-signal-safe.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        crate::devices::terminal::restore();
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        use ioctls::*;
        // From linux/kvm.h and linux/if_tun.h, as strace decodes them.
        assert_eq!(KVM_RUN(), 0xAE80);
        assert_eq!(KVM_CREATE_VM(), 0xAE01);
        assert_eq!(KVM_CREATE_VCPU(), 0xAE41);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_AE46);
        assert_eq!(KVM_GET_SREGS(), 0x8138_AE83);
        assert_eq!(KVM_SET_SREGS(), 0x4138_AE84);
        assert_eq!(KVM_GET_SUPPORTED_CPUID(), 0xC008_AE05);
        assert_eq!(KVM_SET_GUEST_DEBUG(), 0x4048_AE9B);
        assert_eq!(TUNSETVNETHDRSZ(), 0x4004_54D8);
    }

    #[test]
    fn every_list_compiles_and_the_vcpu_list_holds_the_others() {
        let filters = Filters::compile(Enforcement::Kill, true).unwrap();
        for kind in ThreadKind::ALL {
            assert!(!filters.program(kind).is_empty());
        }
        let pid = std::process::id();
        let vcpu = merge(&groups(ThreadKind::Vcpu, pid, true));
        for kind in ThreadKind::ALL {
            for (nr, (name, args)) in merge(&groups(kind, pid, true)) {
                let (_, have) = vcpu
                    .get(&nr)
                    .unwrap_or_else(|| panic!("{name} not on vCPU"));
                let covered = match (have, &args) {
                    (Args::Any, _) => true,
                    (Args::OneOf { values: h, .. }, Args::OneOf { values: w, .. }) => {
                        w.iter().all(|v| h.contains(v))
                    }
                    (h, w) => h == w,
                };
                assert!(covered, "the vCPU list lacks {name}{args:?} of {kind:?}");
            }
        }
    }

    #[test]
    fn a_call_allowed_anywhere_stays_allowed_with_any_arguments() {
        let groups = vec![
            Group {
                name: "a",
                calls: vec![ioctl(&[("X", 1)])],
            },
            Group {
                name: "b",
                calls: vec![ioctl(&[("Y", 2)])],
            },
        ];
        let merged = merge(&groups);
        assert_eq!(
            merged[&libc::SYS_ioctl].1,
            Args::OneOf {
                index: 1,
                values: vec![("X", 1), ("Y", 2)]
            }
        );
        let mut more = groups;
        more.push(Group {
            name: "c",
            calls: calls![read],
        });
        more[2].calls[0].nr = libc::SYS_ioctl;
        assert_eq!(merge(&more)[&libc::SYS_ioctl].1, Args::Any);
    }

    #[test]
    fn modes() {
        assert_eq!(Enforcement::parse("kill").unwrap(), Enforcement::Kill);
        assert_eq!(Enforcement::parse("log").unwrap(), Enforcement::Log);
        assert!(Enforcement::parse("allow").is_err());
    }
}
