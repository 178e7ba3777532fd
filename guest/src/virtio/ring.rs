//! The split virtqueue ("vring"), from the driver's side.
//!
//! A vring is three arrays in memory the Host placed for us (ABI section 8),
//! shared between us and the Host's device thread:
//!
//! ```text
//! base:                descriptors {u64 addr, u32 len, u16 flags, u16 next} x num
//! base + 16 num:       avail ring  {u16 flags, u16 idx, u16 ring[num], u16 used_event}
//! next 4096 boundary:  used ring   {u16 flags, u16 idx, {u32 id, u32 len}[num], u16 avail_event}
//! ```
//!
//! We own the descriptors and the avail ring: we chain free descriptors into
//! a buffer, put the chain's head in the avail ring and bump its index. The
//! Host owns the used ring: it hands heads back there, with how many bytes it
//! wrote. Nothing here is a Rust object: the Host reads and writes it from
//! another thread, between any two of our instructions, so every access is
//! volatile, and the order of our stores and loads is kept with fences.
//!
//! Both sides try not to bother the other. We don't NOTIFY the Host when it
//! says it will look anyway (the used ring's NO_NOTIFY flag, or with EVENT_IDX
//! its avail_event), and the Host doesn't interrupt us when we say we'll look
//! anyway (the avail ring's NO_INTERRUPT flag, or with EVENT_IDX our
//! used_event).

use core::sync::atomic::{compiler_fence, fence, Ordering};

use lguest_abi::{hcall as nr, VqConfig, LGUEST_IRQS, PAGE_SHIFT};

use crate::console::Error;
use crate::hcall::hcall;
use crate::{err, lguest_data};

// The layout, flags and need_event are the ABI's (shared with the Host).
pub use lguest_abi::vring::{
    need_event, ring_end, used_offset, Desc, AVAIL_F_NO_INTERRUPT as VRING_AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT as VRING_DESC_F_INDIRECT, DESC_F_NEXT as VRING_DESC_F_NEXT,
    DESC_F_WRITE as VRING_DESC_F_WRITE, DESC_SIZE, USED_F_NO_NOTIFY as VRING_USED_F_NO_NOTIFY,
};

/// The biggest ring we drive (the Host's are 256): `busy` is sized for it.
pub const MAX_NUM: usize = 1024;

/// One buffer of a chain we offer: where, how long, and who writes it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    /// The Host writes it (device-writable); otherwise it only reads it.
    pub writable: bool,
}

impl Buf {
    /// A buffer the Host reads.
    pub fn readable(addr: u64, len: usize) -> Buf {
        Buf {
            addr,
            len: len as u32,
            writable: false,
        }
    }

    /// A buffer the Host fills.
    pub fn writable(addr: u64, len: usize) -> Buf {
        Buf {
            addr,
            len: len as u32,
            writable: true,
        }
    }
}

/// A chain the Host handed back.
#[derive(Clone, Copy, Debug)]
pub struct Used {
    /// The chain's first descriptor.
    pub head: u16,
    /// Bytes the Host wrote into the chain's writable buffers.
    pub len: u32,
    /// The address of the chain's first buffer: drivers tell their buffers
    /// apart by it, so we need no table of our own.
    pub addr: u64,
}

/// The ring has too few free descriptors for the chain.
#[derive(Clone, Copy, Debug)]
pub struct Full;

/// A pointer into ring memory (virtual == physical here).
fn at<T>(addr: u64) -> *mut T {
    core::ptr::with_exposed_provenance_mut(addr as usize)
}

/// One ring, and what we remember about it.
pub struct Vring {
    num: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// What NOTIFY gets to kick this queue: the ring's address.
    kick_addr: u64,
    event_idx: bool,
    /// The free descriptors are chained through their `next` fields.
    free_head: u16,
    num_free: u16,
    /// Our copy of the avail index: we never read back what the Host can't
    /// change anyway.
    avail_idx: u16,
    /// The avail index at the last kick, for avail_event.
    kicked_idx: u16,
    /// The next used entry we will look at.
    last_used: u16,
    /// Chains the Host has and hasn't handed back.
    in_flight: u16,
    /// Whether we want an interrupt per used chain (see enable_cb).
    cb_enabled: bool,
    /// Heads of chains in the Host's hands: a Host that hands back anything
    /// else is broken, and we would rather say so than corrupt our free list.
    busy: [u64; MAX_NUM / 64],
}

impl Vring {
    /// Take over the ring the Host described in `cfg`: check it lies where
    /// device pages may (from `mem` to pfn_limit), zero it (after a reset the
    /// Host leaves it as it was), and chain every descriptor into the free
    /// list. `event_idx`: whether EVENT_IDX was accepted.
    pub fn new(cfg: VqConfig, event_idx: bool) -> Result<Vring, Error> {
        let (num, irq, pfn) = (cfg.num, cfg.irq, cfg.pfn);
        if num == 0 || !num.is_power_of_two() || num as usize > MAX_NUM {
            return Err(err!(
                "ring of {num} entries (must be a power of 2 up to {MAX_NUM})"
            ));
        }
        if irq == 0 || irq as u32 >= LGUEST_IRQS {
            return Err(err!("ring with IRQ {irq} (must be 1-{})", LGUEST_IRQS - 1));
        }
        let base = (pfn as u64) << PAGE_SHIFT;
        let mem = crate::boot::mem();
        let limit = lguest_data::pfn_limit() << PAGE_SHIFT;
        if base < mem || base + ring_end(num) > limit {
            return Err(err!(
                "ring at {base:#x} is not in the device pages [{mem:#x}, {limit:#x})"
            ));
        }
        let mut ring = Vring {
            num,
            desc: base,
            avail: base + DESC_SIZE * num as u64,
            used: base + used_offset(num),
            kick_addr: base,
            event_idx,
            free_head: 0,
            num_free: num,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            in_flight: 0,
            cb_enabled: false,
            busy: [0; MAX_NUM / 64],
        };
        for offset in (0..ring_end(num)).step_by(2) {
            // SAFETY: inside the ring, checked above to be device pages
            // below pfn_limit, mapped and ours; 2-aligned from a page base.
            unsafe { at::<u16>(base + offset).write_volatile(0) };
        }
        for i in 0..num {
            ring.set_next(i, i.wrapping_add(1));
        }
        // Until a driver asks, we want no interrupts: it looks at the used
        // ring when it is ready to.
        ring.disable_cb();
        Ok(ring)
    }

    pub fn num(&self) -> u16 {
        self.num
    }

    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Where the descriptor table and the avail ring start.
    pub fn areas(&self) -> (u64, u64) {
        (self.desc, self.avail)
    }

    /// Chains the Host hasn't handed back yet.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /*
     * Raw accessors. Each is one volatile access to an aligned field inside
     * the ring, which `new` checked lies in our device pages.
     */

    fn desc_addr(&self, i: u16) -> u64 {
        debug_assert!(i < self.num);
        self.desc + DESC_SIZE * i as u64
    }

    fn read_desc(&self, i: u16) -> Desc {
        // SAFETY: see above; a 16-byte aligned descriptor slot.
        unsafe { at::<Desc>(self.desc_addr(i)).read_volatile() }
    }

    fn write_desc_raw(&self, i: u16, d: Desc) {
        // SAFETY: see above.
        unsafe { at::<Desc>(self.desc_addr(i)).write_volatile(d) }
    }

    fn set_next(&self, i: u16, next: u16) {
        // SAFETY: see above: the `next` field of descriptor i.
        unsafe { at::<u16>(self.desc_addr(i) + 14).write_volatile(next) }
    }

    fn read16(&self, addr: u64) -> u16 {
        // SAFETY: see above.
        unsafe { at::<u16>(addr).read_volatile() }
    }

    fn write16(&self, addr: u64, value: u16) {
        // SAFETY: see above.
        unsafe { at::<u16>(addr).write_volatile(value) }
    }

    fn read32(&self, addr: u64) -> u32 {
        // SAFETY: see above.
        unsafe { at::<u32>(addr).read_volatile() }
    }

    fn avail_slot(&self, idx: u16) -> u64 {
        self.avail + 4 + 2 * (idx & (self.num - 1)) as u64
    }

    fn used_event_addr(&self) -> u64 {
        self.avail + 4 + 2 * self.num as u64
    }

    fn avail_event_addr(&self) -> u64 {
        self.used + 4 + 8 * self.num as u64
    }

    fn used_idx(&self) -> u16 {
        self.read16(self.used + 2)
    }

    fn is_busy(&self, head: u16) -> bool {
        self.busy[head as usize / 64] & 1 << (head % 64) != 0
    }

    fn set_busy(&mut self, head: u16, busy: bool) {
        let bit = 1 << (head % 64);
        if busy {
            self.busy[head as usize / 64] |= bit;
        } else {
            self.busy[head as usize / 64] &= !bit;
        }
    }

    /*
     * Offering buffers.
     */

    /// Offer `bufs` as one chain: take descriptors from the free list, fill
    /// them, and publish the head in the avail ring. The Host may take it at
    /// once, but need not until `kick`. Returns the head.
    /*G:510 A driver offers buffers: descriptors chained, the head in the
     * avail ring, then (unless the Host said it will look anyway) NOTIFY
     * with the ring's address, which lands in D:500. */
    pub fn add(&mut self, bufs: &[Buf]) -> Result<u16, Full> {
        assert!(!bufs.is_empty(), "an empty chain");
        if bufs.len() > self.num_free as usize {
            return Err(Full);
        }
        let head = self.free_head;
        let mut i = head;
        for (n, buf) in bufs.iter().enumerate() {
            let next_free = self.read_desc(i).next;
            let more = n + 1 < bufs.len();
            let mut flags = if buf.writable { VRING_DESC_F_WRITE } else { 0 };
            if more {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc_raw(
                i,
                Desc {
                    addr: buf.addr,
                    len: buf.len,
                    flags,
                    next: if more { next_free } else { 0 },
                },
            );
            i = next_free;
        }
        self.free_head = i;
        self.num_free -= bufs.len() as u16;
        self.in_flight += 1;
        self.set_busy(head, true);
        self.publish(head);
        Ok(head)
    }

    /// Put `head` in the next avail slot and bump the index over it. The Host
    /// must see the descriptors and the slot before the index that covers
    /// them; x86 doesn't reorder stores, so it's the compiler we stop.
    fn publish(&mut self, head: u16) {
        self.write16(self.avail_slot(self.avail_idx), head);
        compiler_fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write16(self.avail + 2, self.avail_idx);
    }

    /// Tell the Host about what we added since the last kick, unless it said
    /// it will look anyway. The first kick after setup always goes out: it
    /// is what starts the queue.
    pub fn kick(&mut self) {
        // We stored the avail index and now load what the Host asked for:
        // the one reordering x86 does allow, so this takes a real fence.
        fence(Ordering::SeqCst);
        let (old, new) = (self.kicked_idx, self.avail_idx);
        self.kicked_idx = new;
        if old == new {
            return;
        }
        let wanted = if self.event_idx {
            need_event(self.read16(self.avail_event_addr()), new, old)
        } else {
            self.read16(self.used) & VRING_USED_F_NO_NOTIFY == 0
        };
        if wanted {
            self.notify();
        }
    }

    /// NOTIFY the Host of this queue, whatever it asked.
    pub fn notify(&self) {
        // SAFETY: the Host only reads the ring; we are at peace with what it
        // then does to the buffers we offered.
        unsafe { hcall(nr::NOTIFY, self.kick_addr, 0, 0, 0) };
    }

    /*
     * Taking buffers back.
     */

    /// Whether the Host has handed back chains we haven't taken.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Take the next chain the Host handed back, and free its descriptors.
    /*G:560 And back: the Host put the head in the used ring and raised the
     * queue's IRQ; the handler takes it from here. */
    pub fn get_used(&mut self) -> Option<Used> {
        if !self.has_used() {
            return None;
        }
        // The Host wrote the entry before the index we just read; x86 keeps
        // loads in order, so again it's only the compiler we stop.
        compiler_fence(Ordering::SeqCst);
        let entry = self.used + 4 + 8 * (self.last_used & (self.num - 1)) as u64;
        let id = self.read32(entry);
        let len = self.read32(entry + 4);
        if id >= self.num as u32 || !self.is_busy(id as u16) {
            panic!(
                "virtio: the Host handed back descriptor {id}, which it doesn't hold (ring at {:#x})",
                self.desc
            );
        }
        let head = id as u16;
        let addr = self.read_desc(head).addr;
        // Find the chain's tail and put the whole chain on the free list.
        let mut tail = head;
        let mut count = 1;
        loop {
            let d = self.read_desc(tail);
            if d.flags & VRING_DESC_F_NEXT == 0 {
                break;
            }
            tail = d.next;
            count += 1;
            assert!(count <= self.num, "virtio: our own chain from {head} loops");
        }
        self.set_next(tail, self.free_head);
        self.free_head = head;
        self.num_free += count;
        self.in_flight -= 1;
        self.set_busy(head, false);
        self.last_used = self.last_used.wrapping_add(1);
        if self.cb_enabled && self.event_idx {
            // Still want interrupts: for the entry after this one.
            self.write16(self.used_event_addr(), self.last_used);
        }
        Some(Used { head, len, addr })
    }

    /*
     * Interrupts. A driver that is about to sleep waiting for the Host
     * enables them, then checks the used ring once more: the Host may have
     * handed something back before it saw our request, and would then not
     * interrupt.
     */

    /// Ask for an interrupt at the next used chain. Returns true if there
    /// are used chains already, so the caller shouldn't sleep.
    pub fn enable_cb(&mut self) -> bool {
        self.cb_enabled = true;
        if self.event_idx {
            self.write16(self.used_event_addr(), self.last_used);
        } else {
            self.write16(self.avail, 0);
        }
        // A store, then a load the Host's store must be seen by: a real fence.
        fence(Ordering::SeqCst);
        self.has_used()
    }

    /// As enable_cb, but (with EVENT_IDX) only once about three quarters of
    /// the chains in flight are back: for a transmit queue, where each one
    /// back is only a buffer to reuse, one interrupt per batch will do.
    pub fn enable_cb_delayed(&mut self) -> bool {
        if !self.event_idx {
            return self.enable_cb();
        }
        // One-shot: get_used leaves used_event alone.
        self.cb_enabled = false;
        let wait_for = self.in_flight * 3 / 4;
        self.write16(
            self.used_event_addr(),
            self.last_used.wrapping_add(wait_for),
        );
        fence(Ordering::SeqCst);
        self.has_used()
    }

    /// We'll look at the used ring ourselves: no interrupts, please. (With
    /// EVENT_IDX, an event one behind us is one the Host reaches only after
    /// a full trip round the 16-bit index.)
    pub fn disable_cb(&mut self) {
        self.cb_enabled = false;
        if self.event_idx {
            self.write16(self.used_event_addr(), self.last_used.wrapping_sub(1));
        } else {
            self.write16(self.avail, VRING_AVAIL_F_NO_INTERRUPT);
        }
    }
}
