//! The network device (virtio ID 1), `--tunnet`: queue 0 receives frames
//! from the tap, queue 1 sends the Guest's frames to it. Both carry the
//! legacy 10-byte virtio-net header, which the tap (IFF_VNET_HDR) speaks too.

use crate::devices::tap::Tap;
use crate::virtio::queue::{readable_len, write_to_chain, Chain};
use crate::virtio::{Device, DeviceError, Queues};
use std::os::fd::RawFd;
use std::sync::Arc;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;

const RX: usize = 0;
const TX: usize = 1;
/// The transmit ring's entries. A Guest that fills the ring sleeps until
/// most of it is back, and each such wait costs it an interrupt and a HALT,
/// a few exits: four times the usual ring makes them four times rarer per
/// frame, and gives it four times as long to refill the ring before we run
/// out of frames to send (see BENCHMARKS.md, P4).
const TX_RING: u16 = 1024;
/// Header plus the largest frame we pass (no GSO is negotiated).
const FRAME_MAX: usize = 10 + 65535;

pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
    /// A receive buffer taken from the ring while the tap had nothing: the
    /// ring can't take it back, so it waits here for the next frame.
    held: Option<Chain>,
    /// Whether the Guest may have receive buffers; while it has none we
    /// stop watching the tap until it kicks the receive queue.
    rx_buffers: bool,
    frame: Vec<u8>,
    /// Whether the driver is modern (VERSION_1): its header is 12 bytes, the
    /// last two num_buffers, which we must set to 1.
    modern: bool,
}

impl Net {
    pub fn new(tap: Arc<Tap>, mac: [u8; 6]) -> Net {
        Net {
            tap,
            mac,
            held: None,
            rx_buffers: false,
            frame: vec![0; FRAME_MAX + 2],
            modern: false,
        }
    }

    /// Moves frames from the tap into receive buffers while both last.
    fn receive(&mut self, queues: &mut Queues) -> Result<(), DeviceError> {
        loop {
            let chain = match self.held.take() {
                Some(chain) => chain,
                None => match queues.pop(RX)? {
                    Some(chain) => chain,
                    None => {
                        self.rx_buffers = false;
                        return Ok(());
                    }
                },
            };
            match self.tap.read_frame(&mut self.frame) {
                Ok(n) => {
                    if self.modern && n >= 12 {
                        // The tap leaves num_buffers alone; one buffer it is.
                        self.frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                    }
                    let written = write_to_chain(queues.mem, &chain, &self.frame[..n]);
                    queues.push(RX, &chain, written)?;
                }
                Err(_) => {
                    self.held = Some(chain);
                    return Ok(());
                }
            }
        }
    }
}

impl Device for Net {
    fn name(&self) -> &'static str {
        "net"
    }
    fn virtio_id(&self) -> u8 {
        lguest_abi::VIRTIO_ID_NET
    }
    fn queue_names(&self) -> &'static [&'static str] {
        &["rx", "tx"]
    }
    fn queue_size(&self, q: usize) -> u16 {
        if q == TX {
            TX_RING
        } else {
            lguest_abi::VRING_DEFAULT_NUM
        }
    }
    fn features(&self) -> u32 {
        1 << VIRTIO_NET_F_MAC
    }
    /// {u8 mac[6], u16 status}
    fn config(&self) -> Vec<u8> {
        let mut c = self.mac.to_vec();
        c.extend_from_slice(&0u16.to_le_bytes());
        c
    }

    fn kick(&mut self, q: usize, queues: &mut Queues) -> Result<(), DeviceError> {
        if q == RX {
            self.rx_buffers = true;
            return self.receive(queues);
        }
        /*D:550 The Guest's frames go to the tap straight from its buffers:
         * one writev per frame, the kernel's copy the only one. Every frame
         * sent is handed back at once, and the Guest hears of them when it
         * asked to (with EVENT_IDX, when about three quarters of the ring
         * are back), not after the last: so it refills the ring while we
         * send the rest, rather than while we sit idle. */
        let mut sent = false;
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(8);
        while let Some(chain) = queues.pop(TX)? {
            // A frame larger than any the tap takes, or one the tap refuses
            // (down, or malformed), is dropped, as a real wire would.
            if readable_len(&chain) <= FRAME_MAX as u64 {
                iov.clear();
                for b in chain.readable().filter(|b| b.len > 0) {
                    let base = queues
                        .mem
                        .host_address(b.addr, b.len as u64)
                        .expect("checked by the walk");
                    iov.push(libc::iovec {
                        iov_base: base.cast(),
                        iov_len: b.len as usize,
                    });
                }
                // The Guest may change those bytes meanwhile: then it sends
                // garbage, its own business.
                let (fd, n) = (self.tap.fd(), iov.len() as libc::c_int);
                // SAFETY: each iovec is Guest memory the walk checked, mapped
                // longer than this device lives; writev only reads it.
                let _ = unsafe { libc::writev(fd, iov.as_ptr(), n) };
            }
            queues.add_used(TX, &chain, 0)?;
            queues.signal_if_due(TX)?;
            sent = true;
        }
        if sent {
            queues.signal(TX)?;
        }
        Ok(())
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.fd())
    }

    fn wants_backend(&self) -> bool {
        self.rx_buffers
    }

    fn backend_ready(&mut self, queues: &mut Queues) -> Result<(), DeviceError> {
        self.receive(queues)
    }

    fn reset(&mut self) {
        self.held = None;
        self.rx_buffers = false;
        self.set_driver_features(0);
    }

    fn queue_stopped(&mut self, q: usize) {
        if q == RX {
            self.held = None;
            self.rx_buffers = false;
        }
    }

    fn set_driver_features(&mut self, features: u64) {
        self.modern = features & 1 << VIRTIO_F_VERSION_1 != 0;
        // The tap adds or skips the header bytes it doesn't fill.
        let _ = self.tap.set_header_size(if self.modern { 12 } else { 10 });
    }
}
