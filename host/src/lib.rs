//! The Launcher and Host of lguest/x86-64, as a library: the `lguest`
//! binary (`main.rs`) is its command line, and the fuzz targets in `fuzz/`
//! drive the parsers of Guest- and user-controlled bytes directly.
//!
//! The tour starts in `main.rs`: the command line, then [`launcher`] lays
//! out memory ([`memory`], [`host_pages`]) and loads the kernel ([`boot`]),
//! [`vm`] creates the KVM machine, and [`vcpu`] runs it, answering
//! [`hypercalls`] and delivering interrupts ([`interrupts_and_traps`]).

pub mod bench;
pub mod boot;
pub mod bus;
pub mod devices;
pub mod dma;
pub mod files;
pub mod gdb;
pub mod host_pages;
pub mod hypercalls;
pub mod interrupts_and_traps;
pub mod kick;
pub mod launcher;
pub mod lguest_data;
pub mod memory;
pub mod output;
pub mod page_tables;
pub mod pagewalk;
pub mod sandbox;
pub mod segments;
pub mod timer;
pub mod vcpu;
pub mod virtio;
pub mod vm;
