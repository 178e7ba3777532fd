//! Virtio devices on the lguest bus (ABI section 8, device model 2).
//!
//! lguest described its devices in the simplest way it could: one page, just
//! above the Guest's RAM, holding an entry per device, packed back to back.
//! Each entry is a small header, {type, num_vq, feature_len, config_len,
//! status}, then a `lguest_vqconfig` per virtqueue saying where the Host put
//! its ring and which IRQ it raises, then the Host's feature bits, then ours,
//! then the device's config bytes. A type of 0 ends the list. This is the
//! lguest_device.c of Linux (seed 002), without the driver model around it.
//!
//! The status byte and the NOTIFY hypercall do the rest: we write the status
//! bits of virtio 0.9.5 as we go, and NOTIFY the entry's address when we have
//! chosen features, want a reset, or have failed. NOTIFYing a ring's address
//! kicks that queue.
//!
//! The drivers (console, block, net, rng) live in the submodules, over the
//! vring code of `ring`; the feature bits every device offers are the ABI
//! crate's (`lguest_abi::vring`). The console, net and rng drivers bring up
//! the first device of their type (further ones are listed but left alone);
//! the block driver brings up every disk. The Guest has no allocator, so
//! buffers are statics (`pool`): the rings themselves are the Host's pages,
//! above our RAM.

pub mod blk;
pub mod console;
pub mod net;
pub mod pool;
pub mod ring;
pub mod rng;

use core::fmt::{self, Write};

use lguest_abi::vring::F_NOTIFY_ON_EMPTY;
use lguest_abi::{hcall as nr, DeviceDesc, VqConfig, DEVICE_MODEL_VIRTIO, PAGE_SIZE};
use lguest_abi::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET, VIRTIO_ID_RNG};
use lguest_abi::{VIRTIO_STATUS_ACKNOWLEDGE, VIRTIO_STATUS_DRIVER};
use lguest_abi::{VIRTIO_STATUS_DRIVER_OK, VIRTIO_STATUS_FAILED};

use crate::console::{Error, Msg};
use crate::hcall::hcall;
use crate::interrupts::irq_count;
use crate::{boot, err, println};

/// The most devices we keep track of.
pub const MAX_DEVICES: usize = 16;

/*
 * The descriptor page is shared with the Host and its entries are packed
 * with no regard for alignment, so we read and write it a byte at a time
 * (or as the ABI's structs of bytes, which need no alignment either).
 */

fn raw<T>(addr: u64) -> *mut T {
    core::ptr::with_exposed_provenance_mut(addr as usize)
}

fn peek(addr: u64) -> u8 {
    // SAFETY: callers only pass addresses inside the descriptor page, which
    // sits below pfn_limit, identity-mapped; a byte is always aligned.
    unsafe { raw::<u8>(addr).read_volatile() }
}

fn poke(addr: u64, value: u8) {
    // SAFETY: as for peek; the page is writable like RAM.
    unsafe { raw::<u8>(addr).write_volatile(value) }
}

/// Read `len` (at most 8) little-endian bytes.
fn peek_le(addr: u64, len: usize) -> u64 {
    (0..len).fold(0, |value, i| {
        value | (peek(addr + i as u64) as u64) << (8 * i)
    })
}

/// One device's entry on the descriptor page.
#[derive(Clone, Copy, Debug)]
pub struct Device {
    /// The entry's physical address: what a status NOTIFY names.
    pub at: u64,
    pub header: DeviceDesc,
}

const HEADER_SIZE: u64 = core::mem::size_of::<DeviceDesc>() as u64;
const VQCONFIG_SIZE: u64 = core::mem::size_of::<VqConfig>() as u64;

impl Device {
    pub fn id(&self) -> u8 {
        self.header.type_
    }

    pub fn name(&self) -> &'static str {
        match self.id() {
            VIRTIO_ID_NET => "net",
            VIRTIO_ID_BLOCK => "block",
            VIRTIO_ID_CONSOLE => "console",
            VIRTIO_ID_RNG => "rng",
            _ => "unknown",
        }
    }

    pub fn num_vq(&self) -> usize {
        self.header.num_vq as usize
    }

    /// Queue `i`'s config: the vqconfigs follow the header (seed 002's lg_vq).
    pub fn vq(&self, i: usize) -> VqConfig {
        assert!(i < self.num_vq());
        let vq = raw::<VqConfig>(self.at + HEADER_SIZE + VQCONFIG_SIZE * i as u64);
        // SAFETY: inside the entry, which `scan` checked lies in the page;
        // VqConfig is packed, so any address is aligned for it.
        unsafe { vq.read_volatile() }
    }

    /// The features come after the vqconfigs: the Host's, then ours.
    fn features_at(&self) -> u64 {
        self.at + HEADER_SIZE + VQCONFIG_SIZE * self.num_vq() as u64
    }

    /// Up to 32 feature bits, byte i/8 bit i%8 (all the ABI defines).
    fn read_features(&self, at: u64) -> u32 {
        peek_le(at, (self.header.feature_len as usize).min(4)) as u32
    }

    pub fn host_features(&self) -> u32 {
        self.read_features(self.features_at())
    }

    pub fn guest_features(&self) -> u32 {
        self.read_features(self.features_at() + self.header.feature_len as u64)
    }

    fn set_guest_features(&self, features: u32) {
        let at = self.features_at() + self.header.feature_len as u64;
        for i in 0..self.header.feature_len as u32 {
            poke(
                at + i as u64,
                features.checked_shr(8 * i).unwrap_or(0) as u8,
            );
        }
    }

    /// `len` bytes of config at `offset`, if the config is that long. The
    /// config space comes after both feature bitmaps.
    pub fn config(&self, offset: usize, len: usize) -> Option<u64> {
        let config = self.features_at() + 2 * self.header.feature_len as u64;
        let fits = offset + len <= self.header.config_len as usize;
        fits.then(|| peek_le(config + offset as u64, len))
    }

    pub fn status(&self) -> u8 {
        peek(self.at + 4)
    }

    pub fn set_status(&self, status: u8) {
        poke(self.at + 4, status);
    }

    /// Set the status and NOTIFY the entry's address: the Host looks at
    /// the status byte (and, when we have just chosen them, our features).
    fn notify_status(&self, status: u8) {
        self.set_status(status);
        // SAFETY: the Host reads our status and features and at most resets
        // the device, which touches nothing of ours but its rings.
        unsafe { hcall(nr::NOTIFY, self.at, 0, 0, 0) };
    }

    /// Status 0 and NOTIFY: when it returns, the Host has forgotten our
    /// features, rings and queue progress.
    pub fn reset(&self) {
        self.notify_status(0);
    }

    /// Give up on the device: the Host reports it and resets it.
    pub fn fail(&self) {
        self.notify_status(self.status() | VIRTIO_STATUS_FAILED);
    }

    /// Bring the device up as virtio 0.9.5 orders it: reset it (a driver
    /// before us may have left it in any state), say we saw it (ACKNOWLEDGE)
    /// and can drive it (DRIVER), accept the features we `support` of those
    /// offered, and NOTIFY to finalize them. Then, if it has the `vqs`
    /// queues we drive, `setup` takes its rings, knowing what we accepted,
    /// and the device is live (DRIVER_OK): its queues are served from their
    /// first kick. If anything went wrong, we give up on it (FAILED).
    pub fn bring_up<T>(
        &self,
        support: u32,
        vqs: usize,
        setup: impl FnOnce(u32) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.reset();
        self.set_status(VIRTIO_STATUS_ACKNOWLEDGE);
        self.set_status(VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
        // Never NOTIFY_ON_EMPTY: it would undo our interrupt suppression.
        let accepted = self.host_features() & support & !(1 << F_NOTIFY_ON_EMPTY);
        self.set_guest_features(accepted);
        self.notify_status(self.status());
        let driver = match self.num_vq() {
            n if n < vqs => Err(err!("{} device with {n} queues, not {vqs}", self.name())),
            _ => setup(accepted),
        };
        match driver {
            Ok(_) => self.set_status(self.status() | VIRTIO_STATUS_DRIVER_OK),
            Err(_) => self.fail(),
        }
        driver
    }
}

/// What the descriptor page holds.
#[derive(Clone, Copy, Default)]
pub struct Bus {
    devices: [Option<Device>; MAX_DEVICES],
}

impl Bus {
    /// Walk the descriptor page as seed 002's scan_devices does: one entry
    /// after the other, each as long as its header says, until type 0. We
    /// only read; nothing is said to the Host yet. An entry that would run
    /// off the page ends the walk.
    pub fn scan() -> Bus {
        let mut devices = [None; MAX_DEVICES];
        if boot::device_model() != DEVICE_MODEL_VIRTIO {
            return Bus { devices };
        }
        let (page, mut offset) = (boot::mem(), 0);
        for slot in &mut devices {
            let at = page + offset;
            if offset + HEADER_SIZE > PAGE_SIZE {
                break;
            }
            // SAFETY: the header lies inside the page (just checked), and
            // DeviceDesc is bytes, so any address is aligned for it.
            let header = unsafe { raw::<DeviceDesc>(at).read_volatile() };
            if header.type_ == 0 {
                break;
            }
            offset += header.total_size() as u64;
            if offset > PAGE_SIZE {
                println!(
                    "lguest-guest: virtio: device entry at {at:#x} runs off the descriptor page"
                );
                break;
            }
            *slot = Some(Device { at, header });
        }
        Bus { devices }
    }

    pub fn devices(&self) -> impl Iterator<Item = Device> + '_ {
        self.devices.iter().flatten().copied()
    }

    /// The first device of type `id`.
    pub fn find(&self, id: u8) -> Option<Device> {
        self.devices().find(|d| d.id() == id)
    }
}

/*
 * The devices we drive, brought up when first wanted: the self-tests only
 * touch a device when its test runs, so the other tests see no device IRQs.
 */

#[derive(Default)]
pub struct Devices {
    pub bus: Bus,
    pub console: Option<console::Console>,
    /// The disks, in the order they are on the bus.
    pub disks: [Option<blk::Blk>; blk::MAX_DISKS],
    pub net: Option<net::Net>,
    pub rng: Option<rng::Rng>,
}

/// Bring a driver up if its device is there and it isn't up yet. The 2007
/// model's drivers use it too.
pub fn probe_once<'a, T, D>(
    driver: &'a mut Option<T>,
    dev: Option<D>,
    what: &str,
    probe: impl FnOnce(D) -> Result<T, Error>,
) -> Result<&'a mut T, Error> {
    if driver.is_none() {
        let dev = dev.ok_or_else(|| err!("no {what}"))?;
        *driver = Some(probe(dev)?);
    }
    Ok(driver.as_mut().expect("just probed"))
}

/// Say on the early console what bringing up a device came to (None: we
/// have no driver for it), after what `describe` says of it. The 2007
/// model's drivers use it too.
pub fn report(
    model: &str,
    result: Option<Result<(), Error>>,
    describe: impl FnOnce(&mut dyn Write) -> fmt::Result,
) {
    let mut line = Msg::<256>::new();
    let _ = describe(&mut line);
    let line = line.as_str();
    match result {
        Some(Ok(())) => println!("lguest-guest: {model}: {line}"),
        Some(Err(e)) => println!("lguest-guest: {model}: {line}: failed: {}", e.as_str()),
        None => println!("lguest-guest: {model}: {line} (no driver)"),
    }
}

impl Devices {
    pub fn scan() -> Devices {
        let bus = Bus::scan();
        Devices {
            bus,
            ..Default::default()
        }
    }

    pub fn console(&mut self) -> Result<&mut console::Console, Error> {
        let dev = self.bus.find(VIRTIO_ID_CONSOLE);
        probe_once(
            &mut self.console,
            dev,
            "virtio console",
            console::Console::probe,
        )
    }

    /// Disk `n` (0 is the first block device on the bus).
    pub fn disk(&mut self, n: usize) -> Result<&mut blk::Blk, Error> {
        let mut disks = self.bus.devices().filter(|d| d.id() == VIRTIO_ID_BLOCK);
        let dev = disks.nth(n).filter(|_| n < blk::MAX_DISKS);
        let slot = self.disks.get_mut(n).ok_or_else(|| err!("no disk {n}"))?;
        probe_once(slot, dev, "virtio block device", |dev| {
            blk::Blk::probe(dev, n)
        })
    }

    pub fn net(&mut self) -> Result<&mut net::Net, Error> {
        let dev = self.bus.find(VIRTIO_ID_NET);
        probe_once(&mut self.net, dev, "virtio net device", net::Net::probe)
    }

    pub fn rng(&mut self) -> Result<&mut rng::Rng, Error> {
        let dev = self.bus.find(VIRTIO_ID_RNG);
        probe_once(&mut self.rng, dev, "virtio rng device", rng::Rng::probe)
    }

    /// Bring up every device we have a driver for, saying on the early
    /// console what we found and what failed.
    pub fn probe_all(&mut self) {
        let bus = self.bus;
        let mut disks = 0;
        for dev in bus.devices() {
            let result = match dev.id() {
                VIRTIO_ID_CONSOLE if self.console.is_none() => Some(self.console().map(drop)),
                VIRTIO_ID_BLOCK if disks < blk::MAX_DISKS => {
                    disks += 1;
                    Some(self.disk(disks - 1).map(drop))
                }
                VIRTIO_ID_NET if self.net.is_none() => Some(self.net().map(drop)),
                VIRTIO_ID_RNG if self.rng.is_none() => Some(self.rng().map(drop)),
                _ => None,
            };
            report("virtio", result, |line| describe(line, &dev));
        }
    }
}

/// What the prompt's `devices` command says: a line per device.
pub fn list(out: &mut dyn Write, bus: &Bus) -> fmt::Result {
    if bus.devices().next().is_none() {
        out.write_str("no devices\n")?;
    }
    for dev in bus.devices() {
        describe(out, &dev)?;
        out.write_str("\n")?;
    }
    Ok(())
}

/// One line about `dev`: type, queues, IRQs, features, status and what its
/// config says.
pub fn describe(out: &mut dyn Write, dev: &Device) -> fmt::Result {
    write!(out, "{} at {:#x}: ", dev.name(), dev.at)?;
    for i in 0..dev.num_vq() {
        let sep = if i == 0 { "" } else { ", " };
        let name = match (dev.id(), i) {
            (VIRTIO_ID_NET | VIRTIO_ID_CONSOLE, 0) => "rx",
            (VIRTIO_ID_NET | VIRTIO_ID_CONSOLE, 1) => "tx",
            (VIRTIO_ID_BLOCK | VIRTIO_ID_RNG, 0) => "requests",
            _ => "queue",
        };
        let VqConfig { num, irq, .. } = dev.vq(i);
        write!(out, "{sep}{name} {num} irq {irq} ({} irqs)", irq_count(irq))?;
    }
    let (host, guest) = (dev.host_features(), dev.guest_features());
    write!(
        out,
        "; features {host:#010x}/{guest:#010x}; status {:#x}",
        dev.status()
    )?;
    match dev.id() {
        VIRTIO_ID_BLOCK => blk::describe_config(out, dev),
        VIRTIO_ID_NET => net::describe_config(out, dev),
        _ => Ok(()),
    }
}
