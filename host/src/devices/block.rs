//! The block device (virtio ID 2), `--block=FILE[,ro]`: a file as a disk.
//!
//! Requests are the legacy virtio-blk ones: a header the Guest fills
//! (type, priority, sector), data, and a status byte we write. Reads and
//! writes go straight to the file at sector * 512; FLUSH is fdatasync, so what
//! the Guest flushed is on disk. A request past the end, or a write to a
//! read-only disk, is answered with an error, never a crash.

use crate::virtio::queue::{Buffer, Chain};
use crate::virtio::{Device, DeviceError, Queues};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
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
    /// The path it was opened by, for messages.
    pub path: String,
    /// "file" or "block device".
    pub kind: &'static str,
    /// Its (st_dev, st_ino): the same file given twice is the same inode.
    pub inode: (u64, u64),
    pub read_only: bool,
    /// In 512-byte sectors.
    pub sectors: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("--block needs a file name")]
    NoName,
    #[error("--block={spec}: unknown option '{option}' (the only one is ',ro'; a file name cannot hold a comma)")]
    UnknownOption { spec: String, option: String },
    #[error("cannot open disk {path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("disk {path} is {kind}, not a regular file or a block device")]
    NotADisk { path: String, kind: &'static str },
    #[error("cannot find the size of disk {path}: {err}")]
    Size { path: String, err: std::io::Error },
    #[error("disk {path} is {size} bytes, not a whole number of 512-byte sectors")]
    NotSectors { path: String, size: u64 },
    #[error("disk {path} is in use: {why}")]
    InUse { path: String, why: &'static str },
}

// The size of a block device in bytes: _IOR(0x12, 114, size_t).
vmm_sys_util::ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);

/// Splits `FILE[,ro]` into the path and whether it is read-only.
fn parse_spec(spec: &str) -> Result<(&str, bool), DiskError> {
    let (path, options) = spec.split_once(',').unwrap_or((spec, ""));
    if path.is_empty() {
        return Err(DiskError::NoName);
    }
    match options {
        "" if !spec.ends_with(',') => Ok((path, false)),
        "ro" => Ok((path, true)),
        other => Err(DiskError::UnknownOption {
            spec: spec.to_string(),
            option: other.to_string(),
        }),
    }
}

impl Disk {
    /// Opens `spec` = `FILE` or `FILE,ro`: a regular file or a block
    /// device, whose size is a whole number of sectors, and locks it: one
    /// writer, or any number of read-only users.
    pub fn open(spec: &str) -> Result<Disk, DiskError> {
        let (path, read_only) = parse_spec(spec)?;
        let open_err = |err| DiskError::Open {
            path: path.to_string(),
            err,
        };
        // O_EXCL on a block device opened for writing fails if the system
        // uses it (a mounted filesystem, say); on anything else it does
        // nothing.
        let excl = if read_only { 0 } else { libc::O_EXCL };
        let (file, meta) = crate::files::open_nonblocking(path.as_ref(), !read_only, excl)
            .map_err(|err| match err.raw_os_error() {
                Some(libc::EBUSY) => DiskError::InUse {
                    path: path.to_string(),
                    why: "the system is using it (mounted, or held open exclusively)",
                },
                _ => open_err(err),
            })?;
        let file_type = meta.file_type();
        let (kind, size) = if file_type.is_file() {
            ("file", meta.len())
        } else if file_type.is_block_device() {
            let mut size = 0u64;
            // SAFETY: BLKGETSIZE64 writes one u64, into `size`, which we own.
            let rc = unsafe {
                vmm_sys_util::ioctl::ioctl_with_mut_ref(&file, BLKGETSIZE64(), &mut size)
            };
            if rc < 0 {
                return Err(DiskError::Size {
                    path: path.to_string(),
                    err: std::io::Error::last_os_error(),
                });
            }
            ("block device", size)
        } else {
            return Err(DiskError::NotADisk {
                path: path.to_string(),
                kind: crate::files::kind_of(file_type),
            });
        };
        crate::files::set_blocking(&file).map_err(open_err)?;
        if size % SECTOR != 0 {
            return Err(DiskError::NotSectors {
                path: path.to_string(),
                size,
            });
        }
        lock(&file, path, read_only)?;
        Ok(Disk {
            file,
            path: path.to_string(),
            kind,
            inode: (meta.dev(), meta.ino()),
            read_only,
            sectors: size / SECTOR,
        })
    }
}

/// Takes an open file description lock on the whole of `file`: shared for a
/// read-only disk, exclusive for a writable one. It belongs to this open
/// file (not to the process), so it lasts as long as the Disk, across
/// restarts, and goes when we do, however we end. A second Launcher (or
/// anything else that asks, as QEMU does) on a disk we write is refused, and
/// so are we on one that is written.
fn lock(file: &File, path: &str, read_only: bool) -> Result<(), DiskError> {
    // SAFETY: flock is plain data; all zeroes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start and l_len 0: the whole file; l_pid must be 0 for OFD locks.
    // SAFETY: F_OFD_SETLK reads one flock we own, on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Err(DiskError::InUse {
            path: path.to_string(),
            why: if read_only {
                "another program has it locked for writing"
            } else {
                "another program has it locked (a disk has one writer, or any number of ,ro users)"
            },
        }),
        // A filesystem without locks: go on, unguarded, as QEMU does.
        _ => {
            tracing::warn!(disk = path, error = %err, "cannot lock the disk; using it unlocked");
            Ok(())
        }
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
    /*D:530 A disk request costs no copy of ours: pread and pwrite go
     * straight between the file and the Guest's buffers, at the addresses
     * the walk checked. A request past the end of the disk, or a write to a
     * read-only one, is answered IOERR: the Guest hears no, and we carry
     * on. */
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

    fn kick(&mut self, q: usize, queues: &mut Queues) -> Result<(), DeviceError> {
        while let Some(chain) = queues.pop(q)? {
            let len = self.request(queues, &chain);
            queues.push(q, &chain, len)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ro_is_the_only_option() {
        assert_eq!(parse_spec("disk.img").unwrap(), ("disk.img", false));
        assert_eq!(parse_spec("disk.img,ro").unwrap(), ("disk.img", true));
        for bad in ["disk.img,rw", "disk.img,foo", "disk.img,", "disk.img,ro,ro"] {
            assert!(
                matches!(parse_spec(bad), Err(DiskError::UnknownOption { .. })),
                "{bad}"
            );
        }
        assert!(matches!(parse_spec(",ro"), Err(DiskError::NoName)));
        assert!(matches!(parse_spec(""), Err(DiskError::NoName)));
    }
}
