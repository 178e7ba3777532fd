//! The 2007 model in the Launcher: `--transport=dma` and `--sharenet=FILE`.
//!
//! What lives as long as the Launcher ([`DmaSetup`]): the disks, the taps,
//! the Guest's slot on a shared network and the bridge between that network
//! and a tap. What lives for one boot ([`Hub`]): the [`Dma`] hub with its
//! device threads, over that boot's memory. A restart drops the old hub
//! (its threads stop, its shared network forgets the old Guest's keys),
//! maps the shared page into the new memory and starts a new hub.
//!
//! ```text
//! mem              the device table: console, disks, networks
//! mem + 0x1000 ... one page per disk, then one per network; a shared
//!                  network's page is the FILE's first page, mapped here
//! ```

use super::console::ConsoleConfig;
use super::net::SharedBridge;
use super::sharenet::{SharedNet, SharenetError};
use super::table::{DeviceTable, TableError};
use super::{Backends, Dma, DmaError, DmaSetupError, NetBackend, Signals};
use crate::devices::block::Disk;
use crate::devices::tap::{Tap, TapSpec, TunnetError};
use crate::kick::{self, Irqs};
use crate::memory::GuestMemory;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What the command line asks of the 2007 model beyond disks and taps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DmaOptions {
    /// `--sharenet=FILE`: the network every Launcher with FILE shares.
    pub sharenet: Option<PathBuf>,
}

/// Why the 2007 model cannot be set up as asked (set-up errors).
#[derive(Debug, thiserror::Error)]
pub enum DmaLaunchError {
    #[error("--rng: the 2007 device model (--transport=dma) has no random-number device")]
    Rng,
    #[error("--guest=drivers drives virtio-mmio devices; the 2007 device model (--transport=dma) has none")]
    DriversGuest,
    #[error("--tunnet={0}: under the 2007 device model (--transport=dma) the Guest picks its own MAC; give the tap's address or bridge only")]
    TunnetMac(String),
    #[error("--sharenet bridges one tap at most (it becomes slot 0 of the shared network); {0} --tunnet were given")]
    TooManyTunnets(usize),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Tunnet(#[from] TunnetError),
    #[error(transparent)]
    Sharenet(#[from] SharenetError),
    #[error("cannot start the 2007 devices: {0}")]
    Start(#[from] DmaSetupError),
    #[error("cannot map the shared network's page into the Guest: {0}")]
    Map(std::io::Error),
    #[error("cannot set up the 2007 devices: {0}")]
    Io(std::io::Error),
}

/// Checks what the command line asks of the 2007 model, before anything is
/// created: `mem` bytes of RAM, the opened disks, the parsed `--tunnet`s
/// (with their specs, for messages).
pub fn check(
    opts: &DmaOptions,
    mem: u64,
    disks: &[Arc<Disk>],
    tunnets: &[(String, TapSpec, Option<[u8; 6]>)],
    rng: bool,
    drivers_guest: bool,
) -> Result<(), DmaLaunchError> {
    if rng {
        return Err(DmaLaunchError::Rng);
    }
    if drivers_guest {
        return Err(DmaLaunchError::DriversGuest);
    }
    if let Some((spec, _, _)) = tunnets.iter().find(|(_, _, mac)| mac.is_some()) {
        return Err(DmaLaunchError::TunnetMac(spec.clone()));
    }
    if opts.sharenet.is_some() && tunnets.len() > 1 {
        return Err(DmaLaunchError::TooManyTunnets(tunnets.len()));
    }
    let nets = if opts.sharenet.is_some() {
        1
    } else {
        tunnets.len()
    };
    table(mem, disks, &vec![0; nets])?;
    Ok(())
}

fn table(mem: u64, disks: &[Arc<Disk>], nets: &[u16]) -> Result<DeviceTable, TableError> {
    let sectors: Vec<u64> = disks.iter().map(|d| d.sectors).collect();
    DeviceTable::new(mem, &sectors, nets)
}

/// The 2007 model's devices, opened once for every boot of the Launcher.
pub struct DmaSetup {
    mem: u64,
    disks: Vec<Arc<Disk>>,
    nets: Vec<NetBackend>,
    /// `--sharenet` with `--tunnet`: the tap as slot 0 of the network,
    /// running for as long as we do.
    _bridge: Option<SharedBridge>,
}

impl DmaSetup {
    /// Creates the taps and joins the shared network: the steps with an
    /// effect outside us, so the caller has checked everything else first
    /// ([`check`]).
    pub fn open(
        opts: &DmaOptions,
        mem: u64,
        disks: Vec<Arc<Disk>>,
        tunnets: Vec<(String, TapSpec, Option<[u8; 6]>)>,
    ) -> Result<DmaSetup, DmaLaunchError> {
        let mut taps = Vec::new();
        for (_, target, _) in &tunnets {
            let tap = Tap::create(target)?;
            // 2007 frames are bare Ethernet: the tap's FramePort adds and
            // strips a 10-byte virtio-net header, so say that to the tap
            // rather than rely on its default.
            tap.set_header_size(10).map_err(DmaLaunchError::Io)?;
            tracing::debug!("dma: tap {} on {target}", tap.name);
            taps.push(Arc::new(tap));
        }
        let (nets, bridge) = match &opts.sharenet {
            Some(path) => {
                // Slot 0 first: if another Launcher bridges this network,
                // we say so before taking a Guest slot.
                let bridge = match taps.pop() {
                    Some(tap) => {
                        let net = SharedNet::join_bridge(path)?;
                        let bridge = kick::without_sigint(|| SharedBridge::start(net, tap))
                            .map_err(DmaLaunchError::Io)?;
                        tracing::debug!("dma: the tap is slot 0 of {}", path.display());
                        Some(bridge)
                    }
                    None => None,
                };
                let net = SharedNet::join(path)?;
                tracing::debug!(
                    "dma: the Guest is slot {} of {}",
                    net.slot(),
                    path.display()
                );
                (vec![NetBackend::Shared(Arc::new(net))], bridge)
            }
            None => (
                taps.into_iter()
                    .map(|t| NetBackend::Tap(t as Arc<dyn super::net::FramePort>))
                    .collect(),
                None,
            ),
        };
        let setup = DmaSetup {
            mem,
            disks,
            nets,
            _bridge: bridge,
        };
        setup.table()?;
        Ok(setup)
    }

    fn table(&self) -> Result<DeviceTable, TableError> {
        let features: Vec<u16> = self.nets.iter().map(NetBackend::features).collect();
        table(self.mem, &self.disks, &features)
    }

    /// Pages the model needs at `mem`: the table and a page per device.
    pub fn device_pages(&self) -> u64 {
        self.table().map_or(1, |t| t.pages())
    }

    /// Maps every shared network's page over its place in a new boot's
    /// memory: before the VM is made, so KVM only ever sees the shared page
    /// there.
    pub fn map_shared(&self, mem: &GuestMemory) -> Result<(), DmaLaunchError> {
        let table = self.table()?;
        for (i, net) in self.nets.iter().enumerate() {
            if let (NetBackend::Shared(net), Some(page)) = (net, table.net_page(i)) {
                net.map_into(mem, page).map_err(DmaLaunchError::Map)?;
            }
        }
        Ok(())
    }

    /// Starts the devices for one boot over `mem`: writes the table and
    /// starts their threads, with SIGINT blocked (only the vCPU thread
    /// takes Ctrl-C).
    pub fn start(
        &self,
        mem: &GuestMemory,
        irqs: &Arc<Irqs>,
        raw_terminal: bool,
    ) -> Result<Hub, DmaLaunchError> {
        let input = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(DmaLaunchError::Io)?;
        let backends = Backends {
            console: ConsoleConfig {
                input: Some(Arc::new(input)),
                output: Arc::new(Mutex::new(Stdout(irqs.clone()))),
                raw_terminal,
            },
            disks: self.disks.clone(),
            nets: self.nets.clone(),
        };
        let signals = Arc::new(LauncherSignals {
            irqs: irqs.clone(),
            input_ended: AtomicBool::new(false),
        });
        let ram: Arc<dyn super::GuestRam> = Arc::new(mem.clone());
        let dma = kick::without_sigint(|| Dma::new(ram, &backends, signals.clone()))?;
        tracing::debug!(
            "dma: device table at {:#x}: the console, {} disks, {} networks",
            self.mem,
            self.disks.len(),
            self.nets.len()
        );
        Ok(Hub { dma, signals })
    }
}

/// The Launcher's stdout for the Guest's SEND_DMA to key 0: the early
/// console's way (see `devices::console::write_early`), which keeps order
/// with it and waits for room in poll(), never in write(). A Guest whose
/// output nobody reads is held in its hypercall, and the user's three
/// Ctrl-C or a Sudden Death still end it.
struct Stdout(Arc<Irqs>);

impl std::io::Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::devices::console::write_early(buf, &self.0);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How the device threads reach the vCPU: IRQs and Sudden Death through
/// the boot's [`Irqs`]; the end of input is kept for the next HALT.
struct LauncherSignals {
    irqs: Arc<Irqs>,
    input_ended: AtomicBool,
}

impl Signals for LauncherSignals {
    fn raise(&self, irq: u32) {
        self.irqs.raise(irq);
    }
    fn kill(&self, reason: String) {
        self.irqs.kill(reason);
    }
    fn end_of_input(&self) {
        self.input_ended.store(true, Ordering::SeqCst);
    }
}

/// The 2007 model for one boot: what the vCPU's hypercalls reach.
pub struct Hub {
    // Declared first: the device threads stop before anything else goes.
    dma: Dma,
    signals: Arc<LauncherSignals>,
}

impl Hub {
    /// BIND_DMA: the value for RAX, or the rule the Guest broke.
    pub fn bind_dma(&self, key: u64, array: u64, count_irq: u64) -> Result<u64, DmaError> {
        self.dma.bind_dma(key, array, count_irq)
    }

    /// SEND_DMA: the sender's used_len is written when it returns.
    pub fn send_dma(&self, key: u64, dma: u64) -> Result<(), DmaError> {
        let sent = self.dma.send_dma(key, dma)?;
        if let Some(irq) = sent.raise {
            self.signals.raise(irq);
        }
        Ok(())
    }

    /// The Guest halts: console input waiting for a buffer looks again
    /// (the Guest frees buffers without telling us). True when this HALT
    /// is where the Guest ends: its input has ended, it has read all of it,
    /// and it waits for nothing but more (`waits_for_time`: no clock event
    /// is set, or its tick is not pending). A Guest halting inside a
    /// command, with a timeout set (a ping, a disk request), finishes it
    /// first, as it would on the virtio console.
    pub fn halt(&self, waits_for_time: impl FnOnce() -> bool) -> bool {
        self.dma.poke();
        self.signals.input_ended.load(Ordering::SeqCst) && !waits_for_time()
    }

    pub fn table(&self) -> &DeviceTable {
        self.dma.table()
    }
}
