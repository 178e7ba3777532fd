//! Time: the TSC, the one-shot timer and waiting.
//!
//! The Host gives us one clock event: SET_CLOCKEVENT(delta in ns) raises
//! IRQ 0 once, never early. For measuring we read the TSC directly (rdtsc
//! works in ring 3) and convert with lguest_data.tsc_khz, which the Host sets
//! if the TSC runs at a constant rate.
//!
//! Waiting for a device (`idle`, `Deadline`) is here too: it belongs to
//! neither device model, and both use it.

use core::arch::asm;
use core::cell::Cell;
use core::sync::atomic::{AtomicU64, Ordering};

use lguest_abi::CLOCK_MIN_DELTA_NS;

use crate::hcall;
use crate::interrupts::TrapFrame;
use crate::lguest_data;

/// Timer interrupts taken so far.
static TICKS: AtomicU64 = AtomicU64::new(0);

/// The TSC when the last timer interrupt came.
static LAST_TICK: AtomicU64 = AtomicU64::new(0);

/// The TSC frequency we measured ourselves, if the Host gave none.
static CALIBRATED_KHZ: AtomicU64 = AtomicU64::new(0);

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the time stamp counter (CR4.TSD is clear, so
    // ring 3 may).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (hi as u64) << 32 | lo as u64
}

/// The IRQ 0 handler, installed by interrupts::init.
pub fn timer_irq(_frame: &mut TrapFrame) {
    LAST_TICK.store(rdtsc(), Ordering::SeqCst);
    TICKS.fetch_add(1, Ordering::SeqCst);
}

pub fn ticks() -> u64 {
    TICKS.load(Ordering::SeqCst)
}

/// The TSC when the last timer interrupt came.
pub fn last_tick() -> u64 {
    LAST_TICK.load(Ordering::SeqCst)
}

/// Sleep until `ticks()` reaches `target` (an armed timer must get it
/// there).
///
/// Interrupts go off before we look at the count: otherwise the tick could
/// arrive between the look and the HALT, and we would sleep for ever. A
/// halted Guest still wakes for an interrupt, and the Host turns interrupts
/// on as it delivers (Linux's "sti; hlt", in one hypercall).
pub fn wait_for_ticks(target: u64) {
    loop {
        let flags = lguest_data::irq_save();
        if ticks() >= target {
            lguest_data::irq_restore(flags);
            return;
        }
        hcall::halt();
        lguest_data::irq_restore(flags);
    }
}

/// The TSC frequency: the Host's figure if it gave one, else our own,
/// measured once against the timer. The timer never fires early, so that
/// figure is, if anything, too high, which makes a wait measured with it (a
/// Deadline) longer, never shorter. Needs interrupts (interrupts::init) when
/// the Host gives 0.
pub fn tsc_khz() -> u64 {
    let khz = lguest_data::tsc_khz() as u64;
    if khz != 0 {
        return khz;
    }
    let calibrated = CALIBRATED_KHZ.load(Ordering::SeqCst);
    if calibrated != 0 {
        return calibrated;
    }
    const CALIBRATE_MS: u64 = 10;
    let target = ticks() + 1;
    let start = rdtsc();
    hcall::set_clockevent(CALIBRATE_MS * 1_000_000);
    wait_for_ticks(target);
    let khz = (last_tick() - start) / CALIBRATE_MS;
    let khz = khz.max(1);
    CALIBRATED_KHZ.store(khz, Ordering::SeqCst);
    khz
}

/// A moment to give up at, on the TSC. While one is armed, `idle` sets the
/// clock event for it, so a HALT never outlives it; dropping it cancels the
/// timer, so no stray tick reaches whoever counts ticks next.
pub struct Deadline {
    end: u64,
    armed: Cell<bool>,
}

impl Deadline {
    pub fn after_ms(ms: u64) -> Deadline {
        Deadline {
            end: rdtsc() + ms * tsc_khz(),
            armed: Cell::new(false),
        }
    }

    pub fn passed(&self) -> bool {
        rdtsc() >= self.end
    }

    fn remaining_ns(&self) -> u64 {
        let cycles = self.end.saturating_sub(rdtsc());
        (cycles as u128 * 1_000_000 / tsc_khz() as u128) as u64
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if self.armed.get() {
            hcall::set_clockevent(0);
        }
    }
}

/// Sleep until an interrupt arrives (or `deadline` passes), unless `ready`
/// says there is work already. `ready` runs with interrupts off, and should
/// ask for the interrupts it wants (Vring::enable_cb) before it looks, so
/// nothing can slip in between its look and our HALT: an interrupt that comes
/// meanwhile is held, and HALT returns at once to take it. This is the
/// "sti; hlt" of wait_for_ticks, with a driver's look in the middle.
pub fn idle(deadline: Option<&Deadline>, ready: impl FnOnce() -> bool) {
    let flags = lguest_data::irq_save();
    if !ready() {
        match deadline {
            Some(d) if d.passed() => {}
            Some(d) => {
                hcall::set_clockevent(d.remaining_ns().max(CLOCK_MIN_DELTA_NS));
                d.armed.set(true);
                hcall::halt();
            }
            None => hcall::halt(),
        }
    }
    lguest_data::irq_restore(flags);
}
