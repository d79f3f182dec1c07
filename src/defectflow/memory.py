"""Keep freed memory in the process for the next tensor instead of handing it back to the OS.

glibc's malloc serves a block above its mmap threshold (32 MiB at most) with freshly mapped pages
and unmaps it when freed, so every large activation pays the page faults of new memory again: a
batch of 16 images has 100 MB tensors in lite0's first stages. On this project's CPU a 100 MB
clone took 35.6 ms that way and 12.0 ms from the kept heap. Measured in one run on MVTec bottle
(2 threads, same metrics both ways), default -> kept: cflow training 86.4 -> 77.7 s, its PyTorch
scoring 53.9 -> 43.8 ms per image, two clscnf fine-tuning epochs 24.5 -> 21.9 s, DifferNet's forward
pass at 256 x 256 96.6 -> 73.9 ms per image. The allocators that PyTorch's CPU tuning guide
recommends (jemalloc, tcmalloc) keep freed memory the same way. The cost: the process holds on
to its peak memory until it exits, and ONNX Runtime, which has allocators of its own, ran slower
in such a process (cflow at batch 1: 19.5 and 18.9 -> 27.0 and 28.2 ms per image, two runs each
way). So the CLI turns it on where PyTorch computes (training, `--backend torch`), not for the
exported runtimes or `export`; the Python API leaves the process's allocator alone unless asked
(`defectflow.keep_freed_memory()`).
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters of glibc's malloc.h


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it (glibc only); True when both took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
