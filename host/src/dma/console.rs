//! The console of the 2007 model: output is SEND_DMA to key 0, input goes
//! into the buffers the Guest bound at key 0.
//!
//! Input is read on a thread of its own. What finds no free buffer waits
//! here (none is lost), and while a full buffer's worth waits we stop
//! reading, so a Guest that never reads can't make us grow. The Guest frees
//! a buffer by writing its used_len back to 0, which the Host does not see;
//! so waiting input looks again when the Guest binds, when the caller
//! [pokes](Console::poke) us (at HALT), and every few milliseconds anyway.
//! At end of input, once the Guest has taken every byte, [`Signals`] hears
//! of it, and the Launcher powers the Guest off.
//!
//! [`Signals`]: super::Signals

use super::{DeviceContext, Sent};
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// Input held for the Guest before we stop reading.
const PENDING_MAX: usize = 4096;
/// How often waiting input looks for a buffer the Guest freed quietly.
const RETRY: Duration = Duration::from_millis(5);
const CTRL_C: u8 = 3;
const KEY: u64 = lguest_abi::LGUEST_CONSOLE_DMA_KEY;

/// Where the console's bytes come from and go to.
pub struct ConsoleConfig {
    /// Input: stdin, or a pipe in tests. `None`: no input at all (the Guest
    /// never gets any, and it is not end of input either).
    pub input: Option<Arc<OwnedFd>>,
    /// Output: stdout, or a buffer in tests.
    pub output: Arc<Mutex<dyn Write + Send>>,
    /// Whether input is a terminal in raw mode: three Ctrl-C within a
    /// second end the Guest.
    pub raw_terminal: bool,
}

impl ConsoleConfig {
    /// The Launcher's console: stdin and stdout.
    pub fn stdio(raw_terminal: bool) -> std::io::Result<ConsoleConfig> {
        let stdin = std::io::stdin().as_fd().try_clone_to_owned()?;
        Ok(ConsoleConfig {
            input: Some(Arc::new(stdin)),
            output: Arc::new(Mutex::new(std::io::stdout())),
            raw_terminal,
        })
    }
}

pub struct Console {
    output: Arc<Mutex<dyn Write + Send>>,
    wake: Arc<EventFd>,
    /// Whether input (or its end) waits for the Guest to free a buffer:
    /// only then is a poke worth a wake-up.
    waiting: Arc<AtomicBool>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Console {
    pub(crate) fn start(cfg: &ConsoleConfig, ctx: DeviceContext) -> std::io::Result<Console> {
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let waiting = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let thread = match &cfg.input {
            Some(input) => {
                let input = Input {
                    fd: input.clone(),
                    ctx,
                    wake: wake.clone(),
                    waiting: waiting.clone(),
                    stop: stop.clone(),
                    raw_terminal: cfg.raw_terminal,
                    pending: VecDeque::new(),
                    eof: false,
                    ctrl_c: VecDeque::new(),
                };
                Some(
                    std::thread::Builder::new()
                        .name("dma-console".into())
                        .spawn(move || {
                            crate::sandbox::enter_thread(crate::sandbox::ThreadKind::Device);
                            input.run()
                        })?,
                )
            }
            None => None,
        };
        Ok(Console {
            output: cfg.output.clone(),
            wake,
            waiting,
            stop,
            thread,
        })
    }

    /// SEND_DMA to key 0: the bytes as they are.
    pub(crate) fn output(&self, bytes: &[u8]) -> Sent {
        let mut out = super::lock(&self.output);
        let ok = out.write_all(bytes).and_then(|()| out.flush()).is_ok();
        Sent {
            used_len: if ok { bytes.len() as u32 } else { 0 },
            raise: None,
        }
    }

    /// Waiting input looks for a free buffer now (nothing happens when
    /// nothing waits: the Guest may halt often).
    pub fn poke(&self) {
        if self.waiting.load(Ordering::SeqCst) {
            self.wake();
        }
    }

    /// The input thread looks at the bindings again, whatever waits: new
    /// buffers may be what the end of input was waiting for.
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Input {
    fd: Arc<OwnedFd>,
    ctx: DeviceContext,
    wake: Arc<EventFd>,
    waiting: Arc<AtomicBool>,
    stop: Arc<EventFd>,
    raw_terminal: bool,
    pending: VecDeque<u8>,
    eof: bool,
    ctrl_c: VecDeque<Instant>,
}

impl Input {
    fn run(mut self) {
        let mut told_eof = false;
        loop {
            self.deliver();
            // At the end of input, a Guest that reads its console has to
            // finish with what it was given; one that never bound a buffer
            // at key 0 never hears of it.
            let mut eof_waits = false;
            if self.eof && self.pending.is_empty() && !told_eof {
                let (bound, all_free) = self.console_buffers();
                if bound && all_free {
                    self.ctx.signals.end_of_input();
                    // A Guest asleep waiting for input wakes, finds none
                    // and halts again: where the Launcher hears of it.
                    let irq = super::lock(&self.ctx.bindings).irq_at(KEY);
                    if let Some(irq) = irq {
                        self.ctx.signals.raise(irq);
                    }
                    told_eof = true;
                }
                eof_waits = bound && !all_free;
            }
            let reading = !self.eof && self.pending.len() < PENDING_MAX;
            // Waiting input, or end of input the Guest has not finished
            // with, looks again soon; otherwise we sleep until told (a
            // BIND_DMA or the caller's poke).
            let waiting = !self.pending.is_empty() || eof_waits;
            self.waiting.store(waiting, Ordering::SeqCst);
            let mut fds = [
                pollfd(self.stop.as_raw_fd()),
                pollfd(self.wake.as_raw_fd()),
                pollfd(if reading { self.fd.as_raw_fd() } else { -1 }),
            ];
            let timeout = if waiting {
                RETRY.as_millis() as i32
            } else {
                -1
            };
            // SAFETY: three pollfds we own; poll writes only their revents.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, timeout) };
            if n < 0 {
                continue; // EINTR
            }
            if fds[0].revents != 0 {
                return;
            }
            if fds[1].revents != 0 {
                let _ = self.wake.read();
            }
            if fds[2].revents != 0 {
                self.read_input();
            }
        }
    }

    /// Reads what stdin has, up to the room left.
    fn read_input(&mut self) {
        let mut buf = [0u8; PENDING_MAX];
        let room = PENDING_MAX - self.pending.len();
        // SAFETY: reads at most `room` bytes into our own buffer.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), room) };
        match n {
            0 => self.eof = true,
            n if n > 0 => {
                let input = &buf[..n as usize];
                if self.raw_terminal && self.three_ctrl_c(input) {
                    self.ctx
                        .signals
                        .kill("ended by the user (three Ctrl-C)".into());
                }
                self.pending.extend(input);
            }
            _ => {
                let err = std::io::Error::last_os_error();
                if !matches!(
                    err.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) {
                    // An unreadable stdin is the end of input.
                    self.eof = true;
                }
            }
        }
    }

    /// Moves waiting input into free buffers while both last.
    fn deliver(&mut self) {
        while !self.pending.is_empty() {
            let taken = self.ctx.deliver(
                lguest_abi::LGUEST_CONSOLE_DMA_KEY,
                self.pending.make_contiguous(),
            );
            match taken {
                // A buffer with no room takes nothing: wait for another.
                Some(n) if n > 0 => drop(self.pending.drain(..n as usize)),
                _ => return,
            }
        }
    }

    /// Whether the Guest reads its console (it bound buffers at key 0),
    /// and whether every one of those buffers is free again: it has read
    /// all we gave it.
    fn console_buffers(&self) -> (bool, bool) {
        let bindings = super::lock(&self.ctx.bindings);
        let mem = self.ctx.mem.as_ref();
        let mut bound = false;
        let all_free = bindings
            .list()
            .iter()
            .filter(|b| b.key == lguest_abi::LGUEST_CONSOLE_DMA_KEY)
            .all(|b| {
                bound = true;
                (0..b.count as u64).all(|i| {
                    let at = b.array.wrapping_add(i * super::bindings::DMA_SIZE);
                    // A buffer we can't read holds nothing of ours.
                    mem.read_u32(at).map_or(true, |used| used == 0)
                })
            });
        (bound, all_free)
    }

    /// Counts Ctrl-C bytes; true when three came within a second.
    fn three_ctrl_c(&mut self, input: &[u8]) -> bool {
        for _ in input.iter().filter(|&&b| b == CTRL_C) {
            let now = Instant::now();
            self.ctrl_c.push_back(now);
            while self
                .ctrl_c
                .front()
                .is_some_and(|t| now - *t > Duration::from_secs(1))
            {
                self.ctrl_c.pop_front();
            }
            if self.ctrl_c.len() >= 3 {
                return true;
            }
        }
        false
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}
