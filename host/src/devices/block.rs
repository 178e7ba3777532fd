//! The block device (virtio ID 2), `--block=FILE[,ro]`: a file as a disk.
//!
//! Requests are the legacy virtio-blk ones: a header the Guest fills
//! (type, priority, sector), data, and a status byte we write. Reads and
//! writes go straight to the file at sector * 512; FLUSH is fdatasync, so what
//! the Guest flushed is on disk. A request past the end, or a write to a
//! read-only disk, is answered with an error, never a crash.

use crate::virtio::queue::{Buffer, Chain};
use crate::virtio::{Device, Queues};
use std::fs::File;
use std::os::fd::AsRawFd;
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

/// The pieces `(addr, len)` of `bufs` that hold bytes `[skip, skip + take)`
/// of the data they carry together.
fn pieces(bufs: &[Buffer], mut skip: u64, mut take: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for b in bufs {
        let len = b.len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        if take == 0 {
            break;
        }
        let n = (len - skip).min(take);
        out.push((b.addr + skip, n));
        take -= n;
        skip = 0;
    }
    out
}

/// Copies between `pieces` of Guest memory and `bytes`, in order.
fn copy_pieces(queues: &Queues, pieces: &[(u64, u64)], bytes: &mut [u8], to_guest: bool) {
    let mut at = 0;
    for &(addr, len) in pieces {
        let part = &mut bytes[at..at + len as usize];
        if to_guest {
            queues.mem.write(addr, part).expect("checked by the walk");
        } else {
            queues.mem.read(addr, part).expect("checked by the walk");
        }
        at += len as usize;
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
        let readable: Vec<Buffer> = chain.readable().copied().collect();
        let writable: Vec<Buffer> = chain.writable().copied().collect();
        let readable_len = readable
            .iter()
            .fold(0u64, |n, b| n.saturating_add(b.len as u64));
        let writable_len = writable
            .iter()
            .fold(0u64, |n, b| n.saturating_add(b.len as u64));
        if readable_len < HEADER as u64 || writable_len == 0 {
            // No header or no status byte: nothing we can answer into.
            return 0;
        }
        let mut header = [0u8; HEADER];
        copy_pieces(
            queues,
            &pieces(&readable, 0, HEADER as u64),
            &mut header,
            false,
        );
        let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        // Data: the readable bytes after the header (a write), or the
        // writable bytes before the status byte (a read).
        let data_in = writable_len - 1;
        let (status, written) = if chain.buffers.len().saturating_sub(2) > SEG_MAX as usize {
            (VIRTIO_BLK_S_IOERR, 0)
        } else {
            match kind {
                VIRTIO_BLK_T_IN => {
                    let status =
                        self.transfer(queues, sector, &pieces(&writable, 0, data_in), false);
                    (
                        status,
                        if status == VIRTIO_BLK_S_OK {
                            data_in
                        } else {
                            0
                        },
                    )
                }
                VIRTIO_BLK_T_OUT => {
                    let data = pieces(&readable, HEADER as u64, readable_len - HEADER as u64);
                    (self.transfer(queues, sector, &data, true), 0)
                }
                VIRTIO_BLK_T_FLUSH => (self.flush(), 0),
                VIRTIO_BLK_T_GET_ID => {
                    // At most the 20 bytes of the id, whatever room is given.
                    let n = data_in.min(self.id.len() as u64);
                    let mut id = self.id;
                    copy_pieces(
                        queues,
                        &pieces(&writable, 0, n),
                        &mut id[..n as usize],
                        true,
                    );
                    (VIRTIO_BLK_S_OK, n)
                }
                _ => (VIRTIO_BLK_S_UNSUPP, 0),
            }
        };
        // The status byte is the last writable byte.
        let (status_addr, _) = pieces(&writable, data_in, 1)[0];
        queues
            .mem
            .write(status_addr, &[status as u8])
            .expect("checked by the walk");
        written as u32 + 1
    }

    /// Checks `[sector, sector + bytes)` lies on the disk.
    fn in_range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(bytes)?;
        (end <= self.disk.sectors * SECTOR).then_some(offset)
    }

    /// Moves the data of one request between the disk and the Guest's
    /// buffers directly: pread into them, or pwrite from them.
    fn transfer(&self, queues: &Queues, sector: u64, data: &[(u64, u64)], write: bool) -> u32 {
        if write && self.disk.read_only {
            return VIRTIO_BLK_S_IOERR;
        }
        let total = data.iter().map(|p| p.1).sum();
        let Some(mut offset) = self.in_range(sector, total) else {
            return VIRTIO_BLK_S_IOERR;
        };
        let fd = self.disk.file.as_raw_fd();
        for &(addr, len) in data {
            let ptr = queues
                .mem
                .host_address(addr, len)
                .expect("checked by the walk");
            let mut done = 0u64;
            while done < len {
                // SAFETY: [ptr, ptr + len) is mapped Guest memory (checked
                // above); the kernel reads or writes it, and no Rust
                // reference to it is made.
                let n = unsafe {
                    let p = ptr.add(done as usize).cast();
                    let count = (len - done) as usize;
                    let at = (offset + done) as libc::off_t;
                    if write {
                        libc::pwrite(fd, p, count, at)
                    } else {
                        libc::pread(fd, p, count, at)
                    }
                };
                if n <= 0 {
                    let interrupted =
                        std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
                    if n < 0 && interrupted {
                        continue;
                    }
                    return VIRTIO_BLK_S_IOERR;
                }
                done += n as u64;
            }
            offset += len;
        }
        VIRTIO_BLK_S_OK
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
