//! struct lguest_data: the page the Guest shares with the Host.
//!
//! We hand its physical address to the Host in LGUEST_INIT, our very first
//! hypercall. From then on it is how the two of us talk without exits: the
//! Host writes the time, the faulting address of a #PF, whether an interrupt
//! is pending, and facts about the machine; we write our virtual interrupt
//! flag, which IRQs we block, and the async hypercall ring.
//!
//! The Host can change its fields whenever it delivers an interrupt, which is
//! between any two of our instructions, so every access here is volatile, and
//! the interrupt on/off helpers carry compiler fences so that ordinary memory
//! accesses don't drift across them.

use core::sync::atomic::{compiler_fence, Ordering};

use lguest_abi::{hcall as nr, lguest_data_off, LguestData, HCALL_RING_SIZE, HCALL_STATUS_FREE};

use crate::cell::GuestCell;
use crate::hcall::{hcall, send_interrupts};
use crate::interrupts;

/// The virtual interrupt flag: the `irq_enabled` value meaning "on".
pub const IRQ_ON: u32 = lguest_abi::X86_EFLAGS_IF;

/// The shared page itself. It is page-aligned so that it never straddles a
/// page (the Host maps it by physical address), and it lives in .bss: the
/// Launcher zero-fills that, so every field starts at 0.
#[repr(C, align(4096))]
pub struct SharedPage(GuestCell<LguestData>);

// SAFETY: LguestData is plain integers and arrays of integers, for which all
// zero bytes is a valid value.
pub static LGUEST_DATA: SharedPage = SharedPage(GuestCell::new(unsafe { core::mem::zeroed() }));

// The interrupt return path (interrupts.rs) stores into irq_enabled through
// the address of LGUEST_DATA itself, so the field had better be first.
const _: () = assert!(lguest_data_off::IRQ_ENABLED == 0);

/// The shared page's address: virtual == physical in this Guest.
pub fn ptr() -> *mut LguestData {
    LGUEST_DATA.0.as_ptr()
}

/// One volatile read accessor per field.
macro_rules! reader {
    ($($(#[$doc:meta])* $name:ident: $ty:ty;)*) => {$(
        $(#[$doc])*
        pub fn $name() -> $ty {
            // SAFETY: ptr() is our own aligned static; a volatile read of an
            // integer field can't observe anything invalid, whoever wrote it.
            unsafe { (&raw const (*ptr()).$name).read_volatile() }
        }
    )*};
}

/// One volatile write accessor per Guest-written field.
macro_rules! writer {
    ($($(#[$doc:meta])* $name:ident => $field:ident: $ty:ty;)*) => {$(
        $(#[$doc])*
        pub fn $name(value: $ty) {
            // SAFETY: ptr() is our own aligned static; nobody holds a
            // reference into it, so a volatile store is fine.
            unsafe { (&raw mut (*ptr()).$field).write_volatile(value) }
        }
    )*};
}

reader! {
    /// 0x200 when our virtual interrupts are on.
    irq_enabled: u32;
    /// Bit n set: IRQ n is masked.
    blocked_interrupts: u32;
    /// The faulting address of the last #PF the Host delivered.
    cr2: u64;
    /// The wall clock, as of the last delivery (or INIT).
    time_sec: u64;
    time_nsec: u64;
    /// 0x200 while a deliverable IRQ waits for us to turn interrupts on.
    irq_pending: u32;
    /// The initial PML4's physical address (Host-owned).
    pgdir: u64;
    /// The TSC frequency, or 0 if the Host doesn't trust it.
    tsc_khz: u32;
    /// The first page frame we may not touch.
    pfn_limit: u64;
    /// The PML4 entry every PML4 of ours must carry in slot 511.
    host_pml4e: u64;
    /// 1 << 47: the upper half belongs to the Host.
    reserve_mem: u64;
}

writer! {
    set_irq_enabled => irq_enabled: u32;
    set_blocked_interrupts => blocked_interrupts: u32;
    set_noirq_start => noirq_start: u64;
    set_noirq_end => noirq_end: u64;
}

/// The status byte of async ring slot `i`: 0xFF free, 0 queued.
pub fn hcall_status(i: usize) -> u8 {
    assert!(i < HCALL_RING_SIZE);
    // SAFETY: in bounds (checked), our own static, volatile byte read.
    unsafe { (&raw const (*ptr()).hcall_status[i]).read_volatile() }
}

pub fn set_hcall_status(i: usize, status: u8) {
    assert!(i < HCALL_RING_SIZE);
    // SAFETY: in bounds (checked), our own static, volatile byte store.
    unsafe { (&raw mut (*ptr()).hcall_status[i]).write_volatile(status) }
}

/// Fill the registers of async ring slot `i` (not its status).
pub fn set_hcall_args(i: usize, args: lguest_abi::HcallArgs) {
    assert!(i < HCALL_RING_SIZE);
    // SAFETY: in bounds (checked), our own static, volatile store.
    unsafe { (&raw mut (*ptr()).hcalls[i]).write_volatile(args) }
}

/// Fill in our half of the page and register it: LGUEST_INIT, which must be
/// the first hypercall we make.
/*G:210 LGUEST_INIT: the page we share with the Host, where our virtual
 * interrupt flag, masked IRQs and async hypercall ring live, and where the
 * Host tells us its limits. */
pub fn init() {
    // Every ring slot starts free; zero would mean "queued", and the Host
    // would run 64 FLUSH_ASYNCs at our first hypercall.
    for i in 0..HCALL_RING_SIZE {
        set_hcall_status(i, HCALL_STATUS_FREE);
    }
    // The Host must not interrupt us between restoring irq_enabled and the
    // iretq that leaves a handler (see interrupts.rs).
    let (start, end) = interrupts::noirq_window();
    set_noirq_start(start);
    set_noirq_end(end);
    // Interrupts stay off until we have an IDT to take them.
    set_irq_enabled(0);
    compiler_fence(Ordering::SeqCst);
    // SAFETY: LGUEST_INIT only makes the Host fill in its fields of the
    // page, which we only ever access with volatile operations.
    unsafe { hcall(nr::LGUEST_INIT, ptr() as u64, 0, 0, 0) };
    compiler_fence(Ordering::SeqCst);
}

/*
 * The virtual interrupt flag. Turning it off is one store: from then on the
 * Host won't deliver. Turning it on is a store too, but an interrupt may have
 * become pending while it was off, and the Host only notices that we turned
 * it on when we next exit: irq_pending tells us to exit now, with
 * SEND_INTERRUPTS, rather than leave the interrupt waiting.
 */

/// Turn virtual interrupts off; returns the previous `irq_enabled`.
pub fn irq_save() -> u32 {
    let flags = irq_enabled();
    set_irq_enabled(0);
    compiler_fence(Ordering::SeqCst);
    flags
}

/// Put back what `irq_save` returned.
pub fn irq_restore(flags: u32) {
    compiler_fence(Ordering::SeqCst);
    set_irq_enabled(flags & IRQ_ON);
    if flags & IRQ_ON != 0 && irq_pending() == IRQ_ON {
        send_interrupts();
    }
}

pub fn irq_enable() {
    irq_restore(IRQ_ON);
}
