//! Virtio devices, as the lguest bus ([`crate::bus`]) runs them.
//!
//! A device ([`Device`]) only moves bytes between its queues and its backend
//! (stdin, a file, a tap, the kernel's random source). Each runs on a thread
//! of its own, woken by an eventfd per queue (written when the Guest kicks it
//! with NOTIFY) and by its backend's descriptor, so the vCPU never waits on
//! I/O. A Guest that breaks the ring rules ends in Sudden Death with a reason
//! naming the device and queue.

pub mod mmio;
pub mod queue;

use crate::kick::Irqs;
use crate::memory::GuestMemory;
use lguest_abi::vring::{
    F_NOTIFY_ON_EMPTY as VIRTIO_F_NOTIFY_ON_EMPTY, RING_F_EVENT_IDX as VIRTIO_RING_F_EVENT_IDX,
    RING_F_INDIRECT_DESC as VIRTIO_RING_F_INDIRECT_DESC,
};
use queue::{Chain, Queue, RingFeatures};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Features every device offers (ABI section 8).
pub use lguest_abi::vring::COMMON_FEATURES;

impl RingFeatures {
    /// The ring features among negotiated feature bits.
    pub fn from_bits(features: u64) -> RingFeatures {
        let bit = |b: u32| features & (1 << b) != 0;
        RingFeatures {
            event_idx: bit(VIRTIO_RING_F_EVENT_IDX),
            indirect: bit(VIRTIO_RING_F_INDIRECT_DESC),
            notify_on_empty: bit(VIRTIO_F_NOTIFY_ON_EMPTY),
        }
    }
}

/// One device's backend and behaviour.
pub trait Device: Send {
    /// Its name in messages: "console", "block", "net", "rng".
    fn name(&self) -> &'static str;
    /// The virtio device ID (the descriptor's type).
    fn virtio_id(&self) -> u8;
    /// Its queues, by name, in order.
    fn queue_names(&self) -> &'static [&'static str];
    /// Device-specific feature bits (the common ones are added).
    fn features(&self) -> u32;
    /// Its config space.
    fn config(&self) -> Vec<u8>;
    /// Queue `q` was kicked (or just became ready).
    fn kick(&mut self, q: usize, queues: &mut Queues) -> Result<(), String>;
    /// Whether a kick on queue `q` is served right away on the vCPU thread
    /// (short, non-blocking work such as console output) instead of waking
    /// the device's thread: one thread hand-off less per kick.
    fn serve_inline(&self, _q: usize) -> bool {
        false
    }
    /// Whether the vCPU thread may serve the backend too, while the Guest is
    /// halted waiting for it (console input: a key wakes the Guest without a
    /// hand-off between threads). backend_ready must then never block.
    fn backend_inline(&self) -> bool {
        false
    }
    /// A backend descriptor to watch, if any.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// Whether to watch the backend now (e.g. not while no buffer can take
    /// what it would give).
    fn wants_backend(&self) -> bool {
        false
    }
    /// The backend is readable.
    fn backend_ready(&mut self, _queues: &mut Queues) -> Result<(), String> {
        Ok(())
    }
    /// A descriptor the device waits to become writable (output it could not
    /// write yet, e.g. the console's stdout), while it waits.
    fn output_fd(&self) -> Option<RawFd> {
        None
    }
    /// `output_fd` has room.
    fn output_ready(&mut self, _queues: &mut Queues) -> Result<(), String> {
        Ok(())
    }
    /// The Guest has stopped for good (this boot): finish what it left
    /// behind. Called on the Launcher's thread, with its memory still there.
    fn finish(&mut self, _queues: &mut Queues) {}
    /// The Guest reset the device: forget everything about its queues.
    fn reset(&mut self) {}
    /// Queue `q` was taken away (reset, or the driver tore it down): drop
    /// any chain of it still held.
    fn queue_stopped(&mut self, _q: usize) {}
    /// The features the driver accepted (a modern driver may change how the
    /// device formats its buffers, e.g. the net header).
    fn set_driver_features(&mut self, _features: u64) {}
}

/// The queues of one device, as a device sees them while it works.
pub struct Queues<'a> {
    pub mem: &'a GuestMemory,
    queues: &'a mut [Option<Queue>],
    names: &'static [&'static str],
    setup: &'a [QueueSetup],
    irq_state: &'a Irqs,
    interrupt_status: Option<&'a AtomicU32>,
}

impl Queues<'_> {
    fn context(&self, q: usize, e: String) -> String {
        format!("queue {q} ({}): {e}", self.names[q])
    }

    /// The Guest's IRQ state (its wake-up eventfd, whether it is dying).
    pub fn irqs(&self) -> &Irqs {
        self.irq_state
    }

    /// Ends the Guest (the user asked to, through this device).
    pub fn stop_guest(&self, reason: &str) {
        self.irq_state.kill(reason.to_string());
    }

    /// Asks for kicks on queue `q` when the Guest adds buffers, or not.
    pub fn want_kicks(&mut self, q: usize, wanted: bool) -> Result<(), String> {
        match &mut self.queues[q] {
            Some(queue) => queue
                .want_kicks(self.mem, wanted)
                .map_err(|e| self.context(q, e)),
            None => Ok(()),
        }
    }

    /// The next chain the Guest offers on queue `q`.
    pub fn pop(&mut self, q: usize) -> Result<Option<Chain>, String> {
        match &mut self.queues[q] {
            Some(queue) => queue.pop(self.mem).map_err(|e| self.context(q, e)),
            None => Ok(None),
        }
    }

    /// Hands a chain back with `len` bytes written, interrupting the Guest
    /// if it wants to hear of it.
    pub fn push(&mut self, q: usize, chain: &Chain, len: u32) -> Result<(), String> {
        self.add_used(q, chain, len)?;
        self.signal(q)
    }

    /// Hands a chain back, leaving the interrupt to [`Queues::signal`]
    /// after the last of a batch: one interrupt for many buffers.
    pub fn add_used(&mut self, q: usize, chain: &Chain, len: u32) -> Result<(), String> {
        // The queue may have been taken away since the chain was popped
        // (reset, or QueueReady cleared): the chain goes with it.
        let Some(queue) = self.queues[q].as_mut() else {
            return Ok(());
        };
        queue
            .add_used(self.mem, chain.head, len)
            .map_err(|e| self.context(q, e))
    }

    /// Interrupts the Guest for the buffers handed back on queue `q`, if it
    /// wants to hear of them.
    pub fn signal(&mut self, q: usize) -> Result<(), String> {
        let Some(queue) = self.queues[q].as_mut() else {
            return Ok(());
        };
        let notify = queue
            .needs_interrupt(self.mem)
            .map_err(|e| self.context(q, e))?;
        if notify {
            if let Some(status) = self.interrupt_status {
                status.fetch_or(1, Ordering::SeqCst);
            }
            self.irq_state.raise(self.setup[q].irq);
        }
        Ok(())
    }
}

/// What the bus and a device's thread share.
pub struct DeviceState {
    pub device: Box<dyn Device>,
    /// Live queues (None until the first kick after setup or reset).
    queues: Vec<Option<Queue>>,
}

/// A device's place on the bus for one boot.
pub struct Running {
    pub name: &'static str,
    shared: Arc<Shared>,
    /// Which queues the vCPU serves itself ([`Device::serve_inline`]), and
    /// whether it may serve the backend ([`Device::backend_inline`]): asked
    /// once, so a kick needs no lock the device's thread holds while it does
    /// I/O.
    inline_queues: Vec<bool>,
    inline_backend: bool,
    pub kicks: Vec<Arc<EventFd>>,
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where a device's queues are and what they need to start.
#[derive(Clone)]
pub struct QueueSetup {
    pub num: u16,
    pub irq: u32,
    /// On the lguest bus: where the queue's ring is and where the device's
    /// descriptor is; the queue comes up at its first kick. None for a
    /// transport that sets queues up itself ([`Running::activate`]).
    pub legacy: Option<LegacyQueue>,
}

/// A lguest-bus queue's places.
#[derive(Clone, Copy)]
pub struct LegacyQueue {
    /// The ring the Launcher assigned.
    pub ring: u64,
    /// The Guest's accepted features, on the descriptor page.
    pub guest_features: u64,
    /// The device's status byte, on the descriptor page.
    pub status: u64,
}

pub fn lock(state: &Mutex<DeviceState>) -> MutexGuard<'_, DeviceState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl DeviceState {
    /// Forgets every queue (reset, or FAILED).
    pub fn reset(&mut self) {
        for q in &mut self.queues {
            *q = None;
        }
        self.device.reset();
    }
}

const BACKEND: u64 = 64;
const STOP: u64 = 65;
const OUTPUT: u64 = 66;

impl Running {
    /// Starts the device's thread.
    pub fn start(
        device: Box<dyn Device>,
        setup: Vec<QueueSetup>,
        mem: GuestMemory,
        irqs: Arc<Irqs>,
        interrupt_status: Option<Arc<AtomicU32>>,
    ) -> std::io::Result<Running> {
        let name = device.name();
        let inline_queues = (0..setup.len()).map(|q| device.serve_inline(q)).collect();
        let inline_backend = device.backend_inline();
        let shared = Arc::new(Shared {
            state: Mutex::new(DeviceState {
                queues: setup.iter().map(|_| None).collect(),
                device,
            }),
            setup,
            mem,
            irqs,
            interrupt_status,
        });
        let kicks: Vec<_> = (0..shared.setup.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<_, _>>()?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let epoll = Epoll::new()?;
        for (q, k) in kicks.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                k.as_raw_fd(),
                EpollEvent::new(EventSet::IN, q as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        let mut worker = Worker {
            shared: shared.clone(),
            kicks: kicks.clone(),
            epoll,
            backend: Backend::None,
            output: None,
        };
        let thread = crate::kick::without_sigint(|| {
            std::thread::Builder::new()
                .name(format!("lguest-{name}"))
                .spawn(move || worker.run())
        })?;
        Ok(Running {
            name,
            shared,
            inline_queues,
            inline_backend,
            kicks,
            stop,
            thread: Some(thread),
        })
    }

    /*D:500 The Guest kicked queue `q` (NOTIFY): wake the device's thread
     * with its eventfd, taking no lock, so the vCPU never waits while the
     * device does I/O. Only queues whose work is short and never blocks
     * (console output) are served here instead. An error is the Sudden
     * Death reason. */
    pub fn kick(&self, q: usize) -> Result<(), String> {
        if self.inline_queues[q] {
            self.shared
                .serve(Some(q), |d, queues| d.kick(q, queues))
                .map_err(|e| format!("{} {e}", self.name))?;
            // Output that must wait for room is the device thread's to
            // finish: wake it to watch for that room.
            if lock(&self.shared.state).device.output_fd().is_some() {
                let _ = self.kicks[q].write(1);
            }
            return Ok(());
        }
        let _ = self.kicks[q].write(1);
        Ok(())
    }

    /// Brings queue `q` up (a transport that sets queues up itself).
    pub fn activate(&self, q: usize, queue: Queue) {
        lock(&self.shared.state).queues[q] = Some(queue);
    }

    /// Takes queue `q` away from the device (the driver is about to free its
    /// memory); done when this returns.
    pub fn deactivate(&self, q: usize) {
        let mut state = lock(&self.shared.state);
        state.queues[q] = None;
        state.device.queue_stopped(q);
    }

    /// Whether the device is serving queue `q`.
    #[cfg(test)]
    pub fn queue_ready(&self, q: usize) -> bool {
        lock(&self.shared.state).queues[q].is_some()
    }

    /// The device's config space, as it is now.
    pub fn config(&self) -> Vec<u8> {
        lock(&self.shared.state).device.config()
    }

    /// Tells the device what the driver accepted.
    pub fn set_driver_features(&self, features: u64) {
        lock(&self.shared.state)
            .device
            .set_driver_features(features);
    }

    /// The backend descriptor the vCPU thread should watch while the Guest
    /// is halted, if the device serves it inline and wants it now.
    pub fn inline_backend(&self) -> Option<RawFd> {
        if !self.inline_backend {
            return None;
        }
        let state = lock(&self.shared.state);
        let d = &state.device;
        if d.backend_inline() && d.wants_backend() {
            d.backend_fd()
        } else {
            None
        }
    }

    /// The backend is readable: serve it here. An error is the Sudden Death
    /// reason.
    pub fn backend_ready(&self) -> Result<(), String> {
        self.shared
            .serve(None, |d, q| d.backend_ready(q))
            .map_err(|e| format!("{} {e}", self.name))
    }

    /// Resets the device, running `clear` (which wipes what the Guest sees
    /// of it) under the device's lock, so its thread never sees half of it;
    /// done when this returns (the Guest's NOTIFY waits).
    pub fn reset(&self, clear: impl FnOnce()) {
        let mut state = lock(&self.shared.state);
        for k in &self.kicks {
            let _ = k.read();
        }
        state.reset();
        clear();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.shared.serve(None, |d, queues| {
            d.finish(queues);
            Ok(())
        });
    }
}

/// How the worker watches the backend descriptor.
enum Backend {
    /// Nothing to watch (or not now).
    None,
    /// Registered with epoll.
    Watched(RawFd),
    /// epoll can't watch it (a regular file, /dev/null): it is always ready.
    AlwaysReady,
}

/// A device, its queues and what serving them needs: shared by the bus (on
/// the vCPU thread) and the device's own thread.
struct Shared {
    state: Mutex<DeviceState>,
    setup: Vec<QueueSetup>,
    mem: GuestMemory,
    irqs: Arc<Irqs>,
    /// virtio-mmio's InterruptStatus: bit 0 set with every used-buffer
    /// interrupt, cleared by the driver's InterruptACK.
    interrupt_status: Option<Arc<AtomicU32>>,
}

impl Shared {
    /// Runs `f` with the device and its queues, first bringing up queue
    /// `kicked` if this is its first kick since setup or reset.
    fn serve(
        &self,
        kicked: Option<usize>,
        f: impl FnOnce(&mut dyn Device, &mut Queues) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        if let Some(q) = kicked {
            if let (None, Some(legacy)) = (&state.queues[q], self.setup[q].legacy) {
                // A driver kicks only once it has set DRIVER_OK, by when it
                // has chosen its features. A kick without it (one that raced
                // a reset, say) brings nothing up.
                let mut status = [0u8];
                let _ = self.mem.read(legacy.status, &mut status);
                if status[0] & lguest_abi::VIRTIO_STATUS_DRIVER_OK != 0 {
                    let features = self.mem.read_u32(legacy.guest_features).unwrap_or(0);
                    let ring_features = RingFeatures::from_bits(features as u64);
                    let num = self.setup[q].num;
                    state.queues[q] = Some(Queue::new(num, legacy.ring, ring_features));
                }
            }
        }
        let names = state.device.queue_names();
        let mut queues = Queues {
            mem: &self.mem,
            queues: &mut state.queues,
            names,
            setup: &self.setup,
            irq_state: &self.irqs,
            interrupt_status: self.interrupt_status.as_deref(),
        };
        f(state.device.as_mut(), &mut queues)
    }
}

struct Worker {
    shared: Arc<Shared>,
    kicks: Vec<Arc<EventFd>>,
    epoll: Epoll,
    backend: Backend,
    /// The output descriptor registered for EPOLLOUT, while the device
    /// waits for room.
    output: Option<RawFd>,
}

impl Worker {
    fn run(&mut self) {
        crate::sandbox::enter_thread(crate::sandbox::ThreadKind::Device);
        let mut events = vec![EpollEvent::default(); self.kicks.len() + 3];
        loop {
            self.watch_backend();
            self.watch_output();
            let timeout = if matches!(self.backend, Backend::AlwaysReady) {
                0
            } else {
                -1
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            // A backend epoll can't watch is served on every turn.
            let always = matches!(self.backend, Backend::AlwaysReady).then_some(BACKEND);
            for token in events[..n].iter().map(|e| e.data()).chain(always) {
                let result = match token {
                    STOP => return,
                    BACKEND => self.shared.serve(None, |d, q| d.backend_ready(q)),
                    OUTPUT => self.shared.serve(None, |d, q| d.output_ready(q)),
                    q => {
                        let q = q as usize;
                        let _ = self.kicks[q].read();
                        self.shared.serve(Some(q), |d, queues| d.kick(q, queues))
                    }
                };
                if let Err(reason) = result {
                    let name = lock(&self.shared.state).device.name();
                    self.shared.irqs.kill(format!("{name} {reason}"));
                    return;
                }
            }
        }
    }

    /// Watches the device's output descriptor for room while it wants.
    fn watch_output(&mut self) {
        let fd = lock(&self.shared.state).device.output_fd();
        if fd == self.output {
            return;
        }
        if let Some(old) = self.output.take() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, old, EpollEvent::default());
        }
        if let Some(fd) = fd {
            let ev = EpollEvent::new(EventSet::OUT, OUTPUT);
            if self.epoll.ctl(ControlOperation::Add, fd, ev).is_ok() {
                self.output = Some(fd);
            }
        }
    }

    /// Adds or removes the backend from epoll as the device wants.
    fn watch_backend(&mut self) {
        let (fd, wanted) = {
            let state = lock(&self.shared.state);
            (state.device.backend_fd(), state.device.wants_backend())
        };
        match (&self.backend, fd, wanted) {
            (Backend::None, Some(fd), true) => {
                let ev = EpollEvent::new(EventSet::IN, BACKEND);
                self.backend = match self.epoll.ctl(ControlOperation::Add, fd, ev) {
                    Ok(()) => Backend::Watched(fd),
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => Backend::AlwaysReady,
                    Err(_) => Backend::None,
                };
            }
            (Backend::Watched(fd), _, false) => {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, *fd, EpollEvent::default());
                self.backend = Backend::None;
            }
            (Backend::AlwaysReady, _, false) => self.backend = Backend::None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Layout;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A device whose every request takes as long as the test wants: its
    /// thread holds the device while it "does I/O".
    struct Slow {
        entered: mpsc::Sender<()>,
        release: mpsc::Receiver<()>,
    }

    impl Device for Slow {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn virtio_id(&self) -> u8 {
            2
        }
        fn queue_names(&self) -> &'static [&'static str] {
            &["requests"]
        }
        fn features(&self) -> u32 {
            0
        }
        fn config(&self) -> Vec<u8> {
            vec![]
        }
        fn kick(&mut self, _q: usize, _queues: &mut Queues) -> Result<(), String> {
            let _ = self.entered.send(());
            let _ = self.release.recv_timeout(Duration::from_secs(30));
            Ok(())
        }
    }

    #[test]
    fn a_kick_never_waits_for_a_device_doing_io() {
        let mem = GuestMemory::new(Layout {
            mem: 2 << 20,
            pfn_limit: (2 << 20) / lguest_abi::PAGE_SIZE + 1,
            mmio_hole_pages: 0,
            host_ro_pages: 1,
            host_rw_pages: 1,
        })
        .unwrap();
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let slow = Slow {
            entered: entered_tx,
            release: release_rx,
        };
        let setup = vec![QueueSetup {
            num: 8,
            irq: 1,
            legacy: None,
        }];
        let irqs = Irqs::new().unwrap();
        let running = Running::start(Box::new(slow), setup, mem, irqs, None).unwrap();

        running.kick(0).unwrap();
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the device's thread took the first kick");
        // The device's thread is inside its request now. A second NOTIFY,
        // from the vCPU, must come straight back.
        let (done_tx, done) = mpsc::channel();
        let returned = std::thread::scope(|s| {
            s.spawn(|| {
                let _ = running.kick(0);
                let _ = done_tx.send(());
            });
            let returned = done.recv_timeout(Duration::from_secs(2)).is_ok();
            // Let the device finish either way, so nothing hangs.
            let _ = release.send(());
            let _ = release.send(());
            returned
        });
        assert!(returned, "NOTIFY waited for the device's I/O to finish");
    }
}
