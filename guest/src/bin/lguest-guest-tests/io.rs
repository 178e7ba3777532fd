//! Reading and writing the devices the reference Guest brings up but never
//! uses itself: its disks, on the bus and in the 2007 model, and the
//! entropy device. Only the self-tests and the benchmarks make requests, so
//! the request paths live here, over the kernel's drivers.

use core::sync::atomic::{compiler_fence, Ordering};

use lguest_abi::{LGUEST_BLOCK_DONE, LGUEST_BLOCK_PENDING, LGUEST_BLOCK_READ, LGUEST_BLOCK_WRITE};
use lguest_guest::cell::GuestCell;
use lguest_guest::console::Error;
use lguest_guest::dma::{self, Dma};
use lguest_guest::err;
use lguest_guest::time::{idle, Deadline};
use lguest_guest::virtio::blk::{Blk, MAX_DISKS};
use lguest_guest::virtio::ring::Buf;
use lguest_guest::virtio::rng::Rng;

/*
 * A virtio block request is a chain of three buffers: a header the Host
 * reads {type, ioprio, sector}, the data (which the Host writes for a read,
 * reads for a write), and one status byte the Host writes last. Requests
 * complete in any order, so several can be in flight; we tell them apart by
 * their header, one per slot.
 */

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Status bytes.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;

/// The length of a GET_ID answer.
pub const ID_BYTES: usize = 20;

/// Requests we can have in flight, per disk.
pub const SLOTS: usize = 16;

/// What a request needs besides its data: the header and the status byte.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
struct Slot {
    kind: u32,
    ioprio: u32,
    sector: u64,
    status: u8,
}

const HEADER_BYTES: usize = 16;

const NO_SLOT: Slot = Slot {
    kind: 0,
    ioprio: 0,
    sector: 0,
    status: 0,
};

/// Each disk's slots: the Host reads the headers and writes the status
/// bytes behind our back, so they too are reached through raw pointers.
static SLOT_MEM: GuestCell<[[Slot; SLOTS]; MAX_DISKS]> =
    GuestCell::new([[NO_SLOT; SLOTS]; MAX_DISKS]);

/// Each disk's slots in flight: bit i set, slot i is.
static BUSY: GuestCell<[u32; MAX_DISKS]> = GuestCell::new([0; MAX_DISKS]);

/// A finished request.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub slot: usize,
    pub status: u8,
}

/// Requests on a virtio disk.
pub trait Requests {
    fn in_flight(&self) -> usize;
    /// Queue a request, without kicking: several can go in one kick.
    /// `data` is the data buffer (the Host writes it for IN and GET_ID).
    /// Returns its slot, or None if every slot (or the ring) is full.
    fn start(&mut self, kind: u32, sector: u64, data: Option<(u64, usize)>) -> Option<usize>;
    /// A finished request, if there is one.
    fn poll(&mut self) -> Option<Done>;
    /// Wait for a request to finish, sleeping in between; gives up at
    /// `deadline`.
    fn wait(&mut self, deadline: &Deadline) -> Result<Done, Error>;
}

fn busy(blk: &Blk) -> u32 {
    BUSY.read()[blk.disk]
}

fn set_busy(blk: &Blk, busy: u32) {
    let mut all = BUSY.read();
    all[blk.disk] = busy;
    BUSY.write(all);
}

fn slot_ptr(blk: &Blk, i: usize) -> *mut Slot {
    assert!(i < SLOTS && blk.disk < MAX_DISKS);
    // SAFETY: in bounds of our own static (both indices are checked).
    unsafe { SLOT_MEM.as_ptr().cast::<Slot>().add(blk.disk * SLOTS + i) }
}

impl Requests for Blk {
    fn in_flight(&self) -> usize {
        busy(self).count_ones() as usize
    }

    fn start(&mut self, kind: u32, sector: u64, data: Option<(u64, usize)>) -> Option<usize> {
        let slot = (!busy(self)).trailing_zeros() as usize;
        if slot >= SLOTS || self.vq.num_free() < 3 {
            return None;
        }
        let p = slot_ptr(self, slot);
        // SAFETY: the slot is free, so the Host doesn't hold it.
        unsafe {
            p.write_volatile(Slot {
                kind,
                ioprio: 0,
                sector,
                // Not a status the Host writes: shows it wrote none.
                status: 0xFF,
            })
        };
        let header = Buf::readable(p as u64, HEADER_BYTES);
        let status = Buf::writable(p as u64 + HEADER_BYTES as u64, 1);
        let writable = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
        let added = match data {
            Some((addr, len)) => self
                .vq
                .add(&[header, Buf::new(addr, len, writable), status]),
            None => self.vq.add(&[header, status]),
        };
        added.ok()?;
        set_busy(self, busy(self) | 1 << slot);
        Some(slot)
    }

    fn poll(&mut self) -> Option<Done> {
        let used = self.vq.get_used()?;
        let offset = used.addr.wrapping_sub(slot_ptr(self, 0) as u64);
        let slot = (offset / core::mem::size_of::<Slot>() as u64) as usize;
        if !offset.is_multiple_of(core::mem::size_of::<Slot>() as u64)
            || slot >= SLOTS
            || busy(self) & 1 << slot == 0
        {
            panic!(
                "virtio block: the Host handed back a request at {:#x} that isn't in flight",
                used.addr
            );
        }
        set_busy(self, busy(self) & !(1 << slot));
        // SAFETY: the slot is back from the Host; a volatile byte read.
        let status = unsafe { (&raw const (*slot_ptr(self, slot)).status).read_volatile() };
        Some(Done { slot, status })
    }

    fn wait(&mut self, deadline: &Deadline) -> Result<Done, Error> {
        loop {
            if let Some(done) = self.poll() {
                return Ok(done);
            }
            if busy(self) == 0 {
                return Err(err!("waiting for a request with none in flight"));
            }
            if deadline.passed() {
                return Err(err!(
                    "{} requests still in flight after the deadline",
                    self.in_flight()
                ));
            }
            self.vq.sleep(Some(deadline));
        }
    }
}

/*
 * A disk of the 2007 model, as lguest_blk.c drove it: one request at a
 * time, described on the disk's page. A request fills the page, sets result
 * 0 and sends DMA to the key: the data for a write, nothing for a read,
 * whose data the Host puts in the answer buffer bound at the key (which we
 * point at the reader's memory first). Then it sets result, 1 done or 2
 * error, and raises the disk's IRQ.
 */

/// Read (or `write`) `len` bytes at `addr` of our RAM from `sector`, at
/// most 16 pages' worth: the page's result, LGUEST_BLOCK_DONE or
/// LGUEST_BLOCK_ERROR.
pub fn dma_request(
    blk: &mut dma::blk::Blk,
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
        // SAFETY: no request is in flight, so the Host isn't writing the
        // answer buffer (its used_len is 0).
        unsafe { blk.answer().write_volatile(data) };
    }
    let page = blk.page;
    // SAFETY: the device page; the Host looks at it only when we send.
    unsafe {
        (&raw mut (*page).type_).write_volatile(kind);
        (&raw mut (*page).sector).write_volatile(sector);
        (&raw mut (*page).bytes).write_volatile(len as u32);
        (&raw mut (*page).result).write_volatile(LGUEST_BLOCK_PENDING);
    }
    compiler_fence(Ordering::SeqCst);
    send.send(page as u64);
    // SAFETY: the device page (see dma::blk::Blk::probe).
    let answer = || unsafe { (&raw const (*page).result).read_volatile() };
    let result = loop {
        match answer() {
            LGUEST_BLOCK_PENDING if deadline.passed() => {
                return Err(err!("no answer to a request"))
            }
            LGUEST_BLOCK_PENDING => idle(Some(deadline), || answer() != 0),
            result => break result,
        }
    };
    let used_len = blk.answer().cast::<u32>();
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

/*
 * The entropy device: we offer its one buffer, and the Host hands it back
 * full of random bytes.
 */

/// Fill `out` (up to 64 bytes of it) with what the Host gives, within 5
/// seconds: how many bytes it gave.
pub fn read_random(rng: &mut Rng, out: &mut [u8]) -> Result<usize, Error> {
    // A read that gave up left its buffer with the Host: it still counts.
    if rng.queue.vq.in_flight() == 0 {
        rng.queue.offer(0);
        rng.queue.vq.kick();
    }
    let deadline = Deadline::after_ms(5000);
    let (i, len) = loop {
        if let Some(got) = rng.queue.received() {
            break got;
        }
        if deadline.passed() {
            return Err(err!("no random bytes within 5 s"));
        }
        rng.queue.vq.sleep(Some(&deadline));
    };
    let len = len.min(out.len());
    rng.queue.read(i, 0, &mut out[..len]);
    Ok(len)
}
