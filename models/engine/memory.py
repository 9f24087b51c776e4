"""Where the int4 forward's weights live: one block of memory backed by 2 MiB pages.

A 1-token int4 decode streams every projection's codes and scales once (about 66 MB for SmolLM2-135M's
layers, 30 MB more for the Q8_0 LM head) and does little arithmetic per byte, so it runs as fast as the
weights arrive from DRAM. Read through 4 KiB pages, that stream takes a TLB miss every 4 KiB and the
hardware prefetchers stop at every page boundary; the kernels then spend about as long waiting as
computing. Linux backs memory with 2 MiB pages where a program asks for them (transparent huge pages,
`madvise(MADV_HUGEPAGE)`; the default "madvise" mode gives them only to memory so marked), so the
engine copies the quantized modules' tensors into one such block at start-up. Measured on an AMD EPYC
(Zen 4) host, 2 threads: the 30 layers' int4 projections for one row took 2.8 ms instead of 3.9 (the
bench's memory-floor figures and docs/engine.md give the whole forward).

Only where the platform offers it (Linux, with glibc's `madvise`): elsewhere, or when the kernel refuses,
the tensors stay where they are. The bits are the same either way: only their addresses change.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch

HUGE_PAGE = 2 * 2**20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # <linux/mman.h>; MADV_COLLAPSE (Linux 6.1+) builds them at once
ALIGN = 64  # every tensor starts on a cache line


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def huge_page_block(nbytes: int) -> torch.Tensor | None:
    """A [nbytes] uint8 CPU tensor that starts on a 2 MiB boundary and whose pages the kernel was asked to
    back with huge pages before anything touched them; None where madvise is unavailable or refused."""
    madvise = _madvise()
    if madvise is None or nbytes <= 0:
        return None
    span = _round_up(nbytes, HUGE_PAGE)
    # a mapping of its own, so no page of it was touched before the advice (an allocator's block may have been
    # used and freed already); the tensor keeps the mapping alive
    # (private: a shared anonymous mapping is shmem, which transparent huge pages leave alone by default)
    raw = torch.frombuffer(mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                           dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    if madvise(raw.data_ptr() + start, span, MADV_HUGEPAGE) != 0:
        return None
    return raw[start : start + nbytes]


def place_in_huge_pages(modules: list) -> int:
    """Copy the quantized tensors of `modules` (each with `quantized_tensors()` and `relocate(take)`:
    models/weights/quant.py's Int4Linear and Int8Linear) into one huge-page block, in order, and point the
    modules at the copies. Returns the bytes placed (0: left where they were)."""
    modules = list({id(m): m for m in modules}.values())
    block = huge_page_block(sum(_round_up(t.nbytes, ALIGN) for m in modules for t in m.quantized_tensors()))
    if block is None:
        return 0
    offset = 0

    def take(t: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        view = block[offset : offset + t.nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        offset += _round_up(t.nbytes, ALIGN)
        return view

    with torch.no_grad():
        for m in modules:
            m.relocate(take)
    _madvise()(block.data_ptr(), _round_up(block.nbytes, HUGE_PAGE), MADV_COLLAPSE)  # best effort: else khugepaged
    return offset


def huge_page_bytes(t: torch.Tensor) -> int:
    """How many bytes of the mapping that holds `t` the kernel backs with huge pages now (/proc/self/smaps's
    AnonHugePages for that mapping; 0 where there is no such file)."""
    address = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    inside = False
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0
