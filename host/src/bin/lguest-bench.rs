//! `lguest-bench`: the benchmarks, which `lguest --bench` runs.
//!
//! The harness (`lguest::bench`, and P7's floor in `lguest::dma::bench`) is
//! a program of its own so that none of it sits in the Launcher's pages:
//! P5 counts those, and the kernel maps a binary's text around every page
//! it runs, used or not. `lguest --bench` execs this program, found next to
//! itself; this program runs the `lguest` next to *it* for every Guest it
//! measures, and as P7's second process.

use std::path::PathBuf;
use std::process::ExitCode;

/// Set-up errors (ABI section 10), as `lguest --bench` always gave them.
const EXIT_SETUP: u8 = 2;

/// `lguest: ` and the first line of `text`, control characters escaped
/// (a failing run's stderr is part of some messages).
fn error_line(text: impl std::fmt::Display) {
    let text = text.to_string();
    let line: String = text
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    lguest::output::message(line);
}

/// The Launcher this program measures: `lguest`, in this program's
/// directory (where cargo builds both, and `cargo install` puts both).
fn launcher() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find lguest-bench: {e}"))?;
    let lguest = me.with_file_name("lguest");
    if !lguest.is_file() {
        return Err(format!(
            "the benchmarks run the lguest next to lguest-bench, and {} is missing",
            lguest.display()
        ));
    }
    Ok(lguest)
}

fn main() -> ExitCode {
    if std::env::args_os().len() > 1 {
        error_line("lguest-bench takes no arguments: it is what `lguest --bench` runs");
        return ExitCode::from(EXIT_SETUP);
    }
    let kvm = std::env::var_os("LGUEST_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"));
    match launcher().and_then(|lguest| lguest::bench::run(&lguest, &kvm)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error_line(e);
            ExitCode::from(EXIT_SETUP)
        }
    }
}
