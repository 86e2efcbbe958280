"""The trainer process's malloc settings: freed tensors go back to the system.

glibc's malloc carves a block from its heap unless the block is larger than the mmap
threshold, and by default that threshold rises (up to 32 MB) each time a block above it is
freed. A training step allocates and frees gigabytes in tensors of a few MB (activations,
logits and their gradients, the optimizer's temporaries, keyframes); once the threshold has
risen past them they all come from the heap, whose freed holes the process keeps, so the
trainer's RSS grew by gigabytes over its first steps (benchmarks/trainer_memory.py).
A fixed threshold (setting it also stops it from rising) gives every block above it a
mapping of its own, returned to the system when it is freed.

Set from the code rather than with `MALLOC_MMAP_THRESHOLD_` in the environment: the trainer
is started in many ways (`swarmrl run` or `train`, torchrun, tests, benchmarks), and the
environment would pass it on to every child process as well. Elsewhere than glibc this
does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20  # bytes: tensors of 1 MB and more get a mapping of their own


def return_freed_tensors() -> bool:
    """Fix glibc's mmap threshold at `MMAP_THRESHOLD`; False where malloc is not glibc's."""
    try:
        process = ctypes.CDLL(None)  # the symbols this process has loaded, libc's among them
        process.gnu_get_libc_version  # noqa: B018 (only glibc has it: mallopt's numbers are its)
        mallopt = process.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD) failed: freed tensors may stay in the heap")
        return False
    return True
