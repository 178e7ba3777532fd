//! The drivers Guest of lguest in Rust.
//!
//! A second Guest kernel, beside the reference one: it boots the same way
//! (the shared half of this crate, src/lib.rs, does that), but it drives its
//! devices over virtio-mmio with someone else's drivers, the `virtio-drivers`
//! crate exactly as published. Its point is the Host's: a virtio device that
//! works with a driver its authors didn't write is a virtio device.
//!
//! Start it with `lguest --transport=mmio --guest=drivers`. With no `test=`
//! it says hello, lists the windows it found and powers off; with
//! `test=NAME[,NAME]` or `test=all` it runs the device tests (tests.rs) and
//! reports them as the reference Guest does. `drivers-log=LEVEL` shows
//! virtio-drivers' own log (warnings by default).

#![no_std]
#![no_main]

extern crate alloc;

#[path = "../lguest-guest-tests/addresses.rs"]
mod addresses;
mod hal;
mod heap;
mod logger;
mod mmio;
mod tests;
mod wait;

use core::fmt::Write;
use core::panic::PanicInfo;

use lguest_abi::SHUTDOWN_POWEROFF;
use lguest_guest::{boot, hcall, interrupts, lguest_data, println};
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::transport::DeviceType;

use crate::hal::LguestHal;
use crate::mmio::Devices;

// The boot stack and _start, as the reference Guest's (lguest_guest::entry).
// The drivers keep their buffers on the heap.
lguest_guest::entry!(kmain);

// Unmangled, so a debugger finds it by name (`break kmain`).
#[no_mangle]
extern "C" fn kmain() -> ! {
    // LGUEST_INIT first, then an IDT to take interrupts (the timer, then the
    // devices'), then the heap, which virtio-drivers needs.
    lguest_data::init();
    interrupts::init();
    wait::init();
    heap::init();
    logger::init(boot::cmdline());

    let mut devices = Devices::scan(boot::cmdline());
    if let Some(names) = boot::option("test") {
        tests::run(names, &mut devices);
    }

    let (heap_start, heap_end) = heap::range();
    println!(
        "lguest-guest-drivers: Hello from the drivers Guest: {} MiB of RAM, {} virtio-mmio devices, heap {:#x}-{:#x}",
        boot::mem() >> 20,
        devices.list.len(),
        heap_start,
        heap_end
    );
    devices.describe();
    if devices.list.is_empty() {
        println!("lguest-guest-drivers: no virtio-mmio devices: start the Launcher with --transport=mmio");
    }
    // Say hello through virtio-drivers' console too.
    if let Some((transport, _)) = devices.take(DeviceType::Console) {
        match VirtIOConsole::<LguestHal, _>::new(transport) {
            Ok(mut console) => {
                if let Err(e) = writeln!(
                    console,
                    "lguest-guest-drivers: and hello through virtio-drivers' console"
                ) {
                    println!("lguest-guest-drivers: the virtio console refused a line: {e}");
                }
            }
            Err(e) => println!("lguest-guest-drivers: cannot bring up the console: {e}"),
        }
    }
    hcall::shutdown(c"drivers Guest finished", SHUTDOWN_POWEROFF);
}

/// A panic is a bug in this Guest, in virtio-drivers, or a Host that broke
/// its promises: say so and crash.
#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    lguest_guest::report::panic(info)
}
