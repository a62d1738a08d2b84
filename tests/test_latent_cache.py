import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minwm.cameras.camera import Cameras
from minwm.codecs.config import TextEncoderConfig
from minwm.codecs.text import TextEncoder
from minwm.codecs.vae import VideoCodec
from minwm.data.latent_cache import LatentDataset, build_cache
from minwm.errors import MinwmError

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY = {"base_dim": 4, "z_dim": 4, "dim_mult": [1, 2, 4], "num_res_blocks": 1, "attn_scales": [],
        "temperal_downsample": [True, True]}

# Synthetic clips, shared with the subprocess below (so both build exactly the same inputs).
CLIPS_SRC = textwrap.dedent('''
    import math
    import numpy as np
    import torch
    from types import SimpleNamespace
    from minwm.cameras.camera import Cameras

    def make_clip(i, frames=9, size=16):
        rng = np.random.default_rng(i)
        f = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
        w2c = torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1)
        w2c[:, 2, 3] = -0.1 * torch.arange(frames, dtype=torch.float64) - i  # walking forward
        return SimpleNamespace(name=f"clip_{i:03d}", frames=f, cameras=Cameras(w2c, torch.tensor([0.9, 0.9, 0.5, 0.5])),
                               caption=f"scene number {i}", source="synthetic")

    def make_clips(n):
        clips = [make_clip(i) for i in range(n)]
        clips[3].frames = clips[3].frames[:, :, :14]            # bad size: rejected
        clips[5].cameras = clips[5].cameras[:8]                  # poses do not match frames: rejected
        clips[6].frames = clips[6].frames[:7]; clips[6].cameras = clips[6].cameras[:7]  # 7 frames -> first 5 kept
        return clips
''')
exec(CLIPS_SRC)


@pytest.fixture(scope="module")
def codecs(tmp_path_factory):
    d = tmp_path_factory.mktemp("codec")
    codec = VideoCodec.from_config(TINY, seed=0)
    codec.save_pretrained(d / "vae")
    return VideoCodec.from_pretrained(d / "vae"), TextEncoder.from_config(TextEncoderConfig(max_text_len=16)), d / "vae"


def build(codecs, clips, out, shard_clips=2):
    names = [c.name for c in clips]
    return build_cache(lambda i: clips[i], names, codecs[0], codecs[1], out, shard_clips)


def test_cache_contents_cameras_and_rejections(codecs, tmp_path):
    clips = make_clips(8)
    index = build(codecs, clips, tmp_path / "cache")
    assert set(index["rejected"]) == {"clip_003", "clip_005"}
    assert "not divisible" in index["rejected"]["clip_003"] and "8 cameras for 9 frames" in index["rejected"]["clip_005"]
    ds = LatentDataset(tmp_path / "cache")
    assert len(ds) == 6 and "clip_003" not in ds.names
    item = ds[ds.names.index("clip_001")]
    assert item["latents"].shape == (4, 3, 4, 4) and item["caption"] == "scene number 1"
    # Latent frame i carries the camera of pixel frame 4i.
    torch.testing.assert_close(item["w2c"], clips[1].cameras.w2c[[0, 4, 8]])
    # Latents are the codec's normalised encoding of the clip; text as the text encoder gives it.
    x = torch.from_numpy(clips[1].frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    torch.testing.assert_close(item["latents"], codecs[0].encode(x)[0])
    torch.testing.assert_close(item["embeds"], codecs[1].encode(["scene number 1"])["embeds"][0])
    short = ds[ds.names.index("clip_006")]
    assert short["latents"].shape[1] == 2 and short["w2c"].shape[0] == 2
    torch.testing.assert_close(ds.cameras(ds.names.index("clip_006")).w2c, clips[6].cameras.w2c[[0, 4]])


def test_resume_refuses_a_different_codec(codecs, tmp_path):
    clips = make_clips(8)[:4]
    build(codecs, clips, tmp_path / "cache")
    other = VideoCodec.from_config(TINY, seed=1)
    with pytest.raises(MinwmError, match="different codec"):
        build_cache(lambda i: clips[i], [c.name for c in clips], other, codecs[1], tmp_path / "cache", 2)


def test_missing_index_is_a_one_line_error(tmp_path):
    with pytest.raises(MinwmError, match="index.json: not found"):
        LatentDataset(tmp_path)


def test_sigkill_resume_equals_uninterrupted_run(codecs, tmp_path):
    n, shard = 12, 1
    script = tmp_path / "run.py"
    script.write_text(CLIPS_SRC + textwrap.dedent(f'''
        import sys, torch
        torch.set_num_threads(1)
        from minwm.codecs.config import TextEncoderConfig
        from minwm.codecs.text import TextEncoder
        from minwm.codecs.vae import VideoCodec
        from minwm.data.latent_cache import build_cache
        clips = make_clips({n})
        build_cache(lambda i: clips[i], [c.name for c in clips], VideoCodec.from_pretrained({str(codecs[2])!r}),
                    TextEncoder.from_config(TextEncoderConfig(max_text_len=16)), sys.argv[1], {shard})
    '''))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ref = tmp_path / "ref"
    build(codecs, make_clips(n), ref, shard)

    out = tmp_path / "killed"
    kills = 0
    for target in (2, 6):
        p = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and len(list(out.glob("shard_*"))) < target:
            time.sleep(0.01)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        assert not (out / "index.json").exists() or p.returncode == 0
        # Whatever is on disk is complete: every shard opens.
        for f in out.glob("shard_*.safetensors"):
            from safetensors import safe_open
            with safe_open(str(f), "pt") as h:
                assert json.loads(h.metadata()["minwm"])["format"]
    assert kills >= 2
    subprocess.run([sys.executable, str(script), str(out)], env=env, check=True, stdout=subprocess.DEVNULL)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no leftovers
    for f in ref.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
