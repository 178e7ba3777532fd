//! P7: frames between two Guests on a shared network, against a floor.
//!
//! The floor is two host processes moving full-size (1514-byte) Ethernet
//! frames over an AF_UNIX datagram socketpair: what any two processes pay
//! to hand each other a frame through the kernel.
//!
//! The measure, [`p7_guests`], is two real Guests: two Launchers on one
//! fresh `--sharenet` FILE, the bundled test Guest in each, one sending
//! (`bench=sharenet peer=MAC`) and one receiving (`bench=sharenet-rx`).
//! The figure is what the receiving Guest counted, over its own clock,
//! from the first frame it saw to the last: frames lost on the way do not
//! count, they only lower the figure (and `lost=` on the line says how
//! many there were).
//!
//! [`p7`] keeps the stand-in the first P7 measured: the same frames
//! through `--sharenet` between two processes, each with a Guest memory
//! and a [`Dma`] hub of its own but no KVM: the sender's SEND_DMA (check,
//! gather, queue on the receiver's ring) and the receiver's delivery (ring
//! to bound buffer, IRQ). The receiving "Guest" frees each buffer as soon
//! as it is filled, so that figure is the Launchers' machinery alone.
//!
//! Each run of a measure is interleaved with a run of its floor, and the
//! medians compared (higher is better).
//!
//! The socketpair's second process, and the stand-in's, is this same
//! program: the caller says how to start it (`peer`), and that program
//! calls [`peer_from_env`] first thing, which does the peer's half when
//! [`PEER_ENV`] says so.

use super::console::ConsoleConfig;
use super::sharenet::SharedNet;
use super::{Backends, Dma, GuestRam, NetBackend, Signals};
use crate::memory::{GuestMemory, Layout};
use lguest_abi::{dma_off, LguestDma, PAGE_SIZE};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use zerocopy::IntoBytes;

/// A full-size Ethernet frame, without its FCS.
pub const FRAME: usize = 1514;
/// Tells a program started as [`p7`]'s peer what to do.
pub const PEER_ENV: &str = "LGUEST_DMA_BENCH_PEER";
/// How long one run may take before it counts as failed.
const RUN_LIMIT: Duration = Duration::from_secs(60);
const MIB: f64 = 1024.0 * 1024.0;
/// How long the sending Guest waits when the receiver's ring is full.
const RING_FULL_PAUSE: Duration = Duration::from_micros(50);

/// The figures of P7's stand-in (two Launchers' hubs without Guests), in
/// MiB/s, one per run.
#[derive(Clone, Debug)]
pub struct P7 {
    pub sharenet: Vec<f64>,
    pub socketpair: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl P7 {
    pub fn value(&self) -> f64 {
        median(&self.sharenet)
    }
    pub fn floor(&self) -> f64 {
        median(&self.socketpair)
    }
    /// The `--bench` line (ABI section 10), after the real Guests' line.
    pub fn line(&self) -> String {
        format!(
            "P7-sharenet-standin value={:.3} unit=MiB/s floor={:.3} ratio={:.3} runs={} higher=better floor_name=socketpair",
            self.value(),
            self.floor(),
            self.value() / self.floor(),
            self.sharenet.len()
        )
    }
}

/// Kills the peer if a run ends early.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Peer {
    fn finish(mut self) -> Result<(), String> {
        let out = self.0.wait().map_err(|e| e.to_string())?;
        if !out.success() {
            return Err(format!("the P7 peer failed: {out}"));
        }
        Ok(())
    }
}

/// Runs P7: `runs` runs of each, `frames` frames per run. `peer()` gives a
/// command that starts this program so that it calls [`peer_from_env`].
pub fn p7(peer: &dyn Fn() -> Command, runs: usize, frames: u64) -> Result<P7, String> {
    let mut out = P7 {
        sharenet: Vec::new(),
        socketpair: Vec::new(),
    };
    for run in 0..runs {
        out.socketpair.push(socketpair_run(peer, frames)?);
        out.sharenet.push(sharenet_run(peer, frames, run)?);
    }
    Ok(out)
}

fn socketpair_run(peer: &dyn Fn() -> Command, frames: u64) -> Result<f64, String> {
    let (ours, theirs) = UnixDatagram::pair().map_err(|e| e.to_string())?;
    ours.set_read_timeout(Some(RUN_LIMIT))
        .map_err(|e| e.to_string())?;
    let fd = theirs.as_raw_fd();
    let mut cmd = peer();
    cmd.env(PEER_ENV, format!("socket:{frames}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: between fork and exec the child only calls dup2 and fcntl,
    // which are async-signal-safe, on a descriptor the parent keeps open
    // until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let child = Peer(
        cmd.spawn()
            .map_err(|e| format!("cannot start the P7 peer: {e}"))?,
    );
    drop(theirs);
    let mut buf = vec![0u8; FRAME + 1];
    let mut start = None;
    let mut bytes = 0u64;
    for _ in 0..frames {
        let n = ours
            .recv(&mut buf)
            .map_err(|e| format!("socketpair floor: {e}"))?;
        start.get_or_insert_with(Instant::now);
        bytes += n as u64;
    }
    let elapsed = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    child.finish()?;
    Ok(throughput(bytes - FRAME as u64, elapsed))
}

/// MiB/s for `bytes` moved after the first frame arrived.
fn throughput(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / MIB / seconds.max(1e-9)
}

/// A small Guest memory of our own, no KVM: RAM, the device table and one
/// net page.
fn bench_memory() -> Result<Arc<GuestMemory>, String> {
    let mem = 2 << 20;
    GuestMemory::new(Layout {
        mem,
        pfn_limit: mem / PAGE_SIZE + 2,
        mmio_hole_pages: 0,
        host_ro_pages: 1,
        host_rw_pages: 1,
    })
    .map(Arc::new)
    .map_err(|e| format!("cannot map a Guest memory: {e}"))
}

/// A Dma hub on one shared network, with a silent console.
fn bench_dma(
    mem: &Arc<GuestMemory>,
    net: &Arc<SharedNet>,
    signals: Arc<dyn Signals>,
) -> Result<(Dma, u64), String> {
    let backends = Backends {
        console: ConsoleConfig {
            input: None,
            output: Arc::new(Mutex::new(std::io::sink())),
            raw_terminal: false,
        },
        disks: Vec::new(),
        nets: vec![NetBackend::Shared(net.clone())],
    };
    let page = backends
        .table(mem.ram_size())
        .map_err(|e| e.to_string())?
        .net_page(0)
        .expect("one net");
    net.map_into(mem, page).map_err(|e| e.to_string())?;
    let dma = Dma::new(mem.clone(), &backends, signals).map_err(|e| e.to_string())?;
    Ok((dma, page))
}

/// Where the receiving Guest's buffers are: 16 lguest_dma of one 2 KiB
/// section each.
const RX_ARRAY: u64 = 0x10000;
const RX_BUFS: u64 = 0x20000;
const RX_COUNT: u64 = 16;
/// Where the sending Guest's frame and its lguest_dma are.
const TX_DMA: u64 = 0x10000;
const TX_FRAME: u64 = 0x20000;

/// The receiving "Guest": takes each frame as soon as it is delivered.
struct Sink {
    mem: Arc<GuestMemory>,
    frames: AtomicU64,
    bytes: AtomicU64,
    times: Mutex<(Option<Instant>, Option<Instant>)>,
    want: u64,
    done: Condvar,
}

impl Signals for Sink {
    fn raise(&self, _irq: u32) {
        // One IRQ per frame, and each frame lands in the first free buffer:
        // the first full one, as we free every buffer at once.
        let mut got = 0;
        for i in 0..RX_COUNT {
            let used = RX_ARRAY + i * super::bindings::DMA_SIZE + dma_off::DMA_USED_LEN as u64;
            let n = self.mem.read_u32(used).unwrap_or(0);
            if n != 0 {
                got += 1;
                self.bytes.fetch_add(n as u64, Ordering::Relaxed);
                let _ = self.mem.write_u32(used, 0);
                break;
            }
        }
        let frames = self.frames.fetch_add(got, Ordering::SeqCst) + got;
        let mut times = super::lock(&self.times);
        let now = Instant::now();
        times.0.get_or_insert(now);
        times.1 = Some(now);
        if frames >= self.want {
            self.done.notify_all();
        }
    }
    fn kill(&self, reason: String) {
        eprintln!("lguest: P7 receiver: {reason}");
    }
}

/// Signals of a Guest that only sends.
struct Quiet;
impl Signals for Quiet {
    fn raise(&self, _irq: u32) {}
    fn kill(&self, reason: String) {
        eprintln!("lguest: P7 sender: {reason}");
    }
}

/// A scratch FILE, removed when dropped.
struct NetFile(PathBuf);
impl Drop for NetFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn sharenet_run(peer: &dyn Fn() -> Command, frames: u64, run: usize) -> Result<f64, String> {
    let file =
        NetFile(std::env::temp_dir().join(format!("lguest-p7-{}-{run}.net", std::process::id())));
    let _ = std::fs::remove_file(&file.0);
    let net = Arc::new(SharedNet::join(&file.0).map_err(|e| e.to_string())?);
    let mem = bench_memory()?;
    let sink = Arc::new(Sink {
        mem: mem.clone(),
        frames: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        times: Mutex::new((None, None)),
        want: frames,
        done: Condvar::new(),
    });
    let (dma, page) = bench_dma(&mem, &net, sink.clone())?;
    for i in 0..RX_COUNT {
        let mut d = LguestDma::default();
        d.addr[0] = RX_BUFS + i * PAGE_SIZE;
        d.len[0] = 2048;
        mem.write(RX_ARRAY + i * super::bindings::DMA_SIZE, d.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let key = super::net::slot_key(page, net.slot());
    dma.bind_dma(key, RX_ARRAY, RX_COUNT << 8 | 1)
        .map_err(|e| e.to_string())?;
    let mut cmd = peer();
    cmd.env(
        PEER_ENV,
        format!("sharenet:{frames}:{}:{}", net.slot(), file.0.display()),
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let child = Peer(
        cmd.spawn()
            .map_err(|e| format!("cannot start the P7 peer: {e}"))?,
    );
    let deadline = Instant::now() + RUN_LIMIT;
    let mut times = super::lock(&sink.times);
    while sink.frames.load(Ordering::SeqCst) < frames {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "sharenet: {} of {frames} frames arrived in {RUN_LIMIT:?}",
                sink.frames.load(Ordering::SeqCst)
            ));
        }
        times = sink
            .done
            .wait_timeout(times, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    let (first, last) = (times.0, times.1);
    drop(times);
    child.finish()?;
    drop(dma);
    let seconds = match (first, last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => 0.0,
    };
    let bytes = sink.bytes.load(Ordering::SeqCst);
    Ok(throughput(bytes.saturating_sub(FRAME as u64), seconds))
}

/// The peer's half, when [`PEER_ENV`] is set: `None` when it is not (the
/// program goes on as usual).
pub fn peer_from_env() -> Option<Result<(), String>> {
    let spec = std::env::var(PEER_ENV).ok()?;
    Some(run_peer(&spec))
}

fn run_peer(spec: &str) -> Result<(), String> {
    let mut parts = spec.splitn(4, ':');
    let bad = || format!("{PEER_ENV}={spec}: not a P7 peer");
    let role = parts.next().ok_or_else(bad)?;
    let frames: u64 = parts.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?;
    let mut frame = vec![0u8; FRAME];
    frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    frame[12..14].copy_from_slice(&[0x88, 0xB5]); // local experimental ethertype
    match role {
        "socket" => {
            use std::os::fd::FromRawFd;
            // SAFETY: the parent put our end of the socketpair at 3 for us,
            // and nothing else in this process owns descriptor 3.
            let sock = unsafe { UnixDatagram::from_raw_fd(3) };
            for _ in 0..frames {
                sock.send(&frame).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        "sharenet" => {
            let slot: usize = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            let path = parts.next().ok_or_else(bad)?;
            let net = Arc::new(SharedNet::join(Path::new(path)).map_err(|e| e.to_string())?);
            let mem = bench_memory()?;
            let (dma, page) = bench_dma(&mem, &net, Arc::new(Quiet))?;
            mem.write(TX_FRAME, &frame).map_err(|e| e.to_string())?;
            let mut d = LguestDma::default();
            d.addr[0] = TX_FRAME;
            d.len[0] = FRAME as u16;
            mem.write(TX_DMA, d.as_bytes()).map_err(|e| e.to_string())?;
            let key = super::net::slot_key(page, slot);
            let deadline = Instant::now() + RUN_LIMIT;
            let mut sent = 0;
            while sent < frames {
                let taken = dma.send_dma(key, TX_DMA).map_err(|e| e.to_string())?;
                if taken.used_len == FRAME as u32 {
                    sent += 1;
                } else if Instant::now() > deadline {
                    return Err(format!("sent {sent} of {frames} frames"));
                } else {
                    // The receiver's ring is full: a Guest would wait for
                    // its timer before trying again; so do we, rather than
                    // take the processor the receiver needs to catch up.
                    std::thread::sleep(RING_FULL_PAUSE);
                }
            }
            let _ = std::io::stdout().flush();
            Ok(())
        }
        _ => Err(bad()),
    }
}

/*
 * P7 proper: two real Guests.
 */

/// What the two Guests of one run said.
#[derive(Clone, Debug)]
pub struct GuestsRun {
    /// MiB/s of the frames the receiving Guest got, on its own clock.
    pub mib_s: f64,
    /// Frames the sender's used_len said were taken.
    pub sent: u64,
    /// Frames the receiving Guest counted.
    pub received: u64,
    /// Frames it got that were not ours, or not 1514 bytes.
    pub bad: u64,
    /// The two `lguest-bench:` lines, sender's then receiver's.
    pub lines: [String; 2],
}

impl GuestsRun {
    /// Frames taken at the sender that never reached the receiving Guest.
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }
}

/// P7's figures: the Guests' runs and the socketpair's MiB/s.
#[derive(Clone, Debug)]
pub struct P7Guests {
    pub runs: Vec<GuestsRun>,
    pub socketpair: Vec<f64>,
}

impl P7Guests {
    pub fn value(&self) -> f64 {
        median(&self.runs.iter().map(|r| r.mib_s).collect::<Vec<_>>())
    }
    pub fn floor(&self) -> f64 {
        median(&self.socketpair)
    }
    /// The `--bench` line (ABI section 10), with the frames lost in all.
    pub fn line(&self) -> String {
        format!(
            "P7-sharenet value={:.3} unit=MiB/s floor={:.3} ratio={:.3} runs={} higher=better floor_name=socketpair lost={}",
            self.value(),
            self.floor(),
            self.value() / self.floor(),
            self.runs.len(),
            self.runs.iter().map(GuestsRun::lost).sum::<u64>()
        )
    }
}

/// Runs P7 between two Guests: `runs` runs of each, `frames` frames per
/// run. `launcher()` gives a command that starts `lguest` (with whatever
/// environment it needs); `peer()` one for the socketpair's second process,
/// as for [`p7`].
pub fn p7_guests(
    peer: &dyn Fn() -> Command,
    launcher: &dyn Fn() -> Command,
    runs: usize,
    frames: u64,
) -> Result<P7Guests, String> {
    let mut out = P7Guests {
        runs: Vec::new(),
        socketpair: Vec::new(),
    };
    for run in 0..runs {
        out.socketpair.push(socketpair_run(peer, frames)?);
        out.runs.push(guests_run(launcher, frames, run)?);
    }
    Ok(out)
}

/// A Launcher of P7, its stdout read line by line as it comes and its
/// stderr kept for when it fails; killed if a run ends early.
struct Launched {
    child: Peer,
    lines: mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    what: &'static str,
}

impl Launched {
    fn start(mut cmd: Command, what: &'static str) -> Result<Launched, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the P7 {what}: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Ok(Launched {
            child: Peer(child),
            lines,
            stderr: Some(stderr),
            what,
        })
    }

    /// The first stdout line starting with `prefix`, within `limit`.
    fn line(&mut self, prefix: &str, limit: Duration) -> Result<String, String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!("the P7 {}: no '{prefix}' in {limit:?}", self.what))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(self.failed()),
            }
        }
    }

    /// Why it ended without saying what we waited for (it is ended now).
    fn failed(&mut self) -> String {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        let stderr = self.stderr.take().and_then(|t| t.join().ok());
        format!(
            "the P7 {} ended early: {}",
            self.what,
            stderr.unwrap_or_default().trim()
        )
    }

    /// Waits for it to end (it powers off once it has reported).
    fn finish(mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.0.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(_)) => return Err(self.failed()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => return Err(format!("the P7 {} did not end", self.what)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// The `key=number` fields of a `lguest-bench:` line.
fn fields(line: &str) -> impl Fn(&str) -> Result<f64, String> + '_ {
    move |key| {
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| format!("no {key}= in '{line}'"))
    }
}

/// One run: a receiving Launcher on a fresh FILE, then, once its Guest
/// says it is ready (and with which MAC), a sending one.
pub fn guests_run(
    launcher: &dyn Fn() -> Command,
    frames: u64,
    run: usize,
) -> Result<GuestsRun, String> {
    let file = NetFile(
        std::env::temp_dir().join(format!("lguest-p7-guests-{}-{run}.net", std::process::id())),
    );
    let _ = std::fs::remove_file(&file.0);
    let sharenet = format!("--sharenet={}", file.0.display());
    let mut cmd = launcher();
    cmd.args([
        &sharenet,
        "--append",
        &format!("bench=sharenet-rx iters={frames}"),
    ]);
    let mut receiver = Launched::start(cmd, "receiver")?;
    let ready = receiver.line("lguest-bench: sharenet-rx ready ", RUN_LIMIT)?;
    let mac = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mac="))
        .ok_or_else(|| format!("no mac= in '{ready}'"))?
        .to_string();
    let mut cmd = launcher();
    cmd.args([
        &sharenet,
        "--append",
        &format!("bench=sharenet peer={mac} iters={frames}"),
    ]);
    let mut sender = Launched::start(cmd, "sender")?;
    let sent_line = sender.line("lguest-bench: sharenet ", RUN_LIMIT)?;
    sender.finish(RUN_LIMIT)?;
    let got_line = receiver.line("lguest-bench: sharenet-rx frames=", RUN_LIMIT)?;
    receiver.finish(RUN_LIMIT)?;

    let (sent, got) = (fields(&sent_line), fields(&got_line));
    let khz = got("tsc_khz")?;
    if khz == 0.0 {
        return Err("the TSC is not invariant here; cycles cannot be turned into time".into());
    }
    let seconds = got("cycles")? / (khz * 1000.0);
    Ok(GuestsRun {
        mib_s: throughput(got("timed_bytes")? as u64, seconds),
        sent: sent("frames")? as u64,
        received: got("frames")? as u64,
        bad: got("bad")? as u64,
        lines: [sent_line.clone(), got_line.clone()],
    })
}
