//! `bench=sharenet-rx [iters=N]` and `bench=sharenet peer=MAC [iters=N]`:
//! P7, full-size frames from one Guest to another over a shared network
//! (the 2007 model, `--sharenet`), for `lguest --bench`.
//!
//! The receiver binds every buffer the Host allows it (32 arrays of 16, a
//! 2 KiB buffer each) at its own key, writes its MAC in its slot, says
//! `lguest-bench: sharenet-rx ready slot=S mac=M` and counts what lands.
//! It looks with interrupts off, so the Host raises our IRQ once and holds
//! it pending instead of kicking us out of the Guest for every frame, and
//! it sleeps (HALT) as soon as a look finds nothing.
//!
//! The sender looks for the peer's MAC on the shared page and sends it N
//! frames of 1514 bytes, each carrying its number. It queues up to 64
//! SEND_DMAs in the async ring, each with its own lguest_dma and frame, and
//! runs them with one FLUSH_ASYNC: one exit for 64 frames. Each used_len
//! then says whether that frame was taken (it is then on its way: the
//! receiving Launcher keeps what its Guest has no room for yet); one that
//! was not is sent again in the next batch, after a nap that lets the
//! receiver drain its ring.
//!
//! Each prints one line and powers off:
//!
//! - `lguest-bench: sharenet-rx frames=R bytes=B timed_bytes=T cycles=C
//!   tsc_khz=K bad=X halts=H irqs=I`: R frames (B bytes) received in all;
//!   the clock runs from the first look that found frames to the last,
//!   and T is what arrived after that first look, so T / C is the rate.
//!   bad counts frames that were not ours or not 1514 bytes; H sleeps, I
//!   IRQs taken.
//! - `lguest-bench: sharenet frames=N bytes=B cycles=C tsc_khz=K
//!   flushes=F refused=R naps=P`: N frames taken, in F flushes (exits);
//!   R sends the receiving Launcher's ring had no room for; P naps.
//!
//! Both use RAM above the image, from 4 MiB, as bench=blk does.

use lguest_abi::{
    hcall as nr, LguestDma, HCALL_RING_SIZE, LGUEST_MAX_DMA, LGUEST_MAX_DMA_SECTIONS, PAGE_SIZE,
    SHUTDOWN_POWEROFF,
};

use lguest_abi::{
    LGUEST_DEVICE_S_ACKNOWLEDGE as S_ACKNOWLEDGE, LGUEST_DEVICE_S_DRIVER as S_DRIVER,
    LGUEST_DEVICE_S_DRIVER_OK as S_DRIVER_OK, LGUEST_DEVICE_T_NET as T_NET,
};
use lguest_guest::dma::{self, Dma};
use lguest_guest::inet::{Mac, FRAME_MAX};
use lguest_guest::interrupts::irq_count;
use lguest_guest::time::Deadline;
use lguest_guest::{boot, hcall, lguest_data, println, time};

const DEFAULT_FRAMES: u64 = 100_000;
/// Where the lguest_dma arrays go (one page each, so none crosses a page),
/// and the frames (2 KiB apart, two to a page).
const DMA_AREA: u64 = 4 << 20;
const FRAME_AREA: u64 = 5 << 20;
const FRAME_STRIDE: u64 = 2048;
const DMA_SIZE: u64 = size_of::<LguestDma>() as u64;
/// The receiver's buffers: every binding the Host allows, all full.
const RX_ARRAYS: usize = LGUEST_MAX_DMA;
const RX_PER_ARRAY: usize = LGUEST_MAX_DMA_SECTIONS;
const RX_BUFS: usize = RX_ARRAYS * RX_PER_ARRAY;
/// The sender's frames in flight: one async ring's worth.
const TX_BATCH: usize = HCALL_RING_SIZE;
/// Our frames' ethertype: the IEEE's local experimental one.
const ETHERTYPE: [u8; 2] = [0x88, 0xB5];
/// Where a frame carries its number.
const SEQ_AT: usize = 14;
/// How long the receiver waits for the first frame, and then for more
/// (frames wait for our buffers, so none should go missing; if some do,
/// we report what came).
const FIRST_FRAME_MS: u64 = 60_000;
const QUIET_END_MS: u64 = 10_000;
/// How long the receiver sleeps at most, to look at the clock.
const RX_NAP_NS: u64 = 10_000_000;
/// How long the sender sleeps for each frame the receiver's ring had no
/// room for: about what the receiving side spends on a frame here, so the
/// ring has drained about that many when the sender tries again. Trying
/// again at once only takes the processor the receiver needs.
const TX_NAP_PER_REFUSED_NS: u64 = 6_000;
/// How long the sender looks for its peer on the page, and how long it
/// keeps trying when the peer takes nothing.
const PEER_MS: u64 = 30_000;
const STALL_MS: u64 = 10_000;

pub fn run(name: &str, iters: Option<&str>) -> ! {
    let label = lguest_guest::console::Msg::<32>::from_fmt(format_args!("bench={name}"));
    let fail = |what: &str| -> ! { lguest_guest::fail(label.as_str(), format_args!("{what}")) };
    let frames = match iters {
        None => DEFAULT_FRAMES,
        Some(text) => match text.parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => fail("bad iters="),
        },
    };
    if boot::mem() < FRAME_AREA + (RX_BUFS as u64) * FRAME_STRIDE {
        fail("needs at least 6 MiB of RAM");
    }
    let Some(net) = Shared::find() else {
        fail("no network: run it with --sharenet=FILE");
    };
    // Measure the TSC now (if the Host gave no figure), not inside the run.
    time::tsc_khz();
    match name {
        "sharenet-rx" => receive(&net, frames),
        _ => match boot::option("peer").and_then(parse_mac) {
            Some(peer) => send(&net, peer, frames),
            None => fail("needs peer=MAC (the receiver's, as its ready line says)"),
        },
    }
    hcall::shutdown(c"benchmark finished", SHUTDOWN_POWEROFF);
}

/// Our network: its table entry, its page and our slot.
struct Shared {
    at: usize,
    page: u64,
    me: usize,
}

impl Shared {
    fn find() -> Option<Shared> {
        let table = dma::table();
        let at = (0..table.len()).find(|&i| table[i].type_ == T_NET)?;
        let e = &table[at];
        let (page, me) = (dma::net::page(e), dma::net::slot(e));
        (e.pfn != 0 && (me + 1) * 6 <= PAGE_SIZE as usize).then_some(Shared { at, page, me })
    }

    fn key(&self, slot: usize) -> u64 {
        self.page + 4 * slot as u64
    }

    fn mac_byte(&self, slot: usize, i: usize) -> *mut u8 {
        core::ptr::with_exposed_provenance_mut((self.page + 6 * slot as u64) as usize + i)
    }

    fn mac(&self, slot: usize) -> Mac {
        // SAFETY: inside the shared page, identity-mapped; other Guests
        // write it whenever they like, hence volatile bytes.
        core::array::from_fn(|i| unsafe { self.mac_byte(slot, i).read_volatile() })
    }

    fn set_mac(&self, mac: Mac) {
        for (i, &b) in mac.iter().enumerate() {
            // SAFETY: our own slot of the shared page.
            unsafe { self.mac_byte(self.me, i).write_volatile(b) };
        }
    }
}

/// The reference Guest's MAC for a slot: locally administered, "lg", slot.
fn mac_of(slot: usize) -> Mac {
    [0x02, 0x6c, 0x67, 0, (slot >> 8) as u8, slot as u8]
}

fn parse_mac(text: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The lguest_dma number `i` of our area, 16 to a page.
fn dma_at(i: usize) -> *mut LguestDma {
    let (page, k) = (i / RX_PER_ARRAY, i % RX_PER_ARRAY);
    core::ptr::with_exposed_provenance_mut(
        (DMA_AREA + page as u64 * PAGE_SIZE + k as u64 * DMA_SIZE) as usize,
    )
}

fn frame_at(i: usize) -> u64 {
    FRAME_AREA + i as u64 * FRAME_STRIDE
}

fn used(i: usize) -> u32 {
    // SAFETY: a whole, aligned word of one of our lguest_dma, which the
    // Host writes when it fills (or takes) that buffer.
    unsafe { (&raw const (*dma_at(i)).used_len).read_volatile() }
}

fn set_used(i: usize, n: u32) {
    // SAFETY: as in `used`.
    unsafe { (&raw mut (*dma_at(i)).used_len).write_volatile(n) }
}

fn peek(addr: u64) -> u8 {
    // SAFETY: RAM of our frame area, identity-mapped.
    unsafe { core::ptr::with_exposed_provenance::<u8>(addr as usize).read_volatile() }
}

fn poke(addr: u64, byte: u8) {
    // SAFETY: as in `peek`; nobody else writes our frame area.
    unsafe { core::ptr::with_exposed_provenance_mut::<u8>(addr as usize).write_volatile(byte) }
}

/// Bind every buffer, publish our MAC, say so, then count frames until
/// `expected` have come or none has for QUIET_END_MS.
fn receive(net: &Shared, expected: u64) {
    let fail =
        |what: &str| -> ! { lguest_guest::fail("bench=sharenet-rx", format_args!("{what}")) };
    dma::set_status(net.at, S_ACKNOWLEDGE | S_DRIVER);
    for i in 0..RX_BUFS {
        let Ok(d) = Dma::over(frame_at(i), FRAME_MAX) else {
            fail("a buffer does not fit one lguest_dma");
        };
        // SAFETY: not bound yet, so the Host does not write it.
        unsafe { dma_at(i).write_volatile(d.0) };
    }
    // The trap dispatcher counts every IRQ; we only look at the count.
    let irq = dma::irq(net.at);
    for array in 0..RX_ARRAYS {
        // SAFETY: the arrays and frames are RAM nothing else of ours uses,
        // reached only through raw pointers, and stay bound until we power
        // off.
        if unsafe {
            dma::bind(
                net.key(net.me),
                dma_at(array * RX_PER_ARRAY),
                RX_PER_ARRAY,
                irq,
            )
        }
        .is_err()
        {
            fail("the Host refused our buffers");
        }
    }
    let mac = mac_of(net.me);
    net.set_mac(mac);
    dma::set_status(net.at, S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK);
    println!(
        "lguest-bench: sharenet-rx ready slot={} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        net.me, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    );

    let khz = time::tsc_khz();
    let (mut frames, mut bytes, mut timed, mut bad, mut halts) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut first, mut last) = (None, 0u64);
    let irqs_before = irq_count(irq as u16);
    // Interrupts off while we look: the Host then raises our IRQ once and
    // leaves it pending, where it would kick us out for every frame.
    let flags = lguest_data::irq_save();
    let mut since = time::rdtsc();
    while frames < expected {
        let (mut n, mut b) = (0u64, 0u64);
        for i in 0..RX_BUFS {
            let len = used(i);
            if len == 0 {
                continue;
            }
            let at = frame_at(i);
            let ours = (0..6).all(|k| peek(at + k as u64) == mac[k]);
            if len as usize != FRAME_MAX || !ours {
                bad += 1;
            }
            n += 1;
            b += len as u64;
            set_used(i, 0);
        }
        let now = time::rdtsc();
        if n > 0 {
            frames += n;
            bytes += b;
            match first {
                None => first = Some(now),
                Some(_) => timed += b,
            }
            last = now;
            since = now;
            continue;
        }
        let quiet_limit = match first {
            None => FIRST_FRAME_MS,
            Some(_) => QUIET_END_MS,
        };
        if now - since > quiet_limit * khz {
            break;
        }
        // Nothing: sleep until the Host raises our IRQ (or the clock, to
        // look at the time). The IRQ stays pending while interrupts are
        // off, so a frame that came since our look wakes the HALT at once;
        // looking longer first would only take the processor the Launcher
        // needs to fill our buffers.
        nap(RX_NAP_NS);
        halts += 1;
    }
    lguest_data::irq_restore(flags);
    let Some(first) = first else {
        fail("no frame came");
    };
    println!(
        "lguest-bench: sharenet-rx frames={frames} bytes={bytes} timed_bytes={timed} cycles={} \
         tsc_khz={} bad={bad} halts={halts} irqs={}",
        last - first,
        lguest_data::tsc_khz(),
        irq_count(irq as u16) - irqs_before
    );
}

/// Send `count` frames to the slot whose MAC is `peer`.
fn send(net: &Shared, peer: Mac, count: u64) {
    let fail = |what: &str| -> ! { lguest_guest::fail("bench=sharenet", format_args!("{what}")) };
    let deadline = Deadline::after_ms(PEER_MS);
    let slot = loop {
        let slots = PAGE_SIZE as usize / 6;
        if let Some(s) = (0..slots).find(|&s| s != net.me && net.mac(s) == peer) {
            break s;
        }
        if deadline.passed() {
            fail("the peer's MAC never appeared on the network");
        }
        crate::extras::busy_wait_us(1000);
    };
    drop(deadline);
    let key = net.key(slot);
    let me = mac_of(net.me);
    for i in 0..TX_BATCH {
        let at = frame_at(i);
        for k in 0..FRAME_MAX {
            let byte = match k {
                0..6 => peer[k],
                6..12 => me[k - 6],
                12..14 => ETHERTYPE[k - 12],
                _ => k as u8,
            };
            poke(at + k as u64, byte);
        }
        let Ok(d) = Dma::over(at, FRAME_MAX) else {
            fail("a frame does not fit one lguest_dma");
        };
        // SAFETY: our own RAM; the Host only reads it during SEND_DMA,
        // and writes used_len.
        unsafe { dma_at(i).write_volatile(d.0) };
    }

    // Which frame each batch slot carries (u64::MAX: none).
    let mut carries = [u64::MAX; TX_BATCH];
    let (mut next, mut taken, mut flushes, mut refused) = (0u64, 0u64, 0u64, 0u64);
    let mut naps = 0u64;
    // No interrupt handler may queue hypercalls while we fill the ring.
    let flags = lguest_data::irq_save();
    let start = time::rdtsc();
    let stall = STALL_MS * time::tsc_khz();
    let mut progress = start;
    while taken < count {
        for (i, seq) in carries.iter_mut().enumerate() {
            if *seq == u64::MAX {
                if next == count {
                    continue;
                }
                *seq = next;
                next += 1;
                for (k, byte) in seq.to_le_bytes().into_iter().enumerate() {
                    poke(frame_at(i) + (SEQ_AT + k) as u64, byte);
                }
            }
            set_used(i, 0);
            // SAFETY: the lguest_dma and its frame are ours and in RAM;
            // interrupts are off, and the ring has room: every slot was
            // run by the last flush.
            let queued = unsafe { hcall::queue(nr::SEND_DMA, key, dma_at(i) as u64, 0, 0) };
            if !queued {
                fail("the async ring was full");
            }
        }
        let queued_now = carries.iter().filter(|&&c| c != u64::MAX).count() as u64;
        hcall::flush_async();
        flushes += 1;
        let taken_before = taken;
        for (i, seq) in carries.iter_mut().enumerate() {
            if *seq == u64::MAX {
                continue;
            }
            if used(i) as usize == FRAME_MAX {
                taken += 1;
                *seq = u64::MAX;
            } else {
                refused += 1;
            }
        }
        let now = time::rdtsc();
        if taken > taken_before {
            progress = now;
        } else if now - progress > stall {
            fail("the peer took no frame for 10 s");
        }
        // The ring was full: give the receiver time to drain it.
        let refused_now = queued_now - (taken - taken_before);
        if refused_now > 0 {
            nap(refused_now * TX_NAP_PER_REFUSED_NS);
            naps += 1;
        }
    }
    let cycles = time::rdtsc() - start;
    lguest_data::irq_restore(flags);
    println!(
        "lguest-bench: sharenet frames={taken} bytes={} cycles={cycles} tsc_khz={} \
         flushes={flushes} refused={refused} naps={naps}",
        taken * FRAME_MAX as u64,
        lguest_data::tsc_khz()
    );
}

/// Sleep `ns` at most (an IRQ ends it sooner), interrupts off before and
/// after. The clock event goes through the async ring, which HALT runs
/// first, and is not cancelled (a late tick only ends a later sleep
/// early): one exit per sleep.
fn nap(ns: u64) {
    // SAFETY: a timer interrupt is nothing new; interrupts are off.
    if !unsafe { hcall::queue(nr::SET_CLOCKEVENT, ns, 0, 0, 0) } {
        hcall::set_clockevent(ns);
    }
    // The Host delivers to a halted Guest whatever its interrupt flag,
    // turning it on to do so: off again.
    hcall::halt();
    lguest_data::irq_save();
}
