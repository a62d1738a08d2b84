"""minwm: a bidirectional video diffusion transformer -> a real-time, camera-controllable,
few-step autoregressive video world model."""

__version__ = "0.1.0"

from minwm.errors import MinwmError  # noqa: E402

__all__ = ["MinwmError", "__version__"]
