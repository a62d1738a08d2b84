"""minwm: a bidirectional video diffusion transformer -> a real-time, camera-controllable,
few-step autoregressive video world model."""

__version__ = "0.1.0"

import os as _os

# OpenMP threads that finish a parallel region spin (libgomp: ~300k iterations) waiting for the next one. On a
# loaded or shared CPU the spinning thread steals the core its partner needs: measured on the 2-core dev
# machine under load ~5, a toy training step at 2 threads cost 1.4-6 CPU-s (up to 50 s wall) with the default
# policy and 0.55-0.6 with PASSIVE (threads then sleep at once; OMP_WAIT_POLICY=ACTIVE brings the spinning back
# for a dedicated machine). libgomp reads the policy once, when torch loads it, so it must be in the environment
# before `import torch`; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from minwm.errors import MinwmError  # noqa: E402

__all__ = ["MinwmError", "__version__"]
