//! The block device (virtio ID 2), `--block=FILE[,ro]`: a file as a disk.
//!
//! Requests are the legacy virtio-blk ones: a header the Guest fills
//! (type, priority, sector), data, and a status byte we write. Reads and
//! writes go straight to the file at sector * 512; FLUSH is fdatasync, so what
//! the Guest flushed is on disk. A request past the end, or a write to a
//! read-only disk, is answered with an error, never a crash.

use crate::virtio::queue::{read_from_chain, write_to_chain, Chain};
use crate::virtio::{Device, Queues};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use virtio_bindings::virtio_blk::*;

pub const SECTOR: u64 = 512;
/// Most data segments per request we accept (and say in SEG_MAX).
const SEG_MAX: u32 = 126;
/// Largest segment, in bytes (config's size_max).
const SIZE_MAX: u32 = 1 << 20;
const HEADER: usize = 16;

/// A disk image, opened once and kept across Guest restarts.
pub struct Disk {
    pub file: File,
    pub read_only: bool,
    /// In 512-byte sectors.
    pub sectors: u64,
}

impl Disk {
    /// Opens `spec` = `FILE` or `FILE,ro`.
    pub fn open(spec: &str) -> Result<Disk, String> {
        let (path, read_only) = match spec.strip_suffix(",ro") {
            Some(p) => (p, true),
            None => (spec, false),
        };
        if path.is_empty() {
            return Err("--block needs a file name".into());
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| format!("cannot open disk {path}: {e}"))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot stat disk {path}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("disk {path} is not a regular file"));
        }
        let size = meta.len();
        if size % SECTOR != 0 {
            return Err(format!(
                "disk {path} is {size} bytes, not a whole number of 512-byte sectors"
            ));
        }
        Ok(Disk {
            file,
            read_only,
            sectors: size / SECTOR,
        })
    }
}

pub struct Block {
    disk: Arc<Disk>,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

impl Block {
    pub fn new(disk: Arc<Disk>, index: usize) -> Block {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let text = format!("lguest-disk{index}");
        id[..text.len()].copy_from_slice(text.as_bytes());
        Block { disk, id }
    }

    /// Does one request; returns the bytes it wrote into the chain.
    fn request(&self, queues: &Queues, chain: &Chain) -> u32 {
        let input = read_from_chain(queues.mem, chain);
        let room: u64 = chain.writable().map(|b| b.len as u64).sum();
        if input.len() < HEADER || room == 0 {
            // No header or no status byte: nothing we can answer into.
            return 0;
        }
        let kind = u32::from_le_bytes(input[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(input[8..16].try_into().expect("8 bytes"));
        let data_in = (room - 1) as usize; // all but the status byte
        let segments = chain.buffers.len().saturating_sub(2);
        let (mut reply, status) = if segments > SEG_MAX as usize {
            (Vec::new(), VIRTIO_BLK_S_IOERR)
        } else {
            match kind {
                VIRTIO_BLK_T_IN => self.read(sector, data_in),
                VIRTIO_BLK_T_OUT => (Vec::new(), self.write(sector, &input[HEADER..])),
                VIRTIO_BLK_T_FLUSH => (Vec::new(), self.flush()),
                VIRTIO_BLK_T_GET_ID => {
                    let n = data_in.min(self.id.len());
                    (self.id[..n].to_vec(), VIRTIO_BLK_S_OK)
                }
                _ => (Vec::new(), VIRTIO_BLK_S_UNSUPP),
            }
        };
        // The status byte is the last writable byte: pad the data up to it.
        reply.resize(data_in, 0);
        reply.push(status as u8);
        let written = write_to_chain(queues.mem, chain, &reply);
        if kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_GET_ID {
            written
        } else {
            1
        }
    }

    /// Checks `[sector, sector + bytes)` lies on the disk.
    fn in_range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(bytes)?;
        (end <= self.disk.sectors * SECTOR).then_some(offset)
    }

    fn read(&self, sector: u64, len: usize) -> (Vec<u8>, u32) {
        let Some(offset) = self.in_range(sector, len as u64) else {
            return (Vec::new(), VIRTIO_BLK_S_IOERR);
        };
        let mut data = vec![0u8; len];
        match self.disk.file.read_exact_at(&mut data, offset) {
            Ok(()) => (data, VIRTIO_BLK_S_OK),
            Err(_) => (Vec::new(), VIRTIO_BLK_S_IOERR),
        }
    }

    fn write(&self, sector: u64, data: &[u8]) -> u32 {
        if self.disk.read_only {
            return VIRTIO_BLK_S_IOERR;
        }
        let Some(offset) = self.in_range(sector, data.len() as u64) else {
            return VIRTIO_BLK_S_IOERR;
        };
        match self.disk.file.write_all_at(data, offset) {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(_) => VIRTIO_BLK_S_IOERR,
        }
    }

    fn flush(&self) -> u32 {
        if self.disk.read_only {
            return VIRTIO_BLK_S_OK;
        }
        match self.disk.file.sync_data() {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(_) => VIRTIO_BLK_S_IOERR,
        }
    }
}

impl Device for Block {
    fn name(&self) -> &'static str {
        "block"
    }
    fn virtio_id(&self) -> u8 {
        lguest_abi::VIRTIO_ID_BLOCK
    }
    fn queue_names(&self) -> &'static [&'static str] {
        &["requests"]
    }
    fn features(&self) -> u32 {
        let ro = if self.disk.read_only {
            1 << VIRTIO_BLK_F_RO
        } else {
            0
        };
        1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH | ro
    }
    /// {u64 capacity, u32 size_max, u32 seg_max, 4 bytes geometry, u32 blk_size}
    fn config(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(24);
        c.extend_from_slice(&self.disk.sectors.to_le_bytes());
        c.extend_from_slice(&SIZE_MAX.to_le_bytes());
        c.extend_from_slice(&SEG_MAX.to_le_bytes());
        c.extend_from_slice(&[0; 4]);
        c.extend_from_slice(&(SECTOR as u32).to_le_bytes());
        c
    }

    fn kick(&mut self, q: usize, queues: &mut Queues) -> Result<(), String> {
        while let Some(chain) = queues.pop(q)? {
            let len = self.request(queues, &chain);
            queues.push(q, &chain, len)?;
        }
        Ok(())
    }
}
