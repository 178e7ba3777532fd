//! A network of the 2007 model, as lguest_net.c drove it. There is no
//! switch: the net entry's page is shared by everyone on the network (the
//! Launcher is slot 0, bridging to its tap), and holds a 6-byte MAC per
//! slot at `page + 6 * slot`; slot n's key is `page + 4 * n`. Our slot is
//! in the entry's features.
//!
//! To receive, we bind buffers at our own key and publish our MAC in our
//! slot. To send, we look at every slot ourselves and send the frame to
//! each that wants it: the one whose MAC it is for, every one for a
//! broadcast or multicast frame, and every promiscuous one (bit 0 of its
//! MAC's first byte set, which no real MAC has).

use core::sync::atomic::{compiler_fence, Ordering};

use lguest_abi::LGUEST_NET_SLOT_MASK;
use lguest_abi::{DmaDeviceDesc, LguestDma, PAGE_SHIFT, PAGE_SIZE};
use lguest_abi::{LGUEST_NET_KEY_STRIDE, LGUEST_NET_MAC_LEN, LGUEST_NET_PROMISC};

use super::{bind, irq, Dma};
use crate::cell::GuestCell;
use crate::console::Error;
use crate::err;
use crate::inet::{Mac, Nic, FRAME_MAX, FRAME_MIN};

/// Slots the page has room for.
const SLOTS: usize = PAGE_SIZE as usize / LGUEST_NET_MAC_LEN;
const RX_COUNT: usize = 8;
/// Frames sit 2048 bytes apart, so none crosses a page.
const BUF: usize = 2048;

#[repr(C, align(4096))]
struct Dmas([LguestDma; RX_COUNT]);
#[repr(C, align(4096))]
struct Frames<const N: usize>([[u8; BUF]; N]);

static RX_DMAS: GuestCell<Dmas> = GuestCell::new(Dmas([Dma::EMPTY.0; RX_COUNT]));
static RX_MEM: GuestCell<Frames<RX_COUNT>> = GuestCell::new(Frames([[0; BUF]; RX_COUNT]));
static TX_MEM: GuestCell<Frames<1>> = GuestCell::new(Frames([[0; BUF]; 1]));

pub fn page(e: &DmaDeviceDesc) -> u64 {
    (e.pfn as u64) << PAGE_SHIFT
}

pub fn slot(e: &DmaDeviceDesc) -> usize {
    (e.features & LGUEST_NET_SLOT_MASK) as usize
}

fn rx_dma(i: usize) -> *mut LguestDma {
    assert!(i < RX_COUNT);
    // SAFETY: in bounds of our own static; no reference is made.
    unsafe { (&raw mut (*RX_DMAS.as_ptr()).0).cast::<LguestDma>().add(i) }
}

fn buf<const N: usize>(mem: &GuestCell<Frames<N>>, i: usize) -> *mut u8 {
    mem.as_ptr().cast::<u8>().wrapping_add(i * BUF)
}

pub struct Net {
    pub mac: Mac,
    page: u64,
    me: usize,
}

impl Net {
    pub fn probe(at: usize, e: &DmaDeviceDesc) -> Result<Net, Error> {
        let (page, me) = (page(e), slot(e));
        if e.pfn == 0 || me >= SLOTS {
            return Err(err!("net entry {at}: page {page:#x}, slot {me}"));
        }
        // Locally administered, "lg", and our slot: unique on the network.
        let mac = [0x02, 0x6c, 0x67, 0, (me >> 8) as u8, me as u8];
        for i in 0..RX_COUNT {
            let dma = Dma::over(buf(&RX_MEM, i) as u64, FRAME_MAX)?;
            // SAFETY: not bound yet, so the Host doesn't write them.
            unsafe { rx_dma(i).write_volatile(dma.0) };
        }
        let key = page + LGUEST_NET_KEY_STRIDE * me as u64;
        // SAFETY: RX_DMAS and RX_MEM are reached only through raw pointers.
        unsafe { bind(key, rx_dma(0), RX_COUNT, irq(at))? };
        let net = Net { mac, page, me };
        // Buffers first, then our MAC: nobody sends before we can take it.
        compiler_fence(Ordering::SeqCst);
        for (i, &byte) in mac.iter().enumerate() {
            // SAFETY: our slot of the shared page (me < SLOTS), writable.
            unsafe { net.slot_byte(me, i).write_volatile(byte) };
        }
        Ok(net)
    }

    fn slot_byte(&self, slot: usize, i: usize) -> *mut u8 {
        core::ptr::with_exposed_provenance_mut(self.page as usize + LGUEST_NET_MAC_LEN * slot + i)
    }

    /// The MAC in `slot` (all zeros: free).
    fn slot_mac(&self, slot: usize) -> Mac {
        // SAFETY: inside the shared page (slot < SLOTS); other Guests write
        // it whenever they like, hence volatile bytes.
        core::array::from_fn(|i| unsafe { self.slot_byte(slot, i).read_volatile() })
    }

    fn used(i: usize) -> u32 {
        // SAFETY: a bound lguest_dma's used_len, a whole word.
        unsafe { (&raw const (*rx_dma(i)).used_len).read_volatile() }
    }
}

impl Nic for Net {
    fn mac(&self) -> Mac {
        self.mac
    }

    /// The lowest full buffer: with several full, frames may come out of
    /// order (as they did in 2007).
    fn recv(&mut self, out: &mut [u8; FRAME_MAX]) -> Option<usize> {
        let i = (0..RX_COUNT).find(|&i| Net::used(i) != 0)?;
        let len = (Net::used(i) as usize).min(FRAME_MAX);
        for (k, byte) in out[..len].iter_mut().enumerate() {
            // SAFETY: inside buffer i, filled and left alone until freed.
            *byte = unsafe { buf(&RX_MEM, i).add(k).read_volatile() };
        }
        compiler_fence(Ordering::SeqCst);
        // SAFETY: as in `used`: free it for the next frame.
        unsafe { (&raw mut (*rx_dma(i)).used_len).write_volatile(0) };
        Some(len)
    }

    fn arm_rx(&mut self) -> bool {
        (0..RX_COUNT).any(|i| Net::used(i) != 0)
    }

    fn send(&mut self, frame: &[u8]) {
        assert!(frame.len() <= FRAME_MAX);
        let len = frame.len().max(FRAME_MIN);
        let tx = buf(&TX_MEM, 0);
        for k in 0..len {
            // SAFETY: inside our transmit buffer, which nobody else writes.
            unsafe { tx.add(k).write_volatile(frame.get(k).copied().unwrap_or(0)) };
        }
        // A frame fits in its buffer, inside a page.
        let Ok(mut dma) = Dma::over(tx as u64, len) else {
            return;
        };
        let dest = &frame[..6];
        for slot in (0..SLOTS).filter(|&slot| slot != self.me) {
            let mac = self.slot_mac(slot);
            let promisc = mac[0] & LGUEST_NET_PROMISC != 0;
            let wants = promisc || dest[0] & 1 != 0 || mac == dest;
            // A slot with no free buffer takes nothing: the frame is lost
            // to it, as on a real network.
            if mac != [0; 6] && wants {
                dma.send(self.page + LGUEST_NET_KEY_STRIDE * slot as u64);
            }
        }
    }
}
