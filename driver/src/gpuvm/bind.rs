//! Binding and unbinding: a userptr at a GPU VA (its IOVAs, resolved through the
//! registry and installed under the VM's fresh-install rule, see `vm`), device memory
//! from the heap, and the removal of either (the VM's work waited for, the entries
//! zapped and their tables freed, the TLB invalidated, then the memory given back).

use super::stats::add;
use super::vm::{pages_of, wait_fences, Binding, Bound, GpuVm, Kind, VmInner, VmState, PAGE};
use crate::error::{Error, Result};
use crate::registry::Userptr;
use std::ops::Range;

impl GpuVm {
    fn check_range(&self, va: u64, len: u64) -> Result<()> {
        let bad = |reason| Error::GpuVaBusy { va, len, reason };
        if len == 0 {
            return Err(bad("zero length"));
        }
        if va % PAGE != 0 {
            return Err(bad("not 4 KiB aligned"));
        }
        if va.checked_add(len).is_none_or(|e| e > 1 << 48) {
            return Err(bad("beyond the 48-bit GPU VA space"));
        }
        Ok(())
    }

    fn new_binding(
        &self,
        st: &mut VmState,
        va: Range<u64>,
        kind: Kind,
        host: Option<Range<u64>>,
        writable: bool,
    ) -> Result<u64> {
        if st.overlaps(&va) {
            return Err(Error::GpuVaBusy {
                va: va.start,
                len: va.end - va.start,
                reason: "overlaps a binding of the VM",
            });
        }
        let uid = st.uid();
        st.bindings.insert(
            va.start,
            Bound {
                va,
                kind,
                host,
                iova: None,
                present: false,
                writable,
                uid,
            },
        );
        Ok(uid)
    }

    /// Bind `u`'s pages at GPU VA `va` (4 KiB-aligned; the userptr's first byte is at
    /// `va` plus its offset in its page, see [`Binding::va`]), writable if `u` is.
    pub fn bind(&self, u: &Userptr<'static>, va: u64) -> Result<Binding> {
        let _section = crate::driver_section::enter();
        let host = pages_of(u);
        let len = host.end - host.start;
        self.check_range(va, len)?;
        let inner = &*self.inner;
        let (gen, uid) = {
            let mut st = inner.lock();
            let uid = self.new_binding(
                &mut st,
                va..va + len,
                Kind::Userptr(u.clone()),
                Some(host.clone()),
                u.perm().write(),
            )?;
            (st.log.generation(), uid)
        };
        let mut gen = gen;
        loop {
            let resolved = inner.gpu.shared.registry.iova(u);
            let mut st = inner.lock();
            let iova = match resolved {
                Ok(i) => i - (u.addr() - host.start),
                Err(e) => {
                    st.bindings.remove(&va);
                    return Err(e);
                }
            };
            match inner.install(&mut st, gen, va, uid, iova, u.perm().write()) {
                Ok(true) => break,
                Ok(false) => gen = st.log.generation(),
                Err(e) => {
                    st.pt.zap(&inner.cx(), va..va + len);
                    st.bindings.remove(&va);
                    return Err(e);
                }
            }
        }
        add(&inner.stats.binds, 1);
        Ok(Binding {
            va: va + (u.addr() - host.start),
            start: va,
            len,
            uid,
        })
    }

    /// Bind `len` bytes of freshly allocated device memory at GPU VA `va`.
    pub fn bind_device_memory(&self, va: u64, len: u64) -> Result<Binding> {
        let _section = crate::driver_section::enter();
        let len = len.next_multiple_of(PAGE);
        self.check_range(va, len)?;
        let inner = &*self.inner;
        let align = if len >= 2 << 20 && va % (2 << 20) == 0 {
            2 << 20
        } else {
            PAGE
        };
        let mut st = inner.lock();
        let off = inner
            .gpu
            .shared
            .devmem_alloc
            .lock()
            .expect("device-memory allocator poisoned")
            .alloc(len, align)
            .map_err(|_| Error::VramExhausted {
                what: "device-memory heap",
                len,
            })?;
        let free = |inner: &VmInner| {
            inner
                .gpu
                .shared
                .devmem_alloc
                .lock()
                .expect("device-memory allocator poisoned")
                .free(off, len)
        };
        let uid = match self.new_binding(&mut st, va..va + len, Kind::DevMem(off), None, true) {
            Ok(u) => u,
            Err(e) => {
                free(inner);
                return Err(e);
            }
        };
        if let Err(e) = st.pt.map(&inner.cx(), va, len, off, true, true) {
            st.pt.zap(&inner.cx(), va..va + len);
            st.bindings.remove(&va);
            free(inner);
            return Err(e);
        }
        st.bindings.get_mut(&va).expect("inserted").present = true;
        add(&inner.stats.binds, 1);
        Ok(Binding {
            va,
            start: va,
            len,
            uid,
        })
    }

    /// Remove a binding: wait for the VM's work, zap its entries, free its tables,
    /// invalidate the TLB, then free its device memory.
    pub fn unbind(&self, b: Binding) -> Result<()> {
        let _section = crate::driver_section::enter();
        let inner = &*self.inner;
        let (bound, fences) = {
            let mut st = inner.lock();
            match st.bindings.get(&b.start) {
                Some(x) if x.uid == b.uid => {}
                _ => {
                    return Err(Error::NoSuchBinding {
                        vm: inner.id,
                        va: b.start,
                    })
                }
            }
            let x = st.bindings.remove(&b.start).expect("checked");
            if let Some(i) = x.iova {
                st.by_iova.remove(&(i, b.start));
            }
            (x, st.fences.clone())
        };
        if !wait_fences(&fences) {
            add(&inner.stats.fence_waits, 1);
        }
        let freed = {
            let mut st = inner.lock();
            let cx = inner.cx();
            st.pt.zap(&cx, bound.va.clone());
            let freed = st.pt.free_empty(&cx, bound.va.clone());
            inner.tlb_invalidate(std::slice::from_ref(&bound.va));
            freed
        };
        inner.cx().free_pages(&freed);
        if let Kind::DevMem(off) = bound.kind {
            inner
                .gpu
                .shared
                .devmem_alloc
                .lock()
                .expect("device-memory allocator poisoned")
                .free(off, bound.va.end - bound.va.start);
        }
        add(&inner.stats.unbinds, 1);
        Ok(())
    }
}
