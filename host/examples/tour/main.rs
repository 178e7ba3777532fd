//! The guided tour, as lguest's `make Beer` made it: every comment tagged
//! `/*X:NNN ... */` in the sources (X: L the Launcher, G the Guest, H the
//! Host, D the devices, S the ring-0 stubs that stand in for lguest's
//! Switcher), in the order of NNN, one Guest's life from the command line
//! to its end.
//!
//! `cargo run --example tour` writes docs/tour.md; `host/tests/tour.rs`
//! fails when it is stale or a tag points at nothing.

include!("extract.rs");

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    match tour(&root) {
        Ok(text) => {
            let out = root.join("docs/tour.md");
            if let Err(e) = std::fs::write(&out, text) {
                eprintln!("tour: cannot write {}: {e}", out.display());
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("tour: {e}");
            std::process::exit(1);
        }
    }
}
