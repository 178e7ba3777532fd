//! Virtio devices, and how they run whatever the transport.
//!
//! A device ([`Device`]) only moves bytes between its queues and its backend
//! (stdin, a file, a tap, the kernel's random source). Each runs on a thread
//! of its own ([`Running`]), woken by an eventfd per queue (written when the
//! Guest kicks it) and by its backend's descriptor, so the vCPU never waits on
//! I/O. A Guest that breaks the ring rules ends in Sudden Death with a reason
//! naming the device and queue.
//!
//! This runtime knows queues, devices and interrupts, nothing more. Where a
//! queue's ring is, when it comes to life and how an interrupt reaches the
//! Guest are the transport's: [`lguest_bus`] (a descriptor page and NOTIFY)
//! or [`mmio`] (a register window per device). A transport hands the device
//! its queues ([`Running::activate`]) and says how to interrupt
//! ([`Interrupt`]).

pub mod lguest_bus;
pub mod mmio;
pub mod queue;

use crate::kick::Irqs;
use crate::memory::GuestMemory;
use queue::{Chain, Queue, QueueError};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Features every device offers (ABI section 8).
pub use lguest_abi::vring::COMMON_FEATURES;

/// Why a device stopped the Guest: its text is the Sudden Death reason,
/// naming the device and the queue.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The Guest broke a ring rule on one of the device's queues.
    #[error("{device} queue {index} ({queue}): {source}")]
    Ring {
        device: &'static str,
        index: usize,
        queue: &'static str,
        source: QueueError,
    },
}

/// One device's backend and behaviour.
pub trait Device: Send {
    /// Its name in messages: "console", "block", "net", "rng".
    fn name(&self) -> &'static str;
    /// The virtio device ID (the descriptor's type).
    fn virtio_id(&self) -> u8;
    /// Its queues, by name, in order.
    fn queue_names(&self) -> &'static [&'static str];
    /// How many entries queue `q`'s ring has (at most, on virtio-mmio,
    /// where the driver chooses): the ABI's 256, unless the device has a
    /// reason for more.
    fn queue_size(&self, _q: usize) -> u16 {
        lguest_abi::VRING_DEFAULT_NUM
    }
    /// Device-specific feature bits (the common ones are added).
    fn features(&self) -> u32;
    /// Its config space.
    fn config(&self) -> Vec<u8>;
    /// Queue `q` was kicked (or just became ready).
    fn kick(&mut self, q: usize, queues: &mut Queues) -> Result<(), DeviceError>;
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
    fn backend_ready(&mut self, _queues: &mut Queues) -> Result<(), DeviceError> {
        Ok(())
    }
    /// A descriptor the device waits to become writable (output it could not
    /// write yet, e.g. the console's stdout), while it waits.
    fn output_fd(&self) -> Option<RawFd> {
        None
    }
    /// `output_fd` has room.
    fn output_ready(&mut self, _queues: &mut Queues) -> Result<(), DeviceError> {
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

/// How a transport tells the Guest that a queue has used buffers: the
/// lguest bus raises the queue's own IRQ; virtio-mmio also sets bit 0 of
/// the window's InterruptStatus first.
pub trait Interrupt: Send + Sync {
    /// Queue `q` has handed buffers back and the Guest wants to hear of it.
    fn used_buffers(&self, q: usize);
}

/// The queues of one device, as a device sees them while it works.
pub struct Queues<'a> {
    pub mem: &'a GuestMemory,
    queues: &'a mut [Option<Queue>],
    device: &'static str,
    names: &'static [&'static str],
    irq_state: &'a Irqs,
    interrupt: &'a dyn Interrupt,
}

impl Queues<'_> {
    fn context(&self, q: usize, source: QueueError) -> DeviceError {
        DeviceError::Ring {
            device: self.device,
            index: q,
            queue: self.names[q],
            source,
        }
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
    pub fn want_kicks(&mut self, q: usize, wanted: bool) -> Result<(), DeviceError> {
        match &mut self.queues[q] {
            Some(queue) => queue
                .want_kicks(self.mem, wanted)
                .map_err(|e| self.context(q, e)),
            None => Ok(()),
        }
    }

    /// The next chain the Guest offers on queue `q`.
    pub fn pop(&mut self, q: usize) -> Result<Option<Chain>, DeviceError> {
        match &mut self.queues[q] {
            Some(queue) => queue.pop(self.mem).map_err(|e| self.context(q, e)),
            None => Ok(None),
        }
    }

    /// Hands a chain back with `len` bytes written, interrupting the Guest
    /// if it wants to hear of it.
    pub fn push(&mut self, q: usize, chain: &Chain, len: u32) -> Result<(), DeviceError> {
        self.add_used(q, chain, len)?;
        self.signal(q)
    }

    /// Hands a chain back, leaving the interrupt to [`Queues::signal`]
    /// after the last of a batch: one interrupt for many buffers.
    /*D:540 Done with a chain: its head and length go into the used ring,
     * then the index that publishes them, fenced, since the Guest may be
     * reading right now. Whether to interrupt is the Guest's to say (its
     * NO_INTERRUPT flag, or EVENT_IDX's used_event: see `signal`); how is
     * the transport's, through its Interrupt: the lguest bus raises the
     * queue's own IRQ, virtio-mmio sets InterruptStatus first. */
    pub fn add_used(&mut self, q: usize, chain: &Chain, len: u32) -> Result<(), DeviceError> {
        // The queue may have been taken away since the chain was popped
        // (reset, or QueueReady cleared): the chain goes with it.
        let Some(queue) = self.queues[q].as_mut() else {
            return Ok(());
        };
        queue
            .add_used(self.mem, chain.head, len)
            .map_err(|e| self.context(q, e))
    }

    /// In the middle of a batch: interrupts the Guest now if it asked to
    /// hear of exactly this buffer (EVENT_IDX's used_event), so it can
    /// refill the ring while we finish the batch instead of after. Without
    /// EVENT_IDX a Guest only says "interrupts on", which would mean one
    /// per buffer: then the batch's [`Queues::signal`] does.
    pub fn signal_if_due(&mut self, q: usize) -> Result<(), DeviceError> {
        match &self.queues[q] {
            Some(queue) if queue.event_idx() => self.signal(q),
            _ => Ok(()),
        }
    }

    /// Interrupts the Guest for the buffers handed back on queue `q`, if it
    /// wants to hear of them.
    pub fn signal(&mut self, q: usize) -> Result<(), DeviceError> {
        let Some(queue) = self.queues[q].as_mut() else {
            return Ok(());
        };
        let notify = queue
            .needs_interrupt(self.mem)
            .map_err(|e| self.context(q, e))?;
        if notify {
            self.interrupt.used_buffers(q);
        }
        Ok(())
    }
}

/// What the transport and a device's thread share.
pub struct DeviceState {
    pub device: Box<dyn Device>,
    /// Live queues (None until the transport activates them).
    queues: Vec<Option<Queue>>,
}

/// A device running for one boot, behind its transport.
pub struct Running {
    pub name: &'static str,
    shared: Arc<Shared>,
    /// Which queues the vCPU serves itself ([`Device::serve_inline`]), and
    /// whether it may serve the backend ([`Device::backend_inline`]): asked
    /// once, so a kick needs no lock the device's thread holds while it does
    /// I/O.
    inline_queues: Vec<bool>,
    inline_backend: bool,
    kicks: Vec<Arc<EventFd>>,
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Locks `m`, even if a thread that panicked holding it poisoned it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
    /// Starts the device's thread. Its queues stay down until the
    /// transport activates them; `interrupt` is how it tells the Guest of
    /// used buffers.
    pub fn start(
        device: Box<dyn Device>,
        mem: GuestMemory,
        irqs: Arc<Irqs>,
        interrupt: Box<dyn Interrupt>,
    ) -> std::io::Result<Running> {
        let name = device.name();
        let count = device.queue_names().len();
        let inline_queues = (0..count).map(|q| device.serve_inline(q)).collect();
        let inline_backend = device.backend_inline();
        let shared = Arc::new(Shared {
            state: Mutex::new(DeviceState {
                queues: (0..count).map(|_| None).collect(),
                device,
            }),
            arriving: (0..count).map(|_| Mutex::new(None)).collect(),
            mem,
            irqs,
            interrupt,
        });
        let kicks: Vec<_> = (0..count)
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
    pub fn kick(&self, q: usize) -> Result<(), DeviceError> {
        if self.inline_queues[q] {
            self.shared.serve(|d, queues| d.kick(q, queues))?;
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

    /// Brings queue `q` up: the device serves it from its next turn (a
    /// kick, its backend), whichever thread takes that turn. Like a kick,
    /// this takes no lock the device holds while it does I/O.
    pub fn activate(&self, q: usize, queue: Queue) {
        *lock(&self.shared.arriving[q]) = Some(queue);
    }

    /// Takes queue `q` away from the device (the driver is about to free its
    /// memory); done when this returns.
    pub fn deactivate(&self, q: usize) {
        let mut state = lock(&self.shared.state);
        *lock(&self.shared.arriving[q]) = None;
        state.queues[q] = None;
        state.device.queue_stopped(q);
    }

    /// Whether queue `q` is up (or comes up at the device's next turn).
    #[cfg(test)]
    pub fn queue_ready(&self, q: usize) -> bool {
        lock(&self.shared.arriving[q]).is_some() || lock(&self.shared.state).queues[q].is_some()
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
    pub fn backend_ready(&self) -> Result<(), DeviceError> {
        self.shared.serve(|d, q| d.backend_ready(q))
    }

    /// Resets the device, running `clear` (which wipes what the Guest sees
    /// of it) under the device's lock, so its thread never sees half of it;
    /// done when this returns (the Guest's NOTIFY waits). Kicks not yet
    /// served and queues not yet up are forgotten with the rest.
    pub fn reset(&self, clear: impl FnOnce()) {
        let mut state = lock(&self.shared.state);
        for k in &self.kicks {
            let _ = k.read();
        }
        for slot in &self.shared.arriving {
            *lock(slot) = None;
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
        let _ = self.shared.serve(|d, queues| {
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

/// A device, its queues and what serving them needs: shared by the
/// transport (on the vCPU thread) and the device's own thread.
struct Shared {
    state: Mutex<DeviceState>,
    /// Queues the transport has brought up, waiting for the device's next
    /// turn to join it. A lock of their own, never held across I/O, so
    /// activating one never waits for the device.
    arriving: Vec<Mutex<Option<Queue>>>,
    mem: GuestMemory,
    irqs: Arc<Irqs>,
    interrupt: Box<dyn Interrupt>,
}

impl Shared {
    /// Runs `f` with the device and its queues, those just brought up
    /// included.
    fn serve(
        &self,
        f: impl FnOnce(&mut dyn Device, &mut Queues) -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        for (slot, queue) in self.arriving.iter().zip(state.queues.iter_mut()) {
            if let Some(arrived) = lock(slot).take() {
                *queue = Some(arrived);
            }
        }
        let mut queues = Queues {
            mem: &self.mem,
            queues: &mut state.queues,
            device: state.device.name(),
            names: state.device.queue_names(),
            irq_state: &self.irqs,
            interrupt: self.interrupt.as_ref(),
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
    /*D:505 The other end of a kick: each device has a thread of its own,
     * asleep in epoll on an eventfd per queue, its backend (stdin, a tap)
     * when it wants it, and a stop eventfd. A kick wakes it; it takes the
     * device and serves the queue for as long as the I/O takes, which only
     * the Guest's buffers wait for. A broken ring it finds there is the
     * Guest's Sudden Death, and the thread's end. */
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
                    BACKEND => self.shared.serve(|d, q| d.backend_ready(q)),
                    OUTPUT => self.shared.serve(|d, q| d.output_ready(q)),
                    q => {
                        let q = q as usize;
                        let _ = self.kicks[q].read();
                        self.shared.serve(|d, queues| d.kick(q, queues))
                    }
                };
                if let Err(reason) = result {
                    self.shared.irqs.kill(reason.to_string());
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
            &["requests", "more"]
        }
        fn features(&self) -> u32 {
            0
        }
        fn config(&self) -> Vec<u8> {
            vec![]
        }
        fn kick(&mut self, _q: usize, _queues: &mut Queues) -> Result<(), DeviceError> {
            let _ = self.entered.send(());
            let _ = self.release.recv_timeout(Duration::from_secs(30));
            Ok(())
        }
    }

    /// A transport that never interrupts: this test has no Guest to tell.
    struct Silent;

    impl Interrupt for Silent {
        fn used_buffers(&self, _q: usize) {}
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
        let irqs = Irqs::new().unwrap();
        let running = Running::start(Box::new(slow), mem, irqs, Box::new(Silent)).unwrap();

        running.kick(0).unwrap();
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the device's thread took the first kick");
        // The device's thread is inside its request now. A second NOTIFY,
        // from the vCPU, must come straight back; so must the first kick of
        // the other queue, which brings that queue up (the lguest bus does
        // so at a queue's first kick).
        let (done_tx, done) = mpsc::channel();
        let returned = std::thread::scope(|s| {
            s.spawn(|| {
                let _ = running.kick(0);
                running.activate(1, Queue::new(8, 0x1000, Default::default()));
                let _ = running.kick(1);
                let _ = done_tx.send(());
            });
            let returned = done.recv_timeout(Duration::from_secs(2)).is_ok();
            // Let the device finish either way, so nothing hangs.
            for _ in 0..3 {
                let _ = release.send(());
            }
            returned
        });
        assert!(returned, "NOTIFY waited for the device's I/O to finish");
    }
}
