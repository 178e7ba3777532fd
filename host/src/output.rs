//! The Launcher's own output. Nothing it prints may change how it ends: a
//! full disk or a closed pipe on stderr or stdout is ignored (Rust leaves
//! SIGPIPE ignored, so such a write just fails), and the exit status stays
//! the one ABI section 10 gives.

use std::io::Write;

/// Writes `lguest: <text>` as one line on stderr, whatever becomes of it.
pub fn message(text: impl std::fmt::Display) {
    let line = format!("lguest: {text}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Writes `line` on stdout; false when stdout takes no more (a closed pipe,
/// a full disk): whoever wanted the output has gone.
pub fn stdout_line(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

/// A writer for stderr that drops what cannot be written, for `--verbose`.
pub struct QuietStderr;

impl Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
