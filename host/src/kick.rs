//! Kicks and signals: how other threads (devices, timers, Ctrl-C) reach the
//! vCPU thread.
//!
//! Any thread may raise an IRQ ([`Irqs::raise`]): it sets the pending bit,
//! wakes a halted vCPU (an eventfd) and kicks a running one out of KVM_RUN
//! (a signal whose handler sets `immediate_exit`, so a kick that lands just
//! before KVM_RUN is not lost). The vCPU thread alone decides what to
//! deliver ([`crate::interrupts_and_traps`]), just before it enters the
//! Guest.

use kvm_bindings::kvm_run;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// The running vCPU's kvm_run, for the kick signal handler. One vCPU per
/// process: the Launcher runs one Guest at a time.
static KICK_TARGET: AtomicPtr<kvm_run> = AtomicPtr::new(std::ptr::null_mut());

/// The kick signal: the first real-time signal.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KICK_TARGET.load(Ordering::Acquire);
    if !run.is_null() {
        // SAFETY: KICK_TARGET points at the live, mmapped kvm_run of the vCPU
        // on this thread (cleared before it is unmapped); a byte store is
        // async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Set when the user pressed Ctrl-C three times within a second.
static USER_STOP: AtomicBool = AtomicBool::new(false);
/// Monotonic times (ns) of the last two Ctrl-C presses.
static CTRL_C: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

extern "C" fn on_sigint(_: libc::c_int) {
    let now = monotonic_ns();
    let first = CTRL_C[0].swap(CTRL_C[1].load(Ordering::SeqCst), Ordering::SeqCst);
    CTRL_C[1].store(now, Ordering::SeqCst);
    if first != 0 && now - first < 1_000_000_000 {
        USER_STOP.store(true, Ordering::SeqCst);
        on_kick(0, std::ptr::null_mut(), std::ptr::null_mut());
        // A halted vCPU may have checked USER_STOP just before we set it and
        // be about to sleep: the wake-up eventfd reaches it there too.
        let fd = WAKE_FD.load(Ordering::SeqCst);
        if fd >= 0 {
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte write to an eventfd; async-signal-safe.
            unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        }
    }
}

/// The current Guest's wake-up eventfd, for the SIGINT handler (-1: none).
static WAKE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Three Ctrl-C within one second end the Guest (the first two are ignored,
/// so a stray one doesn't kill it). Only the vCPU thread takes SIGINT (the
/// Host's other threads block it), so the handler's kick interrupts KVM_RUN
/// or the HALT sleep.
pub fn install_ctrl_c_handler() -> std::io::Result<()> {
    // SAFETY: a plain handler that only touches atomics and kvm_run's
    // immediate_exit byte, all async-signal-safe.
    let old = unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    if old == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the user asked to end the Guest.
pub fn user_stopped() -> bool {
    USER_STOP.load(Ordering::SeqCst)
}

/// Runs `f` with SIGINT blocked, so threads it spawns never take Ctrl-C.
pub fn without_sigint<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset_t is plain data; pthread_sigmask only changes this
    // thread's mask, and we restore the old mask after `f`.
    unsafe {
        let mut block: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
        let result = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        result
    }
}

/// Makes `run` the target of kicks (null to stop).
pub fn set_kick_target(run: *mut kvm_run) {
    KICK_TARGET.store(run, Ordering::Release);
}

/// IRQ state shared between the vCPU thread and whoever raises IRQs.
pub struct Irqs {
    pending: AtomicU32,
    /// Written on every raise: a halted vCPU sleeps on it.
    pub wake: EventFd,
    vcpu_thread: libc::pthread_t,
    /// Sudden Death decided off the vCPU thread (by a device).
    death: Mutex<Option<String>>,
    kicks: AtomicU64,
}

impl Irqs {
    /// Called on the vCPU thread: kicks will go to this thread.
    pub fn new() -> std::io::Result<Arc<Irqs>> {
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        WAKE_FD.store(wake.as_raw_fd(), Ordering::SeqCst);
        Ok(Arc::new(Irqs {
            pending: AtomicU32::new(0),
            wake,
            // SAFETY: pthread_self has no preconditions.
            vcpu_thread: unsafe { libc::pthread_self() },
            death: Mutex::new(None),
            kicks: AtomicU64::new(0),
        }))
    }

    /// Marks `irq` pending and gets the vCPU to look at it. An IRQ already
    /// pending needs no second kick: the vCPU has been told, and if it could
    /// not deliver, its 1 ms re-look is armed.
    /*H:440 Any thread raises an IRQ: a bit, an eventfd for a halted vCPU,
     * and a signal for a running one, whose handler sets immediate_exit so
     * even a kick just before KVM_RUN is not lost. */
    pub fn raise(&self, irq: u32) {
        let old = self.pending.fetch_or(1 << irq, Ordering::SeqCst);
        if old & (1 << irq) == 0 {
            self.kick();
        }
    }

    /// Ends the Guest from another thread: the vCPU stops at its next look.
    /// Only the first reason is kept.
    pub fn kill(&self, reason: String) {
        self.death
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason);
        self.kick();
    }

    /// The reason another thread ended the Guest, if one did.
    pub fn death(&self) -> Option<String> {
        self.death.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many kicks there have been: the vCPU compares it before and after
    /// a look, so a kick that lands in between is never lost.
    pub fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::SeqCst)
    }

    /// Wakes a halted vCPU and interrupts a running one.
    pub fn kick(&self) {
        self.kicks.fetch_add(1, Ordering::SeqCst);
        let _ = self.wake.write(1);
        // SAFETY: vcpu_thread is the thread that created us, which outlives
        // every raiser (they are joined before it returns); the handler is
        // installed before any VM runs.
        unsafe { libc::pthread_kill(self.vcpu_thread, kick_signal()) };
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::SeqCst)
    }

    /// The vCPU delivered `irq`.
    pub fn clear(&self, irq: u32) {
        self.pending.fetch_and(!(1 << irq), Ordering::SeqCst);
    }
}

impl Drop for Irqs {
    fn drop(&mut self) {
        // The descriptor closes with us: the SIGINT handler must not write
        // to whatever reuses its number.
        let _ = WAKE_FD.compare_exchange(
            self.wake.as_raw_fd(),
            -1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
}
