//! Networks of the 2007 model. A net device page is an array of 6-byte MAC
//! slots (`page + 6 * slot`), and slot n's key is `page + 4 * n`: to send
//! a frame to the Guest in slot n, send DMA to that key; to receive, bind
//! buffers at your own slot's key.
//!
//! A network is either private, this Guest and the Launcher alone, where
//! slot 0 is a bridge to a tap ([`FramePort`]) and the Guest is slot 1; or
//! shared with other Launchers through a file ([`super::sharenet`]).
//!
//! Whoever sends picks the keys ([`pick_slots`]): the slot whose MAC is the
//! frame's destination, every used slot for a broadcast or multicast frame,
//! and every promiscuous slot. On a shared network that is the sending
//! Guest's driver; for frames from the tap it is us.

use super::bindings::Bindings;
use super::sharenet::{Offer, Receiver, SharedNet, MAX_SLOTS};
use super::{DeviceContext, NetBackend};
use lguest_abi::{LGUEST_NET_KEY_STRIDE, LGUEST_NET_MAC_LEN, LGUEST_NET_PROMISC, PAGE_SIZE};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

/// The Launcher's slot on a private network (the tap's side).
pub const TAP_SLOT: usize = 0;
/// The Guest's slot on a private network.
pub const GUEST_SLOT: usize = 1;
/// The largest frame one lguest_dma can carry: 16 sections of one page.
pub const FRAME_MAX: usize = lguest_abi::LGUEST_MAX_DMA_SECTIONS * PAGE_SIZE as usize;

/// The key of `slot` on the network page at `page`.
pub fn slot_key(page: u64, slot: usize) -> u64 {
    page + LGUEST_NET_KEY_STRIDE * slot as u64
}

/// The slots a frame goes to, in slot order: `sender` excluded, only the
/// first `slots` slots of `page` looked at.
pub fn pick_slots(page: &[u8], frame: &[u8], sender: usize, slots: usize) -> Vec<usize> {
    let Some(dest) = frame.get(..LGUEST_NET_MAC_LEN) else {
        return Vec::new();
    };
    let multicast = dest[0] & 1 != 0;
    let slots = slots.min(page.len() / LGUEST_NET_MAC_LEN);
    (0..slots)
        .filter(|&s| s != sender)
        .filter(|&s| {
            let mac = &page[s * LGUEST_NET_MAC_LEN..(s + 1) * LGUEST_NET_MAC_LEN];
            let used = mac.iter().any(|&b| b != 0);
            used && (multicast || mac[0] & LGUEST_NET_PROMISC != 0 || mac == dest)
        })
        .collect()
}

/// Where a private network's slot 0 sends and receives whole frames.
pub trait FramePort: Send + Sync {
    /// A descriptor that polls readable when a frame waits.
    fn fd(&self) -> RawFd;
    /// One frame out; an error drops it.
    fn send(&self, frame: &[u8]) -> std::io::Result<()>;
    /// One frame in, if one waits (never blocks).
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize>;
}

/// The Launcher's tap: its frames carry a virtio-net header we have no use
/// for (the 2007 Guest sends bare Ethernet frames), all zero going out and
/// skipped coming in.
impl FramePort for crate::devices::tap::Tap {
    fn fd(&self) -> RawFd {
        crate::devices::tap::Tap::fd(self)
    }
    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let header = [0u8; 10];
        let iov = [IoSlice::new(&header), IoSlice::new(frame)];
        // SAFETY: writev reads the two buffers the iovecs describe, which
        // live until it returns (IoSlice is ABI-compatible with iovec).
        let n = unsafe { libc::writev(self.fd(), iov.as_ptr().cast(), 2) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut header = [0u8; 10];
        let mut iov = [
            libc::iovec {
                iov_base: header.as_mut_ptr().cast(),
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
        ];
        // SAFETY: readv writes at most the two buffers the iovecs describe,
        // both ours and live until it returns.
        let n = unsafe { libc::readv(self.fd(), iov.as_mut_ptr(), 2) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((n as usize).saturating_sub(header.len()))
    }
}

/// A datagram socket as slot 0 (the tests' stand-in for a tap). Set it
/// non-blocking.
impl FramePort for std::os::unix::net::UnixDatagram {
    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        std::os::unix::net::UnixDatagram::send(self, frame).map(drop)
    }
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::os::unix::net::UnixDatagram::recv(self, buf)
    }
}

/// One network of the running Guest.
pub(crate) enum NetDevice {
    Tap(TapBridge),
    Shared {
        net: Arc<SharedNet>,
        _receiver: Receiver,
    },
}

impl NetDevice {
    pub(crate) fn start(
        backend: &NetBackend,
        page: u64,
        ctx: DeviceContext,
    ) -> std::io::Result<NetDevice> {
        match backend {
            NetBackend::Tap(port) => TapBridge::start(port.clone(), page, ctx).map(NetDevice::Tap),
            NetBackend::Shared(net) => {
                net.begin_boot();
                let receiver = net.receive(move |offset, frame| ctx.offer(page + offset, frame))?;
                Ok(NetDevice::Shared {
                    net: net.clone(),
                    _receiver: receiver,
                })
            }
        }
    }

    /// SEND_DMA to `offset` in this network's page: the bytes taken.
    pub(crate) fn send(&self, offset: u64, frame: &[u8]) -> u32 {
        match self {
            NetDevice::Tap(bridge) => bridge.send(offset, frame),
            NetDevice::Shared { net, .. } => net.send(offset, frame),
        }
    }

    /// The Guest may have freed or bound buffers: a frame held for want of
    /// one is offered again.
    pub(crate) fn poke(&self) {
        if let NetDevice::Shared { net, .. } = self {
            net.poke();
        }
    }

    /// The Guest's bindings changed: a shared network must know which keys
    /// it listens on.
    pub(crate) fn bindings_changed(&self, bindings: &Bindings, page: u64) {
        if let NetDevice::Shared { net, .. } = self {
            let offsets: Vec<u64> = bindings
                .keys_in(vec![page])
                .into_iter()
                .map(|k| k - page)
                .collect();
            net.publish_keys(&offsets);
        }
    }
}

/// What slot 0 writes in its MAC slot when it bridges to a tap: bit 0 of
/// byte 0, promiscuous, so that every Guest sends it every frame (as the
/// 2007 Launcher did, to bridge to other machines); bit 1, locally
/// administered; then "lg". No frame is ever addressed to it.
pub const BRIDGE_MAC: [u8; 6] = [0x03, 0x6c, 0x67, 0, 0, 0];

/// Makes `fd` non-blocking: a thread that reads it must never block in
/// recv, or it could not be stopped.
fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL and F_SETFL on the port's own descriptor change only
    // its flags.
    let r = unsafe {
        libc::fcntl(
            fd,
            libc::F_SETFL,
            libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Starts a thread running `pump` over `port` until the returned stopper
/// is written; the thread's SIGINT is the caller's (the Launcher starts
/// its device threads with it blocked).
fn start_pump(
    name: &str,
    port: Arc<dyn FramePort>,
    each: impl FnMut(&[u8]) + Send + 'static,
    idle: impl FnMut() + Send + 'static,
) -> std::io::Result<(Arc<EventFd>, JoinHandle<()>)> {
    set_nonblocking(port.fd())?;
    let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let s = stop.clone();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            crate::sandbox::enter_thread(crate::sandbox::ThreadKind::Device);
            pump(port.as_ref(), &s, each, idle)
        })?;
    Ok((stop, thread))
}

/// Slot 0 of a private network: frames between the tap and the Guest.
pub(crate) struct TapBridge {
    port: Arc<dyn FramePort>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl TapBridge {
    fn start(port: Arc<dyn FramePort>, page: u64, ctx: DeviceContext) -> std::io::Result<Self> {
        // A fresh page for every boot (no MACs from before a restart), with
        // our own, promiscuous, in slot 0.
        let mut fresh = [0u8; PAGE_SIZE as usize];
        fresh[..LGUEST_NET_MAC_LEN].copy_from_slice(&BRIDGE_MAC);
        ctx.mem.write(page, &fresh).map_err(std::io::Error::other)?;
        // Frames from the tap go to the slots they are for; one that finds
        // no free buffer is dropped, as a wire would.
        let mut macs = [0u8; 2 * LGUEST_NET_MAC_LEN];
        let each = move |frame: &[u8]| {
            if ctx.mem.read(page, &mut macs).is_ok() {
                for slot in pick_slots(&macs, frame, TAP_SLOT, 2) {
                    ctx.deliver(slot_key(page, slot), frame);
                }
            }
        };
        let (stop, thread) = start_pump("dma-tap", port.clone(), each, || {})?;
        Ok(TapBridge {
            port,
            stop,
            thread: Some(thread),
        })
    }

    /// The Guest's frames: only slot 0's key reaches the tap.
    fn send(&self, offset: u64, frame: &[u8]) -> u32 {
        if offset != slot_key(0, TAP_SLOT) {
            return 0;
        }
        match self.port.send(frame) {
            Ok(()) => frame.len() as u32,
            Err(_) => 0,
        }
    }
}

impl Drop for TapBridge {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Slot 0 of a shared network, bridged to a tap (`--sharenet` with
/// `--tunnet`). The tap is one more member of the network, in slot 0 and
/// promiscuous ([`BRIDGE_MAC`]): every Guest's driver sends it every frame,
/// which goes out to the tap; a frame from the tap goes to the slots
/// [`pick_slots`] finds on the shared page, through their rings, as any
/// sender's frame does. It touches no Guest's memory, so it lives as long
/// as the Launcher, across restarts of its own Guest.
pub struct SharedBridge {
    net: Arc<SharedNet>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    _receiver: Receiver,
}

impl SharedBridge {
    /// Bridges `net`, which holds slot 0 ([`SharedNet::join_bridge`]), to
    /// `port`.
    pub fn start(net: SharedNet, port: Arc<dyn FramePort>) -> std::io::Result<SharedBridge> {
        let net = Arc::new(net);
        let slot = net.slot();
        net.set_mac(slot, BRIDGE_MAC);
        net.publish_keys(&[slot_key(0, slot)]);
        let out = port.clone();
        let receiver = net.receive(move |offset, frame| {
            if offset == slot_key(0, slot) {
                // The tap drops what it cannot take now, as a wire would.
                let _ = out.send(frame);
            }
            Offer::Done
        })?;
        let (n, m) = (net.clone(), net.clone());
        let each = move |frame: &[u8]| {
            let macs = n.macs();
            for to in pick_slots(&macs, frame, slot, MAX_SLOTS) {
                n.send(slot_key(0, to), frame);
            }
        };
        // The page is everyone's to write: put our MAC back if a Guest
        // wrote over it, or the Guests would stop sending us their frames.
        let idle = move || {
            if m.mac(slot) != BRIDGE_MAC {
                m.set_mac(slot, BRIDGE_MAC);
            }
        };
        let (stop, thread) = start_pump("sharenet-tap", port, each, idle)?;
        Ok(SharedBridge {
            net,
            stop,
            thread: Some(thread),
            _receiver: receiver,
        })
    }

    /// The network it bridges.
    pub fn net(&self) -> &Arc<SharedNet> {
        &self.net
    }
}

impl Drop for SharedBridge {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often a pump with nothing to read does its idle work.
const PUMP_IDLE: std::time::Duration = std::time::Duration::from_millis(100);

/// Hands every frame `port` receives to `each` until `stop` is written or
/// the port goes away, calling `idle` whenever it has been quiet a while.
fn pump(port: &dyn FramePort, stop: &EventFd, mut each: impl FnMut(&[u8]), mut idle: impl FnMut()) {
    let mut frame = vec![0u8; FRAME_MAX];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: port.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two pollfds we own; poll writes only their revents.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, PUMP_IDLE.as_millis() as i32) };
        if n < 0 {
            continue; // EINTR
        }
        if n == 0 {
            idle();
            continue;
        }
        if fds[0].revents != 0 {
            return;
        }
        if fds[1].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
            && fds[1].revents & libc::POLLIN == 0
        {
            return; // the port is gone
        }
        loop {
            let n = match port.recv(&mut frame) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Gone for good (a tap fails this way only when it is
                    // taken away): the wire goes quiet.
                    tracing::warn!("net slot 0 stops receiving: {e}");
                    return;
                }
            };
            each(&frame[..n]);
        }
    }
}
