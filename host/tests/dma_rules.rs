//! ABI section 9's rules for BIND_DMA, SEND_DMA and delivery, each one
//! broken on purpose over a Guest memory of plain bytes that records every
//! write the Host makes. No KVM needed.

use lguest::dma::bindings::{Bindings, DMA_SIZE};
use lguest::dma::console::ConsoleConfig;
use lguest::dma::harness::{RecordingRam, SignalLog};
use lguest::dma::net::FramePort;
use lguest::dma::{
    Backends, Call, DeviceTable, Dma, DmaError, GuestRam, KeyOwner, Misplaced, NetBackend,
};
use lguest_abi::{dma_off, LguestDma, PAGE_SIZE};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zerocopy::IntoBytes;

/// 64 KiB of RAM; the table at MEM, one disk's page, one network's page,
/// then the Host's pages.
const MEM: u64 = 0x10000;
const BLOCK_PAGE: u64 = MEM + 0x1000;
const NET_PAGE: u64 = MEM + 0x2000;
const HOST: u64 = MEM + 0x3000;

fn table() -> DeviceTable {
    DeviceTable::new(MEM, &[8], &[1]).unwrap()
}

fn ram() -> RecordingRam {
    RecordingRam::new(MEM, HOST)
}

/// Writes an lguest_dma with these sections at `at`, as the Guest would.
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

fn bind(
    b: &mut Bindings,
    ram: &RecordingRam,
    key: u64,
    array: u64,
    count: u64,
    irq: u64,
) -> Result<u64, DmaError> {
    b.bind(ram, &table(), key, array, count << 8 | irq)
}

#[test]
fn keys_are_zero_or_aligned_inside_a_device_page() {
    let t = table();
    assert_eq!(t.key_owner(Call::Send, 0), Ok(KeyOwner::Console));
    assert_eq!(
        t.key_owner(Call::Send, BLOCK_PAGE),
        Ok(KeyOwner::Block {
            index: 0,
            offset: 0
        })
    );
    assert_eq!(
        t.key_owner(Call::Bind, NET_PAGE + 4 * 7),
        Ok(KeyOwner::Net {
            index: 0,
            offset: 28
        })
    );
    assert_eq!(
        t.key_owner(Call::Bind, NET_PAGE + 0xFFC),
        Ok(KeyOwner::Net {
            index: 0,
            offset: 0xFFC
        })
    );
    for key in [4, 0x1000, MEM - 4, MEM, MEM + 8, HOST, HOST + 4, !3] {
        assert_eq!(
            t.key_owner(Call::Send, key),
            Err(DmaError::KeyOutsideDevicePages {
                call: Call::Send,
                key
            }),
            "key {key:#x}"
        );
    }
    for key in [BLOCK_PAGE + 2, NET_PAGE + 1, NET_PAGE + 0xFFF] {
        assert_eq!(
            t.key_owner(Call::Bind, key),
            Err(DmaError::KeyUnaligned {
                call: Call::Bind,
                key
            }),
            "key {key:#x}"
        );
    }
    let e = t.key_owner(Call::Bind, MEM).unwrap_err().to_string();
    assert_eq!(
        e,
        "BIND_DMA: key 0x10000 is neither 0 (the console) nor inside a block or net device page"
    );
    let e = t
        .key_owner(Call::Send, NET_PAGE + 2)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "SEND_DMA: key 0x12002 is not 4-byte aligned");
}

#[test]
fn bind_refuses_bad_keys_counts_and_irqs() {
    let ram = ram();
    put_dma(&ram, 0x1000, &[(0x2000, 100)], 0);
    let mut b = Bindings::new();
    assert_eq!(
        bind(&mut b, &ram, MEM, 0x1000, 1, 1),
        Err(DmaError::KeyOutsideDevicePages {
            call: Call::Bind,
            key: MEM
        })
    );
    assert_eq!(
        bind(&mut b, &ram, NET_PAGE + 6, 0x1000, 1, 1),
        Err(DmaError::KeyUnaligned {
            call: Call::Bind,
            key: NET_PAGE + 6
        })
    );
    assert_eq!(
        bind(&mut b, &ram, 0, 0x1000, 0, 1),
        Err(DmaError::BadCount { count: 0 })
    );
    assert_eq!(
        bind(&mut b, &ram, 0, 0x1000, 17, 1),
        Err(DmaError::BadCount { count: 17 })
    );
    assert_eq!(
        b.bind(&ram, &table(), 0, 0x1000, 1 << 40 | 1),
        Err(DmaError::BadCount { count: 1 << 32 })
    );
    assert_eq!(
        bind(&mut b, &ram, 0, 0x1000, 1, 32),
        Err(DmaError::BadIrq { irq: 32 })
    );
    assert_eq!(
        bind(&mut b, &ram, 0, 0x1000, 1, 255),
        Err(DmaError::BadIrq { irq: 255 })
    );
    assert!(b.list().is_empty(), "nothing bound by a refused call");
    assert_eq!(bind(&mut b, &ram, 0, 0x1000, 1, 31), Ok(1));
    assert_eq!(
        DmaError::BadCount { count: 0 }.to_string(),
        "BIND_DMA: count 0 (an array holds 1 to 16 lguest_dma)"
    );
    assert_eq!(
        DmaError::BadIrq { irq: 32 }.to_string(),
        "BIND_DMA: IRQ 32 is over 31"
    );
    assert!(ram.take_writes().is_empty(), "binding writes nothing");
}

#[test]
fn sixteen_entries_bind_and_all_are_checked() {
    let ram = ram();
    for i in 0..16 {
        put_dma(&ram, 0x1000 + i * DMA_SIZE, &[(0x4000 + i * 16, 16)], 0);
    }
    let mut b = Bindings::new();
    assert_eq!(bind(&mut b, &ram, BLOCK_PAGE, 0x1000, 16, 3), Ok(1));
    // The last entry of a second array breaks a rule: the whole call fails.
    for i in 0..16 {
        put_dma(&ram, 0x3000 + i * DMA_SIZE, &[(0x4000, 16)], 0);
    }
    let last = 0x3000 + 15 * DMA_SIZE;
    put_dma(&ram, last, &[(0x4000, 16), (MEM, 16)], 0);
    assert_eq!(
        bind(&mut b, &ram, BLOCK_PAGE, 0x3000, 16, 3),
        Err(DmaError::BadSection {
            call: Call::Bind,
            dma: last,
            index: 1,
            addr: MEM,
            len: 16,
            place: Misplaced::OutsideRam
        })
    );
    assert_eq!(b.list().len(), 1);
}

#[test]
fn the_33rd_live_binding_ends_the_guest_and_unbinding_makes_room() {
    let ram = ram();
    put_dma(&ram, 0x1000, &[(0x2000, 8)], 0);
    let mut b = Bindings::new();
    for i in 0..32 {
        assert_eq!(bind(&mut b, &ram, NET_PAGE + 4 * i, 0x1000, 1, 1), Ok(1));
    }
    assert_eq!(
        bind(&mut b, &ram, 0, 0x1000, 1, 1),
        Err(DmaError::TooManyBindings)
    );
    assert_eq!(
        DmaError::TooManyBindings.to_string(),
        "BIND_DMA: a 33rd live binding (at most 32)"
    );
    // irq 0 unbinds the array at that key and address; count is not looked
    // at (a 2007 Guest passes 0).
    assert_eq!(bind(&mut b, &ram, NET_PAGE + 8, 0x1000, 0, 0), Ok(1));
    assert_eq!(
        bind(&mut b, &ram, NET_PAGE + 8, 0x1000, 0, 0),
        Ok(0),
        "already gone"
    );
    assert_eq!(
        bind(&mut b, &ram, NET_PAGE + 12, 0x2000, 0, 0),
        Ok(0),
        "another array"
    );
    assert_eq!(
        bind(&mut b, &ram, 0, 0x1000, 1, 1),
        Ok(1),
        "room for one more"
    );
    assert_eq!(
        bind(&mut b, &ram, 0, 0x1000, 1, 1),
        Err(DmaError::TooManyBindings)
    );
    // Unbinding still checks the key.
    assert_eq!(
        bind(&mut b, &ram, 3, 0x1000, 0, 0),
        Err(DmaError::KeyOutsideDevicePages {
            call: Call::Bind,
            key: 3
        })
    );
}

#[test]
fn an_lguest_dma_must_lie_in_ram_within_one_page() {
    let ram = ram();
    let mut b = Bindings::new();
    let cases = [
        // Runs past the end of RAM into the table page.
        (MEM - 100, Misplaced::OutsideRam),
        // In a device page.
        (BLOCK_PAGE + 16, Misplaced::OutsideRam),
        // In the Host's pages, or past everything.
        (HOST, Misplaced::InHostPage),
        (u64::MAX - 8, Misplaced::InHostPage),
        // Across a page boundary inside RAM.
        (0x2000 - 100, Misplaced::CrossesPage),
    ];
    for (addr, place) in cases {
        let want = DmaError::BadDma {
            call: Call::Bind,
            addr,
            place,
        };
        assert_eq!(bind(&mut b, &ram, 0, addr, 1, 1), Err(want), "{addr:#x}");
    }
    // The second entry of an array crosses the page: found at BIND.
    let array = 0x2000 - 2 * DMA_SIZE + 8;
    put_dma(&ram, array, &[(0x5000, 10)], 0);
    assert_eq!(
        bind(&mut b, &ram, 0, array, 2, 1),
        Err(DmaError::BadDma {
            call: Call::Bind,
            addr: array + DMA_SIZE,
            place: Misplaced::CrossesPage
        })
    );
    assert_eq!(
        DmaError::BadDma {
            call: Call::Send,
            addr: 0x1f68,
            place: Misplaced::CrossesPage
        }
        .to_string(),
        "SEND_DMA: the lguest_dma at 0x1f68 is crossing a page boundary"
    );
    assert_eq!(
        DmaError::BadDma {
            call: Call::Bind,
            addr: HOST,
            place: Misplaced::InHostPage
        }
        .to_string(),
        "BIND_DMA: the lguest_dma at 0x13000 is in a Host page"
    );
}

#[test]
fn sections_must_lie_in_ram_within_one_page() {
    let ram = ram();
    let mut b = Bindings::new();
    let cases = [
        (MEM - 10, 20, Misplaced::OutsideRam),
        (NET_PAGE, 4, Misplaced::OutsideRam),
        (HOST + 8, 4, Misplaced::InHostPage),
        (0x4ff0, 0x20, Misplaced::CrossesPage),
        (0x5000, 4097, Misplaced::CrossesPage),
        (0x5000, 0x3000, Misplaced::CrossesPage),
        (0x5000, u16::MAX, Misplaced::OutsideRam),
    ];
    for (addr, len, place) in cases {
        put_dma(&ram, 0x1000, &[(0x6000, 64), (addr, len)], 0);
        assert_eq!(
            bind(&mut b, &ram, 0, 0x1000, 1, 1),
            Err(DmaError::BadSection {
                call: Call::Bind,
                dma: 0x1000,
                index: 1,
                addr,
                len,
                place
            }),
            "{addr:#x}+{len}"
        );
    }
    // A section may end exactly at a page boundary, and at the end of RAM.
    put_dma(
        &ram,
        0x1000,
        &[(0x4f00, 0x100), (0x5000, 4096), (MEM - 8, 8)],
        0,
    );
    assert_eq!(bind(&mut b, &ram, 0, 0x1000, 1, 1), Ok(1));
    // A length of 0 ends the list: what follows it is not looked at.
    put_dma(&ram, 0x1200, &[(0x6000, 8), (0, 0), (HOST, 8)], 0);
    assert_eq!(bind(&mut b, &ram, 0, 0x1200, 1, 2), Ok(1));
    let e = DmaError::BadSection {
        call: Call::Deliver { key: 0 },
        dma: 0x1000,
        index: 1,
        addr: 0x4ff0,
        len: 32,
        place: Misplaced::CrossesPage,
    };
    assert_eq!(
        e.to_string(),
        "DMA into a buffer bound at key 0x0: section 1 (32 bytes at 0x4ff0) of the lguest_dma at 0x1000 is crossing a page boundary"
    );
}

#[test]
fn delivery_fills_the_first_free_buffer_in_binding_then_array_order() {
    let ram = ram();
    let mut b = Bindings::new();
    let key = NET_PAGE + 4;
    // Array A: two entries; array B: one; bound in that order, B at
    // another IRQ. A third array at another key must never be touched.
    put_dma(&ram, 0x1000, &[(0x4000, 4), (0x4100, 4)], 0);
    put_dma(&ram, 0x1000 + DMA_SIZE, &[(0x4200, 16)], 0);
    put_dma(&ram, 0x1400, &[(0x4300, 16)], 0);
    put_dma(&ram, 0x1800, &[(0x4400, 16)], 0);
    assert_eq!(bind(&mut b, &ram, key, 0x1000, 2, 5), Ok(1));
    assert_eq!(bind(&mut b, &ram, key, 0x1400, 1, 6), Ok(1));
    assert_eq!(bind(&mut b, &ram, NET_PAGE + 8, 0x1800, 1, 7), Ok(1));
    ram.take_writes();

    // As many bytes as fit, across sections; used_len set; A's IRQ.
    let d = b.deliver(&ram, key, b"0123456789").unwrap().unwrap();
    assert_eq!((d.bytes, d.irq, d.dma), (8, 5, 0x1000));
    assert_eq!(ram.guest_read(0x4000, 4), b"0123");
    assert_eq!(ram.guest_read(0x4100, 4), b"4567");
    assert_eq!(ram.guest_read_u32(0x1000), 8);
    assert_eq!(
        ram.take_writes(),
        vec![(0x4000, 4), (0x4100, 4), (0x1000, 4)],
        "the sections, then used_len, and nothing else"
    );
    // Next: A's second entry, then B.
    let d = b.deliver(&ram, key, b"abc").unwrap().unwrap();
    assert_eq!((d.bytes, d.irq, d.dma), (3, 5, 0x1000 + DMA_SIZE));
    let d = b.deliver(&ram, key, b"xyz").unwrap().unwrap();
    assert_eq!((d.bytes, d.irq, d.dma), (3, 6, 0x1400));
    // All full: dropped, nothing written.
    ram.take_writes();
    assert_eq!(b.deliver(&ram, key, b"lost").unwrap(), None);
    assert!(ram.take_writes().is_empty());
    // The Guest frees A's first entry (used_len 0): it is first again.
    ram.guest_write_u32(0x1000, 0);
    let d = b.deliver(&ram, key, b"again").unwrap().unwrap();
    assert_eq!((d.bytes, d.dma), (5, 0x1000));
    assert_eq!(ram.guest_read(0x4400, 16), [0; 16], "another key's buffer");
}

#[test]
fn bound_arrays_are_read_again_and_checked_again_at_every_delivery() {
    let ram = ram();
    let mut b = Bindings::new();
    put_dma(&ram, 0x1000, &[(0x4000, 8)], 0);
    assert_eq!(bind(&mut b, &ram, 0, 0x1000, 1, 1), Ok(1));
    // The Guest moves its buffer after BIND_DMA: the bytes follow it.
    put_dma(&ram, 0x1000, &[(0x7000, 8)], 0);
    assert_eq!(b.deliver(&ram, 0, b"moved").unwrap().unwrap().bytes, 5);
    assert_eq!(ram.guest_read(0x7000, 5), b"moved");
    assert_eq!(ram.guest_read(0x4000, 5), [0; 5]);
    // ...and if it moves it somewhere it may not, the Guest ends, and
    // nothing is written.
    for (addr, len, place) in [
        (HOST, 8, Misplaced::InHostPage),
        (BLOCK_PAGE, 8, Misplaced::OutsideRam),
        (0x7ffc, 8, Misplaced::CrossesPage),
    ] {
        put_dma(&ram, 0x1000, &[(addr, len)], 0);
        ram.take_writes();
        assert_eq!(
            b.deliver(&ram, 0, b"x"),
            Err(DmaError::BadSection {
                call: Call::Deliver { key: 0 },
                dma: 0x1000,
                index: 0,
                addr,
                len,
                place
            })
        );
        assert!(ram.take_writes().is_empty());
    }
    // A full buffer's sections are not looked at: it takes nothing anyway.
    put_dma(&ram, 0x1000, &[(HOST, 8)], 3);
    assert_eq!(b.deliver(&ram, 0, b"x"), Ok(None));
}

/// A hub with a console that writes into a buffer, one disk, and a tap
/// network whose slot 0 is a socketpair.
struct Hub {
    ram: Arc<RecordingRam>,
    signals: Arc<SignalLog>,
    output: Arc<Mutex<Vec<u8>>>,
    wire: UnixDatagram,
    dma: Dma,
    _disk: tempfile_lite::TempFile,
}

mod tempfile_lite {
    /// A scratch file, removed when dropped.
    pub struct TempFile(pub std::path::PathBuf);
    impl TempFile {
        pub fn new(tag: &str, bytes: &[u8]) -> TempFile {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path =
                std::env::temp_dir().join(format!("lguest-dma-{tag}-{}-{n}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            TempFile(path)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn hub() -> Hub {
    let ram = Arc::new(ram());
    let signals = SignalLog::new();
    let output = Arc::new(Mutex::new(Vec::new()));
    let disk = tempfile_lite::TempFile::new("rules", &[0u8; 4096]);
    let (ours, wire) = UnixDatagram::pair().unwrap();
    let port: Arc<dyn FramePort> = Arc::new(ours);
    let backends = Backends {
        console: ConsoleConfig {
            input: None,
            output: output.clone(),
            raw_terminal: false,
        },
        disks: vec![Arc::new(
            lguest::devices::block::Disk::open(disk.0.to_str().unwrap()).unwrap(),
        )],
        nets: vec![NetBackend::Tap(port)],
    };
    let dma = Dma::new(ram.clone(), &backends, signals.clone()).unwrap();
    wire.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    Hub {
        ram,
        signals,
        output,
        wire,
        dma,
        _disk: disk,
    }
}

#[test]
fn send_checks_its_dma_and_its_key() {
    let h = hub();
    put_dma(&h.ram, 0x1000, &[(0x2000, 4)], 0);
    assert_eq!(
        h.dma.send_dma(MEM + 4, 0x1000),
        Err(DmaError::KeyOutsideDevicePages {
            call: Call::Send,
            key: MEM + 4
        })
    );
    assert_eq!(
        h.dma.send_dma(BLOCK_PAGE + 1, 0x1000),
        Err(DmaError::KeyUnaligned {
            call: Call::Send,
            key: BLOCK_PAGE + 1
        })
    );
    for (addr, place) in [
        (MEM - 8, Misplaced::OutsideRam),
        (HOST, Misplaced::InHostPage),
        (0x1ff0, Misplaced::CrossesPage),
    ] {
        assert_eq!(
            h.dma.send_dma(0, addr),
            Err(DmaError::BadDma {
                call: Call::Send,
                addr,
                place
            })
        );
    }
    put_dma(&h.ram, 0x1000, &[(0x2000, 4), (0x2ffe, 4)], 0);
    assert_eq!(
        h.dma.send_dma(0, 0x1000),
        Err(DmaError::BadSection {
            call: Call::Send,
            dma: 0x1000,
            index: 1,
            addr: 0x2ffe,
            len: 4,
            place: Misplaced::CrossesPage
        })
    );
    assert!(
        h.output.lock().unwrap().is_empty(),
        "nothing sent by a refused SEND"
    );
    assert_eq!(h.ram.guest_read_u32(0x1000), 0, "nor its used_len written");
}

#[test]
fn send_writes_the_senders_used_len_and_never_delivers_to_itself() {
    let h = hub();
    // The Guest listens at key 0 and at its own net slot's key...
    put_dma(&h.ram, 0x3000, &[(0x5000, 64)], 0);
    put_dma(&h.ram, 0x3400, &[(0x5100, 64)], 0);
    assert_eq!(h.dma.bind_dma(0, 0x3000, 1 << 8 | 1), Ok(1));
    assert_eq!(h.dma.bind_dma(NET_PAGE + 4, 0x3400, 1 << 8 | 2), Ok(1));
    // ...and sends to both: console output goes out, not into its buffer.
    h.ram.guest_write(0x2000, b"hello, console");
    put_dma(&h.ram, 0x1000, &[(0x2000, 5), (0x2007, 7)], 0xdead);
    let sent = h.dma.send_dma(0, 0x1000).unwrap();
    assert_eq!(sent.used_len, 12);
    assert_eq!(h.ram.guest_read_u32(0x1000), 12);
    assert_eq!(&*h.output.lock().unwrap(), b"helloconsole");
    // Its own slot's key on a private network: nobody else is there.
    h.ram.guest_write_u32(0x1000, 0xdead);
    assert_eq!(h.dma.send_dma(NET_PAGE + 4, 0x1000).unwrap().used_len, 0);
    assert_eq!(h.ram.guest_read_u32(0x1000), 0, "0: nobody took them");
    assert_eq!(h.ram.guest_read_u32(0x3000), 0);
    assert_eq!(h.ram.guest_read_u32(0x3400), 0);
    assert!(h.signals.seen().irqs.is_empty());
    // Slot 0's key reaches the tap.
    let sent = h.dma.send_dma(NET_PAGE, 0x1000).unwrap();
    assert_eq!(sent.used_len, 12);
    let mut frame = [0u8; 64];
    let n = h.wire.recv(&mut frame).unwrap();
    assert_eq!(&frame[..n], b"helloconsole");
    // An empty DMA moves nothing.
    put_dma(&h.ram, 0x1000, &[], 7);
    assert_eq!(h.dma.send_dma(0, 0x1000).unwrap().used_len, 0);
    assert_eq!(h.ram.guest_read_u32(0x1000), 0);
}

#[test]
fn a_bad_bound_buffer_found_off_the_vcpu_thread_ends_the_guest() {
    let h = hub();
    // The Guest's MAC in slot 1, buffers bound at its key...
    h.ram.guest_write(NET_PAGE + 6, &[2, 0, 0, 0, 0, 1]);
    put_dma(&h.ram, 0x3000, &[(0x5000, 64)], 0);
    assert_eq!(h.dma.bind_dma(NET_PAGE + 4, 0x3000, 1 << 8 | 4), Ok(1));
    h.wire.send(&[0xff; 20]).unwrap();
    let seen = h
        .signals
        .wait(Duration::from_secs(10), |s| !s.irqs.is_empty());
    assert_eq!(seen.irqs, vec![4]);
    assert_eq!(h.ram.guest_read(0x5000, 20), [0xff; 20]);
    assert_eq!(h.ram.guest_read_u32(0x3000), 20);
    // ...then it points its free buffer at the Host's pages.
    put_dma(&h.ram, 0x3000, &[(HOST, 64)], 0);
    h.ram.take_writes();
    h.wire.send(&[0xff; 20]).unwrap();
    let seen = h
        .signals
        .wait(Duration::from_secs(10), |s| !s.kills.is_empty());
    assert_eq!(
        seen.kills,
        vec![format!(
            "DMA into a buffer bound at key {:#x}: section 0 (64 bytes at {HOST:#x}) of the lguest_dma at 0x3000 is in a Host page",
            NET_PAGE + 4
        )]
    );
    assert!(h.ram.take_writes().is_empty());
}

#[test]
fn the_table_is_laid_out_as_section_9_says() {
    let ram = Arc::new(RecordingRam::new(MEM, MEM + 6 * PAGE_SIZE));
    let t = DeviceTable::new(MEM, &[100, 7], &[3 | 0x4000, 1 | 0x8000]).unwrap();
    assert_eq!(t.pages(), 5);
    ram.guest_write(BLOCK_PAGE, &[0xAA; 4096]);
    t.write(ram.as_ref()).unwrap();
    let entry = |i: u64| {
        let e = ram.guest_read(MEM + 12 * i, 12);
        let h = |o: usize| u16::from_le_bytes([e[o], e[o + 1]]);
        (
            h(0),
            h(2),
            h(4),
            h(6),
            u32::from_le_bytes(e[8..12].try_into().unwrap()),
        )
    };
    let pfn = |page: u64| ((MEM + page * PAGE_SIZE) / PAGE_SIZE) as u32;
    assert_eq!(entry(0), (1, 0, 0, 0, 0), "the console: no pages");
    assert_eq!(entry(1), (3, 0, 0, 1, pfn(1)));
    assert_eq!(entry(2), (3, 0, 0, 1, pfn(2)));
    assert_eq!(entry(3), (2, 3 | 0x4000, 0, 1, pfn(3)));
    assert_eq!(entry(4), (2, 1 | 0x8000, 0, 1, pfn(4)));
    for i in 5..16 {
        assert_eq!(entry(i), (0, 0, 0, 0, 0));
    }
    assert_eq!(ram.guest_read(MEM + 192, 4096 - 192), vec![0; 4096 - 192]);
    // Block pages: zero but for num_sectors.
    let nsec = BLOCK_PAGE + dma_off::BLOCK_NUM_SECTORS as u64;
    assert_eq!(ram.guest_read_u32(nsec), 100);
    assert_eq!(ram.guest_read_u32(nsec + PAGE_SIZE), 7);
    assert_eq!(ram.guest_read(BLOCK_PAGE, 16), [0; 16]);
    assert_eq!(t.block_page(1), Some(MEM + 2 * PAGE_SIZE));
    assert_eq!(
        t.net_pages(),
        vec![MEM + 3 * PAGE_SIZE, MEM + 4 * PAGE_SIZE]
    );
    assert_eq!(
        t.key_owner(Call::Send, MEM + 4 * PAGE_SIZE + 8),
        Ok(KeyOwner::Net {
            index: 1,
            offset: 8
        })
    );
    // Sixteen entries at most, the console's included.
    assert!(DeviceTable::new(MEM, &[1; 10], &[0; 5]).is_ok());
    let e = DeviceTable::new(MEM, &[1; 10], &[0; 6]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the 2007 device model has room for 16 devices, the console included; 17 were asked for"
    );
    assert!(DeviceTable::new(MEM, &[1 << 32], &[]).is_err());
    assert!(DeviceTable::new(MEM + 1, &[], &[]).is_err());
    assert_eq!(ram.ram_size(), MEM);
}
