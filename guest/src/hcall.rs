//! Hypercalls: how the Guest asks the Host to do what ring 3 can't.
//!
//! A hypercall is `int $0x1f` with the call number in RAX and up to four
//! arguments in RDX, RBX, RCX and RSI; the result comes back in RAX and every
//! other register is left alone. The first time the Host meets a particular
//! `int $0x1f` it may rewrite those two bytes into `out %al, $0x1f`, which
//! exits straight to it and is much cheaper on some KVMs; it's the same
//! length, so we never notice (lguest did the reverse, patching `vmcall`).
//!
//! Some calls don't need an answer at once. Those can go through the async
//! ring in lguest_data, which the Host drains before it handles the next
//! synchronous call: many calls, one exit.

use core::arch::asm;
use core::sync::atomic::{compiler_fence, Ordering};

use lguest_abi::{hcall as nr, HcallArgs, HCALL_RING_SIZE, HCALL_STATUS_FREE, HCALL_STATUS_QUEUED};

use crate::cell::GuestCell;
use crate::lguest_data;

/// Make hypercall `nr` with four arguments; returns RAX.
///
/// LLVM keeps RBX for itself, so we can't name it as an operand: we swap the
/// second argument into it around the `int` and swap it back afterwards.
///
/// # Safety
///
/// A hypercall can change what memory is mapped, where interrupts go and more.
/// The caller must know that this call leaves the Rust world intact (or that
/// the Host is meant to end the Guest here).
#[inline(always)]
/*G:220 A hypercall: the number in RAX, arguments in RDX, RBX, RCX and
 * RSI, then `int $0x1f`. The Host will rewrite these two bytes into
 * `out %al,$0x1f` the first time through. */
pub unsafe fn hcall(nr: u64, arg1: u64, arg2: u64, arg3: u64, arg4: u64) -> u64 {
    let ret: u64;
    // The instruction only traps to the Host, which preserves every register
    // but RAX (the asm restores RBX itself). Memory is clobbered (no `nomem`):
    // the Host may read or write the shared page and what the arguments name.
    // SAFETY: so Rust's state survives; the caller vouches for the effect.
    unsafe {
        asm!(
            "xchg {arg2}, rbx",
            "int 0x1f",
            "xchg {arg2}, rbx",
            arg2 = inout(reg) arg2 => _,
            inlateout("rax") nr => ret,
            in("rdx") arg1,
            in("rcx") arg3,
            in("rsi") arg4,
            options(nostack),
        );
    }
    ret
}

/*
 * The harmless calls get safe wrappers.
 */

/// Run the queued async calls now. Returns 0.
pub fn flush_async() -> u64 {
    // SAFETY: the queued calls were each vouched for when they were queued.
    unsafe { hcall(nr::FLUSH_ASYNC, 0, 0, 0, 0) }
}

/// Let the Host deliver a pending interrupt now. Returns 0.
pub fn send_interrupts() -> u64 {
    // SAFETY: an interrupt is delivered through our own IDT, as at any time.
    unsafe { hcall(nr::SEND_INTERRUPTS, 0, 0, 0, 0) }
}

/// Raise IRQ 0 once, `delta_ns` from now; 0 cancels.
pub fn set_clockevent(delta_ns: u64) {
    // SAFETY: a later timer interrupt is nothing new.
    unsafe { hcall(nr::SET_CLOCKEVENT, delta_ns, 0, 0, 0) };
}

/// Sleep until an interrupt can be delivered. The Host turns our interrupts
/// on as it wakes us, so the handler has run when this returns.
pub fn halt() {
    // SAFETY: as for send_interrupts.
    unsafe { hcall(nr::HALT, 0, 0, 0, 0) };
}

/// Print a NUL-terminated string on the Host's stdout (the early console).
pub fn notify_str(s: &core::ffi::CStr) {
    // SAFETY: the Host only reads the string, which lives in our image, so
    // below `mem`, as NOTIFY requires.
    unsafe { hcall(nr::NOTIFY, s.as_ptr() as u64, 0, 0, 0) };
}

/// Stop: SHUTDOWN with a reason (up to 127 bytes of it are read) and
/// `how` = power off, restart or crash.
pub fn shutdown(reason: &core::ffi::CStr, how: u64) -> ! {
    // SAFETY: the Host reads the reason and stops the Guest.
    unsafe { hcall(nr::SHUTDOWN, reason.as_ptr() as u64, how, 0, 0) };
    // The Host never returns from SHUTDOWN. If it does, it's broken; all we
    // can do is wait without burning too much.
    loop {
        core::hint::spin_loop();
    }
}

/*
 * The async ring (ABI 4.1). We fill slots in order from 0, wrapping after 63,
 * and the Host empties them in the same order from its own cursor, so our
 * cursor is all the state we need. A slot is ours to fill while its status is
 * 0xFF; we write the registers first and the status last, so the Host never
 * sees a half-written call.
 */

/// The next ring slot we will fill.
static NEXT_SLOT: GuestCell<usize> = GuestCell::new(0);

/// Put a call into the next slot, whatever the call is; false if the ring is
/// full. `async_hcall` is the normal way in; bad=queued-halt uses this to
/// queue a call that must never be queued.
///
/// # Safety
///
/// As for `hcall`: the call will run, at the latest at our next synchronous
/// hypercall. Virtual interrupts must be off, or no interrupt handler may
/// queue calls.
pub unsafe fn queue(nr: u64, arg1: u64, arg2: u64, arg3: u64, arg4: u64) -> bool {
    let i = NEXT_SLOT.read();
    if lguest_data::hcall_status(i) != HCALL_STATUS_FREE {
        return false;
    }
    lguest_data::set_hcall_args(
        i,
        HcallArgs {
            nr,
            arg1,
            arg2,
            arg3,
            arg4,
        },
    );
    // The write barrier: the registers must be in memory before the status
    // says "queued". x86 keeps stores in order, so a compiler fence will do.
    compiler_fence(Ordering::SeqCst);
    lguest_data::set_hcall_status(i, HCALL_STATUS_QUEUED);
    NEXT_SLOT.write((i + 1) % HCALL_RING_SIZE);
    true
}

/// Queue a hypercall whose result we don't need; if the ring is full, make
/// it directly (which drains the ring first, so the order is kept). Returns
/// true if it was queued. Never for LGUEST_INIT, HALT or SHUTDOWN.
///
/// # Safety
///
/// As for `hcall`, remembering the call takes effect later.
/*G:230 The async ring: calls whose answer we don't need wait in
 * lguest_data until the next real hypercall, which runs them first. */
pub unsafe fn async_hcall(nr: u64, arg1: u64, arg2: u64, arg3: u64, arg4: u64) -> bool {
    debug_assert!(!matches!(nr, nr::LGUEST_INIT | nr::HALT | nr::SHUTDOWN));
    // An interrupt handler could queue calls too: keep it out while we pick
    // and fill a slot.
    let flags = lguest_data::irq_save();
    // SAFETY: interrupts are off; the caller vouches for the call.
    let queued = unsafe { queue(nr, arg1, arg2, arg3, arg4) };
    if !queued {
        // SAFETY: the caller vouches for the call.
        unsafe { hcall(nr, arg1, arg2, arg3, arg4) };
    }
    lguest_data::irq_restore(flags);
    queued
}
