//! What the tests need of a kernel that the reference Guest itself never
//! does: the hypercalls it has no use for, masking one IRQ, spinning, and
//! waiting for console input with a deadline.

use core::sync::atomic::{compiler_fence, Ordering};

use lguest_abi::hcall as nr;
use lguest_guest::hcall::{hcall, send_interrupts};
use lguest_guest::lguest_data::{self, IRQ_ON};
use lguest_guest::shell::{Input, Terminal};
use lguest_guest::time::{self, idle, Deadline};

/// Seconds since 1970, the slow way.
pub fn get_wallclock() -> u64 {
    // SAFETY: only RAX changes.
    unsafe { hcall(nr::GET_WALLCLOCK, 0, 0, 0, 0) }
}

/// Set (true) or clear CR0.TS: with it set, the next x87 instruction raises
/// #NM. The Rust code is soft-float and never uses the x87.
pub fn set_ts(on: bool) {
    // SAFETY: see above: only our own x87 instructions can trap.
    unsafe { hcall(nr::TS, on as u64, 0, 0, 0) };
}

/// Set the FS and GS bases. Nothing in this Guest uses FS or GS otherwise
/// (there is no thread-local storage in a kernel this small).
pub fn load_tls(fs_base: u64, gs_base: u64) {
    // SAFETY: see above.
    unsafe { hcall(nr::LOAD_TLS, fs_base, gs_base, 0, 0) };
}

/// Mask (`blocked = true`) or unmask IRQ `irq`. Unmasking, like turning
/// interrupts on, may leave one pending that the Host only delivers at our
/// next exit: irq_pending says to make that exit now.
pub fn block_irq(irq: u32, blocked: bool) {
    compiler_fence(Ordering::SeqCst);
    let mask = lguest_data::blocked_interrupts();
    if blocked {
        lguest_data::set_blocked_interrupts(mask | 1 << irq);
    } else {
        lguest_data::set_blocked_interrupts(mask & !(1 << irq));
        if lguest_data::irq_enabled() & IRQ_ON != 0 && lguest_data::irq_pending() == IRQ_ON {
            send_interrupts();
        }
    }
    compiler_fence(Ordering::SeqCst);
}

/// Spin for at least `us` microseconds, interrupts as they are.
pub fn busy_wait_us(us: u64) {
    let cycles = us * time::tsc_khz() / 1000;
    let start = time::rdtsc();
    while time::rdtsc() - start < cycles {
        core::hint::spin_loop();
    }
}

/// Wait for input on `console` (until `deadline`, if any): Nothing only if
/// it passed.
pub fn read(console: &mut dyn Terminal, out: &mut [u8], deadline: Option<&Deadline>) -> Input {
    loop {
        match console.poll(out) {
            Input::Nothing if deadline.is_some_and(|d| d.passed()) => return Input::Nothing,
            Input::Nothing => idle(deadline, || console.arm_rx()),
            input => return input,
        }
    }
}
