//! Waiting for devices, and a watchdog for when they never answer.
//!
//! virtio-drivers mostly polls: its blocking calls spin on the used ring. Our
//! own waits (for the non-blocking calls) sleep instead: HALT until an
//! interrupt, the device's own or a timer we arm as a fallback, then look
//! again. The fallback is coarse on purpose: with a Host that delivers device
//! interrupts, the wait ends on the interrupt.
//!
//! A spin inside virtio-drivers can't time out by itself, so while a test
//! runs the timer handler also keeps a watchdog: it re-arms the timer every
//! few milliseconds and fails the test (from the handler: a FAIL line and a
//! crash) if it runs past its time.

use core::sync::atomic::{AtomicU64, Ordering};

use lguest_abi::{FIRST_EXTERNAL_VECTOR, TIMER_IRQ};
use lguest_guest::cell::GuestCell;
use lguest_guest::interrupts::{self, TrapFrame};
use lguest_guest::{fail, hcall, lguest_data, time};

/// How often a sleeping wait looks again without an interrupt, and how
/// often the watchdog looks.
const POLL_NS: u64 = 20_000_000;
const WATCHDOG_NS: u64 = 10_000_000;

/// A moment, in TSC cycles.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(u64);

impl Deadline {
    pub fn after_ms(ms: u64) -> Deadline {
        Deadline(time::rdtsc().saturating_add(ms.saturating_mul(time::tsc_khz())))
    }

    pub fn passed(&self) -> bool {
        time::rdtsc() >= self.0
    }
}

/// Sleep until `done()` holds (true) or the deadline passes (false).
/// `done` runs with virtual interrupts off, so an interrupt that makes it true
/// can't slip in between the look and the HALT.
pub fn until(deadline: &Deadline, mut done: impl FnMut() -> bool) -> bool {
    loop {
        let flags = lguest_data::irq_save();
        if done() {
            lguest_data::irq_restore(flags);
            return true;
        }
        if deadline.passed() {
            lguest_data::irq_restore(flags);
            return false;
        }
        hcall::set_clockevent(POLL_NS);
        // The Host turns interrupts on as it wakes us and delivers: the
        // handler has run when HALT returns.
        hcall::halt();
        lguest_data::irq_restore(flags);
    }
}

/*
 * The watchdog.
 */

/// The test being watched (empty: none) and when it runs out, in TSC cycles.
static WATCHED: GuestCell<&'static str> = GuestCell::new("");
static WATCH_UNTIL: AtomicU64 = AtomicU64::new(0);
static WATCH_SECONDS: AtomicU64 = AtomicU64::new(0);

/// Take the timer interrupt: count it as usual, then look at the watchdog.
fn tick(frame: &mut TrapFrame) {
    time::timer_irq(frame);
    let until = WATCH_UNTIL.load(Ordering::SeqCst);
    if until == 0 {
        return;
    }
    if time::rdtsc() >= until {
        WATCH_UNTIL.store(0, Ordering::SeqCst);
        fail(
            WATCHED.read(),
            format_args!(
                "no answer from the device within {} s",
                WATCH_SECONDS.load(Ordering::SeqCst)
            ),
        );
    }
    hcall::set_clockevent(WATCHDOG_NS);
}

/// Put our timer handler in place of the plain one.
pub fn init() {
    interrupts::set_handler(FIRST_EXTERNAL_VECTOR + TIMER_IRQ as u8, Some(tick));
}

/// Watch test `name` for `seconds`.
pub fn watch(name: &'static str, seconds: u64) {
    let until = time::rdtsc().saturating_add(seconds * 1000 * time::tsc_khz());
    let flags = lguest_data::irq_save();
    WATCHED.write(name);
    WATCH_SECONDS.store(seconds, Ordering::SeqCst);
    WATCH_UNTIL.store(until, Ordering::SeqCst);
    lguest_data::irq_restore(flags);
    hcall::set_clockevent(WATCHDOG_NS);
}

/// Stop watching.
pub fn unwatch() {
    WATCH_UNTIL.store(0, Ordering::SeqCst);
    hcall::set_clockevent(0);
}
