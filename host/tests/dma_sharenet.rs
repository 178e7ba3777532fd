//! `--sharenet=FILE`: Launchers on one FILE form one network, in one
//! process or several; a Launcher killed with SIGKILL leaves its slot to the
//! next; a FILE full of garbage never makes a Launcher write outside its
//! Guest's bound buffers. No KVM: each "Guest" is a memory of plain bytes
//! driven by the test, and the other processes are this test binary run
//! again as a peer (`a_reflector_answers_every_frame`).

use lguest::dma::bindings::DMA_SIZE;
use lguest::dma::console::ConsoleConfig;
use lguest::dma::harness::{RecordingRam, SignalLog};
use lguest::dma::net::{pick_slots, slot_key};
use lguest::dma::sharenet::{SharedNet, SharenetError, FILE_SIZE, MAX_SLOTS};
use lguest::dma::{Backends, Dma, NetBackend};
use lguest::memory::{GuestMemory, Layout};
use lguest_abi::LguestDma;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use zerocopy::IntoBytes;

/// Set (to the FILE) when this binary runs as a peer process.
const PEER_ENV: &str = "LGUEST_TEST_SHARENET_PEER";
const LIMIT: Duration = Duration::from_secs(20);

const MEM: u64 = 0x20000;
/// The table is at MEM; the one network's page follows.
const PAGE: u64 = MEM + 0x1000;
/// Receive buffers: RX_COUNT lguest_dma at RX_ARRAY, one 2 KiB section
/// each, at RX_BUF + i * 4 KiB.
const RX_ARRAY: u64 = 0x1000;
const RX_BUF: u64 = 0x4000;
const RX_COUNT: u64 = 8;
const RX_LEN: u16 = 2048;
const RX_IRQ: u64 = 5;
/// The sender's lguest_dma and frame.
const TX_DMA: u64 = 0x3000;
const TX_FRAME: u64 = 0x10000;

/// A FILE of our own, removed when dropped.
struct NetFile(PathBuf);

impl NetFile {
    fn new(tag: &str) -> NetFile {
        let path =
            std::env::temp_dir().join(format!("lguest-sharenet-{tag}-{}.net", std::process::id()));
        let _ = std::fs::remove_file(&path);
        NetFile(path)
    }
}

impl Drop for NetFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One Launcher on the network, and its Guest.
struct Launcher {
    net: Arc<SharedNet>,
    ram: Arc<RecordingRam>,
    signals: Arc<SignalLog>,
    dma: Dma,
    mac: [u8; 6],
}

fn launcher(file: &Path) -> Launcher {
    let net = Arc::new(SharedNet::join(file).unwrap());
    let ram = Arc::new(RecordingRam::new(MEM, MEM + 0x2000));
    let signals = SignalLog::new();
    let backends = Backends {
        console: ConsoleConfig {
            input: None,
            output: Arc::new(Mutex::new(std::io::sink())),
            raw_terminal: false,
        },
        disks: vec![],
        nets: vec![NetBackend::Shared(net.clone())],
    };
    let dma = Dma::new(ram.clone(), &backends, signals.clone()).unwrap();
    let mac = [2, 0, 0, 0, 0x77, net.slot() as u8];
    Launcher {
        net,
        ram,
        signals,
        dma,
        mac,
    }
}

fn frame(dest: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = dest.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xB5]);
    f.extend_from_slice(payload);
    f
}

impl Launcher {
    /// The Guest opens its device: MAC in its slot, buffers at its key.
    fn listen(&self) {
        for i in 0..RX_COUNT {
            let mut d = LguestDma::default();
            d.addr[0] = RX_BUF + i * 0x1000;
            d.len[0] = RX_LEN;
            self.ram.guest_write(RX_ARRAY + i * DMA_SIZE, d.as_bytes());
        }
        let key = slot_key(PAGE, self.net.slot());
        assert_eq!(
            self.dma.bind_dma(key, RX_ARRAY, RX_COUNT << 8 | RX_IRQ),
            Ok(1)
        );
        self.net.set_mac(self.net.slot(), self.mac);
    }

    /// The Guest's driver sends `f`: one SEND_DMA per slot it picks.
    /// Returns (slot, used_len) for each.
    fn send(&self, f: &[u8]) -> Vec<(usize, u32)> {
        self.ram.guest_write(TX_FRAME, f);
        let mut d = LguestDma::default();
        d.addr[0] = TX_FRAME;
        d.len[0] = f.len() as u16;
        self.ram.guest_write(TX_DMA, d.as_bytes());
        pick_slots(&self.net.page(), f, self.net.slot(), MAX_SLOTS)
            .into_iter()
            .map(|s| {
                let sent = self.dma.send_dma(slot_key(PAGE, s), TX_DMA).unwrap();
                assert_eq!(self.ram.guest_read_u32(TX_DMA), sent.used_len);
                (s, sent.used_len)
            })
            .collect()
    }

    /// Sends `f` to one key, whoever's MAC is there.
    fn send_to(&self, slot: usize, f: &[u8]) -> u32 {
        self.ram.guest_write(TX_FRAME, f);
        let mut d = LguestDma::default();
        d.addr[0] = TX_FRAME;
        d.len[0] = f.len() as u16;
        self.ram.guest_write(TX_DMA, d.as_bytes());
        self.dma
            .send_dma(slot_key(PAGE, slot), TX_DMA)
            .unwrap()
            .used_len
    }

    /// Takes every filled buffer, in array order, and frees it.
    fn take_all(&self) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        for i in 0..RX_COUNT {
            let at = RX_ARRAY + i * DMA_SIZE;
            let used = self.ram.guest_read_u32(at);
            if used != 0 {
                got.push(self.ram.guest_read(RX_BUF + i * 0x1000, used as usize));
                self.ram.guest_write_u32(at, 0);
            }
        }
        got
    }

    /// Waits until every buffer is full, then takes them all: the frames
    /// in the order they came. (Taking whatever is full races the device:
    /// it fills the lowest free buffer, so one freed behind us can take an
    /// earlier frame than a later buffer we have yet to read. With all of
    /// them full, the device can fill only those we free, in our order.)
    fn take_when_full(&self) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + LIMIT;
        while (0..RX_COUNT).any(|i| self.ram.guest_read_u32(RX_ARRAY + i * DMA_SIZE) == 0) {
            assert!(Instant::now() < deadline, "the buffers did not fill");
            std::thread::sleep(Duration::from_millis(1));
        }
        self.take_all()
    }

    /// Waits until `n` frames have arrived in all, and takes them.
    fn receive(&self, n: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let deadline = Instant::now() + LIMIT;
        while got.len() < n && Instant::now() < deadline {
            let seen = self.signals.seen().irqs.len();
            got.extend(self.take_all());
            if got.len() < n {
                self.signals
                    .wait(Duration::from_millis(50), |s| s.irqs.len() > seen);
            }
        }
        assert!(self.signals.seen().irqs.iter().all(|&i| i == RX_IRQ as u32));
        got
    }
}

/// Echoes every frame it gets back to its sender, and says so on `out`,
/// until `stop` is set.
fn reflector(file: &Path, out: &mut dyn Write, stop: &AtomicBool) {
    let l = launcher(file);
    l.listen();
    let mac: Vec<String> = l.mac.iter().map(|b| format!("{b:02x}")).collect();
    // Whole lines, one write each: the reader may take writes as lines.
    let say = |out: &mut dyn Write, line: String| {
        out.write_all(format!("peer: {line}\n").as_bytes()).unwrap();
        out.flush().unwrap();
    };
    say(
        out,
        format!("ready slot={} mac={}", l.net.slot(), mac.join(":")),
    );
    while !stop.load(Ordering::SeqCst) {
        let seen = l.signals.seen().irqs.len();
        for f in l.take_all() {
            let src: [u8; 6] = f[6..12].try_into().unwrap();
            say(out, format!("got {} bytes to {:02x?}", f.len(), &f[..6]));
            let reply = frame(src, l.mac, &f[14..]);
            let sent = l.send(&reply);
            say(out, format!("replied to {} slots", sent.len()));
        }
        l.signals
            .wait(Duration::from_millis(50), |s| s.irqs.len() > seen);
    }
}

/// A peer process, killed however the test ends.
struct Peer {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Peer {
    fn start(file: &Path) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_reflector_answers_every_frame",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PEER_ENV, file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // The harness's "test NAME ... " may start the line.
                if let Some((_, rest)) = line.split_once("peer: ") {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
        Peer { child, lines }
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(LIMIT)
            .expect("the peer said nothing in time")
    }

    /// Its slot and MAC, once it is on the network.
    fn ready(&self) -> (usize, [u8; 6]) {
        let line = self.line();
        let rest = line.strip_prefix("ready slot=").expect("a ready line");
        let (slot, mac) = rest.split_once(" mac=").unwrap();
        let mac: Vec<u8> = mac
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        (slot.parse().unwrap(), mac.try_into().unwrap())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In a peer process: the reflector, until stdin closes. Otherwise: the
/// same reflector on a thread, answering a Launcher of this process.
#[test]
fn a_reflector_answers_every_frame() {
    if let Ok(file) = std::env::var(PEER_ENV) {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            s.store(true, Ordering::SeqCst);
        });
        reflector(Path::new(&file), &mut std::io::stdout(), &stop);
        return;
    }
    let file = NetFile::new("reflector");
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    struct Lines(mpsc::Sender<Vec<u8>>);
    impl Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.send(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (path, s) = (file.0.clone(), stop.clone());
    let thread = std::thread::spawn(move || reflector(&path, &mut Lines(tx), &s));
    let ready = String::from_utf8(rx.recv_timeout(LIMIT).unwrap()).unwrap();
    assert!(ready.starts_with("peer: ready slot=1 "), "{ready}");
    let a = launcher(&file.0);
    assert_eq!(a.net.slot(), 2);
    a.listen();
    let peer_mac = a.net.mac(1);
    assert_eq!(peer_mac, [2, 0, 0, 0, 0x77, 1]);
    let hello = frame(peer_mac, a.mac, b"hello, reflector");
    assert_eq!(a.send(&hello), vec![(1, hello.len() as u32)]);
    let back = a.receive(1);
    assert_eq!(back, vec![frame(a.mac, peer_mac, b"hello, reflector")]);
    stop.store(true, Ordering::SeqCst);
    thread.join().unwrap();
}

#[test]
fn two_launchers_in_one_process_exchange_by_mac_and_broadcast() {
    let file = NetFile::new("inproc");
    let a = launcher(&file.0);
    let b = launcher(&file.0);
    let c = launcher(&file.0);
    assert_eq!((a.net.slot(), b.net.slot(), c.net.slot()), (1, 2, 3));
    a.listen();
    b.listen();
    // c is on the network (a MAC) but has bound nothing.
    c.net.set_mac(3, c.mac);
    assert_eq!(
        std::fs::metadata(&file.0).unwrap().len(),
        FILE_SIZE,
        "sized on first use"
    );
    // Unicast by MAC.
    let f = frame(b.mac, a.mac, &[0x11; 100]);
    assert_eq!(a.send(&f), vec![(2, f.len() as u32)]);
    assert_eq!(b.receive(1), vec![f]);
    // Broadcast: every used slot but the sender's; c takes nothing.
    let f = frame([0xff; 6], b.mac, &[0x22; 1500]);
    assert_eq!(b.send(&f), vec![(1, f.len() as u32), (3, 0)]);
    assert_eq!(a.receive(1), vec![f]);
    // Nobody's MAC: no key at all.
    assert!(a.send(&frame([2, 9, 9, 9, 9, 9], a.mac, b"x")).is_empty());
    // A key nobody else bound, our own included: 0, and nothing arrives.
    assert_eq!(a.send_to(1, &frame(a.mac, a.mac, b"me")), 0);
    assert_eq!(a.send_to(9, &frame(a.mac, a.mac, b"none")), 0);
    // A promiscuous Guest gets what is not for it.
    c.listen();
    c.net.set_mac(3, [c.mac[0] | 1, 0, 0, 0, 0x77, 3]);
    let f = frame(b.mac, a.mac, b"snooped");
    assert_eq!(a.send(&f), vec![(2, f.len() as u32), (3, f.len() as u32)]);
    assert_eq!(c.receive(1), vec![f.clone()]);
    assert_eq!(b.receive(1), vec![f]);
    assert!(a.signals.seen().kills.is_empty());
    assert!(b.signals.seen().kills.is_empty());
}

/// A Guest whose buffers are all full loses nothing: its Launcher holds
/// the next frame (and its ring the rest, until senders are told it is
/// full) until the Guest frees a buffer, then delivers them in order.
#[test]
fn frames_wait_for_a_guest_with_no_free_buffer() {
    let file = NetFile::new("hold");
    let a = launcher(&file.0);
    let b = launcher(&file.0);
    b.listen();
    let frames: Vec<Vec<u8>> = (0..3 * RX_COUNT as u8)
        .map(|i| frame(b.mac, a.mac, &[i; 1000]))
        .collect();
    for f in &frames {
        assert_eq!(
            a.send_to(b.net.slot(), f),
            f.len() as u32,
            "the ring took it"
        );
    }
    // b's 8 buffers fill; the 9th frame waits for one.
    let deadline = Instant::now() + LIMIT;
    while b.net.stats.held.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no frame was held");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Nothing was lost: they come in order, as the Guest frees its
    // buffers (told by a poke, as a HALT does, or found on the Launcher's
    // own look a moment later).
    let mut got = b.take_when_full();
    assert_eq!(got, frames[..RX_COUNT as usize].to_vec());
    b.dma.poke();
    got.extend(b.take_when_full());
    got.extend(b.take_when_full());
    assert_eq!(got, frames);
    assert!(b.signals.seen().kills.is_empty());
}

#[test]
fn two_processes_exchange_frames_by_mac_and_broadcast() {
    let file = NetFile::new("twoproc");
    let a = launcher(&file.0);
    a.listen();
    let peer = Peer::start(&file.0);
    let (slot, mac) = peer.ready();
    assert_eq!(slot, 2);
    assert_eq!(a.net.mac(slot), mac, "its MAC, in our view of the page");
    // Unicast: it gets it and answers us.
    let f = frame(mac, a.mac, b"ping over the file");
    assert_eq!(a.send(&f), vec![(2, f.len() as u32)]);
    assert_eq!(
        peer.line(),
        format!("got {} bytes to {:02x?}", f.len(), mac)
    );
    assert_eq!(peer.line(), "replied to 1 slots");
    assert_eq!(a.receive(1), vec![frame(a.mac, mac, b"ping over the file")]);
    // Broadcast, full size.
    let payload = vec![0x5a; 1500];
    let f = frame([0xff; 6], a.mac, &payload);
    assert_eq!(a.send(&f), vec![(2, 1514)]);
    assert_eq!(
        peer.line(),
        format!("got 1514 bytes to {:02x?}", [0xffu8; 6])
    );
    assert_eq!(peer.line(), "replied to 1 slots");
    assert_eq!(a.receive(1), vec![frame(a.mac, mac, &payload)]);
    // Many, back to back.
    for i in 0..100u8 {
        let f = frame(mac, a.mac, &[i; 64]);
        assert_eq!(a.send(&f), vec![(2, f.len() as u32)]);
        let back = a.receive(1);
        assert_eq!(back, vec![frame(a.mac, mac, &[i; 64])]);
    }
    assert!(a.signals.seen().kills.is_empty());
}

#[test]
fn a_launcher_killed_with_sigkill_leaves_its_slot_to_the_next() {
    let file = NetFile::new("sigkill");
    let a = launcher(&file.0);
    a.listen();
    let mut peer = Peer::start(&file.0);
    let (slot, mac) = peer.ready();
    assert_eq!(slot, 2);
    peer.child.kill().unwrap(); // SIGKILL
    peer.child.wait().unwrap();
    // Its MAC is still in the page; frames for it fill its ring, then the
    // sender finds nobody holds the slot and tidies it. Nothing blocks.
    assert_eq!(a.net.mac(slot), mac);
    let f = frame(mac, a.mac, &[7; 1500]);
    let start = Instant::now();
    let taken: Vec<u32> = (0..400).map(|_| a.send_to(slot, &f)).collect();
    assert!(start.elapsed() < LIMIT);
    let queued = taken.iter().take_while(|&&n| n == 1514).count();
    assert!(queued > 100, "a ring's worth was queued: {queued}");
    assert!(taken[queued..].iter().all(|&n| n == 0), "then nothing");
    assert_eq!(a.net.mac(slot), [0; 6], "the dead slot was tidied");
    assert!(a.send(&f).is_empty(), "its MAC is gone");
    // The next Launcher takes the slot, and the network works.
    let c = launcher(&file.0);
    assert_eq!(c.net.slot(), slot);
    c.listen();
    let f = frame(c.mac, a.mac, b"hello, newcomer");
    assert_eq!(a.send(&f), vec![(slot, f.len() as u32)]);
    assert_eq!(c.receive(1), vec![f]);
}

#[test]
fn a_dead_launchers_leftovers_are_tidied_by_the_next_to_join() {
    let file = NetFile::new("leftovers");
    let a = launcher(&file.0);
    let mut peer = Peer::start(&file.0);
    let (slot, mac) = peer.ready();
    peer.child.kill().unwrap();
    peer.child.wait().unwrap();
    drop(a); // slot 1 is free again, cleanly
    assert_eq!(
        SharedNet::join(&file.0).unwrap().mac(slot),
        [0; 6],
        "joining tidied slot {slot} ({mac:02x?})"
    );
    // Safe to reuse once every Guest on it ended: slots from 1 again.
    let n = SharedNet::join(&file.0).unwrap();
    assert_eq!(n.slot(), 1);
    assert!(n.page().iter().all(|&b| b == 0));
}

#[test]
fn a_garbled_file_never_makes_a_launcher_write_outside_its_buffers() {
    let file = NetFile::new("garbled");
    let a = launcher(&file.0);
    let b = launcher(&file.0);
    a.listen();
    b.listen();
    a.ram.take_writes();
    // Where a's Host may write: its bound sections and their used_len.
    let allowed = |addr: u64, len: u64| {
        (0..RX_COUNT).any(|i| {
            let (dma, buf) = (RX_ARRAY + i * DMA_SIZE, RX_BUF + i * 0x1000);
            (addr == dma && len == 4) || (addr >= buf && addr + len <= buf + RX_LEN as u64)
        })
    };
    let vandal = {
        let path = file.0.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let mut noise = vec![0u8; 1 << 16];
            let mut rounds = 0u64;
            while !s.load(Ordering::SeqCst) || rounds < 50 {
                for b in noise.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                // The net page, the header, every control page, and a's
                // ring, with a few words that look almost right.
                f.write_all_at(&noise[..0x3000], 0).unwrap();
                for slot in 0..3u64 {
                    let base = 0x2000 + slot * (0x1000 + (256 << 10));
                    f.write_all_at(&noise[..0x1000], base).unwrap();
                    f.write_all_at(&noise[0x1000..], base + 0x1000).unwrap();
                    f.write_all_at(&(x & !7).to_le_bytes(), base + 192).unwrap();
                    f.write_all_at(&((x & !7) - 8).to_le_bytes(), base + 128)
                        .unwrap();
                }
                rounds += 1;
            }
        });
        (stop, thread)
    };
    // Meanwhile b keeps sending to a, and a keeps taking.
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        for len in [60usize, 1514, 2000, 3000] {
            b.send_to(a.net.slot(), &vec![0xEE; len]);
        }
        a.take_all();
    }
    vandal.0.store(true, Ordering::SeqCst);
    vandal.1.join().unwrap();
    let stray: Vec<_> = a
        .ram
        .take_writes()
        .into_iter()
        .filter(|&(addr, len)| !allowed(addr, len))
        .collect();
    assert!(stray.is_empty(), "writes outside bound buffers: {stray:x?}");
    assert!(a.signals.seen().kills.is_empty(), "no Sudden Death either");
    assert!(b.signals.seen().kills.is_empty());
    // Once the vandal stops, the network comes back by itself: a puts its
    // state back and empties a ring that makes no sense. What its ring
    // still held (b's frames, or noise that looked like frames) comes
    // first: frames wait for a free buffer.
    let f = vec![0x42; 1000];
    let deadline = Instant::now() + LIMIT;
    let mut got = Vec::new();
    while !got.contains(&f) && Instant::now() < deadline {
        got.extend(a.take_all());
        a.dma.poke();
        b.send_to(a.net.slot(), &f);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(got.contains(&f), "a receives again");
    assert!(
        a.net.stats.garbled.load(Ordering::Relaxed) > 0,
        "it noticed"
    );
    let stray: Vec<_> = a
        .ram
        .take_writes()
        .into_iter()
        .filter(|&(addr, len)| !allowed(addr, len))
        .collect();
    assert!(stray.is_empty(), "{stray:x?}");
}

#[test]
fn a_file_that_is_not_a_network_is_left_alone() {
    let file = NetFile::new("precious");
    std::fs::write(&file.0, b"my thesis, chapter 1").unwrap();
    let e = SharedNet::join(&file.0).err().unwrap();
    assert!(matches!(e, SharenetError::NotNetworkFile { .. }));
    assert!(e.to_string().starts_with(&format!(
        "--sharenet={}: not an lguest network file",
        file.0.display()
    )));
    assert_eq!(std::fs::read(&file.0).unwrap(), b"my thesis, chapter 1");
    // A big file that is not ours either.
    std::fs::write(&file.0, vec![1u8; FILE_SIZE as usize + 10]).unwrap();
    assert!(matches!(
        SharedNet::join(&file.0),
        Err(SharenetError::NotNetworkFile { .. })
    ));
    assert_eq!(std::fs::metadata(&file.0).unwrap().len(), FILE_SIZE + 10);
    // A directory, and a file we cannot create.
    let e = SharedNet::join(&std::env::temp_dir()).err().unwrap();
    assert!(e.to_string().starts_with("--sharenet="), "{e}");
    assert!(SharedNet::join(Path::new("/nonexistent-dir/net")).is_err());
    // An empty file, or a 2007 Launcher's blank page, becomes a network.
    std::fs::write(&file.0, [0u8; 4096]).unwrap();
    assert_eq!(SharedNet::join(&file.0).unwrap().slot(), 1);
}

#[test]
fn every_slot_but_0_can_be_taken_and_then_the_network_is_full() {
    let file = NetFile::new("full");
    let nets: Vec<SharedNet> = (1..MAX_SLOTS)
        .map(|_| SharedNet::join(&file.0).unwrap())
        .collect();
    let slots: Vec<usize> = nets.iter().map(SharedNet::slot).collect();
    assert_eq!(slots, (1..MAX_SLOTS).collect::<Vec<_>>());
    let e = SharedNet::join(&file.0).err().unwrap();
    assert!(matches!(e, SharenetError::Full { .. }), "{e}");
    drop(nets);
    assert_eq!(SharedNet::join(&file.0).unwrap().slot(), 1);
}

#[test]
fn the_guest_sees_the_shared_page_at_its_net_page() {
    let file = NetFile::new("mapped");
    let a = launcher(&file.0);
    let b = SharedNet::join(&file.0).unwrap();
    let mem = GuestMemory::new(Layout {
        mem: 2 << 20,
        pfn_limit: (2 << 20) / 4096 + 2,
        mmio_hole_pages: 0,
        host_ro_pages: 1,
        host_rw_pages: 1,
    })
    .unwrap();
    let page = (2 << 20) + 0x1000;
    b.map_into(&mem, page).unwrap();
    // The Guest writes its MAC through its own memory...
    mem.write(page + 6 * b.slot() as u64, &[2, 1, 2, 3, 4, 5])
        .unwrap();
    // ...and every Launcher sees it; and the other way round.
    assert_eq!(a.net.mac(b.slot()), [2, 1, 2, 3, 4, 5]);
    a.net.set_mac(a.net.slot(), a.mac);
    let mut seen = [0u8; 6];
    mem.read(page + 6 * a.net.slot() as u64, &mut seen).unwrap();
    assert_eq!(seen, a.mac);
    // The rest of Guest memory is its own, and a page not aligned is
    // refused.
    assert!(b.map_into(&mem, page + 8).is_err());
    assert!(b.map_into(&mem, 4 << 20).is_err());
}
