//! Interrupts and traps (ABI sections 6 and 7): masking and the virtual
//! interrupt flag, the frames the Host builds for #UD, #PF and #DE, and
//! SET_STACK.

use core::arch::global_asm;
use core::sync::atomic::{compiler_fence, Ordering};

use lguest_abi::{hcall as nr, GUEST_DS, VEC_DE, VEC_PF, VEC_UD};
use lguest_guest::cell::GuestCell;
use lguest_guest::hcall::{self, hcall};
use lguest_guest::interrupts::TrapFrame;
use lguest_guest::lguest_data::{self, IRQ_ON};
use lguest_guest::time;

use super::{addr, check_frame, ss_slot_below, TestResult};
use crate::extras;
use crate::traps::{self, expect_trap, TrapRecord, SS_SLOT};

/*
 * lguest_test_ud: a ud2 at lguest_test_ud_site (2 bytes).
 * lguest_probe_read(addr) -> u64: a load at lguest_probe_read_site that may
 *   fault; a #PF handler resumes at lguest_probe_read_resume, with RAX 0.
 * lguest_test_de: a 64-bit division by zero at lguest_test_de_site,
 *   resuming at lguest_test_de_resume.
 */
global_asm!(
    r#"
    .section .text.lguest_tests, "ax"

    .global lguest_test_ud
lguest_test_ud:
    .global lguest_test_ud_site
lguest_test_ud_site:
    ud2
    ret


    .global lguest_probe_read
lguest_probe_read:
    xor eax, eax
    .global lguest_probe_read_site
lguest_probe_read_site:
    mov rax, [rdi]
    .global lguest_probe_read_resume
lguest_probe_read_resume:
    ret

    .global lguest_test_de
lguest_test_de:
    xor ecx, ecx
    mov eax, 1
    xor edx, edx
    .global lguest_test_de_site
lguest_test_de_site:
    div rcx
    .global lguest_test_de_resume
lguest_test_de_resume:
    ret
"#,
);

extern "C" {
    fn lguest_test_ud();
    static lguest_test_ud_site: u8;
    fn lguest_probe_read(addr: u64) -> u64;
    static lguest_probe_read_site: u8;
    static lguest_probe_read_resume: u8;
    fn lguest_test_de();
    static lguest_test_de_site: u8;
    static lguest_test_de_resume: u8;
}

/*
 * mask: blocked_interrupts and irq_enabled, and irq_pending telling us what
 * they held back.
 */

/// Wait up to a second for the tick count to pass `before`, poking the Host
/// with SEND_INTERRUPTS; true if it did.
fn tick_arrives(before: u64) -> bool {
    for _ in 0..1000 {
        if time::ticks() > before {
            return true;
        }
        hcall::send_interrupts();
        extras::busy_wait_us(1000);
    }
    time::ticks() > before
}

pub fn test_mask() -> TestResult {
    let timer = lguest_abi::TIMER_IRQ;

    // (a) A blocked IRQ isn't delivered, nor even pending.
    let before = time::ticks();
    extras::block_irq(timer, true);
    hcall::set_clockevent(1_000_000);
    extras::busy_wait_us(10_000);
    hcall::send_interrupts();
    let ticks = time::ticks();
    let pending = lguest_data::irq_pending();
    extras::block_irq(timer, false);
    check!(ticks == before, "the timer was delivered while blocked");
    check!(
        pending == 0,
        "irq_pending is {pending:#x} for a blocked IRQ"
    );
    hcall::send_interrupts();
    check!(
        tick_arrives(before),
        "the timer never came after it was unblocked"
    );

    // (b) With interrupts off it waits, and irq_pending says so.
    let before = time::ticks();
    lguest_data::irq_save();
    hcall::set_clockevent(1_000_000);
    for _ in 0..10 {
        extras::busy_wait_us(1000);
        extras::get_wallclock();
    }
    // A slow Host may take longer to see it: keep asking, for up to 1 s.
    let mut polls = 0;
    while lguest_data::irq_pending() != IRQ_ON && polls < 1000 {
        extras::busy_wait_us(1000);
        extras::get_wallclock();
        polls += 1;
    }
    let ticks = time::ticks();
    let pending = lguest_data::irq_pending();
    lguest_data::set_irq_enabled(IRQ_ON);
    compiler_fence(Ordering::SeqCst);
    hcall::send_interrupts();
    let delivered = time::ticks() > before;
    let pending_after = lguest_data::irq_pending();
    check!(
        ticks == before,
        "the timer was delivered with interrupts off"
    );
    check!(
        pending == IRQ_ON,
        "irq_pending is {pending:#x} with the timer held back by irq_enabled = 0"
    );
    check!(
        delivered,
        "SEND_INTERRUPTS did not deliver the pending timer"
    );
    check!(
        pending_after == 0,
        "irq_pending is still {pending_after:#x} after the delivery"
    );
    Ok(())
}

/*
 * ud, pf, de: traps reach our handlers, with the frame ABI section 6 says.
 */

/// Run the ud2 at lguest_test_ud_site. Only call it with a #UD handler that
/// moves RIP past it (expect_trap does).
fn ud2() {
    // SAFETY: the ud2 traps to the handler, which resumes past it; the
    // function is otherwise a bare `ret`.
    unsafe { lguest_test_ud() }
}

pub fn test_ud() -> TestResult {
    let site = addr(&raw const lguest_test_ud_site);
    let rec = expect_trap(VEC_UD, site, site + 2, None, ud2);
    check!(rec.hits == 1, "the #UD handler ran {} times", rec.hits);
    check!(
        rec.rip == site,
        "#UD at {:#x}, expected {:#x}",
        rec.rip,
        site
    );
    check_frame("#UD", &rec)?;
    check!(
        rec.rflags & IRQ_ON as u64 != 0,
        "#UD frame's RFLAGS {:#x} lacks IF, but interrupts were on",
        rec.rflags
    );
    check!(
        rec.irq_enabled == IRQ_ON,
        "irq_enabled was {:#x} in a trap gate's handler, expected it left on",
        rec.irq_enabled
    );
    check!(
        rec.frame + SS_SLOT == ss_slot_below(rec.rsp),
        "#UD frame at {:#x} for RSP {:#x}: SS should be at {:#x}, not {:#x}",
        rec.frame,
        rec.rsp,
        ss_slot_below(rec.rsp),
        rec.frame + SS_SLOT
    );

    // With interrupts off: the frame's IF is clear, and the return path puts
    // irq_enabled back to off.
    lguest_data::irq_save();
    let rec = expect_trap(VEC_UD, site, site + 2, None, ud2);
    let after = lguest_data::irq_enabled();
    lguest_data::irq_enable();
    check!(
        rec.hits == 1,
        "the #UD handler ran {} times with interrupts off",
        rec.hits
    );
    check!(
        rec.rflags & IRQ_ON as u64 == 0,
        "#UD frame's RFLAGS {:#x} has IF, but interrupts were off",
        rec.rflags
    );
    check!(
        after == 0,
        "irq_enabled is {after:#x} after returning to code that had it off"
    );
    Ok(())
}

/// Read `addr`, catching a #PF: the value, and the record (hits 0 if no
/// fault).
pub fn probe_read(addr_to_read: u64) -> (u64, TrapRecord) {
    let site = addr(&raw const lguest_probe_read_site);
    let resume = addr(&raw const lguest_probe_read_resume);
    let mut value = 0;
    let rec = expect_trap(VEC_PF, site, resume, None, || {
        // SAFETY: the load either works or faults into the handler, which
        // resumes after it; it reads nothing Rust owns mutably.
        value = unsafe { lguest_probe_read(addr_to_read) }
    });
    (value, rec)
}

/// Check `rec` is a not-present user read fault at `at`.
pub fn check_not_present(what: &str, rec: &TrapRecord, at: u64) -> TestResult {
    check!(
        rec.hits == 1,
        "{what}: the #PF handler ran {} times",
        rec.hits
    );
    check!(
        rec.cr2 == at,
        "{what}: lguest_data.cr2 is {:#x}, expected {at:#x}",
        rec.cr2
    );
    check!(
        rec.error & 4 != 0 && rec.error & 3 == 0,
        "{what}: #PF error code {:#x}, expected user (4) read (not 2) of a not-present page (not 1)",
        rec.error
    );
    Ok(())
}

pub fn test_pf() -> TestResult {
    const UNMAPPED: u64 = 0x0000_7000_0000_0000;
    let (_, rec) = probe_read(UNMAPPED);
    check_not_present("read of an unmapped address", &rec, UNMAPPED)?;
    check!(
        rec.rip == addr(&raw const lguest_probe_read_site),
        "#PF at {:#x}, expected the load at {:#x}",
        rec.rip,
        addr(&raw const lguest_probe_read_site)
    );
    check_frame("#PF", &rec)?;
    // The error code is the word below RIP: a missing one shifts the frame.
    check!(
        rec.frame + SS_SLOT == ss_slot_below(rec.rsp),
        "#PF frame at {:#x} for RSP {:#x}: SS should be at {:#x}",
        rec.frame,
        rec.rsp,
        ss_slot_below(rec.rsp)
    );
    Ok(())
}

/// Run the division by zero at lguest_test_de_site. Only call it with a #DE
/// handler that resumes at lguest_test_de_resume (expect_trap does).
fn divide_by_zero() {
    // SAFETY: the division traps to the handler, which resumes after it; the
    // function only uses scratch registers.
    unsafe { lguest_test_de() }
}

pub fn test_de() -> TestResult {
    let site = addr(&raw const lguest_test_de_site);
    let resume = addr(&raw const lguest_test_de_resume);
    let rec = expect_trap(VEC_DE, site, resume, None, divide_by_zero);
    check!(rec.hits == 1, "the #DE handler ran {} times", rec.hits);
    check!(
        rec.rip == site,
        "#DE at {:#x}, expected {:#x}",
        rec.rip,
        site
    );
    check_frame("#DE", &rec)?;
    Ok(())
}

/*
 * stack: SET_STACK moves where the Host delivers.
 */

/// The #DE frame nested inside the stack test's #UD handler.
static NESTED: GuestCell<TrapRecord> = GuestCell::new(TrapRecord::NONE);

/// Run inside the #UD handler, on the alternate stack: take a #DE there.
fn nested_de(_frame: &mut TrapFrame) {
    let site = addr(&raw const lguest_test_de_site);
    let resume = addr(&raw const lguest_test_de_resume);
    NESTED.write(expect_trap(VEC_DE, site, resume, None, divide_by_zero));
}

pub fn test_stack() -> TestResult {
    let top = traps::alt_stack_top();
    let pages = traps::ALT_STACK_PAGES;
    let bottom = top - pages * 4096;
    // SAFETY: the stack is ours and unused; the Host only pushes frames on it.
    unsafe { hcall(nr::SET_STACK, GUEST_DS as u64, top, pages, 0) };

    let site = addr(&raw const lguest_test_ud_site);
    NESTED.write(TrapRecord::NONE);
    let rec = expect_trap(VEC_UD, site, site + 2, Some(nested_de), ud2);
    let nested = NESTED.read();

    // SAFETY: turning SET_STACK off is always fine.
    unsafe { hcall(nr::SET_STACK, GUEST_DS as u64, 0, 0, 0) };
    let rec_off = expect_trap(VEC_UD, site, site + 2, None, ud2);

    check!(rec.hits == 1, "the #UD handler ran {} times", rec.hits);
    check_frame("#UD on the SET_STACK stack", &rec)?;
    check!(
        rec.frame + SS_SLOT == top - 8,
        "#UD frame at {:#x}: with SET_STACK({top:#x}) SS should be at {:#x}",
        rec.frame,
        top - 8
    );
    check!(
        !(bottom..=top).contains(&rec.rsp),
        "the interrupted RSP {:#x} was already on the SET_STACK stack",
        rec.rsp
    );
    check!(
        nested.hits == 1,
        "the nested #DE handler ran {} times",
        nested.hits
    );
    check!(
        nested.rsp > bottom && nested.rsp <= top,
        "the nested #DE interrupted RSP {:#x}, not on the SET_STACK stack",
        nested.rsp
    );
    check!(
        nested.frame + SS_SLOT == ss_slot_below(nested.rsp),
        "nested #DE frame at {:#x} for RSP {:#x}: SS should be at {:#x}",
        nested.frame,
        nested.rsp,
        ss_slot_below(nested.rsp)
    );
    check!(
        rec_off.hits == 1,
        "the #UD handler ran {} times after SET_STACK off",
        rec_off.hits
    );
    check!(
        rec_off.frame + SS_SLOT == ss_slot_below(rec_off.rsp),
        "#UD frame at {:#x} after SET_STACK off, for RSP {:#x}: SS should be at {:#x}",
        rec_off.frame,
        rec_off.rsp,
        ss_slot_below(rec_off.rsp)
    );
    Ok(())
}
