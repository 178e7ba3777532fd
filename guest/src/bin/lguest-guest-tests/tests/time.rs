//! Time (ABI section 10): the one-shot clock event, HALT, and the wall
//! clock in lguest_data.

use lguest_abi::{FIRST_EXTERNAL_VECTOR, TIMER_IRQ};
use lguest_guest::cell::GuestCell;
use lguest_guest::interrupts::{set_handler, TrapFrame};
use lguest_guest::lguest_data::{self, IRQ_ON};
use lguest_guest::{hcall, time};

use super::TestResult;
use crate::extras;

/*
 * timer: SET_CLOCKEVENT and HALT.
 */

/// Microseconds in `cycles`, or None when the Host gave no TSC frequency
/// (then our own figure is only an upper bound and can't judge earliness).
fn host_us(cycles: u64) -> Option<u64> {
    match lguest_data::tsc_khz() as u64 {
        0 => None,
        khz => Some((cycles as u128 * 1000 / khz as u128) as u64),
    }
}

/// Our TSC and the Host's clock may disagree by a hair: allow 1%.
fn early(us: u64, deadline_us: u64) -> bool {
    us * 100 < deadline_us * 99
}

/// What the timer handler saw: irq_enabled, and the RFLAGS the Host pushed
/// (its IF is irq_enabled as it was before).
static SEEN: GuestCell<(u32, u64)> = GuestCell::new((0, 0));

/// The kernel's timer handler, watched.
fn watched_tick(frame: &mut TrapFrame) {
    SEEN.write((lguest_data::irq_enabled(), frame.rflags));
    time::timer_irq(frame);
}

pub fn test_timer() -> TestResult {
    // It fires, through an interrupt gate, and not early.
    let timer = FIRST_EXTERNAL_VECTOR + TIMER_IRQ as u8;
    let kernels = set_handler(timer, Some(watched_tick));
    let before = time::ticks();
    let start = time::rdtsc();
    hcall::set_clockevent(2_000_000);
    time::wait_for_ticks(before + 1);
    set_handler(timer, kernels);
    let (irq_enabled, rflags) = SEEN.read();
    check!(
        time::ticks() == before + 1,
        "{} timer interrupts for one event",
        time::ticks() - before
    );
    if let Some(us) = host_us(time::last_tick() - start) {
        check!(!early(us, 2000), "a 2 ms timer fired after {us} us");
    }
    check!(
        irq_enabled == 0,
        "irq_enabled was {irq_enabled:#x} in the timer handler (an interrupt gate must clear it)"
    );
    check!(
        rflags & IRQ_ON as u64 != 0,
        "the timer frame's RFLAGS {rflags:#x} lacks IF, but HALT wakes with interrupts on"
    );
    check!(
        lguest_data::irq_enabled() == IRQ_ON,
        "irq_enabled is {:#x} after the handler returned",
        lguest_data::irq_enabled()
    );

    // Re-arming replaces: a 2 ms event re-armed to 20 ms fires once, late.
    let before = time::ticks();
    let start = time::rdtsc();
    hcall::set_clockevent(2_000_000);
    hcall::set_clockevent(20_000_000);
    time::wait_for_ticks(before + 1);
    if let Some(us) = host_us(time::last_tick() - start) {
        check!(
            !early(us, 20_000),
            "a timer re-armed to 20 ms fired after {us} us"
        );
    }

    // Zero cancels.
    let before = time::ticks();
    hcall::set_clockevent(5_000_000);
    hcall::set_clockevent(0);
    extras::busy_wait_us(20_000);
    hcall::send_interrupts();
    check!(time::ticks() == before, "a cancelled timer fired");
    Ok(())
}

/*
 * wallclock: GET_WALLCLOCK, lguest_data's time, tsc_khz.
 */
pub fn test_wallclock() -> TestResult {
    // time_sec is written at every delivery: take one, so it is fresh.
    let before = time::ticks();
    hcall::set_clockevent(100_000);
    time::wait_for_ticks(before + 1);
    let sec = lguest_data::time_sec();
    let nsec = lguest_data::time_nsec();
    let wall = extras::get_wallclock();
    check!(sec > 1_600_000_000, "lguest_data.time_sec is {sec}");
    check!(nsec < 1_000_000_000, "lguest_data.time_nsec is {nsec}");
    check!(
        wall.abs_diff(sec) <= 2,
        "GET_WALLCLOCK says {wall}, lguest_data.time_sec {sec}"
    );
    let khz = lguest_data::tsc_khz();
    check!(
        khz == 0 || (100_000..=20_000_000).contains(&khz),
        "tsc_khz is {khz}, not a plausible TSC frequency"
    );
    Ok(())
}
