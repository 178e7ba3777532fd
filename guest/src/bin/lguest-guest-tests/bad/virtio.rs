//! `bad=virtio-*`: break the ring rules on the console's transmit queue
//! (queue 1), which every Guest has. The Host walks a ring only in its
//! device's thread, so its verdict comes a moment after our kick, not during
//! it: we give it two seconds to end us before calling it a failure.

use lguest_abi::PAGE_SHIFT;

use lguest_abi::vring::RING_F_INDIRECT_DESC;
use lguest_abi::vring::{Desc, DESC_F_INDIRECT, DESC_F_NEXT, DESC_SIZE};
use lguest_guest::cell::GuestCell;
use lguest_guest::lguest_data;
use lguest_guest::time::{idle, Deadline};
use lguest_guest::virtio::ring::Vring;
use lguest_guest::virtio::Devices;

/// What the descriptors point at: harmless bytes of ours.
static PAYLOAD: GuestCell<[u8; 16]> = GuestCell::new(*b"lguest bad case\n");

/// The indirect table for virtio-long: one entry more than a ring of 256.
const TABLE_LEN: usize = 257;

#[repr(C, align(16))]
struct Table([Desc; TABLE_LEN]);

static TABLE: GuestCell<Table> = GuestCell::new(Table([desc(0, 0, 0, 0); TABLE_LEN]));

fn payload() -> u64 {
    PAYLOAD.as_ptr() as u64
}

/// Whether `case` is one of ours.
pub fn is_virtio_case(case: &str) -> bool {
    matches!(
        case,
        "virtio-addr" | "virtio-loop" | "virtio-long" | "virtio-avail" | "virtio-index"
    )
}

/// Break the rule `case` names, kick, and wait to be ended. Returns only if
/// the Host let us live.
pub fn run(case: &str, label: &str) {
    let mut devices = Devices::scan();
    let console = match devices.console() {
        Ok(console) => console,
        Err(e) => lguest_guest::fail(label, format_args!("{}", e.as_str())),
    };
    let indirect = console.dev.guest_features() & 1 << RING_F_INDIRECT_DESC != 0;
    let tx: &mut Vring = &mut console.tx.vq;
    let num = tx.num();
    match case {
        // A buffer in the Host's own pages.
        "virtio-addr" => {
            let limit = lguest_data::pfn_limit() << PAGE_SHIFT;
            write_desc(tx, 0, desc(limit, 16, 0, 0));
            publish(tx, 0);
        }
        // 0 -> 1 -> 0 -> ...
        "virtio-loop" => {
            write_desc(tx, 0, desc(payload(), 16, DESC_F_NEXT, 1));
            write_desc(tx, 1, desc(payload(), 16, DESC_F_NEXT, 0));
            publish(tx, 0);
        }
        // A loop-free chain, through an indirect table, one longer than the
        // ring: the Host must not walk on for ever, nor call it a loop.
        "virtio-long" => {
            if !indirect {
                lguest_guest::fail(
                    label,
                    format_args!("the console didn't get INDIRECT_DESC, which this case needs"),
                );
            }
            let len = num as usize + 1;
            if len > TABLE_LEN {
                lguest_guest::fail(
                    label,
                    format_args!("a ring of {num} is too big for this case"),
                );
            }
            let table = TABLE.as_ptr().cast::<Desc>();
            for i in 0..len {
                let last = i + 1 == len;
                let d = if last {
                    desc(payload(), 1, 0, 0)
                } else {
                    desc(payload(), 1, DESC_F_NEXT, i as u16 + 1)
                };
                // SAFETY: in bounds (len <= TABLE_LEN); nobody else uses it.
                unsafe { table.add(i).write_volatile(d) };
            }
            let bytes = len as u32 * DESC_SIZE as u32;
            write_desc(tx, 0, desc(table as u64, bytes, DESC_F_INDIRECT, 0));
            publish(tx, 0);
        }
        // More new entries than the ring holds.
        "virtio-avail" => bump_avail_idx(tx, 1000),
        // A head past the end of the descriptor table.
        "virtio-index" => publish(tx, num.max(300)),
        _ => unreachable!("is_virtio_case said yes"),
    }
    tx.notify();
    let deadline = Deadline::after_ms(2000);
    while !deadline.passed() {
        idle(Some(&deadline), || false);
    }
}

const fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
    Desc {
        addr,
        len,
        flags,
        next,
    }
}

/*
 * Behind the driver's back: we write the ring's memory ourselves, as a
 * broken driver would, and leave the Vring's bookkeeping as it was. The
 * Host must end us before that matters.
 */

/// Write descriptor `i` (below the ring's size) as given.
fn write_desc(tx: &Vring, i: u16, d: Desc) {
    assert!(i < tx.num());
    let at =
        core::ptr::with_exposed_provenance_mut::<Desc>((tx.desc + i as u64 * DESC_SIZE) as usize);
    // SAFETY: a descriptor slot of the ring, which Vring::new checked lies
    // in our device pages; 16-byte aligned.
    unsafe { at.write_volatile(d) };
}

/// The avail ring's index (it is ours: we write it, the Host reads it).
fn avail_idx(tx: &Vring) -> *mut u16 {
    core::ptr::with_exposed_provenance_mut((tx.avail + 2) as usize)
}

/// Put `head` (in range or not) in the next avail slot and publish it.
fn publish(tx: &Vring, head: u16) {
    let idx = avail_idx(tx);
    // SAFETY: the avail ring's index and slots, inside the ring (see
    // write_desc), 2-byte aligned.
    unsafe {
        let i = idx.read_volatile();
        let slot = tx.avail + 4 + 2 * (i % tx.num()) as u64;
        core::ptr::with_exposed_provenance_mut::<u16>(slot as usize).write_volatile(head);
        idx.write_volatile(i.wrapping_add(1));
    }
}

/// Move the avail index on by `by`, filling no slot.
fn bump_avail_idx(tx: &Vring, by: u16) {
    let idx = avail_idx(tx);
    // SAFETY: as in publish.
    unsafe { idx.write_volatile(idx.read_volatile().wrapping_add(by)) };
}
