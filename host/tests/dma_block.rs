//! The 2007 block device (ABI section 9): the block page protocol, served
//! by the disk's own thread, over a Guest memory of plain bytes and a real
//! disk file. No KVM needed.

use lguest::devices::block::Disk;
use lguest::dma::console::ConsoleConfig;
use lguest::dma::harness::{Logged, RecordingRam, SignalLog};
use lguest::dma::{Backends, Dma};
use lguest_abi::{dma_off, LguestDma};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zerocopy::IntoBytes;

const MEM: u64 = 0x20000;
/// Two disks: read-write, then read-only.
const PAGE: u64 = MEM + 0x1000;
const RO_PAGE: u64 = MEM + 0x2000;
const SECTORS: u64 = 64;
/// The answer buffer: one lguest_dma of two 4 KiB sections, bound at the
/// page's key with IRQ 3.
const ANSWER: u64 = 0x1000;
const IRQ: u32 = 3;
/// The request's own lguest_dma and data.
const REQUEST: u64 = 0x2000;
const DATA: u64 = 0x8000;

struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pattern() -> Vec<u8> {
    (0..SECTORS as usize * 512)
        .map(|i| (i * 7 / 512) as u8 ^ i as u8)
        .collect()
}

struct Setup {
    ram: Arc<RecordingRam>,
    signals: Arc<SignalLog>,
    dma: Dma,
    file: Scratch,
    _ro: Scratch,
}

fn setup(tag: &str) -> Setup {
    let dir = std::env::temp_dir();
    let id = format!("{}-{tag}", std::process::id());
    let file = Scratch(dir.join(format!("lguest-dmablk-{id}.img")));
    let ro = Scratch(dir.join(format!("lguest-dmablk-{id}-ro.img")));
    std::fs::write(&file.0, pattern()).unwrap();
    std::fs::write(&ro.0, pattern()).unwrap();
    let ram = Arc::new(RecordingRam::new(MEM, MEM + 3 * 0x1000));
    let signals = SignalLog::new();
    let backends = Backends {
        console: ConsoleConfig {
            input: None,
            output: Arc::new(Mutex::new(std::io::sink())),
            raw_terminal: false,
        },
        disks: vec![
            Arc::new(Disk::open(file.0.to_str().unwrap()).unwrap()),
            Arc::new(Disk::open(&format!("{},ro", ro.0.display())).unwrap()),
        ],
        nets: vec![],
    };
    let dma = Dma::new(ram.clone(), &backends, signals.clone()).unwrap();
    Setup {
        ram,
        signals,
        dma,
        file,
        _ro: ro,
    }
}

fn put_dma(ram: &RecordingRam, at: u64, sections: &[(u64, u16)], used_len: u32) {
    let mut d = LguestDma {
        used_len,
        ..Default::default()
    };
    for (i, &(addr, len)) in sections.iter().enumerate() {
        d.addr[i] = addr;
        d.len[i] = len;
    }
    ram.guest_write(at, d.as_bytes());
}

impl Setup {
    fn bind_answer(&self, page: u64) {
        put_dma(&self.ram, ANSWER, &[(0x4000, 4096), (0x5000, 4096)], 0);
        assert_eq!(self.dma.bind_dma(page, ANSWER, 1 << 8 | IRQ as u64), Ok(1));
    }

    /// Fills the block page, sends to its key, and waits for the IRQ that
    /// says it is done. Returns (the sender's used_len, result).
    fn request(
        &self,
        page: u64,
        type_: u32,
        sector: u32,
        bytes: u32,
        data: &[(u64, u16)],
    ) -> (u32, u32) {
        for (off, v) in [
            (dma_off::BLOCK_TYPE, type_),
            (dma_off::BLOCK_SECTOR, sector),
            (dma_off::BLOCK_BYTES, bytes),
            (dma_off::BLOCK_RESULT, 0),
        ] {
            self.ram.guest_write_u32(page + off as u64, v);
        }
        put_dma(&self.ram, REQUEST, data, 0xdead);
        let before = self.signals.seen().irqs.len();
        let sent = self.dma.send_dma(page, REQUEST).unwrap();
        assert_eq!(sent.raise, None, "the disk's thread raises the IRQ");
        assert_eq!(self.ram.guest_read_u32(REQUEST), sent.used_len);
        let seen: Logged = self
            .signals
            .wait(Duration::from_secs(10), |s| s.irqs.len() > before);
        assert_eq!(
            seen.irqs[before..],
            [IRQ],
            "one IRQ per request, the answer binding's"
        );
        (
            sent.used_len,
            self.ram.guest_read_u32(page + dma_off::BLOCK_RESULT as u64),
        )
    }
}

#[test]
fn num_sectors_is_set_before_the_guest_starts() {
    let s = setup("nsec");
    let n = |page: u64| {
        s.ram
            .guest_read_u32(page + dma_off::BLOCK_NUM_SECTORS as u64)
    };
    assert_eq!((n(PAGE), n(RO_PAGE)), (SECTORS as u32, SECTORS as u32));
}

#[test]
fn reads_land_in_the_answer_buffer() {
    let s = setup("read");
    s.bind_answer(PAGE);
    let (used, result) = s.request(PAGE, 0, 3, 5 * 512, &[]);
    assert_eq!((used, result), (0, 1), "a read takes no bytes; done");
    assert_eq!(s.ram.guest_read_u32(ANSWER), 5 * 512, "used_len = bytes");
    let mut got = s.ram.guest_read(0x4000, 4096);
    got.extend(s.ram.guest_read(0x5000, 4096));
    assert_eq!(got[..5 * 512], pattern()[3 * 512..8 * 512]);
    assert_eq!(
        got[5 * 512..],
        vec![0; 8192 - 5 * 512],
        "nothing past bytes"
    );
    // The whole answer buffer, the last sectors of the disk.
    s.ram.guest_write_u32(ANSWER, 0);
    let (_, result) = s.request(PAGE, 0, SECTORS as u32 - 16, 8192, &[]);
    assert_eq!(result, 1);
    let mut got = s.ram.guest_read(0x4000, 4096);
    got.extend(s.ram.guest_read(0x5000, 4096));
    assert_eq!(got, pattern()[(SECTORS as usize - 16) * 512..]);
}

#[test]
fn writes_reach_the_file() {
    let s = setup("write");
    s.bind_answer(PAGE);
    let mut sector = vec![0u8; 512];
    for (i, b) in sector.iter_mut().enumerate() {
        *b = 0xA0 ^ i as u8;
    }
    s.ram.guest_write(DATA, &sector[..300]);
    s.ram.guest_write(DATA + 0x1000, &sector[300..]);
    let (used, result) = s.request(PAGE, 1, 9, 512, &[(DATA, 300), (DATA + 0x1000, 212)]);
    assert_eq!(
        (used, result),
        (512, 1),
        "the sender's used_len: bytes written"
    );
    let file = std::fs::read(&s.file.0).unwrap();
    let mut want = pattern();
    want[9 * 512..10 * 512].copy_from_slice(&sector);
    assert!(
        file == want,
        "the sector written, and no other byte changed"
    );
    assert_eq!(
        s.ram.guest_read_u32(ANSWER),
        0,
        "a write leaves the answer buffer free"
    );
}

/// What is wrong, page, type, sector, bytes, data sections.
type Case<'a> = (&'a str, u64, u32, u32, u32, &'a [(u64, u16)]);

#[test]
fn bad_requests_get_result_2_and_an_irq() {
    let s = setup("errors");
    s.bind_answer(PAGE);
    s.bind_answer_ro();
    s.ram.guest_write(DATA, &[0x55; 1024]);
    let data = [(DATA, 1024u16)];
    let before = std::fs::read(&s.file.0).unwrap();
    let cases: [Case; 8] = [
        ("not whole sectors", PAGE, 0, 0, 100, &[]),
        (
            "a read past the end",
            PAGE,
            0,
            SECTORS as u32 - 1,
            1024,
            &[],
        ),
        (
            "a write past the end",
            PAGE,
            1,
            SECTORS as u32 - 1,
            1024,
            &data,
        ),
        ("a sector number past the end", PAGE, 0, u32::MAX, 512, &[]),
        (
            "more than the answer buffer holds",
            PAGE,
            0,
            0,
            8192 + 512,
            &[],
        ),
        ("a write to a read-only disk", RO_PAGE, 1, 0, 1024, &data),
        ("data shorter than bytes", PAGE, 1, 0, 1536, &data),
        ("an unknown type", PAGE, 7, 0, 512, &[]),
    ];
    for (what, page, type_, sector, bytes, data) in cases {
        let (used, result) = s.request(page, type_, sector, bytes, data);
        assert_eq!((used, result), (0, 2), "{what}");
    }
    assert!(
        std::fs::read(&s.file.0).unwrap() == before,
        "no byte of the disk changed"
    );
    // An answer buffer the Guest has not freed can't take a read.
    s.ram.guest_write_u32(ANSWER, 1);
    assert_eq!(s.request(PAGE, 0, 0, 512, &[]), (0, 2));
    s.ram.guest_write_u32(ANSWER, 0);
    assert_eq!(s.request(PAGE, 0, 0, 512, &[]), (0, 1));
    // The read-only disk reads.
    assert_eq!(s.request(RO_PAGE, 0, 1, 512, &[]).1, 1);
}

#[test]
fn other_keys_in_the_page_take_nothing() {
    let s = setup("otherkey");
    s.bind_answer(PAGE);
    put_dma(&s.ram, REQUEST, &[(DATA, 512)], 0xdead);
    let sent = s.dma.send_dma(PAGE + 4, REQUEST).unwrap();
    assert_eq!(sent.used_len, 0);
    assert_eq!(s.ram.guest_read_u32(REQUEST), 0);
    std::thread::sleep(Duration::from_millis(50));
    assert!(s.signals.seen().irqs.is_empty());
}

impl Setup {
    fn bind_answer_ro(&self) {
        put_dma(&self.ram, ANSWER + 0x200, &[(0x6000, 4096)], 0);
        assert_eq!(
            self.dma
                .bind_dma(RO_PAGE, ANSWER + 0x200, 1 << 8 | IRQ as u64),
            Ok(1)
        );
    }
}
