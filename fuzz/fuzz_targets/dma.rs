//! The 2007 device model (ABI section 9) as a Guest drives it: a device
//! table of any shape, then BIND_DMA, SEND_DMA and deliveries into bound
//! buffers, with the Guest rewriting its lguest_dma structures in between.
//! The code under test is `host/src/dma/table.rs` (the table, who owns a
//! key), `host/src/dma/bindings.rs` (every rule, the bindings, delivery)
//! and `dma::outgoing` (SEND_DMA's checks and gather).
//!
//! A model written from section 9 alone says what each call must do: which
//! rule it breaks (the exact `DmaError`), what RAX is, which bytes SEND_DMA
//! gathers, which buffer a delivery fills and how. After every step Guest
//! memory must be exactly what the model says (so nothing is written but the
//! buffer filled, its used_len and the table at set-up), and the Host's
//! pages unchanged. A broken rule ends the Guest: the script stops there.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use lguest::dma::bindings::{Bindings, DMA_SIZE};
use lguest::dma::table::TableError;
use lguest::dma::{self, Call, Delivered, DeviceTable, DmaError, KeyOwner, Misplaced};
use lguest::memory::GuestMemory;
use lguest_abi::{LGUEST_DEVICE_T_BLOCK, LGUEST_DEVICE_T_CONSOLE, LGUEST_DEVICE_T_NET, PAGE_SIZE};
use lguest_fuzz::{assert_bytes_as_modelled, assert_reason, guest_bytes, reused_memory, HostPages};
use libfuzzer_sys::fuzz_target;

/// Small, so that page boundaries and the end of RAM are often hit.
const RAM_PAGES: u64 = 4;
const MEM: u64 = RAM_PAGES * PAGE_SIZE;

#[derive(Arbitrary, Debug)]
enum Device {
    Block { sectors: u32, huge: bool },
    Net { features: u16 },
}

/// An address as a Guest might pick one: in RAM, near an edge, or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Ram(u16),
    Near(u8, i16),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Key {
    Console,
    /// Inside (or one page past) the device pages.
    Device(u8, u16),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Step {
    Bind {
        key: Key,
        array: Addr,
        count: u8,
        irq: u8,
        raw: Option<u64>,
    },
    /// BIND_DMA with irq 0, for a binding the model holds (or any key and
    /// address).
    Unbind {
        which: u8,
        other: Option<(Key, Addr)>,
    },
    Send {
        key: Key,
        dma: Addr,
    },
    /// Bytes arriving for a key: what a device or another Guest sends.
    Deliver {
        key: Key,
        which: u8,
        len: u16,
        fill: u8,
    },
    /// The Guest writes a lguest_dma (its sections ended by a length 0
    /// unless all 16 are used).
    WriteDma {
        at: Addr,
        used_len: u32,
        sections: Vec<(Addr, u16)>,
    },
    /// The Guest writes anything anywhere in its memory.
    Write {
        at: Addr,
        bytes: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    devices: Vec<Device>,
    steps: Vec<Step>,
}

/// A binding as the model keeps it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Bound {
    key: u64,
    array: u64,
    count: u64,
    irq: u32,
}

struct Model {
    /// Guest memory, `[0, memory_end)`, as it must be.
    bytes: Vec<u8>,
    /// Device page kinds, in table order: true for a block device.
    blocks: Vec<bool>,
    host_base: u64,
    bound: Vec<Bound>,
}

fn addr(a: Addr, mem: &GuestMemory) -> u64 {
    let l = &mem.layout;
    match a {
        Addr::Ram(v) => v as u64 % MEM,
        Addr::Near(anchor, off) => {
            let base = match anchor % 6 {
                0 => 0,
                1 => MEM,
                2 => l.host_base(),
                3 => l.memory_end(),
                // Page boundaries inside RAM.
                4 => PAGE_SIZE,
                _ => 2 * PAGE_SIZE,
            };
            base.wrapping_add(off as i64 as u64)
        }
        Addr::Raw(v) => v,
    }
}

fn key(k: Key, model: &Model) -> u64 {
    match k {
        Key::Console => 0,
        Key::Device(entry, offset) => {
            let entry = entry as u64 % (model.blocks.len() as u64 + 1);
            MEM + PAGE_SIZE * (1 + entry) + (offset as u64 % PAGE_SIZE)
        }
        Key::Raw(v) => v,
    }
}

impl Model {
    fn u32_at(&self, at: u64) -> u32 {
        let at = at as usize;
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap())
    }

    fn put(&mut self, at: u64, data: &[u8]) {
        let at = at as usize;
        self.bytes[at..at + data.len()].copy_from_slice(data);
    }

    /// Section 9: a structure or section lies in RAM, within one page.
    fn place(&self, at: u64, len: u64) -> Result<(), Misplaced> {
        match at.checked_add(len) {
            Some(end) if end <= MEM => {
                if len > 0 && at / PAGE_SIZE != (end - 1) / PAGE_SIZE {
                    Err(Misplaced::CrossesPage)
                } else {
                    Ok(())
                }
            }
            // Past RAM (or past the end of the address space).
            _ if at >= self.host_base => Err(Misplaced::InHostPage),
            _ => Err(Misplaced::OutsideRam),
        }
    }

    /// Who owns `key`: 0 the console, else a 4-byte aligned address in a
    /// device page.
    fn owner(&self, call: Call, key: u64) -> Result<KeyOwner, DmaError> {
        if key == 0 {
            return Ok(KeyOwner::Console);
        }
        let first = MEM + PAGE_SIZE;
        let pages = self.blocks.len() as u64;
        if key < first || key >= first + pages * PAGE_SIZE {
            return Err(DmaError::KeyOutsideDevicePages { call, key });
        }
        if key % 4 != 0 {
            return Err(DmaError::KeyUnaligned { call, key });
        }
        let entry = ((key - first) / PAGE_SIZE) as usize;
        let block = self.blocks[entry];
        let index = self.blocks[..entry].iter().filter(|&&b| b == block).count();
        let offset = key % PAGE_SIZE;
        Ok(if block {
            KeyOwner::Block { index, offset }
        } else {
            KeyOwner::Net { index, offset }
        })
    }

    /// The sections of the lguest_dma at `at` (which lies in RAM), up to the
    /// first length 0.
    fn sections(&self, at: u64) -> Vec<(u64, u16)> {
        let b = &self.bytes[at as usize..(at + DMA_SIZE) as usize];
        (0..16)
            .map(|i| {
                let a = u64::from_le_bytes(b[8 + 8 * i..16 + 8 * i].try_into().unwrap());
                let l = u16::from_le_bytes(b[136 + 2 * i..138 + 2 * i].try_into().unwrap());
                (a, l)
            })
            .take_while(|&(_, l)| l != 0)
            .collect()
    }

    /// The lguest_dma at `at` and its sections, checked for `call`.
    fn check_dma(&self, call: Call, at: u64) -> Result<Vec<(u64, u16)>, DmaError> {
        self.place(at, DMA_SIZE).map_err(|place| DmaError::BadDma {
            call,
            addr: at,
            place,
        })?;
        let sections = self.sections(at);
        for (index, &(a, len)) in sections.iter().enumerate() {
            self.place(a, len as u64)
                .map_err(|place| DmaError::BadSection {
                    call,
                    dma: at,
                    index,
                    addr: a,
                    len,
                    place,
                })?;
        }
        Ok(sections)
    }

    fn bind(&mut self, key: u64, array: u64, count_irq: u64) -> Result<u64, DmaError> {
        self.owner(Call::Bind, key)?;
        let irq = count_irq & 0xFF;
        let count = count_irq >> 8;
        if irq == 0 {
            let found = self
                .bound
                .iter()
                .position(|b| b.key == key && b.array == array);
            return Ok(match found {
                Some(i) => {
                    self.bound.remove(i);
                    1
                }
                None => 0,
            });
        }
        if irq > 31 {
            return Err(DmaError::BadIrq { irq });
        }
        if count == 0 || count > 16 {
            return Err(DmaError::BadCount { count });
        }
        if self.bound.len() == 32 {
            return Err(DmaError::TooManyBindings);
        }
        for i in 0..count {
            self.check_dma(Call::Bind, array.wrapping_add(i * DMA_SIZE))?;
        }
        self.bound.push(Bound {
            key,
            array,
            count,
            irq: irq as u32,
        });
        Ok(1)
    }

    fn send(&self, key: u64, at: u64) -> Result<(KeyOwner, Vec<u8>), DmaError> {
        let owner = self.owner(Call::Send, key)?;
        let sections = self.check_dma(Call::Send, at)?;
        let mut out = Vec::new();
        for (a, len) in sections {
            out.extend_from_slice(&self.bytes[a as usize..(a + len as u64) as usize]);
        }
        Ok((owner, out))
    }

    /// The first bound buffer at `key` with used_len 0 gets as much of
    /// `data` as fits, section by section, then its used_len.
    fn deliver(&mut self, key: u64, data: &[u8]) -> Result<Option<Delivered>, DmaError> {
        let call = Call::Deliver { key };
        let bound: Vec<Bound> = self
            .bound
            .iter()
            .filter(|b| b.key == key)
            .copied()
            .collect();
        for b in bound {
            for i in 0..b.count {
                let at = b.array + i * DMA_SIZE;
                // Placed at BIND_DMA, and RAM does not move.
                assert!(self.place(at, DMA_SIZE).is_ok());
                if self.u32_at(at) != 0 {
                    continue;
                }
                let sections = self.check_dma(call, at)?;
                let mut done = 0usize;
                for (a, len) in sections {
                    let n = (len as usize).min(data.len() - done);
                    self.put(a, &data[done..done + n]);
                    done += n;
                }
                self.put(at, &(done as u32).to_le_bytes());
                return Ok(Some(Delivered {
                    bytes: done as u32,
                    irq: b.irq,
                    dma: at,
                }));
            }
        }
        Ok(None)
    }
}

/// The 16 table entries and the block pages, as section 9 lays them out.
fn expected_table(model: &mut Model, devices: &[(bool, u64, u16)]) {
    let mut entry = |i: usize, type_: u16, features: u16, pages: u16, pfn: u32| {
        let mut e = [0u8; 12];
        e[0..2].copy_from_slice(&type_.to_le_bytes());
        e[2..4].copy_from_slice(&features.to_le_bytes());
        e[6..8].copy_from_slice(&pages.to_le_bytes());
        e[8..12].copy_from_slice(&pfn.to_le_bytes());
        model.put(MEM + 12 * i as u64, &e);
    };
    entry(0, LGUEST_DEVICE_T_CONSOLE, 0, 0, 0);
    for (i, &(block, _, features)) in devices.iter().enumerate() {
        let pfn = (MEM / PAGE_SIZE) as u32 + 1 + i as u32;
        if block {
            entry(i + 1, LGUEST_DEVICE_T_BLOCK, 0, 1, pfn);
        } else {
            entry(i + 1, LGUEST_DEVICE_T_NET, features, 1, pfn);
        }
    }
    for (i, &(block, sectors, _)) in devices.iter().enumerate() {
        if block {
            let page = MEM + PAGE_SIZE * (1 + i as u64);
            model.put(page + 16, &(sectors as u32).to_le_bytes());
        }
    }
}

fn check_memory(mem: &GuestMemory, model: &Model, what: &str) {
    let what = format!("Guest memory after {what} (the model is section 9)");
    assert_bytes_as_modelled(&guest_bytes(mem), &model.bytes, &what);
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(bytes)) else {
        return;
    };
    let devices: Vec<(bool, u64, u16)> = input
        .devices
        .iter()
        .take(17)
        .map(|d| match *d {
            Device::Block { sectors, huge } => {
                let sectors = if huge {
                    u32::MAX as u64 + 1 + sectors as u64
                } else {
                    sectors as u64
                };
                (true, sectors, 0)
            }
            Device::Net { features } => (false, 0, features),
        })
        .collect();
    let disks: Vec<u64> = devices.iter().filter(|d| d.0).map(|d| d.1).collect();
    let nets: Vec<u16> = devices.iter().filter(|d| !d.0).map(|d| d.2).collect();
    // The table lists disks first, then networks.
    let devices: Vec<(bool, u64, u16)> = devices
        .iter()
        .filter(|d| d.0)
        .chain(devices.iter().filter(|d| !d.0))
        .copied()
        .collect();

    let table = match DeviceTable::new(MEM, &disks, &nets) {
        Ok(t) => {
            assert!(devices.len() <= 15, "a table of {} devices", devices.len());
            assert!(disks.iter().all(|&s| s <= u32::MAX as u64));
            t
        }
        Err(e) => {
            assert_reason(&e.to_string(), "the device table");
            match e {
                TableError::TooManyDevices { asked, max } => {
                    assert_eq!((asked, max), (devices.len() + 1, 16))
                }
                TableError::DiskTooLarge { sectors, .. } => {
                    assert!(devices.len() <= 15 && sectors > u32::MAX as u64)
                }
                other => panic!("a table refused for {other:?}"),
            }
            return;
        }
    };
    assert_eq!(table.pages(), 1 + devices.len() as u64);
    let mem = reused_memory(RAM_PAGES, table.pages(), 0, 1, 1);
    let host = HostPages::snapshot(&mem);
    let mut model = Model {
        bytes: guest_bytes(&mem),
        blocks: devices.iter().map(|d| d.0).collect(),
        host_base: mem.layout.host_base(),
        bound: Vec::new(),
    };
    table.write(&mem).expect("the table fits its pages");
    expected_table(&mut model, &devices);
    check_memory(&mem, &model, "writing the table");
    for (i, &(block, _, _)) in devices.iter().enumerate() {
        let page = MEM + PAGE_SIZE * (1 + i as u64);
        let (b, n) = (
            table.block_page(model.blocks[..i].iter().filter(|&&x| x).count()),
            table.net_page(model.blocks[..i].iter().filter(|&&x| !x).count()),
        );
        assert_eq!(if block { b } else { n }, Some(page));
    }

    let mut bindings = Bindings::new();
    let mut out = Vec::new();
    for step in input.steps.iter().take(48) {
        let (what, result): (&str, Result<(), DmaError>) = match step {
            Step::Bind {
                key: k,
                array,
                count,
                irq,
                raw,
            } => {
                let k = key(*k, &model);
                let array = addr(*array, &mem);
                let count_irq = raw.unwrap_or(((*count as u64 % 18) << 8) | (*irq as u64 % 34));
                let want = model.bind(k, array, count_irq);
                let got = bindings.bind(&mem, &table, k, array, count_irq);
                assert_eq!(got, want, "BIND_DMA({k:#x}, {array:#x}, {count_irq:#x})");
                ("BIND_DMA", got.map(drop))
            }
            Step::Unbind { which, other } => {
                let (k, array) = match other {
                    Some((k, a)) => (key(*k, &model), addr(*a, &mem)),
                    None if model.bound.is_empty() => continue,
                    None => {
                        let b = model.bound[*which as usize % model.bound.len()];
                        (b.key, b.array)
                    }
                };
                let want = model.bind(k, array, 0);
                let got = bindings.bind(&mem, &table, k, array, 0);
                assert_eq!(got, want, "BIND_DMA({k:#x}, {array:#x}, 0)");
                ("an unbind", got.map(drop))
            }
            Step::Send { key: k, dma } => {
                let k = key(*k, &model);
                let at = addr(*dma, &mem);
                let want = model.send(k, at);
                let got = dma::outgoing(&mem, &table, k, at, &mut out);
                match (&got, &want) {
                    (Ok(owner), Ok((o, bytes))) => {
                        assert_eq!(owner, o, "SEND_DMA to {k:#x}");
                        assert!(
                            out == *bytes,
                            "SEND_DMA of {at:#x} gathered the wrong bytes"
                        );
                    }
                    _ => assert_eq!(got.as_ref().err(), want.as_ref().err(), "SEND_DMA"),
                }
                ("SEND_DMA", got.map(drop))
            }
            Step::Deliver {
                key: k,
                which,
                len,
                fill,
            } => {
                // Mostly at a key something is bound at.
                let k = match (k, model.bound.is_empty()) {
                    (Key::Console, false) => model.bound[*which as usize % model.bound.len()].key,
                    _ => key(*k, &model),
                };
                let data: Vec<u8> = (0..*len % 2048)
                    .map(|i| fill.wrapping_add(i as u8))
                    .collect();
                let want = model.deliver(k, &data);
                let got = bindings.deliver(&mem, k, &data);
                assert_eq!(got, want, "a delivery of {} bytes to {k:#x}", data.len());
                ("a delivery", got.map(drop))
            }
            Step::WriteDma {
                at,
                used_len,
                sections,
            } => {
                let at = addr(*at, &mem);
                let mut d = [0u8; DMA_SIZE as usize];
                d[..4].copy_from_slice(&used_len.to_le_bytes());
                for (i, &(a, l)) in sections.iter().take(16).enumerate() {
                    d[8 + 8 * i..16 + 8 * i].copy_from_slice(&addr(a, &mem).to_le_bytes());
                    d[136 + 2 * i..138 + 2 * i].copy_from_slice(&l.to_le_bytes());
                }
                if mem.write(at, &d).is_ok() {
                    model.put(at, &d);
                }
                ("a Guest write", Ok(()))
            }
            Step::Write { at, bytes } => {
                let at = addr(*at, &mem);
                if mem.write(at, bytes).is_ok() {
                    model.put(at, bytes);
                }
                ("a Guest write", Ok(()))
            }
        };
        check_memory(&mem, &model, what);
        host.assert_unchanged(&mem, what);
        assert_eq!(
            bindings.list().len(),
            model.bound.len(),
            "live bindings after {what}"
        );
        if let Err(e) = result {
            // Sudden Death: the Guest makes no more calls.
            assert_reason(&e.to_string(), what);
            break;
        }
    }
});
