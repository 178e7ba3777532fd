//! The reference Guest of lguest in Rust.
//!
//! A Guest kernel is a program that doesn't know it isn't alone: it runs in
//! ring 3 on a machine the Host made for it, and asks the Host, through
//! hypercalls, for anything a kernel would do with privileged instructions.
//! This one is small on purpose. It boots, says hello, brings up its virtio
//! devices and offers a prompt on the console; or, told so on its command
//! line, tests every corner of the ABI the Host promises and its devices
//! (`test=`), breaks the ABI on purpose to check the Host kills it (`bad=`),
//! or times the Host's exits and devices (`bench=`).
//!
//! The story starts at `_start`, below, and continues in `kmain`.

#![no_std]
#![no_main]

mod bad;
mod bench;
mod pagetable;
mod shell;
mod tests;
mod virtio;

use core::panic::PanicInfo;

use lguest_abi::SHUTDOWN_POWEROFF;

// What both Guests share lives in the library (src/lib.rs); these names keep
// `crate::hcall`, `crate::println`, `crate::fail` and the rest working for
// the modules above.
use lguest_guest::{boot, cell, console, fail, hcall, interrupts, lguest_data, println, time};

// The boot stack and _start (see lguest_guest::entry); SET_STACK moves
// interrupt delivery elsewhere later.
lguest_guest::entry!(kmain);

extern "C" fn kmain() -> ! {
    // The command line is memory the Launcher filled: reading it needs no
    // hypercall, which is as well, since our first must be LGUEST_INIT.
    let options = boot::Options::parse(boot::cmdline());
    if options.bad == Some("before-init") {
        bad::before_init();
    }

    lguest_data::init();

    // Measuring the bare boot: nothing more than INIT, then off.
    if options.bench == Some("exit") {
        hcall::shutdown(c"bench=exit", SHUTDOWN_POWEROFF);
    }

    // bad=trap wants a trap with no gate to take it: the Host must end us.
    if options.bad != Some("trap") {
        interrupts::init();
    }

    if let Some(case) = options.bad {
        bad::run(case);
    }
    if let Some(name) = options.bench {
        bench::run(name, options.iters);
    }
    if let Some(names) = options.test {
        tests::run(names, &options);
    }

    println!(
        "lguest-guest: Hello from the reference Guest: {} MiB of RAM, tsc {} kHz",
        boot::mem() >> 20,
        lguest_data::tsc_khz()
    );

    // The devices: say what we found, and give the console a prompt.
    let mut devices = virtio::Devices::scan();
    devices.probe_all();
    if devices.console.is_some() {
        shell::run(&mut devices, &options);
    }
    hcall::shutdown(c"reference Guest finished", SHUTDOWN_POWEROFF);
}

/// A panic is a bug in this Guest (or a Host that broke its promises): say
/// so and crash (see `report::panic`).
#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    lguest_guest::report::panic(info)
}
