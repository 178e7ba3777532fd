//! The virtio block device: one queue of requests.
//!
//! The reference Guest brings its disks up and lists them, but has nothing
//! to read or write: the requests (a header, the data, a status byte, in
//! one chain) are the self-tests' and benchmarks', in lguest-guest-tests'
//! io.rs.

use core::fmt::{self, Write};

use super::ring::Vring;
use super::Device;
use crate::console::Error;
use crate::err;
use lguest_abi::vring::{F_ANY_LAYOUT, RING_F_EVENT_IDX};

/// Block feature bits (virtio 0.9.5).
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Sectors are 512 bytes, whatever blk_size says.
pub const SECTOR: u64 = 512;

/// Config offsets: {u64 capacity, u32 size_max, u32 seg_max, u8 geometry[4],
/// u32 blk_size}.
const CFG_CAPACITY: usize = 0;
const CFG_SEG_MAX: usize = 12;
const CFG_BLK_SIZE: usize = 20;

/// The most disks we drive: every device on the bus but the console.
pub const MAX_DISKS: usize = super::MAX_DEVICES - 1;

pub struct Blk {
    /// Which of our disks: its slots are SLOT_MEM[disk].
    pub disk: usize,
    pub vq: Vring,
    /// In 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
    pub can_flush: bool,
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
                disk,
                vq: Vring::new(dev.vq(0), accepted)?,
                capacity,
                read_only: has(VIRTIO_BLK_F_RO),
                can_flush: has(VIRTIO_BLK_F_FLUSH),
            })
        })
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
