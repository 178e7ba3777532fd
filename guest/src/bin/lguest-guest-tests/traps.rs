//! Traps the self-tests expect, and the stack SET_STACK moves delivery to.
//!
//! The kernel's interrupt code (lguest_guest::interrupts) lets anyone put a
//! handler on a vector; a test uses that to catch the very trap it causes,
//! check the frame the Host built for it, and carry on.

use core::mem::offset_of;

use lguest_abi::FIRST_EXTERNAL_VECTOR;
use lguest_guest::cell::GuestCell;
use lguest_guest::interrupts::{set_handler, Handler, TrapFrame};
use lguest_guest::lguest_data;

/// Where the Host pushed SS (the highest word of its frame), relative to the
/// TrapFrame: tests check it against the stack rules of ABI section 6.
pub const SS_SLOT: u64 = offset_of!(TrapFrame, ss) as u64;

/*
 * Expected traps. A test that wants to see a trap says where it will happen
 * (`site`, the faulting instruction's address, from a label in its assembly)
 * and where to go on (`resume`). The handler checks the trap is the expected
 * one, writes down what the frame looked like and moves RIP. Any other trap of
 * that vector is a real bug and panics.
 */

/// What one expected trap looked like, as its handler saw it.
#[derive(Clone, Copy, Debug)]
pub struct TrapRecord {
    /// How many times the trap happened.
    pub hits: u32,
    pub rip: u64,
    pub error: u64,
    pub cs: u64,
    pub ss: u64,
    /// The interrupted RSP and RFLAGS, from the Host's frame.
    pub rsp: u64,
    pub rflags: u64,
    /// lguest_data.cr2 as the handler saw it.
    pub cr2: u64,
    /// lguest_data.irq_enabled as the handler saw it.
    pub irq_enabled: u32,
    /// Where the TrapFrame was: tells us which stack the Host delivered on.
    pub frame: u64,
}

impl TrapRecord {
    /// No trap (yet).
    pub const NONE: TrapRecord = TrapRecord {
        hits: 0,
        rip: 0,
        error: 0,
        cs: 0,
        ss: 0,
        rsp: 0,
        rflags: 0,
        cr2: 0,
        irq_enabled: 0,
        frame: 0,
    };
}

#[derive(Clone, Copy)]
struct Expectation {
    site: u64,
    resume: u64,
    /// Run in the handler, after the record is written.
    action: Option<Handler>,
    record: TrapRecord,
}

static EXPECTED: [GuestCell<Expectation>; FIRST_EXTERNAL_VECTOR as usize] = [const {
    GuestCell::new(Expectation {
        site: 0,
        resume: 0,
        action: None,
        record: TrapRecord::NONE,
    })
};
    FIRST_EXTERNAL_VECTOR as usize];

fn expected_trap(frame: &mut TrapFrame) {
    let slot = &EXPECTED[frame.vector as usize];
    let mut expect = slot.read();
    if frame.rip != expect.site {
        panic!(
            "unexpected trap {} at {:#x} (expected at {:#x}; error {:#x}, cr2 {:#x})",
            frame.vector,
            frame.rip,
            expect.site,
            frame.error,
            lguest_data::cr2()
        );
    }
    // A trap that keeps coming back (a resume that retries an instruction
    // which still faults) would loop forever: stop it.
    if expect.record.hits >= 16 {
        panic!("trap {} at {:#x} keeps repeating", frame.vector, frame.rip);
    }
    expect.record = TrapRecord {
        hits: expect.record.hits + 1,
        rip: frame.rip,
        error: frame.error,
        cs: frame.cs,
        ss: frame.ss,
        rsp: frame.rsp,
        rflags: frame.rflags,
        cr2: lguest_data::cr2(),
        irq_enabled: lguest_data::irq_enabled(),
        frame: frame as *const TrapFrame as u64,
    };
    slot.write(expect);
    if let Some(action) = expect.action {
        action(frame);
    }
    frame.rip = expect.resume;
}

/// Run `f`, expecting trap `vector` at `site`, resuming at `resume` (which
/// may be `site` itself, to retry, if `action` fixes the cause). Returns what
/// the trap looked like; `hits` is 0 if it never happened.
pub fn expect_trap(
    vector: u8,
    site: u64,
    resume: u64,
    action: Option<Handler>,
    f: impl FnOnce(),
) -> TrapRecord {
    let slot = &EXPECTED[vector as usize];
    slot.write(Expectation {
        site,
        resume,
        action,
        record: TrapRecord::NONE,
    });
    let old = set_handler(vector, Some(expected_trap));
    f();
    set_handler(vector, old);
    slot.read().record
}

/*
 * The alternate interrupt stack, for SET_STACK (the stack test, and
 * bad=stack). The Host ends a Guest whose RSP is in the page below the
 * stack when it delivers ("Guest stack overflow"), so that page is a guard
 * that nothing ever runs on: it keeps our boot stack, whichever static the
 * linker puts before this one, from ever being mistaken for an overflow.
 */

pub const ALT_STACK_PAGES: u64 = 4;

#[repr(C, align(4096))]
pub struct AltStack {
    guard: [u8; 4096],
    stack: [u8; ALT_STACK_PAGES as usize * 4096],
}

pub static ALT_STACK: GuestCell<AltStack> = GuestCell::new(AltStack {
    guard: [0; 4096],
    stack: [0; ALT_STACK_PAGES as usize * 4096],
});

/// The alternate stack's top (it grows down from here).
pub fn alt_stack_top() -> u64 {
    ALT_STACK.as_ptr() as u64 + core::mem::size_of::<AltStack>() as u64
}
