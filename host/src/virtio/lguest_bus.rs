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
//! NOTIFY with a ring's address kicks that queue; the first kick made with
//! DRIVER_OK set brings the queue up, with the ring features the Guest
//! accepted by then. NOTIFY with a descriptor's address means its status
//! changed, and a status of 0 (or FAILED) resets the device before NOTIFY
//! returns. Each queue has an IRQ of its own, from 1.

use super::queue::{ring_bytes, Queue, RingFeatures};
use super::{Device, DeviceError, Interrupt, Running, COMMON_FEATURES};
use crate::kick::Irqs;
use crate::memory::GuestMemory;
use lguest_abi::{
    DeviceDesc, VqConfig, FEATURE_LEN, PAGE_SIZE, VIRTIO_STATUS_DRIVER_OK, VIRTIO_STATUS_FAILED,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use zerocopy::IntoBytes;

/// Where the status byte is in a descriptor.
const STATUS: u64 = std::mem::offset_of!(DeviceDesc, status) as u64;

/// Pages above RAM the bus needs: the descriptor page, then every ring.
pub fn device_pages(devices: &[Box<dyn Device>]) -> u64 {
    let rings: u64 = devices
        .iter()
        .flat_map(|d| (0..d.queue_names().len()).map(|q| ring_bytes(d.queue_size(q))))
        .sum();
    1 + rings / PAGE_SIZE
}

/// A device's descriptor, as the Guest finds it before touching it.
pub fn descriptor(d: &dyn Device) -> DeviceDesc {
    DeviceDesc {
        type_: d.virtio_id(),
        num_vq: d.queue_names().len() as u8,
        feature_len: FEATURE_LEN,
        config_len: d.config().len() as u8,
        status: 0,
    }
}

/// A queue's used buffers raise that queue's own IRQ.
struct QueueIrqs {
    irqs: Arc<Irqs>,
    lines: Vec<u32>,
}

impl Interrupt for QueueIrqs {
    fn used_buffers(&self, q: usize) {
        self.irqs.raise(self.lines[q]);
    }
}

/// One device on the bus.
pub struct BusDevice {
    /// Guest-physical address of its descriptor.
    desc: u64,
    /// Guest-physical address of each ring, and its entries.
    rings: Vec<(u64, u16)>,
    /// Where the Guest writes the features it accepts.
    guest_features: u64,
    /// Which queues are up. Only the vCPU thread (NOTIFY) looks at these.
    up: Vec<AtomicBool>,
    running: Running,
}

/// Writes the descriptor page for `devices`, in their order, and starts
/// each. The caller has checked they fit ([`crate::bus::check_fits`]).
pub fn attach(
    mem: &GuestMemory,
    devices: Vec<Box<dyn Device>>,
    irqs: &Arc<Irqs>,
) -> std::io::Result<Vec<BusDevice>> {
    let page = mem.layout.mem;
    let mut at = page;
    let mut ring = page + PAGE_SIZE;
    let mut irq = 1u32;
    let mut on_bus = Vec::new();
    for device in devices {
        let desc = descriptor(device.as_ref());
        let mut bytes = desc.as_bytes().to_vec();
        let mut rings = Vec::new();
        let mut lines = Vec::new();
        for q in 0..desc.num_vq as usize {
            let num = device.queue_size(q);
            let vq = VqConfig {
                num,
                irq: irq as u16,
                pfn: (ring / PAGE_SIZE) as u32,
            };
            bytes.extend_from_slice(vq.as_bytes());
            rings.push((ring, num));
            lines.push(irq);
            ring += ring_bytes(num);
            irq += 1;
        }
        let guest_features = at + bytes.len() as u64 + FEATURE_LEN as u64;
        bytes.extend_from_slice(&(COMMON_FEATURES | device.features()).to_le_bytes());
        bytes.extend_from_slice(&[0; FEATURE_LEN as usize]);
        bytes.extend_from_slice(&device.config());
        mem.write(at, &bytes).expect("checked by check_fits");
        let interrupt = QueueIrqs {
            irqs: irqs.clone(),
            lines,
        };
        on_bus.push(BusDevice {
            desc: at,
            up: rings.iter().map(|_| AtomicBool::new(false)).collect(),
            rings,
            guest_features,
            running: Running::start(device, mem.clone(), irqs.clone(), Box::new(interrupt))?,
        });
        at += bytes.len() as u64;
    }
    Ok(on_bus)
}

impl BusDevice {
    pub fn running(&self) -> &Running {
        &self.running
    }

    /// NOTIFY at `addr`: None if it names neither this device's descriptor
    /// nor one of its rings. An error is a Sudden Death reason (a broken
    /// ring served right here).
    pub fn notify(&self, mem: &GuestMemory, addr: u64) -> Option<Result<(), DeviceError>> {
        if addr == self.desc {
            self.status_changed(mem);
            return Some(Ok(()));
        }
        let q = self.rings.iter().position(|&(r, _)| r == addr)?;
        Some(self.kick(mem, q))
    }

    fn status(&self, mem: &GuestMemory) -> u8 {
        let mut status = [0u8];
        mem.read(self.desc + STATUS, &mut status)
            .expect("the descriptor page is the Guest's");
        status[0]
    }

    /// The Guest kicked queue `q`. A driver kicks only once it has set
    /// DRIVER_OK, by when it has chosen its features: its first kick after
    /// that brings the queue up. A kick without DRIVER_OK (one racing a
    /// reset, say) brings nothing up, and the device finds nothing to do.
    /*D:545 The lguest bus has no register saying "this queue is ready".
     * Its first kick after DRIVER_OK says it: by then the driver has
     * settled its features, so we read them now and hand the device its
     * ring. Like the kick itself, that waits for no lock the device holds
     * while it does I/O. */
    fn kick(&self, mem: &GuestMemory, q: usize) -> Result<(), DeviceError> {
        if !self.up[q].load(Ordering::Relaxed) && self.status(mem) & VIRTIO_STATUS_DRIVER_OK != 0 {
            let features = mem.read_u32(self.guest_features).unwrap_or(0);
            let features = RingFeatures::from_bits(features as u64);
            let (ring, num) = self.rings[q];
            let queue = Queue::new(num, ring, features);
            self.running.activate(q, queue);
            self.up[q].store(true, Ordering::Relaxed);
        }
        self.running.kick(q)
    }

    /// The Guest wrote the device's status and told us. Status 0 is a reset;
    /// FAILED is reported and resets too. Anything else (features chosen,
    /// DRIVER_OK) needs nothing now: a queue reads the features at its first
    /// kick.
    fn status_changed(&self, mem: &GuestMemory) {
        let status = self.status(mem);
        if status != 0 && status & VIRTIO_STATUS_FAILED == 0 {
            return;
        }
        if status & VIRTIO_STATUS_FAILED != 0 {
            tracing::warn!(
                device = self.running.name,
                "the Guest's driver failed; resetting"
            );
        }
        self.running.reset(|| {
            let _ = mem.write(self.guest_features, &[0; FEATURE_LEN as usize]);
            for &(ring, num) in &self.rings {
                let _ = mem.write(ring, &vec![0u8; ring_bytes(num) as usize]);
            }
        });
        for up in &self.up {
            up.store(false, Ordering::Relaxed);
        }
    }
}
