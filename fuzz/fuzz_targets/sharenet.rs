//! The shared network's FILE (`--sharenet`, `host/src/dma/sharenet.rs`):
//! any process that can write the FILE can write anything into a slot's
//! control page and ring, and the Launcher reading that ring must take
//! only well-formed records off it and never go outside it.
//!
//! Two Launchers' ends share one FILE here: slot 1 receives (its ring is
//! what the input writes, records and garbage alike), slot 2 sends to it
//! through the real `SharedNet::send`. A model written from the FILE's
//! documented format (the module comment of `sharenet.rs`) says, for every
//! step, what must happen: which frames a drain hands over, in order, and
//! with which key offset; where it stops for a Guest with no room; when
//! the ring makes no sense and is emptied (and when it cannot be, because
//! a live Launcher holds its lock); what a send returns and writes. After
//! the steps the whole slot, control page and ring, must be byte for byte
//! what the model says, and the rest of the FILE unchanged.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use lguest::dma::sharenet::{
    slot_base, Offer, SharedNet, FRAME_MAX, HEAD, KEYS, LIVE, MAX_SLOTS, PID, RECORD_HEADER,
    RING_BYTES, RING_LOCK, STATE, STRIDE, TAIL, WAITING, WRAP,
};
use lguest_abi::{LGUEST_NET_KEY_STRIDE, PAGE_SIZE};
use lguest_fuzz::assert_bytes_as_modelled;
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

const RX: usize = 1;
const TX: usize = 2;

struct Nets {
    rx: SharedNet,
    tx: SharedNet,
    file: File,
    /// The FILE before slot 1: the net page and the header.
    front: Vec<u8>,
    /// Slot 1 as the last run left it (and checked).
    slot: Vec<u8>,
}

thread_local! {
    static NETS: RefCell<Option<Nets>> = const { RefCell::new(None) };
}

fn nets() -> Nets {
    let path = std::env::temp_dir().join(format!("lguest-fuzz-sharenet-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let rx = SharedNet::join(&path).expect("join as slot 1");
    let tx = SharedNet::join(&path).expect("join as slot 2");
    assert_eq!((rx.slot(), tx.slot()), (RX, TX));
    let file = File::options()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open the FILE");
    // Nobody else needs its name.
    std::fs::remove_file(&path).expect("unlink the FILE");
    let mut front = vec![0u8; slot_base(RX) as usize];
    file.read_exact_at(&mut front, 0).expect("read the FILE");
    let mut slot = vec![0u8; STRIDE as usize];
    file.read_exact_at(&mut slot, slot_base(RX))
        .expect("read the FILE");
    Nets {
        rx,
        tx,
        file,
        front,
        slot,
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Index {
    /// Near the ring's start or end, or anywhere in it (8-byte steps).
    Near(u8, i16),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Record {
    Frame { offset: u16, len: u16, fill: u8 },
    Wrap,
    Raw { len: u32, offset: u32 },
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// The receiver takes what is there; delivery `i` finds no room if
    /// `no_room` says so.
    Drain { no_room: Vec<bool> },
    /// Slot 2's Launcher sends a frame to a key offset.
    Send { offset: u16, len: u16, fill: u8 },
    /// Anybody writes anything into slot 1.
    Junk { at: u32, bytes: Vec<u8> },
    /// Slot 1's Guest binds other keys.
    Keys(Vec<u16>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    head: Index,
    tail: Option<Index>,
    /// Which ring lock word: free, ours, the sender's, a dead slot's, no slot's.
    lock: u8,
    waiting: bool,
    keys: Vec<u16>,
    records: Vec<Record>,
    steps: Vec<Step>,
}

fn index(i: Index) -> u64 {
    match i {
        Index::Near(which, off) => {
            let base = match which % 4 {
                0 => 0,
                1 => RING_BYTES,
                2 => 5 * RING_BYTES,
                _ => 0u64.wrapping_sub(RING_BYTES),
            };
            base.wrapping_add((off as i64 * 8) as u64)
        }
        Index::Raw(v) => v,
    }
}

/// Slot 1, as the FILE's format says it must be.
struct Model {
    bytes: Vec<u8>,
}

fn pad8(n: u64) -> u64 {
    (n + 7) & !7
}

impl Model {
    fn u32(&self, at: u64) -> u32 {
        let at = at as usize;
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap())
    }
    fn u64(&self, at: u64) -> u64 {
        let at = at as usize;
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().unwrap())
    }
    fn put(&mut self, at: u64, data: &[u8]) {
        let at = at as usize;
        self.bytes[at..at + data.len()].copy_from_slice(data);
    }
    fn ring(&self, pos: u64, len: u64) -> &[u8] {
        let at = (PAGE_SIZE + pos) as usize;
        &self.bytes[at..at + len as usize]
    }
    fn put_ring(&mut self, pos: u64, data: &[u8]) {
        self.put(PAGE_SIZE + pos, data)
    }

    fn set_keys(&mut self, offsets: &[u16]) {
        let mut words = [0u64; 16];
        for &off in offsets {
            let off = off as u64;
            if off % LGUEST_NET_KEY_STRIDE == 0 && off < PAGE_SIZE {
                let bit = off / LGUEST_NET_KEY_STRIDE;
                words[bit as usize / 64] |= 1 << (bit % 64);
            }
        }
        for (i, w) in words.iter().enumerate() {
            self.put(KEYS + 8 * i as u64, &w.to_le_bytes());
        }
    }

    fn listens(&self, offset: u64) -> bool {
        let bit = offset / LGUEST_NET_KEY_STRIDE;
        self.u32(STATE) == LIVE && self.u64(KEYS + 8 * (bit / 64)) & (1 << (bit % 64)) != 0
    }

    /// Whether Launcher `me` (its slot + 1) gets the ring lock: it is free,
    /// or its holder is gone (the holder is `me`, names no slot, or names a
    /// slot no Launcher holds). Slots 1 and 2 are held.
    fn lock(&mut self, me: u32) -> bool {
        let holder = self.u32(RING_LOCK);
        let alive = |h: u32| h != me && (h == RX as u32 + 1 || h == TX as u32 + 1);
        if holder != 0 && alive(holder) {
            return false;
        }
        // Taken, and given back when done.
        self.put(RING_LOCK, &0u32.to_le_bytes());
        true
    }

    /// A ring that makes no sense: emptied, if its lock can be had.
    fn recover(&mut self) {
        if self.lock(RX as u32 + 1) {
            self.put(TAIL, &0u64.to_le_bytes());
            self.put(HEAD, &0u64.to_le_bytes());
        }
    }

    /// What a drain delivers: `(offset, frame)` in order, the one held,
    /// and whether the ring was found garbled.
    fn drain(&mut self, no_room: &[bool]) -> (Vec<(u64, Vec<u8>)>, Option<(u64, Vec<u8>)>, bool) {
        let mut out = Vec::new();
        let mut head = self.u64(HEAD);
        let tail = self.u64(TAIL);
        let sane = |h: u64| tail.wrapping_sub(h) <= RING_BYTES && h % 8 == 0 && tail % 8 == 0;
        while head != tail || !sane(head) {
            if !sane(head) {
                self.recover();
                return (out, None, true);
            }
            let used = tail.wrapping_sub(head);
            let pos = head % RING_BYTES;
            let to_end = RING_BYTES - pos;
            let len = u32::from_le_bytes(self.ring(pos, 4).try_into().unwrap());
            let offset = u32::from_le_bytes(self.ring(pos + 4, 4).try_into().unwrap()) as u64;
            if len == WRAP {
                if to_end > used {
                    self.recover();
                    return (out, None, true);
                }
                head = head.wrapping_add(to_end);
                continue;
            }
            let need = RECORD_HEADER + pad8(len as u64);
            if len as usize > FRAME_MAX || need > to_end || need > used {
                self.recover();
                return (out, None, true);
            }
            let frame = self.ring(pos + RECORD_HEADER, len as u64).to_vec();
            head = head.wrapping_add(need);
            self.put(HEAD, &head.to_le_bytes());
            if offset < PAGE_SIZE && offset % LGUEST_NET_KEY_STRIDE == 0 {
                let full = no_room.get(out.len()).copied().unwrap_or(false);
                out.push((offset, frame.clone()));
                if full {
                    return (out, Some((offset, frame)), false);
                }
            }
        }
        // Past a last wrap record too.
        self.put(HEAD, &head.to_le_bytes());
        (out, None, false)
    }

    /// What slot 2's send returns (the bytes taken), and whether it found
    /// slot 1's ring garbled.
    fn send(&mut self, offset: u64, frame: &[u8]) -> (u32, bool) {
        if offset >= PAGE_SIZE || offset % LGUEST_NET_KEY_STRIDE != 0 || frame.len() > FRAME_MAX {
            return (0, false);
        }
        // Only slot 1 can listen: every other slot is empty.
        if !self.listens(offset) || !self.lock(TX as u32 + 1) {
            return (0, false);
        }
        let head = self.u64(HEAD);
        let mut tail = self.u64(TAIL);
        let used = tail.wrapping_sub(head);
        if used > RING_BYTES || tail % 8 != 0 {
            return (0, true);
        }
        let need = RECORD_HEADER + pad8(frame.len() as u64);
        let pos = tail % RING_BYTES;
        let to_end = RING_BYTES - pos;
        let wrap = if need > to_end { to_end } else { 0 };
        if used + wrap + need > RING_BYTES {
            return (0, false);
        }
        if wrap > 0 {
            self.put_ring(pos, &WRAP.to_le_bytes());
            tail = tail.wrapping_add(wrap);
        }
        let pos = tail % RING_BYTES;
        self.put_ring(pos, &(frame.len() as u32).to_le_bytes());
        self.put_ring(pos + 4, &(offset as u32).to_le_bytes());
        self.put_ring(pos + RECORD_HEADER, frame);
        self.put(TAIL, &tail.wrapping_add(need).to_le_bytes());
        // A sleeping receiver is woken, its word cleared.
        self.put(WAITING, &0u32.to_le_bytes());
        (frame.len() as u32, false)
    }
}

/// Writes `new` over slot 1 where it differs from `old`, a page at a time.
fn write_slot(file: &File, old: &[u8], new: &[u8]) {
    for (i, (a, b)) in old
        .chunks(PAGE_SIZE as usize)
        .zip(new.chunks(PAGE_SIZE as usize))
        .enumerate()
    {
        if a != b {
            file.write_all_at(b, slot_base(RX) + i as u64 * PAGE_SIZE)
                .expect("write the FILE");
        }
    }
}

/// A frame: mostly short, sometimes around FRAME_MAX (on either side).
fn frame(len: u16, fill: u8) -> Vec<u8> {
    let len = if len >= 0xFF00 {
        FRAME_MAX - 0x80 + (len as usize & 0xFF)
    } else {
        len as usize % 2048
    };
    (0..len).map(|i| fill.wrapping_add(i as u8)).collect()
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(bytes)) else {
        return;
    };
    NETS.with(|cell| {
        let mut cell = cell.borrow_mut();
        let nets = cell.get_or_insert_with(nets);
        run(nets, &input);
    });
});

fn run(nets: &mut Nets, input: &Input) {
    // Slot 1: live, ours, with the ring the input lays out from `head`.
    let mut model = Model {
        bytes: vec![0u8; STRIDE as usize],
    };
    model.put(STATE, &LIVE.to_le_bytes());
    model.put(PID, &std::process::id().to_le_bytes());
    model.put(WAITING, &(input.waiting as u32).to_le_bytes());
    let lock: u32 = match input.lock % 8 {
        4 => RX as u32 + 1,
        5 => TX as u32 + 1,
        6 => 7,
        7 => MAX_SLOTS as u32 + 1 + input.lock as u32,
        _ => 0,
    };
    model.put(RING_LOCK, &lock.to_le_bytes());
    let head = index(input.head);
    let mut tail = head;
    for r in input.records.iter().take(64) {
        let pos = tail % RING_BYTES;
        let mut record = Vec::new();
        match *r {
            Record::Frame { offset, len, fill } => {
                let f = frame(len, fill);
                record.extend_from_slice(&(f.len() as u32).to_le_bytes());
                record.extend_from_slice(&(offset as u32).to_le_bytes());
                record.extend_from_slice(&f);
                record.resize(pad8(record.len() as u64) as usize, 0);
            }
            Record::Wrap => {
                record.extend_from_slice(&WRAP.to_le_bytes());
                record.resize((RING_BYTES - pos) as usize, 0);
            }
            Record::Raw { len, offset } => {
                record.extend_from_slice(&len.to_le_bytes());
                record.extend_from_slice(&offset.to_le_bytes());
            }
        }
        let fits = record.len().min((RING_BYTES - pos) as usize);
        model.put_ring(pos, &record[..fits]);
        tail = tail.wrapping_add(record.len() as u64);
    }
    let tail = input.tail.map(index).unwrap_or(tail);
    model.put(HEAD, &head.to_le_bytes());
    model.put(TAIL, &tail.to_le_bytes());
    write_slot(&nets.file, &nets.slot, &model.bytes);
    let keys: Vec<u64> = input.keys.iter().map(|&k| k as u64).collect();
    nets.rx.publish_keys(&keys);
    model.set_keys(&input.keys);

    for step in input.steps.iter().take(16) {
        match step {
            Step::Drain { no_room } => {
                let garbled = nets.rx.stats.garbled.load(Ordering::Relaxed);
                let (want, want_held, want_garbled) = model.drain(no_room);
                let mut got = Vec::new();
                let held = nets.rx.drain_now(|offset, f| {
                    let full = no_room.get(got.len()).copied().unwrap_or(false);
                    got.push((offset, f.to_vec()));
                    if full {
                        Offer::NoRoom
                    } else {
                        Offer::Done
                    }
                });
                assert!(
                    got == want,
                    "a drain delivered {got:?}, the format says {want:?}"
                );
                assert_eq!(held, want_held, "the frame held");
                let now = nets.rx.stats.garbled.load(Ordering::Relaxed);
                assert_eq!(now - garbled, want_garbled as u64, "a garbled ring seen");
            }
            Step::Send { offset, len, fill } => {
                let f = frame(*len, *fill);
                let garbled = nets.tx.stats.garbled.load(Ordering::Relaxed);
                let (want, want_garbled) = model.send(*offset as u64, &f);
                let got = nets.tx.send(*offset as u64, &f);
                assert_eq!(got, want, "a send of {} bytes to {offset:#x}", f.len());
                let now = nets.tx.stats.garbled.load(Ordering::Relaxed);
                assert_eq!(
                    now - garbled,
                    want_garbled as u64,
                    "a garbled ring seen by a sender"
                );
            }
            Step::Junk { at, bytes } => {
                let at = *at as u64 % STRIDE;
                let n = bytes.len().min((STRIDE - at) as usize);
                nets.file
                    .write_all_at(&bytes[..n], slot_base(RX) + at)
                    .expect("write the FILE");
                model.put(at, &bytes[..n]);
            }
            Step::Keys(offsets) => {
                let keys: Vec<u64> = offsets.iter().map(|&k| k as u64).collect();
                nets.rx.publish_keys(&keys);
                model.set_keys(offsets);
            }
        }
    }

    let mut now = vec![0u8; STRIDE as usize];
    nets.file
        .read_exact_at(&mut now, slot_base(RX))
        .expect("read the FILE");
    assert_bytes_as_modelled(
        &now,
        &model.bytes,
        "slot 1 (the model is the FILE's format)",
    );
    nets.slot = now;
    let mut front = vec![0u8; slot_base(RX) as usize];
    nets.file
        .read_exact_at(&mut front, 0)
        .expect("read the FILE");
    assert!(front == nets.front, "the FILE before slot 1 changed");
}
