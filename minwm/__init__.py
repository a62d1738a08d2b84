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

from minwm.errors import MinwmError  # noqa: E402

__all__ = ["MinwmError", "__version__"]
