//! `lguest --bench`: measures against a floor taken in the same run.
//!
//! Absolute times mean little across machines (and on a software KVM, less
//! still), so every line is a ratio: the measure and its floor are each run
//! `RUNS` times, interleaved, and the medians compared (ABI section 10).
//!
//! - P1: a hypercall round trip, against a bare `out` exit. The bundled Guest
//!   times N iterations with rdtsc (`bench=out|hcall|ud`) and reports cycles.
//!   `hcall` is the rewritten site (`out %al,$0x1f`), `ud` restores the
//!   `int $0x1f` bytes before every call, so each one takes the trap path.
//! - P2: launch-to-exit of the bundled Guest, against a Guest that powers off
//!   as soon as it has said LGUEST_INIT (create, run, tear down).
//! - P3: the Guest reading a 256 MiB disk from end to end (`bench=blk`),
//!   against the host reading the same file from its page cache.
//! - P4: the Guest sending full-size frames to a tap (`bench=net`), against
//!   the host writing the same frames to a tap of its own.
//! - P5: the Launcher's resident memory beyond the Guest RAM it touched, with
//!   a disk and rng, the Guest idle at its prompt; against an idle `cat`.
//! - P6: a byte written to the console until its echo comes back
//!   (`bench=echo`), against P1's bare exit.
//! - P7: full-size frames from one Guest to another over a `--sharenet`
//!   file (`bench=sharenet` and `bench=sharenet-rx`, two Launchers), against
//!   two processes on an AF_UNIX socketpair; then, on a second line, the
//!   Launchers' hubs alone with stand-ins for the Guests
//!   ([`crate::dma::bench`]).
//! - P8: NEW_PGTABLE between two PML4s the Host has roots for
//!   (`bench=pgtable`), and SET_PGD of an entry that changes every time
//!   (`bench=pgd`), against P1's bare exit.

use crate::boot::tiny_elf;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const RUNS: usize = 5;
const ITERS: u64 = 5000;
const PGTABLE_ITERS: u64 = 1000;
const MIB: f64 = 1024.0 * 1024.0;
/// P3's disk image.
const DISK_BYTES: usize = 256 << 20;
/// P4's frames: Ethernet's largest, behind the 10-byte virtio-net header.
/// Throughputs count the Ethernet bytes, as the Guest does.
const ETHERNET: usize = 1514;
const FRAME: usize = 10 + ETHERNET;
const FRAMES: u64 = 20000;
/// P6's round trips.
const ECHOES: usize = 200;
/// P7's full-size frames per run.
const P7_FRAMES: u64 = 100_000;

/// The floor Guest for P2, at 0x200000: fill the async ring's status bytes
/// (lguest_data at 0x201000) with 0xFF, LGUEST_INIT, then SHUTDOWN power-off
/// with the reason string at 0x200100. Both calls are `out %al,$0x1f`.
const FLOOR_CODE: [u8; 45] = [
    0xbf, 0x24, 0x10, 0x20, 0x00, // mov $0x201024, %edi
    0xb0, 0xff, // mov $0xff, %al
    0xb9, 0x40, 0x00, 0x00, 0x00, // mov $64, %ecx
    0xf3, 0xaa, // rep stosb
    0xb8, 0x01, 0x00, 0x00, 0x00, // mov $LGUEST_INIT, %eax
    0xba, 0x00, 0x10, 0x20, 0x00, // mov $0x201000, %edx
    0xe6, 0x1f, // out %al, $0x1f
    0xb8, 0x02, 0x00, 0x00, 0x00, // mov $SHUTDOWN, %eax
    0xba, 0x00, 0x01, 0x20, 0x00, // mov $0x200100, %edx
    0xbb, 0x01, 0x00, 0x00, 0x00, // mov $1, %ebx
    0xe6, 0x1f, // out %al, $0x1f
    0x0f, 0x0b, // ud2
];

fn floor_guest() -> Vec<u8> {
    let mut code = FLOOR_CODE.to_vec();
    code.resize(0x100, 0x90);
    code.extend_from_slice(b"floor\0");
    tiny_elf(0x20_0000, &code, 0x2000)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Bench {
    exe: PathBuf,
    kvm: PathBuf,
}

impl Bench {
    fn lguest(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(args)
            .env("LGUEST_KVM_DEVICE", &self.kvm)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .stdout(Stdio::piped());
        c
    }

    /// Runs the bundled Guest with `args` and returns the fields of its
    /// `lguest-bench:` line, with the time it measured in seconds.
    fn guest_report(&self, args: &[&str]) -> Result<(Vec<(String, f64)>, f64), String> {
        let out = self
            .lguest(args)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("lguest-bench: "))
            .ok_or_else(|| {
                format!(
                    "lguest {}: no result ({})",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })?;
        let fields: Vec<(String, f64)> = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect();
        let get = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| *v)
                .ok_or_else(|| format!("no {key} in '{line}'"))
        };
        let khz = get("tsc_khz")?;
        if khz == 0.0 {
            return Err("the TSC is not invariant here; cycles cannot be turned into time".into());
        }
        let seconds = get("cycles")? / (khz * 1000.0);
        Ok((fields, seconds))
    }

    /// Microseconds per iteration of the Guest's `bench=NAME` loop.
    fn guest_loop(&self, name: &str) -> Result<f64, String> {
        self.guest_loop_n(name, ITERS)
    }

    fn guest_loop_n(&self, name: &str, iters: u64) -> Result<f64, String> {
        let append = format!("bench={name} iters={iters}");
        let (fields, seconds) = self.guest_report(&["--append", &append])?;
        let iters = fields
            .iter()
            .find(|(k, _)| k == "iters")
            .map_or(iters as f64, |(_, v)| *v);
        Ok(seconds * 1e6 / iters)
    }

    /// MiB/s the Guest reports for a `bytes=` benchmark.
    fn guest_throughput(&self, args: &[&str]) -> Result<f64, String> {
        let (fields, seconds) = self.guest_report(args)?;
        let bytes = fields
            .iter()
            .find(|(k, _)| k == "bytes")
            .map(|(_, v)| *v)
            .ok_or("no bytes= in the result")?;
        Ok(bytes / MIB / seconds)
    }

    /// Wall-clock milliseconds from spawn to exit, checking it powered off.
    fn launch(&self, args: &[&str]) -> Result<f64, String> {
        let start = Instant::now();
        let out = self
            .lguest(args)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            return Err(format!(
                "lguest {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(ms)
    }
}

/// Why the benchmarks stopped before the end.
enum Halt {
    Failed(String),
    /// Stdout took no more (its reader left, as `lguest --bench | head -1`
    /// does): there is no one left to measure for.
    Unread,
}

impl From<String> for Halt {
    fn from(e: String) -> Halt {
        Halt::Failed(e)
    }
}

/// One output line (ABI section 10).
fn report(name: &str, unit: &str, values: Vec<f64>, floors: Vec<f64>) -> Result<(), Halt> {
    report_line(name, unit, values, floors, "")
}

fn report_line(
    name: &str,
    unit: &str,
    values: Vec<f64>,
    floors: Vec<f64>,
    extra: &str,
) -> Result<(), Halt> {
    let (v, f) = (median(values), median(floors));
    let line = format!(
        "{name} value={v:.3} unit={unit} floor={f:.3} ratio={:.3} runs={RUNS}{extra}",
        v / f
    );
    crate::output::stdout_line(&line)
        .then_some(())
        .ok_or(Halt::Unread)
}

/// A file removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str, bytes: &[u8]) -> Result<Scratch, String> {
        let path = std::env::temp_dir().join(format!("lguest-bench-{what}-{}", std::process::id()));
        std::fs::write(&path, bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(Scratch(path))
    }
    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// P3's floor: the host reading the whole file from the page cache, MiB/s.
fn host_read(path: &Path) -> Result<f64, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 << 10];
    let start = Instant::now();
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        total += n;
    }
    Ok(total as f64 / MIB / start.elapsed().as_secs_f64())
}

/// The frame `bench=net` sends (its bench_frame), byte for byte but for
/// the source MAC: a zero virtio-net header, then a full-size UDP datagram
/// from 0.0.0.0 to the broadcast address's discard port. The host's kernel
/// takes it through IP and UDP before dropping it, which costs half as much
/// again as a frame of an ethertype nobody handles: the floor sends this
/// very frame, so that the ratio compares the paths, not the frames.
fn bench_frame() -> Vec<u8> {
    let mut frame = vec![0u8; FRAME];
    let f = &mut frame[10..];
    f[0..6].copy_from_slice(&[0xFF; 6]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (ETHERNET - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[16..20].copy_from_slice(&[255; 4]);
    let sum = ones_complement_sum(ip);
    ip[10..12].copy_from_slice(&(!sum).to_be_bytes());
    f[34..36].copy_from_slice(&9u16.to_be_bytes());
    f[36..38].copy_from_slice(&9u16.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    for (i, byte) in f[42..].iter_mut().enumerate() {
        *byte = i as u8;
    }
    frame
}

/// P4's floor: the host writing the same frames into a tap of its own, MiB/s.
fn host_tap_write(tap: &crate::devices::tap::Tap) -> Result<f64, String> {
    let frame = bench_frame();
    let start = Instant::now();
    for _ in 0..FRAMES {
        while tap.write_frame(&frame).is_err() {}
    }
    Ok((FRAMES as usize * ETHERNET) as f64 / MIB / start.elapsed().as_secs_f64())
}

/// Resident kiB of `pid`: all of it, and the largest mapping (Guest RAM).
fn rss_kib(pid: u32) -> Result<(f64, f64), String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("cannot read smaps of {pid}: {e}"))?;
    let (mut total, mut largest, mut size, mut guest) = (0.0, 0.0, 0.0, 0.0);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().and_then(|v| v.parse::<f64>().ok()),
        ) {
            (Some("Size:"), Some(v)) => size = v,
            (Some("Rss:"), Some(v)) => {
                total += v;
                if size > largest {
                    largest = size;
                    guest = v;
                }
            }
            _ => {}
        }
    }
    Ok((total, guest))
}

/// Runs every benchmark, printing a line for each; stops early, and
/// successfully, when stdout is closed.
pub fn run(launcher: &Path, kvm: &Path) -> Result<(), String> {
    match measure(launcher, kvm) {
        Ok(()) | Err(Halt::Unread) => Ok(()),
        Err(Halt::Failed(e)) => Err(e),
    }
}

fn measure(launcher: &Path, kvm: &Path) -> Result<(), Halt> {
    let bench = Bench {
        exe: launcher.to_path_buf(),
        kvm: kvm.to_path_buf(),
    };
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm)
        .map_err(|e| format!("cannot open {}: {e}", kvm.display()))?;

    // P1: a hypercall against a bare exit.
    let (mut out, mut hcall, mut ud) = (vec![], vec![], vec![]);
    for _ in 0..RUNS {
        out.push(bench.guest_loop("out")?);
        hcall.push(bench.guest_loop("hcall")?);
        ud.push(bench.guest_loop("ud")?);
    }
    let exit_floor = median(out.clone());
    report("P1-hcall-out", "us", hcall, out.clone())?;
    report("P1-hcall-ud", "us", ud, out.clone())?;

    // P8: the Host-owned top level (ABI 1.1). NEW_PGTABLE between two
    // PML4s it has roots for, and SET_PGD of an entry that changes each
    // time (a root rewrite, made visible to the KVM): each against P1's
    // bare exit. Fewer iterations: these are the slow calls.
    let (mut pgtable, mut pgd) = (vec![], vec![]);
    for _ in 0..RUNS {
        pgtable.push(bench.guest_loop_n("pgtable", PGTABLE_ITERS)?);
        pgd.push(bench.guest_loop_n("pgd", PGTABLE_ITERS)?);
    }
    report("P8-new-pgtable", "us", pgtable, out.clone())?;
    report("P8-set-pgd", "us", pgd, out)?;

    // P2: launch to exit against a Guest that exits at once.
    let floor_guest = Scratch::new("floor", &floor_guest())?;
    let (mut boot, mut floor) = (vec![], vec![]);
    for _ in 0..RUNS {
        boot.push(bench.launch(&[])?);
        floor.push(bench.launch(&["64", &floor_guest.arg()])?);
    }
    report("P2-launch", "ms", boot, floor)?;

    // P3: the Guest reading a disk against the host reading the same file.
    let disk: Vec<u8> = (0..DISK_BYTES).map(|i| (i / 4096) as u8).collect();
    let disk = Scratch::new("disk", &disk)?;
    let block = format!("--block={}", disk.arg());
    let (mut guest, mut host) = (vec![], vec![]);
    for _ in 0..RUNS {
        guest.push(bench.guest_throughput(&[&block, "--append", "bench=blk"])?);
        host.push(host_read(&disk.0)?);
    }
    report_line("P3-blk-read", "MiB/s", guest, host, " higher=better")?;
    drop(disk);

    // P4: the Guest sending to a tap against the host writing to one.
    match crate::devices::tap::Tap::create(&crate::devices::tap::TapSpec::Address(
        std::net::Ipv4Addr::new(169, 254, 77, 1),
    )) {
        Ok(tap) => {
            let append = format!("bench=net iters={FRAMES}");
            let (mut guest, mut host) = (vec![], vec![]);
            for _ in 0..RUNS {
                guest.push(bench.guest_throughput(&[
                    "--tunnet=169.254.78.1",
                    "--append",
                    &append,
                ])?);
                host.push(host_tap_write(&tap)?);
            }
            report_line(
                "P4-net-tx",
                "MiB/s",
                guest,
                host,
                " higher=better floor_name=host-writes-to-tap",
            )?;
        }
        Err(e) => crate::output::message(format_args!("P4 not measured: {e}")),
    }

    // P5: resident memory beyond the Guest's RAM, against a bare process.
    let (mut launcher, mut bare) = (vec![], vec![]);
    let disk = Scratch::new("p5disk", &vec![0u8; 1 << 20])?;
    let block = format!("--block={}", disk.arg());
    for _ in 0..RUNS {
        launcher.push(bench.idle_rss(&[&block, "--rng"])?);
        bare.push(idle_rss_of(Command::new("cat"))?);
    }
    report("P5-rss", "MiB", launcher, bare)?;

    // P6: a byte through the console and back, against one bare exit.
    let mut echo = vec![];
    for _ in 0..RUNS {
        echo.push(bench.echo()?);
    }
    report("P6-console-echo", "us", echo, vec![exit_floor; RUNS])?;

    // P7: full-size frames from one Guest to another over one --sharenet
    // file, against two processes on a socketpair (the second process is
    // lguest again, which does its half when told to in the environment).
    // Then the stand-in the first P7 measured: the two Launchers' hubs
    // without Guests (see dma::bench), against its own floor.
    let peer = || {
        let mut cmd = Command::new(&bench.exe);
        cmd.stderr(Stdio::inherit());
        cmd
    };
    let launcher = || bench.lguest(&[]);
    let p7 = crate::dma::bench::p7_guests(&peer, &launcher, RUNS, P7_FRAMES)?;
    crate::output::stdout_line(&p7.line())
        .then_some(())
        .ok_or(Halt::Unread)?;
    let standin = crate::dma::bench::p7(&peer, RUNS, P7_FRAMES)?;
    crate::output::stdout_line(&standin.line())
        .then_some(())
        .ok_or(Halt::Unread)
}

/// Resident MiB of a process idling on a pipe (P5's floor).
fn idle_rss_of(mut cmd: Command) -> Result<f64, String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let rss = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    Ok(rss?.0 / 1024.0)
}

impl Bench {
    /// Launcher RSS beyond Guest RAM, MiB, once the Guest sits at its prompt.
    fn idle_rss(&self, args: &[&str]) -> Result<f64, String> {
        use std::io::Read;
        let mut child = self
            .lguest(args)
            .stdin(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        let mut stdout = child.stdout.take().expect("piped");
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("lguest> ") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let rss = rss_kib(child.id());
        drop(child.stdin.take());
        let _ = child.wait();
        let (total, guest) = rss?;
        Ok((total - guest) / 1024.0)
    }

    /// Microseconds for one byte to come back through the console.
    fn echo(&self) -> Result<f64, String> {
        use std::io::{Read, Write};
        let mut child = self
            .lguest(&["--append", "bench=echo"])
            .stdin(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let mut one = [0u8; 1];
        // Warm up, and skip whatever the Guest printed before echoing.
        stdin.write_all(b"!").map_err(|e| e.to_string())?;
        loop {
            stdout
                .read_exact(&mut one)
                .map_err(|e| format!("bench=echo: {e}"))?;
            if one[0] == b'!' {
                break;
            }
        }
        let start = Instant::now();
        for _ in 0..ECHOES {
            stdin.write_all(b"x").map_err(|e| e.to_string())?;
            stdout
                .read_exact(&mut one)
                .map_err(|e| format!("bench=echo: {e}"))?;
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / ECHOES as f64;
        drop(stdin);
        let _ = child.wait();
        Ok(us)
    }
}

/// The Internet checksum's sum (RFC 1071) of an even-length header: its
/// 16-bit big-endian words added with end-around carry. A header whose
/// checksum field is right sums to 0xFFFF.
fn ones_complement_sum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// P4's floor frame is what `bench=net` sends: a full-size IPv4 UDP
    /// datagram whose header checks out, to the discard port.
    #[test]
    fn the_p4_floor_sends_the_guests_frame() {
        let frame = bench_frame();
        assert_eq!(frame.len(), 10 + 1514);
        assert!(frame[..10].iter().all(|&b| b == 0), "no offloads asked");
        let f = &frame[10..];
        assert_eq!(&f[12..14], &[0x08, 0x00], "IPv4");
        let ip = &f[14..34];
        assert_eq!(
            ones_complement_sum(ip),
            0xFFFF,
            "the IP header checksum is right"
        );
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, 1514 - 14);
        assert_eq!(ip[9], 17);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 9, "discard port");
        assert_eq!(u16::from_be_bytes([f[38], f[39]]) as usize, 1514 - 34);
        assert_eq!(f[42..46], [0, 1, 2, 3], "the Guest's payload pattern");
    }
}
