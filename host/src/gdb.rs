//! Debugging a Guest with gdb: `lguest --gdb=[ADDR:]PORT`.
//!
//! The Launcher loads the Guest, listens, and waits for gdb before the
//! Guest's first instruction. From then on gdb talks to a stub built on the
//! `gdbstub` crate, which speaks the remote protocol; this module is what the
//! stub talks *about*: the Guest's registers, its memory seen through its own
//! page tables, and breakpoints.
//!
//! No help from KVM is needed (nor, on PVM, to be had: see
//! docs/machine-notes.md). The Host already sees every trap the Guest takes,
//! through its ring-0 stubs, so a breakpoint is an `int3` byte we write into
//! the Guest's code and a single step is RFLAGS.TF. The vCPU's side of it,
//! which turns those traps into stops and keeps them out of the Guest's
//! sight, is in `vcpu/debug.rs`.
//!
//! The stub runs on the vCPU thread. While the Guest is stopped the thread
//! just reads gdb's packets. While it runs, a watcher thread polls the
//! connection and kicks the vCPU when gdb says something (Ctrl-C), the way
//! device threads kick it to deliver an interrupt.

use crate::kick::{self, Irqs};
use crate::memory::GuestMemory;
use crate::pagewalk::{translate, Access};
use gdbstub::arch::{Arch, Registers};
use gdbstub::common::Signal;
use gdbstub::conn::Connection;
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{DisconnectReason, GdbStub, SingleThreadStopReason};
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep,
    SingleThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, SwBreakpoint, SwBreakpointOps,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::id::X86_64CoreRegId;
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use lguest_abi::{GUEST_DS, PAGE_SIZE, RESERVE_MEM};
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use vmm_sys_util::eventfd::EventFd;

/// The byte of `int3`.
pub const INT3: u8 = 0xCC;

#[derive(Debug, thiserror::Error)]
pub enum GdbError {
    #[error("--gdb={0}: expected PORT or ADDR:PORT (such as 1234 or 127.0.0.1:1234)")]
    BadAddress(String),
    #[error("--gdb: cannot listen on {addr}: {err}")]
    Listen {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("--gdb: waiting for gdb failed: {0}")]
    Accept(std::io::Error),
    #[error("--gdb: cannot start the connection watcher: {0}")]
    Watcher(std::io::Error),
    #[error("cannot write the Guest to {path}: {err}")]
    WriteGuest { path: String, err: std::io::Error },
}

/// `PORT` (on 127.0.0.1) or `ADDR:PORT`; port 0 lets the system choose.
pub fn parse_address(spec: &str) -> Result<SocketAddr, GdbError> {
    let bad = || GdbError::BadAddress(spec.to_string());
    if let Ok(port) = spec.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if !spec.contains(':') {
        return Err(bad());
    }
    spec.to_socket_addrs()
        .map_err(|_| bad())?
        .next()
        .ok_or_else(bad)
}

/// Writes a bundled Guest's ELF (symbols included) to `path`, for gdb.
pub fn write_guest(path: &std::path::Path, elf: &[u8]) -> Result<(), GdbError> {
    std::fs::write(path, elf).map_err(|err| GdbError::WriteGuest {
        path: path.display().to_string(),
        err,
    })
}

/// `poll` on `fds` for input; which of them are ready (or hung up).
fn poll_input(fds: &[RawFd], timeout_ms: i32) -> std::io::Result<Vec<bool>> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `polls` is a live array of valid pollfds for the whole call.
    let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(polls.iter().map(|p| p.revents != 0).collect())
}

/*
 * The listener, and the session across boots.
 */

/// The socket gdb will connect to, bound while the Launcher checks its
/// arguments (a port in use is a set-up error).
pub struct GdbServer {
    listener: TcpListener,
}

impl GdbServer {
    pub fn bind(spec: &str) -> Result<GdbServer, GdbError> {
        let addr = parse_address(spec)?;
        let listener = TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|err| GdbError::Listen { addr, err })?;
        Ok(GdbServer { listener })
    }

    /// Says where we listen (the port, if the system chose it), then waits
    /// for gdb. `None` if the user ended the wait with three Ctrl-C.
    fn wait(&self, mem: &GuestMemory, cr3: u64) -> Result<Option<Debugger>, GdbError> {
        let addr = self.listener.local_addr().map_err(GdbError::Accept)?;
        eprintln!("lguest: waiting for gdb on {addr}");
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    tracing::debug!(%peer, "gdb attached");
                    break stream;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Look at Ctrl-C now and then: accept itself ignores it.
                    match poll_input(&[self.listener.as_raw_fd()], 200) {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(GdbError::Accept(e)),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(GdbError::Accept(e)),
            }
            if kick::user_stopped() {
                return Ok(None);
            }
        };
        stream.set_nonblocking(false).map_err(GdbError::Accept)?;
        Debugger::new(stream, mem.clone(), cr3).map(Some)
    }
}

/// gdb across the boots of one Launcher run: the listener until gdb first
/// attaches, then the session, which follows the Guest through restarts
/// until gdb detaches.
pub struct Link<'a> {
    server: Option<&'a GdbServer>,
    debugger: Option<Box<Debugger>>,
}

impl<'a> Link<'a> {
    pub fn new(server: Option<&'a GdbServer>) -> Link<'a> {
        Link {
            server,
            debugger: None,
        }
    }

    /// Before a boot's first instruction: the first time, wait for gdb; then
    /// the session to hand to the Guest (the vCPU loop's `attach_gdb`).
    pub fn before_boot(&mut self, mem: &GuestMemory, init_pml4: u64) -> Result<Attach, GdbError> {
        if let Some(server) = self.server.take() {
            match server.wait(mem, init_pml4)? {
                Some(debugger) => self.debugger = Some(Box::new(debugger)),
                None => return Ok(Attach::GaveUp),
            }
        }
        Ok(Attach::Session(self.debugger.take()))
    }

    /// After a boot, with the session the Guest gives back. A Guest that
    /// stopped for good (not a restart) is reported to gdb, which ends the
    /// session.
    pub fn after_boot(&mut self, debugger: Option<Box<Debugger>>, end: End) {
        self.debugger = debugger;
        if end != End::Restart {
            if let Some(mut debugger) = self.debugger.take() {
                debugger.report_end(end);
            }
        }
    }
}

/// What [`Link::before_boot`] found.
pub enum Attach {
    /// The user gave up waiting for gdb (three Ctrl-C).
    GaveUp,
    /// The session for this boot, if gdb is attached.
    Session(Option<Box<Debugger>>),
}

/// How a boot ended, as gdb hears of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    PowerOff,
    Restart,
    Crash,
    Killed,
}

/*
 * The registers gdb sees: gdbstub_arch's x86-64 set (general registers,
 * RIP, EFLAGS, selectors, x87 and SSE), plus FS and GS base, which gdb knows
 * from the "org.gnu.gdb.i386.segments" feature of our target description.
 */

/// x86-64 with FS/GS base.
pub enum GuestArch {}

impl Arch for GuestArch {
    type Usize = u64;
    type Registers = Regs;
    type RegId = X86_64CoreRegId;
    type BreakpointKind = usize;

    fn target_description_xml() -> Option<&'static str> {
        Some(target_xml())
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Regs {
    pub core: X86_64CoreRegs,
    pub fs_base: u64,
    pub gs_base: u64,
}

/// Bytes of gdbstub_arch's register block, before FS/GS base.
const CORE_BYTES: usize = 0x218;

impl Registers for Regs {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.core.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        self.core.gdb_serialize(&mut write_byte);
        for b in self.fs_base.to_le_bytes().into_iter() {
            write_byte(Some(b));
        }
        for b in self.gs_base.to_le_bytes().into_iter() {
            write_byte(Some(b));
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        self.core.gdb_deserialize(bytes)?;
        let word = |at: usize| {
            bytes
                .get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        };
        if let (Some(fs), Some(gs)) = (word(CORE_BYTES), word(CORE_BYTES + 8)) {
            (self.fs_base, self.gs_base) = (fs, gs);
        }
        Ok(())
    }
}

/// The target description: gdb's amd64 registers in gdbstub_arch's order.
fn target_xml() -> &'static str {
    static XML: OnceLock<String> = OnceLock::new();
    XML.get_or_init(|| {
        let mut x = String::from(
            r#"<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0"><architecture>i386:x86-64</architecture><feature name="org.gnu.gdb.i386.core"><flags id="i386_eflags" size="4">"#,
        );
        let flag = |x: &mut String, name: &str, bit: u32| {
            x.push_str(&format!(
                r#"<field name="{name}" start="{bit}" end="{bit}"/>"#
            ));
        };
        for (name, bit) in [
            ("CF", 0),
            ("", 1),
            ("PF", 2),
            ("AF", 4),
            ("ZF", 6),
            ("SF", 7),
            ("TF", 8),
            ("IF", 9),
            ("DF", 10),
            ("OF", 11),
            ("NT", 14),
            ("RF", 16),
            ("VM", 17),
            ("AC", 18),
            ("VIF", 19),
            ("VIP", 20),
            ("ID", 21),
        ] {
            flag(&mut x, name, bit);
        }
        x.push_str("</flags>");
        let reg = |x: &mut String, name: &str, bits: u32, ty: &str| {
            x.push_str(&format!(
                r#"<reg name="{name}" bitsize="{bits}" type="{ty}"/>"#
            ));
        };
        for name in ["rax", "rbx", "rcx", "rdx", "rsi", "rdi"] {
            reg(&mut x, name, 64, "int64");
        }
        reg(&mut x, "rbp", 64, "data_ptr");
        reg(&mut x, "rsp", 64, "data_ptr");
        for n in 8..16 {
            reg(&mut x, &format!("r{n}"), 64, "int64");
        }
        reg(&mut x, "rip", 64, "code_ptr");
        reg(&mut x, "eflags", 32, "i386_eflags");
        for name in ["cs", "ss", "ds", "es", "fs", "gs"] {
            reg(&mut x, name, 32, "int32");
        }
        for n in 0..8 {
            reg(&mut x, &format!("st{n}"), 80, "i387_ext");
        }
        for name in [
            "fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop",
        ] {
            x.push_str(&format!(
                r#"<reg name="{name}" bitsize="32" type="int" group="float"/>"#
            ));
        }
        x.push_str(r#"</feature><feature name="org.gnu.gdb.i386.sse">"#);
        for (id, ty, count) in [
            ("v4f", "ieee_single", 4),
            ("v2d", "ieee_double", 2),
            ("v16i8", "int8", 16),
            ("v8i16", "int16", 8),
            ("v4i32", "int32", 4),
            ("v2i64", "int64", 2),
        ] {
            x.push_str(&format!(
                r#"<vector id="{id}" type="{ty}" count="{count}"/>"#
            ));
        }
        x.push_str(r#"<union id="vec128">"#);
        for (name, ty) in [
            ("v4_float", "v4f"),
            ("v2_double", "v2d"),
            ("v16_int8", "v16i8"),
            ("v8_int16", "v8i16"),
            ("v4_int32", "v4i32"),
            ("v2_int64", "v2i64"),
            ("uint128", "uint128"),
        ] {
            x.push_str(&format!(r#"<field name="{name}" type="{ty}"/>"#));
        }
        x.push_str(r#"</union><flags id="i386_mxcsr" size="4">"#);
        for (bit, name) in [
            "IE", "DE", "ZE", "OE", "UE", "PE", "DAZ", "IM", "DM", "ZM", "OM", "UM", "PM", "FZ",
        ]
        .into_iter()
        .enumerate()
        {
            flag(&mut x, name, bit as u32);
        }
        x.push_str("</flags>");
        for n in 0..16 {
            reg(&mut x, &format!("xmm{n}"), 128, "vec128");
        }
        x.push_str(r#"<reg name="mxcsr" bitsize="32" type="i386_mxcsr" group="vector"/>"#);
        x.push_str(r#"</feature><feature name="org.gnu.gdb.i386.segments">"#);
        reg(&mut x, "fs_base", 64, "int");
        reg(&mut x, "gs_base", 64, "int");
        x.push_str("</feature></target>");
        x
    })
}

/// The x87 and SSE part of gdb's registers, from KVM's FPU state.
pub fn fpu_to_gdb(fpu: &kvm_bindings::kvm_fpu, core: &mut X86_64CoreRegs) {
    for (st, fpr) in core.st.iter_mut().zip(&fpu.fpr) {
        st.copy_from_slice(&fpr[..10]);
    }
    // KVM keeps FXSAVE's abridged tag (a bit per register, set when in
    // use); gdb shows the full one (two bits, 3 for empty).
    let ftag = (0..8).fold(0u32, |tag, i| {
        let empty = fpu.ftwx & (1 << i) == 0;
        tag | if empty { 3 << (2 * i) } else { 0 }
    });
    core.fpu = gdbstub_arch::x86::reg::X87FpuInternalRegs {
        fctrl: fpu.fcw.into(),
        fstat: fpu.fsw.into(),
        ftag,
        fiseg: (fpu.last_ip >> 32) as u32,
        fioff: fpu.last_ip as u32,
        foseg: (fpu.last_dp >> 32) as u32,
        fooff: fpu.last_dp as u32,
        fop: fpu.last_opcode.into(),
    };
    for (x, xmm) in core.xmm.iter_mut().zip(&fpu.xmm) {
        *x = u128::from_le_bytes(*xmm);
    }
    core.mxcsr = fpu.mxcsr;
}

/// gdb's x87 and SSE registers back into KVM's FPU state.
pub fn gdb_to_fpu(core: &X86_64CoreRegs, fpu: &mut kvm_bindings::kvm_fpu) {
    for (fpr, st) in fpu.fpr.iter_mut().zip(&core.st) {
        fpr[..10].copy_from_slice(st);
    }
    let f = &core.fpu;
    fpu.fcw = f.fctrl as u16;
    fpu.fsw = f.fstat as u16;
    fpu.ftwx = (0..8).fold(0u8, |tag, i| {
        tag | if (f.ftag >> (2 * i)) & 3 != 3 {
            1 << i
        } else {
            0
        }
    });
    fpu.last_ip = (u64::from(f.fiseg) << 32) | u64::from(f.fioff);
    fpu.last_dp = (u64::from(f.foseg) << 32) | u64::from(f.fooff);
    fpu.last_opcode = f.fop as u16;
    for (xmm, x) in fpu.xmm.iter_mut().zip(&core.xmm) {
        *xmm = x.to_le_bytes();
    }
    fpu.mxcsr = core.mxcsr;
}

/// RFLAGS bits gdb may change: the arithmetic flags, DF and AC. The rest
/// (TF, IF, IOPL...) belong to the Host's running of the Guest.
const USER_FLAGS: u32 = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800 | 0x4_0000;

/*
 * The Target: the Guest as the stub sees it while stopped.
 */

/// An address gdb named that is not the Guest's memory.
#[derive(Debug, thiserror::Error)]
#[error("{0:#x} is not Guest memory")]
pub struct Unreachable(pub u64);

/// How gdb asked the Guest to go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    Continue,
    Step,
}

/// Why the Guest stopped, for gdb.
pub type StopReason = SingleThreadStopReason<u64>;

/// A breakpoint's byte: what was there before our `int3`, and how many of
/// gdb's addresses (aliases of one physical byte) share it.
#[derive(Clone, Copy, Debug)]
struct Saved {
    original: u8,
    users: u32,
}

/// The stopped Guest as gdb reads and changes it: a copy of its registers
/// (written back when it resumes), and its memory, through its page tables.
pub struct View {
    mem: GuestMemory,
    cr3: u64,
    regs: Regs,
    written: Option<Regs>,
    /// gdb's breakpoint addresses (virtual) and the physical byte of each.
    breakpoints: BTreeMap<u64, u64>,
    saved: BTreeMap<u64, Saved>,
    resume: Option<Resume>,
}

impl View {
    fn new(mem: GuestMemory, cr3: u64) -> View {
        View {
            mem,
            cr3,
            regs: Regs::default(),
            written: None,
            breakpoints: BTreeMap::new(),
            saved: BTreeMap::new(),
            resume: None,
        }
    }

    /// Guest-physical address of `va` in the current address space: a
    /// lower-half address, mapped for ring 3, landing in Guest memory (RAM or
    /// device pages: never a Host page or the mmio hole).
    fn physical(&self, va: u64) -> Option<u64> {
        let pa = translate(&self.mem, self.cr3, va, Access::Read)?;
        self.mem.check(pa, 1).ok().map(|()| pa)
    }

    /// Reads what it can from `va`: the number of bytes read. Our `int3`s
    /// read as the bytes they replaced.
    pub fn read_virtual(&self, va: u64, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let Some(at) = va.checked_add(done as u64) else {
                break;
            };
            let Some(pa) = self.physical(at) else {
                break;
            };
            let n = (buf.len() - done).min((PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize);
            let chunk = &mut buf[done..done + n];
            if self.mem.read(pa, chunk).is_err() {
                break;
            }
            for (saved_pa, saved) in self.saved.range(pa..pa + n as u64) {
                chunk[(saved_pa - pa) as usize] = saved.original;
            }
            done += n;
        }
        done
    }

    /// Writes `data` at `va`, all or nothing. A byte under one of our
    /// breakpoints changes the byte we will put back.
    pub fn write_virtual(&mut self, va: u64, data: &[u8]) -> Result<(), Unreachable> {
        let mut pieces = Vec::new();
        let mut done = 0;
        while done < data.len() {
            let at = va.wrapping_add(done as u64);
            let pa = self
                .physical(at)
                .filter(|_| at >= va)
                .ok_or(Unreachable(at))?;
            let n = (data.len() - done).min((PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize);
            self.mem.check(pa, n as u64).map_err(|_| Unreachable(at))?;
            pieces.push((pa, done, n));
            done += n;
        }
        for (pa, from, n) in pieces {
            let mut bytes = data[from..from + n].to_vec();
            for (saved_pa, saved) in self.saved.range_mut(pa..pa + n as u64) {
                let i = (saved_pa - pa) as usize;
                saved.original = bytes[i];
                bytes[i] = INT3;
            }
            self.mem.write(pa, &bytes).map_err(|_| Unreachable(pa))?;
        }
        Ok(())
    }

    /// Whether the `int3` at virtual `va` (in address space `cr3`) is ours.
    pub fn is_breakpoint(&self, cr3: u64, va: u64) -> bool {
        translate(&self.mem, cr3, va, Access::Read).is_some_and(|pa| self.saved.contains_key(&pa))
    }

    fn insert(&mut self, va: u64) -> bool {
        if self.breakpoints.contains_key(&va) {
            return true;
        }
        // Breakpoints go in RAM only.
        let Some(pa) = self.physical(va).filter(|&pa| pa < self.mem.layout.mem) else {
            return false;
        };
        if let Some(saved) = self.saved.get_mut(&pa) {
            saved.users += 1;
        } else {
            let mut original = [0u8];
            if self.mem.read(pa, &mut original).is_err() || self.mem.write(pa, &[INT3]).is_err() {
                return false;
            }
            self.saved.insert(
                pa,
                Saved {
                    original: original[0],
                    users: 1,
                },
            );
        }
        self.breakpoints.insert(va, pa);
        true
    }

    fn remove(&mut self, va: u64) {
        let Some(pa) = self.breakpoints.remove(&va) else {
            return;
        };
        let Some(saved) = self.saved.get_mut(&pa) else {
            return;
        };
        saved.users -= 1;
        if saved.users == 0 {
            let original = saved.original;
            self.saved.remove(&pa);
            // Put the byte back, unless the Guest has written over our int3
            // (then its own byte stays).
            let mut now = [0u8];
            if self.mem.read(pa, &mut now).is_ok() && now[0] == INT3 {
                let _ = self.mem.write(pa, &[original]);
            }
        }
    }

    /// Takes every breakpoint out of the Guest (gdb is leaving).
    fn remove_all(&mut self) {
        for va in self.breakpoints.keys().copied().collect::<Vec<_>>() {
            self.remove(va);
        }
    }

    /// A new boot: the same breakpoints, put into fresh memory.
    fn rebase(&mut self, mem: GuestMemory, cr3: u64) {
        let wanted: Vec<u64> = self.breakpoints.keys().copied().collect();
        self.breakpoints.clear();
        self.saved.clear();
        (self.mem, self.cr3) = (mem, cr3);
        for va in wanted {
            self.insert(va);
        }
    }

    /// gdb's register write, checked: the Host's selectors stay, the
    /// Guest's code and stack stay in the lower half, and only the flags a
    /// Guest may set itself change.
    fn checked(&self, new: &Regs) -> Option<Regs> {
        let old = &self.regs;
        let lower = |v: u64| v < RESERVE_MEM;
        let (s, o) = (&new.core.segments, &old.core.segments);
        let data_ok = |new: u32, old: u32| new == old || new == 0 || new == GUEST_DS as u32;
        let ok = lower(new.core.rip)
            && lower(new.core.regs[7])
            && s.cs == o.cs
            && s.ss == o.ss
            && data_ok(s.ds, o.ds)
            && data_ok(s.es, o.es)
            && data_ok(s.fs, o.fs)
            && data_ok(s.gs, o.gs)
            && (new.fs_base == old.fs_base || lower(new.fs_base))
            && (new.gs_base == old.gs_base || lower(new.gs_base));
        if !ok {
            return None;
        }
        let mut regs = new.clone();
        regs.core.eflags = (old.core.eflags & !USER_FLAGS) | (new.core.eflags & USER_FLAGS);
        Some(regs)
    }
}

impl Target for View {
    type Arch = GuestArch;
    type Error = &'static str;

    fn base_ops(&mut self) -> BaseOps<'_, GuestArch, &'static str> {
        BaseOps::SingleThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
}

/// gdbserver's answer to memory it cannot reach: E01.
const E_MEMORY: u8 = 1;
/// A register value we won't put in the Guest: E16 (EINVAL).
const E_REGISTER: u8 = 22;

impl SingleThreadBase for View {
    fn read_registers(&mut self, regs: &mut Regs) -> TargetResult<(), Self> {
        *regs = self.written.clone().unwrap_or_else(|| self.regs.clone());
        Ok(())
    }

    fn write_registers(&mut self, regs: &Regs) -> TargetResult<(), Self> {
        let regs = self.checked(regs).ok_or(TargetError::Errno(E_REGISTER))?;
        self.written = Some(regs);
        Ok(())
    }

    fn read_addrs(&mut self, addr: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        match self.read_virtual(addr, data) {
            0 if !data.is_empty() => Err(TargetError::Errno(E_MEMORY)),
            n => Ok(n),
        }
    }

    fn write_addrs(&mut self, addr: u64, data: &[u8]) -> TargetResult<(), Self> {
        self.write_virtual(addr, data)
            .map_err(|_| TargetError::Errno(E_MEMORY))
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

// A Guest has no signals: one gdb asks to deliver is dropped.
impl SingleThreadResume for View {
    fn resume(&mut self, _signal: Option<Signal>) -> Result<(), &'static str> {
        self.resume = Some(Resume::Continue);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadSingleStep for View {
    fn step(&mut self, _signal: Option<Signal>) -> Result<(), &'static str> {
        self.resume = Some(Resume::Step);
        Ok(())
    }
}

impl Breakpoints for View {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for View {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.insert(addr))
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.remove(addr);
        Ok(true)
    }
}

/*
 * The connection.
 */

/// The TCP stream, with replies gathered into one write each (gdbstub hands
/// them over a byte at a time).
pub struct Conn {
    stream: TcpStream,
    out: Vec<u8>,
}

impl Connection for Conn {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> std::io::Result<()> {
        self.out.push(byte);
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.out.extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let result = Write::write_all(&mut self.stream, &self.out);
        self.out.clear();
        result
    }

    fn on_session_start(&mut self) -> std::io::Result<()> {
        self.stream.set_nodelay(true)
    }
}

type Machine = GdbStubStateMachine<'static, View, Conn>;

/// How a stop ended, once gdb was done with the stopped Guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    Resume(Resume),
    /// gdb detached, or went away: the Guest runs on without it.
    Detach,
    /// gdb's `kill`.
    Kill,
    /// Three Ctrl-C to the Launcher while gdb held the Guest.
    UserStop,
}

/// A single step under way, kept by the vCPU (see `vcpu/debug.rs`).
#[derive(Clone, Copy, Debug)]
pub struct Step {
    /// Where it started.
    pub from: u64,
    /// The instruction is a hypercall: it ends at its exit, without TF.
    pub hypercall: bool,
    /// The Guest was halted: the step ends where an interrupt wakes it.
    pub from_halt: bool,
    /// The length of a `pushf` being stepped (it pushes our TF).
    pub pushf: Option<u64>,
    /// TF was set by us (and must go), by the Guest itself, or not yet.
    pub tf: Tf,
    /// The Guest has been entered since the step began: exits from now on
    /// are the step's.
    pub entered: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tf {
    NotSet,
    Ours,
    Guests,
}

/// A gdb session.
pub struct Debugger {
    machine: Option<Machine>,
    view: View,
    reader: TcpStream,
    /// Bytes read but not yet fed (they came after a Ctrl-C that is still
    /// to be answered).
    backlog: VecDeque<u8>,
    watcher: Watcher,
    pub step: Option<Step>,
    /// A stop found by a trap, to report at the next chance.
    pub pending: Option<StopReason>,
}

impl Debugger {
    fn new(stream: TcpStream, mem: GuestMemory, cr3: u64) -> Result<Debugger, GdbError> {
        let reader = stream.try_clone().map_err(GdbError::Accept)?;
        let watched = stream.try_clone().map_err(GdbError::Accept)?;
        let watcher = Watcher::start(watched).map_err(GdbError::Watcher)?;
        let mut view = View::new(mem, cr3);
        let conn = Conn {
            stream,
            out: Vec::new(),
        };
        let machine = GdbStub::new(conn)
            .run_state_machine(&mut view)
            .map_err(|e| GdbError::Accept(std::io::Error::other(e.to_string())))?;
        Ok(Debugger {
            machine: Some(machine),
            view,
            reader,
            backlog: VecDeque::new(),
            watcher,
            step: None,
            pending: None,
        })
    }

    /// A new boot of the Guest: its memory, its page tables, its IRQs.
    pub fn attach(&mut self, mem: GuestMemory, cr3: u64, irqs: Arc<Irqs>) {
        self.view.rebase(mem, cr3);
        self.watcher.set_target(irqs);
        // A step cut short by a restart ends at the new first instruction.
        if self.step.take().is_some() {
            self.pending = Some(StopReason::DoneStep);
        }
    }

    /// The Guest as gdb sees it.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// gdb is waiting on a stopped Guest (at attach).
    pub fn is_idle(&self) -> bool {
        matches!(self.machine, Some(Machine::Idle(_)))
    }

    /// gdb asked to interrupt the running Guest.
    pub fn interrupted(&self) -> bool {
        matches!(self.machine, Some(Machine::CtrlCInterrupt(_)))
    }

    /// The connection is gone (or broke the protocol).
    pub fn gone(&self) -> bool {
        matches!(self.machine, None | Some(Machine::Disconnected(_)))
    }

    /// The watcher saw gdb say something while the Guest ran.
    pub fn input_ready(&self) -> bool {
        self.watcher.shared.ready.load(Ordering::SeqCst)
    }

    /// Reads what gdb sent while the Guest ran (without waiting).
    pub fn take_input(&mut self) {
        self.watcher.shared.ready.store(false, Ordering::SeqCst);
        let mut buf = [0u8; 1024];
        loop {
            match poll_input(&[self.reader.as_raw_fd()], 0) {
                Ok(ready) if ready[0] => {}
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return self.lose(),
            }
            match self.reader.read(&mut buf) {
                Ok(0) | Err(_) => return self.lose(),
                Ok(n) => self.backlog.extend(&buf[..n]),
            }
        }
        self.pump();
        if matches!(self.machine, Some(Machine::Running(_))) {
            self.watcher.arm();
        }
    }

    /// Tells gdb the Guest stopped.
    pub fn report(&mut self, reason: StopReason) {
        self.watcher.disarm();
        let next = match self.machine.take() {
            Some(Machine::Running(m)) => m.report_stop(&mut self.view, reason),
            Some(Machine::CtrlCInterrupt(m)) => m.interrupt_handled(&mut self.view, Some(reason)),
            other => {
                self.machine = other;
                return;
            }
        };
        self.settle(next);
    }

    /// Serves gdb while the Guest is stopped at registers `regs` in address
    /// space `cr3`, until it resumes, detaches or kills it.
    pub fn serve(&mut self, cr3: u64, regs: Regs) -> Served {
        self.watcher.disarm();
        self.view.cr3 = cr3;
        self.view.regs = regs;
        self.view.written = None;
        self.view.resume = None;
        let mut buf = [0u8; 4096];
        loop {
            self.pump();
            match &mut self.machine {
                Some(Machine::Idle(_)) => {}
                Some(Machine::Running(_) | Machine::CtrlCInterrupt(_)) => {
                    let how = self.view.resume.take().unwrap_or(Resume::Continue);
                    if !self.interrupted() {
                        self.watcher.arm();
                    }
                    return Served::Resume(how);
                }
                Some(Machine::Disconnected(m)) if m.get_reason() == DisconnectReason::Kill => {
                    // Outside extended mode gdbstub leaves a kill unanswered,
                    // but gdb's vKill waits for an OK (then says "killed").
                    let conn = m.borrow_conn();
                    conn.out.extend_from_slice(b"$OK#9a");
                    let _ = conn.flush();
                    return Served::Kill;
                }
                Some(Machine::Disconnected(_)) | None => return Served::Detach,
            }
            match self.reader.read(&mut buf) {
                Ok(0) => self.lose(),
                Ok(n) => self.backlog.extend(&buf[..n]),
                // A kick (an IRQ raised, a Ctrl-C to us): gdb still has the Guest.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    if kick::user_stopped() {
                        return Served::UserStop;
                    }
                }
                Err(_) => self.lose(),
            }
        }
    }

    /// Registers gdb wrote while the Guest was stopped.
    pub fn written(&mut self) -> Option<Regs> {
        self.view.written.take()
    }

    /// gdb is leaving: our `int3`s come out of the Guest.
    pub fn remove_breakpoints(&mut self) {
        self.view.remove_all();
    }

    /// The Guest stopped for good: tell gdb how (an exit status for a
    /// power-off, a signal for a death).
    fn report_end(&mut self, end: End) {
        let reason = match end {
            End::PowerOff => StopReason::Exited(0),
            End::Crash => StopReason::Terminated(Signal::SIGABRT),
            End::Killed => StopReason::Terminated(Signal::SIGKILL),
            End::Restart => return,
        };
        self.report(reason);
    }

    /// Feeds the backlog to the stub, while it can take it: not while a
    /// Ctrl-C waits for its stop, nor after the end.
    fn pump(&mut self) {
        while matches!(self.machine, Some(Machine::Idle(_) | Machine::Running(_))) {
            let Some(byte) = self.backlog.pop_front() else {
                return;
            };
            let next = match self.machine.take() {
                Some(Machine::Idle(m)) => match m.incoming_data(&mut self.view, byte) {
                    // Ctrl-C while stopped: nothing to interrupt.
                    Ok(Machine::CtrlCInterrupt(m)) => {
                        m.interrupt_handled(&mut self.view, None::<StopReason>)
                    }
                    other => other,
                },
                Some(Machine::Running(m)) => m.incoming_data(&mut self.view, byte),
                _ => unreachable!("checked above"),
            };
            self.settle(next);
        }
    }

    /// Keeps the stub's next state and sends what it wrote; a broken
    /// connection or protocol ends the session.
    fn settle(
        &mut self,
        next: Result<Machine, gdbstub::stub::GdbStubError<&'static str, std::io::Error>>,
    ) {
        match next {
            Ok(mut machine) => {
                let sent = match &mut machine {
                    Machine::Idle(m) => m.borrow_conn().flush(),
                    Machine::Running(m) => m.borrow_conn().flush(),
                    Machine::CtrlCInterrupt(m) => m.borrow_conn().flush(),
                    Machine::Disconnected(m) => m.borrow_conn().flush(),
                };
                self.machine = Some(machine);
                if sent.is_err() {
                    self.lose();
                }
            }
            Err(e) => {
                tracing::debug!("gdb session ended: {e}");
                self.lose();
            }
        }
    }

    /// The connection is gone.
    fn lose(&mut self) {
        self.machine = None;
        self.backlog.clear();
        self.watcher.disarm();
    }
}

/*
 * The watcher: a thread that, while the Guest runs, waits for gdb to say
 * something and kicks the vCPU.
 */

struct WatchState {
    armed: bool,
    quit: bool,
    irqs: Option<Arc<Irqs>>,
}

struct WatchShared {
    state: Mutex<WatchState>,
    cond: Condvar,
    /// Set when gdb has sent something; read by the vCPU at its next look.
    ready: AtomicBool,
    /// Breaks the watcher's poll (to disarm it, or to end it).
    wake: EventFd,
}

struct Watcher {
    shared: Arc<WatchShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock(m: &Mutex<WatchState>) -> std::sync::MutexGuard<'_, WatchState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watcher {
    fn start(stream: TcpStream) -> std::io::Result<Watcher> {
        let shared = Arc::new(WatchShared {
            state: Mutex::new(WatchState {
                armed: false,
                quit: false,
                irqs: None,
            }),
            cond: Condvar::new(),
            ready: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        });
        let watched = shared.clone();
        // Like the device threads, it never takes the Launcher's Ctrl-C.
        let thread = kick::without_sigint(|| {
            std::thread::Builder::new()
                .name("gdb-watch".into())
                .spawn(move || {
                    crate::sandbox::enter_thread(crate::sandbox::ThreadKind::Gdb);
                    watch(&watched, &stream)
                })
        })?;
        Ok(Watcher {
            shared,
            thread: Some(thread),
        })
    }

    fn set_target(&self, irqs: Arc<Irqs>) {
        lock(&self.shared.state).irqs = Some(irqs);
    }

    fn arm(&self) {
        lock(&self.shared.state).armed = true;
        self.shared.cond.notify_one();
    }

    fn disarm(&self) {
        lock(&self.shared.state).armed = false;
        let _ = self.shared.wake.write(1);
    }
}

fn watch(shared: &WatchShared, stream: &TcpStream) {
    let fds = [stream.as_raw_fd(), shared.wake.as_raw_fd()];
    let mut state = lock(&shared.state);
    loop {
        while !state.armed && !state.quit {
            state = shared.cond.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.quit {
            return;
        }
        drop(state);
        let ready = poll_input(&fds, -1).unwrap_or([false, false].into());
        state = lock(&shared.state);
        if ready[1] {
            let _ = shared.wake.read();
        }
        if ready[0] && state.armed {
            // Disarmed until the vCPU has read it, or we would spin.
            state.armed = false;
            shared.ready.store(true, Ordering::SeqCst);
            if let Some(irqs) = &state.irqs {
                irqs.kick();
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        lock(&self.shared.state).quit = true;
        self.shared.cond.notify_one();
        let _ = self.shared.wake.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_pages;
    use crate::launcher::layout_for;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("1234").unwrap(),
            "127.0.0.1:1234".parse().unwrap()
        );
        assert_eq!(
            parse_address("0.0.0.0:99").unwrap(),
            "0.0.0.0:99".parse().unwrap()
        );
        assert_eq!(
            parse_address("[::1]:7").unwrap(),
            "[::1]:7".parse().unwrap()
        );
        for bad in ["", "x", "70000", "1.2.3.4", "1.2.3.4:x", ":"] {
            assert!(parse_address(bad).is_err(), "{bad:?}");
        }
    }

    fn view() -> View {
        let mem = GuestMemory::new(layout_for(4, 1, 0)).unwrap();
        let tables = host_pages::build(&mem);
        View::new(mem, tables.init_pml4)
    }

    #[test]
    fn memory_through_page_tables_and_breakpoints() {
        let mut v = view();
        v.write_virtual(0x10_0000, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        assert_eq!(v.read_virtual(0x10_0000, &mut b), 4);
        assert_eq!(b, [1, 2, 3, 4]);

        // A breakpoint: memory holds int3, gdb sees the original byte.
        assert!(v.insert(0x10_0001));
        let mut raw = [0u8];
        v.mem.read(0x10_0001, &mut raw).unwrap();
        assert_eq!(raw[0], INT3);
        assert_eq!(v.read_virtual(0x10_0000, &mut b), 4);
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(v.is_breakpoint(v.cr3, 0x10_0001));
        assert!(!v.is_breakpoint(v.cr3, 0x10_0002));

        // Writing over it changes what comes back, not the int3.
        v.write_virtual(0x10_0001, &[9]).unwrap();
        v.mem.read(0x10_0001, &mut raw).unwrap();
        assert_eq!(raw[0], INT3);
        v.remove(0x10_0001);
        v.mem.read(0x10_0001, &mut raw).unwrap();
        assert_eq!(raw[0], 9);
        assert!(!v.is_breakpoint(v.cr3, 0x10_0001));
    }

    #[test]
    fn host_pages_and_holes_are_refused() {
        let mut v = view();
        let mut b = [0u8; 8];
        let limit = v.mem.layout.guest_limit();
        // The Host's pages, by their upper-half address and physically.
        assert_eq!(v.read_virtual(host_pages::HOST_VA, &mut b), 0);
        assert_eq!(v.read_virtual(limit, &mut b), 0);
        assert!(v.write_virtual(limit, &[0]).is_err());
        assert!(v.write_virtual(u64::MAX, &[0]).is_err());
        // A read running off the end of memory stops there.
        assert_eq!(v.read_virtual(limit - 3, &mut b), 3);
        // Not a byte of a write that runs off the end is written.
        v.write_virtual(limit - 2, &[7, 7]).unwrap();
        assert!(v.write_virtual(limit - 2, &[1, 2, 3]).is_err());
        assert_eq!(v.read_virtual(limit - 2, &mut b[..2]), 2);
        assert_eq!(&b[..2], &[7, 7]);
        // Breakpoints only in RAM, not in device pages.
        assert!(!v.insert(v.mem.layout.mem));
        assert!(!v.insert(host_pages::HOST_VA));
    }

    #[test]
    fn breakpoints_follow_a_new_boot() {
        let mut v = view();
        assert!(v.insert(0x20_0000));
        let fresh = GuestMemory::new(v.mem.layout).unwrap();
        let tables = host_pages::build(&fresh);
        v.rebase(fresh.clone(), tables.init_pml4);
        let mut raw = [0u8];
        fresh.read(0x20_0000, &mut raw).unwrap();
        assert_eq!(raw[0], INT3);
        v.remove_all();
        fresh.read(0x20_0000, &mut raw).unwrap();
        assert_eq!(raw[0], 0);
    }

    #[test]
    fn register_writes_are_checked() {
        let mut v = view();
        v.regs.core.segments.cs = 0x33;
        v.regs.core.segments.ss = 0x2B;
        v.regs.core.eflags = 0x202;
        let mut r = v.regs.clone();
        r.core.rip = 0x10_0000;
        r.core.eflags = 0x1 | 0x100 | 0x40; // CF, TF, ZF
        let ok = v.checked(&r).unwrap();
        assert_eq!(ok.core.eflags, 0x202 | 0x1 | 0x40, "TF is not gdb's to set");
        for bad in [
            Regs {
                core: X86_64CoreRegs {
                    rip: RESERVE_MEM,
                    ..r.core.clone()
                },
                ..r.clone()
            },
            Regs {
                fs_base: u64::MAX,
                ..r.clone()
            },
        ] {
            assert!(v.checked(&bad).is_none());
        }
        let mut cs = r.clone();
        cs.core.segments.cs = 0x10;
        assert!(v.checked(&cs).is_none(), "ring 0 code");
        let mut ds = r.clone();
        ds.core.segments.ds = GUEST_DS as u32;
        assert!(v.checked(&ds).is_some());
        ds.core.segments.ds = 0x10;
        assert!(v.checked(&ds).is_none());
    }

    #[test]
    fn registers_serialize_with_fs_and_gs_base() {
        let r = Regs {
            fs_base: 0x1122_3344,
            gs_base: 0x5566,
            ..Regs::default()
        };
        let mut bytes = Vec::new();
        r.gdb_serialize(|b| bytes.push(b.unwrap_or(0)));
        assert_eq!(bytes.len(), CORE_BYTES + 16);
        let mut back = Regs::default();
        back.gdb_deserialize(&bytes).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn fpu_round_trip() {
        let mut fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37F,
            fsw: 0x3800,
            ftwx: 0b1000_0001,
            last_ip: 0x1234_5678_9abc,
            mxcsr: 0x1F80,
            ..Default::default()
        };
        fpu.fpr[7][..10].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        fpu.xmm[15] = [0xAB; 16];
        let mut core = X86_64CoreRegs::default();
        fpu_to_gdb(&fpu, &mut core);
        assert_eq!(core.fpu.ftag, 0x3FFC, "registers 0 and 7 in use");
        assert_eq!(core.st[7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let mut back = kvm_bindings::kvm_fpu::default();
        gdb_to_fpu(&core, &mut back);
        assert_eq!(back.ftwx, fpu.ftwx);
        assert_eq!(back.last_ip, fpu.last_ip);
        assert_eq!(back.fpr, fpu.fpr);
        assert_eq!(back.xmm, fpu.xmm);
        assert_eq!((back.fcw, back.fsw, back.mxcsr), (0x37F, 0x3800, 0x1F80));
    }

    #[test]
    fn the_description_names_every_register() {
        let xml = target_xml();
        for name in [
            "rax", "r15", "rip", "eflags", "gs", "st7", "fop", "xmm15", "mxcsr",
        ] {
            assert!(xml.contains(&format!("name=\"{name}\"")), "{name}");
        }
        // fs_base and gs_base come last, after gdbstub_arch's block.
        assert!(xml.find("fs_base").unwrap() > xml.find("mxcsr").unwrap());
        assert_eq!(
            xml.matches("<reg ").count(),
            16 + 2 + 6 + 8 + 8 + 16 + 1 + 2
        );
    }
}
