//! Interrupts (ABI section 6): pending IRQs, kicking the vCPU, and the
//! frames the Host builds on the Guest's stack.
//!
//! Any thread may raise an IRQ ([`Irqs::raise`]): it sets the pending bit,
//! wakes a halted vCPU (an eventfd) and kicks a running one out of KVM_RUN
//! (a signal whose handler sets `immediate_exit`, so a kick that lands just
//! before KVM_RUN is not lost). The vCPU thread alone decides what to deliver,
//! in [`crate::vcpu`], just before it enters the Guest.

use kvm_bindings::kvm_run;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

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
    /// The "look again within 1 ms" timer, and whether it is armed.
    recheck: Mutex<TimerFd>,
    recheck_armed: AtomicBool,
}

impl Irqs {
    /// Called on the vCPU thread: kicks will go to this thread.
    pub fn new() -> std::io::Result<Arc<Irqs>> {
        Ok(Arc::new(Irqs {
            pending: AtomicU32::new(0),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            // SAFETY: pthread_self has no preconditions.
            vcpu_thread: unsafe { libc::pthread_self() },
            recheck: Mutex::new(nonblocking_timer()?),
            recheck_armed: AtomicBool::new(false),
        }))
    }

    /// Marks `irq` pending and gets the vCPU to look at it.
    pub fn raise(&self, irq: u32) {
        self.pending.fetch_or(1 << irq, Ordering::SeqCst);
        self.kick();
    }

    /// Wakes a halted vCPU and interrupts a running one.
    pub fn kick(&self) {
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

    /// Arms the 1 ms re-look, unless it is already armed.
    pub fn recheck_soon(&self) {
        if !self.recheck_armed.swap(true, Ordering::SeqCst) {
            let _ = lock(&self.recheck).reset(Duration::from_millis(1), None);
        }
    }

    /// The re-look timer's descriptor, for the timer thread to wait on.
    fn recheck_fd(&self) -> std::os::fd::RawFd {
        lock(&self.recheck).as_raw_fd()
    }

    /// The timer thread saw the re-look expire.
    pub fn recheck_fired(&self) {
        let _ = lock(&self.recheck).wait();
        self.recheck_armed.store(false, Ordering::SeqCst);
        self.kick();
    }
}

/// A timerfd whose read never blocks: the timer thread reads it only after
/// epoll says it expired, but the vCPU may re-arm it in between.
fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let timer = TimerFd::new()?;
    // SAFETY: fcntl on a descriptor we own, with no pointers involved.
    let ok = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } == 0;
    ok.then_some(timer).ok_or_else(std::io::Error::last_os_error)
}

/// Locks a timer; a poisoned lock still holds a usable descriptor.
fn lock(m: &Mutex<TimerFd>) -> std::sync::MutexGuard<'_, TimerFd> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A gate the Guest loaded with LOAD_IDT_ENTRY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gate {
    pub offset: u64,
    /// Interrupt gates clear irq_enabled on delivery; trap gates don't.
    pub interrupt: bool,
}

/// Decodes a 16-byte gate; `Ok(None)` when it is not present.
pub fn decode_gate(vector: u64, low: u64, high: u64) -> Result<Option<Gate>, String> {
    if low & (1 << 47) == 0 {
        return Ok(None);
    }
    let type_ = ((low >> 40) & 0xF) as u8;
    if type_ != lguest_abi::GATE_INTERRUPT && type_ != lguest_abi::GATE_TRAP {
        return Err(format!("bad IDT gate type {type_} for vector {vector}"));
    }
    let offset = (low & 0xFFFF) | ((low >> 48) << 16) | ((high & 0xFFFF_FFFF) << 32);
    if offset >= lguest_abi::RESERVE_MEM {
        return Err(format!(
            "bad IDT gate offset {offset:#x} for vector {vector}: not a lower-half address"
        ));
    }
    Ok(Some(Gate {
        offset,
        interrupt: type_ == lguest_abi::GATE_INTERRUPT,
    }))
}

/// Where the Host puts a frame: ABI section 6's stack rule. `stack` is the
/// SET_STACK (top, pages), if on. Returns the new RSP before pushes, or the
/// overflow error.
pub fn frame_base(rsp: u64, stack: Option<(u64, u64)>) -> Result<u64, ()> {
    let base = match stack {
        None => rsp.wrapping_sub(lguest_abi::RED_ZONE),
        Some((top, pages)) => {
            let bottom = top.wrapping_sub(pages * lguest_abi::PAGE_SIZE);
            if bottom < rsp && rsp <= top {
                rsp - lguest_abi::RED_ZONE
            } else if bottom.wrapping_sub(lguest_abi::PAGE_SIZE) < rsp && rsp <= bottom {
                return Err(());
            } else {
                top
            }
        }
    };
    Ok(base & !15)
}

/// A pending clock event: SET_CLOCKEVENT arms it, its thread raises IRQ 0.
pub struct ClockEvent {
    timer: Arc<Mutex<TimerFd>>,
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClockEvent {
    /// Starts the timer thread, which also serves the 1 ms re-look.
    pub fn start(irqs: Arc<Irqs>) -> std::io::Result<ClockEvent> {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let timer = Arc::new(Mutex::new(nonblocking_timer()?));
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (lock(&timer).as_raw_fd(), 0u64),
            (irqs.recheck_fd(), 1),
            (stop.as_raw_fd(), 2),
        ] {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))?;
        }
        let (t, s) = (timer.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("lguest-timer".into())
            .spawn(move || {
                let mut events = [EpollEvent::default(); 3];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    for ev in &events[..n] {
                        match ev.data() {
                            0 => {
                                // Expired, unless re-armed since: then
                                // the read fails and nothing is raised.
                                if lock(&t).wait().is_ok() {
                                    irqs.raise(lguest_abi::TIMER_IRQ);
                                }
                            }
                            1 => irqs.recheck_fired(),
                            _ => {
                                let _ = s.read();
                                return;
                            }
                        }
                    }
                }
            })?;
        Ok(ClockEvent {
            timer,
            stop,
            thread: Some(thread),
        })
    }

    /// SET_CLOCKEVENT: fire once after `delta_ns` (0 cancels; tiny deltas
    /// fire at once). Re-arming replaces the previous event.
    pub fn set(&self, delta_ns: u64, irqs: &Irqs) {
        let mut timer = lock(&self.timer);
        if delta_ns == 0 {
            let _ = timer.clear();
        } else if delta_ns < lguest_abi::CLOCK_MIN_DELTA_NS {
            let _ = timer.clear();
            irqs.raise(lguest_abi::TIMER_IRQ);
        } else {
            let _ = timer.reset(Duration::from_nanos(delta_ns), None);
        }
    }
}

impl Drop for ClockEvent {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_decode_and_bad_types_are_refused() {
        let g = crate::host_pages::gate(0x20_1234, 0x10, 0xE, 0);
        let low = u64::from_le_bytes(g[0..8].try_into().unwrap());
        let high = u64::from_le_bytes(g[8..16].try_into().unwrap());
        assert_eq!(
            decode_gate(32, low, high),
            Ok(Some(Gate {
                offset: 0x20_1234,
                interrupt: true
            }))
        );
        assert_eq!(decode_gate(32, low & !(1 << 47), high), Ok(None));
        let type5 = (low & !(0xF << 40)) | (5 << 40);
        assert!(decode_gate(32, type5, high).unwrap_err().contains("bad IDT gate type 5"));
        assert!(decode_gate(32, low, 0xFFFF_8000).is_err());
    }

    #[test]
    fn frame_base_follows_the_stack_rule() {
        // No SET_STACK: skip the red zone, align down.
        assert_eq!(frame_base(0x10_0008, None), Ok(0x10_0008 - 128 & !15));
        let stack = Some((0x20_0000, 2));
        // Inside the stack: nest below the red zone.
        assert_eq!(frame_base(0x1F_F000, stack), Ok(0x1F_F000 - 128));
        // Exactly at the top counts as inside.
        assert_eq!(frame_base(0x20_0000, stack), Ok(0x20_0000 - 128));
        // In the page below the stack: overflow.
        assert_eq!(frame_base(0x1F_E000 - 8, stack), Err(()));
        // Elsewhere: switch to the top.
        assert_eq!(frame_base(0x50_0000, stack), Ok(0x20_0000));
    }
}
