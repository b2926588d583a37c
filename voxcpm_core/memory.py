"""Process memory policy for CPU work: keep freed memory for reuse instead of handing it back.

glibc's malloc serves large blocks with mmap and unmaps them when freed, and trims the heap's top;
a training step (or a VAE encode) allocates and frees GBs of activations, so every step faults them
in again page by page. On the 2-core VM of the benches that is 2.5 M page faults (3.5 s) of a 5.2 s
VAE encode and ~0.6 s of a 4.8 s LoRA step. With every block on the heap and no trimming the memory
is reused without a fault; the process's RSS then stays at its high-water mark, which a training loop
reaches every step anyway. Same as running with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647.

Not for full fine-tuning: there weights, gradients and AdamW moments fill 4x the model, and a heap that
is never trimmed fragments ~0.5 GiB above glibc's own peak (13.8 vs 13.3 GiB at the VoxCPM1.5 size).
Once set it stays for the life of the process (glibc cannot go back to its adaptive thresholds).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
_applied = False


def keep_freed_memory() -> bool:
    """Switch glibc's malloc to reuse freed memory (process-wide, idempotent); False where there is no glibc."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
