//! How a Guest says it failed: a FAIL line (ABI section 10) or a panic, on
//! the early console and as the SHUTDOWN reason, then a crash.

use core::fmt::{self, Write};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use lguest_abi::SHUTDOWN_CRASH;

use crate::console::{self, Msg};
use crate::{hcall, println};

/// Report a failure the way self-test Guests do (ABI section 10), on the
/// console and as the SHUTDOWN reason, and crash.
pub fn fail(what: &str, detail: fmt::Arguments) -> ! {
    let reason = Msg::<256>::from_fmt(format_args!("FAIL {what}: {detail}"));
    println!("lguest-guest: {}", reason.as_str());
    hcall::shutdown(reason.as_cstr(), SHUTDOWN_CRASH);
}

/// What a `#[panic_handler]` does. A panic is a bug in this Guest (or a Host
/// that broke its promises): say so and crash. The message is formatted once
/// into a buffer of its own rather than through the console, which the panic
/// may have interrupted.
pub fn panic(info: &PanicInfo) -> ! {
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if PANICKING.swap(true, Ordering::SeqCst) {
        hcall::shutdown(c"panic while panicking", SHUTDOWN_CRASH);
    }
    console::flush_if_idle();
    let message = Msg::<256>::from_fmt(format_args!("{}", info.message()));
    let mut line = Msg::<512>::from_fmt(format_args!("lguest-guest: panic: {}", message.as_str()));
    if let Some(at) = info.location() {
        let _ = write!(line, " at {}:{}", at.file(), at.line());
    }
    let _ = line.write_str("\n");
    hcall::notify_str(line.as_cstr());
    hcall::shutdown(message.as_cstr(), SHUTDOWN_CRASH);
}
