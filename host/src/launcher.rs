//! The Launcher: lay out memory, load the kernel, run the Guest, and boot it
//! again when it asks to restart.
//!
//! Everything a user can get wrong (files, sizes, the command line) is checked
//! in [`Launch::prepare`], before /dev/kvm is even opened.

use crate::boot::{BootError, BootImage, Kernel};
use crate::bus::{self, Bus, Transport};
use crate::devices::{self, block::Disk, tap, Backends};
use crate::gdb::{self, GdbError, GdbServer};
use crate::host_pages;
use crate::interrupts::{self, Irqs};
use crate::memory::{GuestMemory, Layout};
use crate::vcpu::{Guest, Stop};
use crate::vm::{Hypervisor, Vm, VmError};
use lguest_abi::{DEVICE_MODEL_VIRTIO, PAGE_SIZE};
use std::path::{Path, PathBuf};

/// The reference Guest, built by build.rs.
pub static BUNDLED_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lguest-guest"));
/// The Guest that drives virtio-mmio devices with the `virtio-drivers` crate.
pub static BUNDLED_DRIVERS_GUEST: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lguest-guest-drivers"));

/// Which kernel to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelChoice {
    /// The bundled reference Guest.
    Reference,
    /// The bundled virtio-drivers Guest.
    Drivers,
    /// A file.
    File(PathBuf),
}

/// Memory sizes the Launcher accepts, in MiB.
pub const MEM_MB_RANGE: std::ops::RangeInclusive<u64> = 2..=65536;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot read {what} {path}: {err}")]
    Read {
        what: &'static str,
        path: String,
        err: std::io::Error,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot set up guest memory: {0}")]
    Memory(std::io::Error),
    #[error("cannot start the Host's threads: {0}")]
    Threads(std::io::Error),
    #[error("{0}")]
    Device(String),
    #[error(transparent)]
    Gdb(#[from] GdbError),
}

/// What to boot.
pub struct Config {
    pub mem_mb: u64,
    pub kernel: KernelChoice,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub kvm_device: PathBuf,
    /// `--block` specs, `FILE[,ro]`.
    pub block: Vec<String>,
    /// `--tunnet` spec.
    pub tunnet: Option<String>,
    pub rng: bool,
    pub transport: Transport,
    /// `--gdb` spec, `[ADDR:]PORT`.
    pub gdb: Option<String>,
}

/// A checked configuration, ready to boot (again and again on restart).
pub struct Launch {
    kernel: Kernel,
    initrd: Option<(String, Vec<u8>)>,
    cmdline: String,
    layout: Layout,
    kvm_device: PathBuf,
    backends: Backends,
    transport: Transport,
    gdb: Option<GdbServer>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, LaunchError> {
    std::fs::read(path).map_err(|err| LaunchError::Read {
        what,
        path: path.display().to_string(),
        err,
    })
}

/// The memory layout for `mem_mb` MiB: RAM, then the device pages (the
/// descriptor page and the rings), then the Host's pages.
pub fn layout_for(mem_mb: u64, device_pages: u64, mmio_hole_pages: u64) -> Layout {
    let mem = mem_mb << 20;
    let pfn_limit = mem / PAGE_SIZE + device_pages;
    Layout {
        mem,
        pfn_limit,
        mmio_hole_pages,
        host_ro_pages: host_pages::ro_pages_for(pfn_limit),
        host_rw_pages: host_pages::STACK_PAGES,
    }
}

impl Launch {
    pub fn prepare(cfg: Config) -> Result<Launch, LaunchError> {
        let (name, image): (String, std::borrow::Cow<'static, [u8]>) = match &cfg.kernel {
            KernelChoice::File(path) => (path.display().to_string(), read("kernel", path)?.into()),
            KernelChoice::Reference => ("bundled reference Guest".into(), BUNDLED_GUEST.into()),
            KernelChoice::Drivers => ("bundled drivers Guest".into(), BUNDLED_DRIVERS_GUEST.into()),
        };
        let kernel = Kernel::parse(&name, image)?;
        let initrd = match &cfg.initrd {
            Some(path) => Some((path.display().to_string(), read("initrd", path)?)),
            None => None,
        };
        let disks = cfg
            .block
            .iter()
            .map(|spec| Disk::open(spec).map(std::sync::Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(LaunchError::Device)?;
        let tunnet = cfg
            .tunnet
            .as_deref()
            .map(tap::parse_tunnet)
            .transpose()
            .map_err(LaunchError::Device)?;
        // The tap is the one set-up step with an effect outside us (it goes
        // away with us), so it comes after every check that needs none.
        let net = match tunnet {
            Some((target, mac)) => {
                let tap = tap::Tap::create(&target).map_err(LaunchError::Device)?;
                Some((
                    std::sync::Arc::new(tap),
                    mac.unwrap_or_else(tap::random_mac),
                ))
            }
            None => None,
        };
        let backends = Backends {
            raw_terminal: false,
            disks,
            net,
            rng: cfg.rng,
        };
        let devices = backends.devices();
        bus::check_fits(&devices).map_err(LaunchError::Device)?;
        let hole = match cfg.transport {
            Transport::Mmio => bus::mmio_hole_pages(devices.len()),
            Transport::LguestBus => 0,
        };
        let layout = layout_for(cfg.mem_mb, bus::device_pages(&devices, cfg.transport), hole);
        let mut cmdline = cfg.cmdline;
        if cfg.transport == Transport::Mmio {
            // Announce the windows the way Linux reads them.
            for word in bus::mmio_cmdline(layout.mem, devices.len()) {
                if !cmdline.is_empty() {
                    cmdline.push(' ');
                }
                cmdline.push_str(&word);
            }
        }
        BootImage {
            kernel: &kernel,
            initrd: initrd.as_ref().map(|(n, d)| (n.as_str(), d.as_slice())),
            cmdline: &cmdline,
            device_model: DEVICE_MODEL_VIRTIO,
        }
        .check(layout.mem)?;
        let gdb = cfg.gdb.as_deref().map(GdbServer::bind).transpose()?;
        let launch = Launch {
            kernel,
            initrd,
            cmdline,
            layout,
            kvm_device: cfg.kvm_device,
            backends,
            transport: cfg.transport,
            gdb,
        };
        Ok(launch)
    }

    fn image(&self) -> BootImage<'_> {
        BootImage {
            kernel: &self.kernel,
            initrd: self
                .initrd
                .as_ref()
                .map(|(n, d)| (n.as_str(), d.as_slice())),
            cmdline: &self.cmdline,
            device_model: DEVICE_MODEL_VIRTIO,
        }
    }

    /// Boots the Guest until it stops for good. A restart boots the same
    /// kernel again with fresh memory, timers and IRQs.
    pub fn run(&self, on_restart: impl Fn(&str)) -> Result<Stop, LaunchError> {
        let hv = Hypervisor::open(&self.kvm_device)?;
        interrupts::install_kick_handler().map_err(LaunchError::Threads)?;
        interrupts::install_ctrl_c_handler().map_err(LaunchError::Threads)?;
        let raw = devices::terminal::make_raw();
        let backends = Backends {
            raw_terminal: raw,
            disks: self.backends.disks.clone(),
            net: self.backends.net.clone(),
            rng: self.backends.rng,
        };
        let mut gdb = gdb::Link::new(self.gdb.as_ref());
        loop {
            let stop = self.boot_once(&hv, &backends, &mut gdb)?;
            match stop {
                Stop::Restart(reason) => on_restart(&reason),
                other => return Ok(other),
            }
        }
    }

    /// One boot, from fresh memory to the Guest's stop.
    pub fn boot_once(
        &self,
        hv: &Hypervisor,
        backends: &Backends,
        gdb: &mut gdb::Link,
    ) -> Result<Stop, LaunchError> {
        let mem = GuestMemory::new(self.layout).map_err(LaunchError::Memory)?;
        let tables = host_pages::build(&mem);
        let entry = self.image().load(&mem)?;
        let vm = Vm::new(hv, &mem, &tables, entry)?;
        tracing::debug!(
            kernel = %self.kernel.name,
            mem = self.layout.mem,
            pfn_limit = self.layout.pfn_limit,
            host_pages = self.layout.host_pages(),
            entry = format_args!("{entry:#x}"),
            cmdline = %self.cmdline,
            "booting"
        );
        let irqs = Irqs::new().map_err(LaunchError::Threads)?;
        let bus = Bus::new(&mem, backends.devices(), &irqs, self.transport)
            .map_err(LaunchError::Threads)?;
        let mut guest = Guest::new(mem, tables, vm, irqs, bus).map_err(LaunchError::Threads)?;
        if !gdb.attach(&mut guest)? {
            return Ok(crate::vcpu::kill("ended by the user (three Ctrl-C)"));
        }
        let stop = guest.run();
        gdb.detach(&mut guest, &stop);
        Ok(stop)
    }
}
