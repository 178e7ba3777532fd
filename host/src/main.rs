//! `lguest`: the Launcher and Host of lguest/x86-64.
//!
//! ```text
//! lguest [OPTIONS] [MEM_MB [KERNEL [KERNEL_ARGS]...]]
//! ```
//!
//! The tour starts here: the command line ([`Cli`]), then the library's
//! `launcher` lays out memory and loads the kernel, `vm` creates the KVM
//! machine, and `vcpu` runs it (see `lib.rs`).

use lguest::{bus, devices, gdb, launcher, output, sandbox, vcpu};

use clap::Parser;
use launcher::{Config, Launch, MEM_MB_RANGE};
use lguest::dma::launch::DmaOptions;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use vcpu::Stop;

/// Exit statuses (ABI section 10).
const EXIT_GUEST_DIED: u8 = 1;
const EXIT_SETUP: u8 = 2;

/// Run a paravirtualized Guest kernel under KVM, lguest-style.
///
/// With no KERNEL, boots the bundled reference Guest.
#[derive(Parser, Debug)]
#[command(
    name = "lguest",
    version,
    override_usage = "lguest [OPTIONS] [MEM_MB [KERNEL [KERNEL_ARGS]...]]",
    after_help = "Exit status: 0 when the Guest powers off, 1 when it is killed or crashes, \
                  2 for a usage or set-up error."
)]
struct Cli {
    /// Words to add to the kernel command line (the bundled Guest's too).
    #[arg(long, value_name = "WORDS")]
    append: Vec<String>,
    /// Load FILE as the initial RAM disk, at the top of memory.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Give the Guest a disk backed by FILE, a regular file or a block
    /// device (repeatable); `,ro` makes it read-only. Locked while in use:
    /// one writer, or any number of `,ro` users.
    #[arg(long, value_name = "FILE[,ro]")]
    block: Vec<String>,
    /// Give the Guest a network card on a new tap device, which gets IPADDR
    /// (the host's side of a /24; the Guest takes another address in it with
    /// ip=) or joins the existing bridge NAME. MAC is the card's (unicast);
    /// repeat for more cards, one tap each.
    #[arg(long, value_name = "IPADDR[:MAC]|bridge:NAME[:MAC]")]
    tunnet: Vec<String>,
    /// Give the Guest a random-number device.
    #[arg(long)]
    rng: bool,
    /// Which bundled Guest to boot when no KERNEL is given: the reference
    /// Guest, or the one that drives virtio-mmio devices with the
    /// virtio-drivers crate (use it with --transport=mmio).
    #[arg(long, value_enum, default_value = "reference")]
    guest: GuestArg,
    /// How the Guest finds its devices: the lguest bus (the default), a
    /// virtio-mmio window per device (announced on the kernel command
    /// line), or the 2007 device model (a device table, and DMA to keys).
    #[arg(long, value_enum)]
    transport: Option<TransportArg>,
    /// Join the network of every lguest started with FILE (created on first
    /// use; no root, no daemon): the Guests ping each other. Implies
    /// --transport=dma; with --tunnet, the tap joins the network too.
    #[arg(long, value_name = "FILE")]
    sharenet: Option<PathBuf>,
    /// Once set-up is done, make DIR the Launcher's root directory (needs
    /// root).
    #[arg(long, value_name = "DIR")]
    chroot: Option<PathBuf>,
    /// Once set-up is done, run as USER, with its uid, gid and groups
    /// (needs root).
    #[arg(long, value_name = "USER")]
    username: Option<String>,
    /// Run without the seccomp filters (for debugging).
    #[arg(long)]
    no_seccomp: bool,
    /// Trace the Host's work on stderr (and name any system call the
    /// seccomp filters refuse).
    #[arg(long)]
    verbose: bool,
    /// Run the benchmarks and print one line per measure (runs the
    /// lguest-bench program next to lguest).
    #[arg(long)]
    bench: bool,
    /// Wait for gdb on [ADDR:]PORT (default address 127.0.0.1; port 0
    /// picks a free one) before the Guest's first instruction.
    #[arg(long, value_name = "[ADDR:]PORT")]
    gdb: Option<String>,
    /// Write the bundled Guest (--guest) as an ELF file with symbols, for
    /// gdb, and exit.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["mem_mb", "kernel"])]
    write_guest: Option<PathBuf>,
    /// Guest memory in MiB (2-65536; default 64).
    #[arg(value_name = "MEM_MB")]
    mem_mb: Option<String>,
    /// An x86-64 ELF kernel (ET_EXEC). Default: the bundled reference Guest.
    #[arg(value_name = "KERNEL")]
    kernel: Option<PathBuf>,
    /// The kernel's command line.
    #[arg(
        value_name = "KERNEL_ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    kernel_args: Vec<String>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum GuestArg {
    Reference,
    Drivers,
    /// The reference Guest with its self-tests, bad= cases and benchmark
    /// loops (booted by itself when the command line has a test=, bad= or
    /// bench= word).
    Tests,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TransportArg {
    LguestBus,
    Mmio,
    Dma,
}

/// The transport, and the 2007 model's options when it is chosen:
/// `--sharenet` implies it, and refuses any other transport.
fn device_model(cli: &Cli) -> Result<(bus::Transport, Option<DmaOptions>), String> {
    let dma = || DmaOptions {
        sharenet: cli.sharenet.clone(),
    };
    match (cli.transport, &cli.sharenet) {
        (Some(TransportArg::Dma), _) | (None, Some(_)) => {
            Ok((bus::Transport::LguestBus, Some(dma())))
        }
        (Some(t), Some(_)) => Err(format!(
            "--sharenet needs the 2007 device model (--transport=dma), not --transport={}",
            if t == TransportArg::Mmio {
                "mmio"
            } else {
                "lguest-bus"
            }
        )),
        (Some(TransportArg::Mmio), None) => Ok((bus::Transport::Mmio, None)),
        (Some(TransportArg::LguestBus) | None, None) => Ok((bus::Transport::LguestBus, None)),
    }
}

/// How much `--verbose` shows: debug, or the level named by `RUST_LOG`
/// (`trace` shows every hypercall, trap and delivery).
fn verbose_level() -> tracing::Level {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.rsplit('=').next()?.parse().ok())
        .unwrap_or(tracing::Level::DEBUG)
}

/// Prints `lguest: <message>` as one line (see `launcher::message`).
fn error_line(message: impl std::fmt::Display) {
    let text = message.to_string();
    output::message(escape(text.lines().next().unwrap_or("")));
}

/// `--verbose` lines: `lguest: ` and the event's message and fields, one
/// line, control characters escaped (a path or command line may hold any).
struct Prefixed<F>(F);

impl<S, N, F> FormatEvent<S, N> for Prefixed<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        writeln!(writer, "lguest: {}", escape(line.trim_end_matches('\n')))
    }
}

/// Guest-supplied text goes to stderr with control characters escaped.
fn escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// How the seccomp filters treat a call off their lists: none with
/// `--no-seccomp`; `LGUEST_SECCOMP` (kill, trap or log) if set; otherwise
/// kill, or with `--verbose` trap (which names the call before dying).
fn seccomp_mode(cli: &Cli) -> Result<Option<sandbox::Enforcement>, sandbox::SandboxError> {
    if cli.no_seccomp {
        return Ok(None);
    }
    match std::env::var_os("LGUEST_SECCOMP") {
        Some(v) => sandbox::Enforcement::parse(&v.to_string_lossy()).map(Some),
        None if cli.verbose => Ok(Some(sandbox::Enforcement::Trap)),
        None => Ok(Some(sandbox::Enforcement::Kill)),
    }
}

/// `--bench`: becomes `lguest-bench`, the benchmarks' own program, found
/// next to this one; returns only why it could not. The harness lives
/// there so that its code is not in the Launcher's pages, which P5 counts
/// (the kernel maps text around every page a process runs, used or not).
/// It inherits the environment (`LGUEST_KVM_DEVICE`) and the standard files.
fn exec_bench() -> String {
    use std::os::unix::ffi::OsStrExt;
    let bench = match std::env::current_exe() {
        Ok(me) => me.with_file_name("lguest-bench"),
        Err(e) => return format!("--bench: cannot find lguest itself: {e}"),
    };
    let Ok(path) = std::ffi::CString::new(bench.as_os_str().as_bytes()) else {
        return format!("--bench: {} has a NUL in its name", bench.display());
    };
    let argv = [path.as_ptr(), std::ptr::null()];
    // SAFETY: `path` is a NUL-terminated string and `argv` a NULL-terminated
    // array pointing at it, both alive across the call; execv only returns
    // when it fails, and then changes nothing in this process.
    unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::NotFound {
        format!(
            "--bench runs lguest-bench, which is not next to lguest: {} is missing \
             (cargo build --release builds both)",
            bench.display()
        )
    } else {
        format!("--bench: cannot run {}: {e}", bench.display())
    }
}

fn parse_mem(arg: Option<&str>) -> Result<u64, String> {
    let Some(arg) = arg else { return Ok(64) };
    match arg.parse::<u64>() {
        Ok(mb) if MEM_MB_RANGE.contains(&mb) => Ok(mb),
        Ok(mb) => Err(format!(
            "memory size {mb} MiB out of range ({}-{} MiB)",
            MEM_MB_RANGE.start(),
            MEM_MB_RANGE.end()
        )),
        Err(_) => Err(format!("memory size '{arg}' is not a number of MiB")),
    }
}

/*L:100 The tour starts where a user does: `lguest 64 kernel.elf`. The
 * command line becomes a Config; everything a user can get wrong is
 * checked before /dev/kvm is even opened; then the Guest runs until it
 * stops, and its end becomes one line and an exit status. */
fn main() -> ExitCode {
    // `lguest --bench` starts lguest again as P7's second process.
    if let Some(peer) = lguest::dma::bench::peer_from_env() {
        return match peer {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error_line(e);
                ExitCode::from(EXIT_SETUP)
            }
        };
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad usage");
            error_line(format!(
                "{} (try --help)",
                first.trim_start_matches("error: ")
            ));
            return ExitCode::from(EXIT_SETUP);
        }
    };
    if cli.verbose {
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_target(false)
            .with_level(false)
            .with_ansi(false);
        // Our writer never fails, and with log_internal_errors off the
        // subscriber never falls back to eprintln! either.
        tracing_subscriber::fmt()
            .log_internal_errors(false)
            .event_format(Prefixed(format))
            .with_writer(|| output::QuietStderr)
            .with_max_level(verbose_level())
            .init();
    }
    if cli.bench {
        error_line(exec_bench());
        return ExitCode::from(EXIT_SETUP);
    }
    let kvm_device = std::env::var_os("LGUEST_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"));
    if let Some(path) = &cli.write_guest {
        let elf = match cli.guest {
            GuestArg::Reference => launcher::BUNDLED_GUEST,
            GuestArg::Drivers => launcher::BUNDLED_DRIVERS_GUEST,
            GuestArg::Tests => launcher::BUNDLED_TESTS_GUEST,
        };
        return match gdb::write_guest(path, elf) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error_line(e);
                ExitCode::from(EXIT_SETUP)
            }
        };
    }
    let mem_mb = match parse_mem(cli.mem_mb.as_deref()) {
        Ok(mb) => mb,
        Err(e) => {
            error_line(e);
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let seccomp = match seccomp_mode(&cli) {
        Ok(mode) => mode,
        Err(e) => {
            error_line(e);
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let (transport, dma) = match device_model(&cli) {
        Ok(model) => model,
        Err(e) => {
            error_line(e);
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let mut words = cli.kernel_args.clone();
    words.extend(cli.append.iter().cloned());
    let config = Config {
        mem_mb,
        kernel: match (&cli.kernel, cli.guest) {
            (Some(path), _) => launcher::KernelChoice::File(path.clone()),
            (None, GuestArg::Reference) => launcher::KernelChoice::Reference,
            (None, GuestArg::Drivers) => launcher::KernelChoice::Drivers,
            (None, GuestArg::Tests) => launcher::KernelChoice::Tests,
        },
        initrd: cli.initrd.clone(),
        cmdline: words.join(" "),
        kvm_device,
        block: cli.block.clone(),
        tunnet: cli.tunnet.clone(),
        rng: cli.rng,
        transport,
        dma,
        username: cli.username.clone(),
        chroot: cli.chroot.clone(),
        seccomp,
        gdb: cli.gdb.clone(),
    };
    let launch = match Launch::prepare(config) {
        Ok(l) => l,
        Err(e) => {
            error_line(e);
            return ExitCode::from(EXIT_SETUP);
        }
    };
    /*L:610 And the end (ABI section 10): one line on stderr, starting
     * `lguest: `, and an exit status: 0 for a power-off, 1 for a crash or
     * Sudden Death. */
    let stop = launch.run(|reason| {
        output::message(format_args!("guest restarting: {}", escape(reason)));
    });
    devices::terminal::restore();
    match stop {
        Ok(Stop::PowerOff(reason)) => {
            output::message(format_args!("guest powered off: {}", escape(&reason)));
            ExitCode::SUCCESS
        }
        Ok(Stop::Crash(reason)) => {
            output::message(format_args!("guest crashed: {}", escape(&reason)));
            ExitCode::from(EXIT_GUEST_DIED)
        }
        Ok(Stop::Killed(reason)) => {
            output::message(format_args!("guest killed: {}", escape(&reason)));
            ExitCode::from(EXIT_GUEST_DIED)
        }
        Ok(Stop::Restart(_)) => unreachable!("the launcher restarts the Guest itself"),
        Err(e) => {
            error_line(e);
            ExitCode::from(EXIT_SETUP)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_mem(None), Ok(64));
        assert_eq!(parse_mem(Some("2")), Ok(2));
        assert!(parse_mem(Some("1")).unwrap_err().contains("out of range"));
        assert!(parse_mem(Some("65537")).is_err());
        assert!(parse_mem(Some("abc")).unwrap_err().contains("not a number"));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
    }
}
