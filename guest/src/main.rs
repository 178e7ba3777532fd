//! The reference Guest of lguest in Rust.
//!
//! A Guest kernel is a program that doesn't know it isn't alone: it runs in
//! ring 3 on a machine the Host made for it, and asks the Host, through
//! hypercalls, for anything a kernel would do with privileged instructions.
//! This one is small on purpose. It boots, says hello, brings up its virtio
//! devices and offers a prompt on the console. The kernel itself is the
//! library beside this file (src/lib.rs); this is only where it starts.
//!
//! Its self-tests, the cases that break the ABI on purpose and the
//! benchmark loops are another kernel, `lguest-guest-tests`, built on the
//! same library (src/bin/lguest-guest-tests/).
//!
//! The story starts at `_start` (lguest_guest::entry) and continues in
//! `kmain`.

#![no_std]
#![no_main]

use core::panic::PanicInfo;

use lguest_guest::{interrupts, lguest_data, shell};

// The boot stack and _start (see lguest_guest::entry).
lguest_guest::entry!(kmain);

#[global_allocator]
static NO_HEAP: lguest_guest::entry::NoHeap = lguest_guest::entry::NoHeap;

/*G:200 The Guest's first instruction is `_start` (lguest_guest::entry):
 * ring 3, paging on, RSP 0, so it sets up a stack and calls here. A Guest
 * kernel owns nothing privileged: everything below asks the Host. */
extern "C" fn kmain() -> ! {
    // Introduce ourselves to the Host: LGUEST_INIT, which must be our first
    // hypercall. Then the IDT, so traps and interrupts have somewhere to go.
    lguest_data::init();
    interrupts::init();
    // Hello, the devices, and the prompt until poweroff or end of input.
    shell::serve()
}

/// A panic is a bug in this Guest (or a Host that broke its promises): say
/// so and crash (see `report::panic`).
#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    lguest_guest::report::panic(info)
}
