//! The lguest bus (ABI section 8): a page of device descriptors just above
//! the top of RAM, rings the Launcher assigns, and NOTIFY to kick.
//!
//! ```text
//! mem:          descriptor page: {type, num_vq, feature_len, config_len, status}
//!               + num_vq x {num, irq, pfn} + Host features + Guest features + config,
//!               back to back, type 0 ending the list; the console first
//! mem + 4096:   the rings, one after another, each 4096-aligned
//! ```
//!
//! NOTIFY with a ring's address kicks that queue (an eventfd write: the
//! device's own thread does the work); NOTIFY with a descriptor's address
//! means its status changed, and a status of 0 (or FAILED) resets it before
//! NOTIFY returns.

use crate::kick::Irqs;
use crate::memory::GuestMemory;
use crate::virtio::mmio::{MmioDevice, MmioError, WINDOW};
use crate::virtio::queue::ring_bytes;
use crate::virtio::{Device, DeviceError, LegacyQueue, QueueSetup, Running, COMMON_FEATURES};
use lguest_abi::{
    DeviceDesc, VqConfig, FEATURE_LEN, LGUEST_IRQS, PAGE_SIZE, VIRTIO_STATUS_FAILED,
    VRING_DEFAULT_NUM,
};
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use virtio_bindings::virtio_config::{VIRTIO_F_ANY_LAYOUT, VIRTIO_F_NOTIFY_ON_EMPTY};
use zerocopy::IntoBytes;

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
    if transport == Transport::Mmio {
        return 1 + mmio_hole_pages(devices.len());
    }
    let rings: u64 = devices
        .iter()
        .map(|d| d.queue_names().len() as u64 * ring_bytes(VRING_DEFAULT_NUM))
        .sum();
    1 + rings / PAGE_SIZE
}

/// Checks the devices fit the bus: one descriptor page, and one IRQ per
/// queue from IRQ 1.
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
        .map(|d| descriptor(d.as_ref()).total_size())
        .sum();
    if bytes >= PAGE_SIZE as usize {
        return Err(BusError::DescriptorPageFull);
    }
    Ok(())
}

/// Pages of the hole the mmio windows make.
pub fn mmio_hole_pages(devices: usize) -> u64 {
    (devices as u64 * WINDOW).div_ceil(PAGE_SIZE)
}

/// Where each device's window is, and its IRQ, for RAM of `mem` bytes.
pub fn mmio_windows(mem: u64, devices: usize) -> Vec<(u64, u32)> {
    (0..devices)
        .map(|i| (mem + PAGE_SIZE + i as u64 * WINDOW, i as u32 + 1))
        .collect()
}

/// The command-line words that announce the windows, as Linux reads them.
pub fn mmio_cmdline(mem: u64, devices: usize) -> Vec<String> {
    mmio_windows(mem, devices)
        .into_iter()
        .map(|(base, irq)| format!("virtio_mmio.device=0x{WINDOW:x}@0x{base:x}:{irq}"))
        .collect()
}

fn descriptor(d: &dyn Device) -> DeviceDesc {
    DeviceDesc {
        type_: d.virtio_id(),
        num_vq: d.queue_names().len() as u8,
        feature_len: FEATURE_LEN,
        config_len: d.config().len() as u8,
        status: 0,
    }
}

struct OnBus {
    /// Guest-physical address of its descriptor.
    desc: u64,
    /// Guest-physical address of each ring.
    rings: Vec<u64>,
    guest_features: u64,
    running: Running,
}

pub struct Bus {
    mem: GuestMemory,
    devices: Vec<OnBus>,
    mmio: Vec<MmioDevice>,
}

impl Bus {
    /// Writes the descriptor page (or sets up the mmio windows) and starts
    /// every device's thread.
    pub fn new(
        mem: &GuestMemory,
        devices: Vec<Box<dyn Device>>,
        irqs: &Arc<Irqs>,
        transport: Transport,
    ) -> std::io::Result<Bus> {
        if transport == Transport::Mmio {
            return Self::new_mmio(mem, devices, irqs);
        }
        let page = mem.layout.mem;
        let mut at = page;
        let mut ring = page + PAGE_SIZE;
        let mut irq = 1u32;
        let mut on_bus = Vec::new();
        for device in devices {
            let desc = descriptor(device.as_ref());
            let mut bytes = desc.as_bytes().to_vec();
            let mut setup = Vec::new();
            let features_at = at + bytes.len() as u64 + 8 * desc.num_vq as u64;
            let guest_features = features_at + FEATURE_LEN as u64;
            for _ in 0..desc.num_vq {
                let vq = VqConfig {
                    num: VRING_DEFAULT_NUM,
                    irq: irq as u16,
                    pfn: (ring / PAGE_SIZE) as u32,
                };
                bytes.extend_from_slice(vq.as_bytes());
                setup.push(QueueSetup {
                    num: VRING_DEFAULT_NUM,
                    irq,
                    legacy: Some(LegacyQueue {
                        ring,
                        guest_features,
                        status: at + 4,
                    }),
                });
                ring += ring_bytes(VRING_DEFAULT_NUM);
                irq += 1;
            }
            bytes.extend_from_slice(&(COMMON_FEATURES | device.features()).to_le_bytes());
            bytes.extend_from_slice(&[0; FEATURE_LEN as usize]);
            bytes.extend_from_slice(&device.config());
            mem.write(at, &bytes).expect("checked by check_fits");
            let rings = setup
                .iter()
                .filter_map(|s| s.legacy)
                .map(|l| l.ring)
                .collect();
            on_bus.push(OnBus {
                desc: at,
                rings,
                guest_features,
                running: Running::start(device, setup, mem.clone(), irqs.clone(), None)?,
            });
            at += bytes.len() as u64;
        }
        Ok(Bus {
            mem: mem.clone(),
            devices: on_bus,
            mmio: Vec::new(),
        })
    }

    fn new_mmio(
        mem: &GuestMemory,
        devices: Vec<Box<dyn Device>>,
        irqs: &Arc<Irqs>,
    ) -> std::io::Result<Bus> {
        let windows = mmio_windows(mem.layout.mem, devices.len());
        let mut mmio = Vec::new();
        for (device, (base, irq)) in devices.into_iter().zip(windows) {
            // Modern drivers don't use the legacy-only feature bits.
            let legacy_only = 1 << VIRTIO_F_NOTIFY_ON_EMPTY | 1 << VIRTIO_F_ANY_LAYOUT;
            let features = ((COMMON_FEATURES & !legacy_only) | device.features()) as u64;
            let (id, queues) = (device.virtio_id(), device.queue_names().len());
            let setup = vec![
                QueueSetup {
                    num: VRING_DEFAULT_NUM,
                    irq,
                    legacy: None,
                };
                queues
            ];
            let status = Arc::new(AtomicU32::new(0));
            let running = Running::start(
                device,
                setup,
                mem.clone(),
                irqs.clone(),
                Some(status.clone()),
            )?;
            mmio.push(MmioDevice::new(base, id, features, queues, running, status));
        }
        Ok(Bus {
            mem: mem.clone(),
            devices: Vec::new(),
            mmio,
        })
    }

    /// Descriptors the vCPU thread watches while the Guest is halted, with
    /// the device each belongs to.
    pub fn inline_backends(&self) -> Vec<(std::os::fd::RawFd, usize)> {
        self.running()
            .enumerate()
            .filter_map(|(i, r)| r.inline_backend().map(|fd| (fd, i)))
            .collect()
    }

    /// Serves device `index`'s backend on the vCPU thread.
    pub fn backend_ready(&self, index: usize) -> Result<(), BusError> {
        match self.running().nth(index) {
            Some(r) => Ok(r.backend_ready()?),
            None => Ok(()),
        }
    }

    fn running(&self) -> impl Iterator<Item = &Running> {
        self.devices
            .iter()
            .map(|d| &d.running)
            .chain(self.mmio.iter().map(|d| d.running()))
    }

    /// An MMIO access: Some if it hit a window (an error is a Sudden Death
    /// reason), None if no device is there.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> Option<Result<(), BusError>> {
        let d = self.mmio.iter_mut().find(|d| d.contains(addr))?;
        Some(d.read(addr, data).map_err(BusError::from))
    }

    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Option<Result<(), BusError>> {
        let mem = &self.mem;
        let d = self.mmio.iter_mut().find(|d| d.contains(addr))?;
        Some(d.write(addr, data, mem).map_err(BusError::from))
    }

    /// NOTIFY at `addr`, if it names a descriptor or a ring: true if it did.
    /// An error is a Sudden Death reason (a broken ring served right here).
    pub fn notify(&self, addr: u64) -> Result<bool, BusError> {
        for d in &self.devices {
            if addr == d.desc {
                self.status_changed(d);
                return Ok(true);
            }
            if let Some(q) = d.rings.iter().position(|&r| r == addr) {
                d.running.kick(q)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The Guest wrote a device's status and told us. Status 0 is a reset;
    /// FAILED is reported and resets too. Anything else (features chosen,
    /// DRIVER_OK) needs nothing now: a queue reads the features at its first
    /// kick.
    fn status_changed(&self, d: &OnBus) {
        let mut status = [0u8];
        self.mem
            .read(d.desc + 4, &mut status)
            .expect("descriptor page is the Guest's");
        if status[0] != 0 && status[0] & VIRTIO_STATUS_FAILED == 0 {
            return;
        }
        if status[0] & VIRTIO_STATUS_FAILED != 0 {
            tracing::warn!(
                device = d.running.name,
                "the Guest's driver failed; resetting"
            );
        }
        d.running.reset(|| {
            let _ = self.mem.write(d.guest_features, &[0; FEATURE_LEN as usize]);
            let zeros = vec![0u8; ring_bytes(VRING_DEFAULT_NUM) as usize];
            for &ring in &d.rings {
                let _ = self.mem.write(ring, &zeros);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{console::Console, rng::Rng};
    use crate::memory::Layout;

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

    #[test]
    fn descriptor_page_is_what_the_guest_driver_expects() {
        // Device threads may raise IRQs, which kick this thread.
        crate::kick::install_kick_handler().unwrap();
        let devices: Vec<Box<dyn Device>> = vec![Box::new(Console::new(false)), Box::new(Rng)];
        check_fits(&devices).unwrap();
        let pages = device_pages(&devices, Transport::LguestBus);
        assert_eq!(pages, 1 + 3 * 3, "descriptor page and three 3-page rings");
        let mem_bytes = 4 << 20;
        let mem = GuestMemory::new(Layout {
            mem: mem_bytes,
            pfn_limit: mem_bytes / PAGE_SIZE + pages,
            mmio_hole_pages: 0,
            host_ro_pages: 1,
            host_rw_pages: 1,
        })
        .unwrap();
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
}
