//! A disk of the 2007 model, as lguest_blk.c drove it: one request at a
//! time, described on the disk's page, {u32 type, sector, bytes, result,
//! num_sectors}.
//!
//! We bind one answer buffer at the page's address (the key) when we bring
//! the disk up. A request fills the page, sets result 0 and sends DMA to
//! the key: the data for a write, nothing for a read, whose data the Host
//! puts in the answer buffer (which we point at the reader's memory first).
//! Then it sets result, 1 done or 2 error, and raises our IRQ.

use core::fmt::{self, Write};
use core::sync::atomic::{compiler_fence, Ordering};

use lguest_abi::{BlockPage, DmaDeviceDesc, DMA_MAX_DEVICES, PAGE_SHIFT};
use lguest_abi::{LGUEST_BLOCK_DONE, LGUEST_BLOCK_PENDING, LGUEST_BLOCK_READ, LGUEST_BLOCK_WRITE};

use super::{bind, irq, Dma};
use crate::cell::GuestCell;
use crate::console::Error;
use crate::err;
use crate::time::{idle, Deadline};

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
    /// Our table entry.
    pub at: usize,
    /// Which of our disks: its answer buffer is ANSWERS[disk].
    pub disk: usize,
    page: *mut BlockPage,
    /// In 512-byte sectors.
    pub capacity: u64,
}

impl Blk {
    /// Bring up entry `at`, `e`, as our disk number `disk`.
    pub fn probe(at: usize, e: &DmaDeviceDesc, disk: usize) -> Result<Blk, Error> {
        let capacity = sectors(e).ok_or_else(|| err!("block entry {at} has no page"))?;
        let page = page(e);
        let blk = Blk {
            at,
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

    fn answer(&self) -> *mut Dma {
        assert!(self.disk < MAX_DISKS);
        // SAFETY: in bounds of our own static.
        unsafe { ANSWERS.as_ptr().cast::<Dma>().add(self.disk) }
    }

    fn result(&self) -> u32 {
        // SAFETY: the device page (see probe).
        unsafe { (&raw const (*self.page).result).read_volatile() }
    }

    /// Read (or `write`) `len` bytes at `addr` of our RAM from `sector`, at
    /// most 16 pages' worth: the page's result, LGUEST_BLOCK_DONE or
    /// LGUEST_BLOCK_ERROR.
    pub fn request(
        &mut self,
        write: bool,
        sector: u64,
        addr: u64,
        len: usize,
        deadline: &Deadline,
    ) -> Result<u32, Error> {
        let data = Dma::over(addr, len)?;
        let sector = u32::try_from(sector).map_err(|_| err!("sector {sector} is past 2 TiB"))?;
        let (kind, mut send) = match write {
            true => (LGUEST_BLOCK_WRITE, data),
            false => (LGUEST_BLOCK_READ, Dma::EMPTY),
        };
        if !write {
            // SAFETY: no request is in flight, so the Host isn't writing
            // the answer buffer (its used_len is 0).
            unsafe { self.answer().write_volatile(data) };
        }
        let page = self.page;
        // SAFETY: the device page; the Host looks at it only when we send.
        unsafe {
            (&raw mut (*page).type_).write_volatile(kind);
            (&raw mut (*page).sector).write_volatile(sector);
            (&raw mut (*page).bytes).write_volatile(len as u32);
            (&raw mut (*page).result).write_volatile(LGUEST_BLOCK_PENDING);
        }
        compiler_fence(Ordering::SeqCst);
        send.send(page as u64);
        let result = loop {
            match self.result() {
                LGUEST_BLOCK_PENDING if deadline.passed() => {
                    return Err(err!("no answer to a request"))
                }
                LGUEST_BLOCK_PENDING => idle(Some(deadline), || self.result() != 0),
                result => break result,
            }
        };
        let used_len = self.answer().cast::<u32>();
        // SAFETY: the answer buffer's used_len (the first field), done with:
        // free it for the next read.
        let answered = unsafe { used_len.read_volatile() };
        // SAFETY: as just said.
        unsafe { used_len.write_volatile(0) };
        if result == LGUEST_BLOCK_DONE && !write && answered as usize != len {
            return Err(err!("a read of {len} bytes answered with {answered}"));
        }
        Ok(result)
    }
}

/// The disk's size, for listings.
pub fn describe_page(out: &mut dyn Write, e: &DmaDeviceDesc) -> fmt::Result {
    match sectors(e) {
        Some(sectors) => write!(out, "; {sectors} sectors ({} KiB)", sectors / 2),
        None => Ok(()),
    }
}
