//! Time (ABI section 7): SET_CLOCKEVENT's one-shot timer, on a timerfd
//! watched by a thread of its own that raises IRQ 0 when it expires. The same
//! thread serves the vCPU's "look again within 1 ms" timer ([`ReLook`]).

use crate::kick::Irqs;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// A timerfd whose read never blocks: the timer thread reads it only after
/// epoll says it expired, but the vCPU may re-arm it in between.
fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let timer = TimerFd::new()?;
    // SAFETY: fcntl on a descriptor we own, with no pointers involved.
    let ok = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } == 0;
    ok.then_some(timer)
        .ok_or_else(std::io::Error::last_os_error)
}

/// Locks a timer; a poisoned lock still holds a usable descriptor.
fn lock(m: &Mutex<TimerFd>) -> std::sync::MutexGuard<'_, TimerFd> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// ABI section 6: a candidate IRQ left undelivered (the noirq window, a
/// stub in flight, several at once) is looked at again within 1 ms, without
/// waiting for the Guest to exit. The vCPU arms it; the timer thread kicks
/// the vCPU when it fires.
#[derive(Clone)]
pub struct ReLook(Arc<ReLookTimer>);

struct ReLookTimer {
    timer: Mutex<TimerFd>,
    armed: AtomicBool,
}

impl ReLook {
    /// Arms the 1 ms re-look, unless it is already armed.
    pub fn soon(&self) {
        if !self.0.armed.swap(true, Ordering::SeqCst) {
            let _ = lock(&self.0.timer).reset(Duration::from_millis(1), None);
        }
    }

    fn fired(&self, irqs: &Irqs) {
        let _ = lock(&self.0.timer).wait();
        self.0.armed.store(false, Ordering::SeqCst);
        irqs.kick();
    }
}

/// A pending clock event: SET_CLOCKEVENT arms it, its thread raises IRQ 0.
pub struct ClockEvent {
    timer: Arc<Mutex<TimerFd>>,
    relook: ReLook,
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClockEvent {
    /// Starts the timer thread, which also serves the 1 ms re-look.
    pub fn start(irqs: Arc<Irqs>) -> std::io::Result<ClockEvent> {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let timer = Arc::new(Mutex::new(nonblocking_timer()?));
        let relook = ReLook(Arc::new(ReLookTimer {
            timer: Mutex::new(nonblocking_timer()?),
            armed: AtomicBool::new(false),
        }));
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (lock(&timer).as_raw_fd(), 0u64),
            (lock(&relook.0.timer).as_raw_fd(), 1),
            (stop.as_raw_fd(), 2),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let (t, r, s) = (timer.clone(), relook.clone(), stop.clone());
        let thread = crate::kick::without_sigint(|| {
            std::thread::Builder::new()
                .name("lguest-timer".into())
                .spawn(move || {
                    crate::sandbox::enter_thread(crate::sandbox::ThreadKind::Timer);
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
                                    // The lock is held through the raise,
                                    // so a re-arm comes before or after
                                    // both, never between.
                                    let mut timer = lock(&t);
                                    if timer.wait().is_ok() {
                                        irqs.raise(lguest_abi::TIMER_IRQ);
                                    }
                                    drop(timer);
                                }
                                1 => r.fired(&irqs),
                                _ => {
                                    let _ = s.read();
                                    return;
                                }
                            }
                        }
                    }
                })
        })?;
        Ok(ClockEvent {
            timer,
            relook,
            stop,
            thread: Some(thread),
        })
    }

    /// The vCPU's re-look timer, served by the same thread.
    pub fn relook(&self) -> ReLook {
        self.relook.clone()
    }

    /// Whether a clock event is set and has not fired yet.
    pub fn armed(&self) -> bool {
        lock(&self.timer).is_armed().unwrap_or(false)
    }

    /// SET_CLOCKEVENT: fire once after `delta_ns` (0 cancels; tiny deltas
    /// fire at once). Re-arming replaces the previous event.
    /*H:470 SET_CLOCKEVENT: a one-shot timerfd; its thread raises IRQ 0. */
    pub fn set(&self, delta_ns: u64, irqs: &Irqs) {
        let mut timer = lock(&self.timer);
        // The event is replaced: an IRQ 0 the old one raised and the Guest
        // has not taken yet goes with it, or the Guest would see the new
        // one fire early.
        irqs.clear(lguest_abi::TIMER_IRQ);
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
