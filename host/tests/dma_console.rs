//! The console of the 2007 model: input into buffers bound at key 0 (none
//! lost while the Guest has no free buffer), end of input, Ctrl-C. Input
//! comes through a pipe; the Guest is a memory of plain bytes. No KVM.

use lguest::dma::console::ConsoleConfig;
use lguest::dma::harness::{RecordingRam, SignalLog};
use lguest::dma::{Backends, Dma};
use lguest_abi::LguestDma;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zerocopy::IntoBytes;

const MEM: u64 = 0x10000;
const ARRAY: u64 = 0x1000;
const BUF: u64 = 0x4000;
const IRQ: u64 = 9;
const LIMIT: Duration = Duration::from_secs(10);

struct Console {
    ram: Arc<RecordingRam>,
    signals: Arc<SignalLog>,
    dma: Dma,
    input: Option<std::io::PipeWriter>,
}

fn console(raw_terminal: bool) -> Console {
    let (reader, writer) = std::io::pipe().unwrap();
    let ram = Arc::new(RecordingRam::new(MEM, MEM + 0x1000));
    let signals = SignalLog::new();
    let backends = Backends {
        console: ConsoleConfig {
            input: Some(Arc::new(OwnedFd::from(reader))),
            output: Arc::new(Mutex::new(std::io::sink())),
            raw_terminal,
        },
        disks: vec![],
        nets: vec![],
    };
    let dma = Dma::new(ram.clone(), &backends, signals.clone()).unwrap();
    Console {
        ram,
        signals,
        dma,
        input: Some(writer),
    }
}

impl Console {
    /// Binds one buffer of `len` bytes at key 0.
    fn bind(&self, len: u16) {
        let mut d = LguestDma::default();
        d.addr[0] = BUF;
        d.len[0] = len;
        self.ram.guest_write(ARRAY, d.as_bytes());
        assert_eq!(self.dma.bind_dma(0, ARRAY, 1 << 8 | IRQ), Ok(1));
    }

    fn type_in(&mut self, bytes: &[u8]) {
        self.input.as_mut().unwrap().write_all(bytes).unwrap();
    }

    /// Waits for the `n`th IRQ, then reads the buffer and frees it, as the
    /// Guest's console driver does (no hypercall), and pokes, as the
    /// Launcher does when the Guest halts.
    fn take(&self, n: usize) -> Vec<u8> {
        let seen = self.signals.wait(LIMIT, |s| s.irqs.len() >= n);
        assert_eq!(seen.irqs.len(), n, "IRQ {n} came");
        assert!(seen.irqs.iter().all(|&i| i == IRQ as u32));
        let used = self.ram.guest_read_u32(ARRAY);
        let got = self.ram.guest_read(BUF, used as usize);
        self.ram.guest_write_u32(ARRAY, 0);
        self.dma.poke();
        got
    }
}

#[test]
fn input_waits_for_a_buffer_and_none_is_lost() {
    let mut c = console(false);
    // More than the Launcher holds at once, typed before the Guest has any
    // buffer at all.
    let text: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let writer = {
        let mut w = c.input.take().unwrap();
        let text = text.clone();
        std::thread::spawn(move || {
            w.write_all(&text).unwrap();
            w // kept open: this test is not about the end of input
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    assert!(c.signals.seen().irqs.is_empty(), "no buffer, no IRQ");
    c.bind(1000);
    let mut got = Vec::new();
    let mut n = 0;
    while got.len() < text.len() {
        n += 1;
        let chunk = c.take(n);
        assert!(!chunk.is_empty() && chunk.len() <= 1000);
        got.extend(chunk);
    }
    assert!(got == text, "every byte, in order");
    let still_open = writer.join().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(c.signals.seen().end_of_input, 0, "the pipe is still open");
    drop(still_open);
    assert_eq!(
        c.signals.wait(LIMIT, |s| s.end_of_input > 0).end_of_input,
        1
    );
}

#[test]
fn end_of_input_comes_when_the_guest_has_taken_everything() {
    let mut c = console(false);
    c.bind(64);
    c.type_in(b"last line\n");
    c.input = None; // end of input
    let seen = c.signals.wait(LIMIT, |s| !s.irqs.is_empty());
    assert_eq!(seen.irqs, vec![IRQ as u32]);
    // The Guest has not read it yet: not the end for it.
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(c.signals.seen().end_of_input, 0);
    assert_eq!(c.take(1), b"last line\n");
    let seen = c
        .signals
        .wait(LIMIT, |s| s.end_of_input > 0 && s.irqs.len() > 1);
    assert_eq!(seen.end_of_input, 1);
    assert_eq!(
        seen.irqs,
        vec![IRQ as u32, IRQ as u32],
        "the console's IRQ once more, to wake a Guest asleep waiting for input"
    );
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(c.signals.seen().end_of_input, 1, "once");
    assert_eq!(c.signals.seen().irqs.len(), 2);
}

#[test]
fn a_guest_that_never_reads_its_console_never_hears_of_the_end() {
    let mut c = console(false);
    c.type_in(b"ignored");
    c.input = None;
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(c.signals.seen().end_of_input, 0);
    // Once it binds, it gets what was typed, then the end.
    c.bind(64);
    assert_eq!(c.take(1), b"ignored");
    assert_eq!(
        c.signals.wait(LIMIT, |s| s.end_of_input > 0).end_of_input,
        1
    );
}

#[test]
fn three_ctrl_c_end_the_guest_on_a_raw_terminal() {
    let mut c = console(true);
    c.type_in(b"\x03x\x03y\x03");
    let seen = c.signals.wait(LIMIT, |s| !s.kills.is_empty());
    assert_eq!(
        seen.kills,
        vec!["ended by the user (three Ctrl-C)".to_string()]
    );
    // Not raw: Ctrl-C is a byte like any other.
    let mut c = console(false);
    c.bind(64);
    c.type_in(b"\x03\x03\x03");
    assert_eq!(c.take(1), b"\x03\x03\x03");
    assert!(c.signals.seen().kills.is_empty());
}
