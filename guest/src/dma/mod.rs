//! The 2007 device model (ABI section 9, device model 1): lguest's devices
//! before virtio, chosen by the Launcher (hardware_subarch_data = 1).
//!
//! There are no rings. One mechanism moves every byte: DMA to a *key*. A
//! driver binds an array of `struct lguest_dma` (each up to 16 sections of
//! its RAM, address and length) at a key, with an IRQ; whoever sends to
//! that key (SEND_DMA) has its bytes copied into the first bound buffer
//! whose used_len is still 0, which then gets the length, and the binder
//! gets the IRQ. The console's key is 0; every other key is an address in a
//! device's page. A network is the same trick between Guests: each binds
//! its receive buffers at its own key and sends to the others'.
//!
//! The devices are 16 entries on the page at `mem`, {type, features,
//! status, num_pages, pfn}: the console first, then a page of its own at
//! `pfn << 12` for each disk and network. We choose the IRQs: entry i's is
//! i + 1, as lguest_bus.c did. This is lguest_bus.c without the driver
//! model; the drivers are hvc_lguest.c, lguest_blk.c and lguest_net.c,
//! rewritten. Waiting (`time::idle`) and the IRQ counts (`interrupts`) are
//! shared with the virtio drivers: nothing in them belongs to either model.

pub mod blk;
pub mod console;
pub mod net;

use core::fmt::{self, Write};

use lguest_abi::{hcall as nr, DmaDeviceDesc, LguestDma, BIND_DMA_COUNT_SHIFT, DMA_MAX_DEVICES};
use lguest_abi::{DEVICE_MODEL_DMA, PAGE_SIZE};
use lguest_abi::{LGUEST_DEVICE_S_ACKNOWLEDGE, LGUEST_DEVICE_S_DRIVER};
use lguest_abi::{LGUEST_DEVICE_S_DRIVER_OK, LGUEST_DEVICE_S_FAILED};
use lguest_abi::{LGUEST_DEVICE_T_BLOCK, LGUEST_DEVICE_T_CONSOLE, LGUEST_DEVICE_T_NET};

use crate::console::Error;
use crate::hcall::hcall;
use crate::interrupts::irq_count;
use crate::virtio::{probe_once, report};
use crate::{boot, err};

pub type Table = [DmaDeviceDesc; DMA_MAX_DEVICES];

/// Entry `i`'s address in the table page.
fn entry(i: usize) -> u64 {
    boot::mem() + (i * size_of::<DmaDeviceDesc>()) as u64
}

/// The table, as the Launcher wrote it (all empty in the other model).
pub fn table() -> Table {
    let mut table = [DmaDeviceDesc::default(); DMA_MAX_DEVICES];
    if boot::device_model() == DEVICE_MODEL_DMA {
        for (i, e) in table.iter_mut().enumerate() {
            let at = core::ptr::with_exposed_provenance::<DmaDeviceDesc>(entry(i) as usize);
            // SAFETY: the table page is at `mem`, below pfn_limit and
            // identity-mapped; entries are 12 bytes from a page boundary,
            // so 4-byte aligned, as DmaDeviceDesc needs.
            *e = unsafe { at.read_volatile() };
        }
    }
    table
}

/// Entry `i`'s status, which only we write (lguest_bus.c's bits: we saw
/// the device, we can drive it, we drive it; or we gave up).
fn status_ptr(i: usize) -> *mut u16 {
    assert!(i < DMA_MAX_DEVICES);
    core::ptr::with_exposed_provenance_mut((entry(i) + 4) as usize)
}

pub fn status(i: usize) -> u16 {
    // SAFETY: entry i's status, in the table page (see `table`).
    unsafe { status_ptr(i).read_volatile() }
}

pub fn set_status(i: usize, status: u16) {
    // SAFETY: as in `status`; the page is writable like RAM.
    unsafe { status_ptr(i).write_volatile(status) }
}

/// Entry `i`'s IRQ, ours to choose.
pub fn irq(i: usize) -> u8 {
    i as u8 + 1
}

/// Bring entry `at` up with `probe`, saying so in its status as we go;
/// a driver that could not come up marks its entry FAILED.
fn bring_up<T>(at: usize, probe: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    set_status(at, LGUEST_DEVICE_S_ACKNOWLEDGE | LGUEST_DEVICE_S_DRIVER);
    let probed = probe();
    let done = match probed {
        Ok(_) => LGUEST_DEVICE_S_DRIVER_OK,
        Err(_) => LGUEST_DEVICE_S_FAILED,
    };
    set_status(at, status(at) | done);
    probed
}

/// One `struct lguest_dma`, aligned so that it never crosses a page: the
/// Host would end us if it did.
#[repr(C, align(256))]
#[derive(Clone, Copy)]
pub struct Dma(pub LguestDma);

impl Dma {
    /// A DMA of nothing (a first length of 0): a read's "ping" to a disk.
    pub const EMPTY: Dma = Dma(LguestDma {
        used_len: 0,
        pad: 0,
        addr: [0; 16],
        len: [0; 16],
    });

    /// The bytes `[addr, addr + len)` of our RAM, cut at page boundaries,
    /// which no section may cross.
    pub fn over(mut addr: u64, mut len: usize) -> Result<Dma, Error> {
        let mut dma = Dma::EMPTY;
        for i in 0..dma.0.len.len() {
            if len == 0 {
                return Ok(dma);
            }
            let take = len.min((PAGE_SIZE - addr % PAGE_SIZE) as usize);
            (dma.0.addr[i], dma.0.len[i]) = (addr, take as u16);
            (addr, len) = (addr + take as u64, len - take);
        }
        match len {
            0 => Ok(dma),
            _ => Err(err!("{len} bytes more than 16 sections hold")),
        }
    }

    /// SEND_DMA to `key`: the bytes the receiver took (0 if nobody did).
    pub fn send(&mut self, key: u64) -> u32 {
        let at = &raw mut self.0;
        // SAFETY: the Host only reads the sections and writes used_len,
        // which we read back through the same pointer.
        unsafe {
            hcall(nr::SEND_DMA, key, at as u64, 0, 0);
            (&raw const (*at).used_len).read_volatile()
        }
    }
}

/// BIND_DMA: `count` consecutive lguest_dma from `dmas` at `key`, for IRQ
/// `irq`.
///
/// # Safety
///
/// From now on the Host writes into them, and into their sections, whenever
/// someone sends to `key`. They must be ours, reached only through raw
/// pointers, for as long as they are bound (for our drivers: for ever).
pub unsafe fn bind(key: u64, dmas: *mut LguestDma, count: usize, irq: u8) -> Result<(), Error> {
    let count_irq = (count << BIND_DMA_COUNT_SHIFT) as u64 | irq as u64;
    // SAFETY: the caller's.
    match unsafe { hcall(nr::BIND_DMA, key, dmas as u64, count_irq, 0) } {
        1 => Ok(()),
        _ => Err(err!("the Host refused BIND_DMA at key {key:#x}")),
    }
}

/// The devices we drive, brought up when first wanted, as on the bus.
#[derive(Default)]
pub struct Devices {
    pub table: Table,
    pub console: Option<console::Console>,
    /// The disks, in table order.
    pub disks: [Option<blk::Blk>; blk::MAX_DISKS],
    pub net: Option<net::Net>,
}

impl Devices {
    pub fn scan() -> Devices {
        let table = table();
        Devices {
            table,
            ..Default::default()
        }
    }

    /// The entry of the `n`th device of type `kind`.
    fn find(&self, kind: u16, n: usize) -> Option<usize> {
        (0..DMA_MAX_DEVICES)
            .filter(|&i| self.table[i].type_ == kind)
            .nth(n)
    }

    pub fn console(&mut self) -> Result<&mut console::Console, Error> {
        let at = self.find(LGUEST_DEVICE_T_CONSOLE, 0);
        probe_once(&mut self.console, at, "console", |at| {
            bring_up(at, || console::Console::probe(at))
        })
    }

    /// Disk `n` (0 is the first block entry).
    pub fn disk(&mut self, n: usize) -> Result<&mut blk::Blk, Error> {
        let at = self.find(LGUEST_DEVICE_T_BLOCK, n);
        let slot = self.disks.get_mut(n).ok_or_else(|| err!("no disk {n}"))?;
        let table = &self.table;
        probe_once(slot, at, "block device", |at| {
            bring_up(at, || blk::Blk::probe(at, &table[at], n))
        })
    }

    pub fn net(&mut self) -> Result<&mut net::Net, Error> {
        let at = self.find(LGUEST_DEVICE_T_NET, 0);
        let table = &self.table;
        probe_once(&mut self.net, at, "net device", |at| {
            bring_up(at, || net::Net::probe(at, &table[at]))
        })
    }

    /// Bring up every device we have a driver for (the first network only),
    /// saying on the early console what we found and what failed.
    pub fn probe_all(&mut self) {
        let mut disks = 0;
        for (i, e) in self.table.into_iter().enumerate() {
            let result = match e.type_ {
                0 => continue,
                LGUEST_DEVICE_T_CONSOLE if self.console.is_none() => Some(self.console().map(drop)),
                LGUEST_DEVICE_T_BLOCK if disks < blk::MAX_DISKS => {
                    disks += 1;
                    Some(self.disk(disks - 1).map(drop))
                }
                LGUEST_DEVICE_T_NET if self.net.is_none() => Some(self.net().map(drop)),
                _ => None,
            };
            report("dma", result, |out| describe(out, i, &e));
        }
    }
}

/// What the prompt's `devices` command says: a line per entry.
pub fn list(out: &mut dyn Write, table: &Table) -> fmt::Result {
    for (i, e) in table.iter().enumerate().filter(|(_, e)| e.type_ != 0) {
        describe(out, i, e)?;
        out.write_str("\n")?;
    }
    Ok(())
}

/// One line about entry `i`: type, IRQ, features, status, and its page.
pub fn describe(out: &mut dyn Write, i: usize, e: &DmaDeviceDesc) -> fmt::Result {
    let name = match e.type_ {
        LGUEST_DEVICE_T_CONSOLE => "console",
        LGUEST_DEVICE_T_NET => "net",
        LGUEST_DEVICE_T_BLOCK => "block",
        _ => "unknown",
    };
    let irq = irq(i);
    let (features, status) = (e.features, status(i));
    write!(
        out,
        "{name} (entry {i}): irq {irq} ({} irqs); features {features:#06x}; status {status:#x}",
        irq_count(irq as u16),
    )?;
    match e.type_ {
        LGUEST_DEVICE_T_BLOCK => blk::describe_page(out, e),
        LGUEST_DEVICE_T_NET => write!(out, "; page {:#x}, slot {}", net::page(e), net::slot(e)),
        _ => Ok(()),
    }
}
