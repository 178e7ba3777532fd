//! `bad=virtio-*`: break the ring rules on the console's transmit queue
//! (queue 1), which every Guest has. The Host walks a ring only in its
//! device's thread, so its verdict comes a moment after our kick, not during
//! it: we give it two seconds to end us before calling it a failure.

use lguest_abi::PAGE_SHIFT;

use super::ring::{Desc, Vring, DESC_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use super::{bit, idle, Deadline, Devices, VIRTIO_RING_F_INDIRECT_DESC};
use crate::cell::GuestCell;
use crate::lguest_data;

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
        Err(e) => crate::fail(label, format_args!("{}", e.as_str())),
    };
    let indirect = console.dev.guest_features() & bit(VIRTIO_RING_F_INDIRECT_DESC) != 0;
    let tx: &mut Vring = &mut console.tx;
    let num = tx.num();
    match case {
        // A buffer in the Host's own pages.
        "virtio-addr" => {
            let limit = lguest_data::pfn_limit() << PAGE_SHIFT;
            tx.write_desc(0, desc(limit, 16, 0, 0));
            tx.publish_raw(0);
        }
        // 0 -> 1 -> 0 -> ...
        "virtio-loop" => {
            tx.write_desc(0, desc(payload(), 16, VRING_DESC_F_NEXT, 1));
            tx.write_desc(1, desc(payload(), 16, VRING_DESC_F_NEXT, 0));
            tx.publish_raw(0);
        }
        // A loop-free chain, through an indirect table, one longer than the
        // ring: the Host must not walk on for ever, nor call it a loop.
        "virtio-long" => {
            if !indirect {
                crate::fail(
                    label,
                    format_args!("the console didn't get INDIRECT_DESC, which this case needs"),
                );
            }
            let len = num as usize + 1;
            if len > TABLE_LEN {
                crate::fail(
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
                    desc(payload(), 1, VRING_DESC_F_NEXT, i as u16 + 1)
                };
                // SAFETY: in bounds (len <= TABLE_LEN); nobody else uses it.
                unsafe { table.add(i).write_volatile(d) };
            }
            let bytes = len as u32 * DESC_SIZE as u32;
            tx.write_desc(0, desc(table as u64, bytes, VRING_DESC_F_INDIRECT, 0));
            tx.publish_raw(0);
        }
        // More new entries than the ring holds.
        "virtio-avail" => tx.bump_avail_idx(1000),
        // A head past the end of the descriptor table.
        "virtio-index" => tx.publish_raw(num.max(300)),
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
