//! The split-virtqueue walker (host/src/virtio/queue.rs) over a Guest memory
//! whose every byte the input chooses: descriptor tables, indirect tables,
//! avail and used indices, and a Guest that rewrites them between our steps.
//!
//! Checked after every step: a chain only covers Guest memory and is no
//! longer than the ring; the Host writes Guest memory only in the used ring
//! (and, for a device filling a chain, only in its writable buffers); the
//! used index counts our pushes; streaming reads exactly the chain's bytes;
//! the Host pages never change; every refusal says why.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use lguest::memory::GuestMemory;
use lguest::virtio::queue::{
    readable_len, stream_from_chain, write_to_chain, Chain, Queue, RingFeatures,
};
use lguest_fuzz::{assert_changes_within, assert_reason, guest_bytes, memory, HostPages};
use libfuzzer_sys::fuzz_target;
use std::sync::{LazyLock, Mutex};

/// RAM pages; then one device page, which is the mmio hole, then Host pages.
const RAM_PAGES: u64 = 8;

/// One memory for every run (mapping a fresh one costs more than the run):
/// RAM is cleared at the start of each, and the Host pages must stay as
/// they were when it was made.
static MEM: LazyLock<(Mutex<GuestMemory>, HostPages)> = LazyLock::new(|| {
    let mem = memory(RAM_PAGES, 1, 1, 1, 1);
    let host = HostPages::snapshot(&mem);
    (Mutex::new(mem), host)
});

#[derive(Arbitrary, Debug)]
enum Areas {
    /// The lguest bus's legacy layout from a page-aligned base (a page
    /// past RAM is the hole).
    Legacy { page: u8 },
    /// Three areas where a modern driver put them (virtio-mmio checks them
    /// against Guest memory first; here they may run off its end).
    Split { desc: u16, avail: u16, used: u16 },
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// The device takes the next chain.
    Pop,
    /// It returns the oldest chain it holds, with `len` bytes written.
    Push { len: u32 },
    /// It fills the newest chain it holds with `len` bytes.
    Fill { len: u16 },
    /// It reads the newest chain, at most `max` bytes, in `chunk`-byte pieces.
    Stream { max: u32, chunk: u8 },
    /// It asks for kicks, or not.
    WantKicks(bool),
    /// The Guest writes a 16-bit value anywhere (it runs beside us).
    Poke { addr: u16, value: u16 },
    /// The Guest publishes an avail index.
    AvailIdx(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    num: u8,
    features: u8,
    areas: Areas,
    ops: Vec<Op>,
    // Guest memory from address 0 is the rest of the input, byte for byte.
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(input) = Input::arbitrary(&mut u) else {
        return;
    };
    let contents = u.take_rest();
    let (lock, host) = &*MEM;
    let guard = lock.lock().unwrap();
    let mem: &GuestMemory = &guard;
    let end = mem.layout.memory_end();
    mem.write(0, &vec![0; end as usize]).unwrap();
    let n = contents.len().min(end as usize);
    mem.write(0, &contents[..n]).unwrap();

    // Transports make queues of 1 to 256 entries, powers of two; the walk
    // itself must hold for any size.
    let num = input.num as u16 + 1;
    let features = RingFeatures {
        event_idx: input.features & 1 != 0,
        indirect: input.features & 2 != 0,
        notify_on_empty: input.features & 4 != 0,
    };
    let (mut queue, avail, used) = match input.areas {
        Areas::Legacy { page } => {
            let base = (page as u64 % (RAM_PAGES + 2)) * 4096;
            let q = Queue::new(num, base, features);
            let avail = base + 16 * num as u64;
            let used = (avail + 6 + 2 * num as u64).next_multiple_of(4096);
            (q, avail, used)
        }
        Areas::Split { desc, avail, used } => {
            let areas = [desc as u64, avail as u64, used as u64];
            (Queue::with_areas(num, areas, features), areas[1], areas[2])
        }
    };
    // What the Host may write while walking and returning: the used ring,
    // flags and index, the entries and avail_event.
    let used_ring = [(used, used + 4 + 8 * num as u64 + 2)];

    let mut held: std::collections::VecDeque<Chain> = Default::default();
    let mut pushed = 0u16;
    let mut dead = false;
    for op in input.ops.iter().take(32) {
        let before = guest_bytes(mem);
        match *op {
            Op::Pop => match queue.pop(mem) {
                Ok(Some(chain)) => {
                    assert!(chain.head < num, "head {} of a ring of {num}", chain.head);
                    assert!(!chain.buffers.is_empty(), "a chain with no buffers");
                    assert!(
                        chain.buffers.len() <= num as usize,
                        "a chain of {} buffers in a ring of {num}",
                        chain.buffers.len()
                    );
                    for b in &chain.buffers {
                        let e = b.addr.checked_add(b.len as u64);
                        assert!(e.is_some_and(|e| e <= end), "buffer {b:?} past {end:#x}");
                    }
                    held.push_back(chain);
                }
                Ok(None) => {}
                Err(e) => {
                    assert_reason(&e.to_string(), "pop");
                    dead = true;
                }
            },
            Op::Push { len } => {
                let Some(chain) = held.pop_front() else {
                    continue;
                };
                match queue.push(mem, chain.head, len) {
                    Ok(_) => {
                        pushed = pushed.wrapping_add(1);
                        let mut b = [0u8; 2];
                        let idx = mem.read(used + 2, &mut b).map(|_| u16::from_le_bytes(b));
                        assert_eq!(idx.ok(), Some(pushed), "used index after a push");
                        let slot = used + 4 + 8 * ((pushed.wrapping_sub(1)) % num) as u64;
                        assert_eq!(mem.read_u32(slot).ok(), Some(chain.head as u32));
                        assert_eq!(mem.read_u32(slot + 4).ok(), Some(len));
                    }
                    Err(e) => {
                        assert_reason(&e.to_string(), "push");
                        dead = true;
                    }
                }
            }
            Op::Fill { len } => {
                let Some(chain) = held.back() else {
                    continue;
                };
                let data = vec![0xC3u8; len as usize];
                let n = write_to_chain(mem, chain, &data);
                let room: u64 = chain.writable().map(|b| b.len as u64).sum();
                assert!(
                    n as u64 <= room.min(len as u64),
                    "wrote {n} of {len} into {room}"
                );
                let allowed: Vec<_> = chain
                    .writable()
                    .map(|b| (b.addr, b.addr + b.len as u64))
                    .collect();
                assert_changes_within(&before, &guest_bytes(mem), &allowed, "write_to_chain");
                host.assert_unchanged(mem, "write_to_chain");
                continue;
            }
            Op::Stream { max, chunk } => {
                let Some(chain) = held.back() else {
                    continue;
                };
                let mut buf = vec![0u8; chunk as usize + 1];
                let mut got = Vec::new();
                let total = stream_from_chain(mem, chain, &mut buf, max as u64, |piece| {
                    assert!(!piece.is_empty() && piece.len() <= chunk as usize + 1);
                    got.extend_from_slice(piece);
                });
                assert_eq!(total, readable_len(chain).min(max as u64));
                assert_eq!(got.len() as u64, total);
                let want: Vec<u8> = chain
                    .readable()
                    .flat_map(|b| &before[b.addr as usize..(b.addr + b.len as u64) as usize])
                    .take(total as usize)
                    .copied()
                    .collect();
                assert!(got == want, "streamed bytes are not the chain's");
            }
            Op::WantKicks(wanted) => {
                if let Err(e) = queue.want_kicks(mem, wanted) {
                    assert_reason(&e.to_string(), "want_kicks");
                    dead = true;
                }
            }
            Op::Poke { addr, value } => {
                let _ = mem.write(addr as u64, &value.to_le_bytes());
                continue;
            }
            Op::AvailIdx(idx) => {
                let _ = mem.write(avail + 2, &idx.to_le_bytes());
                continue;
            }
        }
        assert_changes_within(&before, &guest_bytes(mem), &used_ring, "the queue");
        host.assert_unchanged(mem, "the queue");
        // An error is Sudden Death: the Guest is gone, and the queue with it.
        if dead {
            break;
        }
    }
    host.assert_unchanged(mem, "the queue");
});
