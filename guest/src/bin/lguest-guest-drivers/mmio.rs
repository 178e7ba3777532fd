//! Finding the virtio-mmio devices, and taking their interrupts.
//!
//! With `--transport=mmio` the Launcher puts each device in a virtio-mmio
//! window of its own, above RAM, and announces them on our command line the
//! way Linux reads them: `virtio_mmio.device=<size>@<base>:<irq>[:<id>]`,
//! one word per device, in device order (console, disks, net, rng). The Host's
//! identity map already covers the windows, so a window's physical address is
//! the pointer virtio-drivers' `MmioTransport` reads and writes through.
//!
//! Each device has one IRQ, raised when it returns used buffers. Our handler
//! reads the window's InterruptStatus and writes it back to InterruptACK (raw
//! 32-bit accesses: the driver that owns the transport may be in the middle
//! of something, but these two registers share no state with anything else),
//! and counts the interrupt, so that the code waiting with HALT wakes up and
//! the tests can tell the interrupts came.

use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use lguest_abi::FIRST_EXTERNAL_VECTOR;
use lguest_guest::boot;
use lguest_guest::cell::GuestCell;
use lguest_guest::interrupts::{self, TrapFrame};
use lguest_guest::{lguest_data, println};
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, MmioVersion, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};

/// virtio-mmio register offsets (virtio 1.x, 4.2.2) our interrupt handler
/// uses itself.
const INTERRUPT_STATUS: u64 = 0x60;
const INTERRUPT_ACK: u64 = 0x64;
/// The register set ends where the config space starts (0x100); a window
/// must be at least that large.
const MIN_WINDOW: u64 = 0x100;

/// The IRQs a Guest has (ABI section 6); 0 is the timer.
const IRQS: usize = 32;

/// One `virtio_mmio.device=` word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub size: u64,
    pub base: u64,
    pub irq: u32,
}

/// Linux's memparse: a number in C notation (0x hex, leading 0 octal, else
/// decimal) with an optional K, M, G, T, P or E suffix.
pub fn memparse(text: &str) -> Option<u64> {
    let (digits, radix) =
        if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            (hex, 16)
        } else if text.len() > 1 && text.starts_with('0') {
            (&text[1..], 8)
        } else {
            (text, 10)
        };
    let split = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    let (number, suffix) = digits.split_at(split);
    let value = u64::from_str_radix(number, radix).ok()?;
    let shift = match suffix {
        "" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    value.checked_mul(1 << shift)
}

impl Window {
    /// Parse the value of one `virtio_mmio.device=` word:
    /// `<size>@<base>:<irq>[:<id>]`.
    pub fn parse(value: &str) -> Option<Window> {
        let (size, rest) = value.split_once('@')?;
        let mut fields = rest.split(':');
        let base = memparse(fields.next()?)?;
        let irq = fields.next()?.parse().ok()?;
        // An optional platform device id follows; we don't need it.
        if fields.clone().count() > 1 {
            return None;
        }
        Some(Window {
            size: memparse(size)?,
            base,
            irq,
        })
    }
}

/// What we know of one window.
pub struct Device {
    pub window: Window,
    /// What the window holds: (type, version, vendor), or why it holds no
    /// device we can use.
    pub found: Result<(DeviceType, MmioVersion, u32), MmioError>,
}

impl Device {
    /// The device type, if the window holds a valid device.
    pub fn kind(&self) -> Option<DeviceType> {
        self.found.as_ref().ok().map(|(kind, _, _)| *kind)
    }
}

/// A transport over a window.
///
/// # Safety
///
/// The window must be one `scan` checked, and no other transport over it may
/// be alive meanwhile.
unsafe fn open<'a>(window: &Window) -> Result<MmioTransport<'a>, MmioError> {
    let header = NonNull::new(core::ptr::with_exposed_provenance_mut::<VirtIOHeader>(
        window.base as usize,
    ))
    .expect("the window is above RAM, so not at 0");
    // The window lies in [mem, pfn_limit) (scan checked it), mapped by the
    // Host's identity map for the Guest's whole life; the caller promises it
    // has no other transport (our IRQ handler's two registers don't count).
    // SAFETY: so the header is valid, mapped MMIO that this transport owns.
    unsafe { MmioTransport::new(header, window.size as usize) }
}

/// The devices on the command line, in its order.
pub struct Devices {
    pub list: Vec<Device>,
    /// Words that named a window we can't use, with why.
    pub bad: Vec<(&'static str, &'static str)>,
}

/// A device type's name, as the greeting and the failures say it.
pub fn kind_name(kind: DeviceType) -> &'static str {
    match kind {
        DeviceType::Network => "net",
        DeviceType::Block => "block",
        DeviceType::Console => "console",
        DeviceType::EntropySource => "rng",
        _ => "other",
    }
}

/*
 * The interrupt side. The handler needs no driver: a table of the windows by
 * IRQ, filled before the gates are pointed at it.
 */

/// Windows by IRQ: up to MAX_PER_IRQ bases each (0 = none). The Host gives
/// each device its own IRQ, but sharing one costs nothing here.
const MAX_PER_IRQ: usize = 4;
static IRQ_WINDOWS: [GuestCell<[u64; MAX_PER_IRQ]>; IRQS] =
    [const { GuestCell::new([0; MAX_PER_IRQ]) }; IRQS];
/// Interrupts taken, by IRQ.
static IRQ_COUNT: [AtomicU64; IRQS] = [const { AtomicU64::new(0) }; IRQS];

/// How many interrupts IRQ `irq` has brought so far.
pub fn irq_count(irq: u32) -> u64 {
    IRQ_COUNT
        .get(irq as usize)
        .map_or(0, |count| count.load(Ordering::SeqCst))
}

/// The device IRQ handler: ack what each window on this IRQ says it raised.
fn device_irq(frame: &mut TrapFrame) {
    let irq = frame.vector as usize - FIRST_EXTERNAL_VECTOR as usize;
    for base in IRQ_WINDOWS[irq].read() {
        if base == 0 {
            continue;
        }
        let status = core::ptr::with_exposed_provenance::<u32>((base + INTERRUPT_STATUS) as usize);
        let ack = core::ptr::with_exposed_provenance_mut::<u32>((base + INTERRUPT_ACK) as usize);
        // SAFETY: `base` is a checked virtio-mmio window (see `scan`), mapped
        // by the Host's identity map; these are 32-bit accesses to two of its
        // registers, which have no effect on the driver's state.
        unsafe {
            let pending = status.read_volatile();
            if pending != 0 {
                ack.write_volatile(pending);
            }
        }
    }
    IRQ_COUNT[irq].fetch_add(1, Ordering::SeqCst);
}

impl Devices {
    /// Read the windows off the command line, check each lies where the ABI
    /// says (above RAM, below pfn_limit), learn what it holds, and take its
    /// IRQ.
    pub fn scan(cmdline: &'static str) -> Devices {
        let mem = boot::mem();
        let limit = lguest_data::pfn_limit() << 12;
        let mut devices = Devices {
            list: Vec::new(),
            bad: Vec::new(),
        };
        for word in cmdline.split_ascii_whitespace() {
            let Some(value) = word.strip_prefix("virtio_mmio.device=") else {
                continue;
            };
            let Some(window) = Window::parse(value) else {
                devices.bad.push((word, "not <size>@<base>:<irq>"));
                continue;
            };
            let end = window.base.checked_add(window.size);
            if window.size < MIN_WINDOW
                || window.base % 4 != 0
                || window.base < mem
                || end.is_none_or(|end| end > limit)
            {
                devices
                    .bad
                    .push((word, "the window is not between RAM and pfn_limit"));
                continue;
            }
            if window.irq == 0 || window.irq as usize >= IRQS {
                devices.bad.push((word, "IRQ out of range 1-31"));
                continue;
            }
            // A look at the header; dropping the transport resets the
            // device, as a driver's probe would.
            // SAFETY: checked just above; nothing else has a transport over
            // this window yet.
            let found =
                unsafe { open(&window) }.map(|t| (t.device_type(), t.version(), t.vendor_id()));
            devices.list.push(Device { window, found });
        }

        // Our handler on every device IRQ. Only windows holding a device get
        // acked.
        for device in &devices.list {
            if device.kind().is_none() {
                continue;
            }
            let slot = &IRQ_WINDOWS[device.window.irq as usize];
            let mut bases = slot.read();
            if let Some(free) = bases.iter_mut().find(|base| **base == 0) {
                *free = device.window.base;
            }
            slot.write(bases);
            interrupts::set_handler(
                FIRST_EXTERNAL_VECTOR + device.window.irq as u8,
                Some(device_irq),
            );
        }
        devices
    }

    /// Whether there is a device of this kind.
    pub fn has(&self, kind: DeviceType) -> bool {
        self.list.iter().any(|device| device.kind() == Some(kind))
    }

    /// A transport over the first device of this kind, with its window. It
    /// borrows the devices: one transport at a time, so never two over one
    /// window. (A driver resets its device when it is dropped, so the next
    /// one starts afresh.)
    pub fn take(&mut self, kind: DeviceType) -> Option<(MmioTransport<'_>, Window)> {
        let device = self
            .list
            .iter()
            .find(|device| device.kind() == Some(kind))?;
        // SAFETY: scan checked the window; the transport borrows `self`
        // mutably, so no other transport from here is alive while it is.
        let transport = unsafe { open(&device.window) }.ok()?;
        Some((transport, device.window))
    }

    /// Say what is there, one line per window.
    pub fn describe(&self) {
        for device in &self.list {
            let w = device.window;
            match &device.found {
                Err(e) => println!(
                    "lguest-guest-drivers: virtio-mmio {:#x}@{:#x} irq {}: {e}",
                    w.size, w.base, w.irq
                ),
                Ok((kind, version, vendor)) => {
                    let version = match version {
                        MmioVersion::Legacy => "legacy",
                        MmioVersion::Modern => "modern",
                    };
                    println!(
                        "lguest-guest-drivers: virtio-mmio {:#x}@{:#x} irq {}: {} ({version}, vendor {vendor:#x})",
                        w.size,
                        w.base,
                        w.irq,
                        kind_name(*kind),
                    );
                }
            }
        }
        for (word, why) in &self.bad {
            println!("lguest-guest-drivers: ignoring {word}: {why}");
        }
    }
}
