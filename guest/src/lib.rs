//! What every Guest kernel of lguest in Rust shares.
//!
//! Two kernels are built from this crate: the reference Guest
//! (`lguest-guest`, src/main.rs), which drives its devices through its own
//! virtio code on the lguest bus, and the drivers Guest
//! (`lguest-guest-drivers`, src/bin/lguest-guest-drivers/), which drives them
//! over virtio-mmio with the `virtio-drivers` crate. Both boot the same way
//! and talk to the Host the same way, and that part lives here: the
//! hypercalls, the shared lguest_data page, interrupts and traps, time, the
//! early console, what the Launcher tells us at boot, the heap (the global
//! allocator: only the drivers Guest fills it) and how a Guest reports a
//! failure or a panic.
//!
//! Each binary keeps its own entry point (`_start`, its stack, `kmain`) and
//! its own `#[panic_handler]`, which calls `report::panic`.

#![no_std]

pub mod arp;
pub mod boot;
pub mod cell;
pub mod console;
pub mod entry;
pub mod hcall;
pub mod heap;
pub mod interrupts;
pub mod lguest_data;
pub mod report;
pub mod time;

pub use report::fail;
