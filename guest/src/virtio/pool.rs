//! A virtqueue and the buffers a driver lends the Host on it: what the
//! console and the network card share.
//!
//! The Guest has no allocator, so a driver's buffers are a static array of
//! same-sized buffers, a pool. While a buffer is in a ring the Host may write
//! it at any moment, so we only ever reach its bytes through raw pointers,
//! a byte at a time. When the Host hands a chain back we know which buffer
//! it was by its address alone.
//!
//! A receive queue offers every buffer for the Host to fill, and offers each
//! again once we have read it. A transmit queue fills a free buffer, offers
//! it for the Host to read, and frees it when the Host hands it back.

use super::ring::{Buf, Used, Vring};
use crate::cell::GuestCell;
use crate::console::Error;
use crate::time::Deadline;
use lguest_abi::VqConfig;

pub struct Queue {
    pub vq: Vring,
    base: u64,
    size: usize,
    count: usize,
    /// Bit i set: buffer i is ours to fill (transmit queues only).
    free: u32,
}

impl Queue {
    /// Take over the ring `cfg` describes (see Vring::new), lending the Host
    /// the buffers of `mem`, at most as many as the ring has descriptors.
    ///
    /// Each static backs one queue at a time: a driver makes its queues when
    /// it is brought up, and the old driver is gone by then.
    pub fn new<const SIZE: usize, const COUNT: usize>(
        cfg: VqConfig,
        features: u32,
        mem: &'static GuestCell<[[u8; SIZE]; COUNT]>,
    ) -> Result<Queue, Error> {
        const { assert!(COUNT <= 32, "the free mask is a u32") };
        let vq = Vring::new(cfg, features)?;
        let count = COUNT.min(vq.num() as usize);
        Ok(Queue {
            vq,
            base: mem.as_ptr() as u64,
            size: SIZE,
            count,
            free: ((1u64 << count) - 1) as u32,
        })
    }

    /// Buffer `i`'s address, which is what the Host sees.
    fn addr(&self, i: usize) -> u64 {
        assert!(i < self.count);
        self.base + (i * self.size) as u64
    }

    /// Which buffer starts at `addr`, if any.
    fn index(&self, addr: u64) -> Option<usize> {
        let offset = addr.wrapping_sub(self.base);
        let i = (offset / self.size as u64) as usize;
        (offset.is_multiple_of(self.size as u64) && i < self.count).then_some(i)
    }

    /// Copy bytes from buffer `i` at `offset` into `out`. Only for a buffer
    /// the Host has handed back.
    pub fn read(&self, i: usize, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.size);
        let at = self.addr(i) as usize + offset;
        for (k, byte) in out.iter_mut().enumerate() {
            // SAFETY: inside buffer i (checked), which the Host handed back.
            *byte = unsafe { core::ptr::with_exposed_provenance::<u8>(at + k).read_volatile() };
        }
    }

    /*
     * Receiving.
     */

    /// Offer buffer `i` for the Host to fill (without a kick).
    pub fn offer(&mut self, i: usize) {
        let buf = Buf::writable(self.addr(i), self.size);
        self.vq
            .add(&[buf])
            .expect("a ring has room for all our buffers");
    }

    /// Offer every buffer, for a receive queue that starts.
    pub fn offer_all(&mut self) {
        for i in 0..self.count {
            self.offer(i);
        }
    }

    /// The next buffer the Host filled: (which, bytes written, at most the
    /// buffer's size). Offer it again once read.
    pub fn received(&mut self) -> Option<(usize, usize)> {
        let used = self.vq.get_used()?;
        let Some(i) = self.index(used.addr) else {
            panic!(
                "virtio: the Host handed back a buffer at {:#x} that isn't ours",
                used.addr
            );
        };
        Some((i, (used.len as usize).min(self.size)))
    }

    /*
     * Sending.
     */

    /// Take back the buffers the Host has finished with; the last chain it
    /// handed back, if any. Chains that aren't from the pool (a benchmark's)
    /// have nothing to free.
    pub fn reclaim(&mut self) -> Option<Used> {
        let mut last = None;
        while let Some(used) = self.vq.get_used() {
            if let Some(i) = self.index(used.addr) {
                self.free |= 1 << i;
            }
            last = Some(used);
        }
        last
    }

    /// Send `bytes` (a buffer's worth at most) in a free buffer, waiting
    /// for the Host to hand one back if it holds them all, and kick: the
    /// chain's head.
    pub fn send(&mut self, bytes: &[u8]) -> u16 {
        assert!(bytes.len() <= self.size);
        let i = loop {
            self.reclaim();
            let i = self.free.trailing_zeros() as usize;
            if i < self.count {
                break i;
            }
            self.vq.sleep(None);
        };
        self.free &= !(1 << i);
        for (k, &byte) in bytes.iter().enumerate() {
            let at = self.addr(i) as usize + k;
            // SAFETY: inside buffer i, which is free: the Host doesn't hold it.
            unsafe { core::ptr::with_exposed_provenance_mut::<u8>(at).write_volatile(byte) };
        }
        let head = self.vq.add(&[Buf::readable(self.addr(i), bytes.len())]);
        self.vq.kick();
        head.expect("a free buffer means a free descriptor")
    }

    /// Wait (until `deadline`, if any) for the Host to hand back every
    /// buffer; false if the deadline passed first.
    pub fn drain(&mut self, deadline: Option<&Deadline>) -> bool {
        loop {
            self.reclaim();
            if self.free.count_ones() as usize == self.count {
                return true;
            }
            if deadline.is_some_and(|d| d.passed()) {
                return false;
            }
            self.vq.sleep(deadline);
        }
    }
}
