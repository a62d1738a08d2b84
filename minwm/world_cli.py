"""`minwm generate`: render a video from a checkpoint, a prompt and a camera trajectory."""

from __future__ import annotations

import argparse

from minwm.argtypes import positive_int


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate an mp4 from a checkpoint, a prompt and a trajectory",
                       description="Generate a video. --trajectory is an action program (S steps -> 1 + 4S frames) "
                                   "or a camera file (our JSON, RealEstate10K .txt, nerfstudio transforms.json; "
                                   "1 + 4k frames are kept). Longer than inference.max_generate_frames latent "
                                   "frames is an error.")
    p.add_argument("--ckpt", required=True, help="stage output directory (model.safetensors, config.yaml)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", help="first frame (PNG/JPEG) for TI2V; resized to the model's size with a note")
    p.add_argument("--trajectory", required=True, help="action program like 'w*8,w+l*4' or a camera file")
    p.add_argument("--out", required=True, help="output .mp4 (written atomically)")
    p.add_argument("--overlay-keys", action="store_true", help="draw the keys held in each frame")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: inference.seed)")
    p.add_argument("--mode", choices=("fewstep", "multistep"), help="override inference.mode")
    p.add_argument("--steps", help="override inference.steps, comma-separated (e.g. 1000,750,500,250)")
    p.add_argument("--camera-guidance", action=argparse.BooleanOptionalAction, default=None,
                   help="override inference.camera_guidance (multistep: CFG's unconditional branch stands still)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from minwm.generate import run_generate

    return run_generate(args)
