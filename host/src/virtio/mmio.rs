//! The virtio-mmio transport, version 2 (virtio 1.x), for `--transport=mmio`.
//!
//! The same devices as on the lguest bus, reached the way most hypervisors
//! and every modern Linux expect: a 0x200-byte register window per device,
//! announced on the command line as `virtio_mmio.device=0x200@BASE:IRQ`. The
//! windows are holes in the Guest's memory below pfn_limit, so every access
//! exits to us ([`MmioDevice::read`], [`MmioDevice::write`]). A transport only
//! moves registers and rings: the device behind it is the runtime's
//! ([`Running`]). A queue comes up when the driver sets QueueReady, and its
//! interrupts set InterruptStatus bit 0 before they raise the window's IRQ.

use super::queue::{area_sizes, Queue, RingFeatures};
use super::{Device, DeviceError, Interrupt, Running, COMMON_FEATURES};
use crate::kick::Irqs;
use crate::memory::{GuestMemory, OutOfBounds};
use lguest_abi::vring::{F_ANY_LAYOUT, F_NOTIFY_ON_EMPTY};
use lguest_abi::PAGE_SIZE;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;

/// Bytes of one device's register window.
pub const WINDOW: u64 = 0x200;
/// MagicValue: "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// The register layout we speak: virtio 1.x's (no legacy windows).
const VERSION: u32 = 2;
/// VendorID: "LGST".
const VENDOR: u32 = 0x5453_474C;
/// Where the config space starts in the window.
const CONFIG: u64 = VIRTIO_MMIO_CONFIG as u64;

/// An access the Guest may not make: the Sudden Death reason, naming the
/// device (and its window or queue).
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A register access of the wrong width, or where there is no register.
    #[error(
        "virtio-mmio {device} window {base:#x}: bad {width}-byte {access} at offset {offset:#x}"
    )]
    BadAccess {
        device: &'static str,
        base: u64,
        offset: u64,
        width: usize,
        access: Access,
    },
    /// QueueNum that is not a power of two we can serve.
    #[error("virtio-mmio {device} queue {queue}: bad queue size {size}")]
    QueueSize {
        device: &'static str,
        queue: u32,
        size: u32,
    },
    /// QueueSel names a queue the device doesn't have.
    #[error("virtio-mmio {device} queue {queue}: no such queue")]
    NoSuchQueue { device: &'static str, queue: u32 },
    /// A queue's size or areas written while it is ready.
    #[error("virtio-mmio {device} queue {queue}: changed while ready")]
    ChangedWhileReady { device: &'static str, queue: u32 },
    /// QueueReady before the features were agreed.
    #[error("virtio-mmio {device} queue {queue}: enabled before FEATURES_OK")]
    EnabledEarly { device: &'static str, queue: u32 },
    /// QueueReady with an area that is not wholly Guest memory.
    #[error("virtio-mmio {device} queue {queue}: queue area {source}")]
    QueueArea {
        device: &'static str,
        queue: u32,
        source: OutOfBounds,
    },
    /// A kick the device served at once found a ring broken.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Which kind of access [`MmioError::BadAccess`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ConfigRead,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::ConfigRead => "config read",
        })
    }
}

/// Pages of the hole the windows of `devices` devices make.
pub fn hole_pages(devices: usize) -> u64 {
    (devices as u64 * WINDOW).div_ceil(PAGE_SIZE)
}

/// Where each device's window is, and its IRQ, for RAM of `mem` bytes: from
/// the page after the (empty) descriptor page, IRQs from 1.
pub fn windows(mem: u64, devices: usize) -> Vec<(u64, u32)> {
    (0..devices)
        .map(|i| (mem + PAGE_SIZE + i as u64 * WINDOW, i as u32 + 1))
        .collect()
}

/// The command-line words that announce the windows, as Linux reads them.
pub fn cmdline(mem: u64, devices: usize) -> Vec<String> {
    windows(mem, devices)
        .into_iter()
        .map(|(base, irq)| format!("virtio_mmio.device=0x{WINDOW:x}@0x{base:x}:{irq}"))
        .collect()
}

/// Puts each of `devices` behind a window of its own, in order, and starts
/// it.
pub fn attach(
    mem: &GuestMemory,
    devices: Vec<Box<dyn Device>>,
    irqs: &Arc<Irqs>,
) -> std::io::Result<Vec<MmioDevice>> {
    let windows = windows(mem.layout.mem, devices.len());
    devices
        .into_iter()
        .zip(windows)
        .map(|(device, (base, irq))| MmioDevice::new(base, irq, device, mem, irqs))
        .collect()
}

/// A window's used-buffer interrupt: InterruptStatus bit 0, then its IRQ.
struct WindowIrq {
    irqs: Arc<Irqs>,
    irq: u32,
    status: Arc<AtomicU32>,
}

impl Interrupt for WindowIrq {
    fn used_buffers(&self, _q: usize) {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        self.irqs.raise(self.irq);
    }
}

/// The register at `offset` in a window (one past any there is, if the
/// offset is not even a u32).
fn register(offset: u64) -> u32 {
    u32::try_from(offset).unwrap_or(u32::MAX)
}

/// Sets the low half of a 64-bit register pair.
fn low(old: u64, v: u32) -> u64 {
    (old & !0xFFFF_FFFF) | v as u64
}

/// Sets the high half of a 64-bit register pair.
fn high(old: u64, v: u32) -> u64 {
    (old & 0xFFFF_FFFF) | (v as u64) << 32
}

/// Sets one half of a 64-bit register pair: [`low`] or [`high`].
type SetHalf = fn(u64, u32) -> u64;

/// Which queue area (descriptors, driver, device) register `reg` sets, and
/// which half of its address.
fn area_register(reg: u32) -> Option<(usize, SetHalf)> {
    Some(match reg {
        VIRTIO_MMIO_QUEUE_DESC_LOW => (0, low),
        VIRTIO_MMIO_QUEUE_DESC_HIGH => (0, high),
        VIRTIO_MMIO_QUEUE_AVAIL_LOW => (1, low),
        VIRTIO_MMIO_QUEUE_AVAIL_HIGH => (1, high),
        VIRTIO_MMIO_QUEUE_USED_LOW => (2, low),
        VIRTIO_MMIO_QUEUE_USED_HIGH => (2, high),
        _ => return None,
    })
}

/// Per-queue registers.
#[derive(Clone, Copy, Default)]
struct QueueRegs {
    num: u16,
    ready: bool,
    /// Descriptor, driver (avail) and device (used) area addresses.
    areas: [u64; 3],
}

/// One device's window.
pub struct MmioDevice {
    pub base: u64,
    device_id: u32,
    device_features: u64,
    running: Running,
    interrupt_status: Arc<AtomicU32>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    /// The most entries each queue may have (QueueNumMax).
    queue_max: Vec<u16>,
    status: u32,
}

impl MmioDevice {
    /// `device` behind a window at `base` whose interrupts are `irq`; its
    /// thread starts now.
    pub fn new(
        base: u64,
        irq: u32,
        device: Box<dyn Device>,
        mem: &GuestMemory,
        irqs: &Arc<Irqs>,
    ) -> std::io::Result<MmioDevice> {
        // Modern drivers don't use the legacy-only feature bits.
        let legacy_only = 1 << F_NOTIFY_ON_EMPTY | 1 << F_ANY_LAYOUT;
        let features = ((COMMON_FEATURES & !legacy_only) | device.features()) as u64;
        let (id, queues) = (device.virtio_id(), device.queue_names().len());
        let queue_max = (0..queues).map(|q| device.queue_size(q)).collect();
        let interrupt_status = Arc::new(AtomicU32::new(0));
        let interrupt = WindowIrq {
            irqs: irqs.clone(),
            irq,
            status: interrupt_status.clone(),
        };
        let running = Running::start(device, mem.clone(), irqs.clone(), Box::new(interrupt))?;
        Ok(MmioDevice {
            base,
            device_id: id as u32,
            device_features: features | 1 << VIRTIO_F_VERSION_1,
            running,
            interrupt_status,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![QueueRegs::default(); queues],
            queue_max,
            status: 0,
        })
    }

    pub fn running(&self) -> &Running {
        &self.running
    }

    pub fn contains(&self, addr: u64) -> bool {
        (self.base..self.base + WINDOW).contains(&addr)
    }

    fn name(&self) -> &'static str {
        self.running.name
    }

    fn selected(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The selected queue's QueueNumMax.
    fn selected_max(&self) -> Option<u16> {
        self.queue_max.get(self.queue_sel as usize).copied()
    }

    /// A read of `data.len()` bytes at `addr`; an error is a Sudden Death
    /// reason.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> Result<(), MmioError> {
        let offset = addr - self.base;
        if offset >= CONFIG {
            return self.read_config(offset - CONFIG, data);
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return Err(self.bad(offset, data.len(), Access::Read));
        }
        let value = match register(offset) {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_id,
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_max().map_or(0, u32::from),
            VIRTIO_MMIO_QUEUE_READY => self.selected().map_or(0, |q| q.ready as u32),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            VIRTIO_MMIO_STATUS => self.status,
            // Our config never changes.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => return Err(self.bad(offset, 4, Access::Read)),
        };
        data.copy_from_slice(&value.to_le_bytes());
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), MmioError> {
        if !matches!(data.len(), 1 | 2 | 4) {
            return Err(self.bad(CONFIG + offset, data.len(), Access::ConfigRead));
        }
        let config = self.running.config();
        let start = offset as usize;
        match config.get(start..start + data.len()) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => return Err(self.bad(CONFIG + offset, data.len(), Access::ConfigRead)),
        }
        Ok(())
    }

    fn bad(&self, offset: u64, width: usize, access: Access) -> MmioError {
        MmioError::BadAccess {
            device: self.name(),
            base: self.base,
            offset,
            width,
            access,
        }
    }

    /// A write of `data` at `addr`; an error is a Sudden Death reason.
    pub fn write(&mut self, addr: u64, data: &[u8], mem: &GuestMemory) -> Result<(), MmioError> {
        let offset = addr - self.base;
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return Err(self.bad(offset, data.len(), Access::Write));
        }
        let value = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        match register(offset) {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => match self.driver_features_sel {
                0 => self.driver_features = low(self.driver_features, value),
                1 => self.driver_features = high(self.driver_features, value),
                _ => {}
            },
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                // 0 unsets the size (drivers write it when they tear a queue
                // down); anything else must be a power of two we can serve.
                let max = self.selected_max().unwrap_or(0);
                if value > max as u32 || (value != 0 && !value.is_power_of_two()) {
                    return Err(MmioError::QueueSize {
                        device: self.name(),
                        queue: self.queue_sel,
                        size: value,
                    });
                }
                self.with_selected(|q| q.num = value as u16)?;
            }
            VIRTIO_MMIO_QUEUE_READY => self.set_queue_ready(value != 0, mem)?,
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                if let Some(q) = self.queues.get(value as usize) {
                    if q.ready {
                        self.running.kick(value as usize)?;
                    }
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => self.set_status(value),
            reg => {
                let Some((area, set)) = area_register(reg) else {
                    return Err(self.bad(offset, 4, Access::Write));
                };
                self.with_selected(|q| q.areas[area] = set(q.areas[area], value))?;
            }
        }
        Ok(())
    }

    fn with_selected(&mut self, f: impl FnOnce(&mut QueueRegs)) -> Result<(), MmioError> {
        let (device, queue) = (self.name(), self.queue_sel);
        let q = self
            .selected()
            .ok_or(MmioError::NoSuchQueue { device, queue })?;
        if q.ready {
            return Err(MmioError::ChangedWhileReady { device, queue });
        }
        f(q);
        Ok(())
    }

    fn set_queue_ready(&mut self, ready: bool, mem: &GuestMemory) -> Result<(), MmioError> {
        let (device, queue) = (self.name(), self.queue_sel);
        if ready && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return Err(MmioError::EnabledEarly { device, queue });
        }
        let index = self.queue_sel as usize;
        let features = self.driver_features;
        let max = self.selected_max().unwrap_or(0);
        let q = self
            .selected()
            .ok_or(MmioError::NoSuchQueue { device, queue })?;
        if !ready {
            // The driver may free the ring as soon as this write returns, so
            // the device must be done with it by then.
            q.ready = false;
            self.running.deactivate(index);
            return Ok(());
        }
        let num = if q.num == 0 { max } else { q.num };
        for (area, size) in q.areas.iter().zip(area_sizes(num)) {
            mem.check(*area, size)
                .map_err(|source| MmioError::QueueArea {
                    device,
                    queue,
                    source,
                })?;
        }
        q.ready = true;
        let queue = Queue::with_areas(num, q.areas, RingFeatures::from_bits(features));
        self.running.activate(index, queue);
        Ok(())
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
        {
            // Accept the driver's choice only if it is ours to give and
            // modern; otherwise FEATURES_OK does not stick and the driver
            // sees it was refused.
            let ok = self.driver_features & !self.device_features == 0
                && self.driver_features & 1 << VIRTIO_F_VERSION_1 != 0;
            if ok {
                self.running.set_driver_features(self.driver_features);
            } else {
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            tracing::warn!(device = self.name(), "the Guest's driver failed");
        }
        self.status = value;
    }

    fn reset(&mut self) {
        self.running.reset(|| {});
        self.interrupt_status.store(0, Ordering::SeqCst);
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::default();
        }
        self.status = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::rng::Rng;
    use crate::kick::Irqs;
    use crate::memory::Layout;
    use crate::virtio::Queues;
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};

    const BASE: u64 = 0x10_0000;

    fn device() -> (MmioDevice, GuestMemory, Arc<Irqs>) {
        crate::kick::install_kick_handler().unwrap();
        let mem = GuestMemory::new(Layout {
            mem: 1 << 20,
            pfn_limit: 256,
            mmio_hole_pages: 0,
            host_ro_pages: 1,
            host_rw_pages: 1,
        })
        .unwrap();
        let irqs = Irqs::new().unwrap();
        let d = MmioDevice::new(BASE, 1, Box::new(Rng), &mem, &irqs).unwrap();
        (d, mem, irqs)
    }

    /// The three queue areas' registers (low, high), and where a test
    /// puts each area.
    const AREAS: [(u32, u32, u32); 3] = [
        (
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            VIRTIO_MMIO_QUEUE_DESC_HIGH,
            0x10000,
        ),
        (
            VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            0x11000,
        ),
        (
            VIRTIO_MMIO_QUEUE_USED_LOW,
            VIRTIO_MMIO_QUEUE_USED_HIGH,
            0x12000,
        ),
    ];
    /// ACKNOWLEDGE | DRIVER: a driver has found the device.
    const FOUND: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;

    fn rd(d: &mut MmioDevice, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        d.read(BASE + reg as u64, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn wr(d: &mut MmioDevice, mem: &GuestMemory, reg: u32, v: u32) -> Result<(), String> {
        d.write(BASE + reg as u64, &v.to_le_bytes(), mem)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_modern_driver_gets_entropy_through_the_window() {
        let (mut d, mem, irqs) = device();
        assert_eq!(rd(&mut d, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(rd(&mut d, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(
            rd(&mut d, VIRTIO_MMIO_DEVICE_ID),
            lguest_abi::VIRTIO_ID_RNG as u32
        );
        // Features: VERSION_1 is bit 32, the low bit of the second word.
        wr(&mut d, &mem, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1).unwrap();
        assert_eq!(rd(&mut d, VIRTIO_MMIO_DEVICE_FEATURES) & 1, 1);
        wr(&mut d, &mem, VIRTIO_MMIO_STATUS, FOUND).unwrap();
        wr(&mut d, &mem, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1).unwrap();
        wr(&mut d, &mem, VIRTIO_MMIO_DRIVER_FEATURES, 1).unwrap();
        wr(
            &mut d,
            &mem,
            VIRTIO_MMIO_STATUS,
            FOUND | VIRTIO_CONFIG_S_FEATURES_OK,
        )
        .unwrap();
        assert_ne!(
            rd(&mut d, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0,
            "features accepted"
        );

        // One queue of 8, its areas wherever the driver likes.
        wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_SEL, 0).unwrap();
        assert_eq!(rd(&mut d, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_NUM, 8).unwrap();
        for (low, high, addr) in AREAS {
            wr(&mut d, &mem, low, addr).unwrap();
            wr(&mut d, &mem, high, 0).unwrap();
        }
        wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_READY, 1).unwrap();
        assert_eq!(rd(&mut d, VIRTIO_MMIO_QUEUE_READY), 1);

        // A 64-byte device-writable buffer, offered and kicked.
        mem.write_u64(0x10000, 0x20000).unwrap();
        mem.write_u32(0x10008, 64).unwrap();
        mem.write(0x1000C, &lguest_abi::vring::DESC_F_WRITE.to_le_bytes())
            .unwrap();
        mem.write(0x11004, &0u16.to_le_bytes()).unwrap();
        mem.write(0x11002, &1u16.to_le_bytes()).unwrap();
        wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_NOTIFY, 0).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while mem.read_u32(0x12000).unwrap() >> 16 != 1 {
            assert!(std::time::Instant::now() < deadline, "no used buffer");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(mem.read_u32(0x12008).unwrap(), 64, "used length");
        assert_eq!(
            rd(&mut d, VIRTIO_MMIO_INTERRUPT_STATUS) & 1,
            1,
            "interrupt status"
        );
        assert_ne!(irqs.pending() & 1 << 1, 0, "the window's IRQ");
        wr(&mut d, &mem, VIRTIO_MMIO_INTERRUPT_ACK, 1).unwrap();
        assert_eq!(rd(&mut d, VIRTIO_MMIO_INTERRUPT_STATUS), 0, "acknowledged");

        // Reset clears everything.
        wr(&mut d, &mem, VIRTIO_MMIO_STATUS, 0).unwrap();
        assert_eq!(rd(&mut d, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(rd(&mut d, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn hostile_register_use_is_refused_with_a_reason() {
        let (mut d, mem, _) = device();
        let mut two = [0u8; 2];
        let err = d
            .read(BASE + VIRTIO_MMIO_VERSION as u64, &mut two)
            .unwrap_err();
        assert!(matches!(
            err,
            MmioError::BadAccess {
                device: "rng",
                base: BASE,
                offset: 4,
                width: 2,
                access: Access::Read,
            }
        ));
        assert_eq!(
            err.to_string(),
            "virtio-mmio rng window 0x100000: bad 2-byte read at offset 0x4"
        );
        let err = d
            .write(BASE + VIRTIO_MMIO_STATUS as u64, &[1], &mem)
            .unwrap_err();
        assert!(err.to_string().contains("bad 1-byte write"), "{err}");
        let err = d.write(
            BASE + VIRTIO_MMIO_QUEUE_READY as u64,
            &1u32.to_le_bytes(),
            &mem,
        );
        assert!(
            matches!(err, Err(MmioError::EnabledEarly { queue: 0, .. })),
            "{err:?}"
        );
        assert!(err.unwrap_err().to_string().contains("before FEATURES_OK"));
        // Features without VERSION_1 are refused: FEATURES_OK doesn't stick.
        wr(
            &mut d,
            &mem,
            VIRTIO_MMIO_STATUS,
            FOUND | VIRTIO_CONFIG_S_FEATURES_OK,
        )
        .unwrap();
        assert_eq!(
            rd(&mut d, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
        wr(&mut d, &mem, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1).unwrap();
        wr(&mut d, &mem, VIRTIO_MMIO_DRIVER_FEATURES, 1).unwrap();
        wr(
            &mut d,
            &mem,
            VIRTIO_MMIO_STATUS,
            FOUND | VIRTIO_CONFIG_S_FEATURES_OK,
        )
        .unwrap();
        // A queue area past the end of Guest memory.
        wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_DESC_LOW, 0xFFF0_0000).unwrap();
        let err = wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_READY, 1).unwrap_err();
        assert!(err.contains("outside guest memory"), "{err}");
        assert!(wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_NUM, 3)
            .unwrap_err()
            .contains("bad queue size"));
        assert!(wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_NUM, 512)
            .unwrap_err()
            .contains("bad queue size"));
    }

    /// Rule (virtio 1.2, 4.2.2): a driver tearing a queue down, as
    /// virtio-drivers' queue_unset does, clears QueueReady (after which the
    /// device must no longer touch the ring, which the driver frees), then
    /// writes QueueNum 0 and zero addresses; none of that is an error.
    #[test]
    fn a_queue_torn_down_is_released_and_may_be_zeroed() {
        let (mut d, mem, _) = device();
        wr(&mut d, &mem, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1).unwrap();
        wr(&mut d, &mem, VIRTIO_MMIO_DRIVER_FEATURES, 1).unwrap();
        wr(
            &mut d,
            &mem,
            VIRTIO_MMIO_STATUS,
            FOUND | VIRTIO_CONFIG_S_FEATURES_OK,
        )
        .unwrap();
        for (low, _, addr) in AREAS {
            wr(&mut d, &mem, low, addr).unwrap();
        }
        wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_NUM, 8).unwrap();
        wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_READY, 1).unwrap();
        assert!(d.running.queue_ready(0));
        wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_READY, 0).unwrap();
        assert!(!d.running.queue_ready(0), "the device still holds the ring");
        wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_NUM, 0).unwrap();
        for (low, high, _) in AREAS {
            wr(&mut d, &mem, low, 0).unwrap();
            wr(&mut d, &mem, high, 0).unwrap();
        }
        assert_eq!(rd(&mut d, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    /// An rng whose one queue may have 1024 entries, as the network card's
    /// transmit queue does.
    struct BigRng;

    impl Device for BigRng {
        fn name(&self) -> &'static str {
            "rng"
        }
        fn virtio_id(&self) -> u8 {
            lguest_abi::VIRTIO_ID_RNG
        }
        fn queue_names(&self) -> &'static [&'static str] {
            &["requests"]
        }
        fn queue_size(&self, _q: usize) -> u16 {
            1024
        }
        fn features(&self) -> u32 {
            0
        }
        fn config(&self) -> Vec<u8> {
            vec![]
        }
        fn kick(&mut self, _q: usize, _queues: &mut Queues) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    /// QueueNumMax is the device's own: a bigger ring may be asked for up
    /// to it, and no further.
    #[test]
    fn queue_num_max_is_the_devices() {
        let (_, mem, irqs) = device();
        let mut d = MmioDevice::new(BASE, 1, Box::new(BigRng), &mem, &irqs).unwrap();
        assert_eq!(rd(&mut d, VIRTIO_MMIO_QUEUE_NUM_MAX), 1024);
        wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_NUM, 1024).unwrap();
        let err = wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_NUM, 2048).unwrap_err();
        assert!(err.contains("2048"), "{err}");
        // A queue that does not exist has no maximum.
        wr(&mut d, &mem, VIRTIO_MMIO_QUEUE_SEL, 1).unwrap();
        assert_eq!(rd(&mut d, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    }
}
