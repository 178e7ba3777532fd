//! Time (ABI section 7): SET_CLOCKEVENT's one-shot timer, on a timerfd
//! watched by a thread of its own that raises IRQ 0 when it expires. The same
//! thread serves the vCPU's "look again within 1 ms" timer.

use crate::interrupts::Irqs;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// A timerfd whose read never blocks: the timer thread reads it only after
/// epoll says it expired, but the vCPU may re-arm it in between.
pub(crate) fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let timer = TimerFd::new()?;
    // SAFETY: fcntl on a descriptor we own, with no pointers involved.
    let ok = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } == 0;
    ok.then_some(timer)
        .ok_or_else(std::io::Error::last_os_error)
}

/// Locks a timer; a poisoned lock still holds a usable descriptor.
pub(crate) fn lock(m: &Mutex<TimerFd>) -> std::sync::MutexGuard<'_, TimerFd> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let (t, s) = (timer.clone(), stop.clone());
        let thread = crate::interrupts::without_sigint(|| {
            std::thread::Builder::new()
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
                })
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
