"""minwm: a bidirectional video diffusion transformer -> a real-time, camera-controllable,
few-step autoregressive video world model."""

__version__ = "0.1.0"

import os as _os

# OpenMP threads that finish a parallel region spin waiting for the next one (libgomp default: ~300k iterations,
# ~ms). On a loaded or shared CPU a long spin steals the core its partner needs (dev machine under load ~5: a toy
# training step at 2 threads cost 1.4-6 CPU-s with the default policy, 0.55-0.6 with OMP_WAIT_POLICY=PASSIVE).
# But sleeping at once (PASSIVE) makes every one of the ~1000 small ops of a streamed chunk wait for a futex
# wake-up: on the quiet 2-core machine the shape-S streaming chunk took 103 ms with PASSIVE and 78 ms with a short
# spin (GOMP_SPINCOUNT=10000, tens of microseconds), for the same CPU time (157 ms); the first chunk 53 -> 32 ms.
# So the default is a short spin: it bridges the gaps between consecutive ops and gives the core back quickly.
# libgomp reads these once, when torch loads it, so they must be in the environment before `import torch`; a
# user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "10000"


def _keep_freed_memory() -> None:
    """glibc hands large freed blocks back to the kernel (munmap, heap trim) and page-faults them in again on the
    next allocation of the same size, which on CPU is every activation of every pass. Measured, shape M first
    chunk (2 threads): 125,000 minor page faults and 0.2 s of system time per chunk by default, none with the
    thresholds below, and the first chunk 0.90 -> 0.84 s. Freed memory is then kept for reuse up to 1 GiB above
    the peak (RSS stays at its high-water mark, which for a constant-memory rollout is flat anyway). A user's
    own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (read by glibc at start) wins; non-glibc systems are left
    alone."""
    if any(k in _os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)     # glibc's largest allowed value on 64-bit
        libc.mallopt(M_TRIM_THRESHOLD, 2**30)
    except (OSError, AttributeError):
        pass


_keep_freed_memory()

from minwm.errors import MinwmError  # noqa: E402

__all__ = ["MinwmError", "__version__"]
