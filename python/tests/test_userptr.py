"""The userptr Python module on the reference device: numpy arrays, bytearrays and
memoryviews registered, FILL / COPY / SAXPY / CRC32C checked bit for bit, read-only and
non-contiguous buffers refused, errors raised as exceptions, and pins (VmPin) back where
they started after unregistering. Monitors change the whole process, so those tests run
their body in a child interpreter."""

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import userptr


def vm_pin():
    """Bytes this process has pinned (VmPin in /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmPin:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmPin in /proc/self/status")


def crc32c(data, crc=0):
    """CRC32C (Castagnoli), bit by bit: the CPU's reference."""
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


@pytest.fixture
def dev():
    drv = userptr.Driver()
    q = drv.queue(0, 64)
    reg = userptr.Registry(drv)
    yield drv, q, reg
    q.close()


def test_saxpy_on_numpy_float32_is_bit_for_bit_the_cpu(dev):
    drv, q, reg = dev
    rng = np.random.default_rng(7)
    n = 1 << 18
    x = rng.standard_normal(n, dtype=np.float32)
    y = rng.standard_normal(n, dtype=np.float32)
    a = np.float32(2.5)
    want = a * x + y
    assert want.dtype == np.float32
    with reg.register(x, "r") as rx, reg.register(y) as ry:
        results = q.wait(reg.submit(q, [rx, ry], [userptr.saxpy(float(a), x=0, y=1)]))
    assert results == [0]
    assert np.array_equal(y.view(np.uint32), want.view(np.uint32))


def test_fill_a_bytearray_and_copy_into_a_memoryview(dev):
    drv, q, reg = dev
    src = bytearray(b"\x5a" * 20000)
    dst_backing = bytearray(20000)
    dst = memoryview(dst_backing)
    rs, rd = reg.register(src), reg.register(dst)
    assert rd.obj is dst and rs.length == 20000
    f = reg.submit(
        q,
        [rs, rd],
        [
            userptr.fill(0, 0xAB, length=5000, offset=100),
            userptr.copy(0, 1),
            userptr.crc32c(1, length=4096, offset=1000),
        ],
    )
    assert (f.ring, f.last - f.first) == (0, 2)
    results = q.wait(f)
    want = bytearray(b"\x5a" * 20000)
    want[100:5100] = b"\xab" * 5000
    assert src == want
    assert dst_backing == want
    assert results[2] == crc32c(want[1000:5096])
    rs.unregister()
    rd.unregister()
    assert not rs.registered and rs.obj is None


def test_a_numpy_array_view_at_an_offset(dev):
    drv, q, reg = dev
    base = np.zeros(10000, dtype=np.uint8)
    view = base[1234:5678]
    with reg.register(view) as r:
        assert r.addr == base.ctypes.data + 1234
        q.wait(reg.submit(q, [r], [userptr.fill(0, 7)]))
    assert (base[1234:5678] == 7).all()
    assert (base[:1234] == 0).all() and (base[5678:] == 0).all()


def test_read_only_and_non_contiguous_buffers_are_refused(dev):
    drv, q, reg = dev
    before = vm_pin()
    frozen = np.zeros(4096, dtype=np.uint8)
    frozen.flags.writeable = False
    for ro in [b"\0" * 8192, memoryview(bytearray(8192)).toreadonly(), frozen]:
        with pytest.raises(userptr.ReadOnlyBufferError, match="read-only"):
            reg.register(ro)
    with pytest.raises(userptr.AddressError, match="not contiguous"):
        reg.register(np.zeros((64, 64), dtype=np.float32)[:, ::2])
    with pytest.raises(TypeError, match="does not export a buffer"):
        reg.register(12345)
    with pytest.raises(ValueError, match="perm"):
        reg.register(bytearray(64), "x")
    assert vm_pin() == before, "a refused registration left pins"
    assert isinstance(userptr.ReadOnlyBufferError("x"), userptr.AddressError)


def test_the_registration_keeps_the_buffer_exported(dev):
    drv, q, reg = dev
    ba = bytearray(8192)
    r = reg.register(ba)
    with pytest.raises(BufferError):
        ba.extend(b"more")  # the memory cannot move while registered
    arr = np.zeros(8192, dtype=np.uint8)
    ra = reg.register(arr)
    with pytest.raises(ValueError):
        arr.resize(100000)
    obj = r.obj
    del ba
    gc.collect()
    assert r.obj is obj  # the registration keeps the exporter alive
    r.unregister()
    ra.unregister()
    obj.extend(b"more")
    arr.resize(100000, refcheck=False)


def test_errors_are_exceptions_with_codes(dev):
    drv, q, reg = dev
    with pytest.raises(userptr.AddressError) as e:
        reg.register(bytearray(0))
    assert e.value.code_name == "USERPTR_CODE_ZERO_LENGTH" and e.value.code == 10
    assert isinstance(e.value, userptr.Error)

    buf = bytearray(4096)
    r = reg.register(buf)
    with pytest.raises(userptr.AddressError) as e:
        reg.submit(q, [r], [userptr.fill(0, 1, length=10, offset=4090)])
    assert e.value.code_name == "USERPTR_CODE_OPERAND_RANGE"
    with pytest.raises(userptr.AddressError):
        reg.submit(q, [r], [userptr.fill(0, 1, offset=4096)])
    with pytest.raises(userptr.ArgumentError, match="has 1 references"):
        reg.submit(q, [r], [userptr.fill(1, 1)])
    with pytest.raises(userptr.DeviceError) as e:
        reg.submit(q, [r], [userptr.saxpy(1.0, x=0, y=0, n=1, y_offset=2)])
    assert e.value.code_name == "USERPTR_CODE_DESCRIPTOR"  # misaligned float
    with pytest.raises(OverflowError):
        userptr.fill(0, 256)
    with pytest.raises(userptr.DeviceError) as e:
        drv.queue(9)
    assert e.value.code_name == "USERPTR_CODE_NO_SUCH_RING"
    with pytest.raises(userptr.DeviceError) as e:
        drv.queue(0)
    assert e.value.code_name == "USERPTR_CODE_RING_BUSY"
    # The busy-ring refusal leaves the open queue working.
    q.wait(reg.submit(q, [r], [userptr.fill(0, 9)]))
    assert buf == b"\x09" * 4096

    # A device-read-only registration written by the device: a DMA fault with its
    # IOVA and access.
    ro = reg.register(buf, "r")
    f = reg.submit(q, [ro], [userptr.fill(0, 0xEE)])
    with pytest.raises(userptr.DmaFault) as e:
        q.wait(f)
    assert (e.value.access, e.value.iova, e.value.ring) == ("write", ro.iova(), 0)
    assert e.value.seqno == f.first and e.value.code_name == "USERPTR_CODE_DMA_FAULT"
    assert isinstance(e.value, userptr.DeviceError)
    assert buf == b"\x09" * 4096
    with pytest.raises(userptr.DeviceError) as e:
        q.wait(f)  # claimed already
    assert e.value.code_name == "USERPTR_CODE_NO_COMPLETION"

    # A paused device: the wait times out, claims nothing, and can be repeated.
    drv.set_enabled(False)
    f = reg.submit(q, [r], [userptr.fill(0, 3)])
    with pytest.raises(userptr.DeviceTimeoutError):
        q.wait(f, timeout=0.01)
    drv.set_enabled(True)
    q.wait(f)
    assert buf == b"\x03" * 4096
    with pytest.raises(ValueError):
        q.wait(f, timeout=-1)
    ro.unregister()
    r.unregister()
    with pytest.raises(ValueError, match="unregistered"):
        reg.submit(q, [r], [userptr.nop()])


def test_handles_of_another_registry_or_driver_are_refused(dev):
    drv, q, reg = dev
    other_reg = userptr.Registry(drv)
    other_q = userptr.Driver().queue()
    buf = bytearray(4096)
    with reg.register(buf) as r:
        with pytest.raises(ValueError, match="another registry"):
            other_reg.submit(q, [r], [userptr.fill(0, 1)])
        with pytest.raises(ValueError, match="another driver"):
            reg.submit(other_q, [r], [userptr.fill(0, 1)])
    assert buf == bytearray(4096)
    q.close()
    with pytest.raises(ValueError, match="closed"):
        reg.submit(q, [], [userptr.nop()])


def test_pins_return_to_zero_after_unregistering(dev):
    drv, q, reg = dev
    start = vm_pin()
    # Under the default pin budget (RLIMIT_MEMLOCK, 8 MiB here), so nothing is evicted.
    arrays = [np.zeros(1 << 18, dtype=np.float32) for _ in range(3)]
    regs = [reg.register(a) for a in arrays]
    assert vm_pin() >= start + 3 * (1 << 20)
    assert reg.pinned_bytes >= 3 * (1 << 20)
    q.wait(reg.submit(q, regs, [userptr.fill(i, i + 1) for i in range(3)]))
    for r in regs:
        r.unregister()
    assert reg.pinned_bytes == 0
    assert vm_pin() == start
    for i, a in enumerate(arrays):
        assert (a.view(np.uint8) == i + 1).all()
    # Garbage collection unregisters too.
    r = reg.register(np.zeros(1 << 20, dtype=np.uint8))
    assert vm_pin() > start
    del r
    gc.collect()
    assert vm_pin() == start


CHILD = textwrap.dedent(
    """
    import ctypes, sys
    import numpy as np
    import userptr

    mode = sys.argv[1]
    drv = userptr.Driver()
    q = drv.queue()
    reg = userptr.Registry(drv)
    mon = None if mode == "none" else reg.install_monitor(mode)
    n = 1 << 20
    a = np.full(n, 0x11, dtype=np.uint8)
    r = reg.register(a)
    q.wait(reg.submit(q, [r], [userptr.fill(0, 0xAB)]))
    assert (a == 0xAB).all()
    # Discard the array's whole pages behind numpy's back: the process sees zeros there.
    page = 4096
    start = (a.ctypes.data + page - 1) // page * page
    end = (a.ctypes.data + n) // page * page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.madvise(start, end - start, 4) == 0  # MADV_DONTNEED
    if mon is not None:
        mon.sync()
    q.wait(reg.submit(q, [r], [userptr.fill(0, 0xCD)]))
    print("stale", int((a != 0xCD).sum()))
    r.unregister()
    """
)


@pytest.mark.parametrize("mode", ["seccomp", "uffd", "none"])
def test_a_monitor_keeps_a_discarded_array_coherent(mode):
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    stale = int(out.stdout.split("stale")[1].split()[0])
    if mode == "none":
        assert stale > 0, "without a monitor the FILL should go to the discarded pages"
    else:
        assert stale == 0, f"{stale} bytes of the FILL went to the discarded pages"


def test_an_unknown_monitor_and_a_missing_shim_are_refused(dev):
    drv, q, reg = dev
    with pytest.raises(ValueError):
        reg.install_monitor("ptrace")
    with pytest.raises(userptr.MonitorUnavailable, match="LD_PRELOAD"):
        reg.install_monitor("preload")
