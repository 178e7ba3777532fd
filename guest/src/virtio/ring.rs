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

// The layout, flags and need_event are the ABI's (shared with the Host).
use lguest_abi::vring::{need_event, ring_end, used_offset, Desc, DESC_SIZE, RING_F_EVENT_IDX};
use lguest_abi::vring::{AVAIL_F_NO_INTERRUPT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY};
use lguest_abi::{hcall as nr, VqConfig, LGUEST_IRQS, PAGE_SHIFT};

use crate::console::Error;
use crate::hcall::hcall;
use crate::time::{idle, Deadline};
use crate::{boot, err, lguest_data};

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
    pub fn new(addr: u64, len: usize, writable: bool) -> Buf {
        let len = len as u32;
        Buf {
            addr,
            len,
            writable,
        }
    }

    /// A buffer the Host reads.
    pub fn readable(addr: u64, len: usize) -> Buf {
        Buf::new(addr, len, false)
    }

    /// A buffer the Host fills.
    pub fn writable(addr: u64, len: usize) -> Buf {
        Buf::new(addr, len, true)
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

/// One ring, and what we remember about it.
pub struct Vring {
    num: u16,
    /// Where the three parts start. The descriptors' address is also the
    /// ring's: what NOTIFY gets to kick this queue.
    pub desc: u64,
    pub avail: u64,
    used: u64,
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
    /// list. `features`: those we accepted, which say whether the ring
    /// has EVENT_IDX.
    pub fn new(cfg: VqConfig, features: u32) -> Result<Vring, Error> {
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
        let (mem, limit) = (boot::mem(), lguest_data::pfn_limit() << PAGE_SHIFT);
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
            event_idx: features & 1 << RING_F_EVENT_IDX != 0,
            free_head: 0,
            num_free: num,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            cb_enabled: false,
            busy: [0; MAX_NUM / 64],
        };
        for offset in (0..ring_end(num)).step_by(2) {
            ring.set(base + offset, 0u16);
        }
        for i in 0..num {
            ring.set(ring.desc_addr(i) + 14, i.wrapping_add(1));
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

    /// Chains the Host hasn't handed back yet.
    pub fn in_flight(&self) -> u16 {
        self.busy.iter().map(|word| word.count_ones() as u16).sum()
    }

    /*
     * Raw accessors: one volatile access to an aligned field inside the
     * ring, which `new` checked lies in our device pages, mapped and ours.
     */

    fn get<T>(&self, addr: u64) -> T {
        // SAFETY: see above.
        unsafe { core::ptr::with_exposed_provenance::<T>(addr as usize).read_volatile() }
    }

    fn set<T>(&self, addr: u64, value: T) {
        // SAFETY: see above.
        unsafe { core::ptr::with_exposed_provenance_mut::<T>(addr as usize).write_volatile(value) }
    }

    fn desc_addr(&self, i: u16) -> u64 {
        assert!(i < self.num);
        self.desc + DESC_SIZE * i as u64
    }

    fn read_desc(&self, i: u16) -> Desc {
        self.get(self.desc_addr(i))
    }

    fn used_event_addr(&self) -> u64 {
        self.avail + 4 + 2 * self.num as u64
    }

    /// Flip whether the chain at `head` is in the Host's hands.
    fn flip_busy(&mut self, head: u16) {
        self.busy[head as usize / 64] ^= 1 << (head % 64);
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
        for (n, buf) in bufs.iter().enumerate() {
            let i = self.free_head;
            self.free_head = self.read_desc(i).next;
            let more = n + 1 < bufs.len();
            let flags =
                if buf.writable { DESC_F_WRITE } else { 0 } | if more { DESC_F_NEXT } else { 0 };
            let next = if more { self.free_head } else { 0 };
            let (addr, len) = (buf.addr, buf.len);
            self.set(
                self.desc_addr(i),
                Desc {
                    addr,
                    len,
                    flags,
                    next,
                },
            );
        }
        self.num_free -= bufs.len() as u16;
        self.flip_busy(head);
        // The Host must see the descriptors and the slot before the index
        // that covers them; x86 doesn't reorder stores, so it's the
        // compiler we stop.
        let slot = self.avail + 4 + 2 * (self.avail_idx & (self.num - 1)) as u64;
        self.set(slot, head);
        compiler_fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set(self.avail + 2, self.avail_idx);
        Ok(head)
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
        let wanted = match self.event_idx {
            true => need_event(self.get(self.used + 4 + 8 * self.num as u64), new, old),
            false => self.get::<u16>(self.used) & USED_F_NO_NOTIFY == 0,
        };
        if old != new && wanted {
            self.notify();
        }
    }

    /// NOTIFY the Host of this queue, whatever it asked.
    pub fn notify(&self) {
        // SAFETY: the Host only reads the ring; we are at peace with what it
        // then does to the buffers we offered.
        unsafe { hcall(nr::NOTIFY, self.desc, 0, 0, 0) };
    }

    /*
     * Taking buffers back.
     */

    /// Whether the Host has handed back chains we haven't taken.
    pub fn has_used(&self) -> bool {
        self.get::<u16>(self.used + 2) != self.last_used
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
        let (id, len) = (self.get::<u32>(entry), self.get::<u32>(entry + 4));
        let head = id as u16;
        if id >= self.num as u32 || self.busy[head as usize / 64] & 1 << (head % 64) == 0 {
            panic!(
                "virtio: the Host handed back descriptor {id}, which it doesn't hold (ring at {:#x})",
                self.desc
            );
        }
        // Find the chain's tail and put the whole chain on the free list.
        let (mut tail, mut count) = (head, 1);
        while self.read_desc(tail).flags & DESC_F_NEXT != 0 {
            tail = self.read_desc(tail).next;
            count += 1;
            assert!(count <= self.num, "virtio: our own chain from {head} loops");
        }
        self.set(self.desc_addr(tail) + 14, self.free_head);
        self.free_head = head;
        self.num_free += count;
        self.flip_busy(head);
        self.last_used = self.last_used.wrapping_add(1);
        if self.cb_enabled && self.event_idx {
            // Still want interrupts: for the entry after this one.
            self.set(self.used_event_addr(), self.last_used);
        }
        let addr = self.read_desc(head).addr;
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
        self.want_interrupt(self.last_used, 0)
    }

    /// As enable_cb, but (with EVENT_IDX) only once about three quarters of
    /// the chains in flight are back, and once: for a transmit queue, where
    /// each one back is only a buffer to reuse, one interrupt per batch will
    /// do.
    pub fn enable_cb_delayed(&mut self) -> bool {
        self.cb_enabled = !self.event_idx;
        let wait_for = self.in_flight() * 3 / 4;
        self.want_interrupt(self.last_used.wrapping_add(wait_for), 0)
    }

    /// We'll look at the used ring ourselves: no interrupts, please. (With
    /// EVENT_IDX, an event one behind us is one the Host reaches only after
    /// a full trip round the 16-bit index.)
    pub fn disable_cb(&mut self) {
        self.cb_enabled = false;
        self.want_interrupt(self.last_used.wrapping_sub(1), AVAIL_F_NO_INTERRUPT);
    }

    /// With EVENT_IDX, ask for an interrupt when the Host hands back entry
    /// `event`; without, set the avail ring's `flags`. Then whether there
    /// are used chains already: a store, then a load the Host's store must
    /// be seen by, so a real fence between them.
    fn want_interrupt(&mut self, event: u16, flags: u16) -> bool {
        match self.event_idx {
            true => self.set(self.used_event_addr(), event),
            false => self.set(self.avail, flags),
        }
        fence(Ordering::SeqCst);
        self.has_used()
    }

    /// Sleep (until `deadline`, if any) unless the Host has handed back
    /// chains, with interrupts on for the nap only (see time::idle).
    pub fn sleep(&mut self, deadline: Option<&Deadline>) {
        idle(deadline, || self.enable_cb());
        self.disable_cb();
    }
}
