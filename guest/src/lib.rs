//! The reference Guest kernel of lguest in Rust, and what every Guest of
//! ours shares.
//!
//! This crate is the kernel a reader studies: it boots on the lguest ABI,
//! talks to the Host through hypercalls and the shared lguest_data page,
//! takes interrupts and traps, keeps time, drives its virtio devices on the
//! lguest bus (or the 2007 model's, over DMA), answers ARP and ping, and
//! offers a prompt on the console. Nothing in it is there
//! only to test the Host.
//!
//! Three kernels are built on it, one binary each:
//!
//! - `lguest-guest` (src/main.rs): the reference Guest, this kernel and
//!   nothing else;
//! - `lguest-guest-tests` (src/bin/lguest-guest-tests/): the same kernel
//!   plus the self-tests (`test=`), the ABI-breaking cases (`bad=`) and the
//!   benchmark loops (`bench=`). The Launcher boots it instead of the plain
//!   one when the command line asks for any of those;
//! - `lguest-guest-drivers` (src/bin/lguest-guest-drivers/): a Guest that
//!   drives virtio-mmio devices with the `virtio-drivers` crate. It uses
//!   the first half of the list below, and `inet`'s ARP.
//!
//! Each binary keeps its own entry point (`_start`, its stack, `kmain`) and
//! its own `#[panic_handler]`, which calls `report::panic`.

#![no_std]

// How a Guest boots and talks to the Host.
pub mod boot;
pub mod cell;
pub mod console;
pub mod entry;
pub mod hcall;
pub mod interrupts;
pub mod lguest_data;
pub mod report;
pub mod time;

// The reference Guest's own: its devices (virtio on the lguest bus, or the
// 2007 DMA model), what it says on a network, and its prompt.
pub mod dma;
pub mod inet;
pub mod shell;
pub mod virtio;

pub use report::fail;
