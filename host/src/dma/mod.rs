//! The 2007 device model (ABI section 9, device model 1): a device table,
//! device pages, and two hypercalls that move bytes, BIND_DMA and SEND_DMA.
//!
//! Before virtio, lguest's Guests had one I/O mechanism. A Guest *binds*
//! arrays of `struct lguest_dma` (up to 16 addr/len sections each) at a
//! *key*, an address inside a device page, with an IRQ; whoever *sends* to
//! that key fills the first free buffer (used_len 0), sets its used_len and
//! raises the IRQ. Output is the other way round: the Guest sends to a key,
//! and the Launcher's device that owns the key (or another Guest bound at
//! the same key of a shared network page) takes the bytes.
//!
//! The pieces, each usable on its own:
//! - [`table::DeviceTable`]: the 16-entry table at `mem` and the device pages
//!   after it, and which device owns a key;
//! - [`bindings::Bindings`]: the Guest's live bindings and every rule that
//!   ends a Guest (the [`DmaError`]s), over any [`GuestRam`];
//! - [`Dma`]: the hub the vCPU thread calls for BIND_DMA and SEND_DMA, with
//!   the device backends behind it: the [`console`], [`block`] disks (on a
//!   thread of their own), a network whose slot 0 is a tap ([`net`]) or a
//!   network shared by several Launchers ([`sharenet`]);
//! - [`bench`]: the floor for the shared network's benchmark;
//! - [`launch`]: the Launcher's side, `--transport=dma` and `--sharenet`.
//!
//! Threads other than the vCPU's reach the Guest through [`Signals`]: they
//! raise IRQs and report Sudden Death there; the caller decides how.

pub mod bench;
pub mod bindings;
pub mod block;
pub mod console;
pub mod harness;
pub mod launch;
pub mod net;
pub mod sharenet;
pub mod table;

use crate::memory::{GuestMemory, OutOfBounds};
use bindings::Bindings;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

pub use bindings::Delivered;
pub use table::{DeviceTable, KeyOwner};

/// The Guest's memory as the DMA model sees it. [`GuestMemory`] is the real
/// one; [`harness::RecordingRam`] is plain bytes that remember every write, for
/// tests.
pub trait GuestRam: Send + Sync {
    /// `mem`: RAM is `[0, mem)`; the device table page starts here.
    fn ram_size(&self) -> u64;
    /// The first Host-owned address (`pfn_limit << 12`): nothing from here
    /// on is the Guest's.
    fn host_base(&self) -> u64;
    /// Reads Guest memory (RAM or device pages).
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), OutOfBounds>;
    /// Writes Guest memory (RAM or device pages).
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), OutOfBounds>;

    fn read_u32(&self, addr: u64) -> Result<u32, OutOfBounds> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn write_u32(&self, addr: u64, v: u32) -> Result<(), OutOfBounds> {
        self.write(addr, &v.to_le_bytes())
    }
}

impl GuestRam for GuestMemory {
    fn ram_size(&self) -> u64 {
        self.layout.mem
    }
    fn host_base(&self) -> u64 {
        self.layout.host_base()
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        GuestMemory::read(self, addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), OutOfBounds> {
        GuestMemory::write(self, addr, buf)
    }
}

/// How threads other than the vCPU's reach the Guest. The Launcher's
/// implementation raises IRQs through its interrupt state and ends the
/// Guest the way a device does; tests count.
pub trait Signals: Send + Sync {
    /// Raise `irq` (1-31) for the Guest.
    fn raise(&self, irq: u32);
    /// End the Guest: Sudden Death found off the vCPU thread (a bound
    /// buffer that broke a rule when bytes were moved into it), or the user
    /// pressed Ctrl-C three times. Only the first reason counts.
    fn kill(&self, reason: String);
    /// The console's input ended and the Guest has taken every byte of it:
    /// time to power off (`guest powered off: end of input`) once it has
    /// finished what it was doing. Called once, just before the console
    /// raises its IRQ one last time, so a Guest asleep hears too.
    fn end_of_input(&self) {}
}

/// Which operation found a broken rule, for the Sudden Death reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Bind,
    Send,
    /// Moving bytes into a buffer the Guest bound at this key.
    Deliver {
        key: u64,
    },
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Call::Bind => write!(f, "BIND_DMA"),
            Call::Send => write!(f, "SEND_DMA"),
            Call::Deliver { key } => write!(f, "DMA into a buffer bound at key {key:#x}"),
        }
    }
}

/// Where a structure or section lies that it must not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misplaced {
    /// Not inside RAM, `[0, mem)` (in the device pages, or past them).
    OutsideRam,
    /// In the Host's own pages, from `pfn_limit << 12`.
    InHostPage,
    /// Running over a page boundary.
    CrossesPage,
}

impl fmt::Display for Misplaced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Misplaced::OutsideRam => "outside RAM [0, mem)",
            Misplaced::InHostPage => "in a Host page",
            Misplaced::CrossesPage => "crossing a page boundary",
        })
    }
}

/// A rule of ABI section 9 the Guest broke: each one ends the Guest, and the
/// message (after `guest killed: `) names the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    #[error("{call}: key {key:#x} is not 4-byte aligned")]
    KeyUnaligned { call: Call, key: u64 },
    #[error(
        "{call}: key {key:#x} is neither 0 (the console) nor inside a block or net device page"
    )]
    KeyOutsideDevicePages { call: Call, key: u64 },
    #[error("BIND_DMA: count {count} (an array holds 1 to 16 lguest_dma)")]
    BadCount { count: u64 },
    #[error("BIND_DMA: IRQ {irq} is over 31")]
    BadIrq { irq: u64 },
    #[error("BIND_DMA: a 33rd live binding (at most 32)")]
    TooManyBindings,
    #[error("{call}: the lguest_dma at {addr:#x} is {place}")]
    BadDma {
        call: Call,
        addr: u64,
        place: Misplaced,
    },
    #[error("{call}: section {index} ({len} bytes at {addr:#x}) of the lguest_dma at {dma:#x} is {place}")]
    BadSection {
        call: Call,
        dma: u64,
        index: usize,
        addr: u64,
        len: u16,
        place: Misplaced,
    },
}

/// What SEND_DMA did, for the vCPU thread: RAX is 0 (SEND_DMA returns
/// nothing); the sender's used_len is already written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The bytes taken, as written into the sender's used_len.
    pub used_len: u32,
    /// An IRQ of this Guest to raise now, if the send completed something
    /// of its own at once.
    pub raise: Option<u32>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One network of this Guest's, in table order.
#[derive(Clone)]
pub enum NetBackend {
    /// A network of this Guest and the Launcher alone: slot 0 is a bridge to
    /// a tap (or any [`net::FramePort`]), the Guest is slot 1.
    Tap(Arc<dyn net::FramePort>),
    /// A network shared with every Launcher started with the same FILE.
    Shared(Arc<sharenet::SharedNet>),
}

impl NetBackend {
    /// The features of its table entry: the Guest's slot in bits 0-11.
    pub fn features(&self) -> u16 {
        match self {
            NetBackend::Tap(_) => net::GUEST_SLOT as u16 | lguest_abi::LGUEST_DEVICE_F_RANDOMNESS,
            NetBackend::Shared(s) => s.slot() as u16 | lguest_abi::LGUEST_NET_F_NOCSUM,
        }
    }
}

/// What a [`Dma`] is built from: the backends, opened once and kept across
/// Guest restarts (a restart builds a new `Dma` on the same backends).
pub struct Backends {
    pub console: console::ConsoleConfig,
    pub disks: Vec<Arc<crate::devices::block::Disk>>,
    pub nets: Vec<NetBackend>,
}

impl Backends {
    /// The device table these backends make (blocks, then nets).
    pub fn table(&self, mem: u64) -> Result<DeviceTable, table::TableError> {
        let sectors: Vec<u64> = self.disks.iter().map(|d| d.sectors).collect();
        let nets: Vec<u16> = self.nets.iter().map(NetBackend::features).collect();
        DeviceTable::new(mem, &sectors, &nets)
    }
}

/// The 2007 model for one boot: the Guest's bindings and its devices. The
/// vCPU thread calls [`Dma::bind_dma`] and [`Dma::send_dma`]; the device
/// threads deliver input on their own and reach the Guest through
/// [`Signals`]. Dropping it stops and joins them.
pub struct Dma {
    mem: Arc<dyn GuestRam>,
    table: DeviceTable,
    bindings: Arc<Mutex<Bindings>>,
    console: console::Console,
    disks: Vec<block::BlockDevice>,
    nets: Vec<net::NetDevice>,
    /// SEND_DMA's gather buffer, kept between calls.
    scratch: Mutex<Vec<u8>>,
}

impl Dma {
    /// Writes the device table into Guest memory and starts the devices.
    /// For a shared network, the caller maps its page at the net entry's
    /// page first (see [`sharenet::SharedNet::map_into`]).
    pub fn new(
        mem: Arc<dyn GuestRam>,
        backends: &Backends,
        signals: Arc<dyn Signals>,
    ) -> Result<Dma, DmaSetupError> {
        let table = backends.table(mem.ram_size())?;
        table
            .write(mem.as_ref())
            .map_err(|e| DmaSetupError::Table(table::TableError::Memory(e)))?;
        let bindings = Arc::new(Mutex::new(Bindings::new()));
        let ctx = DeviceContext {
            mem: mem.clone(),
            bindings: bindings.clone(),
            signals,
        };
        let console = console::Console::start(&backends.console, ctx.clone())
            .map_err(DmaSetupError::Thread)?;
        let mut disks = Vec::new();
        for (i, disk) in backends.disks.iter().enumerate() {
            let page = table.block_page(i).expect("one page per disk");
            disks.push(
                block::BlockDevice::start(disk.clone(), page, ctx.clone())
                    .map_err(DmaSetupError::Thread)?,
            );
        }
        let mut nets = Vec::new();
        for (i, backend) in backends.nets.iter().enumerate() {
            let page = table.net_page(i).expect("one page per net");
            nets.push(
                net::NetDevice::start(backend, page, ctx.clone()).map_err(DmaSetupError::Thread)?,
            );
        }
        Ok(Dma {
            mem,
            table,
            bindings,
            console,
            disks,
            nets,
            scratch: Mutex::new(Vec::new()),
        })
    }

    pub fn table(&self) -> &DeviceTable {
        &self.table
    }

    /// BIND_DMA: RAX = 1 bound (or unbound), 0 nothing to unbind.
    pub fn bind_dma(&self, key: u64, array: u64, count_irq: u64) -> Result<u64, DmaError> {
        let mut bindings = lock(&self.bindings);
        let before = bindings.keys_in(self.table.net_pages());
        let result = bindings.bind(self.mem.as_ref(), &self.table, key, array, count_irq)?;
        let after = bindings.keys_in(self.table.net_pages());
        if before != after {
            // A shared network must know which keys we listen on.
            for (net, page) in self.nets.iter().zip(self.table.net_pages()) {
                net.bindings_changed(&bindings, page);
            }
        }
        drop(bindings);
        if count_irq & lguest_abi::BIND_DMA_IRQ_MASK != 0 {
            // New buffers: console input that was waiting may fit now, or
            // the end of input may reach a Guest that reads at last; so may
            // a frame held for want of room.
            self.console.wake();
            for net in &self.nets {
                net.poke();
            }
        }
        Ok(result)
    }

    /// SEND_DMA: checks the lguest_dma and the key, hands the bytes to
    /// whoever owns the key, and writes the sender's used_len.
    pub fn send_dma(&self, key: u64, dma_addr: u64) -> Result<Sent, DmaError> {
        let mut scratch = lock(&self.scratch);
        let owner = outgoing(self.mem.as_ref(), &self.table, key, dma_addr, &mut scratch)?;
        let sent = match owner {
            KeyOwner::Console => self.console.output(&scratch),
            KeyOwner::Block { index, offset } => {
                self.disks[index].send(offset, &scratch, &self.bindings)?
            }
            KeyOwner::Net { index, offset } => Sent {
                used_len: self.nets[index].send(offset, &scratch),
                raise: None,
            },
        };
        self.mem
            .write_u32(
                dma_addr + lguest_abi::dma_off::DMA_USED_LEN as u64,
                sent.used_len,
            )
            .expect("read_dma checked it lies in RAM");
        Ok(sent)
    }

    /// The Guest may have freed buffers (it does so by writing used_len,
    /// without a hypercall): console input, or a shared network's frame,
    /// that waits for one looks again. The caller calls this when the Guest
    /// halts.
    pub fn poke(&self) {
        self.console.poke();
        for net in &self.nets {
            net.poke();
        }
    }
}

/// SEND_DMA's half that is the same whoever takes the bytes: who owns
/// `key`, and the bytes of the lguest_dma at `dma_addr` gathered into `out`
/// (cleared first), the structure and its sections checked on the way.
pub fn outgoing(
    mem: &dyn GuestRam,
    table: &DeviceTable,
    key: u64,
    dma_addr: u64,
    out: &mut Vec<u8>,
) -> Result<KeyOwner, DmaError> {
    let owner = table.key_owner(Call::Send, key)?;
    let dma = bindings::read_dma(mem, Call::Send, dma_addr)?;
    bindings::check_sections(mem, Call::Send, dma_addr, &dma)?;
    bindings::gather(mem, &dma, out);
    Ok(owner)
}

/// Why a [`Dma`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum DmaSetupError {
    #[error(transparent)]
    Table(#[from] table::TableError),
    #[error("cannot start a device thread: {0}")]
    Thread(std::io::Error),
}

/// What every device thread shares with the hub.
#[derive(Clone)]
pub(crate) struct DeviceContext {
    pub mem: Arc<dyn GuestRam>,
    pub bindings: Arc<Mutex<Bindings>>,
    pub signals: Arc<dyn Signals>,
}

impl DeviceContext {
    /// Moves `data` into the first free buffer bound at `key` and raises its
    /// IRQ; a bound buffer that broke a rule ends the Guest instead. Returns
    /// the bytes taken (None: no free buffer, the bytes are dropped).
    pub fn deliver(&self, key: u64, data: &[u8]) -> Option<u32> {
        let result = lock(&self.bindings).deliver(self.mem.as_ref(), key, data);
        match result {
            Ok(Some(d)) => {
                self.signals.raise(d.irq);
                Some(d.bytes)
            }
            Ok(None) => None,
            Err(e) => {
                self.signals.kill(e.to_string());
                None
            }
        }
    }

    /// Like [`DeviceContext::deliver`], for bytes that can wait (a shared
    /// network's ring holds them): `NoRoom` when the Guest bound buffers at
    /// `key` but none is free now. Bytes for a key nobody bound are
    /// dropped.
    pub fn offer(&self, key: u64, data: &[u8]) -> sharenet::Offer {
        let bindings = lock(&self.bindings);
        match bindings.deliver(self.mem.as_ref(), key, data) {
            Ok(Some(d)) => {
                drop(bindings);
                self.signals.raise(d.irq);
                sharenet::Offer::Done
            }
            Ok(None) if bindings.irq_at(key).is_some() => sharenet::Offer::NoRoom,
            Ok(None) => sharenet::Offer::Done,
            Err(e) => {
                drop(bindings);
                self.signals.kill(e.to_string());
                sharenet::Offer::Done
            }
        }
    }
}
