//! Hypercalls (ABI section 4): what the Guest asks of the Host.
//!
//! A grossly invalid request is never answered with an error: it ends the
//! Guest (Sudden Death), with a reason that says what was wrong. Every
//! physical address a Guest hands us goes through [`GuestMemory::check`].
//!
//! [`Lguest`] is the Guest's ABI state (lguest's `struct lguest`, less the
//! CPU): where its lguest_data is, the async ring's cursor, its gates and
//! its page-table roots. What a hypercall needs of the vCPU or the devices
//! (system registers, the clock, NOTIFY) it asks through [`Machine`], so the
//! rules here run, and are tested and fuzzed, without KVM.

use crate::host_pages::HostTables;
use crate::interrupts_and_traps::{TrapError, Traps};
use crate::lguest_data::LguestData;
use crate::memory::GuestMemory;
use crate::page_tables::{PgtableError, ShadowRoots, Switch};
use crate::segments::{self, SegmentError};
use lguest_abi::{hcall, lguest_data_off as ld, *};

/// Sudden Death reasons from a hypercall.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HcallError {
    #[error("{0} before LGUEST_INIT")]
    BeforeInit(Name),
    #[error("LGUEST_INIT: lguest_data at {0:#x} is outside guest memory (RAM)")]
    InitOutside(u64),
    #[error("LGUEST_INIT twice")]
    InitTwice,
    #[error("Bad hypercall {0}")]
    BadNumber(u64),
    #[error("{call}: address {addr:#x} (+{len}) outside guest memory")]
    Outside { call: Name, addr: u64, len: u64 },
    #[error("bad async hypercall status {status:#x} in slot {slot}")]
    AsyncStatus { status: u8, slot: usize },
    #[error("cannot queue {0} in the async ring")]
    CannotQueue(Name),
    #[error("SHUTDOWN: bad code {0}")]
    ShutdownCode(u64),
    #[error("LOAD_TLS: bases {0:#x}, {1:#x} must be lower-half addresses")]
    TlsBases(u64, u64),
    #[error("Bad NOTIFY {0:#x}")]
    BadNotify(u64),
    #[error("{0}: this Guest has virtio devices; the 2007 DMA device model needs --transport=dma")]
    NoDma(Name),
    /// A rule of the 2007 device model (ABI section 9).
    #[error(transparent)]
    Dma(#[from] crate::dma::DmaError),
    #[error(transparent)]
    PageTable(#[from] PgtableError),
    #[error(transparent)]
    Trap(#[from] TrapError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// A device refused what NOTIFY pointed it at, or the vCPU failed.
    #[error("{0}")]
    Machine(String),
}

/// A hypercall's name, for reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Name(pub u64);

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match hcall::name(self.0) {
            Some(name) => f.write_str(name),
            None => write!(f, "hypercall {}", self.0),
        }
    }
}

/// How a Guest asked to stop (SHUTDOWN): not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shutdown {
    PowerOff(String),
    Restart(String),
    Crash(String),
}

/// What a hypercall gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The value for RAX.
    Rax(u64),
    Shutdown(Shutdown),
}

/// What the hypercalls need of the vCPU and the devices.
pub trait Machine {
    /// Sets or clears CR0.TS.
    fn set_ts(&mut self, on: bool) -> Result<(), HcallError>;
    /// Loads the FS and GS bases.
    fn load_tls(&mut self, fs: u64, gs: u64) -> Result<(), HcallError>;
    /// Loads a new top level (recycling its memslot first if asked), then
    /// flushes the TLB.
    fn switch_root(&mut self, switch: Switch) -> Result<(), HcallError>;
    /// Leaves no stale translation.
    fn flush_tlb(&mut self) -> Result<(), HcallError>;
    fn set_clockevent(&mut self, delta_ns: u64);
    /// HALT: sleep until an interrupt can be delivered; or stop now, when
    /// the devices say the Guest's work is over (the 2007 console's end of
    /// input).
    fn halt(&mut self) -> Option<Shutdown>;
    /// BIND_DMA (ABI section 9): the value for RAX.
    fn bind_dma(&mut self, key: u64, array: u64, count_irq: u64) -> Result<u64, HcallError>;
    /// SEND_DMA (ABI section 9): the sender's used_len is written before it
    /// returns.
    fn send_dma(&mut self, key: u64, dma: u64) -> Result<(), HcallError>;
    /// NOTIFY of a device address: whether a device took it.
    fn notify_device(&mut self, addr: u64) -> Result<bool, HcallError>;
    /// NOTIFY's early console: the Guest's bytes, as they are.
    fn early_console(&mut self, text: &[u8]);
    fn tsc_khz(&self) -> u32;
}

/// Ends the Guest if `[addr, addr + len)` is not the Guest's.
fn check(mem: &GuestMemory, nr: u64, addr: u64, len: u64) -> Result<(), HcallError> {
    mem.check(addr, len).map_err(|_| HcallError::Outside {
        call: Name(nr),
        addr,
        len,
    })
}

/// The Guest's ABI state.
#[derive(Debug)]
pub struct Lguest {
    /// Where lguest_data is, once LGUEST_INIT has run.
    pub data: Option<LguestData>,
    async_cursor: usize,
    pub traps: Traps,
    pub roots: ShadowRoots,
    host_pml4e: u64,
    init_pml4: u64,
}

impl Lguest {
    pub fn new(mem: &GuestMemory, tables: &HostTables) -> Lguest {
        Lguest {
            data: None,
            async_cursor: 0,
            traps: Traps::default(),
            roots: ShadowRoots::new(mem, tables),
            host_pml4e: tables.host_pml4e,
            init_pml4: tables.init_pml4,
        }
    }

    /*H:330 A synchronous hypercall: the first must be LGUEST_INIT; every
     * other first drains the async ring, then runs. */
    pub fn hypercall(
        &mut self,
        mem: &GuestMemory,
        m: &mut impl Machine,
        [nr, a1, a2, a3, a4]: [u64; 5],
    ) -> Result<Answer, HcallError> {
        if self.data.is_none() {
            if nr != hcall::LGUEST_INIT {
                return Err(HcallError::BeforeInit(Name(nr)));
            }
            return self.lguest_init(mem, m, a1).map(|()| Answer::Rax(0));
        }
        self.drain_async(mem, m)?;
        self.do_hypercall(mem, m, nr, [a1, a2, a3, a4])
    }

    /*H:350 Section 4.1: run the queued calls from our cursor, in order, up to
     * the first free slot. Queued calls behave as if made directly; their
     * results are discarded. */
    fn drain_async(&mut self, mem: &GuestMemory, m: &mut impl Machine) -> Result<(), HcallError> {
        let data = self.data.expect("after LGUEST_INIT");
        for _ in 0..HCALL_RING_SIZE {
            let slot = self.async_cursor;
            let status_off = ld::HCALL_STATUS + slot;
            match data.read_u8(mem, status_off) {
                HCALL_STATUS_FREE => return Ok(()),
                HCALL_STATUS_QUEUED => {}
                status => return Err(HcallError::AsyncStatus { status, slot }),
            }
            let call = ld::HCALLS + slot * core::mem::size_of::<HcallArgs>();
            let w = |i: usize| data.read_u64(mem, call + i * 8);
            let nr = w(0);
            if matches!(nr, hcall::LGUEST_INIT | hcall::HALT | hcall::SHUTDOWN) {
                return Err(HcallError::CannotQueue(Name(nr)));
            }
            self.do_hypercall(mem, m, nr, [w(1), w(2), w(3), w(4)])?;
            data.write_u8(mem, status_off, HCALL_STATUS_FREE);
            self.async_cursor = (slot + 1) % HCALL_RING_SIZE;
        }
        Ok(())
    }

    /*H:320 LGUEST_INIT: the Guest tells us where lguest_data is, and we fill
     * in our fields. */
    fn lguest_init(
        &mut self,
        mem: &GuestMemory,
        m: &mut impl Machine,
        addr: u64,
    ) -> Result<(), HcallError> {
        let data = LguestData::at(mem, addr).ok_or(HcallError::InitOutside(addr))?;
        self.data = Some(data);
        data.write_u64(mem, ld::RESERVE_MEM, RESERVE_MEM);
        data.write_u64(mem, ld::PGDIR, self.init_pml4);
        data.write_u32(mem, ld::TSC_KHZ, m.tsc_khz());
        data.write_u16(mem, ld::GUESTID, 0);
        data.write_u64(mem, ld::PFN_LIMIT, mem.layout.pfn_limit);
        data.write_u64(mem, ld::HOST_PML4E, self.host_pml4e);
        data.write_time(mem);
        tracing::debug!(
            lguest_data = format_args!("{addr:#x}"),
            tsc_khz = m.tsc_khz(),
            "LGUEST_INIT"
        );
        Ok(())
    }

    /// One hypercall, direct or queued: lguest's single `match`.
    /*H:340 lguest's hypercall switch: one arm per call, each either done at
     * once or handed to the module of its mechanism. */
    fn do_hypercall(
        &mut self,
        mem: &GuestMemory,
        m: &mut impl Machine,
        nr: u64,
        [a1, a2, a3, a4]: [u64; 4],
    ) -> Result<Answer, HcallError> {
        tracing::trace!(a1, a2, a3, a4, "hypercall {}", Name(nr));
        let done = Ok(Answer::Rax(0));
        match nr {
            hcall::FLUSH_ASYNC | hcall::SEND_INTERRUPTS => done,
            hcall::LGUEST_INIT => Err(HcallError::InitTwice),
            hcall::SHUTDOWN => shutdown(mem, a1, a2).map(Answer::Shutdown),
            hcall::LOAD_GDT => {
                segments::load_gdt(mem, a1, a2)?;
                done
            }
            hcall::NEW_PGTABLE => {
                m.switch_root(self.roots.new_pgtable(mem, a1)?)?;
                done
            }
            hcall::FLUSH_TLB => {
                m.flush_tlb()?;
                done
            }
            hcall::LOAD_IDT_ENTRY => {
                self.traps.load_idt_entry(a1, a2, a3)?;
                done
            }
            hcall::SET_STACK => {
                self.traps.set_stack(a1, a2, a3)?;
                done
            }
            hcall::TS => {
                m.set_ts(a1 != 0)?;
                done
            }
            hcall::SET_CLOCKEVENT => {
                m.set_clockevent(a1);
                done
            }
            hcall::HALT => match m.halt() {
                Some(stop) => Ok(Answer::Shutdown(stop)),
                None => done,
            },
            hcall::GET_WALLCLOCK => Ok(Answer::Rax(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            )),
            hcall::BIND_DMA => m.bind_dma(a1, a2, a3).map(Answer::Rax),
            hcall::SEND_DMA => {
                m.send_dma(a1, a2)?;
                done
            }
            hcall::SET_PTE => {
                check(mem, nr, a1, PAGE_SIZE)?;
                m.flush_tlb()?;
                done
            }
            hcall::SET_PGD => {
                m.switch_root(self.roots.set_pgd(mem, a1, a2)?)?;
                done
            }
            hcall::LOAD_TLS => {
                if a1 >= RESERVE_MEM || a2 >= RESERVE_MEM {
                    return Err(HcallError::TlsBases(a1, a2));
                }
                m.load_tls(a1, a2)?;
                done
            }
            hcall::NOTIFY => {
                notify(mem, m, a1)?;
                done
            }
            hcall::LOAD_GDT_ENTRY => {
                segments::load_gdt_entry(mem, a1, a2)?;
                done
            }
            _ => Err(HcallError::BadNumber(nr)),
        }
    }
}

/// SHUTDOWN: the Guest's reason, and how it wants to stop.
fn shutdown(mem: &GuestMemory, reason_addr: u64, code: u64) -> Result<Shutdown, HcallError> {
    check(mem, hcall::SHUTDOWN, reason_addr, 1)?;
    let reason = mem
        .read_cstr(reason_addr, SHUTDOWN_REASON_MAX)
        .expect("checked");
    let reason = String::from_utf8_lossy(&reason).into_owned();
    match code {
        SHUTDOWN_POWEROFF => Ok(Shutdown::PowerOff(reason)),
        SHUTDOWN_RESTART => Ok(Shutdown::Restart(reason)),
        SHUTDOWN_CRASH => Ok(Shutdown::Crash(reason)),
        _ => Err(HcallError::ShutdownCode(code)),
    }
}

/// NOTIFY: a device's descriptor or ring, or below `mem`, a string for the
/// early console.
fn notify(mem: &GuestMemory, m: &mut impl Machine, addr: u64) -> Result<(), HcallError> {
    if m.notify_device(addr)? {
        return Ok(());
    }
    if addr < mem.layout.mem {
        let text = mem.read_cstr(addr, EARLY_CONSOLE_MAX).expect("below mem");
        m.early_console(&text);
        return Ok(());
    }
    Err(HcallError::BadNotify(addr))
}

/// A [`Machine`] that only records what it is asked: for tests and the
/// fuzzer, which drive the hypercalls over plain memory, without KVM.
#[derive(Debug, Default)]
pub struct RecordingMachine {
    pub cr3: Option<u64>,
    pub recycled: Vec<usize>,
    pub flushes: usize,
    pub halted: bool,
    pub ts: bool,
    pub tls: (u64, u64),
    pub clockevent: Option<u64>,
    pub console: Vec<u8>,
    /// BIND_DMA and SEND_DMA, as `[nr, arg1, arg2, arg3]`: a binding is
    /// taken (RAX 1), a send moves nothing.
    pub dma: Vec<[u64; 4]>,
}

impl Machine for RecordingMachine {
    fn set_ts(&mut self, on: bool) -> Result<(), HcallError> {
        self.ts = on;
        Ok(())
    }
    fn load_tls(&mut self, fs: u64, gs: u64) -> Result<(), HcallError> {
        self.tls = (fs, gs);
        Ok(())
    }
    fn switch_root(&mut self, switch: Switch) -> Result<(), HcallError> {
        self.recycled.extend(switch.recycle);
        self.cr3 = Some(switch.cr3);
        self.flushes += 1;
        Ok(())
    }
    fn flush_tlb(&mut self) -> Result<(), HcallError> {
        self.flushes += 1;
        Ok(())
    }
    fn set_clockevent(&mut self, delta_ns: u64) {
        self.clockevent = Some(delta_ns);
    }
    fn halt(&mut self) -> Option<Shutdown> {
        self.halted = true;
        None
    }
    fn bind_dma(&mut self, key: u64, array: u64, count_irq: u64) -> Result<u64, HcallError> {
        self.dma.push([hcall::BIND_DMA, key, array, count_irq]);
        Ok(1)
    }
    fn send_dma(&mut self, key: u64, dma: u64) -> Result<(), HcallError> {
        self.dma.push([hcall::SEND_DMA, key, dma, 0]);
        Ok(())
    }
    fn notify_device(&mut self, _addr: u64) -> Result<bool, HcallError> {
        Ok(false)
    }
    fn early_console(&mut self, text: &[u8]) {
        self.console.extend_from_slice(text);
    }
    fn tsc_khz(&self) -> u32 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_pages;
    use crate::memory::Layout;

    fn setup() -> (GuestMemory, Lguest) {
        let mem_bytes = 2u64 << 20;
        let pfn_limit = mem_bytes / PAGE_SIZE + 1;
        let mem = GuestMemory::new(Layout {
            mem: mem_bytes,
            pfn_limit,
            mmio_hole_pages: 0,
            host_ro_pages: host_pages::ro_pages_for(pfn_limit),
            host_rw_pages: host_pages::STACK_PAGES,
        })
        .unwrap();
        let tables = host_pages::build(&mem);
        let lg = Lguest::new(&mem, &tables);
        (mem, lg)
    }

    const DATA: u64 = 0x10000;

    fn init(mem: &GuestMemory, lg: &mut Lguest, m: &mut RecordingMachine) {
        for slot in 0..HCALL_RING_SIZE {
            mem.write(DATA + (ld::HCALL_STATUS + slot) as u64, &[0xFF])
                .unwrap();
        }
        let r = lg.hypercall(mem, m, [hcall::LGUEST_INIT, DATA, 0, 0, 0]);
        assert_eq!(r, Ok(Answer::Rax(0)));
    }

    fn queue(mem: &GuestMemory, slot: usize, call: [u64; 5]) {
        let at = DATA + (ld::HCALLS + slot * 40) as u64;
        for (i, w) in call.iter().enumerate() {
            mem.write_u64(at + i as u64 * 8, *w).unwrap();
        }
        mem.write(DATA + (ld::HCALL_STATUS + slot) as u64, &[0])
            .unwrap();
    }

    #[test]
    fn first_call_must_be_init() {
        let (mem, mut lg) = setup();
        let mut m = RecordingMachine::default();
        assert_eq!(
            lg.hypercall(&mem, &mut m, [hcall::NOTIFY, 0, 0, 0, 0]),
            Err(HcallError::BeforeInit(Name(hcall::NOTIFY)))
        );
        init(&mem, &mut lg, &mut m);
        assert_eq!(
            lg.hypercall(&mem, &mut m, [hcall::LGUEST_INIT, DATA, 0, 0, 0]),
            Err(HcallError::InitTwice)
        );
    }

    #[test]
    fn the_async_ring_runs_in_order_and_wraps() {
        let (mem, mut lg) = setup();
        let mut m = RecordingMachine::default();
        init(&mem, &mut lg, &mut m);
        queue(&mem, 0, [hcall::SET_CLOCKEVENT, 5, 0, 0, 0]);
        queue(&mem, 1, [hcall::TS, 1, 0, 0, 0]);
        assert_eq!(
            lg.hypercall(&mem, &mut m, [hcall::FLUSH_ASYNC, 0, 0, 0, 0]),
            Ok(Answer::Rax(0))
        );
        assert_eq!((m.clockevent, m.ts), (Some(5), true));
        let status = |slot: usize| {
            let mut b = [0u8];
            mem.read(DATA + (ld::HCALL_STATUS + slot) as u64, &mut b)
                .unwrap();
            b[0]
        };
        assert_eq!((status(0), status(1)), (0xFF, 0xFF));
        // A queued HALT is Sudden Death; so is a status other than 0/0xFF.
        queue(&mem, 2, [hcall::HALT, 0, 0, 0, 0]);
        assert_eq!(
            lg.hypercall(&mem, &mut m, [hcall::FLUSH_ASYNC, 0, 0, 0, 0]),
            Err(HcallError::CannotQueue(Name(hcall::HALT)))
        );
        assert!(!m.halted);
    }

    #[test]
    fn dma_calls_reach_the_machine_direct_or_queued() {
        let (mem, mut lg) = setup();
        let mut m = RecordingMachine::default();
        init(&mem, &mut lg, &mut m);
        let bind = [hcall::BIND_DMA, 0x10_0000, 0x3000, 4 << 8 | 5, 0];
        assert_eq!(lg.hypercall(&mem, &mut m, bind), Ok(Answer::Rax(1)));
        queue(&mem, 0, [hcall::SEND_DMA, 0, 0x4000, 0, 0]);
        assert_eq!(
            lg.hypercall(&mem, &mut m, [hcall::FLUSH_ASYNC, 0, 0, 0, 0]),
            Ok(Answer::Rax(0))
        );
        assert_eq!(
            m.dma,
            vec![
                [hcall::BIND_DMA, 0x10_0000, 0x3000, 4 << 8 | 5],
                [hcall::SEND_DMA, 0, 0x4000, 0]
            ]
        );
    }

    #[test]
    fn bad_arguments_are_sudden_death() {
        let (mem, mut lg) = setup();
        let mut m = RecordingMachine::default();
        init(&mem, &mut lg, &mut m);
        let limit = mem.layout.guest_limit();
        let mut call = |c: [u64; 5]| lg.hypercall(&mem, &mut m, c).unwrap_err().to_string();
        assert_eq!(call([99, 0, 0, 0, 0]), "Bad hypercall 99");
        assert!(call([hcall::LOAD_GDT, limit, 12, 0, 0]).contains("outside guest memory"));
        assert!(call([hcall::SHUTDOWN, 0x2000, 7, 0, 0]).contains("bad code 7"));
        assert!(call([hcall::NOTIFY, limit, 0, 0, 0]).contains("Bad NOTIFY"));
        assert!(call([hcall::LOAD_TLS, 1 << 47, 0, 0, 0]).contains("lower-half"));
        assert!(call([hcall::SET_PGD, 0x3000, 0, 0, 0]).contains("not the loaded one"));
    }
}
