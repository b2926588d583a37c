"""Process memory policy for CPU work: keep freed memory for reuse instead of handing it back.

glibc's malloc serves large blocks with mmap and unmaps them when freed, and trims the heap's top;
a training step (or a VAE encode) allocates and frees GBs of activations (and, in full fine-tuning,
gradients), so every step faults them in again page by page. With every block on the heap and no
trimming the memory is reused without a fault; the process's RSS then stays at its high-water mark,
which a training loop reaches every step anyway. Same as running with MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647. The training steps get faster at the same peak RSS with fixed
shapes, and a slightly higher one with batch shapes changing every step (bench/train.py measures it).

``reusing_freed_memory`` switches for one block and hands the memory back afterwards: a training run
on CPU, VAE encoding into the latent cache and VAE decoding in generation.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
# where glibc's adaptive thresholds settle on 64-bit: mmap above 32 MiB, trim above twice that
SETTLED_MMAP_THRESHOLD, SETTLED_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 32 * 2**20, 64 * 2**20, 65536
_depth = 0  # reusing_freed_memory blocks open
_lock = threading.Lock()


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both exist only in glibc)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None
    return libc


@contextmanager
def reusing_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Reuse freed memory inside the block; when the outermost block ends, hand it back (``malloc_trim``) and
    set glibc's thresholds to where its adaptive policy settles. A no-op when not ``enabled`` (e.g. on a GPU)
    or without glibc. Blocks may nest and overlap across threads."""
    global _depth
    libc = _libc() if enabled else None
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:  # every block on the heap, never trimmed
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM_THRESHOLD)
                libc.malloc_trim(0)
