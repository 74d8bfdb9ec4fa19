//! Bindings of driver-owned memory whose place changes (buffer objects, the `bo` wing):
//! a GPU VA range pointed at an IOVA range or at device memory the *caller* owns, and
//! moved to another place in Xe's order: the old entries zapped, the new ones written,
//! the TLB invalidated and waited for, all before [`GpuVm::retarget`] returns, so the
//! caller may unmap or free the old place right after it. Such bindings are not the
//! registry's: no notice of the registry ever touches them, and the VM never frees
//! their memory (the caller does).

use super::stats::add;
use super::vm::{Binding, Bound, GpuVm, Kind, PAGE};
use crate::error::{Error, Result};

/// Where a driver-owned binding points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// An IOVA range (system memory the IOMMU maps).
    Iova(u64),
    /// A VRAM offset inside the device-memory heap.
    DeviceMemory(u64),
}

impl Target {
    fn parts(self) -> (u64, bool) {
        match self {
            Target::Iova(i) => (i, false),
            Target::DeviceMemory(o) => (o, true),
        }
    }
}

impl GpuVm {
    /// Bind `len` bytes (4 KiB multiple) at `va` (4 KiB-aligned), writable, to
    /// `target`, which the caller keeps mapped (or allocated) until it unbinds or
    /// retargets the binding.
    pub(crate) fn bind_target(&self, va: u64, len: u64, target: Target) -> Result<Binding> {
        let _section = crate::driver_section::enter();
        if len == 0 || len % PAGE != 0 || va % PAGE != 0 || va.checked_add(len).is_none() {
            return Err(Error::GpuVaBusy {
                va,
                len,
                reason: "a driver binding needs a non-empty 4 KiB-aligned range",
            });
        }
        let inner = &*self.inner;
        let mut st = inner.lock();
        let r = va..va + len;
        if st.overlaps(&r) {
            return Err(Error::GpuVaBusy {
                va,
                len,
                reason: "overlaps a binding of the VM",
            });
        }
        let uid = st.uid();
        let (addr, devmem) = target.parts();
        if let Err(e) = st.pt.map(&inner.cx(), va, len, addr, true, devmem) {
            st.pt.zap(&inner.cx(), r);
            return Err(e);
        }
        st.bindings.insert(
            va,
            Bound {
                va: r,
                kind: Kind::Driver,
                host: None,
                iova: None,
                present: true,
                writable: true,
                uid,
            },
        );
        add(&inner.stats.binds, 1);
        Ok(Binding {
            va,
            start: va,
            len,
            uid,
        })
    }

    /// Point `b` (made by [`GpuVm::bind_target`]) at `target`. The caller has made sure
    /// no device work reaches the range meanwhile (its fences are waited for, and no
    /// new command is submitted until this returns). Returns once the TLB invalidation
    /// completed: no device access after that uses the old place.
    pub(crate) fn retarget(&self, b: &Binding, target: Target) -> Result<()> {
        let _section = crate::driver_section::enter();
        let inner = &*self.inner;
        let mut st = inner.lock();
        match st.bindings.get(&b.start) {
            Some(x) if x.uid == b.uid && matches!(x.kind, Kind::Driver) => {}
            _ => {
                return Err(Error::NoSuchBinding {
                    vm: inner.id,
                    va: b.start,
                })
            }
        }
        let range = b.start..b.start + b.len;
        let cx = inner.cx();
        st.pt.zap(&cx, range.clone());
        let (addr, devmem) = target.parts();
        st.pt.map(&cx, b.start, b.len, addr, true, devmem)?;
        // Not skippable by a debug knob: a stale entry here would reach memory the
        // caller frees next.
        add(&inner.stats.tlb_invalidations, 1);
        inner.hw().tlb_invalidate(inner.id, &[range])
    }

    /// Remove a driver binding: zap, free the emptied tables, invalidate the TLB
    /// (waited for). The caller has waited for the device work on it.
    pub(crate) fn unbind_target(&self, b: Binding) -> Result<()> {
        let _section = crate::driver_section::enter();
        let inner = &*self.inner;
        let freed = {
            let mut st = inner.lock();
            match st.bindings.get(&b.start) {
                Some(x) if x.uid == b.uid && matches!(x.kind, Kind::Driver) => {}
                _ => {
                    return Err(Error::NoSuchBinding {
                        vm: inner.id,
                        va: b.start,
                    })
                }
            }
            st.bindings.remove(&b.start);
            let cx = inner.cx();
            let range = b.start..b.start + b.len;
            st.pt.zap(&cx, range.clone());
            let freed = st.pt.free_empty(&cx, range.clone());
            add(&inner.stats.tlb_invalidations, 1);
            inner.hw().tlb_invalidate(inner.id, &[range])?;
            freed
        };
        inner.cx().free_pages(&freed);
        add(&inner.stats.unbinds, 1);
        Ok(())
    }
}

impl super::Gpu {
    /// Allocate `len` bytes (4 KiB multiple) of the device-memory heap, `align`-aligned;
    /// returns the VRAM offset.
    pub(crate) fn alloc_device_memory(&self, len: u64, align: u64) -> Result<u64> {
        crate::driver_section::lock(&self.inner.shared.devmem_alloc)
            .alloc(len, align)
            .map_err(|_| Error::VramExhausted {
                what: "device-memory heap",
                len,
            })
    }

    /// Give back what [`super::Gpu::alloc_device_memory`] returned.
    pub(crate) fn free_device_memory(&self, off: u64, len: u64) {
        crate::driver_section::lock(&self.inner.shared.devmem_alloc).free(off, len)
    }

    /// The device-memory heap: (VRAM offset, size).
    pub fn device_memory(&self) -> (u64, u64) {
        let r = self.inner.shared.hw.regions;
        (r.devmem_base, r.devmem_size)
    }

    /// Free bytes of the device-memory heap.
    pub fn device_memory_free(&self) -> u64 {
        crate::driver_section::lock(&self.inner.shared.devmem_alloc).free_bytes()
    }

    /// The device the VMs run on.
    pub(crate) fn device(&self) -> &std::sync::Arc<dyn crate::device::Device> {
        &self.inner.shared.hw.dev
    }
}
