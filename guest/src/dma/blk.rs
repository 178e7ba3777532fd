//! A disk of the 2007 model, as lguest_blk.c drove it: one request at a
//! time, described on the disk's page, {u32 type, sector, bytes, result,
//! num_sectors}.
//!
//! We bind one answer buffer at the page's address (the key) when we bring
//! the disk up: the Host puts the data a read asks for there. The reference
//! Guest has nothing to read or write; the requests are the self-tests', in
//! lguest-guest-tests' io.rs.

use core::fmt::{self, Write};

use lguest_abi::{BlockPage, DmaDeviceDesc, DMA_MAX_DEVICES, PAGE_SHIFT};

use super::{bind, irq, Dma};
use crate::cell::GuestCell;
use crate::console::Error;
use crate::err;

/// The most disks we drive: every entry but the console's.
pub const MAX_DISKS: usize = DMA_MAX_DEVICES - 1;

/// Each disk's answer buffer.
static ANSWERS: GuestCell<[Dma; MAX_DISKS]> = GuestCell::new([Dma::EMPTY; MAX_DISKS]);

/// The device page of a block entry.
fn page(e: &DmaDeviceDesc) -> *mut BlockPage {
    core::ptr::with_exposed_provenance_mut(((e.pfn as u64) << PAGE_SHIFT) as usize)
}

/// A block entry's size in sectors, as its page says (None: it has no page).
fn sectors(e: &DmaDeviceDesc) -> Option<u64> {
    if e.pfn == 0 || e.num_pages == 0 {
        return None;
    }
    // SAFETY: the device page, below pfn_limit and identity-mapped.
    Some(unsafe { (&raw const (*page(e)).num_sectors).read_volatile() } as u64)
}

pub struct Blk {
    /// Which of our disks: its answer buffer is ANSWERS[disk].
    pub disk: usize,
    /// The disk's page, where a request is described.
    pub page: *mut BlockPage,
    /// In 512-byte sectors.
    pub capacity: u64,
}

impl Blk {
    /// Bring up entry `at`, `e`, as our disk number `disk`.
    pub fn probe(at: usize, e: &DmaDeviceDesc, disk: usize) -> Result<Blk, Error> {
        let capacity = sectors(e).ok_or_else(|| err!("block entry {at} has no page"))?;
        let page = page(e);
        let blk = Blk {
            disk,
            page,
            capacity,
        };
        // SAFETY: not bound yet; from now on reached through raw pointers.
        unsafe { blk.answer().write_volatile(Dma::EMPTY) };
        // SAFETY: as just said.
        unsafe { bind(page as u64, &raw mut (*blk.answer()).0, 1, irq(at))? };
        Ok(blk)
    }

    /// The answer buffer, bound at the page's address.
    pub fn answer(&self) -> *mut Dma {
        assert!(self.disk < MAX_DISKS);
        // SAFETY: in bounds of our own static.
        unsafe { ANSWERS.as_ptr().cast::<Dma>().add(self.disk) }
    }
}

/// The disk's size, for listings.
pub fn describe_page(out: &mut dyn Write, e: &DmaDeviceDesc) -> fmt::Result {
    match sectors(e) {
        Some(sectors) => write!(out, "; {sectors} sectors ({} KiB)", sectors / 2),
        None => Ok(()),
    }
}
