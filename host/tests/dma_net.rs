//! Networks of the 2007 model: who a frame goes to, and a private network
//! whose slot 0 is a tap (here a socketpair, so no root is needed).

use lguest::dma::console::ConsoleConfig;
use lguest::dma::harness::{RecordingRam, SignalLog};
use lguest::dma::net::{pick_slots, slot_key, FramePort, BRIDGE_MAC, GUEST_SLOT};
use lguest::dma::{Backends, Dma, NetBackend};
use lguest_abi::LguestDma;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zerocopy::IntoBytes;

fn page_with(macs: &[(usize, [u8; 6])]) -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    for &(slot, mac) in macs {
        page[6 * slot..6 * slot + 6].copy_from_slice(&mac);
    }
    page
}

fn frame_to(dest: [u8; 6]) -> Vec<u8> {
    let mut f = dest.to_vec();
    f.extend_from_slice(&[2, 0, 0, 0, 0, 0x99, 0x88, 0xB5]);
    f.extend_from_slice(&[0u8; 50]);
    f
}

const A: [u8; 6] = [2, 0, 0, 0, 0, 0xA];
const B: [u8; 6] = [2, 0, 0, 0, 0, 0xB];
const C: [u8; 6] = [2, 0, 0, 0, 0, 0xC];
/// A promiscuous Guest: bit 0 of byte 0 set in its slot.
const P: [u8; 6] = [3, 0, 0, 0, 0, 0xD];

#[test]
fn the_sender_picks_the_keys() {
    let page = page_with(&[(1, A), (2, B), (4, C), (6, P)]);
    let n = 64;
    assert_eq!(
        pick_slots(&page, &frame_to(B), 1, n),
        vec![2, 6],
        "MAC match, and the promiscuous slot"
    );
    assert_eq!(
        pick_slots(&page, &frame_to(C), 6, n),
        vec![4],
        "a promiscuous sender is not its own receiver"
    );
    assert_eq!(
        pick_slots(&page, &frame_to([0xff; 6]), 1, n),
        vec![2, 4, 6],
        "broadcast: every used slot but the sender's"
    );
    assert_eq!(
        pick_slots(&page, &frame_to([0x33, 0x33, 0, 0, 0, 1]), 4, n),
        vec![1, 2, 6],
        "multicast too"
    );
    assert_eq!(
        pick_slots(&page, &frame_to([2, 0, 0, 0, 0, 0xEE]), 1, n),
        vec![6],
        "nobody's MAC: only the promiscuous"
    );
    assert_eq!(
        pick_slots(&page, &frame_to(A), 1, n),
        vec![6],
        "never back to the sender"
    );
    assert!(
        pick_slots(&page, &[0xff; 5], 1, n).is_empty(),
        "a runt has no destination"
    );
    assert_eq!(
        pick_slots(&page, &frame_to([0xff; 6]), 0, 3),
        vec![1, 2],
        "only the first slots"
    );
    // A page of garbage is still only slots and MACs.
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let picked = pick_slots(&noise, &frame_to([0xff; 6]), 0, 1000);
    assert!(picked.iter().all(|&s| s < 4096 / 6));
}

const MEM: u64 = 0x10000;
const PAGE: u64 = MEM + 0x1000;

struct TapNet {
    ram: Arc<RecordingRam>,
    signals: Arc<SignalLog>,
    dma: Dma,
    wire: UnixDatagram,
}

fn tap_net() -> TapNet {
    let ram = Arc::new(RecordingRam::new(MEM, MEM + 0x2000));
    let signals = SignalLog::new();
    let (ours, wire) = UnixDatagram::pair().unwrap();
    let port: Arc<dyn FramePort> = Arc::new(ours);
    // Leftovers from before a restart: the bridge clears its page.
    ram.guest_write(PAGE, &[0x5a; 64]);
    let backends = Backends {
        console: ConsoleConfig {
            input: None,
            output: Arc::new(Mutex::new(std::io::sink())),
            raw_terminal: false,
        },
        disks: vec![],
        nets: vec![NetBackend::Tap(port)],
    };
    let dma = Dma::new(ram.clone(), &backends, signals.clone()).unwrap();
    wire.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    TapNet {
        ram,
        signals,
        dma,
        wire,
    }
}

#[test]
fn the_tap_network_gives_the_guest_slot_1() {
    let t = tap_net();
    let mut fresh = vec![0; 64];
    fresh[..6].copy_from_slice(&BRIDGE_MAC);
    assert_eq!(
        t.ram.guest_read(PAGE, 64),
        fresh,
        "a fresh page, with slot 0 promiscuous: the Guest sends it everything"
    );
    assert_eq!(BRIDGE_MAC[0] & 1, 1, "promiscuous");
    let entry = t.ram.guest_read(MEM + 12, 12);
    assert_eq!(
        &entry[..4],
        &[2, 0, 1, 0x80],
        "type net, slot 1 | F_RANDOMNESS"
    );
    assert_eq!(GUEST_SLOT, 1);
}

#[test]
fn frames_from_the_tap_reach_the_guest_by_its_mac() {
    let t = tap_net();
    let key = slot_key(PAGE, GUEST_SLOT);
    // Four receive buffers at the Guest's key, IRQ 2.
    for i in 0..4u64 {
        let mut d = LguestDma::default();
        d.addr[0] = 0x4000 + i * 0x1000;
        d.len[0] = 2048;
        t.ram.guest_write(0x1000 + i * 168, d.as_bytes());
    }
    assert_eq!(t.dma.bind_dma(key, 0x1000, 4 << 8 | 2), Ok(1));
    t.ram.guest_write(PAGE + 6, &A);
    let send = |f: &[u8]| t.wire.send(f).unwrap();
    send(&frame_to(B)); // someone else's
    send(&frame_to(A));
    send(&frame_to([0xff; 6]));
    let seen = t
        .signals
        .wait(Duration::from_secs(10), |s| s.irqs.len() >= 2);
    assert_eq!(seen.irqs, vec![2, 2]);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(t.signals.seen().irqs.len(), 2, "B's frame was not ours");
    let got = |i: u64| {
        let used = t.ram.guest_read_u32(0x1000 + i * 168);
        t.ram.guest_read(0x4000 + i * 0x1000, used as usize)
    };
    assert_eq!(got(0), frame_to(A));
    assert_eq!(got(1), frame_to([0xff; 6]));
    assert!(got(2).is_empty());
    // Promiscuous: everything.
    t.ram.guest_write(PAGE + 6, &P);
    send(&frame_to(C));
    t.signals
        .wait(Duration::from_secs(10), |s| s.irqs.len() >= 3);
    assert_eq!(got(2), frame_to(C));
}

#[test]
fn a_guest_without_a_mac_is_not_on_the_network() {
    let t = tap_net();
    let mut d = LguestDma::default();
    d.addr[0] = 0x4000;
    d.len[0] = 2048;
    t.ram.guest_write(0x1000, d.as_bytes());
    assert_eq!(
        t.dma
            .bind_dma(slot_key(PAGE, GUEST_SLOT), 0x1000, 1 << 8 | 2),
        Ok(1)
    );
    t.wire.send(&frame_to([0xff; 6])).unwrap();
    t.wire.send(&frame_to([0; 6])).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(t.signals.seen().irqs.is_empty());
    assert_eq!(t.ram.guest_read_u32(0x1000), 0);
}

#[test]
fn the_guests_frames_go_out_through_slot_0() {
    let t = tap_net();
    let frame = frame_to(B);
    t.ram.guest_write(0x3000, &frame);
    let mut d = LguestDma::default();
    d.addr[0] = 0x3000;
    d.len[0] = 30;
    d.addr[1] = 0x3000 + 30;
    d.len[1] = (frame.len() - 30) as u16;
    t.ram.guest_write(0x1000, d.as_bytes());
    let sent = t.dma.send_dma(slot_key(PAGE, 0), 0x1000).unwrap();
    assert_eq!(sent.used_len as usize, frame.len());
    let mut buf = [0u8; 256];
    let n = t.wire.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &frame[..]);
    // Any other key of the page: nobody there.
    assert_eq!(
        t.dma.send_dma(slot_key(PAGE, 2), 0x1000).unwrap().used_len,
        0
    );
    assert_eq!(t.ram.guest_read_u32(0x1000), 0);
}
