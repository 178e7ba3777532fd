//! The KVM virtual machine: memslots, one vCPU, and its state at entry
//! (ABI sections 1 and 3).
//!
//! KVM does only the world switch here. Nothing in-kernel (no irqchip, no
//! PIT) is created: the Host builds every interrupt frame itself, as lguest
//! did.

use crate::host_pages::{HostTables, TSS_SIZE};
use crate::memory::GuestMemory;
use kvm_bindings::{
    kvm_segment, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY,
    KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use lguest_abi::*;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("{path} lacks a KVM capability lguest needs: {cap}")]
    MissingCap { path: String, cap: &'static str },
    #[error("KVM {what} failed: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { what, err }
}

/// The KVM device, opened once per Launcher.
pub struct Hypervisor {
    kvm: Kvm,
}

impl Hypervisor {
    /// Opens the KVM device (`/dev/kvm`, or `$LGUEST_KVM_DEVICE` for tests)
    /// and checks the capabilities the vCPU loop relies on.
    pub fn open(path: &Path) -> Result<Self, VmError> {
        let path_str = path.display().to_string();
        let open_err = |err| VmError::Open {
            path: path_str.clone(),
            err,
        };
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| open_err(std::io::ErrorKind::InvalidInput.into()))?;
        let kvm = Kvm::new_with_path(&c_path)
            .map_err(|e| open_err(std::io::Error::from_raw_os_error(e.errno())))?;
        for (cap, name) in [
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::ReadonlyMem, "KVM_CAP_READONLY_MEM"),
            (Cap::SyncRegs, "KVM_CAP_SYNC_REGS"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap {
                    path: path_str,
                    cap: name,
                });
            }
        }
        Ok(Hypervisor { kvm })
    }
}

/// One Guest's VM and vCPU.
pub struct Vm {
    // Fields drop in order: the vCPU goes before the VM it belongs to.
    pub vcpu: VcpuFd,
    /// Kept open: closing it destroys the VM.
    vm: VmFd,
    /// The memslots as given to KVM, for [`Vm::recycle_slot`].
    regions: Vec<kvm_userspace_memory_region>,
    pub tsc_khz: u32,
}

impl Vm {
    /// Creates the VM, hands it every region of `mem` and sets the vCPU up
    /// for ring 3 at `entry` with the initial page tables.
    /*L:160 The VM: every region of Guest memory a memslot (the Host's pages
     * read-only), one vCPU, and its registers as ABI section 1 says: long
     * mode, ring 3 from the first instruction, the Host's IDT and GDT. */
    pub fn new(
        hv: &Hypervisor,
        mem: &GuestMemory,
        tables: &HostTables,
        entry: u64,
    ) -> Result<Vm, VmError> {
        let vm = hv.kvm.create_vm().map_err(kvm_err("create VM"))?;
        let mut regions = Vec::new();
        for (slot, (base, ptr, size, read_only)) in mem.regions().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if read_only { KVM_MEM_READONLY } else { 0 },
                guest_phys_addr: base,
                memory_size: size,
                userspace_addr: ptr as u64,
            };
            // SAFETY: the region is a live anonymous mapping owned by `mem`,
            // which the Launcher keeps alive longer than this VM.
            unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("set memory region"))?;
            regions.push(region);
        }
        let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU"))?;

        let cpuid = hv
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;

        let mut sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
        let seg = |selector: u16, type_: u8, l: u8, db: u8, dpl: u8| kvm_segment {
            base: 0,
            limit: 0xFFFF_FFFF,
            selector,
            type_,
            present: 1,
            dpl,
            db,
            s: 1,
            l,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = seg(GUEST_CS, 0xB, 1, 0, 3);
        let data = seg(GUEST_DS, 0x3, 0, 1, 3);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = kvm_segment {
            base: tables.tss_base,
            limit: (TSS_SIZE - 1) as u32,
            selector: HOST_TSS,
            type_: 0xB,
            present: 1,
            s: 0,
            ..Default::default()
        };
        sregs.ldt = kvm_segment {
            type_: 0x2,
            unusable: 1,
            ..Default::default()
        };
        sregs.gdt.base = tables.gdt_base;
        sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
        sregs.idt.base = tables.idt_base;
        sregs.idt.limit = (256 * 16 - 1) as u16;
        sregs.cr0 = GUEST_CR0;
        sregs.cr3 = tables.init_pml4;
        sregs.cr4 = GUEST_CR4;
        sregs.efer = GUEST_EFER;
        vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;

        let regs = kvm_bindings::kvm_regs {
            rip: entry,
            rflags: ENTRY_RFLAGS,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;

        let mut fpu = vcpu.get_fpu().map_err(kvm_err("get FPU"))?;
        fpu.fcw = 0x37F;
        fpu.mxcsr = 0x1F80;
        vcpu.set_fpu(&fpu).map_err(kvm_err("set FPU"))?;

        // `syscall` with EFER.SCE clear must be #UD; where the KVM jumps to
        // LSTAR anyway, it lands on a supervisor page and we see it there.
        const MSR_LSTAR: u32 = 0xC000_0082;
        let msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_LSTAR,
            data: tables.syscall_target,
            ..Default::default()
        }])
        .expect("one MSR fits");
        vcpu.set_msrs(&msrs).map_err(kvm_err("set MSRs"))?;

        // XCR0 = x87|SSE is the reset value; say so where the KVM lets us.
        if let Ok(mut xcrs) = vcpu.get_xcrs() {
            xcrs.nr_xcrs = 1;
            xcrs.xcrs[0].xcr = 0;
            xcrs.xcrs[0].value = GUEST_XCR0;
            let _ = vcpu.set_xcrs(&xcrs);
        }

        let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
        let tsc_khz = if host_tsc_is_invariant() { tsc_khz } else { 0 };

        vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
        debug_assert_ne!(KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS, 0);

        Ok(Vm {
            vcpu,
            vm,
            regions,
            tsc_khz,
        })
    }

    /// Drops the memslot holding Guest-physical page `phys` and gives it
    /// back to KVM unchanged: a KVM that shadows page tables forgets what it
    /// knew of the page, and sees our writes to it again (see
    /// [`crate::page_tables`]).
    pub fn recycle_slot(&self, phys: u64) -> Result<(), VmError> {
        let region = *self
            .regions
            .iter()
            .find(|r| r.guest_phys_addr == phys)
            .expect("recycled pages have a memslot of their own");
        let gone = kvm_userspace_memory_region {
            memory_size: 0,
            ..region
        };
        // SAFETY: deleting a slot takes nothing away from us; re-adding it
        // hands KVM the same live mapping as at creation, still owned by the
        // Guest's memory, which outlives this VM.
        unsafe {
            self.vm
                .set_user_memory_region(gone)
                .map_err(kvm_err("delete memory region"))?;
            self.vm
                .set_user_memory_region(region)
                .map_err(kvm_err("re-add memory region"))
        }
    }
}

/// The TSC is a clock only if it is invariant (CPUID 0x8000_0007 EDX bit 8).
fn host_tsc_is_invariant() -> bool {
    // Leaf 0x8000_0000 says whether the extended leaf exists.
    let max = core::arch::x86_64::__cpuid(0x8000_0000).eax;
    max >= 0x8000_0007 && core::arch::x86_64::__cpuid(0x8000_0007).edx & (1 << 8) != 0
}
