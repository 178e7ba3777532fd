//! The Guest's devices, on the transport the command line chose: the lguest
//! bus ([`lguest_bus`], ABI section 8: a descriptor page and NOTIFY) or
//! virtio-mmio ([`mmio`], a register window per device). Each device is
//! attached through its transport, which owns where its queues are, when
//! they come up and how its interrupts reach the Guest; the device itself
//! runs in [`crate::virtio`] the same either way.
//!
//! The vCPU thread asks the bus about every NOTIFY and MMIO access; the bus
//! hands it to the device whose address it is.

use crate::kick::Irqs;
use crate::memory::GuestMemory;
use crate::virtio::lguest_bus::{self, BusDevice};
use crate::virtio::mmio::{self, MmioDevice, MmioError};
use crate::virtio::{Device, DeviceError, Running};
use lguest_abi::{LGUEST_IRQS, PAGE_SIZE};
use std::sync::Arc;

pub use crate::virtio::mmio::{
    cmdline as mmio_cmdline, hole_pages as mmio_hole_pages, windows as mmio_windows,
};

/// Devices that don't fit, or a Guest that broke a rule reaching them (the
/// Sudden Death reason).
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// More queues than the Guest has IRQs for.
    #[error("too many devices: {queues} queues, but a Guest has IRQs for {irqs}")]
    TooManyQueues { queues: usize, irqs: u32 },
    /// More descriptors than one page holds.
    #[error("too many devices for one descriptor page")]
    DescriptorPageFull,
    /// A kick served at once found a ring broken.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A virtio-mmio access the Guest may not make.
    #[error(transparent)]
    Mmio(#[from] MmioError),
}

/// How the Guest reaches its devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The lguest bus (ABI section 8): the descriptor page and NOTIFY.
    LguestBus,
    /// A virtio-mmio window per device; the descriptor page stays empty.
    Mmio,
}

/// Pages above RAM the devices need: the descriptor page, then every ring
/// (lguest bus) or the mmio windows (a hole, not memory).
pub fn device_pages(devices: &[Box<dyn Device>], transport: Transport) -> u64 {
    match transport {
        Transport::LguestBus => lguest_bus::device_pages(devices),
        Transport::Mmio => 1 + mmio::hole_pages(devices.len()),
    }
}

/// Checks the devices fit the bus: one descriptor page, and one IRQ per
/// queue from IRQ 1. (virtio-mmio needs fewer IRQs, one per device, and
/// is held to the same limits, so a command line works on either.)
pub fn check_fits(devices: &[Box<dyn Device>]) -> Result<(), BusError> {
    let queues: usize = devices.iter().map(|d| d.queue_names().len()).sum();
    if queues >= LGUEST_IRQS as usize {
        return Err(BusError::TooManyQueues {
            queues,
            irqs: LGUEST_IRQS - 1,
        });
    }
    let bytes: usize = devices
        .iter()
        .map(|d| lguest_bus::descriptor(d.as_ref()).total_size())
        .sum();
    if bytes >= PAGE_SIZE as usize {
        return Err(BusError::DescriptorPageFull);
    }
    Ok(())
}

/// One device, as its transport attached it.
enum Attached {
    Lguest(BusDevice),
    Mmio(MmioDevice),
}

impl Attached {
    fn running(&self) -> &Running {
        match self {
            Attached::Lguest(d) => d.running(),
            Attached::Mmio(d) => d.running(),
        }
    }
}

/// The virtio-mmio window `addr` is in, if any.
fn window(devices: &mut [Attached], addr: u64) -> Option<&mut MmioDevice> {
    devices.iter_mut().find_map(|d| match d {
        Attached::Mmio(d) if d.contains(addr) => Some(d),
        _ => None,
    })
}

pub struct Bus {
    mem: GuestMemory,
    /// In command-line order: the console, disks, network cards, rng.
    devices: Vec<Attached>,
}

impl Bus {
    /// Attaches every device through `transport` (writing the descriptor
    /// page, or setting up the windows) and starts its thread.
    pub fn new(
        mem: &GuestMemory,
        devices: Vec<Box<dyn Device>>,
        irqs: &Arc<Irqs>,
        transport: Transport,
    ) -> std::io::Result<Bus> {
        let devices = match transport {
            Transport::LguestBus => lguest_bus::attach(mem, devices, irqs)?
                .into_iter()
                .map(Attached::Lguest)
                .collect(),
            Transport::Mmio => mmio::attach(mem, devices, irqs)?
                .into_iter()
                .map(Attached::Mmio)
                .collect(),
        };
        Ok(Bus {
            mem: mem.clone(),
            devices,
        })
    }

    /// Descriptors the vCPU thread watches while the Guest is halted, with
    /// the device each belongs to.
    pub fn inline_backends(&self) -> Vec<(std::os::fd::RawFd, usize)> {
        self.devices
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.running().inline_backend().map(|fd| (fd, i)))
            .collect()
    }

    /// Serves device `index`'s backend on the vCPU thread.
    pub fn backend_ready(&self, index: usize) -> Result<(), BusError> {
        match self.devices.get(index) {
            Some(d) => Ok(d.running().backend_ready()?),
            None => Ok(()),
        }
    }

    /// An MMIO access: Some if it hit a window (an error is a Sudden Death
    /// reason), None if no device is there.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> Option<Result<(), BusError>> {
        let d = window(&mut self.devices, addr)?;
        Some(d.read(addr, data).map_err(BusError::from))
    }

    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Option<Result<(), BusError>> {
        let d = window(&mut self.devices, addr)?;
        Some(d.write(addr, data, &self.mem).map_err(BusError::from))
    }

    /// NOTIFY at `addr`, if it names a descriptor or a ring on the lguest
    /// bus: true if it did. An error is a Sudden Death reason (a broken
    /// ring served right here).
    pub fn notify(&self, addr: u64) -> Result<bool, BusError> {
        for d in &self.devices {
            if let Attached::Lguest(d) = d {
                if let Some(result) = d.notify(&self.mem, addr) {
                    result?;
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{console::Console, rng::Rng};
    use crate::memory::Layout;
    use crate::virtio::queue::ring_bytes;
    use crate::virtio::Queues;
    use crate::virtio::COMMON_FEATURES;
    use lguest_abi::vring::used_offset;

    /// One descriptor as the Guest finds it: type, vqconfigs (num, irq,
    /// pfn), Host features, config length.
    type Found = (u8, Vec<(u16, u16, u32)>, u32, usize);

    /// Walks the page the way seed 002's lguest bus driver does.
    fn scan(mem: &GuestMemory) -> Vec<Found> {
        let mut found = Vec::new();
        let mut at = mem.layout.mem;
        loop {
            let mut d = [0u8; 5];
            mem.read(at, &mut d).unwrap();
            if d[0] == 0 {
                return found;
            }
            let (num_vq, feature_len, config_len) = (d[1] as u64, d[2] as u64, d[3] as usize);
            let mut vqs = Vec::new();
            for i in 0..num_vq {
                let mut v = [0u8; 8];
                mem.read(at + 5 + 8 * i, &mut v).unwrap();
                vqs.push((
                    u16::from_le_bytes([v[0], v[1]]),
                    u16::from_le_bytes([v[2], v[3]]),
                    u32::from_le_bytes(v[4..8].try_into().unwrap()),
                ));
            }
            let features = mem.read_u32(at + 5 + 8 * num_vq).unwrap();
            found.push((d[0], vqs, features, config_len));
            at += 5 + 8 * num_vq + 2 * feature_len + config_len as u64;
        }
    }

    /// RAM of `mem_bytes`, then `pages` device pages, then the Host's.
    fn memory(mem_bytes: u64, pages: u64) -> GuestMemory {
        GuestMemory::new(Layout {
            mem: mem_bytes,
            pfn_limit: mem_bytes / PAGE_SIZE + pages,
            mmio_hole_pages: 0,
            host_ro_pages: 1,
            host_rw_pages: 1,
        })
        .unwrap()
    }

    #[test]
    fn descriptor_page_is_what_the_guest_driver_expects() {
        // Device threads may raise IRQs, which kick this thread.
        crate::kick::install_kick_handler().unwrap();
        let devices: Vec<Box<dyn Device>> = vec![Box::new(Console::new(false)), Box::new(Rng)];
        check_fits(&devices).unwrap();
        let pages = device_pages(&devices, Transport::LguestBus);
        assert_eq!(pages, 1 + 3 * 3, "descriptor page and three 3-page rings");
        let mem_bytes = 4 << 20;
        let mem = memory(mem_bytes, pages);
        let irqs = Irqs::new().unwrap();
        let bus = Bus::new(&mem, devices, &irqs, Transport::LguestBus).unwrap();

        let found = scan(&mem);
        assert_eq!(found.len(), 2);
        let (console, rng) = (&found[0], &found[1]);
        assert_eq!(
            console.0,
            lguest_abi::VIRTIO_ID_CONSOLE,
            "the console comes first"
        );
        assert_eq!(rng.0, lguest_abi::VIRTIO_ID_RNG);
        let first_ring = (mem_bytes / PAGE_SIZE + 1) as u32;
        assert_eq!(
            console.1,
            vec![(256, 1, first_ring), (256, 2, first_ring + 3)]
        );
        assert_eq!(rng.1, vec![(256, 3, first_ring + 6)]);
        for (_, _, features, config_len) in &found {
            assert_eq!(features & COMMON_FEATURES, COMMON_FEATURES);
            assert_eq!(*config_len, 0);
        }

        // A ring address kicks, a descriptor address is a status change,
        // anything else is not the bus's.
        assert!(bus.notify(u64::from(first_ring) * PAGE_SIZE).unwrap());
        assert!(bus.notify(mem_bytes).unwrap());
        assert!(!bus.notify(mem_bytes + 1).unwrap());

        // Reset clears the Guest's features.
        let guest_features = mem_bytes + 5 + 16 + 4;
        mem.write_u32(guest_features, 0xFFFF).unwrap();
        mem.write(mem_bytes + 4, &[0]).unwrap();
        assert!(bus.notify(mem_bytes).unwrap());
        assert_eq!(mem.read_u32(guest_features).unwrap(), 0);
    }

    /// A device that wants a bigger ring gets one (the network card's
    /// transmit queue has 1024 entries): the Guest reads `num` from the
    /// descriptor page, the ring takes its own size in pages, the rings
    /// after it move up, and the queue comes up with that many entries.
    #[test]
    fn a_queue_may_have_a_bigger_ring() {
        crate::kick::install_kick_handler().unwrap();
        struct Wide;
        impl Device for Wide {
            fn name(&self) -> &'static str {
                "wide"
            }
            fn virtio_id(&self) -> u8 {
                lguest_abi::VIRTIO_ID_RNG
            }
            fn queue_names(&self) -> &'static [&'static str] {
                &["big", "small"]
            }
            fn queue_size(&self, q: usize) -> u16 {
                [1024, 256][q]
            }
            fn features(&self) -> u32 {
                0
            }
            fn config(&self) -> Vec<u8> {
                vec![]
            }
            fn kick(&mut self, q: usize, queues: &mut Queues) -> Result<(), DeviceError> {
                while let Some(chain) = queues.pop(q)? {
                    queues.push(q, &chain, 0)?;
                }
                Ok(())
            }
        }
        let devices: Vec<Box<dyn Device>> = vec![Box::new(Wide)];
        let pages = device_pages(&devices, Transport::LguestBus);
        assert_eq!(ring_bytes(1024), 8 * PAGE_SIZE);
        assert_eq!(pages, 1 + 8 + 3);
        let mem_bytes = 4 << 20;
        let mem = memory(mem_bytes, pages);
        let irqs = Irqs::new().unwrap();
        let bus = Bus::new(&mem, devices, &irqs, Transport::LguestBus).unwrap();
        let first_ring = (mem_bytes / PAGE_SIZE + 1) as u32;
        assert_eq!(
            scan(&mem)[0].1,
            vec![(1024, 1, first_ring), (256, 2, first_ring + 8)]
        );

        // Up at its first kick with DRIVER_OK, with 1024 entries: a chain
        // at descriptor 1000 (out of range in a ring of 256) is walked, and
        // handed back where a ring of 1024 has its used ring.
        let (ring, num) = (u64::from(first_ring) * PAGE_SIZE, 1024u16);
        mem.write(mem_bytes + 4, &[1 | 2 | 4]).unwrap();
        mem.write_u64(ring + 16 * 1000, 0x1000).unwrap();
        let avail = ring + lguest_abi::vring::avail_offset(num);
        mem.write(avail + 4, &1000u16.to_le_bytes()).unwrap();
        mem.write(avail + 2, &1u16.to_le_bytes()).unwrap();
        assert!(bus.notify(ring).unwrap());
        let used = ring + used_offset(num);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while mem.read_u32(used + 4).unwrap() != 1000 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(
            mem.read_u32(used + 4).unwrap(),
            1000,
            "descriptor 1000 back"
        );
        assert!(irqs.death().is_none(), "{:?}", irqs.death());
    }

    /// ABI section 8: a queue is served from its first kick made with
    /// DRIVER_OK set; a kick before that (or after a reset) serves nothing.
    /// Served, a used buffer raises the queue's own IRQ. (The console's
    /// transmit queue is served on the kicking thread, so every kick here
    /// is done when NOTIFY returns.)
    #[test]
    fn a_queue_comes_up_at_its_first_kick_with_driver_ok() {
        crate::kick::install_kick_handler().unwrap();
        let devices: Vec<Box<dyn Device>> = vec![Box::new(Console::new(false))];
        let pages = device_pages(&devices, Transport::LguestBus);
        let mem_bytes = 4 << 20;
        let mem = memory(mem_bytes, pages);
        let irqs = Irqs::new().unwrap();
        let bus = Bus::new(&mem, devices, &irqs, Transport::LguestBus).unwrap();
        let desc = mem_bytes;
        let tx = mem_bytes + PAGE_SIZE + ring_bytes(256);
        let tx_irq = 2;
        // An empty buffer (nothing to print) in slot `idx - 1`, offered.
        let offer = |idx: u16| {
            mem.write_u64(tx, 0x1000).unwrap();
            let avail = tx + lguest_abi::vring::avail_offset(256);
            mem.write(avail + 4 + 2 * (idx as u64 - 1), &0u16.to_le_bytes())
                .unwrap();
            mem.write(avail + 2, &idx.to_le_bytes()).unwrap();
        };
        let used = || {
            let mut b = [0u8; 2];
            mem.read(tx + used_offset(256) + 2, &mut b).unwrap();
            u16::from_le_bytes(b)
        };
        let status = |s: u8| {
            mem.write(desc + 4, &[s]).unwrap();
            assert!(bus.notify(desc).unwrap());
        };

        offer(1);
        // ACKNOWLEDGE | DRIVER, no DRIVER_OK yet: the kick brings nothing up.
        status(1 | 2);
        assert!(bus.notify(tx).unwrap());
        assert_eq!(used(), 0, "a kick before DRIVER_OK was served");
        assert_eq!(irqs.pending(), 0);

        status(1 | 2 | 4);
        assert!(bus.notify(tx).unwrap());
        assert_eq!(used(), 1, "the first kick with DRIVER_OK serves");
        assert_eq!(irqs.pending(), 1 << tx_irq, "the queue's own IRQ");
        // Up now: it stays up whatever the status says, until a reset.
        status(1 | 2);
        offer(2);
        assert!(bus.notify(tx).unwrap());
        assert_eq!(used(), 2);

        // A reset takes the queue down and zeroes its ring: a kick without
        // DRIVER_OK serves nothing again.
        status(0);
        assert_eq!(used(), 0, "the ring is zeroed");
        offer(1);
        status(1 | 2);
        assert!(bus.notify(tx).unwrap());
        assert_eq!(
            used(),
            0,
            "a kick after reset, before DRIVER_OK, was served"
        );
        status(1 | 2 | 4);
        assert!(bus.notify(tx).unwrap());
        assert_eq!(used(), 1);
    }
}
