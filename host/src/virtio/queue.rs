//! A legacy split virtqueue, walked from the device side.
//!
//! Everything in the ring is written by the Guest, so nothing is trusted: the
//! avail index may not run more than `num` ahead of us, every descriptor index
//! must be in range, a chain may not revisit a descriptor or be longer than
//! the ring (indirect tables included), and every buffer must lie in Guest
//! memory. Any breach is a [`QueueError`] naming the rule, whose text becomes
//! the Sudden Death reason.
//!
//! ```text
//! base:                 descriptors   {u64 addr, u32 len, u16 flags, u16 next} x num
//! base + 16 num:        avail ring    {u16 flags, u16 idx, u16 ring[num], u16 used_event}
//! next 4096 boundary:   used ring     {u16 flags, u16 idx, {u32 id, u32 len}[num], u16 avail_event}
//! ```

use crate::memory::{GuestMemory, OutOfBounds};
use lguest_abi::vring::{
    AVAIL_F_NO_INTERRUPT as VRING_AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT as VRING_DESC_F_INDIRECT,
    DESC_F_NEXT as VRING_DESC_F_NEXT, DESC_F_WRITE as VRING_DESC_F_WRITE,
    F_NOTIFY_ON_EMPTY as VIRTIO_F_NOTIFY_ON_EMPTY, RING_F_EVENT_IDX as VIRTIO_RING_F_EVENT_IDX,
    RING_F_INDIRECT_DESC as VIRTIO_RING_F_INDIRECT_DESC,
    USED_F_NO_NOTIFY as VRING_USED_F_NO_NOTIFY,
};
use std::sync::atomic::{fence, Ordering};
use zerocopy::FromBytes;

pub use lguest_abi::vring::{area_sizes, ring_bytes};
use lguest_abi::vring::{need_event, used_offset, Desc, DESC_SIZE};

/// A ring rule the Guest broke: one variant per rule.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The avail index ran more than the ring holds ahead of what we took.
    #[error("avail index jumped from {from} to {to} (ring of {num})")]
    AvailJumped { from: u16, to: u16, num: u16 },
    /// A descriptor index (a head, or a `next`) past the end of the table.
    #[error("descriptor index {index} out of range (ring of {num})")]
    IndexOutOfRange { index: u16, num: u16 },
    /// A chain that took more steps than the table has descriptors.
    #[error("descriptor chain from {head} loops")]
    Loops { head: u16 },
    /// More buffers in one chain than the ring has entries.
    #[error("descriptor chain from {head} is longer than the ring ({num})")]
    TooLong { head: u16, num: u16 },
    /// A buffer that is not wholly Guest memory.
    #[error("descriptor {index} buffer: {source}")]
    Buffer { index: u16, source: OutOfBounds },
    /// VRING_DESC_F_INDIRECT without having accepted INDIRECT_DESC.
    #[error("indirect descriptor {index} without INDIRECT_DESC")]
    IndirectNotAccepted { index: u16 },
    /// An indirect table of no descriptors, or of part of one.
    #[error("indirect descriptor {index} has bad length {len}")]
    IndirectLength { index: u16, len: u32 },
    /// An indirect table that is not wholly Guest memory.
    #[error("indirect table of descriptor {index}: {source}")]
    IndirectOutside { index: u16, source: OutOfBounds },
    /// An indirect table with more descriptors than the ring has entries.
    #[error("descriptor chain through indirect table {index} is longer than the ring ({num})")]
    IndirectTooLong { index: u16, num: u16 },
    /// A chain inside an indirect table that loops, or points out of it.
    #[error("indirect table of descriptor {index}: chain loops or leaves it at {at}")]
    IndirectLoops { index: u16, at: u16 },
    /// An indirect descriptor inside an indirect table.
    #[error("indirect table of descriptor {index} nests another")]
    IndirectNested { index: u16 },
    /// The ring itself is not Guest memory (a transport let it through).
    #[error(transparent)]
    Ring(#[from] OutOfBounds),
}

/// One buffer of a chain, checked to lie in Guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (the Guest reads it back).
    pub writable: bool,
}

/// A descriptor chain taken from the avail ring.
#[derive(Debug, Default)]
pub struct Chain {
    pub head: u16,
    pub buffers: Vec<Buffer>,
}

impl Chain {
    pub fn readable(&self) -> impl Iterator<Item = &Buffer> {
        self.buffers.iter().filter(|b| !b.writable)
    }
    pub fn writable(&self) -> impl Iterator<Item = &Buffer> {
        self.buffers.iter().filter(|b| b.writable)
    }
}

/// The negotiated ring features that change how we walk and signal.
#[derive(Clone, Copy, Debug, Default)]
pub struct RingFeatures {
    pub event_idx: bool,
    pub indirect: bool,
    pub notify_on_empty: bool,
}

impl RingFeatures {
    /// The ring features among negotiated feature bits.
    pub fn from_bits(features: u64) -> RingFeatures {
        let bit = |b: u32| features & (1 << b) != 0;
        RingFeatures {
            event_idx: bit(VIRTIO_RING_F_EVENT_IDX),
            indirect: bit(VIRTIO_RING_F_INDIRECT_DESC),
            notify_on_empty: bit(VIRTIO_F_NOTIFY_ON_EMPTY),
        }
    }
}

pub struct Queue {
    num: u16,
    desc: u64,
    avail: u64,
    used: u64,
    features: RingFeatures,
    /// Next avail entry we will take.
    next_avail: u16,
    /// Next used entry we will fill.
    next_used: u16,
    /// The used index at our last interrupt decision (for EVENT_IDX).
    signalled_used: u16,
    /// Whether we want the Guest to kick us when it adds buffers.
    kicks_wanted: bool,
    /// With EVENT_IDX, the avail_event we last wrote: the Guest kicks when
    /// it adds the entry after it.
    avail_event: Option<u16>,
}

impl Queue {
    /// A legacy queue of `num` entries whose ring starts at `base`.
    pub fn new(num: u16, base: u64, features: RingFeatures) -> Queue {
        let avail = base + DESC_SIZE * num as u64;
        Queue::with_areas(num, [base, avail, base + used_offset(num)], features)
    }

    /// A queue whose three areas (descriptors, avail ring, used ring) the
    /// driver placed where it liked, as modern transports allow.
    pub fn with_areas(num: u16, [desc, avail, used]: [u64; 3], features: RingFeatures) -> Queue {
        Queue {
            num,
            desc,
            avail,
            used,
            features,
            next_avail: 0,
            next_used: 0,
            signalled_used: 0,
            kicks_wanted: true,
            avail_event: None,
        }
    }

    fn read_u16(mem: &GuestMemory, addr: u64) -> Result<u16, QueueError> {
        let mut b = [0u8; 2];
        mem.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn write_u16(mem: &GuestMemory, addr: u64, v: u16) -> Result<(), QueueError> {
        Ok(mem.write(addr, &v.to_le_bytes())?)
    }

    fn avail_idx(&self, mem: &GuestMemory) -> Result<u16, QueueError> {
        Self::read_u16(mem, self.avail + 2)
    }

    /// Takes the next available chain, if any.
    ///
    /// With EVENT_IDX we ask for a kick only when we find the ring empty,
    /// as vhost does: while we work through it, the Guest adding more needs
    /// no exit to tell us, since we will look anyway. Asking, we look once
    /// more, for an entry added before the Guest could see the wish.
    /*D:520 Taking a chain the Guest offered. Every byte of the ring is the
     * Guest's, written a moment ago or written to fool us, so each is
     * checked on the way: the avail index may run at most a ring ahead,
     * every head and `next` must be in the table, a chain may not loop or
     * outgrow the ring, and every buffer must lie in Guest memory. A breach
     * is a QueueError, whose text becomes the Sudden Death reason. */
    pub fn pop(&mut self, mem: &GuestMemory) -> Result<Option<Chain>, QueueError> {
        let mut idx = self.avail_idx(mem)?;
        if idx == self.next_avail && self.arm_kicks(mem)? {
            idx = self.avail_idx(mem)?;
        }
        let waiting = idx.wrapping_sub(self.next_avail);
        if waiting > self.num {
            return Err(QueueError::AvailJumped {
                from: self.next_avail,
                to: idx,
                num: self.num,
            });
        }
        if waiting == 0 {
            return Ok(None);
        }
        // Read the entry only after seeing the index that covers it.
        fence(Ordering::Acquire);
        let slot = self.avail + 4 + 2 * (self.next_avail % self.num) as u64;
        let head = Self::read_u16(mem, slot)?;
        let chain = self.walk(mem, head)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(chain))
    }

    /// With EVENT_IDX and kicks wanted: asks for a kick at the next entry
    /// the Guest adds, unless we already have. True if we just did (the
    /// caller then looks at the ring again).
    fn arm_kicks(&mut self, mem: &GuestMemory) -> Result<bool, QueueError> {
        if !self.features.event_idx
            || !self.kicks_wanted
            || self.avail_event == Some(self.next_avail)
        {
            return Ok(false);
        }
        self.publish_kick_wish(mem)?;
        Ok(true)
    }

    /// Asks the Guest to kick us when it adds buffers, or not to: a device
    /// that will look at the ring anyway when it has something to put in it
    /// (console input) saves the Guest an exit per buffer.
    pub fn want_kicks(&mut self, mem: &GuestMemory, wanted: bool) -> Result<(), QueueError> {
        if self.kicks_wanted != wanted {
            self.kicks_wanted = wanted;
            self.publish_kick_wish(mem)?;
        }
        Ok(())
    }

    /// With EVENT_IDX, avail_event says after which entry to kick us (one
    /// behind what we have taken means all but never: a Guest that kicked
    /// past it reaches it again only after a trip round the 16-bit index);
    /// without it, the
    /// used ring's NO_NOTIFY flag says whether to. The full fence orders
    /// this store before our next load of the avail index, or a Guest adding
    /// an entry right now could miss it and not kick, while we miss the
    /// entry.
    fn publish_kick_wish(&mut self, mem: &GuestMemory) -> Result<(), QueueError> {
        if self.features.event_idx {
            let event = if self.kicks_wanted {
                self.next_avail
            } else {
                self.next_avail.wrapping_sub(1)
            };
            Self::write_u16(mem, self.used + 4 + 8 * self.num as u64, event)?;
            self.avail_event = Some(event);
        } else {
            let flags = if self.kicks_wanted {
                0
            } else {
                VRING_USED_F_NO_NOTIFY
            };
            Self::write_u16(mem, self.used, flags)?;
        }
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Follows a chain from `head`, through one level of indirect table.
    fn walk(&self, mem: &GuestMemory, head: u16) -> Result<Chain, QueueError> {
        let mut chain = Chain {
            head,
            buffers: Vec::new(),
        };
        // A chain through a table of `num` descriptors that takes more than
        // `num` steps has revisited one: that is how a loop shows.
        let mut steps = 0u32;
        let mut index = head;
        loop {
            let num = self.num;
            if index >= num {
                return Err(QueueError::IndexOutOfRange { index, num });
            }
            steps += 1;
            if steps > num as u32 {
                return Err(QueueError::Loops { head });
            }
            let Desc {
                addr,
                len,
                flags,
                next,
            } = read_desc(mem, self.desc + DESC_SIZE * index as u64)?;
            if flags & VRING_DESC_F_INDIRECT != 0 {
                if !self.features.indirect {
                    return Err(QueueError::IndirectNotAccepted { index });
                }
                self.walk_indirect(mem, index, addr, len, &mut chain)?;
            } else {
                chain
                    .buffers
                    .push(check_buffer(mem, index, addr, len, flags)?);
            }
            if chain.buffers.len() > num as usize {
                return Err(QueueError::TooLong { head, num });
            }
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            index = next;
        }
    }

    fn walk_indirect(
        &self,
        mem: &GuestMemory,
        index: u16,
        table: u64,
        len: u32,
        chain: &mut Chain,
    ) -> Result<(), QueueError> {
        if len == 0 || !(len as u64).is_multiple_of(DESC_SIZE) {
            return Err(QueueError::IndirectLength { index, len });
        }
        mem.check(table, len as u64)
            .map_err(|source| QueueError::IndirectOutside { index, source })?;
        let count = len as u64 / DESC_SIZE;
        if count > self.num as u64 {
            return Err(QueueError::IndirectTooLong {
                index,
                num: self.num,
            });
        }
        let (mut i, mut steps) = (0u16, 0u64);
        loop {
            steps += 1;
            if i as u64 >= count || steps > count {
                return Err(QueueError::IndirectLoops { index, at: i });
            }
            let Desc {
                addr,
                len,
                flags,
                next,
            } = read_desc(mem, table + DESC_SIZE * i as u64)?;
            if flags & VRING_DESC_F_INDIRECT != 0 {
                return Err(QueueError::IndirectNested { index });
            }
            chain.buffers.push(check_buffer(mem, i, addr, len, flags)?);
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(());
            }
            i = next;
        }
    }

    /// Returns a chain to the Guest with `len` bytes written into it.
    /// Returns whether the Guest wants an interrupt for it now.
    pub fn push(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<bool, QueueError> {
        self.add_used(mem, head, len)?;
        self.needs_interrupt(mem)
    }

    /// Returns a chain to the Guest without deciding on an interrupt yet:
    /// a batch of them ends with [`Queue::needs_interrupt`].
    pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<(), QueueError> {
        let slot = self.used + 4 + 8 * (self.next_used % self.num) as u64;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&(head as u32).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(slot, &elem)?;
        // The entry must be visible before the index that publishes it.
        fence(Ordering::Release);
        self.next_used = self.next_used.wrapping_add(1);
        Self::write_u16(mem, self.used + 2, self.next_used)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Whether the Guest says exactly when it wants to hear of used buffers
    /// (EVENT_IDX), so a device may tell it in the middle of a batch.
    pub fn event_idx(&self) -> bool {
        self.features.event_idx
    }

    /// Interrupt suppression: EVENT_IDX's used_event if negotiated, else the
    /// avail ring's NO_INTERRUPT flag; NOTIFY_ON_EMPTY overrides both when we
    /// have consumed everything.
    pub fn needs_interrupt(&mut self, mem: &GuestMemory) -> Result<bool, QueueError> {
        let old = self.signalled_used;
        let new = self.next_used;
        if self.features.notify_on_empty && self.avail_idx(mem)? == self.next_avail {
            self.signalled_used = new;
            return Ok(true);
        }
        // Like vhost: the next check counts from this one, signalled or not.
        self.signalled_used = new;
        if self.features.event_idx {
            let used_event = Self::read_u16(mem, self.avail + 4 + 2 * self.num as u64)?;
            // Did [old, new) just pass used_event?
            Ok(need_event(used_event, new, old))
        } else {
            Ok(Self::read_u16(mem, self.avail)? & VRING_AVAIL_F_NO_INTERRUPT == 0)
        }
    }
}

/// One descriptor, as the ABI crate lays it out (little-endian, as is the
/// Host).
fn read_desc(mem: &GuestMemory, at: u64) -> Result<Desc, QueueError> {
    let mut d = [0u8; DESC_SIZE as usize];
    mem.read(at, &mut d)?;
    Ok(Desc::read_from_bytes(&d).expect("a descriptor is DESC_SIZE bytes"))
}

fn check_buffer(
    mem: &GuestMemory,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
) -> Result<Buffer, QueueError> {
    mem.check(addr, len as u64)
        .map_err(|source| QueueError::Buffer { index, source })?;
    Ok(Buffer {
        addr,
        len,
        writable: flags & VRING_DESC_F_WRITE != 0,
    })
}

/// Copies `data` into the chain's writable buffers, in order; returns how
/// many bytes fit.
pub fn write_to_chain(mem: &GuestMemory, chain: &Chain, mut data: &[u8]) -> u32 {
    let mut written = 0;
    for b in chain.writable() {
        if data.is_empty() {
            break;
        }
        let n = data.len().min(b.len as usize);
        mem.write(b.addr, &data[..n]).expect("checked by the walk");
        written += n as u32;
        data = &data[n..];
    }
    written
}

/// Passes the chain's readable bytes to `f` in order, in pieces of at most
/// `chunk.len()` bytes, stopping after `max` bytes. Memory stays bounded
/// whatever lengths the Guest wrote (buffers may overlap). Returns the bytes
/// passed.
pub fn stream_from_chain(
    mem: &GuestMemory,
    chain: &Chain,
    chunk: &mut [u8],
    max: u64,
    mut f: impl FnMut(&[u8]),
) -> u64 {
    let mut total = 0u64;
    for b in chain.readable() {
        let mut done = 0u64;
        while done < b.len as u64 && total < max {
            let n = (b.len as u64 - done)
                .min(chunk.len() as u64)
                .min(max - total) as usize;
            mem.read(b.addr + done, &mut chunk[..n])
                .expect("checked by the walk");
            f(&chunk[..n]);
            done += n as u64;
            total += n as u64;
        }
    }
    total
}

/// Bytes in the chain's readable buffers (saturating: the Guest chose them).
pub fn readable_len(chain: &Chain) -> u64 {
    chain
        .readable()
        .fold(0u64, |n, b| n.saturating_add(b.len as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Layout;

    const NUM: u16 = 8;
    const BASE: u64 = 0x10000;

    fn mem() -> GuestMemory {
        GuestMemory::new(Layout {
            mem: 1 << 20,
            pfn_limit: 256,
            mmio_hole_pages: 0,
            host_ro_pages: 1,
            host_rw_pages: 1,
        })
        .unwrap()
    }

    fn desc(m: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = BASE + 16 * i as u64;
        m.write_u64(at, addr).unwrap();
        m.write_u32(at + 8, len).unwrap();
        m.write(at + 12, &(flags).to_le_bytes()).unwrap();
        m.write(at + 14, &next.to_le_bytes()).unwrap();
    }

    fn offer(m: &GuestMemory, q: &Queue, slot: u16, head: u16, idx: u16) {
        m.write(q.avail + 4 + 2 * slot as u64, &head.to_le_bytes())
            .unwrap();
        m.write(q.avail + 2, &idx.to_le_bytes()).unwrap();
    }

    #[test]
    fn layout_is_the_legacy_one() {
        assert_eq!(used_offset(256), 8192);
        assert_eq!(ring_bytes(256), 12288);
    }

    #[test]
    fn takes_a_chain_and_returns_it() {
        let m = mem();
        let mut q = Queue::new(NUM, BASE, RingFeatures::default());
        assert!(q.pop(&m).unwrap().is_none());
        desc(&m, 0, 0x2000, 16, VRING_DESC_F_NEXT, 1);
        desc(&m, 1, 0x3000, 100, VRING_DESC_F_WRITE, 0);
        offer(&m, &q, 0, 0, 1);
        let c = q.pop(&m).unwrap().unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.readable().count(), 1);
        assert_eq!(c.writable().next().unwrap().len, 100);
        assert!(q.push(&m, 0, 42).unwrap());
        assert_eq!(Queue::read_u16(&m, q.used + 2).unwrap(), 1);
        assert_eq!(m.read_u32(q.used + 8).unwrap(), 42);
        // NO_INTERRUPT suppresses the next one.
        m.write(q.avail, &1u16.to_le_bytes()).unwrap();
        offer(&m, &q, 1, 1, 2);
        q.pop(&m).unwrap().unwrap();
        assert!(!q.push(&m, 1, 0).unwrap());
    }

    /// With EVENT_IDX, a device working through the ring leaves avail_event
    /// alone (the Guest need not kick a device that will look anyway), and
    /// asks for a kick at the next entry when it finds the ring empty.
    #[test]
    fn kicks_are_asked_for_only_when_the_ring_runs_dry() {
        let m = mem();
        let features = RingFeatures {
            event_idx: true,
            ..Default::default()
        };
        let mut q = Queue::new(NUM, BASE, features);
        let at = q.used + 4 + 8 * NUM as u64;
        let avail_event = || Queue::read_u16(&m, at).unwrap();
        Queue::write_u16(&m, at, 0xBEEF).unwrap();
        desc(&m, 0, 0x2000, 16, 0, 0);
        desc(&m, 1, 0x2000, 16, 0, 0);
        offer(&m, &q, 0, 0, 1);
        offer(&m, &q, 1, 1, 2);
        assert!(q.pop(&m).unwrap().is_some());
        assert!(q.pop(&m).unwrap().is_some());
        assert_eq!(avail_event(), 0xBEEF, "asked for kicks while busy");
        assert!(q.pop(&m).unwrap().is_none());
        assert_eq!(avail_event(), 2, "kick me at the entry after the last");
        // Not wanted: all but never (one behind), and left so.
        q.want_kicks(&m, false).unwrap();
        assert_eq!(avail_event(), 1);
        offer(&m, &q, 2, 0, 3);
        assert!(q.pop(&m).unwrap().is_some());
        assert!(q.pop(&m).unwrap().is_none());
        assert_eq!(avail_event(), 1);
        q.want_kicks(&m, true).unwrap();
        assert_eq!(avail_event(), 3);
    }

    /// With EVENT_IDX the Guest names the used entry it wants to hear of,
    /// and hears of that one, even in the middle of a batch.
    #[test]
    fn the_guest_hears_at_its_used_event() {
        let m = mem();
        let features = RingFeatures {
            event_idx: true,
            ..Default::default()
        };
        let mut q = Queue::new(NUM, BASE, features);
        // used_event 2: interrupt once the third buffer is back.
        Queue::write_u16(&m, q.avail + 4 + 2 * NUM as u64, 2).unwrap();
        let heard: Vec<bool> = (0..5)
            .map(|head| {
                q.add_used(&m, head, 0).unwrap();
                q.needs_interrupt(&m).unwrap()
            })
            .collect();
        assert_eq!(heard, [false, false, true, false, false]);
    }

    #[test]
    fn hostile_rings_are_refused_with_a_reason() {
        let m = mem();
        let limit = m.layout.guest_limit();
        type Setup<'a> = Box<dyn Fn(&GuestMemory, &Queue) + 'a>;
        let cases: Vec<(Setup, &str)> = vec![
            (
                Box::new(move |m, q| {
                    desc(m, 0, limit, 16, 0, 0);
                    offer(m, q, 0, 0, 1)
                }),
                "outside guest memory",
            ),
            (
                Box::new(|m, q| {
                    desc(m, 0, 0x2000, 16, VRING_DESC_F_NEXT, 1);
                    desc(m, 1, 0x2000, 16, VRING_DESC_F_NEXT, 0);
                    offer(m, q, 0, 0, 1)
                }),
                "loops",
            ),
            (Box::new(|m, q| offer(m, q, 0, 300, 1)), "out of range"),
            (
                Box::new(|m, q| offer(m, q, 0, 0, 1000)),
                "avail index jumped",
            ),
        ];
        for (setup, want) in cases {
            let m2 = mem();
            let mut q = Queue::new(NUM, BASE, RingFeatures::default());
            setup(&m2, &q);
            let err = q.pop(&m2).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
        drop(m);
    }

    #[test]
    fn overlapping_buffers_cannot_make_us_allocate_or_copy_without_bound() {
        // Eight descriptors, each the whole of Guest memory: 8 MiB claimed.
        let m = mem();
        let mut q = Queue::new(NUM, BASE, RingFeatures::default());
        for i in 0..NUM {
            let flags = if i + 1 < NUM { VRING_DESC_F_NEXT } else { 0 };
            desc(&m, i, 0, 1 << 20, flags, i + 1);
        }
        offer(&m, &q, 0, 0, 1);
        let chain = q.pop(&m).unwrap().unwrap();
        assert_eq!(readable_len(&chain), 8 << 20);
        let mut chunk = [0u8; 512];
        let mut seen = 0u64;
        let total = stream_from_chain(&m, &chain, &mut chunk, 3 << 20, |b| seen += b.len() as u64);
        assert_eq!((total, seen), (3 << 20, 3 << 20));
    }

    #[test]
    fn indirect_tables_are_walked_and_bounded() {
        let m = mem();
        let features = RingFeatures {
            indirect: true,
            ..Default::default()
        };
        // A table of 3 at 0x5000.
        for i in 0..3u64 {
            let at = 0x5000 + 16 * i;
            m.write_u64(at, 0x6000 + i * 0x100).unwrap();
            m.write_u32(at + 8, 8).unwrap();
            let flags = if i < 2 {
                VRING_DESC_F_NEXT
            } else {
                VRING_DESC_F_WRITE
            };
            m.write(at + 12, &(flags).to_le_bytes()).unwrap();
            m.write(at + 14, &(i + 1).to_le_bytes()).unwrap();
        }
        let mut q = Queue::new(NUM, BASE, features);
        desc(&m, 0, 0x5000, 48, VRING_DESC_F_INDIRECT, 0);
        offer(&m, &q, 0, 0, 1);
        let c = q.pop(&m).unwrap().unwrap();
        assert_eq!(c.buffers.len(), 3);
        assert!(c.buffers[2].writable);

        // A table longer than the ring.
        let mut q = Queue::new(NUM, BASE, features);
        desc(
            &m,
            0,
            0x5000,
            16 * (NUM as u32 + 1),
            VRING_DESC_F_INDIRECT,
            0,
        );
        offer(&m, &q, 0, 0, 1);
        let err = q.pop(&m).unwrap_err();
        assert!(
            matches!(err, QueueError::IndirectTooLong { index: 0, num: NUM }),
            "{err}"
        );
        assert!(err.to_string().contains("longer than the ring"));
    }
}
