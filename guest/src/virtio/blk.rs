//! The virtio block device: one queue of requests.
//!
//! A request is a chain of three buffers: a header the Host reads {type,
//! ioprio, sector}, the data (which the Host writes for a read, reads for a
//! write), and one status byte the Host writes last. Requests complete in any
//! order, so several can be in flight; we tell them apart by their header,
//! one per slot.

use core::fmt::{self, Write};

use super::ring::{Buf, Vring};
use super::Device;
use crate::cell::GuestCell;
use crate::console::Error;
use crate::err;
use crate::time::Deadline;
use lguest_abi::vring::{F_ANY_LAYOUT, RING_F_EVENT_IDX};

/// Block feature bits (virtio 0.9.5).
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Status bytes.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Sectors are 512 bytes, whatever blk_size says.
pub const SECTOR: u64 = 512;
/// The length of a GET_ID answer.
pub const ID_BYTES: usize = 20;

/// Config offsets: {u64 capacity, u32 size_max, u32 seg_max, u8 geometry[4],
/// u32 blk_size}.
const CFG_CAPACITY: usize = 0;
const CFG_SEG_MAX: usize = 12;
const CFG_BLK_SIZE: usize = 20;

/// Requests we can have in flight, per disk.
pub const SLOTS: usize = 16;
/// The most disks we drive: every device on the bus but the console.
pub const MAX_DISKS: usize = super::MAX_DEVICES - 1;

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

/// A finished request.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub slot: usize,
    pub status: u8,
}

pub struct Blk {
    pub dev: Device,
    /// Which of our disks: its slots are SLOT_MEM[disk].
    pub disk: usize,
    pub vq: Vring,
    /// In 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
    pub can_flush: bool,
    /// Bit i set: slot i is in flight.
    busy: u32,
}

impl Blk {
    /// Bring up `dev` as our disk number `disk` (below MAX_DISKS). SEG_MAX
    /// and BLK_SIZE we accept but need not heed: a request has one data
    /// buffer, and we address the disk in sectors.
    pub fn probe(dev: Device, disk: usize) -> Result<Blk, Error> {
        assert!(disk < MAX_DISKS);
        let support = 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_RO
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << F_ANY_LAYOUT
            | 1 << RING_F_EVENT_IDX;
        dev.bring_up(support, 1, |accepted| {
            let capacity = dev.config(CFG_CAPACITY, 8);
            let capacity =
                capacity.ok_or_else(|| err!("block config of {} bytes", dev.header.config_len))?;
            let has = |f: u32| accepted & 1 << f != 0;
            Ok(Blk {
                dev,
                disk,
                vq: Vring::new(dev.vq(0), has(RING_F_EVENT_IDX))?,
                capacity,
                read_only: has(VIRTIO_BLK_F_RO),
                can_flush: has(VIRTIO_BLK_F_FLUSH),
                busy: 0,
            })
        })
    }

    fn slot_ptr(&self, i: usize) -> *mut Slot {
        assert!(i < SLOTS);
        // SAFETY: in bounds of our own static (disk is checked in probe).
        unsafe { SLOT_MEM.as_ptr().cast::<Slot>().add(self.disk * SLOTS + i) }
    }

    pub fn in_flight(&self) -> usize {
        self.busy.count_ones() as usize
    }

    /// Queue a request, without kicking: several can go in one kick. `data`
    /// is the data buffer (the Host writes it for IN and GET_ID). Returns
    /// its slot, or None if every slot (or the ring) is full.
    pub fn start(&mut self, kind: u32, sector: u64, data: Option<(u64, usize)>) -> Option<usize> {
        let slot = (!self.busy).trailing_zeros() as usize;
        if slot >= SLOTS || self.vq.num_free() < 3 {
            return None;
        }
        let p = self.slot_ptr(slot);
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
        self.busy |= 1 << slot;
        Some(slot)
    }

    /// A finished request, if there is one.
    pub fn poll(&mut self) -> Option<Done> {
        let used = self.vq.get_used()?;
        let offset = used.addr.wrapping_sub(self.slot_ptr(0) as u64);
        let slot = (offset / core::mem::size_of::<Slot>() as u64) as usize;
        if !offset.is_multiple_of(core::mem::size_of::<Slot>() as u64)
            || slot >= SLOTS
            || self.busy & 1 << slot == 0
        {
            panic!(
                "virtio block: the Host handed back a request at {:#x} that isn't in flight",
                used.addr
            );
        }
        self.busy &= !(1 << slot);
        // SAFETY: the slot is back from the Host; a volatile byte read.
        let status = unsafe { (&raw const (*self.slot_ptr(slot)).status).read_volatile() };
        Some(Done { slot, status })
    }

    /// Wait for a request to finish, sleeping in between; gives up at
    /// `deadline`.
    pub fn wait(&mut self, deadline: &Deadline) -> Result<Done, Error> {
        loop {
            if let Some(done) = self.poll() {
                return Ok(done);
            }
            if self.busy == 0 {
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

/// The config, for listings.
pub fn describe_config(out: &mut dyn Write, dev: &Device) -> fmt::Result {
    if let Some(capacity) = dev.config(CFG_CAPACITY, 8) {
        let kib = capacity * SECTOR / 1024;
        write!(out, "; {capacity} sectors ({kib} KiB)")?;
    }
    let offered = |f: u32| dev.host_features() & 1 << f != 0;
    for (f, name, at) in [
        (VIRTIO_BLK_F_BLK_SIZE, "blk_size", CFG_BLK_SIZE),
        (VIRTIO_BLK_F_SEG_MAX, "seg_max", CFG_SEG_MAX),
    ] {
        if let Some(value) = dev.config(at, 4).filter(|_| offered(f)) {
            write!(out, ", {name} {value}")?;
        }
    }
    for (f, name) in [
        (VIRTIO_BLK_F_FLUSH, "flush"),
        (VIRTIO_BLK_F_RO, "read-only"),
    ] {
        if offered(f) {
            write!(out, ", {name}")?;
        }
    }
    Ok(())
}
