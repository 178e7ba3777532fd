//! The reference Guest, with its self-tests, its broken cases and its
//! benchmarks.
//!
//! The kernel is the reference Guest's own (the `lguest_guest` library);
//! this binary adds what tests the Host with it, chosen on the command line:
//!
//! - `test=NAME[,NAME...]` or `test=all`: check every corner of the ABI the
//!   Host promises, and each virtio device (tests/);
//! - `bad=CASE`: break the ABI on purpose, so the Host must end us (bad/);
//! - `bench=NAME [iters=N]`: time the Host's exits and devices, for
//!   `lguest --bench` (bench/).
//!
//! The Launcher boots this kernel instead of the plain `lguest-guest` when
//! the command line holds any of these words, so `lguest --append test=all`
//! needs nothing more. Given none, it behaves as the plain kernel does.

#![no_std]
#![no_main]

mod addresses;
mod bad;
mod bench;
mod extras;
mod io;
mod pagetable;
mod tests;
mod traps;

use core::panic::PanicInfo;

use lguest_abi::SHUTDOWN_POWEROFF;
use lguest_guest::{boot, hcall, interrupts, lguest_data, shell};

lguest_guest::entry!(kmain);

#[global_allocator]
static NO_HEAP: lguest_guest::entry::NoHeap = lguest_guest::entry::NoHeap;

// Unmangled, so a debugger finds it by name (`break kmain`).
#[no_mangle]
extern "C" fn kmain() -> ! {
    // The command line is memory the Launcher filled: reading it needs no
    // hypercall, which is as well, since our first must be LGUEST_INIT.
    let bad = boot::option("bad");
    if bad == Some("before-init") {
        bad::before_init();
    }

    lguest_data::init();

    // Measuring the bare boot: nothing more than INIT, then off.
    let bench = boot::option("bench");
    if bench == Some("exit") {
        hcall::shutdown(c"bench=exit", SHUTDOWN_POWEROFF);
    }

    // bad=trap wants a trap with no gate to take it: the Host must end us.
    if bad != Some("trap") {
        interrupts::init();
    }

    if let Some(case) = bad {
        bad::run(case);
    }
    if let Some(name) = bench {
        bench::run(name, boot::option("iters"));
    }
    if let Some(names) = boot::option("test") {
        tests::run(names);
    }
    shell::serve()
}

/// A panic is a bug in this Guest (or a Host that broke its promises): say
/// so and crash (see `report::panic`).
#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    lguest_guest::report::panic(info)
}
