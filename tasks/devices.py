"""Which device a shard task runs on: a pool of device tokens, at most `per_device` tasks per device at once.

Inside one process (the thread runner) this is simpler and cheaper than Prefect concurrency limits, and it
tells each task which GPU to use. On Dask, use worker resources instead (see the README).
"""
from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from .models import pick_device


_local = threading.local()


def replica() -> int:
    """The slot of the device the calling thread holds (0..per_device - 1; 0 outside `acquire`): tasks that
    share a device at once use one model replica per slot (see `models.cached_model`)."""
    return getattr(_local, "slot", 0)


class DevicePool:
    """Hands out device names from a fixed list; `acquire()` blocks until one is free."""

    def __init__(self, devices: list[str], per_device: int = 1) -> None:
        self.devices = list(devices)
        self._free: queue.Queue[tuple[str, int]] = queue.Queue()
        for slot in range(per_device):
            for d in self.devices:
                self._free.put((d, slot))

    @contextmanager
    def acquire(self) -> Iterator[torch.device]:
        name, slot = self._free.get()
        before = replica()
        _local.slot = slot
        try:
            yield torch.device(name)
        finally:
            _local.slot = before
            self._free.put((name, slot))


_pools: dict[tuple[str, int], DevicePool] = {}
_lock = threading.Lock()


def visible_devices(requested: str = "auto") -> list[str]:
    """Every visible GPU for 'auto' (or the CPU when there is none); else the one requested device."""
    if requested == "auto" and torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(pick_device(requested))]


def device_pool(requested: str = "auto", per_device: int = 1) -> DevicePool:
    """Return the process-wide pool for this device request (created once)."""
    with _lock:
        key = (requested, per_device)
        if key not in _pools:
            _pools[key] = DevicePool(visible_devices(requested), per_device)
        return _pools[key]


def keep_cpu_buffers(threshold_bytes: int = 1 << 31) -> bool:
    """Ask glibc's malloc to keep large freed buffers instead of returning them to the OS; True if it did.

    Batched CPU attribution allocates activation buffers of tens of MB per model call; by default glibc
    serves those with mmap and unmaps them on free, so every call page-faults fresh memory. Measured on the
    2-core machine (benchmarks/README): LIME/KernelSHAP on 64 demo images ran 1.8-2.0x slower that way.
    One arena for every thread, too: the shard tasks run in the task runner's threads, and a thread other
    than the main one gets its own malloc arena, whose heaps are at most 64 MiB, so a larger buffer is
    mmapped and unmapped per call there whatever the threshold (a ResNet-50 shard scored in a new thread ran
    at 5.4-5.8 images/s against 6.8-7.1 with one arena, 7.5 on the main thread; 2 cores, batch 16, 224²).
    Process-wide, so only the command line and the benchmarks call it; a no-op off glibc; call it before
    starting threads (a thread keeps the arena it first used).
    """
    import ctypes
    import ctypes.util
    import platform
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    settings = ((m_mmap_threshold, min(threshold_bytes, 2 ** 31 - 1)),
                (m_trim_threshold, min(2 * threshold_bytes, 2 ** 31 - 1)),
                (m_arena_max, 1))
    return all(mallopt(param, ctypes.c_int(value)) for param, value in settings)
