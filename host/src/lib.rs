//! The Launcher and Host of lguest/x86-64, as a library: the `lguest`
//! binary (`main.rs`) is its command line, and the fuzz targets in `fuzz/`
//! drive the parsers of Guest- and user-controlled bytes directly.
//!
//! The tour starts in `main.rs`: the command line, then [`launcher`] lays
//! out memory ([`memory`], [`host_pages`]) and loads the kernel ([`boot`]),
//! [`vm`] creates the KVM machine, and [`vcpu`] runs it, answering
//! [`hypercalls`] and delivering [`interrupts`].

pub mod bench;
pub mod boot;
pub mod bus;
pub mod devices;
pub mod gdb;
pub mod host_pages;
pub mod hypercalls;
pub mod interrupts;
pub mod launcher;
pub mod memory;
pub mod pagewalk;
pub mod timer;
pub mod vcpu;
pub mod virtio;
pub mod vm;
