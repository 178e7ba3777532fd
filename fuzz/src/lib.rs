//! What the fuzz targets share: small Guest memories laid out as the
//! Launcher lays out a real one (ABI section 2), snapshots that show what a
//! call changed, and a device that serves its queues on the caller's thread
//! so that a run depends on its input alone.
//!
//! Every target asserts the Host's promises, not just the absence of a
//! panic: nothing outside Guest memory is touched, the Host pages never
//! change, and every refusal says why.

use lguest::memory::{GuestMemory, Layout};
use lguest::virtio::queue::{readable_len, stream_from_chain, write_to_chain};
use lguest::virtio::{Device, DeviceError, Queues};
use lguest_abi::PAGE_SIZE;

/// A fresh Guest memory: `ram_pages` of RAM, then `device_pages` (the last
/// `hole_pages` of them the mmio windows' hole, no memory at all), then the
/// Host's pages, `host_ro` read-only ones and `host_rw` writable ones. The
/// Host pages are filled with a pattern, so that any write to them shows.
pub fn memory(
    ram_pages: u64,
    device_pages: u64,
    hole_pages: u64,
    host_ro: u64,
    host_rw: u64,
) -> GuestMemory {
    assert!(hole_pages <= device_pages);
    let layout = Layout {
        mem: ram_pages * PAGE_SIZE,
        pfn_limit: ram_pages + device_pages,
        mmio_hole_pages: hole_pages,
        host_ro_pages: host_ro,
        host_rw_pages: host_rw,
    };
    let mem = GuestMemory::new(layout).expect("map a small Guest memory");
    for page in 0..layout.host_pages() {
        let pattern: Vec<u8> = (0..PAGE_SIZE)
            .map(|i| (i as u8) ^ (page as u8) ^ 0xA5)
            .collect();
        mem.write_host(page, 0, &pattern);
    }
    mem
}

thread_local! {
    static MEMORIES: std::cell::RefCell<std::collections::HashMap<[u64; 5], GuestMemory>> =
        Default::default();
}

/// The same as [`memory`], but mapped once per layout and handed out again
/// with RAM and device pages cleared: mapping and faulting in fresh memory
/// costs more than most runs. The Host pages keep their pattern (a run that
/// changed them has already failed).
pub fn reused_memory(
    ram_pages: u64,
    device_pages: u64,
    hole_pages: u64,
    host_ro: u64,
    host_rw: u64,
) -> GuestMemory {
    let key = [ram_pages, device_pages, hole_pages, host_ro, host_rw];
    let mem = MEMORIES.with(|m| {
        m.borrow_mut()
            .entry(key)
            .or_insert_with(|| memory(ram_pages, device_pages, hole_pages, host_ro, host_rw))
            .clone()
    });
    let zeros = vec![0u8; mem.layout.memory_end() as usize];
    mem.write(0, &zeros).expect("clear Guest memory");
    mem
}

/// The Host pages as they are now, to compare with later.
pub struct HostPages(Vec<u8>);

impl HostPages {
    pub fn snapshot(mem: &GuestMemory) -> HostPages {
        let mut bytes = vec![0u8; (mem.layout.host_pages() * PAGE_SIZE) as usize];
        for (page, chunk) in bytes.chunks_mut(PAGE_SIZE as usize).enumerate() {
            mem.read_host(page as u64, 0, chunk);
        }
        HostPages(bytes)
    }

    /// Panics (a fuzzer finding) if any Host page changed.
    pub fn assert_unchanged(&self, mem: &GuestMemory, what: &str) {
        let now = HostPages::snapshot(mem);
        // One memcmp in the common case: the checks are instrumented too,
        // and a byte loop here would cost more than the code under test.
        if self.0 == now.0 {
            return;
        }
        if let Some(at) = self.0.iter().zip(&now.0).position(|(a, b)| a != b) {
            panic!(
                "{what} wrote Host page {} at offset {:#x}",
                at as u64 / PAGE_SIZE,
                at as u64 % PAGE_SIZE
            );
        }
    }
}

/// All of Guest memory proper, `[0, memory_end)`.
pub fn guest_bytes(mem: &GuestMemory) -> Vec<u8> {
    let mut bytes = vec![0u8; mem.layout.memory_end() as usize];
    mem.read(0, &mut bytes).expect("Guest memory reads back");
    bytes
}

/// Panics unless every byte that differs between `before` and `after` lies
/// in one of the `allowed` half-open ranges.
pub fn assert_changes_within(before: &[u8], after: &[u8], allowed: &[(u64, u64)], what: &str) {
    // Compare in blocks first: almost all of memory is unchanged.
    if before == after {
        return;
    }
    for (block, (a, b)) in before.chunks(256).zip(after.chunks(256)).enumerate() {
        if a == b {
            continue;
        }
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let at = (block * 256 + i) as u64;
            if x != y && !allowed.iter().any(|&(lo, hi)| lo <= at && at < hi) {
                panic!(
                    "{what} changed Guest byte {at:#x} ({x:#x} -> {y:#x}), outside {allowed:#x?}"
                );
            }
        }
    }
}

/// Panics unless `now` is byte for byte what `want` (a model) says; the
/// message names the first byte that differs, `what` says whose bytes.
pub fn assert_bytes_as_modelled(now: &[u8], want: &[u8], what: &str) {
    // One memcmp in the common case: a byte loop is instrumented.
    if now == want {
        return;
    }
    assert_eq!(now.len(), want.len(), "{what}: lengths differ");
    let at = now.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    panic!(
        "{what}: byte {at:#x} is {:#x}, the model says {:#x}",
        now[at], want[at]
    );
}

/// A refusal must say why: a reason with some text in it.
pub fn assert_reason(err: &str, what: &str) {
    assert!(
        !err.trim().is_empty(),
        "{what} refused without a reason: {err:?}"
    );
}

const QUEUE_NAMES: [&str; 8] = ["q0", "q1", "q2", "q3", "q4", "q5", "q6", "q7"];

/// A device that takes every chain it is offered, reads what the Guest
/// wrote, writes a pattern back and returns it: it drives the queue code the
/// way the real devices do, with no backend (no stdin, no files, no
/// randomness), and serves every kick right away on the caller's thread.
/// It checks as it goes that every buffer the walk hands it is Guest memory.
pub struct EchoDevice {
    id: u8,
    queues: usize,
    features: u32,
    config: Vec<u8>,
}

impl EchoDevice {
    pub fn new(id: u8, queues: usize, features: u32, config: Vec<u8>) -> EchoDevice {
        assert!((1..=QUEUE_NAMES.len()).contains(&queues));
        EchoDevice {
            id,
            queues,
            features,
            config,
        }
    }
}

impl Device for EchoDevice {
    fn name(&self) -> &'static str {
        "echo"
    }
    fn virtio_id(&self) -> u8 {
        self.id
    }
    fn queue_names(&self) -> &'static [&'static str] {
        &QUEUE_NAMES[..self.queues]
    }
    fn features(&self) -> u32 {
        self.features
    }
    fn config(&self) -> Vec<u8> {
        self.config.clone()
    }
    fn serve_inline(&self, _q: usize) -> bool {
        true
    }

    fn kick(&mut self, q: usize, queues: &mut Queues) -> Result<(), DeviceError> {
        let end = queues.mem.layout.memory_end();
        let mut chunk = [0u8; 512];
        // A ring holds at most 256 chains at once; anything more is a bug.
        for _ in 0..=256 {
            let Some(chain) = queues.pop(q)? else {
                return Ok(());
            };
            for b in &chain.buffers {
                assert!(
                    b.addr.checked_add(b.len as u64).is_some_and(|e| e <= end),
                    "the walk handed the device a buffer outside Guest memory: {b:?}"
                );
            }
            let want = readable_len(&chain).min(1 << 16);
            let mut sum = 0u8;
            let got = stream_from_chain(queues.mem, &chain, &mut chunk, want, |piece| {
                sum = piece.iter().fold(sum, |s, &x| s.wrapping_add(x));
            });
            assert_eq!(got, want, "streamed a different length than asked");
            let reply = [sum ^ 0x5A; 64];
            let n = write_to_chain(queues.mem, &chain, &reply);
            queues.push(q, &chain, n)?;
        }
        panic!("queue {q} gave more chains in one kick than a ring can hold");
    }
}
