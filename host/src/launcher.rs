//! The Launcher: lay out memory, load the kernel, run the Guest, and boot it
//! again when it asks to restart.
//!
//! Everything a user can get wrong (files, sizes, the command line) is checked
//! in [`Launch::prepare`], before /dev/kvm is even opened.

use crate::boot::{BootError, BootImage, Initrd, Kernel};
use crate::bus::{self, Bus, Transport};
use crate::devices::{self, block::Disk, block::DiskError, tap, Backends};
use crate::files::{kind_of, open_nonblocking, set_blocking};
use crate::gdb::{self, GdbError, GdbServer};
use crate::host_pages;
use crate::kick::{self, Irqs};
use crate::memory::{GuestMemory, Layout};
use crate::sandbox::{self, Enforcement, Filters, Privileges, SandboxError};
use crate::vcpu::{Guest, Stop};
use crate::virtio::{Device, DeviceError, Queues};
use crate::vm::{Hypervisor, Vm, VmError};
use lguest_abi::{DEVICE_MODEL_DMA, DEVICE_MODEL_VIRTIO, PAGE_SIZE};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The reference Guest, built by build.rs.
pub static BUNDLED_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lguest-guest"));
/// The same kernel with its self-tests, `bad=` cases and benchmark loops:
/// what the reference Guest boots as when its command line asks for them.
pub static BUNDLED_TESTS_GUEST: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lguest-guest-tests"));
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
    /// The bundled reference Guest with its self-tests and bad= cases.
    Tests,
    /// A file.
    File(PathBuf),
}

/// Whether a command line asks the reference Guest for something only its
/// test-carrying build has: a self-test, a broken case or a benchmark.
pub fn wants_tests(cmdline: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|word| {
        ["test=", "bad=", "bench="]
            .iter()
            .any(|p| word.starts_with(p))
    })
}

/// Memory sizes the Launcher accepts, in MiB.
pub const MEM_MB_RANGE: std::ops::RangeInclusive<u64> = 2..=65536;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot open {what} {path}: {err}")]
    Open {
        what: &'static str,
        path: String,
        err: std::io::Error,
    },
    #[error("{what} {path} is {kind}, not a regular file")]
    NotRegular {
        what: &'static str,
        path: String,
        kind: &'static str,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("disk {0} is given twice, and read-write: two disks on one file would corrupt it")]
    DiskTwice(String),
    #[error(transparent)]
    Tunnet(#[from] tap::TunnetError),
    #[error(
        "the reference Guest finds devices on the lguest bus only: with --transport=mmio it \
         has no console for its prompt (use --guest=drivers, which drives virtio-mmio)"
    )]
    ReferenceNeedsBus,
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot set up guest memory: {0}")]
    Memory(std::io::Error),
    #[error("cannot start the Host's threads: {0}")]
    Threads(std::io::Error),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Gdb(#[from] GdbError),
    #[error(transparent)]
    Dma(#[from] crate::dma::launch::DmaLaunchError),
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
    /// `--tunnet` specs, one network card each, in order.
    pub tunnet: Vec<String>,
    pub rng: bool,
    pub transport: Transport,
    /// `--username`: the user to become once set-up is done.
    pub username: Option<String>,
    /// `--chroot`: the directory to make the root once set-up is done.
    pub chroot: Option<PathBuf>,
    /// How the seccomp filters treat a call off their lists; None with
    /// `--no-seccomp`.
    pub seccomp: Option<Enforcement>,
    /// `--gdb` spec, `[ADDR:]PORT`.
    pub gdb: Option<String>,
    /// The 2007 device model instead of virtio (`--transport=dma`,
    /// `--sharenet`): then `transport` is not looked at.
    pub dma: Option<crate::dma::launch::DmaOptions>,
}

/// A checked configuration, ready to boot (again and again on restart).
pub struct Launch {
    kernel: Kernel,
    initrd: Option<Initrd>,
    cmdline: String,
    layout: Layout,
    kvm_device: PathBuf,
    backends: Backends,
    transport: Transport,
    privileges: Privileges,
    filters: Option<Filters>,
    gdb: Option<GdbServer>,
    /// The 2007 model's devices, instead of `backends` on a bus.
    dma: Option<crate::dma::launch::DmaSetup>,
}

/// Opens the kernel or initrd at `path`: a regular file, read-only. Returns
/// it with its size.
fn open_regular(what: &'static str, path: &Path) -> Result<(File, u64), LaunchError> {
    let name = || path.display().to_string();
    let open_err = |err| LaunchError::Open {
        what,
        path: name(),
        err,
    };
    let (file, meta) = open_nonblocking(path, false, 0).map_err(open_err)?;
    if !meta.file_type().is_file() {
        return Err(LaunchError::NotRegular {
            what,
            path: name(),
            kind: kind_of(meta.file_type()),
        });
    }
    set_blocking(&file).map_err(open_err)?;
    Ok((file, meta.len()))
}

/// A network card as the bus sees it (its queues and config space), before
/// its tap exists: what `bus::check_fits` counts.
struct CardShape;

impl Device for CardShape {
    fn name(&self) -> &'static str {
        "net"
    }
    fn virtio_id(&self) -> u8 {
        lguest_abi::VIRTIO_ID_NET
    }
    fn queue_names(&self) -> &'static [&'static str] {
        &["rx", "tx"]
    }
    fn features(&self) -> u32 {
        0
    }
    /// {u8 mac[6], u16 status}
    fn config(&self) -> Vec<u8> {
        vec![0; 8]
    }
    fn kick(&mut self, _q: usize, _queues: &mut Queues) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// Whether the disk at `path` is one of `disks` already (by inode).
fn opened_twice(path: &str, disks: &[Arc<Disk>]) -> bool {
    std::fs::metadata(path).is_ok_and(|m| disks.iter().any(|d| d.inode == (m.dev(), m.ino())))
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
    /*L:110 Set-up: open what the user named without ever blocking or
     * reading more than can be loaded (kernel, initrd, disks), lay out the
     * devices, and only then make taps, which are seen outside us. */
    pub fn prepare(cfg: Config) -> Result<Launch, LaunchError> {
        let mem = cfg.mem_mb << 20;
        // The sandbox's options are checked first: like every other check,
        // before anything with an effect outside us (a tap) is made.
        let privileges = Privileges::prepare(cfg.username.as_deref(), cfg.chroot.as_deref())?;
        let filters = cfg
            .seccomp
            .map(|mode| Filters::compile(mode, cfg.gdb.is_some()))
            .transpose()?;
        let kernel = match &cfg.kernel {
            KernelChoice::File(path) => {
                let (file, len) = open_regular("kernel", path)?;
                Kernel::from_file(&path.display().to_string(), file, len)?
            }
            KernelChoice::Reference if wants_tests(&cfg.cmdline) => Kernel::from_bytes(
                "bundled reference Guest (with its tests)",
                BUNDLED_TESTS_GUEST,
            )?,
            KernelChoice::Reference => {
                Kernel::from_bytes("bundled reference Guest", BUNDLED_GUEST)?
            }
            KernelChoice::Drivers => {
                Kernel::from_bytes("bundled drivers Guest", BUNDLED_DRIVERS_GUEST)?
            }
            KernelChoice::Tests => Kernel::from_bytes(
                "bundled reference Guest (with its tests)",
                BUNDLED_TESTS_GUEST,
            )?,
        };
        tracing::debug!("kernel {}, entry {:#x}", kernel.name, kernel.entry);
        let initrd = match &cfg.initrd {
            Some(path) => {
                let (file, size) = open_regular("initrd", path)?;
                let initrd = Initrd::from_file(&path.display().to_string(), file, size, mem)?;
                tracing::debug!("initrd {}, {} bytes", initrd.name, initrd.size);
                Some(initrd)
            }
            None => None,
        };
        // The reference Guest looks for its devices on the lguest bus only;
        // under mmio it can still run its self-tests and its bad= cases (which
        // poke the windows), but not the prompt.
        if cfg.transport == Transport::Mmio
            && cfg.kernel == KernelChoice::Reference
            && !cfg
                .cmdline
                .split_whitespace()
                .any(|w| w.starts_with("test=") || w.starts_with("bad="))
        {
            return Err(LaunchError::ReferenceNeedsBus);
        }
        let mut disks: Vec<Arc<Disk>> = Vec::new();
        for spec in &cfg.block {
            let disk = match Disk::open(spec) {
                Ok(disk) => disk,
                Err(DiskError::InUse { path, .. }) if opened_twice(&path, &disks) => {
                    return Err(LaunchError::DiskTwice(path));
                }
                Err(e) => return Err(e.into()),
            };
            tracing::debug!(
                "disk {}: {}, {} sectors, {}",
                disk.path,
                disk.kind,
                disk.sectors,
                if disk.read_only {
                    "read-only (shared lock)"
                } else {
                    "read-write (exclusive lock)"
                }
            );
            disks.push(Arc::new(disk));
        }
        let tunnets = cfg
            .tunnet
            .iter()
            .map(|spec| tap::parse_tunnet(spec))
            .collect::<Result<Vec<_>, _>>()?;
        for (target, _) in &tunnets {
            if let tap::TapSpec::Bridge(name) = target {
                tap::check_bridge(name)?;
            }
        }
        if let Some(opts) = cfg.dma.clone() {
            return Launch::prepare_dma(
                cfg,
                &opts,
                (kernel, initrd),
                disks,
                tunnets,
                (privileges, filters),
            );
        }
        if cfg.rng {
            tracing::debug!("rng: random numbers from getrandom");
        }
        let mut backends = Backends {
            raw_terminal: false,
            disks,
            nets: Vec::new(),
            rng: cfg.rng,
        };
        // The devices must fit the bus before any tap is made: a card's
        // stand-in has its shape (queues, config), and no tap.
        let mut shapes = backends.devices();
        let rng = cfg.rng.then(|| shapes.pop()).flatten();
        shapes.extend(
            tunnets
                .iter()
                .map(|_| Box::new(CardShape) as Box<dyn Device>),
        );
        shapes.extend(rng);
        bus::check_fits(&shapes)?;
        let mut cmdline = cfg.cmdline;
        if cfg.transport == Transport::Mmio {
            // Announce the windows the way Linux reads them.
            for word in bus::mmio_cmdline(mem, shapes.len()) {
                if !cmdline.is_empty() {
                    cmdline.push(' ');
                }
                cmdline.push_str(&word);
            }
        }
        BootImage {
            kernel: &kernel,
            initrd: initrd.as_ref(),
            cmdline: &cmdline,
            device_model: DEVICE_MODEL_VIRTIO,
        }
        .check(mem)?;
        // The taps are the one set-up step with an effect outside us (they go
        // away with us), so they come after every check that needs none.
        for (target, mac) in tunnets {
            let tap = tap::Tap::create(&target)?;
            let mac = mac.unwrap_or_else(tap::random_mac);
            tracing::debug!(
                "network card {}: tap {} on {}, MAC {}",
                backends.nets.len(),
                tap.name,
                target,
                tap::MacDisplay(mac)
            );
            backends.nets.push((Arc::new(tap), mac));
        }
        let devices = backends.devices();
        // Again with the real cards, should a stand-in ever differ.
        bus::check_fits(&devices)?;
        let hole = match cfg.transport {
            Transport::Mmio => bus::mmio_hole_pages(devices.len()),
            Transport::LguestBus => 0,
        };
        let layout = layout_for(cfg.mem_mb, bus::device_pages(&devices, cfg.transport), hole);
        let gdb = cfg.gdb.as_deref().map(GdbServer::bind).transpose()?;
        let launch = Launch {
            kernel,
            initrd,
            cmdline,
            layout,
            kvm_device: cfg.kvm_device,
            backends,
            transport: cfg.transport,
            privileges,
            filters,
            gdb,
            dma: None,
        };
        Ok(launch)
    }

    fn image(&self) -> BootImage<'_> {
        BootImage {
            kernel: &self.kernel,
            initrd: self.initrd.as_ref(),
            cmdline: &self.cmdline,
            device_model: match self.dma {
                Some(_) => DEVICE_MODEL_DMA,
                None => DEVICE_MODEL_VIRTIO,
            },
        }
    }

    /// Boots the Guest until it stops for good. A restart boots the same
    /// kernel again with fresh memory, timers and IRQs.
    /*L:170 Boot, and boot again for as long as the Guest asks to restart:
     * fresh memory, VM, timers and devices each time, privileges dropped and
     * the sandbox on before the first instruction. */
    pub fn run(&self, on_restart: impl Fn(&str)) -> Result<Stop, LaunchError> {
        let hv = Hypervisor::open(&self.kvm_device)?;
        kick::install_kick_handler().map_err(LaunchError::Threads)?;
        kick::install_ctrl_c_handler().map_err(LaunchError::Threads)?;
        let raw = devices::terminal::make_raw();
        self.lock_down()?;
        let backends = Backends {
            raw_terminal: raw,
            disks: self.backends.disks.clone(),
            nets: self.backends.nets.clone(),
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

    /// Everything a boot needs is open now (/dev/kvm, the kernel and
    /// initrd, the disks, the taps, stdout): give up the rest. Change root
    /// and user (`--chroot`, `--username`), then install the vCPU thread's
    /// seccomp filter, before the Guest's first instruction. The threads
    /// each boot starts install their own ([`sandbox::enter_thread`]).
    fn lock_down(&self) -> Result<(), LaunchError> {
        // The console's own way to stdout is opened through /proc, which
        // neither a chroot nor the filters allow later.
        devices::console::open_stdout();
        self.privileges.drop_now()?;
        if let Some(filters) = &self.filters {
            sandbox::lock_down(filters.clone())?;
            tracing::debug!("seccomp filters installed");
        }
        Ok(())
    }

    /// One boot, from fresh memory to the Guest's stop.
    pub fn boot_once(
        &self,
        hv: &Hypervisor,
        backends: &Backends,
        gdb: &mut gdb::Link,
    ) -> Result<Stop, LaunchError> {
        let mem = GuestMemory::new(self.layout).map_err(LaunchError::Memory)?;
        if let Some(dma) = &self.dma {
            dma.map_shared(&mem)?;
        }
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
        let devices = match self.dma {
            Some(_) => Vec::new(),
            None => backends.devices(),
        };
        let bus = Bus::new(&mem, devices, &irqs, self.transport).map_err(LaunchError::Threads)?;
        let mut guest = Guest::new(mem, tables, vm, irqs, bus).map_err(LaunchError::Threads)?;
        if let Some(dma) = &self.dma {
            let hub = dma.start(&guest.mem, &guest.cpu.irqs, backends.raw_terminal)?;
            guest.cpu.dma = Some(hub);
        }
        match gdb.before_boot(&guest.mem, guest.cpu.tables.init_pml4)? {
            gdb::Attach::GaveUp => {
                return Ok(Stop::Killed("ended by the user (three Ctrl-C)".into()));
            }
            gdb::Attach::Session(Some(debugger)) => guest.attach_gdb(debugger),
            gdb::Attach::Session(None) => {}
        }
        let stop = guest.run();
        let end = match &stop {
            Stop::PowerOff(_) => gdb::End::PowerOff,
            Stop::Restart(_) => gdb::End::Restart,
            Stop::Crash(_) => gdb::End::Crash,
            Stop::Killed(_) => gdb::End::Killed,
        };
        gdb.after_boot(guest.take_gdb(), end);
        Ok(stop)
    }
}

/*
 * The 2007 device model (`--transport=dma`, ABI section 9): a device table
 * at `mem` instead of the bus, and BIND_DMA/SEND_DMA instead of rings. The
 * model's own part of the Launcher is crate::dma::launch.
 */
impl Launch {
    fn prepare_dma(
        cfg: Config,
        opts: &crate::dma::launch::DmaOptions,
        (kernel, initrd): (Kernel, Option<Initrd>),
        disks: Vec<Arc<Disk>>,
        tunnets: Vec<(tap::TapSpec, Option<[u8; 6]>)>,
        (privileges, filters): (Privileges, Option<Filters>),
    ) -> Result<Launch, LaunchError> {
        use crate::dma::launch;
        let mem = cfg.mem_mb << 20;
        let tunnets: Vec<_> = (cfg.tunnet.iter().cloned().zip(tunnets))
            .map(|(spec, (target, mac))| (spec, target, mac))
            .collect();
        let drivers = cfg.kernel == KernelChoice::Drivers;
        launch::check(opts, mem, &disks, &tunnets, cfg.rng, drivers)?;
        BootImage {
            kernel: &kernel,
            initrd: initrd.as_ref(),
            cmdline: &cfg.cmdline,
            device_model: DEVICE_MODEL_DMA,
        }
        .check(mem)?;
        // Taps and the shared network last: they are seen outside us.
        let dma = launch::DmaSetup::open(opts, mem, disks, tunnets)?;
        let gdb = cfg.gdb.as_deref().map(GdbServer::bind).transpose()?;
        Ok(Launch {
            kernel,
            initrd,
            cmdline: cfg.cmdline,
            layout: layout_for(cfg.mem_mb, dma.device_pages(), 0),
            kvm_device: cfg.kvm_device,
            backends: Backends {
                raw_terminal: false,
                disks: Vec::new(),
                nets: Vec::new(),
                rng: false,
            },
            transport: Transport::LguestBus,
            dma: Some(dma),
            privileges,
            filters,
            gdb,
        })
    }
}
