//! The lguest bus (host/src/bus.rs, ABI section 8): a set of devices the
//! input chooses, their descriptor page, then a script of what a Guest
//! does with it: status and feature writes, buffers offered on the rings,
//! NOTIFY at descriptors, rings and anywhere else, scribbles anywhere.
//!
//! Checked: the descriptor page is what section 8 says for these devices
//! (or check_fits refused them, saying why); NOTIFY claims exactly the
//! descriptor and ring addresses; a status of 0 or FAILED resets the device,
//! clearing its Guest features and rings, and any other status changes
//! nothing; a broken ring ends the Guest with a reason; the Host pages
//! never change.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use lguest::bus::{self, Bus, Transport};
use lguest::kick::{install_kick_handler, Irqs};
use lguest::memory::GuestMemory;
use lguest::virtio::queue::ring_bytes;
use lguest::virtio::{Device, COMMON_FEATURES};
use lguest_abi::{
    FEATURE_LEN, LGUEST_IRQS, PAGE_SIZE, VIRTIO_STATUS_DRIVER_OK, VIRTIO_STATUS_FAILED,
    VRING_DEFAULT_NUM,
};
use lguest_fuzz::{assert_reason, guest_bytes, reused_memory, EchoDevice, HostPages};
use libfuzzer_sys::fuzz_target;

const RAM_PAGES: u64 = 4;
const NUM: u64 = VRING_DEFAULT_NUM as u64;

#[derive(Arbitrary, Debug)]
struct Spec {
    id: u8,
    queues: u8,
    features: u32,
    config_len: u8,
}

#[derive(Arbitrary, Debug)]
enum Notify {
    Descriptor(u8),
    Ring(u8, u8),
    /// Near a descriptor or ring: off by a little.
    Near(u8, i16),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// The Guest writes a device's status byte and tells us.
    Status {
        dev: u8,
        value: u8,
    },
    /// The Guest writes its accepted feature bits.
    Features {
        dev: u8,
        value: u32,
    },
    /// The Guest offers a one-descriptor chain on a ring (a helper: the
    /// same bytes as a Poke script would write).
    Offer {
        dev: u8,
        queue: u8,
        slot: u8,
        addr: u16,
        len: u16,
        flags: u16,
        next: u16,
    },
    /// The Guest writes 8 bytes anywhere in its memory.
    Poke {
        addr: u32,
        value: u64,
    },
    Notify(Notify),
}

#[derive(Arbitrary, Debug)]
struct Input {
    devices: Vec<Spec>,
    ops: Vec<Op>,
}

/// Where one device is on the bus, as a Guest driver finds it.
struct Found {
    desc: u64,
    guest_features: u64,
    rings: Vec<u64>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    install_kick_handler().expect("kick handler");
    // Sixteen devices with long configs overflow the descriptor page; four
    // with eight queues each run out of IRQs. Both must be refused.
    let specs: Vec<Spec> = input.devices.into_iter().take(16).collect();
    if specs.is_empty() {
        return;
    }
    let make = |s: &Spec| -> Box<dyn Device> {
        let config = (0..s.config_len).map(|i| i ^ s.id).collect();
        // Type 0 ends the descriptor list: no device has it.
        let id = s.id.max(1);
        Box::new(EchoDevice::new(
            id,
            1 + s.queues as usize % 8,
            s.features,
            config,
        ))
    };
    let devices: Vec<Box<dyn Device>> = specs.iter().map(make).collect();

    // What fits, worked out from section 8: a descriptor is 5 bytes, 8 per
    // queue, two feature words and the config; IRQs from 1 to 31.
    let queues: u64 = specs.iter().map(|s| 1 + s.queues as u64 % 8).sum();
    let bytes: u64 = specs
        .iter()
        .map(|s| 5 + 8 * (1 + s.queues as u64 % 8) + 2 * FEATURE_LEN as u64 + s.config_len as u64)
        .sum();
    let fits = queues < LGUEST_IRQS as u64 && bytes < PAGE_SIZE;
    match bus::check_fits(&devices) {
        Ok(()) => assert!(fits, "{queues} queues in {bytes} bytes accepted"),
        Err(e) => {
            assert!(!fits, "{queues} queues in {bytes} bytes refused: {e}");
            assert_reason(&e.to_string(), "check_fits");
            return;
        }
    }

    let device_pages = bus::device_pages(&devices, Transport::LguestBus);
    assert_eq!(
        device_pages,
        1 + queues * ring_bytes(VRING_DEFAULT_NUM) / PAGE_SIZE
    );
    let mem = reused_memory(RAM_PAGES, device_pages, 0, 2, 1);
    let host = HostPages::snapshot(&mem);
    let irqs = Irqs::new().expect("irqs");
    let bus = Bus::new(&mem, devices, &irqs, Transport::LguestBus).expect("bus");
    let found = scan(&mem, &specs);

    let end = mem.layout.memory_end();
    let mut up: Vec<Vec<bool>> = found.iter().map(|d| vec![false; d.rings.len()]).collect();
    let pick = |i: u8| &found[i as usize % found.len()];
    for op in input.ops.iter().take(48) {
        let target = match *op {
            Op::Status { dev, value } => {
                mem.write(pick(dev).desc + 4, &[value]).unwrap();
                pick(dev).desc
            }
            Op::Features { dev, value } => {
                mem.write_u32(pick(dev).guest_features, value).unwrap();
                continue;
            }
            Op::Offer {
                dev,
                queue,
                slot,
                addr,
                len,
                flags,
                next,
            } => {
                let d = pick(dev);
                let ring = d.rings[queue as usize % d.rings.len()];
                let i = slot as u64 % NUM;
                mem.write_u64(ring + 16 * i, addr as u64).unwrap();
                mem.write_u32(ring + 16 * i + 8, len as u32).unwrap();
                mem.write(ring + 16 * i + 12, &flags.to_le_bytes()).unwrap();
                mem.write(ring + 16 * i + 14, &next.to_le_bytes()).unwrap();
                let avail = ring + 16 * NUM;
                let mut idx = [0u8; 2];
                mem.read(avail + 2, &mut idx).unwrap();
                let idx = u16::from_le_bytes(idx);
                mem.write(
                    avail + 4 + 2 * (idx as u64 % NUM),
                    &(i as u16).to_le_bytes(),
                )
                .unwrap();
                mem.write(avail + 2, &idx.wrapping_add(1).to_le_bytes())
                    .unwrap();
                continue;
            }
            Op::Poke { addr, value } => {
                let _ = mem.write(addr as u64 % end, &value.to_le_bytes());
                continue;
            }
            Op::Notify(Notify::Descriptor(dev)) => pick(dev).desc,
            Op::Notify(Notify::Ring(dev, q)) => {
                let d = pick(dev);
                d.rings[q as usize % d.rings.len()]
            }
            Op::Notify(Notify::Near(dev, delta)) => pick(dev).desc.wrapping_add(delta as u64),
            Op::Notify(Notify::Raw(addr)) => addr,
        };
        // What the Guest wrote is in; now what the Host does about it,
        // which we work out first. A status of 0 or FAILED is a reset; any
        // other status changes nothing. A queue comes up at its first kick
        // with DRIVER_OK set and stays up until a reset; one that is not up
        // touches nothing. A NOTIFY that is not the bus's touches nothing.
        let is_desc = found.iter().position(|d| d.desc == target);
        let ring = ring_index(&found, target);
        let reset = is_desc.map(|dev| {
            let status = status_of(&mem, &found[dev]);
            status == 0 || status & VIRTIO_STATUS_FAILED != 0
        });
        if let Some((dev, q)) = ring {
            up[dev][q] |= status_of(&mem, &found[dev]) & VIRTIO_STATUS_DRIVER_OK != 0;
        }
        let still = match (reset, ring) {
            (Some(reset), _) => !reset,
            (None, Some((dev, q))) => !up[dev][q],
            (None, None) => true,
        };
        // Only then a copy of memory (it is the costly part of a run).
        let before = still.then(|| guest_bytes(&mem));
        match bus.notify(target) {
            Ok(claimed) => assert_eq!(
                claimed,
                is_desc.is_some() || ring.is_some(),
                "NOTIFY {target:#x}"
            ),
            Err(e) => {
                assert!(
                    ring.is_some(),
                    "NOTIFY {target:#x} failed but is no ring: {e}"
                );
                // The reason names the device, then says what broke.
                let e = e.to_string();
                let why = e.strip_prefix("echo ").unwrap_or(&e);
                assert_reason(why, "a ring");
                host.assert_unchanged(&mem, "a ring");
                break;
            }
        }
        if let Some(before) = before {
            assert!(
                guest_bytes(&mem) == before,
                "NOTIFY {target:#x} wrote memory ({op:?})"
            );
        }
        if let (Some(dev), Some(true)) = (is_desc, reset) {
            up[dev].iter_mut().for_each(|u| *u = false);
            let d = &found[dev];
            assert_eq!(
                mem.read_u32(d.guest_features).unwrap(),
                0,
                "features after reset"
            );
            let zeros = vec![0u8; ring_bytes(VRING_DEFAULT_NUM) as usize];
            let mut ring = zeros.clone();
            for &r in &d.rings {
                mem.read(r, &mut ring).unwrap();
                assert!(ring == zeros, "ring {r:#x} after reset");
            }
        }
        host.assert_unchanged(&mem, "the bus");
    }
    assert!(
        irqs.death().is_none(),
        "a device thread ended the Guest: {:?}",
        irqs.death()
    );
    drop(bus);
    host.assert_unchanged(&mem, "the bus");
});

/// A device's status byte, on the descriptor page.
fn status_of(mem: &GuestMemory, d: &Found) -> u8 {
    let mut s = [0u8];
    mem.read(d.desc + 4, &mut s).unwrap();
    s[0]
}

/// Which device and queue a ring address is, if it is one.
fn ring_index(found: &[Found], addr: u64) -> Option<(usize, usize)> {
    found
        .iter()
        .enumerate()
        .find_map(|(i, d)| d.rings.iter().position(|&r| r == addr).map(|q| (i, q)))
}

/// Reads the descriptor page as a Guest's bus driver does, checking every
/// field against the devices asked for.
fn scan(mem: &GuestMemory, specs: &[Spec]) -> Vec<Found> {
    let ram = mem.layout.mem;
    let mut at = ram;
    let mut next_ring = ram + PAGE_SIZE;
    let mut irq = 1u16;
    let mut found = Vec::new();
    for s in specs {
        let mut d = [0u8; 5];
        mem.read(at, &mut d).unwrap();
        let nq = 1 + s.queues as u64 % 8;
        assert_eq!(d, [s.id.max(1), nq as u8, FEATURE_LEN, s.config_len, 0]);
        let mut rings = Vec::new();
        for q in 0..nq {
            let mut v = [0u8; 8];
            mem.read(at + 5 + 8 * q, &mut v).unwrap();
            let num = u16::from_le_bytes([v[0], v[1]]);
            let vq_irq = u16::from_le_bytes([v[2], v[3]]);
            let pfn = u32::from_le_bytes(v[4..8].try_into().unwrap()) as u64;
            assert_eq!(
                (num, vq_irq, pfn * PAGE_SIZE),
                (VRING_DEFAULT_NUM, irq, next_ring)
            );
            rings.push(next_ring);
            next_ring += ring_bytes(VRING_DEFAULT_NUM);
            irq += 1;
        }
        let features_at = at + 5 + 8 * nq;
        let host_features = mem.read_u32(features_at).unwrap();
        assert_eq!(host_features, COMMON_FEATURES | s.features);
        assert_eq!(
            mem.read_u32(features_at + 4).unwrap(),
            0,
            "Guest features start at 0"
        );
        let mut config = vec![0u8; s.config_len as usize];
        mem.read(features_at + 8, &mut config).unwrap();
        assert!(config.iter().enumerate().all(|(i, &b)| b == i as u8 ^ s.id));
        found.push(Found {
            desc: at,
            guest_features: features_at + 4,
            rings,
        });
        at = features_at + 8 + s.config_len as u64;
    }
    let mut end = [0u8];
    mem.read(at, &mut end).unwrap();
    assert_eq!(end[0], 0, "the list ends with type 0");
    assert!(next_ring <= mem.layout.memory_end());
    found
}
