//! The virtio-mmio transport (host/src/virtio/mmio.rs), reached the way a
//! Guest reaches it: loads and stores of any width at any address, which the
//! bus routes to a device's 0x200-byte window or refuses as not its own.
//!
//! The script is checked against a model of the registers written from the
//! virtio 1.2 spec (4.2.2): each access succeeds or fails as the model says,
//! and reads return what the model holds. Above all: a queue goes live only
//! after FEATURES_OK and only with all three areas inside Guest memory;
//! FEATURES_OK sticks only for features the device offered, VERSION_1 among
//! them; a reset forgets everything; every refusal says why; and the Host
//! pages never change, whatever the devices did with the rings.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use lguest::bus::{self, Bus, Transport};
use lguest::kick::{install_kick_handler, Irqs};
use lguest::memory::GuestMemory;
use lguest::virtio::mmio::WINDOW;
use lguest::virtio::Device;
use lguest_fuzz::{assert_reason, reused_memory, EchoDevice, HostPages};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

const RAM_PAGES: u64 = 4;
const MAGIC: u32 = 0x7472_6976;
const QUEUE_NUM_MAX: u32 = 256;
const FEATURES_OK: u32 = 8;

#[derive(Arbitrary, Debug)]
struct Spec {
    id: u8,
    queues: u8,
    features: u32,
    config_len: u8,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A load of `size` bytes (0 to 8) in a device's window.
    Read { dev: u8, offset: u16, size: u8 },
    /// A store of the low `size` bytes of `value` in a device's window.
    Write {
        dev: u8,
        offset: u16,
        size: u8,
        value: u64,
    },
    /// A load or store anywhere at all.
    Raw { addr: u64, size: u8, write: bool },
    /// A driver's usual set-up of one queue (a helper: the same stores
    /// as a script of Writes would make).
    SetUp {
        dev: u8,
        queue: u8,
        num: u16,
        areas: [u16; 3],
    },
    /// The Guest offers a one-descriptor chain on a queue's rings.
    Offer {
        dev: u8,
        queue: u8,
        addr: u16,
        len: u16,
        flags: u16,
    },
    /// The Guest writes 8 bytes anywhere in its memory.
    Poke { addr: u16, value: u64 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    devices: Vec<Spec>,
    ops: Vec<Op>,
}

#[derive(Clone, Copy, Default, Debug)]
struct QueueModel {
    num: u32,
    ready: bool,
    areas: [u64; 3],
}

/// One window's registers as the spec says they behave.
struct Model {
    base: u64,
    id: u32,
    config: Vec<u8>,
    device_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    queues: Vec<QueueModel>,
}

impl Model {
    fn reset(&mut self) {
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.queues
            .iter_mut()
            .for_each(|q| *q = QueueModel::default());
    }

    fn selected(&mut self) -> Option<&mut QueueModel> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// What a load returns: Some(bytes) or None for a refusal. None in the
    /// inner option means "any value" (the interrupt status, which the
    /// device sets as it returns buffers).
    fn read(&mut self, offset: u64, size: usize) -> Option<Option<Vec<u8>>> {
        if offset >= 0x100 {
            let at = (offset - 0x100) as usize;
            if !matches!(size, 1 | 2 | 4) {
                return None;
            }
            return self.config.get(at..at + size).map(|b| Some(b.to_vec()));
        }
        if size != 4 || !offset.is_multiple_of(4) {
            return None;
        }
        let v = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.id,
            0x00C => return Some(None),
            0x010 => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            0x034 => self.selected().map_or(0, |_| QUEUE_NUM_MAX),
            0x044 => self.selected().map_or(0, |q| q.ready as u32),
            0x060 => return Some(None),
            0x070 => self.status,
            0x0FC => 0,
            _ => return None,
        };
        Some(Some(v.to_le_bytes().to_vec()))
    }

    /// Whether a store is accepted, updating the model if so. `end` is the
    /// end of Guest memory, which queue areas must lie below.
    fn write(&mut self, offset: u64, data: &[u8], end: u64) -> bool {
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return false;
        }
        let v = u32::from_le_bytes(data.try_into().unwrap());
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => match self.driver_features_sel {
                0 => self.driver_features = self.driver_features & !0xFFFF_FFFF | v as u64,
                1 => self.driver_features = self.driver_features & 0xFFFF_FFFF | (v as u64) << 32,
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if v > QUEUE_NUM_MAX || (v != 0 && !v.is_power_of_two()) {
                    return false;
                }
                match self.selected() {
                    Some(q) if !q.ready => q.num = v,
                    _ => return false,
                }
            }
            0x044 => {
                if v != 0 && self.status & FEATURES_OK == 0 {
                    return false;
                }
                let Some(q) = self.selected() else {
                    return false;
                };
                if v == 0 {
                    q.ready = false;
                    return true;
                }
                let n = if q.num == 0 { QUEUE_NUM_MAX } else { q.num } as u64;
                let sizes = [16 * n, 4 + 2 * n + 2, 4 + 8 * n + 2];
                let inside = q
                    .areas
                    .iter()
                    .zip(sizes)
                    .all(|(&a, s)| a.checked_add(s).is_some_and(|e| e <= end));
                if !inside {
                    return false;
                }
                q.ready = true;
            }
            0x050 | 0x064 => {}
            0x070 => {
                if v == 0 {
                    self.reset();
                    return true;
                }
                let mut v = v;
                if v & FEATURES_OK != 0 && self.status & FEATURES_OK == 0 {
                    let ok = self.driver_features & !self.device_features == 0
                        && self.driver_features & 1 << VIRTIO_F_VERSION_1 != 0;
                    if !ok {
                        v &= !FEATURES_OK;
                    }
                }
                self.status = v;
            }
            0x080 | 0x084 | 0x090 | 0x094 | 0x0A0 | 0x0A4 => {
                let area = ((offset - 0x080) / 0x10) as usize;
                let high = offset % 0x10 == 4;
                match self.selected() {
                    Some(q) if !q.ready => {
                        let old = q.areas[area];
                        q.areas[area] = if high {
                            old & 0xFFFF_FFFF | (v as u64) << 32
                        } else {
                            old & !0xFFFF_FFFF | v as u64
                        };
                    }
                    _ => return false,
                }
            }
            _ => return false,
        }
        true
    }
}

struct World {
    mem: GuestMemory,
    bus: Bus,
    models: Vec<Model>,
    host: HostPages,
}

/// Set when an access ended the Guest (a device found a broken ring).
struct Dead;

impl World {
    fn model_at(&mut self, addr: u64) -> Option<&mut Model> {
        self.models
            .iter_mut()
            .find(|m| m.base <= addr && addr < m.base + WINDOW)
    }

    fn load(&mut self, addr: u64, size: usize) -> Result<(), Dead> {
        let mut data = vec![0u8; size];
        let got = self.bus.mmio_read(addr, &mut data);
        let Some(m) = self.model_at(addr) else {
            assert!(
                got.is_none(),
                "a load at {addr:#x}, in no window, was taken"
            );
            return Ok(());
        };
        let offset = addr - m.base;
        let want = m.read(offset, size);
        match (got.expect("a load in a window was not taken"), want) {
            (Ok(()), Some(Some(bytes))) => assert!(
                data == bytes,
                "load of {size} at {offset:#x}: {data:x?}, not {bytes:x?}"
            ),
            (Ok(()), Some(None)) => {}
            (Err(e), None) => {
                let e = e.to_string();
                assert_reason(&e, "a load");
                assert!(e.starts_with("virtio-mmio"), "{e}");
            }
            (got, want) => panic!("load of {size} at {offset:#x}: {got:?}, model {want:?}"),
        }
        Ok(())
    }

    fn store(&mut self, addr: u64, data: &[u8]) -> Result<(), Dead> {
        let end = self.mem.layout.memory_end();
        let got = self.bus.mmio_write(addr, data);
        let Some(m) = self.model_at(addr) else {
            assert!(
                got.is_none(),
                "a store at {addr:#x}, in no window, was taken"
            );
            return Ok(());
        };
        let offset = addr - m.base;
        let kick = offset == 0x050 && data.len() == 4;
        let want = m.write(offset, data, end);
        let got = got.expect("a store in a window was not taken");
        match (got, want) {
            (Ok(()), true) => {}
            // A kick that finds a broken ring ends the Guest; that is the
            // device's refusal, not the register's.
            (Err(e), true) if kick => {
                let e = e.to_string();
                assert_reason(e.strip_prefix("echo ").unwrap_or(&e), "a kick");
                return Err(Dead);
            }
            (Err(e), false) => assert_reason(&e.to_string(), "a store"),
            (got, want) => {
                panic!("store {data:x?} at {offset:#x}: {got:?}, model accepts: {want}")
            }
        }
        // Whatever was accepted, a live queue's rings are Guest memory.
        for q in self
            .models
            .iter()
            .flat_map(|m| &m.queues)
            .filter(|q| q.ready)
        {
            assert!(
                q.areas.iter().all(|&a| a < end),
                "a live queue outside memory: {q:?}"
            );
        }
        Ok(())
    }

    fn reg(&mut self, dev: u8, offset: u64, value: u32) -> Result<(), Dead> {
        let base = self.models[dev as usize % self.models.len()].base;
        self.store(base + offset, &value.to_le_bytes())
    }

    fn run(&mut self, op: &Op) -> Result<(), Dead> {
        let pick = |dev: u8| dev as usize % self.models.len();
        match *op {
            Op::Read { dev, offset, size } => {
                let base = self.models[pick(dev)].base;
                self.load(base + offset as u64 % WINDOW, size as usize % 9)
            }
            Op::Write {
                dev,
                offset,
                size,
                value,
            } => {
                let base = self.models[pick(dev)].base;
                let data = &value.to_le_bytes()[..size as usize % 9];
                self.store(base + offset as u64 % WINDOW, data)
            }
            Op::Raw { addr, size, write } => {
                let size = size as usize % 9;
                if write {
                    self.store(addr, &vec![0x11; size])
                } else {
                    self.load(addr, size)
                }
            }
            Op::SetUp {
                dev,
                queue,
                num,
                areas,
            } => {
                self.reg(dev, 0x070, 1 | 2)?;
                self.reg(dev, 0x024, 1)?;
                self.reg(dev, 0x020, 1 << (VIRTIO_F_VERSION_1 - 32))?;
                self.reg(dev, 0x070, 1 | 2 | FEATURES_OK)?;
                self.reg(dev, 0x030, queue as u32)?;
                self.reg(dev, 0x038, num as u32)?;
                for (i, a) in areas.iter().enumerate() {
                    self.reg(dev, 0x080 + 0x10 * i as u64, *a as u32)?;
                    self.reg(dev, 0x084 + 0x10 * i as u64, 0)?;
                }
                self.reg(dev, 0x044, 1)?;
                self.reg(dev, 0x070, 1 | 2 | FEATURES_OK | 4)
            }
            Op::Offer {
                dev,
                queue,
                addr,
                len,
                flags,
            } => {
                let m = &self.models[pick(dev)];
                let Some(q) = m.queues.get(queue as usize % m.queues.len()) else {
                    return Ok(());
                };
                let n = if q.num == 0 { QUEUE_NUM_MAX } else { q.num } as u64;
                let [desc, avail, _] = q.areas;
                let mut idx = [0u8; 2];
                if self.mem.read(avail + 2, &mut idx).is_err() {
                    return Ok(());
                }
                let idx = u16::from_le_bytes(idx);
                let slot = idx as u64 % n;
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&(addr as u64).to_le_bytes());
                d[8..12].copy_from_slice(&(len as u32).to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                let _ = self.mem.write(desc + 16 * slot, &d);
                let _ = self
                    .mem
                    .write(avail + 4 + 2 * slot, &(slot as u16).to_le_bytes());
                let _ = self
                    .mem
                    .write(avail + 2, &idx.wrapping_add(1).to_le_bytes());
                Ok(())
            }
            Op::Poke { addr, value } => {
                let _ = self.mem.write(addr as u64, &value.to_le_bytes());
                Ok(())
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    install_kick_handler().expect("kick handler");
    let specs: Vec<Spec> = input.devices.into_iter().take(3).collect();
    if specs.is_empty() {
        return;
    }
    let devices: Vec<Box<dyn Device>> = specs
        .iter()
        .map(|s| -> Box<dyn Device> {
            let config = (0..s.config_len).map(|i| i ^ s.id).collect();
            Box::new(EchoDevice::new(
                s.id,
                1 + s.queues as usize % 4,
                s.features,
                config,
            ))
        })
        .collect();
    let device_pages = bus::device_pages(&devices, Transport::Mmio);
    let hole = bus::mmio_hole_pages(devices.len());
    let mem = reused_memory(RAM_PAGES, device_pages, hole, 2, 1);
    let host = HostPages::snapshot(&mem);
    let irqs = Irqs::new().expect("irqs");
    let windows = bus::mmio_windows(mem.layout.mem, devices.len());
    for &(base, _) in &windows {
        assert!(
            base >= mem.layout.memory_end() && base + WINDOW <= mem.layout.guest_limit(),
            "window {base:#x} is not in the hole"
        );
    }
    let bus = Bus::new(&mem, devices, &irqs, Transport::Mmio).expect("bus");
    let models = specs
        .iter()
        .zip(&windows)
        .map(|(s, &(base, _))| Model {
            base,
            id: s.id as u32,
            config: (0..s.config_len).map(|i| i ^ s.id).collect(),
            device_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            queues: vec![QueueModel::default(); 1 + s.queues as usize % 4],
        })
        .collect();
    let mut world = World {
        mem,
        bus,
        models,
        host,
    };
    // The device offers what it asked for, and VERSION_1 (read as a driver
    // reads it; the model learns it here).
    for (i, s) in specs.iter().enumerate() {
        let base = world.models[i].base;
        let mut words = [0u32; 2];
        for (sel, w) in words.iter_mut().enumerate() {
            let mut b = [0u8; 4];
            world
                .bus
                .mmio_write(base + 0x014, &(sel as u32).to_le_bytes());
            world.bus.mmio_read(base + 0x010, &mut b).unwrap().unwrap();
            *w = u32::from_le_bytes(b);
        }
        world.bus.mmio_write(base + 0x014, &0u32.to_le_bytes());
        let offered = words[0] as u64 | (words[1] as u64) << 32;
        assert_eq!(offered & s.features as u64, s.features as u64);
        assert_ne!(offered & 1 << VIRTIO_F_VERSION_1, 0);
        world.models[i].device_features = offered;
    }
    for op in input.ops.iter().take(64) {
        let dead = world.run(op).is_err();
        world.host.assert_unchanged(&world.mem, "the mmio devices");
        if dead {
            break;
        }
    }
    world.host.assert_unchanged(&world.mem, "the mmio devices");
    drop(world);
});
