"""`minwm play`: steer a checkpoint live from a browser."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from minwm.errors import MinwmError

DTYPES = ("float32", "bfloat16", "float16")


def register(sub) -> None:
    p = sub.add_parser("play", help="serve a web page that plays a checkpoint live from the keyboard",
                       description="Serve a page that streams the world model's frames as they are generated "
                                   "and steers it with the keyboard (WASD, Q/E, J/L, I/K, arrows).")
    p.add_argument("--ckpt", required=True, type=Path, help="checkpoint directory (a stage output)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights' dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--max-sessions", type=int, default=2,
                   help="concurrent players; one more is told the server is busy (default 2)")
    p.add_argument("--idle", choices=("pause", "noop"), default="pause",
                   help="with no key held: pause (default) or keep generating no-motion chunks")
    p.add_argument("--prompt", default=None, help="prompt a new session starts with")
    p.add_argument("--seed", type=int, default=None, help="seed a new session starts with (default: the config's)")
    p.add_argument("--image", default=None,
                   help="first frame (PNG/JPEG) of every rollout, resized to the model's size; without it an "
                        "image-to-video checkpoint starts from a render of its procedural world (a new one per seed)")
    p.add_argument("--record-dir", type=Path, default=Path("runs/play"),
                   help="where session recordings (mp4) are saved (default runs/play)")
    p.add_argument("--jpeg-quality", type=int, default=85, help="JPEG quality of streamed frames, 1-100")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run)


def shared_weights_factory(ckpt: Path, device: str, dtype):
    """Load the checkpoint once; each call of the returned factory makes a new WorldModel (own KV cache,
    decoder state and RNG) over the same backbone, codec and text encoder. Returns (config, factory)."""
    from minwm.world import WorldModel

    loaded = WorldModel.from_checkpoint(ckpt, device=device, dtype=dtype)
    # Keep the modules, not the loaded session: its KV cache would hold memory no player uses.
    parts = (loaded.backbone, loaded.config, loaded.codec, loaded.text_encoder)
    device, dtype = loaded.device, loaded.dtype
    del loaded

    def factory() -> WorldModel:
        return WorldModel(*parts, device=device, dtype=dtype)

    return parts[1], factory


def run(args: argparse.Namespace) -> int:
    import torch

    from minwm.serve.server import bind, create_app, make_server
    from minwm.serve.session import SessionOptions

    if not 0 <= args.port <= 65535:
        raise MinwmError(f"play: --port: expected 0..65535, got {args.port}")
    if args.seed is not None and args.seed < 0:
        raise MinwmError(f"play: --seed: expected >= 0, got {args.seed}")
    if args.threads is not None:
        if args.threads < 1:
            raise MinwmError(f"play: --threads: expected >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Bind before loading: a taken port fails in a second, not after the weights are read.
    sock = bind(args.host, args.port)
    try:
        config, factory = shared_weights_factory(args.ckpt, device, dtype)
        image = None
        if args.image:
            from minwm.generate import read_image

            image = read_image(args.image)
        options = SessionOptions(prompt=args.prompt or SessionOptions.prompt, image=image,
                                 seed=args.seed if args.seed is not None else config["inference"].seed,
                                 idle=args.idle, jpeg_quality=args.jpeg_quality, record_dir=args.record_dir)
        app = create_app(factory, max_sessions=args.max_sessions, options=options)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"minwm play: {args.ckpt} on {device} ({dtype}); open http://{shown}:{port}/ (ctrl-c to stop)",
              flush=True)
        try:
            make_server(app, sock).run(sockets=[sock])
        except KeyboardInterrupt:   # ctrl-c is how a server is stopped; uvicorn has already shut down cleanly
            pass
    finally:
        sock.close()
    return 0
