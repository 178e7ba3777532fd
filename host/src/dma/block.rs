//! The 2007 block device: one page of `{u32 type, u32 sector, u32 bytes,
//! u32 result, u32 num_sectors}` per disk, and DMA to the page's address.
//!
//! The Guest binds one answer buffer at the page's address, fills the page,
//! sets result 0 and sends to the same key: the data for a write, an empty
//! DMA for a read. SEND_DMA runs on the vCPU thread and must not wait for
//! the disk, so it only takes a snapshot of the request (and, for a write, a
//! copy of the data: once SEND_DMA returns the Guest may reuse its buffer)
//! and hands it to the disk's own thread over a channel. That thread does
//! the I/O, puts a read's data into the answer buffer, sets result (1 done,
//! 2 error) and raises the answer binding's IRQ, errors included.

use super::{bindings, DeviceContext, DmaError, Sent};
use crate::devices::block::Disk;
use lguest_abi::{
    dma_off, LGUEST_BLOCK_DONE, LGUEST_BLOCK_ERROR, LGUEST_BLOCK_READ, LGUEST_BLOCK_SECTOR,
    LGUEST_BLOCK_WRITE,
};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What the disk's thread is asked to do.
#[derive(Debug)]
enum Op {
    Read {
        offset: u64,
        bytes: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// A request that breaks the block page's rules: result 2.
    Refuse,
}

pub struct BlockDevice {
    disk: Arc<Disk>,
    page: u64,
    ctx: DeviceContext,
    requests: Option<mpsc::Sender<Op>>,
    thread: Option<JoinHandle<()>>,
}

impl BlockDevice {
    pub(crate) fn start(disk: Arc<Disk>, page: u64, ctx: DeviceContext) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            disk: disk.clone(),
            page,
            ctx: ctx.clone(),
            buf: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("dma-block".into())
            .spawn(move || {
                crate::sandbox::enter_thread(crate::sandbox::ThreadKind::Device);
                worker.run(rx)
            })?;
        Ok(BlockDevice {
            disk,
            page,
            ctx,
            requests: Some(tx),
            thread: Some(thread),
        })
    }

    /// SEND_DMA to a key in this disk's page, with the gathered `data`.
    /// Returns the sender's used_len: the bytes taken for writing, 0
    /// otherwise.
    pub(crate) fn send(
        &self,
        offset: u64,
        data: &[u8],
        bindings: &Mutex<bindings::Bindings>,
    ) -> Result<Sent, DmaError> {
        if offset != 0 {
            // Inside the page but not its key: nobody takes these bytes.
            return Ok(Sent {
                used_len: 0,
                raise: None,
            });
        }
        let field = |off: usize| {
            self.ctx
                .mem
                .read_u32(self.page + off as u64)
                .expect("the block page is Guest memory")
        };
        let (type_, sector, bytes) = (
            field(dma_off::BLOCK_TYPE),
            field(dma_off::BLOCK_SECTOR),
            field(dma_off::BLOCK_BYTES),
        );
        let in_range = (sector as u64 + bytes as u64 / LGUEST_BLOCK_SECTOR) <= self.disk.sectors;
        let offset = sector as u64 * LGUEST_BLOCK_SECTOR;
        let whole = (bytes as u64).is_multiple_of(LGUEST_BLOCK_SECTOR);
        let op = match type_ {
            _ if !whole || !in_range => Op::Refuse,
            LGUEST_BLOCK_READ => {
                // The answer buffer must hold it all (checked again when the
                // data is there: the Guest may change it meanwhile).
                let free = super::lock(bindings).first_free(self.ctx.mem.as_ref(), self.page)?;
                match free {
                    Some((f, _)) if f.capacity >= bytes => Op::Read { offset, bytes },
                    _ => Op::Refuse,
                }
            }
            LGUEST_BLOCK_WRITE if !self.disk.read_only && data.len() == bytes as usize => {
                Op::Write {
                    offset,
                    data: data.to_vec(),
                }
            }
            _ => Op::Refuse,
        };
        let used_len = match &op {
            Op::Write { data, .. } => data.len() as u32,
            _ => 0,
        };
        if let Some(tx) = &self.requests {
            let _ = tx.send(op);
        }
        Ok(Sent {
            used_len,
            raise: None,
        })
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it has finished what it
        // was given.
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    disk: Arc<Disk>,
    page: u64,
    ctx: DeviceContext,
    buf: Vec<u8>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        for op in rx {
            self.complete(op);
        }
    }

    fn complete(&mut self, op: Op) {
        let key = self.page;
        let mut irq = None;
        let result = match op {
            Op::Read { offset, bytes } => {
                self.buf.resize(bytes as usize, 0);
                if self.disk.file.read_exact_at(&mut self.buf, offset).is_err() {
                    LGUEST_BLOCK_ERROR
                } else {
                    let delivered = super::lock(&self.ctx.bindings).deliver(
                        self.ctx.mem.as_ref(),
                        key,
                        &self.buf,
                    );
                    match delivered {
                        Ok(Some(d)) => {
                            irq = Some(d.irq);
                            if d.bytes == bytes {
                                LGUEST_BLOCK_DONE
                            } else {
                                LGUEST_BLOCK_ERROR
                            }
                        }
                        Ok(None) => LGUEST_BLOCK_ERROR,
                        Err(e) => {
                            self.ctx.signals.kill(e.to_string());
                            return;
                        }
                    }
                }
            }
            Op::Write { offset, data } => {
                // On disk before the Guest hears it is done.
                let written = self
                    .disk
                    .file
                    .write_all_at(&data, offset)
                    .and_then(|()| self.disk.file.sync_data());
                if written.is_ok() {
                    LGUEST_BLOCK_DONE
                } else {
                    LGUEST_BLOCK_ERROR
                }
            }
            Op::Refuse => LGUEST_BLOCK_ERROR,
        };
        let _ = self
            .ctx
            .mem
            .write_u32(self.page + dma_off::BLOCK_RESULT as u64, result);
        let irq = irq.or_else(|| super::lock(&self.ctx.bindings).irq_at(key));
        if let Some(irq) = irq {
            self.ctx.signals.raise(irq);
        }
    }
}
