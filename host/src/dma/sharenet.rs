//! `--sharenet=FILE`: one network for every Launcher started with the same
//! FILE, with no daemon and no root.
//!
//! In 2007 the Launchers mapped one shared page and the Host kernel, which
//! saw every Guest, copied frames from one Guest straight into another.
//! Here each Guest lives in its own Launcher process, and no Launcher may
//! write into another's Guest. So a frame crosses in two halves: the
//! sender's Launcher puts it on the receiver's *ring*, in the FILE, and the
//! receiver's Launcher copies it into its own Guest, into a buffer its Guest
//! bound at that key, checked as any other delivery.
//!
//! The FILE (sparse, created and sized on first use):
//!
//! ```text
//! 0x0000            the net page every Guest maps: MAC slots, keys
//! 0x1000            header: magic, version, slots, ring size
//! 0x2000 + s*STRIDE slot s: control page {state, pid, waiting (a futex
//!                   word), head, tail, bitmap of the key offsets its Guest
//!                   bound, ring lock}, then its ring of records {u32 len,
//!                   u32 key offset, frame, padding to 8}
//! ```
//!
//! Claiming: slot s is held by an open-file-description lock on byte
//! `LOCKS + s` (past the data: a lock needs no bytes). The kernel drops it
//! when the Launcher exits however it exits, kill -9 included, so a slot
//! whose lock is free is free, whatever its bytes say. Senders to one ring
//! take turns through a lock word in its control page (no system call): a
//! sender that finds it held spins a little, then takes it over if the
//! holder is gone (its slot's lock is free, or the word names no slot), and
//! otherwise drops the frame rather than stall its Guest's vCPU. A receiver
//! clears its ring's lock if it stays held, unchanged, for a long time.
//!
//! Waking: a receiver with nothing to do watches its ring for a moment,
//! then sets its `waiting` word and sleeps on it (a futex on the shared
//! mapping); a sender that finds it set clears it and wakes the receiver.
//! While frames stream, nobody makes a system call.
//!
//! Nothing read from the FILE is trusted: any process that can write it can
//! write anything there. Indices and lengths are checked before use, a ring
//! that makes no sense is emptied, and bytes go into a Guest only through
//! the receiving Launcher's own bindings.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

use lguest_abi::{LGUEST_NET_KEY_STRIDE, LGUEST_NET_MAC_LEN, PAGE_SIZE};

/// Slots on one network. Slot 0 is the Launcher's side of the 2007 model
/// (a tap bridge) and no Guest on a shared network takes it.
pub const MAX_SLOTS: usize = 64;
/// Bytes of each slot's ring: over 150 full-size frames.
pub const RING_BYTES: u64 = 256 << 10;
/// The largest frame a record carries: one lguest_dma's worth.
pub const FRAME_MAX: usize = super::net::FRAME_MAX;

const HEADER: u64 = PAGE_SIZE;
/// Where slot 0 starts.
pub const SLOTS: u64 = 2 * PAGE_SIZE;
/// Bytes of one slot: its control page, then its ring.
pub const STRIDE: u64 = PAGE_SIZE + RING_BYTES;
/// The whole FILE.
pub const FILE_SIZE: u64 = SLOTS + MAX_SLOTS as u64 * STRIDE;

const MAGIC: [u8; 8] = *b"lguestN1";
const VERSION: u32 = 1;

/// Control page fields, each on a cache line of its own where two
/// processes write them.
pub const STATE: u64 = 0;
pub const PID: u64 = 4;
pub const WAITING: u64 = 64;
pub const HEAD: u64 = 128;
pub const TAIL: u64 = 192;
pub const KEYS: u64 = 256;
/// The ring's lock: 0 free, else the holder's slot + 1.
pub const RING_LOCK: u64 = 384;
/// One bit per 4-byte key offset in the net page.
const KEY_WORDS: usize = (PAGE_SIZE / LGUEST_NET_KEY_STRIDE) as usize / 64;
/// `state` of a slot whose Launcher runs.
pub const LIVE: u32 = u32::from_le_bytes(*b"LIVE");

/// A record: `{u32 len, u32 key offset}` then the frame, padded to 8.
pub const RECORD_HEADER: u64 = 8;
/// `len` of a record that says "continue at the ring's start".
pub const WRAP: u32 = u32::MAX;

/// Lock bytes, far past the data.
const LOCKS: i64 = 1 << 40;
const SETUP_LOCK: i64 = LOCKS;
fn claim_lock(slot: usize) -> i64 {
    LOCKS + 0x1000 + slot as i64
}
/// How often a sender tries for a busy ring before it looks whether the
/// holder still lives (and, if it does, drops the frame).
const RING_SPINS: u32 = 4096;
/// How long a Launcher waits for another to finish laying out the FILE.
const SETUP_WAIT: Duration = Duration::from_secs(5);
/// A sleeping receiver looks again this often whatever its word says.
const IDLE_RECHECK: Duration = Duration::from_millis(100);
/// How long a receiver that ran dry watches its ring before it sleeps: a
/// stream of frames then costs no wake-up per frame.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(20);
/// How often a receiver holding a frame for a Guest with no free buffer
/// looks again, when nothing pokes it sooner (a Guest frees buffers by
/// writing to its own memory, which tells nobody).
const HOLD_RECHECK: Duration = Duration::from_millis(1);

/// What became of a frame the receiver offered its side (see
/// [`SharedNet::receive`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Done with: taken, or dropped for good (no binding at that key, a
    /// broken buffer, a tap that had no room).
    Done,
    /// The Guest bound buffers at that key but has none free now: keep the
    /// frame, and the rest of the ring behind it, until it has.
    NoRoom,
}

/// Where slot `slot`'s control page starts in the FILE (its ring follows).
pub fn slot_base(slot: usize) -> u64 {
    SLOTS + slot as u64 * STRIDE
}

fn pad8(n: u64) -> u64 {
    (n + 7) & !7
}

/// Why a Launcher cannot join a network (set-up errors).
#[derive(Debug, thiserror::Error)]
pub enum SharenetError {
    #[error("--sharenet={}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--sharenet={}: not a regular file", path.display())]
    NotRegular { path: PathBuf },
    #[error("--sharenet={}: not an lguest network file ({why}); give a new file name, or remove it if no Launcher uses it", path.display())]
    NotNetworkFile { path: PathBuf, why: &'static str },
    #[error("--sharenet={}: all {} Guest slots are taken", path.display(), MAX_SLOTS - 1)]
    Full { path: PathBuf },
    #[error("--sharenet={}: slot 0, the bridge to a tap, is taken: another Launcher with --tunnet bridges this network already", path.display())]
    BridgeTaken { path: PathBuf },
    #[error("--sharenet={}: another process has been setting it up for too long", path.display())]
    Busy { path: PathBuf },
}

/// What a Launcher saw of the network, for tests and curious users.
#[derive(Debug, Default)]
pub struct Stats {
    /// Frames queued for another Launcher.
    pub sent: AtomicU64,
    /// Frames sent to a key nobody else listens on.
    pub no_receiver: AtomicU64,
    /// Frames dropped because the receiver's ring was full or busy.
    pub ring_full: AtomicU64,
    /// Frames taken off our own ring.
    pub received: AtomicU64,
    /// Times a frame off our ring found our Guest with no free buffer and
    /// waited for one.
    pub held: AtomicU64,
    /// Times our ring or a receiver's made no sense (someone wrote over
    /// the FILE) and we gave up on what it held.
    pub garbled: AtomicU64,
    /// Stale slots (their Launcher gone) we tidied.
    pub reclaimed: AtomicU64,
}

/// This Launcher's place on a shared network.
pub struct SharedNet {
    // Declared before `file`: the mapping goes first when we drop.
    map: MmapRegion<()>,
    file: File,
    path: PathBuf,
    slot: usize,
    /// Whether a receiver runs (one at a time).
    attached: AtomicBool,
    /// What we last published of our keys, to put back if someone writes
    /// over it.
    keys: std::sync::Mutex<[u64; KEY_WORDS]>,
    /// One sender at a time in this process: our slot number in a ring's
    /// lock word then means this thread.
    sending: std::sync::Mutex<()>,
    /// Set while the receiver holds a frame for want of a free buffer, and
    /// the word it sleeps on then (a poke sets it): ours alone, not the
    /// FILE's, so senders never wake it for nothing.
    holding: AtomicBool,
    poked: AtomicU32,
    pub stats: Stats,
}

/// Takes (F_WRLCK) or drops (F_UNLCK) an open-file-description lock on
/// one byte of `file`, without waiting.
fn ofd_lock(file: &File, at: i64, kind: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock is plain data; all zeroes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = at;
    fl.l_len = 1;
    // SAFETY: fcntl reads one flock we own; OFD locks need l_pid 0, which
    // it is.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn try_lock(file: &File, at: i64) -> bool {
    ofd_lock(file, at, libc::F_WRLCK).is_ok()
}

fn unlock(file: &File, at: i64) {
    let _ = ofd_lock(file, at, libc::F_UNLCK);
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is an aligned u32 in our shared mapping, alive for the
    // call; FUTEX_WAIT only reads it and sleeps. Not FUTEX_PRIVATE: the
    // waker is another process.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is an aligned u32 in our shared mapping; FUTEX_WAKE
    // only uses its address.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

impl SharedNet {
    /// Joins the network of `path`, creating the FILE if need be, and
    /// claims the lowest free slot (1 and up).
    pub fn join(path: &Path) -> Result<SharedNet, SharenetError> {
        Self::join_as(path, false)
    }

    /// Joins the network of `path` in slot 0, the Launcher's side of the
    /// 2007 model, to bridge it to a tap (see [`super::net::SharedBridge`]).
    pub fn join_bridge(path: &Path) -> Result<SharedNet, SharenetError> {
        Self::join_as(path, true)
    }

    fn join_as(path: &Path, bridge: bool) -> Result<SharedNet, SharenetError> {
        let io = |source| SharenetError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io)?;
        if !file.metadata().map_err(io)?.is_file() {
            return Err(SharenetError::NotRegular {
                path: path.to_path_buf(),
            });
        }
        // One Launcher at a time looks at (and perhaps lays out) the file;
        // it takes a moment, so waiting longer means something is wrong.
        let deadline = Instant::now() + SETUP_WAIT;
        while !try_lock(&file, SETUP_LOCK) {
            if Instant::now() > deadline {
                return Err(SharenetError::Busy {
                    path: path.to_path_buf(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let checked = Self::check_or_create(&file, path);
        unlock(&file, SETUP_LOCK);
        checked?;
        let map = MmapRegion::<()>::from_file(
            FileOffset::new(file.try_clone().map_err(io)?, 0),
            FILE_SIZE as usize,
        )
        .map_err(|e| io(std::io::Error::other(e)))?;
        let slot = if bridge {
            Some(0)
                .filter(|&s| try_lock(&file, claim_lock(s)))
                .ok_or_else(|| SharenetError::BridgeTaken {
                    path: path.to_path_buf(),
                })?
        } else {
            (1..MAX_SLOTS)
                .find(|&s| try_lock(&file, claim_lock(s)))
                .ok_or_else(|| SharenetError::Full {
                    path: path.to_path_buf(),
                })?
        };
        let net = SharedNet {
            map,
            file,
            path: path.to_path_buf(),
            slot,
            attached: AtomicBool::new(false),
            keys: std::sync::Mutex::new([0; KEY_WORDS]),
            sending: std::sync::Mutex::new(()),
            holding: AtomicBool::new(false),
            poked: AtomicU32::new(0),
            stats: Stats::default(),
        };
        net.reset_slot(net.slot, false);
        // A Launcher that died in our slot may have died holding a ring:
        // that lock is ours to drop now.
        let me = net.slot as u32 + 1;
        for s in 0..MAX_SLOTS {
            let _ = net.u32_at(slot_base(s) + RING_LOCK).compare_exchange(
                me,
                0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
        net.u32_at(slot_base(net.slot) + PID)
            .store(std::process::id(), Ordering::Relaxed);
        net.u32_at(slot_base(net.slot) + STATE)
            .store(LIVE, Ordering::Release);
        // Tidy what dead Launchers left: their MACs would draw broadcasts.
        for s in (0..MAX_SLOTS).filter(|&s| s != net.slot) {
            net.reclaim_if_dead(s, false);
        }
        Ok(net)
    }

    /// Lays out an empty (or all-zero) file; checks the header of any other.
    fn check_or_create(file: &File, path: &Path) -> Result<(), SharenetError> {
        use std::os::unix::fs::FileExt;
        let io = |source| SharenetError::Io {
            path: path.to_path_buf(),
            source,
        };
        let not_ours = |why| SharenetError::NotNetworkFile {
            path: path.to_path_buf(),
            why,
        };
        let size = file.metadata().map_err(io)?.len();
        if size < FILE_SIZE {
            // Never lay out over somebody's data: only a file of zeros (new,
            // or a 2007 Launcher's blank page) becomes a network.
            let mut buf = vec![0u8; size as usize];
            file.read_exact_at(&mut buf, 0).map_err(io)?;
            if buf.iter().any(|&b| b != 0) {
                return Err(not_ours("too small, and not empty"));
            }
            file.set_len(FILE_SIZE).map_err(io)?;
            let mut header = Vec::new();
            header.extend_from_slice(&MAGIC);
            for v in [VERSION, MAX_SLOTS as u32, RING_BYTES as u32, STRIDE as u32] {
                header.extend_from_slice(&v.to_le_bytes());
            }
            file.write_all_at(&header, HEADER).map_err(io)?;
            return Ok(());
        }
        let mut header = [0u8; 24];
        file.read_exact_at(&mut header, HEADER).map_err(io)?;
        if header[..8] != MAGIC {
            return Err(not_ours("no lguest network header"));
        }
        let field =
            |i: usize| u32::from_le_bytes(header[8 + 4 * i..12 + 4 * i].try_into().unwrap());
        if (field(0), field(1), field(2), field(3))
            != (VERSION, MAX_SLOTS as u32, RING_BYTES as u32, STRIDE as u32)
        {
            return Err(not_ours("a different version or layout"));
        }
        Ok(())
    }

    /// The FILE this network lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Our slot: the Guest's MAC goes at `page + 6 * slot`, and its key is
    /// `page + 4 * slot`.
    pub fn slot(&self) -> usize {
        self.slot
    }

    fn u32_at(&self, off: u64) -> &AtomicU32 {
        self.map
            .get_atomic_ref::<AtomicU32>(off as usize)
            .expect("a field inside the mapping")
    }

    fn u64_at(&self, off: u64) -> &AtomicU64 {
        self.map
            .get_atomic_ref::<AtomicU64>(off as usize)
            .expect("a field inside the mapping")
    }

    fn read_bytes(&self, off: u64, buf: &mut [u8]) {
        let slice = self
            .map
            .get_slice(off as usize, buf.len())
            .expect("a range inside the mapping");
        slice.copy_to(buf);
    }

    fn write_bytes(&self, off: u64, buf: &[u8]) {
        let slice = self
            .map
            .get_slice(off as usize, buf.len())
            .expect("a range inside the mapping");
        slice.copy_from(buf);
    }

    /// The net page as it is now (every Guest's MAC slot).
    pub fn page(&self) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        self.read_bytes(0, &mut page);
        page
    }

    /// The MAC slots of every slot a Launcher can hold, as they are now
    /// (what [`super::net::pick_slots`] looks at).
    pub fn macs(&self) -> [u8; MAX_SLOTS * LGUEST_NET_MAC_LEN] {
        let mut macs = [0u8; MAX_SLOTS * LGUEST_NET_MAC_LEN];
        self.read_bytes(0, &mut macs);
        macs
    }

    /// The MAC in `slot` (all zero: free).
    pub fn mac(&self, slot: usize) -> [u8; 6] {
        let mut mac = [0u8; LGUEST_NET_MAC_LEN];
        self.read_bytes((slot * LGUEST_NET_MAC_LEN) as u64, &mut mac);
        mac
    }

    /// Writes a MAC slot of the net page, as a Guest does through its own
    /// mapping of it.
    pub fn set_mac(&self, slot: usize, mac: [u8; 6]) {
        if slot < PAGE_SIZE as usize / LGUEST_NET_MAC_LEN {
            self.write_bytes((slot * LGUEST_NET_MAC_LEN) as u64, &mac);
        }
    }

    /// Maps the FILE's net page over the Guest's page at `guest_addr`, so
    /// the Guest reads and writes the page every Guest on the network sees.
    pub fn map_into(
        &self,
        mem: &crate::memory::GuestMemory,
        guest_addr: u64,
    ) -> std::io::Result<()> {
        if !guest_addr.is_multiple_of(PAGE_SIZE) {
            return Err(std::io::Error::other(format!(
                "net page {guest_addr:#x} is not page aligned"
            )));
        }
        let host = mem
            .host_address(guest_addr, PAGE_SIZE)
            .map_err(std::io::Error::other)?;
        // MAP_FIXED replaces just that page with the FILE's first page, still
        // read-write; the Host reaches Guest memory only by volatile copies,
        // never through references that could see the page change.
        // SAFETY: `host` starts one whole page of the Guest memory mapping
        // (checked above), which stays mapped as long as `mem`.
        let at = unsafe {
            libc::mmap(
                host.cast(),
                PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// A new boot of our Guest: no MAC, no keys, nothing queued for it.
    pub fn begin_boot(&self) {
        self.set_mac(self.slot, [0; 6]);
        self.publish_keys(&[]);
        let base = slot_base(self.slot);
        let tail = self.u64_at(base + TAIL).load(Ordering::Acquire);
        self.u64_at(base + HEAD).store(tail, Ordering::Release);
    }

    /// Says which key offsets of the net page our Guest has bound: senders
    /// queue frames for those keys on our ring.
    pub fn publish_keys(&self, offsets: &[u64]) {
        let mut words = [0u64; KEY_WORDS];
        for &off in offsets {
            let bit = off / LGUEST_NET_KEY_STRIDE;
            if off.is_multiple_of(LGUEST_NET_KEY_STRIDE) && bit < (KEY_WORDS * 64) as u64 {
                words[bit as usize / 64] |= 1 << (bit % 64);
            }
        }
        *self.keys.lock().unwrap_or_else(|e| e.into_inner()) = words;
        self.write_keys(&words);
    }

    fn write_keys(&self, words: &[u64; KEY_WORDS]) {
        let base = slot_base(self.slot) + KEYS;
        for (i, w) in words.iter().enumerate() {
            self.u64_at(base + 8 * i as u64)
                .store(*w, Ordering::Release);
        }
    }

    /// Puts our state and keys back if someone wrote over them: without
    /// them, senders would pass us by.
    fn reassert(&self) {
        let base = slot_base(self.slot);
        if self.u32_at(base + STATE).load(Ordering::Acquire) != LIVE {
            self.u32_at(base + STATE).store(LIVE, Ordering::Release);
        }
        let words = *self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let differ = (0..KEY_WORDS).any(|i| {
            self.u64_at(base + KEYS + 8 * i as u64)
                .load(Ordering::Acquire)
                != words[i]
        });
        if differ {
            self.write_keys(&words);
        }
    }

    fn listens(&self, slot: usize, offset: u64) -> bool {
        let base = slot_base(slot);
        let bit = offset / LGUEST_NET_KEY_STRIDE;
        self.u32_at(base + STATE).load(Ordering::Acquire) == LIVE
            && self
                .u64_at(base + KEYS + 8 * (bit / 64))
                .load(Ordering::Acquire)
                & (1 << (bit % 64))
                != 0
    }

    /// SEND_DMA to `offset` of the net page: queues `frame` for another
    /// Launcher whose Guest bound that key (slot n's owner first for slot
    /// n's key, then in slot order). Returns the bytes taken: the frame's
    /// length, or 0 when nobody else listens there or their ring is full.
    pub fn send(&self, offset: u64, frame: &[u8]) -> u32 {
        if offset >= PAGE_SIZE || !offset.is_multiple_of(LGUEST_NET_KEY_STRIDE) {
            return 0;
        }
        if frame.len() > FRAME_MAX {
            return 0;
        }
        let owner = (offset / LGUEST_NET_KEY_STRIDE) as usize;
        let receiver = std::iter::once(owner)
            .chain(0..MAX_SLOTS)
            .filter(|&s| s < MAX_SLOTS && s != self.slot)
            .find(|&s| self.listens(s, offset));
        let Some(receiver) = receiver else {
            self.stats.no_receiver.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        if self.enqueue(receiver, offset, frame) {
            self.stats.sent.fetch_add(1, Ordering::Relaxed);
            frame.len() as u32
        } else {
            self.stats.ring_full.fetch_add(1, Ordering::Relaxed);
            0
        }
    }

    /// Puts one record on `slot`'s ring and wakes its reader if it sleeps.
    fn enqueue(&self, slot: usize, offset: u64, frame: &[u8]) -> bool {
        let _one_sender = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        if !self.lock_ring(slot) {
            return false;
        }
        let queued = self.put_record(slot, offset, frame);
        if !queued {
            // A ring that stays full may belong to a Launcher that is gone.
            self.reclaim_if_dead(slot, true);
        }
        self.unlock_ring(slot);
        if queued {
            let waiting = self.u32_at(slot_base(slot) + WAITING);
            if waiting.swap(0, Ordering::SeqCst) != 0 {
                futex_wake(waiting);
            }
        }
        queued
    }

    /// Takes `slot`'s ring lock, or takes it over from a holder that is
    /// gone. False: a live Launcher holds it and does not let go.
    fn lock_ring(&self, slot: usize) -> bool {
        let word = self.u32_at(slot_base(slot) + RING_LOCK);
        let me = self.slot as u32 + 1;
        for i in 0..RING_SPINS {
            if word
                .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
            if i % 64 == 63 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let holder = word.load(Ordering::Relaxed);
        // Our own number while we send is nobody's (one sender at a time
        // here); a number that is no slot is nobody's; a slot whose lock is
        // free has nobody in it.
        let gone = holder == 0
            || holder == me
            || holder as usize > MAX_SLOTS
            || self.slot_is_free(holder as usize - 1);
        gone && word
            .compare_exchange(holder, me, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    fn unlock_ring(&self, slot: usize) {
        let me = self.slot as u32 + 1;
        let _ = self.u32_at(slot_base(slot) + RING_LOCK).compare_exchange(
            me,
            0,
            Ordering::Release,
            Ordering::Relaxed,
        );
    }

    /// Whether no Launcher holds `slot` (its lock is free).
    fn slot_is_free(&self, slot: usize) -> bool {
        if slot == self.slot || !try_lock(&self.file, claim_lock(slot)) {
            return false;
        }
        unlock(&self.file, claim_lock(slot));
        true
    }

    /// Writes the record; called holding `slot`'s ring lock.
    fn put_record(&self, slot: usize, offset: u64, frame: &[u8]) -> bool {
        let base = slot_base(slot);
        let ring = base + PAGE_SIZE;
        let head = self.u64_at(base + HEAD).load(Ordering::Acquire);
        let tail_word = self.u64_at(base + TAIL);
        let mut tail = tail_word.load(Ordering::Relaxed);
        let used = tail.wrapping_sub(head);
        if used > RING_BYTES || !tail.is_multiple_of(8) {
            // Nonsense from the FILE: the reader will empty it.
            self.stats.garbled.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let need = RECORD_HEADER + pad8(frame.len() as u64);
        let pos = tail % RING_BYTES;
        let to_end = RING_BYTES - pos;
        let wrap = if need > to_end { to_end } else { 0 };
        if used + wrap + need > RING_BYTES {
            return false;
        }
        if wrap > 0 {
            self.write_bytes(ring + pos, &WRAP.to_le_bytes());
            tail = tail.wrapping_add(wrap);
        }
        let pos = tail % RING_BYTES;
        let mut header = [0u8; RECORD_HEADER as usize];
        header[..4].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        header[4..].copy_from_slice(&(offset as u32).to_le_bytes());
        self.write_bytes(ring + pos, &header);
        self.write_bytes(ring + pos + RECORD_HEADER, frame);
        // SeqCst: ordered before our look at the reader's `waiting`.
        tail_word.store(tail.wrapping_add(need), Ordering::SeqCst);
        true
    }

    /// Frees `slot` if no Launcher holds it: the kernel let go of its lock,
    /// so whoever had it is gone. `ring_held`: we hold its ring lock.
    fn reclaim_if_dead(&self, slot: usize, ring_held: bool) {
        if slot == self.slot || !try_lock(&self.file, claim_lock(slot)) {
            return;
        }
        let dirty = self.u32_at(slot_base(slot) + STATE).load(Ordering::Acquire) != 0
            || self.mac(slot) != [0; 6];
        if dirty {
            self.reset_slot(slot, ring_held);
            self.stats.reclaimed.fetch_add(1, Ordering::Relaxed);
        }
        unlock(&self.file, claim_lock(slot));
    }

    /// Clears `slot`'s bytes; called holding its claim lock, and its ring
    /// lock if `ring_held`.
    fn reset_slot(&self, slot: usize, ring_held: bool) {
        let base = slot_base(slot);
        self.u32_at(base + STATE).store(0, Ordering::Release);
        for i in 0..KEY_WORDS as u64 {
            self.u64_at(base + KEYS + 8 * i).store(0, Ordering::Release);
        }
        self.set_mac(slot, [0; 6]);
        // The ring's indices belong to its writers: take their lock.
        let have = ring_held || {
            let _one_sender = self.sending.lock().unwrap_or_else(|e| e.into_inner());
            self.lock_ring(slot)
        };
        self.u64_at(base + HEAD).store(0, Ordering::Release);
        self.u64_at(base + TAIL).store(0, Ordering::Release);
        self.u32_at(base + WAITING).store(0, Ordering::Release);
        if have && !ring_held {
            self.unlock_ring(slot);
        }
    }

    /// Starts the thread that takes frames off our ring and offers each to
    /// `deliver(key offset, frame)`. A frame it has no room for
    /// ([`Offer::NoRoom`]) is offered again, before any other, when
    /// [`SharedNet::poke`] says there may be room, or every HOLD_RECHECK;
    /// meanwhile the ring fills and senders are told so (used_len 0). One
    /// at a time: a second call while the first's [`Receiver`] lives is
    /// refused.
    pub fn receive(
        self: &Arc<Self>,
        deliver: impl FnMut(u64, &[u8]) -> Offer + Send + 'static,
    ) -> std::io::Result<Receiver> {
        if self.attached.swap(true, Ordering::SeqCst) {
            return Err(std::io::Error::other("this network already has a receiver"));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (net, s) = (self.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("sharenet-rx".into())
            .spawn(move || {
                crate::sandbox::enter_thread(crate::sandbox::ThreadKind::Device);
                net.receive_loop(&s, deliver)
            });
        match thread {
            Ok(thread) => Ok(Receiver {
                net: self.clone(),
                stop,
                thread: Some(thread),
            }),
            Err(e) => {
                self.attached.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    fn receive_loop(&self, stop: &AtomicBool, mut deliver: impl FnMut(u64, &[u8]) -> Offer) {
        let base = slot_base(self.slot);
        let waiting = self.u32_at(base + WAITING);
        let tail = self.u64_at(base + TAIL);
        let mut frame = vec![0u8; FRAME_MAX];
        // A frame off the ring that waits for a free buffer: (offset, len).
        let mut held = None;
        // The ring lock as last seen at an idle look, to notice one stuck.
        let mut lock_seen = (0, 0, Instant::now());
        while !stop.load(Ordering::SeqCst) {
            if let Some((offset, len)) = held {
                if deliver(offset, &frame[..len]) == Offer::NoRoom {
                    self.wait_for_room(stop, || deliver(offset, &frame[..len]) == Offer::Done);
                    if !self.holding.swap(false, Ordering::SeqCst) {
                        held = None;
                    }
                    continue;
                }
                held = None;
            }
            if self.drain(&mut frame, &mut deliver, &mut held) {
                continue;
            }
            // Dry: watch a little before paying for a sleep and a wake-up.
            let seen = tail.load(Ordering::Acquire);
            let spin = Instant::now();
            while tail.load(Ordering::Acquire) == seen
                && spin.elapsed() < SPIN_BEFORE_SLEEP
                && !stop.load(Ordering::Relaxed)
            {
                std::hint::spin_loop();
            }
            if tail.load(Ordering::Acquire) != seen {
                continue;
            }
            waiting.store(1, Ordering::SeqCst);
            let empty =
                tail.load(Ordering::SeqCst) == self.u64_at(base + HEAD).load(Ordering::Relaxed);
            if empty && !stop.load(Ordering::SeqCst) {
                futex_wait(waiting, 1, IDLE_RECHECK);
            }
            waiting.store(0, Ordering::SeqCst);
            self.reassert();
            lock_seen = self.unstick_ring(lock_seen);
        }
    }

    /// Our Guest had no free buffer for the frame we hold: sleep until a
    /// poke or HOLD_RECHECK. `offer` tries once more after `holding` is set,
    /// so a poke that came just before cannot be missed; if it took the
    /// frame, `holding` is cleared here (the caller drops the frame).
    fn wait_for_room(&self, stop: &AtomicBool, mut offer: impl FnMut() -> bool) {
        self.stats.held.fetch_add(1, Ordering::Relaxed);
        self.poked.store(0, Ordering::SeqCst);
        self.holding.store(true, Ordering::SeqCst);
        if offer() {
            self.holding.store(false, Ordering::SeqCst);
            return;
        }
        if !stop.load(Ordering::SeqCst) {
            futex_wait(&self.poked, 0, HOLD_RECHECK);
        }
        // Still holding: the caller offers the frame again.
    }

    /// Our Guest may have freed buffers (it halted, or bound more): a
    /// receiver holding a frame for it offers it again now. Costs nothing
    /// when none is held.
    pub fn poke(&self) {
        if self.holding.load(Ordering::SeqCst) {
            self.poked.store(1, Ordering::SeqCst);
            futex_wake(&self.poked);
        }
    }

    /// Clears our ring's lock if it has stayed held, with the ring
    /// unchanged, since the last look at least IDLE_RECHECK ago: no live
    /// sender holds it that long, so it is garbage or a stopped process.
    fn unstick_ring(&self, (lock, tail, when): (u32, u64, Instant)) -> (u32, u64, Instant) {
        let base = slot_base(self.slot);
        let word = self.u32_at(base + RING_LOCK);
        let now = (
            word.load(Ordering::Acquire),
            self.u64_at(base + TAIL).load(Ordering::Acquire),
        );
        if now.0 == 0 || now != (lock, tail) {
            return (now.0, now.1, Instant::now());
        }
        if when.elapsed() >= IDLE_RECHECK {
            let _ = word.compare_exchange(lock, 0, Ordering::AcqRel, Ordering::Relaxed);
            self.stats.garbled.fetch_add(1, Ordering::Relaxed);
            return (0, tail, Instant::now());
        }
        (lock, tail, when)
    }

    /// Takes what is on our ring now, on the caller's thread, as the
    /// receiver's thread does: each record's frame goes to `deliver`, until
    /// one finds no room. Returns that one, `(key offset, frame)`, which a
    /// receiver would hold. For tests and fuzzing; a Launcher calls
    /// [`SharedNet::receive`].
    pub fn drain_now(
        &self,
        mut deliver: impl FnMut(u64, &[u8]) -> Offer,
    ) -> Option<(u64, Vec<u8>)> {
        let mut frame = vec![0u8; FRAME_MAX];
        let mut held = None;
        self.drain(&mut frame, &mut deliver, &mut held);
        held.map(|(offset, len)| (offset, frame[..len].to_vec()))
    }

    /// Takes every record off our ring, until one finds no room (it is then
    /// `held`); false if there was none.
    fn drain(
        &self,
        frame: &mut [u8],
        deliver: &mut impl FnMut(u64, &[u8]) -> Offer,
        held: &mut Option<(u64, usize)>,
    ) -> bool {
        let base = slot_base(self.slot);
        let ring = base + PAGE_SIZE;
        let head_word = self.u64_at(base + HEAD);
        let tail_word = self.u64_at(base + TAIL);
        let mut head = head_word.load(Ordering::Relaxed);
        let tail = tail_word.load(Ordering::Acquire);
        let sane = |head: u64| {
            tail.wrapping_sub(head) <= RING_BYTES
                && head.is_multiple_of(8)
                && tail.is_multiple_of(8)
        };
        if !sane(head) {
            return self.recover_ring();
        }
        if head == tail {
            return false;
        }
        while head != tail {
            let used = tail.wrapping_sub(head);
            if !sane(head) {
                return self.recover_ring();
            }
            let pos = head % RING_BYTES;
            let to_end = RING_BYTES - pos;
            let mut header = [0u8; RECORD_HEADER as usize];
            self.read_bytes(ring + pos, &mut header);
            let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
            let offset = u32::from_le_bytes(header[4..].try_into().expect("4 bytes")) as u64;
            if len == WRAP {
                if to_end > used {
                    return self.recover_ring();
                }
                head = head.wrapping_add(to_end);
                continue;
            }
            let need = RECORD_HEADER + pad8(len as u64);
            if len as usize > FRAME_MAX || need > to_end || need > used {
                return self.recover_ring();
            }
            let frame = &mut frame[..len as usize];
            self.read_bytes(ring + pos + RECORD_HEADER, frame);
            head = head.wrapping_add(need);
            // Room for the senders before we copy into the Guest.
            head_word.store(head, Ordering::Release);
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            if offset < PAGE_SIZE
                && offset.is_multiple_of(LGUEST_NET_KEY_STRIDE)
                && deliver(offset, frame) == Offer::NoRoom
            {
                *held = Some((offset, len as usize));
                return true;
            }
        }
        head_word.store(head, Ordering::Release);
        true
    }
}

impl SharedNet {
    /// Our ring made no sense (someone wrote over the FILE): drop what it
    /// held and start it again, empty. False if we could not, for now: the
    /// receiver then sleeps before it looks again, rather than spin.
    fn recover_ring(&self) -> bool {
        self.stats.garbled.fetch_add(1, Ordering::Relaxed);
        let base = slot_base(self.slot);
        let have = {
            let _one_sender = self.sending.lock().unwrap_or_else(|e| e.into_inner());
            self.lock_ring(self.slot)
        };
        if have {
            self.u64_at(base + TAIL).store(0, Ordering::SeqCst);
            self.u64_at(base + HEAD).store(0, Ordering::SeqCst);
            self.unlock_ring(self.slot);
        }
        have
    }
}

impl Drop for SharedNet {
    fn drop(&mut self) {
        // Leave the slot clean for the next Launcher; the lock goes when
        // the file and its mapping close.
        self.reset_slot(self.slot, false);
    }
}

/// The thread taking frames off our ring; stopped and joined when dropped.
pub struct Receiver {
    net: Arc<SharedNet>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Senders stop queueing for a Guest that is not there.
        self.net.publish_keys(&[]);
        self.stop.store(true, Ordering::SeqCst);
        let waiting = self.net.u32_at(slot_base(self.net.slot) + WAITING);
        waiting.store(0, Ordering::SeqCst);
        futex_wake(waiting);
        self.net.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.net.attached.store(false, Ordering::SeqCst);
    }
}
