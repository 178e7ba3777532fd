//! The console's terminal: when stdin is a terminal it goes raw (no line
//! editing, no echo, no signals: the Guest echoes, and Ctrl-C is a byte for
//! it), and the saved mode comes back on every way out: a normal exit, Sudden
//! Death, a fatal signal, or a panic.

use std::sync::OnceLock;

static SAVED: OnceLock<libc::termios> = OnceLock::new();

/// Puts stdin in raw mode if it is a terminal; true if it did.
pub fn make_raw() -> bool {
    // SAFETY: isatty and tcgetattr only read the descriptor's state into a
    // termios we own.
    let saved = unsafe {
        if libc::isatty(libc::STDIN_FILENO) != 1 {
            return false;
        }
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(libc::STDIN_FILENO, &mut t) != 0 {
            return false;
        }
        t
    };
    if SAVED.set(saved).is_err() {
        return true; // already raw
    }
    let mut raw = saved;
    raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
    // No XON/XOFF either: Ctrl-S is the Guest's, like any other key, and must
    // not stop our output (which would hold the Guest back until Ctrl-Q).
    raw.c_iflag &= !libc::IXON;
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    // SAFETY: sets the terminal from a termios we own.
    unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) };

    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        hook(info);
    }));
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: the handler only calls async-signal-safe functions.
        unsafe { libc::signal(sig, on_fatal_signal as *const () as libc::sighandler_t) };
    }
    true
}

/// Puts the terminal back as we found it (async-signal-safe).
pub fn restore() {
    if let Some(t) = SAVED.get() {
        // SAFETY: tcsetattr from a termios we saved; async-signal-safe.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
    }
}

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    restore();
    // SAFETY: back to the default action and raise again, so we die of the
    // signal as we would have; all async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}
